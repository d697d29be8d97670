"""Time conventions checked against the authors' statements (docs/upstream.md#time-convention),
not against our own code: their network takes t on a 1..1000 scale and ours t / 1000; their Euler
sampler queries t = 1 + 999 i / N of that scale, and sample.py must do the same on their
checkpoints."""

import math

import numpy as np
import pytest
import torch

import sample
from loader import OURS, USM_AUTHORS
from models import TimestepEmbedder


def dit_sinusoid(t: float, dim: int = 256) -> np.ndarray:
    """DiT's timestep features of a step t of 0..1000 (cos half, then sin half), in float64."""
    freqs = np.exp(-math.log(10000) * np.arange(dim // 2) / (dim // 2))
    return np.concatenate([np.cos(t * freqs), np.sin(t * freqs)])


def test_our_time_is_the_authors_time_over_1000():
    torch.manual_seed(0)
    embedder = TimestepEmbedder(32)
    authors_t = 1 + 999 * torch.sigmoid(torch.randn(5)).double()  # their training draw
    features = torch.from_numpy(np.stack([dit_sinusoid(t) for t in authors_t.tolist()]))
    expected = embedder.mlp(features.float())
    torch.testing.assert_close(embedder(authors_t.float() / 1000), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source, grid", [
    (USM_AUTHORS, [(1 + 999 * i / 25) / 1000 for i in range(25)]),  # their sample loop
    (OURS, [i / 25 for i in range(25)]),
])
def test_sample_py_queries_each_checkpoint_on_its_time_grid(source, grid):
    args = sample.parse_args(["--ckpt", "unused"])
    sampler, name = sample.create_sampler(args, "rf", source)
    seen = []

    def velocity_one(x, t):
        seen.append(t[0].item())
        return torch.ones_like(x)

    out = sampler.sample(velocity_one, torch.zeros(2, 1, 2, 2))
    assert seen == pytest.approx(grid, abs=1e-6)
    torch.testing.assert_close(out, torch.ones_like(out))  # 25 steps of 1/25 at velocity 1
    assert name == ("euler25-authors-time" if source == USM_AUTHORS else "euler25")
