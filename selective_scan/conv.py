"""Mamba's causal depthwise conv1d: one entry point, the fused kernel of the `causal-conv1d`
package on CUDA when it loads, and the same convolution in PyTorch everywhere else.

The output at position t sees inputs t - W + 1 ... t only (left padding by W - 1, nothing on the
right), which is what nn.Conv1d(padding=W - 1) followed by cropping to the first L outputs gives.
The scan's process-wide backend also governs this one: "torch" uses PyTorch on every device.
"""

import functools
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from .dispatch import KERNEL_DTYPES, get_backend

ACTIVATIONS = (None, "silu")


@functools.cache
def load_conv_kernel() -> tuple[Callable | None, str]:
    """causal_conv1d's causal_conv1d_fn, or (None, why it failed). Imported on first use only."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as err:  # ImportError, OSError (CUDA libraries), ABI mismatch with torch, ...
        return None, f"{type(err).__name__}: {err}"
    return causal_conv1d_fn, ""


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  activation: str | None = None) -> Tensor:
    """Causal depthwise convolution of x (batch, D, L) with weight (D, 1, W) as nn.Conv1d stores
    it (or (D, W)) and bias (D,), then `activation` (None or "silu"). Returns (batch, D, L)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    weight = weight.reshape(weight.shape[0], -1)  # (D, W)
    if x.dim() != 3 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"x must be (batch, D={weight.shape[0]}, L), got {tuple(x.shape)}")
    kernel = load_conv_kernel()[0]
    if kernel is not None and x.is_cuda and x.dtype in KERNEL_DTYPES and get_backend() != "torch":
        # The kernel does not autocast: weights in the activations' dtype, as nn.Conv1d would be.
        bias = None if bias is None else bias.to(x.dtype)
        return kernel(x, weight.to(x.dtype), bias, activation=activation)
    width = weight.shape[1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=weight.shape[0])
    y = y[..., : x.shape[-1]]  # drop the outputs that would see the right padding
    return F.silu(y) if activation == "silu" else y
