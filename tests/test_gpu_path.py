"""The GPU path's CPU-testable parts: backend choice and its messages, autocast, the causal conv1d,
the fused EMA, the kernel report and the GPU check's refusal, report and parity function."""

import os
import subprocess
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import benchmarks.gpu_check as gpu_check
import cli
from models import SelectiveSSM, ZigmaMixer
from selective_scan import (
    causal_conv1d,
    dispatch,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
    set_backend,
)
from selective_scan.check import PARITY_TOL, scan_inputs, scan_parity
from train import update_ema

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # only inspected, never allocated on


@pytest.fixture
def no_kernel(monkeypatch):
    """As on a machine where mamba_ssm's kernel does not import, nor Triton (test_triton_scan.py
    covers the GPU path with Triton); restores the backend after."""
    error = "ModuleNotFoundError: No module named 'selective_scan_cuda'"
    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (None, error))
    monkeypatch.setattr(dispatch, "load_triton_scan", lambda: (None, "ImportError: no triton"))
    dispatch.warn_slow_path.cache_clear()
    yield
    dispatch.warn_slow_path.cache_clear()
    set_backend("auto")


def test_resolve_backend_says_what_runs_and_why(no_kernel, monkeypatch):
    assert resolve_backend("meta", "auto") == (
        "torch", "auto: tensors on meta, the fused scans run on CPU or CUDA only")
    backend, why = resolve_backend(CUDA, "auto")
    assert backend == "torch"
    assert "No module named 'selective_scan_cuda'" in why and dispatch.INSTALL_HINT in why
    with pytest.raises(RuntimeError, match="did not load .*selective_scan_cuda.*setup_cuda.sh"):
        resolve_backend(CUDA, "mamba_ssm")
    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (print, ""))  # a kernel "loads"
    assert resolve_backend(CUDA, "auto")[0] == "mamba_ssm"
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        resolve_backend("cpu", "mamba_ssm")
    set_backend("torch")  # the process-wide setting is what resolve_backend reads by default
    assert resolve_backend(CUDA)[0] == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("jax")


def test_process_wide_backend_reaches_the_models_scan(no_kernel):
    ssm, x = SelectiveSSM(8, 4), torch.randn(2, 8, 5)
    set_backend("mamba_ssm")  # the models call selective_scan without a backend argument
    with pytest.raises(RuntimeError, match="setup_cuda.sh"):
        ssm(x)
    set_backend("torch")
    assert ssm(x).shape == (2, 8, 5)


def test_scan_backend_option_logs_refuses_and_warns_once(no_kernel):
    parser = cli.argparse.ArgumentParser()
    cli.add_scan_backend(parser)
    assert parser.parse_args(["--scan_backend", "torch"]).scan_backend == "torch"
    assert parser.parse_args([]).scan_backend == "auto"
    line = cli.use_scan_backend("auto", torch.device("cpu"))
    assert line == "Selective scan backend: {} ({})".format(*resolve_backend("cpu", "auto"))
    with pytest.raises(SystemExit, match="--scan-backend mamba_ssm: .*setup_cuda.sh"):
        cli.use_scan_backend("mamba_ssm", torch.device("cpu"))
    assert dispatch.get_backend() == "auto"  # a refused backend is not left set for what follows
    with pytest.warns(RuntimeWarning, match="selective_scan_cuda.*scripts/setup_cuda.sh") as seen:
        cli.use_scan_backend("auto", CUDA)
        cli.use_scan_backend("auto", CUDA)
    assert len(seen) == 1


def test_autocast_leaves_the_scan_in_float32():
    inputs = {k: v.detach() for k, v in scan_inputs(2, 8, 37, 4, torch.bfloat16, "cpu").items()}
    plain = selective_scan(**inputs, delta_softplus=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert torch.equal(plain, cast)  # autocast changes nothing inside the scan
    exact = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    torch.testing.assert_close(cast.double(), exact, rtol=1e-2, atol=1e-2)
    # A model under bf16 autocast: its A, D and dt bias (and their gradients) stay float32
    torch.manual_seed(0)
    ssm, x = SelectiveSSM(16, 4, dt_rank=2), torch.randn(2, 16, 33)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its input comes from a bf16 conv
        y = ssm(x.bfloat16())
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16
    for p in (ssm.A_log, ssm.D, ssm.dt_proj.bias):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    torch.testing.assert_close(y.float(), ssm(x), rtol=0.05, atol=0.05)


def causal_conv_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        activation: str | None) -> torch.Tensor:
    """y[b, d, t] = bias[d] + sum_k weight[d, k] x[b, d, t - (W - 1) + k], x = 0 before the start:
    the causal conv1d of Mamba's mixer written as a loop over taps (no conv op involved)."""
    weight = weight.reshape(weight.shape[0], -1)
    width, length = weight.shape[1], x.shape[-1]
    y = torch.zeros_like(x) if bias is None else bias[:, None].expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k  # tap k reads the input `shift` positions back
        y[..., shift:] = y[..., shift:] + weight[:, k, None] * x[..., : length - shift]
    return nn.functional.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_the_formula(activation):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True)  # nn.Conv1d's layout
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    expected = causal_conv_by_hand(x, weight, bias, activation)
    got = causal_conv1d(x, weight, bias, activation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), (x, weight, bias))
    grads_expected = torch.autograd.grad(expected.sum(), (x, weight, bias))
    for g, e in zip(grads, grads_expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    plain = x.detach()  # (D, W) weights, no bias
    torch.testing.assert_close(causal_conv1d(plain, weight.detach().squeeze(1)),
                               causal_conv_by_hand(plain, weight.detach(), None, None))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")


def test_zigma_mixer_convolves_causally():
    """ZigmaMixer's conv is the causal formula on its own weights: no output sees a later token."""
    torch.manual_seed(0)
    mixer, x = ZigmaMixer(8, 0, (2, 3)), torch.randn(2, 16, 6)
    expected = causal_conv_by_hand(x, mixer.conv1d.weight, mixer.conv1d.bias, "silu")
    torch.testing.assert_close(
        causal_conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, "silu"), expected)


def test_update_ema_is_the_exponential_average():
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(ema, model, 0.9)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[name], 0.9 * before[name] + 0.1 * value)


def test_kernel_report_on_cpu():
    result = subprocess.run([sys.executable, "-m", "selective_scan"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert f"torch: {torch.__version__}" in result.stdout
    assert "loads  torch (chunked PyTorch scan)" in result.stdout
    if not dispatch.mamba_ssm_available():
        assert "MISSING mamba_ssm" in result.stdout and "selective_scan_cuda" in result.stdout
        assert result.stdout.count(dispatch.INSTALL_HINT) == 1  # the one command that fixes it


@pytest.mark.slow
def test_gpu_check_refuses_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "results" / "gpu.md"
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
    assert not any(tmp_path.iterdir())


def test_scan_parity_on_cpu_finds_agreement_and_disagreement():
    shape = {"batch": 2, "dim": 8, "length": 40, "state": 4}
    ok = scan_parity(partial(selective_scan, backend="torch"), selective_scan_ref, **shape,
                     dtype=torch.float32, device="cpu")
    assert set(ok) == {"out", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    assert max(ok.values()) < 1e-5

    def no_skip(**kw):  # a scan that forgets D: the output and D's gradient must disagree
        return selective_scan_ref(**{**kw, "D": kw["D"] * 0})

    bad = scan_parity(no_skip, selective_scan_ref, **shape, dtype=torch.float32, device="cpu")
    assert bad["out"] > PARITY_TOL[torch.float32] and bad["D"] > 0.5


def test_parity_judges_two_different_scans_and_names_what_is_missing(monkeypatch):
    """gpu_check's parity against another code path: the token-by-token reference agrees with
    the chunked scan in both dtypes; a scan that forgets D fails both rows, naming it; a backend
    that resolve_backend refuses is reported as unavailable, with the reason."""
    shape = {"batch": 2, "dim": 8, "length": 40, "state": 4}

    def scan(backend, **kw):
        if backend == "no-skip":
            return selective_scan_ref(**{**kw, "D": kw["D"] * 0})
        return selective_scan_ref(**kw) if backend == "torch" else selective_scan(**kw,
                                                                                  backend=backend)

    monkeypatch.setattr(gpu_check, "selective_scan", lambda backend, **kw: scan(backend, **kw))
    monkeypatch.setattr(gpu_check, "resolve_backend", lambda device, backend: (
        resolve_backend(device, "torch" if backend == "no-skip" else backend)))
    chunked, broken, triton = gpu_check.parity(["cpu", "no-skip", "triton"], "cpu", shape,
                                               deadline=time.time() + 600)
    assert [(r["dtype"], r["ok"]) for r in chunked["rows"]] == [("float32", True),
                                                               ("bfloat16", True)]
    assert [r["ok"] for r in broken["rows"]] == [False, False]
    assert all(r["errors"][k] > r["tol"] for r in broken["rows"] for k in ("out", "D"))
    assert triton["backend"] == "triton" and "Error: " in triton["unavailable"]


def test_workers_begin_nothing_after_their_deadline():
    past = time.time() - 1
    assert gpu_check.parity(["cpu"], "cpu", {}, deadline=past) == [
        {"backend": "cpu", "unavailable": gpu_check.SPENT}]
    assert gpu_check.scan_times(["torch"], "cpu", [{}], 1, 1, deadline=past) == {
        "rows": [], "cut": True}
    rows = gpu_check.model_figures(["USM-T/1"], "torch", [False, True], True, "cpu", 8, 2, 1, 1,
                                   deadline=past)
    assert [r["error"] for r in rows] == [gpu_check.SPENT] * 2


def model_row(model, backend, checkpoint, img_s, mb, **more):
    return {"model": model, "backend": backend, "checkpoint": checkpoint, "train_img_s": img_s,
            "train_mb": mb, **more}


def test_claims_compare_usm_with_zigma_without_checkpointing():
    rows = [model_row("USM-B/1", "mamba_ssm", False, 180.0, 700.0),
            model_row("USM-B/1", "mamba_ssm", True, 100.0, 300.0),
            model_row("Zigma-B/1", "mamba_ssm", False, 100.0, 1000.0),
            model_row("Zigma-B/1", "mamba_ssm", True, 10.0, 10.0)]
    speed, memory = gpu_check.claims(rows)
    assert "**1.80x**" in speed and "met" in speed and "NOT" not in speed
    assert "**0.70x**" in memory and "NOT" not in memory
    rows[0] |= {"train_img_s": 160.0, "train_mb": 710.0}
    assert all("NOT met" in line for line in gpu_check.claims(rows))
    assert "could not be checked" in gpu_check.claims(rows[:2])[0]


def test_gpu_report_shows_every_step_and_measurement():
    errors = dict.fromkeys(["out", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"], 1e-6)
    parity = [{"backend": "mamba_ssm", "rows": [
        {"dtype": "float32", "errors": errors, "worst": "out", "tol": 1e-3, "ok": True},
        {"dtype": "bfloat16", "errors": {**errors, "B": 0.2}, "worst": "B", "tol": 5e-2,
         "ok": False}]}, {"backend": "triton",
                  "unavailable": "not available here (ValueError: no such backend)"}]
    scan = {"backends": ["mamba_ssm", "torch"], "cut": True, "rows": [
        {"dtype": "float32", "batch": 8, "dim": 1536, "length": 1024, "state": 16,
         "mamba_ssm": 1.234, "torch": 12.5}]}
    models = {"rows": [model_row("USM-B/1", "mamba_ssm", False, 123.4, 2048.0, sample_ms=5.25,
                                 sample_mb=700.0),
                       {"model": "Zigma-B/1", "backend": "mamba_ssm", "checkpoint": False,
                        "error": "out of memory"}],
              "skipped_backends": ["torch"], "model": "USM-B/1", "warmup": 2, "repeats": 5}
    run = {"command": "train.py --model USM-T/2", "losses": [1.0, 0.2], "falls": True,
           "backend": "Selective scan backend: mamba_ssm (...)", "samples": [16, 32, 32, 3]}
    meta = {"machine": "NVIDIA H100", "dry": False, "args": "--bundle .gpu-bundle",
            "date": "2026-01-01T00:00:00", "build": "ok in 200 s", "since": time.time() - 600,
            "budget": 540}
    steps = {name: {"status": "ok", "seconds": 10.0, "share": 60.0, "result": result}
             for name, result in [("report", "torch: 2.11.0"), ("parity", parity),
                                  ("scan", scan), ("models", models), ("run", run)]}
    steps["run"] = {"status": "SKIPPED: too little of the budget left", "seconds": 0.0,
                    "share": 0.0}
    text = gpu_check.report(meta, steps)
    assert "# GPU check: NVIDIA H100" in text and "torch: 2.11.0" in text
    assert "`bash scripts/gpu_check.sh --bundle .gpu-bundle`" in text
    assert "ok in 200 s" in text and "(fits in 9 minutes: NO)" in text
    assert "| parity | ok | 10 | 60 |" in text and "| run | SKIPPED: too little" in text
    assert "| mamba_ssm | bfloat16 |" in text and "FAILED (B)" in text and "2.0e-01" in text
    assert "triton: not available here (ValueError: no such backend)" in text
    assert "| float32 | 8 | 1536 | 1024 | 16 | 1.23 | 12.50 |" in text
    assert f"The other shapes: {gpu_check.SPENT}" in text
    assert "| USM-B/1 | mamba_ssm | no | 123.4 | 2048 | 5.2 | 700 |" in text
    assert "| Zigma-B/1 | mamba_ssm | no | out of memory | – | – | – |" in text
    assert "could not be checked" in text and "USM-B/1 with torch: not measured" in text
    assert "Not measured: SKIPPED" in text


def test_budget_shortens_then_skips_what_does_not_fit():
    """Each step's share: its plan while the budget allows, less (shortened) when the steps after
    it would not fit otherwise, nothing (skipped) below its least."""
    least_after_report = sum(least for _, least in list(gpu_check.PLAN.values())[1:])
    planned, least = gpu_check.PLAN["report"]
    assert gpu_check.Budget(10_000, time.time()).share("report") == (planned * 1.5, False)
    share, short = gpu_check.Budget(least_after_report + least + 1, time.time()).share("report")
    assert short and least <= share < planned
    assert gpu_check.Budget(least_after_report + least - 1, time.time()).share("report")[0] == 0


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (PEP 427) whose module says its name: a bundle's stand-in."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"NAME = {name!r}\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


@pytest.mark.slow
def test_gpu_check_dry_run_installs_the_bundle_and_runs_every_step(tmp_path):
    """The whole script on the CPU, as CI runs it: a bundle (one stand-in wheel, without the
    kernels' sources, which make_gpu_bundle.sh downloads) installed offline into a scratch
    folder, then every step with tiny shapes; gpu.md says each step ran."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    make_wheel(bundle, "bundle_probe", "0.1")
    (bundle / "install.txt").write_text("bundle_probe==0.1\n")
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--bundle", str(bundle), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "VENV": sys.prefix})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run: installed offline (kernels without their CUDA code): bundle_probe 0.1" \
        in result.stdout
    text = out.read_text()
    assert "# GPU check: CPU (DRY RUN on the CPU)" in text
    for step in gpu_check.PLAN:
        assert f"| {step} | ok |" in text or f"| {step} | shortened |" in text
    assert "| cpu | float32 |" in text and "triton: not available here" in text
    assert "| USM-T/1 | cpu | yes |" in text and "| Zigma-T/1 | cpu | no |" in text
    assert "samples: [16, 8, 8, 3]" in text


def test_nvcc_arch_filter_keeps_only_the_asked_architectures(tmp_path):
    """scripts/nvcc_arch_filter.sh (PYTORCH_NVCC of setup_cuda.sh) passes nvcc everything but the
    -gencode pairs of other architectures and repeated ones, in both spellings, and refuses to
    drop them all."""
    echo = tmp_path / "nvcc"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    flags = ["-c", "scan.cu", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
             "arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_90,code=sm_90",
             "-gencode=arch=compute_120,code=sm_120", "--threads", "4"]

    def nvcc(archs: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/nvcc_arch_filter.sh", *flags], cwd=REPO,
                              capture_output=True, text=True,
                              env={**os.environ, "REAL_NVCC": str(echo),
                                   "TORCH_CUDA_ARCH_LIST": archs})

    assert nvcc("9.0").stdout.split() == [
        "-c", "scan.cu", "-gencode", "arch=compute_90,code=sm_90", "-gencode",
        "arch=compute_90,code=compute_90", "--threads", "4"]
    assert nvcc("8.0;12.0+PTX").stdout.split()[2:6] == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_120,code=sm_120"]
    refused = nvcc("7.5")
    assert refused.returncode == 1 and "no -gencode" in refused.stderr


def test_gpu_check_starts_without_diffusers():
    """gpu.md must be written even where the bundle's diffusers did not install: the check and
    its scan workers import without it (only the model and training steps need it)."""
    blocked = "import sys; sys.modules['diffusers'] = None; import benchmarks.gpu_check"
    result = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
