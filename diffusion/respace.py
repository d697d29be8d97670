"""Timestep respacing: sample with a subset of a trained diffusion's steps (Nichol & Dhariwal 2021).

Keeping timesteps S = {s_1 < ... < s_K} of a T-step process with cumulative products abar_s gives a
K-step process with the same marginals q(x_{s_k} | x_0) when its betas are
    beta_k = 1 - abar_{s_k} / abar_{s_{k-1}}    (abar_{s_0} = 1).
The model is still called with the original timestep s_k, as it was trained.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Which of the original steps 0..num_timesteps-1 to keep.

    "ddimN" keeps N steps at a constant integer stride starting at 0 (the DDIM paper's spacing).
    Otherwise section_counts ("250", "10,15,20" or a list) splits the steps into equal sections and
    keeps that many evenly spaced steps in each, both ends of a section included.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {count} evenly strided steps of {num_timesteps}")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = set(), 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept.update(start + round(stride * k) for k in range(count))
        start += size
    return kept


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps of a base process given by `betas`."""

    def __init__(self, use_timesteps: set[int], betas: np.ndarray, **kwargs):
        base_alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.original_num_steps = len(betas)
        self.timestep_map = sorted(use_timesteps)
        last, new_betas = 1.0, []
        for s in self.timestep_map:
            new_betas.append(1 - base_alphas_cumprod[s] / last)
            last = base_alphas_cumprod[s]
        super().__init__(np.array(new_betas), **kwargs)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        original = torch.tensor(self.timestep_map, device=t.device)[t]
        return original.float() / self.original_num_steps
