"""Small tensor helpers shared by the rectified-flow and Gaussian-diffusion objectives."""

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: a per-sample loss of shape (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a (B,) tensor as (B, 1, ..., 1) with `ndim` dimensions so it broadcasts over a batch."""
    return v.view(-1, *([1] * (ndim - 1)))
