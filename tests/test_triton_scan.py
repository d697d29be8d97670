"""The Triton scan (backend "triton") without a GPU: its kernels, run by Triton's interpreter in a
process of their own (tests/triton_interpreted.py), against the float64 reference and through the
dispatcher's fallbacks; the same kernels compiled for an H100 by the Triton installed here; and
the backend choice on CUDA and its messages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from selective_scan import dispatch, resolve_backend, selective_scan
from tests.test_selective_scan import make_inputs

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # only inspected, never allocated on


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    dispatch.set_backend("auto")  # cli.use_scan_backend sets it process-wide


@pytest.fixture
def no_mamba(monkeypatch):
    """As on a GPU machine where mamba_ssm's kernel does not load."""
    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (None, "ModuleNotFoundError: "
                                                                      "No module named 'x'"))
    dispatch.warn_slow_path.cache_clear()
    yield
    dispatch.warn_slow_path.cache_clear()


def test_kernels_under_the_interpreter():
    """TRITON_INTERPRET=1 must be set before Triton is imported, hence a process of its own."""
    if dispatch.load_triton_scan()[0] is None:
        pytest.skip(f"Triton does not import here: {dispatch.load_triton_scan()[1]}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider",
         "tests/triton_interpreted.py"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    if skipped and " passed" not in result.stdout:  # the interpreter's limit: the module skips
        pytest.skip(skipped[0])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_kernels_compile_for_an_h100():
    """What the interpreter cannot show: that the kernels compile, through Triton's GPU compiler
    (no GPU needed), to sm_90 machine code, bfloat16 activations, every option on."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from selective_scan import triton_scan

    flags = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "BLOCK_N": 16}
    for kernel, pointers, extra in [
        (triton_scan._scan_fwd_kernel, 10, {"SAVE_STATES": True, "CHUNK": 256, "BLOCK_D": 4}),
        (triton_scan._scan_bwd_kernel, 18, {"CHUNK": 256, "BLOCK_D": 2}),
    ]:
        constants = {**flags, **extra}
        names = kernel.arg_names
        signature = {name: "constexpr" if name in constants else "*bf16" if i < pointers else "i32"
                     for i, name in enumerate(names)}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=triton_scan.COMPILE_OPTIONS)
        assert compiled.asm["cubin"]


def test_backend_choice_and_its_reasons(no_mamba, monkeypatch):
    """On CUDA, "auto" takes mamba_ssm's kernel when it loads, else the Triton scan when Triton
    imports, else the PyTorch scan with one warning; "triton" runs or refuses to start."""
    assert "triton" in dispatch.BACKENDS
    if dispatch.load_triton_scan()[0] is not None:
        used, why = resolve_backend(CUDA, "auto")
        assert used == "triton" and "mamba_ssm's kernel did not load" in why and "Triton" in why
        line = cli.use_scan_backend("triton", CUDA)
        assert line.startswith("Selective scan backend: triton (the Triton scan was asked for")
    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (print, ""))  # a kernel "loads"
    assert resolve_backend(CUDA, "auto")[0] == "mamba_ssm"
    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (None, "no kernel"))
    monkeypatch.setattr(dispatch, "load_triton_scan", lambda: (None, "ImportError: no triton"))
    used, why = resolve_backend(CUDA, "auto")
    assert used == "torch" and "no kernel" in why and "no triton" in why
    with pytest.warns(RuntimeWarning, match="no kernel.*no triton") as seen:
        cli.use_scan_backend("auto", CUDA)
        cli.use_scan_backend("auto", CUDA)
    assert len(seen) == 1
    with pytest.raises(SystemExit, match="--scan-backend triton: .*did not import.*no triton"):
        cli.use_scan_backend("triton", CUDA)


def test_triton_refuses_cpu_tensors_outside_the_interpreter():
    module = dispatch.load_triton_scan()[0]
    if module is None or module.INTERPRETED:
        pytest.skip("needs Triton, compiling (not interpreting)")
    with pytest.raises(SystemExit, match="--scan-backend triton: .*runs on CUDA tensors"):
        cli.use_scan_backend("triton", torch.device("cpu"))
    inputs = {k: v.detach().float() for k, v in make_inputs(3).items()}
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        selective_scan(**inputs, backend="triton")


def test_kernel_report_has_a_triton_row(monkeypatch):
    from selective_scan.check import kernel_report

    for loader in ("load_cpu_kernel", "load_conv_kernel"):  # not built here: not this test's
        monkeypatch.setattr(f"selective_scan.check.{loader}", lambda: (None, "not tried"))
    if dispatch.load_triton_scan()[0] is not None:
        assert "loads  triton (Triton scan" in kernel_report()
    monkeypatch.setattr("selective_scan.check.load_triton_scan",
                        lambda: (None, "ImportError: no triton"))
    assert "MISSING triton (Triton scan, compiled on a GPU's first use): ImportError: no triton" \
        in kernel_report()
