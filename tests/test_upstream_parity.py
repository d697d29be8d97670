"""Checkpoints written by the upstream code load with our loader and compute what it computed.

tests/upstream/fixtures/ holds tiny checkpoints that the USM authors' code (argparse args) and
CompVis' Zigma code (Hydra / OmegaConf args, written by omegaconf 2.1, 2.2, 2.3 and 2.4) built with
their own classes and saved as their training scripts save them, plus the outputs their own forward
computed on fixed inputs (tests/upstream/make_fixtures.py, run in a side environment with the
upstream code at pinned commits: tests/upstream/README.md). Nothing upstream is imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loader
from loader import load_checkpoint, load_model

FIXTURES = Path(__file__).parent / "upstream" / "fixtures"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
COMPVIS = sorted(name for name, entry in MANIFEST.items() if entry["source"] == "zigma-compvis")
# Largest |ours - theirs| allowed (float32, CPU) on outputs whose largest entries are 0.4 to 1.5.
# Measured (`python -m tests.test_upstream_parity`): at most 3.6e-7 without text, 3.0e-6 with
# Zigma's text cross-attention, where our float32 forward is 3.1e-6 from the same model in float64
# and theirs 7e-7: float32 rounding, no difference in the function.
TOLERANCE = 5e-6


def expected_of(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"{name}.expected.pt", map_location="cpu", weights_only=True)


def ours_on_their_inputs(model: torch.nn.Module, name: str) -> torch.Tensor:
    """Our forward on the fixture's inputs. The USM authors' model takes t on 1..1000, ours (and
    CompVis') t in [0, 1], scaled by 1000 inside."""
    expected = expected_of(name)
    t = expected["t"] / 1000 if MANIFEST[name]["time"] == "1..1000" else expected["t"]
    cond = {k: expected[k] for k in ("y", "context") if k in expected}
    with torch.no_grad():
        return model(expected["x"], t, **cond)


def difference(name: str, weights: str) -> float:
    """Largest |ours - theirs| of a fixture's checkpoint loaded with load_model."""
    model = load_model(FIXTURES / f"{name}.pt", weights=weights)
    theirs = expected_of(name)[f"{weights}_out"]
    ours = ours_on_their_inputs(model, name)
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 0.4  # outputs of size ~1: the tolerance means something
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("weights", ["ema", "model"])
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_upstream_checkpoint_computes_the_upstream_outputs(name: str, weights: str) -> None:
    assert difference(name, weights) <= TOLERANCE


@pytest.mark.parametrize("name", COMPVIS)
def test_compvis_args_read_as_omegaconf_reads_them(name: str) -> None:
    # MANIFEST holds OmegaConf.to_container(args) as the writing omegaconf version computed it.
    args = loader.torch_load(FIXTURES / f"{name}.pt")["args"]
    assert loader._plain(args) == MANIFEST[name]["args_plain"]
    meta, _ = load_checkpoint(FIXTURES / f"{name}.pt")
    assert meta["source"] == "zigma-compvis" and meta["step"] == 10_000


if __name__ == "__main__":  # python -m tests.test_upstream_parity: the measured differences
    for fixture in sorted(MANIFEST):
        for kind in ("ema", "model"):
            print(f"{fixture:40s} {kind:5s} {difference(fixture, kind):.1e}")
