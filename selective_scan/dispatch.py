"""`selective_scan`: one entry point, two backends.

"mamba_ssm" is the fused CUDA kernel of the Mamba authors (`selective_scan_fn`); "torch" is the
chunked pure-PyTorch scan of this package, which runs anywhere. "auto" takes the kernel when it
loads and the tensors are on a GPU, and falls back to "torch" otherwise, silently: a CPU-only
install must never fail because the optional kernels are missing.
"""

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .chunked import selective_scan_chunked

BACKENDS = ("auto", "torch", "mamba_ssm")
INSTALL_HINT = "pip install --no-build-isolation -r requirements-cuda.txt"  # needs a GPU and CUDA
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the CUDA kernel accepts


@functools.cache
def load_mamba_kernel() -> tuple[Callable | None, str]:
    """mamba_ssm's selective_scan_fn, or (None, why it failed). Imported on first use only."""
    try:
        # The compiled extension first: some mamba_ssm versions import it lazily, which would
        # otherwise surface as "No module named 'selective_scan_cuda'" at the first call.
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, OSError (CUDA libraries), ABI mismatch with torch, ...
        return None, f"{type(err).__name__}: {err}"
    return selective_scan_fn, ""


def mamba_ssm_available() -> bool:
    """True when mamba_ssm's compiled selective scan kernel imports."""
    return load_mamba_kernel()[0] is not None


def check_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """ValueError unless the arguments have selective_scan_fn's shapes (see reference.py)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, Di, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (Di={dim}, N), got {A.dtype} {tuple(A.shape)}")
    state = A.shape[1]
    groups = [t.shape[1] if t.dim() == 4 else 1 for t in (B, C)]
    for name, t, g in zip(("B", "C"), (B, C), groups, strict=True):
        fits = t.dim() in (3, 4) and t.shape[0] == batch and t.shape[-2:] == (state, length)
        if not fits or dim % g:
            raise ValueError(
                f"{name} must be (batch={batch}, N={state}, L={length}) or (batch, G, N, L) with G "
                f"dividing Di={dim}, got {tuple(t.shape)}"
            )
    if groups[0] != groups[1]:
        raise ValueError(f"B and C must have the same number of groups, got {groups}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (Di={dim},), got {tuple(t.shape)}")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Mamba's selective scan (Gu & Dao 2023, eq. 2a/2b, output gated by silu(z)) with the
    arguments of mamba_ssm's `selective_scan_fn`. Returns (batch, Di, L) in u's dtype.

    backend: "torch" (chunked PyTorch, any device), "mamba_ssm" (CUDA kernel; RuntimeError where
    it cannot run), or "auto" (the kernel for CUDA tensors when it loads, else "torch").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_shapes(u, delta, A, B, C, D, z, delta_bias)
    kernel_fits = u.is_cuda and u.dtype in KERNEL_DTYPES
    if backend == "torch" or (backend == "auto" and not (kernel_fits and mamba_ssm_available())):
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    kernel, why_not = load_mamba_kernel()
    if kernel is None:
        raise RuntimeError(
            f"backend='mamba_ssm' needs mamba_ssm's compiled kernel, which did not load "
            f"({why_not}). On a machine with an NVIDIA GPU and CUDA, install it with "
            f"`{INSTALL_HINT}`; elsewhere use backend='torch'."
        )
    if not kernel_fits:
        raise RuntimeError(
            f"backend='mamba_ssm' runs on CUDA tensors of dtype float32/float16/bfloat16, got "
            f"{u.dtype} on {u.device}; move the tensors to a GPU or use backend='torch'."
        )
    # The kernel takes activations in u's dtype and the weights A, D, delta_bias in float32.
    return kernel(
        u,
        delta.to(u.dtype),
        A.float(),
        B.to(u.dtype),
        C.to(u.dtype),
        None if D is None else D.float(),
        None if z is None else z.to(u.dtype),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
    )
