"""train.py end to end on tiny generated data with tiny models (pixel space: 8x8 images, USM-T with
one stage, so a step takes a fraction of a second on a CPU)."""

import json
import os
import re
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

import evaluate_fid
import train
from models import All_models
from selective_scan import resolve_backend
from tests.fixtures import make_coco_folder, make_image_folder, save_tiny_clip, save_tiny_vae

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "USM-T/1", "--image-size", "8", "--stages", "1", "--vae", "none",
        "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--max-steps", "2",
        "--fid-every", "0"]


def run(data: Path, results: Path, *extra: str) -> Path:
    """train.main in this process; later options override the tiny defaults."""
    argv = [*TINY, "--data-path", str(data), "--results-dir", str(results), *extra]
    return train.main(train.parse_args(argv))


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    """Model, EMA and optimizer tensors of a checkpoint, flattened to one dict."""
    state = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    ema = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)
    state.update({f"ema.{k}": v for k, v in ema.items()})
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)["state"]
    for index, tensors in optimizer.items():
        state.update({f"opt.{index}.{k}": v for k, v in tensors.items()})
    return state


def logged_losses(exp_dir: Path) -> list[float]:
    lines = (exp_dir / "log.txt").read_text().splitlines()
    return [float(line.split("loss=")[1].split()[0]) for line in lines if "loss=" in line]


def assert_best_is_the_lowest_logged_fid(exp_dir: Path) -> None:
    """best/ holds the step with the lowest FID of log.txt (logged to 3 decimals), and that FID."""
    lines = (exp_dir / "log.txt").read_text().splitlines()
    fids = {int(line.split("(step=")[1][:7]): float(line.split("FID=")[1].split()[0])
            for line in lines if "FID=" in line}
    best = json.loads((exp_dir / "checkpoints" / "best" / "meta.json").read_text())
    lowest = min(fids.values())
    assert len(fids) >= 2 and best["fid"] == pytest.approx(lowest, abs=5e-4)
    assert fids[best["step"]] == lowest  # (steps whose FIDs round alike are not told apart)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=5, size=8)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """A tiny TorchScript feature network that stands in for Inception and keeps FID cheap."""
    path = tmp_path_factory.mktemp("features") / "features.pt"
    # torch deprecates TorchScript: a DeprecationWarning in 2.11, a FutureWarning in 2.15
    with pytest.warns((DeprecationWarning, FutureWarning), match="deprecated"):
        net = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2),
                                                   torch.nn.Flatten()))
    net.save(str(path))
    return path


def test_both_spellings_and_paper_defaults():
    authors = ("--model USM-B/1 --data-path d --batch_size 8 --num-classes 0 --results_dir r "
               "--learn_pos_emb --sample-every 20000 --ckpt-every 10000 --use_ckpt --sampling log "
               "--use_convtranspose --skip_conn").split()
    args = train.parse_args(authors)
    assert (args.batch_size, args.results_dir, args.sample_every, args.ckpt_every) == (
        8, "r", 20000, 10000)
    assert args.learn_pos_emb and args.use_ckpt and args.skip_conn and args.use_convtranspose
    assert (args.lr, args.weight_decay, args.ema_decay, args.objective) == (1e-4, 0, 0.9999, "rf")
    dashed = train.parse_args("--data-path d --batch-size 3 --learn-pos-emb --use-ckpt".split())
    assert dashed.batch_size == 3 and dashed.learn_pos_emb and dashed.use_ckpt
    default = train.parse_args(["--data_path", "d", "--stages", "2,3"])
    assert default.skip_conn and default.use_convtranspose and default.stages == (2, 3)
    off = train.parse_args("--data-path d --no-skip-conn --no_convtranspose".split())
    assert not off.skip_conn and not off.use_convtranspose


def test_pixel_space_run_writes_checkpoints_samples_and_logs(images, tmp_path):
    exp = run(images, tmp_path, "--ckpt-every", "1", "--max-steps", "3", "--keep-last", "2",
              "--report-to", "tensorboard", "--log-every", "1")
    assert exp == tmp_path / "000-USM-T-1"
    checkpoints = sorted(p.name for p in (exp / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000003"]  # keep-last 2, no leftovers
    folder = exp / "checkpoints" / "step-0000003"
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl",
                 "custom_checkpoint_0.pkl", "meta.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["model"] == "USM-T/1" and meta["step"] == 3 and meta["args"]["image_size"] == 8
    # meta.json alone rebuilds the model, and both weight sets load into it strictly
    model = All_models[meta["model"]](**meta["model_kwargs"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.load_state_dict(torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True))
    grid = Image.open(exp / "samples" / "step-0000003.png")
    assert grid.size == (8 * 8 + 9 * 2, 2 * 8 + 3 * 2)  # 8 x 2 samples, save_image's 2px padding
    assert len(logged_losses(exp)) == 3
    assert list((exp / "tensorboard").rglob("events.out.tfevents*"))
    used = resolve_backend("cpu", "auto")[0]  # cpu where the C++ scan builds, else torch
    assert f"Selective scan backend: {used} (auto: tensors on cpu" in (exp / "log.txt").read_text()


@pytest.mark.slow
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(images, features, tmp_path):
    # sampling and FID at step 3 must not shift the random stream either
    # the warm-up spans the interruption: the resumed run must continue the learning-rate ramp
    common = ["--num-classes", "2", "--ema-decay", "0.5", "--ckpt-every", "3",
              "--warmup-steps", "4", "--sample-every", "3", "--fid-every", "3", "--fid-images", "4",
              "--inception", str(features)]
    straight = run(images, tmp_path / "a", *common, "--max-steps", "5")
    first = run(images, tmp_path / "b", *common, "--max-steps", "3")  # stops mid-epoch 1
    (first / "checkpoints" / ".tmp-step-0000004").mkdir()  # a save that crashed half-way
    # data-loader workers do no random draws, so their number does not matter either
    resumed = run(images, tmp_path / "b", *common, "--max-steps", "5", "--num-workers", "2")
    assert resumed == first
    assert not (first / "checkpoints" / ".tmp-step-0000004").exists()
    expected = checkpoint_state(straight / "checkpoints" / "step-0000005")
    got = checkpoint_state(resumed / "checkpoints" / "step-0000005")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert "Resumed from" in (resumed / "log.txt").read_text()
    grid = Image.open(resumed / "samples" / "step-0000005.png")
    assert grid.size[1] == 2 * 8 + 3 * 2  # one row per class


def test_learning_rate_warm_up_and_cosine_schedule(images, tmp_path):
    args = train.parse_args("--data-path d --lr 0.01 --warmup-steps 4 --lr-schedule cosine".split())
    lrs = [train.learning_rate(step, 12, args) for step in range(1, 13)]
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # linear ramp
    assert lrs[7] == pytest.approx(0.005)  # half-way through the decay
    assert lrs[-1] == pytest.approx(0) and lrs[3:] == sorted(lrs[3:], reverse=True)
    with pytest.raises(SystemExit):  # a negative warm-up would give negative rates
        train.parse_args("--data-path d --warmup-steps -1".split())
    constant = train.parse_args("--data-path d --lr 0.01".split())
    assert {train.learning_rate(step, 12, constant) for step in (1, 6, 12)} == {0.01}
    # the optimizer ran with the schedule: its last step used warm-up step 2 of 4
    exp = run(images, tmp_path, "--lr", "0.01", "--warmup-steps", "4")
    optimizer = torch.load(exp / "checkpoints" / "step-0000002" / "optimizer.bin",
                           weights_only=True)
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.005)


def test_loss_falls_on_a_learnable_data_set(tmp_path):
    # Every image the same: the velocity target x - noise is then predictable from z_t and t.
    make_image_folder(tmp_path / "flat", classes=("a",), per_class=8, size=8)
    for path in (tmp_path / "flat" / "train" / "a").iterdir():
        Image.new("RGB", (8, 8), (230, 40, 90)).save(path)
    exp = run(tmp_path / "flat", tmp_path / "r", "--max-steps", "30", "--log-every", "10",
              "--lr", "3e-3")
    losses = logged_losses(exp)
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses


def test_latent_space_from_a_latent_cache(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=2, size=64)
    vae = save_tiny_vae(tmp_path / "vae")
    views = []  # (cached pairs, what the objective is given) of every step
    model_inputs = train.model_inputs

    def watch(x, *args):
        inputs = model_inputs(x, *args)
        views.append((x, inputs[0]))
        return inputs

    monkeypatch.setattr(train, "model_inputs", watch)
    exp = run(data, tmp_path / "r", "--vae", str(vae), "--image-size", "64", "--cache-latents",
              "--objective", "gaussian")
    caches = list((tmp_path / "r" / "latent-cache").glob("latents-*.npy"))
    assert len(caches) == 1
    # Every step trains on the cache, each latent as its image's or its mirror image's at random
    cached = {pair.tobytes() for pair in np.load(caches[0])}
    mirrored = []
    for pairs, x in views:
        assert {pair.numpy().tobytes() for pair in pairs} <= cached
        assert ((x == pairs[:, 0]) | (x == pairs[:, 1])).flatten(1).all(1).all()
        mirrored += (x == pairs[:, 1]).flatten(1).all(1).tolist()
    assert len(views) == 2 and any(mirrored) and not all(mirrored)
    meta = json.loads((exp / "checkpoints" / "step-0000002" / "meta.json").read_text())
    kwargs = meta["model_kwargs"]
    assert (kwargs["in_channels"], kwargs["input_size"], kwargs["learn_sigma"]) == (4, 8, True)
    assert Image.open(exp / "samples" / "step-0000002.png").size == (8 * 64 + 18, 2 * 64 + 6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["authors", "2014"])
def test_text_conditional_with_guided_grid_and_fid(features, tmp_path, layout):
    data = make_coco_folder(tmp_path / "coco", n_train=4, n_val=3, size=8, layout=layout)
    clip = save_tiny_clip(tmp_path / "clip", hidden_size=16)
    exp = run(data, tmp_path / "r", "--text-encoder", str(clip), "--cfg-scale", "3",
              "--fid-every", "1", "--fid-images", "3", "--inception", str(features))
    meta = json.loads((exp / "checkpoints" / "step-0000002" / "meta.json").read_text())
    assert meta["model_kwargs"]["context_dim"] == 16
    captions = (exp / "samples" / "step-0000002.txt").read_text().splitlines()
    assert captions == [f"image {i} of val, caption number 0" for i in range(3)]
    assert_best_is_the_lowest_logged_fid(exp)


def test_afhq_v2_trains_unconditionally_with_fid_on_its_test_split(features, tmp_path):
    # As the authors trained AFHQ: --num-classes 0 over its three class folders
    data = make_image_folder(tmp_path / "afhq", classes=("cat", "dog", "wild"), per_class=2,
                             val_per_class=1, size=8, held_out="test")
    exp = run(data, tmp_path / "r", "--num-classes", "0", "--fid-every", "2", "--fid-images", "3",
              "--inception", str(features))
    meta = json.loads((exp / "checkpoints" / "step-0000002" / "meta.json").read_text())
    assert meta["model_kwargs"]["num_classes"] == 0
    assert "FID=" in (exp / "log.txt").read_text()


def test_fid_against_either_split_with_either_resize_and_dopri5(images, features, tmp_path,
                                                                monkeypatch):
    # CompVis' protocol (train split, dopri5) and the USM authors' (val split); 10 train and 4
    # val images, --fid-images caps nothing here, so the count in the log names the split.
    loaded = []

    def load_inception(*args, **kwargs):
        loaded.append(evaluate_fid.load_inception(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(train, "load_inception", load_inception)
    common = ["--fid-every", "2", "--fid-images", "100", "--inception", str(features),
              "--sampler", "dopri5", "--atol", "1e-3", "--rtol", "1e-1"]  # loose: fast
    logs = [(run(images, tmp_path / split, *common, "--fid-reference", split, "--fid-resize",
                 resize) / "log.txt").read_text()
            for split, resize in (("train", "tf1"), ("val", "antialias"))]
    assert "(step=0000002) FID=" in logs[0] and "(10 images)" in logs[0]
    assert "(step=0000002) FID=" in logs[1] and "(4 images)" in logs[1]
    assert [m.resize for m in loaded] == [evaluate_fid.resize_like_tf1,
                                          evaluate_fid.resize_antialiased]
    for log in logs:  # the number of model evaluations of dopri5's FID batches
        assert re.search(r"FID sampling, this process: \d+ model evaluations over \d batches", log)


def test_fid_reference_images_are_a_fixed_random_subset():
    assert train.fid_subset(4, 10, seed=0) == [0, 1, 2, 3]  # the whole split
    subset = train.fid_subset(1000, 10, seed=0)
    assert subset == sorted(set(subset)) and len(subset) == 10 and subset[-1] > 10
    assert train.fid_subset(1000, 10, seed=0) == subset != train.fid_subset(1000, 10, seed=1)


def test_sampler_options_fit_the_objective():
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "d", "--objective", "gaussian", "--sampler", "heun"])
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "d", "--sampler", "dopri5", "--num-sampling-steps", "9"])
    args = train.parse_args(["--data-path", "d", "--sampler", "dopri5", "--rtol", "0.01"])
    sampler = train.create_objective(args)[1]
    assert (sampler.sampler, sampler.atol, sampler.rtol) == ("dopri5", 1e-6, 0.01)


@pytest.mark.parametrize("extra, message", [
    (["--data-path", "/nonexistent"], "does not exist"),
    (["--num-classes", "3"], "--num-classes 3 but .* has 2 class folders"),
    (["--image-size", "9"], "--image-size 9 .* must be divisible by 2"),
    (["--vae", "ema", "--channels", "1"], "use --vae none"),
    (["--scan-backend", "mamba_ssm"], "--scan-backend mamba_ssm: the mamba_ssm backend"),
])
def test_bad_input_is_refused_before_training(images, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(images, tmp_path, *extra)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no experiment folder


def test_unknown_model_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data-path", "d", "--model", "USM-Q/1"])
    assert "USM-B/1" in capsys.readouterr().err


def test_corrupt_images_fail_by_name_or_are_skipped(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a",), per_class=5, size=8)
    (data / "train" / "a" / "002.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(SystemExit, match="002.png"):
        run(data, tmp_path / "r1", "--batch-size", "5")  # every batch holds the bad file
    exp = run(data, tmp_path / "r2", "--on-corrupt", "skip", "--epochs", "1", "--max-steps", "9")
    log = (exp / "log.txt").read_text()
    assert "Skipping corrupt image" in log and "Skipped 1 corrupt image" in log
    assert [p.name for p in (exp / "checkpoints").iterdir()] == ["step-0000001"]  # 4 images left


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(images, tmp_path):
    # A huge learning rate blows the weights up after the first step.
    with pytest.raises(SystemExit, match="loss is (nan|inf) at step 2"):
        run(images, tmp_path, "--lr", "1e30", "--ckpt-every", "1", "--max-steps", "5")
    checkpoints = list((tmp_path / "000-USM-T-1" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-0000001"]
    assert (checkpoints[0] / "meta.json").is_file()


def test_non_finite_weights_are_never_checkpointed(images, tmp_path):
    # An infinite learning rate: the loss of step 1 is finite, the weights after it are not.
    with pytest.raises(SystemExit, match="weights are not finite after step 1; stopping. "
                                         "Last good checkpoint: none"):
        run(images, tmp_path, "--lr", "inf", "--ckpt-every", "1", "--log-every", "10")
    assert not any((tmp_path / "000-USM-T-1" / "checkpoints").iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(images: Path, results: Path, features: Path, *launcher: str) -> list[str]:
    """accelerate launch of train.py with the authors' training command as written (model and size
    adapted to CPU, --sample-every 2 so that the run reaches it, a tiny FID network), on CPUs.
    accelerate 1.15 starts several CPU processes only through its multi-process (torchrun)
    launcher; ACCELERATE_USE_CPU (in LAUNCH_ENV) makes them use CPU + gloo."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
              *launcher]
    authors = ["--model", "USM-T/1", "--data-path", str(images), "--batch_size", "2",
               "--num-classes", "0", "--results_dir", str(results), "--learn_pos_emb",
               "--sample-every", "2", "--ckpt-every", "2", "--use_ckpt", "--sampling", "log",
               "--use_convtranspose", "--skip_conn", "--samples", "1", "--experiment_dir", "x"]
    tiny = ["--vae", "none", "--image-size", "8", "--stages", "1", "--max-steps", "4",
            "--num-workers", "0", "--report-to", "none", "--inception", str(features)]
    return [*launch, "train.py", *authors, *tiny]


LAUNCH_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
              "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_processes(images, features, tmp_path_factory) -> Path:
    """The experiment folder of a 2-process run on one machine."""
    results = tmp_path_factory.mktemp("two-processes")
    command = launch_command(images, results, features, "--num_machines", "1",
                             "--main_process_port", str(free_port()))
    result = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return results / "000-USM-T-1"


@pytest.mark.slow
def test_two_cpu_processes_with_the_authors_command_line(two_processes):
    # Grid + FID of the EMA on the val split at every --sample-every, a best/ checkpoint,
    # --samples as FID batches, dead flags accepted.
    exp = two_processes
    folder = exp / "checkpoints" / "step-0000004"
    assert (folder / "random_states_0.pkl").is_file() and (folder / "random_states_1.pkl").is_file()
    log = (exp / "log.txt").read_text()
    assert "global batch 4" in log  # 2 processes x 2
    assert "Ignoring --experiment_dir" in log
    assert "--samples 1: FID on 4 val images (1 batches of 2 per process)" in log
    assert "(step=0000002) FID=" in log and "(step=0000004) FID=" in log and "(4 images)" in log
    assert_best_is_the_lowest_logged_fid(exp)
    model = load_file(folder / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values())
    assert (exp / "samples" / "step-0000002.png").is_file()
    assert (exp / "samples" / "step-0000004.png").is_file()
    assert np.isfinite(logged_losses(exp)).all()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
def test_two_machines_equal_two_processes_on_one(images, features, two_processes, tmp_path):
    """Two launchers, machine ranks 0 and 1, one process each, meeting over 127.0.0.1: the
    multi-node launch of docs/cluster.md, on one host."""
    port = str(free_port())
    machines = [subprocess.Popen(
        launch_command(images, tmp_path, features, "--num_machines", "2", "--machine_rank",
                       str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port),
        cwd=REPO, env=LAUNCH_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [machine.communicate(timeout=300)[0] for machine in machines]
    for machine, output in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, output[-3000:]
    exp = tmp_path / "000-USM-T-1"
    for step in ("step-0000002", "step-0000004"):
        expected = checkpoint_state(two_processes / "checkpoints" / step)
        got = checkpoint_state(exp / "checkpoints" / step)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (step, key)
    assert logged_losses(exp) == logged_losses(two_processes)
