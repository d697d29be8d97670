"""The loader's other promises, on the upstream-written fixtures of tests/upstream/fixtures/
(test_upstream_parity.py checks that each computes what the upstream code computed): the USM
authors' save_state folders, strictness, refusals with their reasons, pickles that would run code,
conversion to our format and sampling from an authors' checkpoint.
"""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import sample
from loader import CheckpointError, load_checkpoint, load_model, torch_load
from tests.fixtures import save_tiny_vae
from tests.test_upstream_parity import FIXTURES, TOLERANCE, expected_of, ours_on_their_inputs

ROOT = __file__.rsplit("/tests/", 1)[0]
USM = "usm_readme"  # the authors' README flags
ZIGMA = "zigma_pe2_omegaconf2.3.0"  # CompVis' config, written by the omegaconf hydra 1.3 pulls in


def close_to_theirs(model: torch.nn.Module, name: str, weights: str = "ema") -> bool:
    theirs = expected_of(name)[f"{weights}_out"]
    return (ours_on_their_inputs(model, name) - theirs).abs().max() <= TOLERANCE


def authors_pt_with(path, change) -> str:
    """The authors' fixture .pt, its state dicts changed by `change`, saved as they save it."""
    checkpoint = torch_load(FIXTURES / f"{USM}.pt")
    for key in ("model", "ema"):
        change(checkpoint[key])
    torch.save(checkpoint, path)
    return path


def test_authors_accelerate_folder_takes_the_ema_from_model_1(tmp_path) -> None:
    # Their accelerate save_state folders: model.safetensors (model), model_1.safetensors (EMA).
    checkpoint = torch_load(FIXTURES / f"{USM}.pt")
    save_file(checkpoint["model"], tmp_path / "model.safetensors")
    save_file(checkpoint["ema"], tmp_path / "model_1.safetensors")
    assert close_to_theirs(load_model(tmp_path), USM, "ema")
    assert close_to_theirs(load_model(tmp_path, weights="model"), USM, "model")
    meta, _ = load_checkpoint(tmp_path)
    assert meta["source"] == "usm-authors" and meta["args"]["learn_pos_emb"] is True


def test_load_is_strict(tmp_path) -> None:
    extra = authors_pt_with(tmp_path / "extra.pt",
                            lambda s: s.update({"enc_blocks.0.attn.extra": torch.ones(1)}))
    with pytest.raises(CheckpointError, match="enc_blocks.0.attn.extra"):
        load_model(extra)
    missing = authors_pt_with(tmp_path / "missing.pt",
                              lambda s: s.pop("middle_block.attn.skip_scale"))
    with pytest.raises(RuntimeError, match="mid_block.skip_scale"):
        load_model(missing)


def test_unreadable_and_unbuildable_checkpoints_say_why(tmp_path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a pickle")
    with pytest.raises(CheckpointError, match="not a checkpoint this code reads"):
        load_model(tmp_path / "text.pt")

    def pixelshuffle(state: dict) -> None:  # their Conv2d + PixelShuffle up-sampler
        width = state.pop("dec_blocks.0.weight").shape[0]
        state.pop("dec_blocks.0.bias")
        state["dec_blocks.0.0.weight"] = torch.zeros(4 * width, width, 3, 3)
        state["dec_blocks.0.0.bias"] = torch.zeros(4 * width)

    with pytest.raises(CheckpointError, match="PixelShuffle"):
        load_model(authors_pt_with(tmp_path / "pixelshuffle.pt", pixelshuffle))


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["args", "args.model.params"])
def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path, where: str) -> None:
    checkpoint = torch_load(FIXTURES / f"{USM}.pt")
    payload = _RunsCode(str(tmp_path / "ran"))
    checkpoint["args"] = (argparse.Namespace(model={"params": payload}) if where != "args"
                          else payload)
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint this code reads"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_convert_writes_a_checkpoint_of_ours_without_omegaconf(tmp_path) -> None:
    # `python -m loader convert` on CompVis' file, with omegaconf made unimportable: reading its
    # args must not need it (omegaconf is no requirement of this repository).
    code = ("import runpy, sys; sys.modules['omegaconf'] = None; "
            "runpy.run_module('loader', run_name='__main__')")
    subprocess.run([sys.executable, "-c", code, "convert", str(FIXTURES / f"{ZIGMA}.pt"),
                    str(tmp_path / "ours.pt")], cwd=ROOT, check=True, capture_output=True)
    meta, _ = load_checkpoint(tmp_path / "ours.pt")
    assert meta["model"] == "Zigma" and meta["source"] == "ours"
    assert close_to_theirs(load_model(tmp_path / "ours.pt"), ZIGMA, "ema")
    assert close_to_theirs(load_model(tmp_path / "ours.pt", weights="model"), ZIGMA, "model")


def test_sample_py_samples_an_authors_checkpoint_on_their_time_grid(tmp_path) -> None:
    # The authors' sampling command on their .pt (less --model: the fixture is smaller than any
    # registry entry); the VAE is swapped for a tiny local one (nothing is downloaded in tests).
    authors = ["--batch_size", "2", "--num-classes", "0", "--learn_pos_emb",
               "--use_convtranspose", "--ckpt", str(FIXTURES / f"{USM}.pt"), "--num_samples",
               "3", "--skip_conn", "--vae", str(save_tiny_vae(tmp_path / "vae")),
               "--num-sampling-steps", "2", "--sample-dir", str(tmp_path / "samples")]
    folder = sample.main(sample.parse_args(authors))
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png",
                                                           "000002.png"]
    assert (tmp_path / "samples.npz").is_file()
    with pytest.raises(SystemExit, match="--skip-gate: on here, off in the checkpoint"):
        sample.main(sample.parse_args([*authors, "--skip_gate"]))
    with pytest.raises(SystemExit, match="--has_text, but .* is not text-conditional"):
        sample.main(sample.parse_args([*authors, "--has_text"]))
    sampler, name = sample.create_sampler(sample.parse_args(authors), "rf", "usm-authors")
    assert sampler.t_min == 1e-3 and name == "euler2-authors-time"
