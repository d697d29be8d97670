"""hf:// checkpoint names (hub.py) read offline from a Hugging Face cache that the tests lay out as
huggingface_hub does, by every entry point that takes a checkpoint; never the network."""

import io
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import pytest
import torch
from huggingface_hub import constants

import download
import sample
from hub import local_checkpoint
from loader import load_checkpoint, load_model
from models import All_models
from tests.fixtures import make_hub_cache

REPO = Path(__file__).resolve().parents[1]
COMMIT, OLD_COMMIT = "a" * 40, "b" * 40


def tiny_checkpoint(seed: int) -> bytes:
    """A .pt of ours: a tiny USM's weights (as "ema" and "model") and what builds it."""
    torch.manual_seed(seed)
    kwargs = {"input_size": 8, "in_channels": 3, "stages": (1,), "num_classes": 0}
    model = All_models["USM-T/1"](**kwargs)
    for p in model.parameters():  # zero-initialised layers too: every tensor differs by seed
        torch.nn.init.normal_(p)
    buffer = io.BytesIO()
    torch.save({"ema": model.state_dict(), "model": model.state_dict(), "model_kwargs": kwargs,
                "args": {"model": "USM-T/1"}}, buffer)
    return buffer.getvalue()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding owner/usm at two commits (main and tag v1), offline; (cache, files)."""
    cache = tmp_path / "hub"
    new, old = tiny_checkpoint(0), tiny_checkpoint(1)
    make_hub_cache(cache, "owner/usm", {"ckpt/usm.pt": new}, COMMIT)
    make_hub_cache(cache, "owner/usm", {"ckpt/usm.pt": old}, OLD_COMMIT, refs=("v1",))
    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when imported: set what it read
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, {"new": new, "old": old}


def test_names_that_are_not_hub_files():
    for bad in ("hf://datasets/owner/usm", "hf://owner", "hf://buckets/owner/b/x.pt",
                "hf://o/r@/x.pt"):
        with pytest.raises(ValueError, match=bad):
            local_checkpoint(bad)
    assert local_checkpoint("results/x.pt") == Path("results/x.pt")  # local names pass through


def test_hub_names_read_offline_from_the_cache(hub_cache):
    cache, content = hub_cache
    snapshot = cache / "models--owner--usm" / "snapshots"
    for name, commit, key in [("hf://owner/usm/ckpt/usm.pt", COMMIT, "new"),
                              ("hf://owner/usm@main/ckpt/usm.pt", COMMIT, "new"),
                              ("hf://owner/usm@v1/ckpt/usm.pt", OLD_COMMIT, "old"),
                              ("hf://models/owner/usm@v1/ckpt/usm.pt", OLD_COMMIT, "old"),
                              (f"hf://owner/usm@{OLD_COMMIT}/ckpt/usm.pt", OLD_COMMIT, "old")]:
        path = local_checkpoint(name)
        assert path == snapshot / commit / "ckpt" / "usm.pt" and path.read_bytes() == content[key]

    # every entry point: loader, find_model, sample.py's --ckpt
    expected = torch.load(io.BytesIO(content["old"]), weights_only=True)["ema"]
    name = "hf://owner/usm@v1/ckpt/usm.pt"
    for state in (load_checkpoint(name)[1], download.find_model(name),
                  load_model(name).state_dict()):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert sample.resolve_checkpoint(name) == snapshot / OLD_COMMIT / "ckpt" / "usm.pt"


def test_a_file_missing_offline_names_the_cache_and_how_to_fetch_it(hub_cache):
    cache, _ = hub_cache
    for name in ("hf://owner/usm/ckpt/other.pt", "hf://owner/usm@v2/ckpt/usm.pt",
                 "hf://nobody/nothing/x.pt"):
        with pytest.raises(FileNotFoundError) as info:
            load_model(name)
        message = str(info.value)
        assert name in message and str(cache) in message and "HF_HUB_OFFLINE is set" in message
        assert f"python download.py checkpoint {name}" in message
        with pytest.raises(SystemExit, match=f"--ckpt {name} is not in the Hugging Face cache"):
            sample.resolve_checkpoint(name)
    with pytest.raises(SystemExit, match="does not name a file in a Hub repository"):
        download.main(["checkpoint", "hf://datasets/owner/usm"])


def test_environment_variables_point_a_fresh_process_at_the_cache(tmp_path):
    # HF_HOME/hub is the cache huggingface_hub uses when HF_HUB_CACHE is not set
    make_hub_cache(tmp_path / "home" / "hub", "owner/usm", {"usm.pt": b"weights"}, COMMIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    script = ("from hub import local_checkpoint\n"
              "print(local_checkpoint('hf://owner/usm/usm.pt').read_bytes().decode())\n"
              "local_checkpoint('hf://owner/usm/missing.pt')")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert done.stdout == "weights\n"
    assert done.returncode == 1 and "FileNotFoundError" in done.stderr
    assert str(tmp_path / "home" / "hub") in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr
