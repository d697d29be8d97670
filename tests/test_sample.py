"""sample.py end to end from a tiny checkpoint that train.py writes (pixel space, 8x8 RGB, two
classes, USM-T with one stage): files, .npz, grid, reproducibility, resuming, sharding, errors."""

import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import train
from download import find_model
from loader import load_checkpoint, load_model
from models import USM, All_models
from tests.fixtures import (
    make_coco_folder,
    make_hub_cache,
    make_image_folder,
    save_tiny_clip,
    save_tiny_vae,
)

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num-sampling-steps", "3"]  # a 3-step Euler ODE: the images only have to be reproducible


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """The experiment folder of a 4-step class-conditional run (learned positional embedding, as
    the authors' command line asks for). A large learning rate moves the zero-initialised output
    layer enough for the samples to be more than their starting noise."""
    root = tmp_path_factory.mktemp("train")
    data = make_image_folder(root / "data", per_class=4, size=8)
    args = train.parse_args([
        "--model", "USM-T/1", "--image-size", "8", "--stages", "1", "--vae", "none",
        "--num-classes", "2", "--learn-pos-emb", "--batch-size", "4", "--num-workers", "0",
        "--report-to", "none", "--max-steps", "4", "--lr", "1e-2", "--ema-decay", "0.5",
        "--fid-every", "0", "--data-path", str(data), "--results-dir", str(root / "results"),
    ])
    return train.main(args)


def run(experiment: Path, out: Path, *extra: str) -> Path:
    """sample.main in this process; later options override earlier ones."""
    argv = ["--ckpt", str(experiment), "--sample-dir", str(out), "--num-samples", "5", *FAST,
            *extra]
    return sample.main(sample.parse_args(argv))


def pixels(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to floating-point rounding: kernels sum in another order for another batch size,
    which now and then moves a pixel across a rounding boundary (one grey level). Different noise
    would change nearly every pixel by far more."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pngs_npz_and_class_grid(experiment, tmp_path):
    folder = run(experiment, tmp_path / "s", "--num-samples", "6", "--batch-size", "4",
                 "--grid", str(tmp_path / "grid.png"), "--grid-per-class", "2")
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(6)]
    for name in names:
        with Image.open(folder / name) as image:
            assert (image.size, image.mode) == ((8, 8), "RGB")
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, pixels(folder, 6))
    assert len({image.tobytes() for image in arr}) == 6  # every sample has its own noise
    # One row per class, 2 columns, save_image's 2 px padding; sample i has class i % 2, so row r
    # shows samples r and r + 2.
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3)
    for row in range(2):
        for col in range(2):
            y, x = 2 + row * 10, 2 + col * 10
            np.testing.assert_array_equal(grid[y:y + 8, x:x + 8], arr[row + 2 * col])


def test_images_depend_on_seed_and_index_only_and_resume_keeps_finished_ones(experiment, tmp_path):
    one = run(experiment, tmp_path / "one", "--batch-size", "1")
    three = run(experiment, tmp_path / "three", "--batch-size", "3")
    expected = pixels(one, 5)
    assert_same_images(pixels(three, 5), expected)
    other_seed = run(experiment, tmp_path / "seed1", "--global-seed", "1")
    assert np.abs(pixels(other_seed, 5).astype(int) - expected).mean() > 10

    # Resume: two samples deleted, one damaged; the others must not be written again.
    (three / "000001.png").unlink()
    (three / "000004.png").unlink()
    (three / "000002.png").write_bytes((three / "000002.png").read_bytes()[:30])
    for i in (0, 3):
        os.utime(three / f"{i:06d}.png", (1_000_000, 1_000_000))
    run(experiment, tmp_path / "three", "--batch-size", "2")
    assert_same_images(pixels(three, 5), expected)
    for i in (0, 3):
        assert (three / f"{i:06d}.png").stat().st_mtime == 1_000_000
    assert (three / "000002.png").stat().st_mtime > 1_000_000


def test_dopri5_reports_its_model_evaluations(experiment, tmp_path, capsys, monkeypatch):
    calls = []
    forward = USM.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(USM, "forward", counted)
    nfe = []  # loose tolerances: CompVis' take this tiny 4-step model ~80 evaluations a batch
    for atol, rtol in (("0.001", "0.1"), ("0.0001", "0.01")):
        calls.clear()
        name = f"dopri5-atol{atol}-rtol{rtol}"
        sample.main(sample.parse_args(
            ["--ckpt", str(experiment), "--sample-dir", str(tmp_path / name), "--num-samples",
             "2", "--batch-size", "1", "--sampler", "dopri5", "--atol", atol, "--rtol", rtol]))
        log = capsys.readouterr().out
        assert f"Sampler {name}, this process: {len(calls)} model evaluations over 2 batches" in log
        nfe.append(len(calls))
    assert 2 * 8 <= nfe[0] < nfe[1]  # per batch: f(0), the first-step probe, 6 per step
    # By default CompVis' tolerances.
    args = sample.parse_args(["--ckpt", str(experiment), "--sampler", "dopri5"])
    sampler, name = sample.create_sampler(args, "rf", "ours")
    assert (sampler.atol, sampler.rtol, name) == (1e-6, 1e-3, "dopri5-atol1e-06-rtol0.001")


def test_class_labels_cycle_through_all_classes_or_the_chosen_ones(experiment, tmp_path):
    balanced = pixels(run(experiment, tmp_path / "all"), 5)  # labels 0, 1, 0, 1, 0
    ones = pixels(run(experiment, tmp_path / "ones", "--class-labels", "1"), 5)
    assert_same_images(ones[1::2], balanced[1::2])  # same noise, same label
    # same noise, other label: more than rounding apart (a 4-step model is only weakly conditioned)
    assert np.abs(ones[::2].astype(int) - balanced[::2]).mean() > 0.5


@pytest.mark.slow
def test_grayscale_pngs_keep_one_channel_and_the_npz_has_three(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a",), per_class=4, size=8, mode="L")
    exp = train.main(train.parse_args([
        "--model", "USM-T/1", "--image-size", "8", "--stages", "1", "--vae", "none",
        "--channels", "1", "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
        "--max-steps", "1", "--data-path", str(data), "--results-dir", str(tmp_path / "r")]))
    folder = run(exp, tmp_path / "s", "--num-samples", "2")
    with Image.open(folder / "000001.png") as image:
        assert (image.size, image.mode) == ((8, 8), "L")
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (2, 8, 8, 3)  # the ADM suite's layout: RGB
    for channel in range(3):
        np.testing.assert_array_equal(arr[..., channel], pixels(folder, 2))


def test_labels_and_noise_follow_the_index():
    assert sample.batch_conditions([0, 1, 2, 5], [0, 1], None).tolist() == [0, 1, 0, 1]
    assert sample.batch_conditions([0, 1, 2], [3, 5, 7], None).tolist() == [3, 5, 7]
    assert sample.batch_conditions([4, 1], [], ["a", "b", "c"]) == ["b", "b"]
    alone = sample.sample_noise([7], (1, 4, 4), global_seed=0)
    in_batch = sample.sample_noise([2, 7, 9], (1, 4, 4), global_seed=0)
    assert torch.equal(in_batch[1], alone[0]) and not torch.equal(in_batch[0], alone[0])
    for n, processes in [(7, 2), (5, 3), (2, 4)]:
        shards = [list(sample.shard_indices(n, i, processes)) for i in range(processes)]
        assert sorted(sum(shards, [])) == list(range(n))


@pytest.mark.slow
def test_authors_command_line_on_two_processes(experiment, tmp_path):
    # The authors' sampling command as written (model and size adapted to the tiny checkpoint), on
    # two CPU processes: 7 samples, 4 + 3, the same images as one process with another batch size.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    authors = ["--model", "USM-T/1", "--batch_size", "2", "--num-classes", "2", "--learn_pos_emb",
               "--use_convtranspose", "--ckpt", str(experiment), "--num_samples", "7",
               "--skip_conn", "--use_ckpt", "--results_dir", "r", "--num-workers", "4"]
    result = subprocess.run([*launch, str(REPO / "sample.py"), *authors, *FAST], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ignoring --use_ckpt, --results_dir, --num-workers" in result.stdout
    # The default folder, samples/<experiment>-<checkpoint>-<settings>, under the working folder
    settings = "ema-size-8-vae-none-euler3-cfg-1.0-seed-0"
    folder = tmp_path / "samples" / f"{experiment.name}-step-0000004-{settings}"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(7)]
    single = run(experiment, tmp_path / "single", "--num-samples", "7", "--batch-size", "3")
    assert_same_images(pixels(folder, 7), pixels(single, 7))
    np.testing.assert_array_equal(np.load(f"{folder}.npz")["arr_0"], pixels(folder, 7))


def test_a_dit_style_pt_file_samples_like_its_folder(experiment, tmp_path):
    # A .pt with model / ema weights and the training args (no model_kwargs): the model is rebuilt
    # from the args.
    ckpt = experiment / "checkpoints" / "step-0000004"
    pt = tmp_path / "0000002.pt"
    torch.save({"ema": find_model(ckpt), "model": load_file(ckpt / "model.safetensors"),
                "args": load_checkpoint(ckpt)[0]["args"]}, pt)
    from_pt = run(pt, tmp_path / "pt")
    from_folder = run(ckpt, tmp_path / "folder")
    np.testing.assert_array_equal(pixels(from_pt, 5), pixels(from_folder, 5))  # same batches
    raw = run(pt, tmp_path / "raw", "--weights", "model")  # EMA decay 0.5: not the raw weights
    assert np.abs(pixels(raw, 5).astype(int) - pixels(from_folder, 5)).max() > 1


def test_a_checkpoint_on_the_hub_samples_like_its_local_file(experiment, tmp_path, monkeypatch):
    from huggingface_hub import constants

    ckpt = experiment / "checkpoints" / "step-0000004"
    pt = tmp_path / "usm.pt"
    meta, ema = load_checkpoint(ckpt)
    torch.save({"ema": ema, "model_kwargs": meta["model_kwargs"], "args": meta["args"]}, pt)
    make_hub_cache(tmp_path / "hub", "owner/usm", {"weights/usm.pt": pt.read_bytes()}, "c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read from the cache alone
    from_hub = run("hf://owner/usm/weights/usm.pt", tmp_path / "hub-samples")
    np.testing.assert_array_equal(pixels(from_hub, 5), pixels(run(ckpt, tmp_path / "local"), 5))


def test_text_conditional_latent_gaussian_checkpoint_with_guidance(tmp_path):
    # COCO captions through the tiny CLIP, 64 px images as 8x8 latents of the tiny VAE, DiT's
    # Gaussian diffusion with learned sigma, sampled with DDIM (deterministic) and guidance.
    data = make_coco_folder(tmp_path / "coco", n_train=4, n_val=1, size=64)
    vae, clip = save_tiny_vae(tmp_path / "vae"), save_tiny_clip(tmp_path / "clip", hidden_size=16)
    exp = train.main(train.parse_args([
        "--model", "USM-T/1", "--image-size", "64", "--stages", "1", "--vae", str(vae),
        "--text-encoder", str(clip), "--objective", "gaussian", "--batch-size", "4",
        "--num-workers", "0", "--report-to", "none", "--max-steps", "1", "--data-path", str(data),
        "--results-dir", str(tmp_path / "results")]))
    captions = tmp_path / "captions.txt"
    captions.write_text("a red square\n\na blue circle\n")  # blank lines are skipped
    guided = ["--captions", str(captions), "--cfg-scale", "4", "--respacing", "ddim4",
              "--num-samples", "3"]
    one = sample.main(sample.parse_args(["--ckpt", str(exp), "--sample-dir", str(tmp_path / "a"),
                                         *guided, "--batch-size", "1"]))
    two = sample.main(sample.parse_args(["--ckpt", str(exp), "--sample-dir", str(tmp_path / "b"),
                                         *guided, "--batch-size", "2"]))
    with Image.open(one / "000000.png") as image:
        assert (image.size, image.mode) == ((64, 64), "RGB")
    assert_same_images(pixels(one, 3), pixels(two, 3))
    assert np.load(tmp_path / "a.npz")["arr_0"].shape == (3, 64, 64, 3)
    with pytest.raises(SystemExit, match="text-conditional checkpoint needs --captions"):
        sample.main(sample.parse_args(["--ckpt", str(exp), "--sample-dir", str(tmp_path / "c")]))


@pytest.mark.parametrize("extra, message", [
    (["--ckpt", "/nonexistent/step-0000001"], "--ckpt /nonexistent/step-0000001 not found"),
    (["--model", "USM-S/1", "--num-classes", "3"],
     "--model: USM-S/1 here, USM-T/1 in the checkpoint; --num-classes: 3 here, 2 in"),
    (["--no-skip-conn"], "--skip-conn: off here, on in the checkpoint"),
    (["--class-labels", "0,2"], "--class-labels 2 is not a class"),
    (["--captions", "captions.txt"], "--captions needs a text-conditional checkpoint"),
    (["--respacing", "ddim10"], "--respacing is for Gaussian diffusion"),
    (["--sampler", "dopri5"], "--num-sampling-steps is for euler and heun"),
    (["--rtol", "1e-4"], "--atol / --rtol are the tolerances of --sampler dopri5"),
    (["--scan-backend", "mamba_ssm"], "--scan-backend mamba_ssm: the mamba_ssm backend"),
])
def test_bad_options_are_refused_before_anything_is_written(experiment, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(experiment, tmp_path / "s", *extra)
    assert not (tmp_path / "s").exists()


def test_unwritable_output_folder(experiment, tmp_path):
    (tmp_path / "file").write_text("not a folder")  # even root cannot create a folder inside it
    with pytest.raises(SystemExit, match="cannot write to .*file/s"):
        run(experiment, tmp_path / "file" / "s")


def test_weights_of_another_model_name_the_mismatch(experiment, tmp_path):
    other = All_models["USM-T/1"](input_size=8, in_channels=3, num_classes=5, stages=(1,))
    pt = tmp_path / "other.pt"
    torch.save(other.state_dict(), pt)  # a bare state dict: the flags describe the model
    flags = ["--model", "USM-T/1", "--image-size", "8", "--stages", "1", "--vae", "none",
             "--num-classes", "2", "--ckpt", str(pt)]
    with pytest.raises(SystemExit) as error:
        run(experiment, tmp_path / "s", *flags, "--learn-pos-emb")
    assert "another model than the USM-T/1 this command builds (1 difference)" in str(error.value)
    assert "cond.y_embedder.weight: checkpoint (6, 64), model (3, 64)" in str(error.value)


def test_resuming_into_a_folder_of_other_settings_is_refused(experiment, tmp_path):
    run(experiment, tmp_path / "s", "--num-samples", "1")
    with pytest.raises(SystemExit, match="other settings .*global_seed: 0 -> 3"):
        run(experiment, tmp_path / "s", "--num-samples", "1", "--global-seed", "3")


def test_heun_sampler_end_to_end_is_the_hand_written_heun(experiment, tmp_path):
    # Heun's method written out here (slopes at both ends of a step, averaged; a plain Euler last
    # step, as docs/sampling.md and diffusion/rectified_flow.py state) on the checkpoint's EMA
    # weights, from the noise and labels sample.py documents for each index.
    steps, n = 3, 4
    folder = run(experiment, tmp_path / "heun", "--sampler", "heun", "--num-sampling-steps",
                 str(steps), "--num-samples", str(n))
    model = load_model(experiment / "checkpoints" / "step-0000004")
    x = sample.sample_noise(list(range(n)), (3, 8, 8), global_seed=0)
    y, h = torch.arange(n) % 2, 1 / steps
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((n,), i * h)
            v = model(x, t, y)
            if i < steps - 1:
                v = (v + model(x + h * v, t + h, y)) / 2
            x = x + h * v
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert_same_images(pixels(folder, n), expected.astype(np.uint8))
    euler = run(experiment, tmp_path / "euler", *FAST, "--num-samples", str(n))
    assert np.abs(pixels(euler, n).astype(int) - expected).mean() > 0.5
