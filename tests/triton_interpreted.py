"""The Triton scan (backend "triton") run by Triton's interpreter on CPU tensors: the output and
the gradient of every input against the float64 token-by-token reference, in float32 and at
mamba_ssm's own bfloat16 tolerances; what it keeps for the backward; and "auto" on a GPU without
mamba_ssm's kernel: it takes the Triton scan, and falls back to the PyTorch scan, with one warning
naming the error, where the scan fails to compile or disagrees at its first use.

TRITON_INTERPRET=1 must be set before Triton is imported (its own library functions are decorated
then), so test_triton_scan.py runs this file in a process of its own:
    TRITON_INTERPRET=1 python -m pytest -n 0 tests/triton_interpreted.py
The interpreter is slow: the shapes are tiny."""

import os
import warnings
from functools import partial

import pytest
import torch

from selective_scan import dispatch, selective_scan, selective_scan_ref
from selective_scan.chunked import selective_scan_chunked
from tests.test_selective_scan import OPTIONS, make_inputs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 only (test_triton_scan.py starts it so)",
                allow_module_level=True)
TINY_CHECK = {"batch": 2, "dim": 4, "length": 12, "state": 3}  # the first-use check, shrunk


def interpreter_problem() -> str:
    """"" when Triton's interpreter runs a loop over a runtime bound, as the kernels do, cleanly;
    else why not. Triton 3.6's interpreter turns the bound into an int with int() of a
    one-element array, which NumPy deprecated in 1.25 (a warning) and refuses since 2.4; Triton
    3.9's does not. That is the interpreter's limit, not the kernels': their compile for sm_90
    (test_triton_scan.py) still runs with that Triton."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            count[(1,)](out, 3)
    except Exception as err:
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime "
                f"bound with NumPy {np.__version__} ({type(err).__name__}: {err})")
    return "" if out.item() == 3 else f"the interpreter counted {out.item()} steps of 3"


if problem := interpreter_problem():
    pytest.skip(problem, allow_module_level=True)


@pytest.fixture(scope="module")
def interpreted():
    """The Triton scan's module, its kernels interpreted."""
    module = dispatch.load_triton_scan()[0]
    assert module.INTERPRETED
    return module


@pytest.fixture
def no_mamba(monkeypatch):
    """As on a GPU machine where mamba_ssm's kernel does not load; the first-use checks and their
    warnings start afresh, on a small problem."""
    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (None, "ModuleNotFoundError: "
                                                                      "No module named 'x'"))
    monkeypatch.setattr(dispatch, "TRITON_CHECK_SHAPE", TINY_CHECK)
    for cached in (dispatch.triton_check, dispatch.warn_triton_failed, dispatch.warn_slow_path):
        cached.cache_clear()
    yield
    for cached in (dispatch.triton_check, dispatch.warn_triton_failed, dispatch.warn_slow_path):
        cached.cache_clear()


def outputs(scan, inputs: dict, softplus: bool, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output and the gradient of every input of a random linear loss."""
    y = scan(**inputs, delta_softplus=softplus)
    grads = torch.autograd.grad((y * weight.to(y.dtype)).sum(), list(inputs.values()))
    return {"out": y, **dict(zip(inputs, grads, strict=True))}


def compare(interpreted, inputs: dict, softplus: bool, dtype: torch.dtype, chunk: int | None,
            rtol: float, atol: float) -> None:
    """The Triton scan on `inputs` rounded to `dtype` (A, D, delta_bias stay float32, as in a
    Mamba layer) against the float64 reference on the same rounded values."""
    rounded = {k: v.detach().to(torch.float32 if k in ("A", "D", "delta_bias") else dtype)
               for k, v in inputs.items()}
    weight = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    expected = outputs(selective_scan_ref, {k: v.double().requires_grad_()
                                            for k, v in rounded.items()}, softplus, weight)
    got = outputs(partial(interpreted.selective_scan_triton, chunk=chunk),
                  {k: v.requires_grad_() for k, v in rounded.items()}, softplus, weight)
    for name, value in got.items():
        assert value.dtype == (rounded[name].dtype if name in rounded else dtype), name
        torch.testing.assert_close(value.double(), expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(
    "length, groups, option, chunk, dim",
    [(13, None, "all", 4, 4), (20, 2, "all", 8, 4), (16, None, "plain", 4, 4),
     (7, 1, "D", None, 5), (1, None, "z+softplus", None, 4), (9, 2, "z+softplus", 4, 6)],
    ids=["13-by-4", "G2-20-by-8", "16-by-4-plain", "Di5-one-partial-chunk", "L1", "G2-Di6-9-by-4"])
def test_float32_matches_reference(interpreted, length, groups, option, chunk, dim):
    """Odd lengths and lengths crossing chunk borders, L = 1, a partial block of channels (Di 5, 3
    per group), N = 3 (not a power of two), B/C plain and grouped, with and without D, z,
    delta_bias and softplus."""
    names, softplus = OPTIONS[option]
    inputs = make_inputs(length, groups, names, dim=dim)
    compare(interpreted, inputs, softplus, torch.float32, chunk, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_at_mambas_tolerances(interpreted, dtype):
    """Half-precision activations, float32 state and sums: mamba_ssm's test_selective_scan
    tolerances for bfloat16 (rtol 3e-2, atol 5e-2), for the output and every gradient."""
    names, softplus = OPTIONS["all"]
    compare(interpreted, make_inputs(19, 2, names), softplus, dtype, 8, rtol=3e-2, atol=5e-2)


def test_backward_keeps_states_at_chunk_starts_only(interpreted):
    """What the forward saves for the backward: its inputs and (batch, Di, chunks, N) states,
    nothing of size (batch, Di, L, N)."""
    inputs = {k: v.float() for k, v in make_inputs(32, 2, ("D", "z", "delta_bias")).items()}
    y = interpreted.selective_scan_triton(**inputs, chunk=8)
    *saved, states = y.grad_fn.saved_tensors
    assert [t.numel() for t in saved if t is not None] == [t.numel() for t in inputs.values()]
    assert states.shape == (2, 4, 32 // 8, 3)  # the states at the 4 chunk starts
    with pytest.raises(ValueError, match="N <= 256"):
        interpreted.selective_scan_triton(**make_inputs(3, state=257))


def test_dispatch_runs_the_triton_scan(interpreted, no_mamba):
    """backend="triton" checks the kernels once, then runs them; "auto" on a GPU without
    mamba_ssm's kernel takes them (a CPU device stands in for the GPU: the interpreter runs it)."""
    names, softplus = OPTIONS["all"]
    inputs = {k: v.detach().float() for k, v in make_inputs(11, 2, names).items()}
    direct = interpreted.selective_scan_triton(**inputs, delta_softplus=softplus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert torch.equal(selective_scan(**inputs, delta_softplus=softplus, backend="triton"),
                           direct)
        assert dispatch._gpu_backend("cpu", torch.float32) == "triton"
    assert dispatch.triton_check.cache_info().misses == 1  # checked once per (device, dtype)
    assert dispatch._gpu_backend("cpu", torch.float64) == "torch"  # float64: the PyTorch scan


def fallback_run(monkeypatch, inputs: dict) -> tuple[torch.Tensor, list]:
    """selective_scan with "auto" deciding as on a GPU (on these CPU tensors), warnings caught."""
    monkeypatch.setattr(dispatch, "_auto_backend",
                        lambda u: dispatch._gpu_backend(str(u.device), u.dtype))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = [selective_scan(**inputs, delta_softplus=True) for _ in range(2)]
    assert torch.equal(out[0], out[1])
    return out[0], [w for w in seen if issubclass(w.category, RuntimeWarning)]


def test_compile_error_falls_back_to_the_pytorch_scan(interpreted, no_mamba, monkeypatch):
    """A kernel that fails to compile: "auto" runs the PyTorch scan, with one warning that names
    the error; an explicit backend="triton" refuses, naming it too."""
    class FailingKernel:
        def __getitem__(self, grid):
            raise RuntimeError("PTX assembly aborted: ptxas fatal: unsupported GPU")

    monkeypatch.setattr(interpreted, "_scan_fwd_kernel", FailingKernel())
    inputs = {k: v.detach().float() for k, v in make_inputs(10, 2).items()}
    out, seen = fallback_run(monkeypatch, inputs)
    assert len(seen) == 1 and "ptxas fatal: unsupported GPU" in str(seen[0].message)
    assert "PyTorch scan runs instead" in str(seen[0].message)
    assert torch.equal(out, selective_scan_chunked(**inputs, delta_softplus=True))
    with pytest.raises(RuntimeError, match="first-use check.*ptxas fatal"):
        selective_scan(**inputs, backend="triton")


def test_mismatch_falls_back_to_the_pytorch_scan(interpreted, no_mamba, monkeypatch):
    """A Triton scan that computes the wrong thing (1% too much, beyond float32's tolerance of
    1e-3): one warning naming the disagreement, and the PyTorch scan's result."""
    right = interpreted.selective_scan_triton
    monkeypatch.setattr(interpreted, "selective_scan_triton",
                        lambda *args, **kw: 1.01 * right(*args, **kw))
    inputs = {k: v.detach().float() for k, v in make_inputs(10, 2).items()}
    out, seen = fallback_run(monkeypatch, inputs)
    assert len(seen) == 1 and "disagrees with the PyTorch scan" in str(seen[0].message)
    assert torch.equal(out, selective_scan_chunked(**inputs, delta_softplus=True))
