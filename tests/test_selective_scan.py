"""Selective scan: every backend that runs here against a token-by-token float64 reference written
in this file (independently of the package's own `selective_scan_ref`), for the output and the
gradient of every input."""

import sys
from functools import partial

import pytest
import torch

from selective_scan import dispatch, selective_scan, selective_scan_chunked, selective_scan_ref

INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_by_token(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba (Gu & Dao 2023) eq. 2a/2b one token at a time:
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = (C_t h_t + D u_t) * silu(z_t)."""
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = delta.clamp(min=0) + torch.log1p(torch.exp(-delta.abs()))  # softplus, stably
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    group_of_channel = torch.arange(dim) // (dim // B.shape[1])
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        B_t, C_t = B[:, group_of_channel, :, t], C[:, group_of_channel, :, t]  # (batch, dim, N)
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B_t
        y = (C_t * h).sum(-1)
        if D is not None:
            y = y + D * u[:, :, t]
        if z is not None:
            y = y * z[:, :, t] * torch.sigmoid(z[:, :, t])
        ys.append(y)
    return torch.stack(ys, dim=-1)


def make_inputs(length, groups=None, options=("D", "z", "delta_bias"), dim=4, state=3, seed=0):
    """float64 leaf tensors. groups=None gives B, C as (batch, N, L), else (batch, G, N, L).
    Decays exp(delta A) of 0.5-0.99 per token, so the state carries far across chunk borders."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (2, state, length) if groups is None else (2, groups, state, length)
    x = {
        "u": randn(2, dim, length),
        "delta": 0.05 + 0.5 * rand(2, dim, length),
        "A": -0.05 - 1.5 * rand(dim, state),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim),
        "z": randn(2, dim, length),
        "delta_bias": 0.1 * randn(dim),
    }
    return {k: v.requires_grad_() for k, v in x.items() if k in options or k not in INPUTS[5:]}


def output_and_grads(fn, inputs, delta_softplus):
    y = fn(**inputs, delta_softplus=delta_softplus)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad((y * weight).sum(), list(inputs.values()))
    return y, dict(zip(inputs, grads, strict=True))


def assert_matches_reference(fn, inputs, delta_softplus):
    y, grads = output_and_grads(fn, inputs, delta_softplus)
    y_ref, grads_ref = output_and_grads(scan_by_token, inputs, delta_softplus)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for name in inputs:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-9, msg=name)


OPTIONS = {
    "plain": ((), False),
    "D": (("D",), False),
    "z+softplus": (("z",), True),
    "all": (("D", "z", "delta_bias"), True),
}


@pytest.mark.parametrize("groups", [None, 1, 2], ids=["BC3d", "G1", "G2"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_torch_backend_matches_reference(option, groups):
    names, softplus = OPTIONS[option]
    inputs = make_inputs(37, groups, names)  # default chunks: 7 tokens, the last one padded
    assert_matches_reference(partial(selective_scan, backend="torch"), inputs, softplus)


@pytest.mark.parametrize(
    "length, chunk_size",
    [(1, None), (2, None), (13, 4), (16, 16), (64, None), (100, 16), (70, 128)],
    ids=["L1", "L2", "13-by-4", "one-full-chunk", "64-default", "100-by-16", "chunk>L"],
)
def test_chunking_matches_reference(length, chunk_size):
    inputs = make_inputs(length, groups=2)
    assert_matches_reference(partial(selective_scan_chunked, chunk_size=chunk_size), inputs, True)


def test_package_reference_matches_test_reference():
    assert_matches_reference(selective_scan_ref, make_inputs(9, groups=2), delta_softplus=True)


@pytest.mark.parametrize("case", ["A=-1e4", "large delta"])
def test_extreme_decay_is_finite_and_exact(case):
    inputs = make_inputs(50, groups=2)
    with torch.no_grad():
        if case == "A=-1e4":  # delta*A of -1e4 to -7e3 on half the channels
            inputs["A"][:2] = -1e4
        else:  # softplus(1e3 + ...) = 1e3: a decay of exp(-50) to exp(-1e3) per token
            inputs["delta"][:, 1:3] += 1e3
    scan = partial(selective_scan_chunked, chunk_size=8)
    for dtype in (torch.float32, torch.float64):
        cast = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
        y, grads = output_and_grads(scan, cast, delta_softplus=True)
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
    assert_matches_reference(scan, inputs, delta_softplus=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_input_keeps_its_dtype(dtype, tol):
    inputs = {k: v.detach().to(dtype) for k, v in make_inputs(40, groups=2).items()}
    y = selective_scan(**inputs, delta_softplus=True, backend="torch")
    exact = scan_by_token(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol)


@pytest.fixture
def fresh_kernel_cache():
    dispatch.load_mamba_kernel.cache_clear()
    yield
    dispatch.load_mamba_kernel.cache_clear()


def test_missing_kernel_explicit_request_says_what_to_install(monkeypatch, fresh_kernel_cache):
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # any import of it now fails
    inputs = make_inputs(5)
    assert not dispatch.mamba_ssm_available()
    with pytest.raises(RuntimeError, match="scripts/setup_cuda.sh"):
        selective_scan(**inputs, backend="mamba_ssm")
    torch.testing.assert_close(selective_scan(**inputs), scan_by_token(**inputs))  # auto


def test_kernel_is_never_used_for_cpu_tensors(monkeypatch):
    def kernel(*args):
        raise AssertionError("the CUDA kernel must not be called with CPU tensors")

    monkeypatch.setattr(dispatch, "load_mamba_kernel", lambda: (kernel, ""))
    inputs = make_inputs(5)
    with pytest.raises(RuntimeError, match="CUDA"):
        selective_scan(**inputs, backend="mamba_ssm")
    torch.testing.assert_close(selective_scan(**inputs, backend="auto"), scan_by_token(**inputs))


def test_unknown_backend_and_bad_shapes_raise_value_error():
    inputs = make_inputs(5)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs, backend="jax")
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**inputs, "B": make_inputs(5, groups=3)["B"]})  # 3 does not divide Di=4
    with pytest.raises(ValueError, match="same number of groups"):
        selective_scan(**{**inputs, "B": make_inputs(5, groups=2)["B"]})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**inputs, "A": inputs["A"].T})
