"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper any sampler can call.

With a model trained to also predict unconditionally (null label / null text), sampling uses
    out = out_uncond + s (out_cond - out_uncond),
which sharpens the conditional distribution for s > 1 and is the conditional model at s = 1.
Only the eps / velocity channels are guided; learned-variance channels are taken from the
conditional branch, as DiT does.
"""

from collections.abc import Callable

import torch


def _merge_kwargs(cond_kwargs: dict, uncond_kwargs: dict) -> dict:
    """Stack cond and uncond values of each key on the batch dim (cond first)."""
    if cond_kwargs.keys() != uncond_kwargs.keys():
        raise ValueError("cond_kwargs and uncond_kwargs must have the same keys")
    merged = {}
    for key, cond in cond_kwargs.items():
        uncond = uncond_kwargs[key]
        if isinstance(cond, torch.Tensor):
            merged[key] = torch.cat([cond, uncond], dim=0)
        elif cond is uncond or cond == uncond:  # e.g. both None: nothing to stack
            merged[key] = cond
        else:
            raise ValueError(f"non-tensor values for {key!r} differ between cond and uncond")
    return merged


def classifier_free_guidance(
    model: Callable[..., torch.Tensor],
    cfg_scale: float,
    cond_kwargs: dict,
    uncond_kwargs: dict,
    guide_channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return model_fn(x, t) that runs both branches in one doubled batch and mixes them.

    cond_kwargs / uncond_kwargs hold the model's keyword inputs for each branch, e.g.
    {"y": labels} / {"y": null labels}, or {"context": text} / {"context": null text}.
    guide_channels: how many leading output channels to guide (None: all).
    """
    merged = _merge_kwargs(cond_kwargs, uncond_kwargs)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), **merged)
        cond, uncond = out.chunk(2, dim=0)
        c = cond.shape[1] if guide_channels is None else guide_channels
        guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)

    return model_fn
