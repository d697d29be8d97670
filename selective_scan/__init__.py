"""Selective scan (S6), the core of Mamba (Gu & Dao 2023, eq. 2a/2b):

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,    y_t = C_t h_t + D x_t,    out = y * silu(z)

with mamba_ssm's `selective_scan_fn` arguments. `selective_scan` dispatches, for tensors on a GPU,
to the fused CUDA kernel of mamba_ssm when it is installed, else to this package's Triton scan;
on the CPU to its C++ scan; and to the chunked pure-PyTorch scan otherwise; `set_backend` makes
the choice for the whole process and `resolve_backend` says which one a device gets and why;
`selective_scan_ref` is the token-by-token definition. `causal_conv1d` is Mamba's causal conv1d,
with the causal-conv1d kernel when it loads. `python -m selective_scan` reports which kernels load
(and checks them on a GPU).
"""

from .chunked import selective_scan_chunked
from .conv import causal_conv1d
from .dispatch import (
    BACKENDS,
    get_backend,
    mamba_ssm_available,
    resolve_backend,
    selective_scan,
    set_backend,
)
from .reference import selective_scan_ref

__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "get_backend",
    "mamba_ssm_available",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "set_backend",
]
