"""Selective scan (S6), the core of Mamba (Gu & Dao 2023, eq. 2a/2b):

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,    y_t = C_t h_t + D x_t,    out = y * silu(z)

with mamba_ssm's `selective_scan_fn` arguments. `selective_scan` dispatches to the fused CUDA
kernel of mamba_ssm when it is installed and the tensors are on a GPU, and to the chunked
pure-PyTorch scan otherwise; `selective_scan_ref` is the token-by-token definition.
"""

from .chunked import selective_scan_chunked
from .dispatch import BACKENDS, mamba_ssm_available, selective_scan
from .reference import selective_scan_ref

__all__ = [
    "BACKENDS",
    "mamba_ssm_available",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]
