"""The C++ CPU scan (backend "cpu"): exact against the float64 token-by-token reference of
test_selective_scan.py for the output and every gradient, deterministic, chosen by "auto" when it
builds, and replaced by the PyTorch scan, with one warning that says why, when it does not."""

import functools
import os
import subprocess
import sys
import textwrap
import warnings
from functools import partial

import pytest
import torch

import cli
from models import SelectiveSSM
from selective_scan import cpu, dispatch, resolve_backend, selective_scan, set_backend
from tests.test_selective_scan import (
    OPTIONS,
    assert_matches_reference,
    make_inputs,
    output_and_grads,
    scan_by_token,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cpu_scan = partial(selective_scan, backend="cpu")


@pytest.fixture(autouse=True)
def cpu_kernel(request):
    """Every test here but the fallback's needs the kernel; where it does not build (no
    compiler), they skip, naming why, and the fallback test still runs."""
    if "failing_build" in request.fixturenames:
        return
    library, why_not = cpu.load_cpu_kernel()
    if library is None:
        pytest.skip(f"the C++ CPU scan does not build here: {why_not}")


def relative_errors(got: dict, expected: dict) -> dict[str, float]:
    return {k: ((got[k].double() - expected[k]).abs().max() / expected[k].abs().max()).item()
            for k in expected}


def float32_errors(inputs: dict, softplus: bool = True, scan=cpu_scan) -> dict[str, float]:
    """The float32 kernel (through `scan`) against the float64 reference on the same
    (float32-rounded) inputs: the largest error of the output and of each gradient, relative to
    its largest entry."""
    rounded = {k: v.detach().float().double().requires_grad_() for k, v in inputs.items()}
    y_ref, grads_ref = output_and_grads(scan_by_token, rounded, softplus)
    single = {k: v.detach().float().requires_grad_() for k, v in rounded.items()}
    y = scan(**single, delta_softplus=softplus)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((y * weight.float()).sum(), list(single.values()))
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    return relative_errors({"out": y, **dict(zip(single, grads, strict=True))},
                           {"out": y_ref, **grads_ref})


@pytest.mark.parametrize("groups", [None, 1, 2], ids=["BC3d", "G1", "G2"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cpu_backend_matches_reference_float64(option, groups):
    names, softplus = OPTIONS[option]
    inputs = make_inputs(37, groups, names)  # 2 full tiles of 16 tokens and 5; 2 or 4 lanes
    assert_matches_reference(cpu_scan, inputs, softplus)


# Blocks of W channels per group: W = 8 (AVX2, Arm) or 16 (AVX-512); the ids name both.
@pytest.mark.parametrize(
    "length, dim, groups, state",
    [(1, 4, None, 3), (16, 16, None, 5), (70, 20, 2, 7), (33, 24, 3, 2), (20, 40, 2, 3)],
    ids=["L1", "one-tile-2x8-1x16", "G2-8+2-10", "G3-8-8", "G2-8+8+4-16+4"],
)
def test_cpu_backend_layouts_match_reference_float64(length, dim, groups, state):
    inputs = make_inputs(length, groups, dim=dim, state=state)
    assert_matches_reference(cpu_scan, inputs, delta_softplus=True)


@pytest.mark.parametrize(
    "length, dim, groups, state",
    [(100, 32, None, 16), (37, 20, 2, 19), (17, 8, 1, 16), (5, 4, 2, 3)],
    ids=["N16-4-blocks", "N19-G2", "N16-tile+1", "N3-short"],
)
def test_cpu_backend_float32_is_exact_to_float_precision(length, dim, groups, state):
    # float32 has runs of 16 states in registers (N = 16, 19), single states for the rest
    errors = float32_errors(make_inputs(length, groups, dim=dim, state=state))
    assert max(errors.values()) < 2e-6, errors


def test_cpu_backend_extreme_decays():
    inputs = make_inputs(50, groups=2, dim=20, state=16)
    with torch.no_grad():
        inputs["A"][:6] = -1e4  # delta*A from -1e4 to -7e3 on six channels
        inputs["delta"][:, 10:13] += 1e3  # softplus: a decay of up to exp(-1e3 * 1.55) per token
    assert_matches_reference(cpu_scan, inputs, delta_softplus=True)
    errors = float32_errors(inputs)
    assert max(errors.values()) < 2e-6, errors


def test_cpu_backend_without_softplus_takes_negative_steps():
    inputs = make_inputs(20, dim=4, state=3)
    with torch.no_grad():  # delta + bias of -0.2 to 0.35: no softplus, so some steps are negative
        inputs["delta"] -= 0.3
    assert_matches_reference(cpu_scan, inputs, delta_softplus=False)


def test_cpu_backend_is_deterministic_across_runs_and_threads():
    inputs = {k: v.detach().float().requires_grad_()
              for k, v in make_inputs(45, groups=2, dim=48, state=16).items()}
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            y, grads = output_and_grads(cpu_scan, inputs, True)
            results.append([y, *grads.values()])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_cpu_backend_keeps_dtypes_and_takes_strided_inputs():
    inputs = {k: v.detach() for k, v in make_inputs(40, groups=2, dim=8, state=4).items()}
    exact = scan_by_token(**inputs, delta_softplus=True)
    half = {k: v.bfloat16() for k, v in inputs.items()}
    y = cpu_scan(**half, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), exact, rtol=2e-2, atol=2e-2)
    # inputs that are views with other strides: u (batch, Di, L) sliced out of a longer sequence
    wide = {k: torch.cat([v, v], dim=-1)[..., ::2] if v.dim() >= 3 else v
            for k, v in inputs.items()}
    assert not wide["u"].is_contiguous()
    torch.testing.assert_close(cpu_scan(**wide, delta_softplus=True),
                               scan_by_token(**wide, delta_softplus=True), rtol=1e-9, atol=1e-9)


def test_auto_takes_the_cpu_scan_and_the_models_agree_with_the_torch_backend(monkeypatch):
    assert resolve_backend("cpu", "auto") == ("cpu", "auto: tensors on cpu, and the C++ CPU "
                                                     "scan builds")
    assert resolve_backend("cpu", "cpu")[0] == "cpu"
    with pytest.raises(RuntimeError, match="runs on CPU tensors"):
        resolve_backend("cuda", "cpu")
    assert cli.use_scan_backend("cpu", torch.device("cpu")).startswith(
        "Selective scan backend: cpu (")
    calls = []
    monkeypatch.setattr(dispatch, "selective_scan_cpu",
                        lambda *args: calls.append(1) or cpu.selective_scan_cpu(*args))
    torch.manual_seed(0)
    ssm, x = SelectiveSSM(16, 8), torch.randn(2, 16, 23)
    results = []
    try:
        for backend in ("auto", "torch"):  # the models name no backend: the process-wide one
            set_backend(backend)
            y = ssm(x)
            results.append([y, *torch.autograd.grad(y.square().sum(), list(ssm.parameters()))])
    finally:
        set_backend("auto")
    assert len(calls) == 1  # auto's scan
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def failing_build(monkeypatch, tmp_path):
    """As on a machine without a C++ compiler: a fresh extensions folder (no cached build), a
    compiler that does not exist, and a loader with nothing cached. The build gets a name of its
    own, so that torch's record of the real one (its version) stays as it was."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    name, flags = cpu.build_flags()
    monkeypatch.setattr(cpu, "build_flags", lambda: (f"{name}_unbuildable", flags))
    fresh_loader = functools.cache(cpu.load_cpu_kernel.__wrapped__)
    for module in (cpu, dispatch):
        monkeypatch.setattr(module, "load_cpu_kernel", fresh_loader)
    dispatch.warn_cpu_fallback.cache_clear()
    yield
    dispatch.warn_cpu_fallback.cache_clear()
    set_backend("auto")


@pytest.mark.usefixtures("failing_build")
def test_failed_build_falls_back_to_the_torch_scan_and_says_why_once():
    inputs = make_inputs(21, groups=2)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU scan did not build .*no-such-compiler") \
            as seen:
        y = selective_scan(**inputs, delta_softplus=True)  # auto
        selective_scan(**inputs, delta_softplus=True)
    assert len(seen) == 1
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        line = cli.use_scan_backend("auto", torch.device("cpu"))
    assert not again  # said once per process
    assert line.startswith("Selective scan backend: torch (auto: tensors on cpu, and the C++ CPU "
                           "scan did not build (RuntimeError: Error building extension")
    assert "no-such-compiler" in line
    torch.testing.assert_close(y, scan_by_token(**inputs, delta_softplus=True))
    with pytest.raises(RuntimeError, match="did not build .*C\\+\\+ compiler .*ninja"):
        selective_scan(**inputs, backend="cpu")
    with pytest.raises(SystemExit, match="--scan-backend cpu: .*did not build"):
        cli.use_scan_backend("cpu", torch.device("cpu"))


@pytest.mark.slow
def test_concurrent_first_use_builds_once_for_both(tmp_path):
    """Two processes meeting an empty extensions folder at once (two pytest workers, two DDP
    ranks): both get the kernel, from the same build."""
    script = textwrap.dedent("""
        import torch
        from selective_scan import resolve_backend, selective_scan
        from selective_scan.check import scan_inputs
        from selective_scan.cpu import load_cpu_kernel
        print(resolve_backend("cpu")[0], load_cpu_kernel()[0]._name)
        x = {k: v.detach() for k, v in scan_inputs(2, 16, 40, 16, torch.float32, "cpu").items()}
        print(selective_scan(**x, delta_softplus=True).sum().item())
    """)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert out.startswith(f"cpu {tmp_path}")
    assert outputs[0][0] == outputs[1][0]
