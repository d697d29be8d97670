"""Fault injection on checkpoints: damaged files, full disks, kill -9 inside a save and inside
sample.py, pruning. Each test asserts what survives, what is resumed or refused, and the message.
Tiny pixel-space runs (tests/test_train.py's), a few steps each; killed runs are forked children,
so they start without importing anything again."""

import errno
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import accelerate.utils.other
import numpy as np
import pytest
import torch

import checkpoints
import sample
import train
from checkpoints import CheckpointError, folder_bytes, prune, verify_checkpoint, write_meta
from download import find_model
from loader import load_checkpoint
from tests.fixtures import make_image_folder
from tests.test_train import TINY, checkpoint_state

FILES = ["custom_checkpoint_0.pkl", "model.safetensors", "optimizer.bin", "random_states_0.pkl"]
# ckpt-every 1, keep-last 1: every step saves and prunes the checkpoint before it
COMMON = ["--num-classes", "2", "--ema-decay", "0.5", "--ckpt-every", "1", "--keep-last", "1"]


def train_argv(data: Path, results: Path, *extra: str) -> list[str]:
    return [*TINY, *COMMON, "--data-path", str(data), "--results-dir", str(results), *extra]


def run(data: Path, results: Path, *extra: str) -> Path:
    return train.main(train.parse_args(train_argv(data, results, *extra)))


def names(exp: Path) -> list[str]:
    return sorted(p.name for p in (exp / "checkpoints").iterdir())


def in_killed_child(target, *args) -> None:
    """target(*args) in a forked child, which must end killed by SIGKILL (its own, at a hook)."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def truncate(path: Path) -> str:
    """Cut the file in half; returns the message that names the damage."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    if path.name == "meta.json":
        try:
            json.loads(data[:len(data) // 2])
        except json.JSONDecodeError as err:
            return f"{path} is damaged: not readable JSON ({err})"
    return f"{path} is damaged: truncated to {len(data) // 2:,} bytes, saved with {len(data):,}"


def flip_bit(path: Path) -> str:
    """One bit flipped where it keeps the file well-formed: meta.json's step 2 becomes step 3."""
    data = bytearray(path.read_bytes())
    at = data.index(b'"step": ') + len('"step": ') if path.name == "meta.json" else len(data) // 2
    data[at] ^= 1
    path.write_bytes(bytes(data))
    if path.name == "meta.json":
        return f"{path} is damaged: its content does not match its checksum"
    return f"{path} is damaged: its bytes differ from the ones saved (SHA-256 mismatch)"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=5, size=8)


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> dict:
    """Weights, EMA and optimizer after an uninterrupted 3-step run: what every resumed run must
    reach exactly."""
    exp = run(images, tmp_path_factory.mktemp("straight"), "--max-steps", "3")
    return checkpoint_state(exp / "checkpoints" / "step-0000003")


@pytest.fixture(scope="module")
def two_checkpoints(images, tmp_path_factory) -> Path:
    """An experiment with step-0000001 and step-0000002 (2 steps, nothing pruned)."""
    return run(images, tmp_path_factory.mktemp("two"), "--max-steps", "2", "--keep-last", "3")


@pytest.fixture
def experiment(two_checkpoints, tmp_path) -> Path:
    """A copy of two_checkpoints to damage."""
    exp = tmp_path / "results" / two_checkpoints.name
    shutil.copytree(two_checkpoints, exp)
    return exp


def assert_resumed_exactly(exp: Path, straight: dict, step: int) -> None:
    assert f"Resumed from {exp / 'checkpoints' / f'step-{step:07d}'} at step {step}" in (
        exp / "log.txt").read_text()
    got = checkpoint_state(exp / "checkpoints" / "step-0000003")
    assert got.keys() == straight.keys()
    for key in straight:
        assert torch.equal(got[key], straight[key]), key


#################################################################################
#                       Checksums: every file, every damage                      #
#################################################################################


def test_meta_json_records_every_file(two_checkpoints):
    folder = two_checkpoints / "checkpoints" / "step-0000002"
    meta = verify_checkpoint(folder)
    assert sorted(meta["files"]) == FILES
    for name, record in meta["files"].items():
        assert record["bytes"] == (folder / name).stat().st_size
    assert meta["step"] == 2 and len(meta["meta_sha256"]) == 64


@pytest.mark.parametrize("damage", [truncate, flip_bit])
@pytest.mark.parametrize("name", [*FILES, "meta.json"])
def test_a_damaged_file_is_named_skipped_by_resume_and_refused_by_loaders(
        experiment, name, damage):
    latest = experiment / "checkpoints" / "step-0000002"
    message = damage(latest / name)
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(latest)
    assert str(error.value) == message

    # --resume auto: the older checkpoint, the damaged one named, nothing deleted
    before = sorted(p.relative_to(experiment) for p in experiment.rglob("*"))
    warnings = []
    args = train.parse_args(train_argv(Path("d"), experiment.parent))
    assert train.find_resume(args, warnings.append) == (
        experiment, experiment / "checkpoints" / "step-0000001")
    assert warnings == [f"Skipping a damaged checkpoint: {message}"]
    assert sorted(p.relative_to(experiment) for p in experiment.rglob("*")) == before
    # --resume <the damaged checkpoint>: refused, naming the file
    args.resume = str(latest)
    with pytest.raises(SystemExit, match=re.escape(f"--resume {latest}: {message}. Resume from")):
        train.find_resume(args, warnings.append)

    # The loaders refuse what they read: meta.json, and the EMA (default) or the model weights
    if name == "meta.json":
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_checkpoint(latest)
    if name in ("meta.json", "custom_checkpoint_0.pkl"):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            find_model(latest)
    if name in ("meta.json", "model.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            find_model(latest, weights="model")


def test_every_checkpoint_damaged_is_refused_not_restarted(experiment):
    messages = [truncate(experiment / "checkpoints" / f"step-000000{i}" / "optimizer.bin")
                for i in (2, 1)]
    args = train.parse_args(train_argv(Path("d"), experiment.parent))
    with pytest.raises(SystemExit) as error:
        train.find_resume(args, print)
    assert str(error.value.code).endswith(
        f"every checkpoint of {experiment} is damaged:\n"
        + "\n".join(f"  Skipping a damaged checkpoint: {m}" for m in messages)
        + "\nPass --resume none to start a new experiment")


def test_checkpoints_without_checksums_still_load(experiment):
    # Written before this change: meta.json without "files" and "meta_sha256".
    latest = experiment / "checkpoints" / "step-0000002"
    meta = json.loads((latest / "meta.json").read_text())
    legacy = {k: v for k, v in meta.items() if k not in ("files", "meta_sha256")}
    (latest / "meta.json").write_text(json.dumps(legacy))
    assert verify_checkpoint(latest) == legacy
    assert load_checkpoint(latest)[0] == {**legacy, "source": "ours"}
    args = train.parse_args(train_argv(Path("d"), experiment.parent))
    assert train.find_resume(args, print) == (experiment, latest)
    ema = torch.load(latest / "custom_checkpoint_0.pkl")
    assert all(torch.equal(v, ema[k]) for k, v in find_model(latest).items())


#################################################################################
#                         Resuming past damage, exactly                          #
#################################################################################


def test_a_damaged_latest_resumes_the_older_one_exactly(images, straight, tmp_path):
    first = run(images, tmp_path, "--max-steps", "2", "--keep-last", "3")
    latest = first / "checkpoints" / "step-0000002"
    message = truncate(latest / "model.safetensors")
    resumed = run(images, tmp_path, "--max-steps", "3", "--keep-last", "3")
    assert resumed == first
    assert f"Skipping a damaged checkpoint: {message}" in (first / "log.txt").read_text()
    assert_resumed_exactly(first, straight, 1)
    # step 2 was saved again, whole; nothing else was deleted
    assert names(first) == ["step-0000001", "step-0000002", "step-0000003"]
    for step in (1, 2, 3):
        verify_checkpoint(first / "checkpoints" / f"step-000000{step}")


def kill_in_first_file_of_step_2(argv: list[str]) -> None:
    """The save of step 2 dies right after writing its first file, model.safetensors."""
    real = accelerate.utils.other.safe_save_file

    def save_and_die(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        if ".tmp-step-0000002" in str(path):
            kill_self()

    accelerate.utils.other.safe_save_file = save_and_die
    train.main(train.parse_args(argv))


def kill_before_rename_of_step_2(argv: list[str]) -> None:
    """The save of step 2 dies with every file and meta.json written, before the rename."""
    real = train.write_meta

    def write_and_die(folder, meta):
        real(folder, meta)
        if folder.name == ".tmp-step-0000002":
            kill_self()

    train.write_meta = write_and_die
    train.main(train.parse_args(argv))


def kill_inside_pruning_of_step_1(argv: list[str]) -> None:
    """Pruning after step 2's save dies half-way through deleting step 1 (its weights gone)."""
    def delete_one_file_and_die(folder):
        (Path(folder) / "model.safetensors").unlink()
        kill_self()

    checkpoints.shutil.rmtree = delete_one_file_and_die
    train.main(train.parse_args(argv))


@pytest.mark.parametrize("kill, left, resumed_step", [
    (kill_in_first_file_of_step_2, [".tmp-step-0000002", "step-0000001"], 1),
    (kill_before_rename_of_step_2, [".tmp-step-0000002", "step-0000001"], 1),
    (kill_inside_pruning_of_step_1, ["step-0000001", "step-0000002"], 2),
])
def test_kill_9_inside_a_save_then_the_same_command_resumes_exactly(
        images, straight, tmp_path, kill, left, resumed_step):
    argv = train_argv(images, tmp_path, "--max-steps", "3")
    in_killed_child(kill, argv)
    exp = tmp_path / "000-USM-T-1"
    assert names(exp) == left
    train.main(train.parse_args(argv))
    assert_resumed_exactly(exp, straight, resumed_step)
    assert names(exp) == ["step-0000003"]  # leftovers and the half-deleted step 1 are gone
    assert "Skipping" not in (exp / "log.txt").read_text()  # the newest complete one verified


#################################################################################
#                        Full disks and other write errors                       #
#################################################################################


def fail_writes_in(monkeypatch, folder_name: str, error) -> None:
    """Checkpoint files written into `folder_name` fail the way a full disk fails them: the first
    bytes land, then error(path) is raised. Patched where accelerate's save_state writes."""
    def wrap(real):
        def save(obj, path, *args, **kwargs):
            if folder_name in str(path):
                Path(path).write_bytes(b"\0" * 1000)
                raise error(str(path))
            return real(obj, path, *args, **kwargs)
        return save

    monkeypatch.setattr(torch, "save", wrap(torch.save))
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file",
                        wrap(accelerate.utils.other.safe_save_file))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_write_error_stops_with_one_line_and_keeps_the_last_checkpoint(
        images, tmp_path, monkeypatch, code):
    fail_writes_in(monkeypatch, ".tmp-step-0000002", lambda path: OSError(
        code, os.strerror(code), path))
    with pytest.raises(SystemExit) as error:
        run(images, tmp_path, "--max-steps", "3")
    ckpt_dir = tmp_path / "000-USM-T-1" / "checkpoints"
    last = ckpt_dir / "step-0000001"
    size = f"{folder_bytes(last) / 2**20:,.1f} MB"
    assert re.fullmatch(
        re.escape(f"saving checkpoint step-0000002 into {ckpt_dir} failed: {os.strerror(code)} "
                  f"({ckpt_dir}/.tmp-step-0000002/model.safetensors); a checkpoint needs about "
                  f"{size}, ") + r"[\d,.]+ MB are free there; " + re.escape(
                  f"the last complete checkpoint is {last}: free some space and run the same "
                  "command to resume from it"),
        str(error.value.code).split(": error: ", 1)[1])
    assert names(tmp_path / "000-USM-T-1") == ["step-0000001"]  # no partial folder, nothing pruned
    verify_checkpoint(last)


def limited_file_size(argv: list[str], limit: int, queue) -> None:
    """train.py where the kernel refuses to grow a file past `limit` bytes (EFBIG, as a quota
    would): real write errors, raised inside PyTorch's and safetensors' own writers."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    for fd in (1, 2):  # the captured output may be past the limit already
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        train.main(train.parse_args(argv))
        queue.put("finished without an error")
    except BaseException as err:  # noqa: BLE001 - reported to the test, whatever it is
        queue.put(str(err.code) if isinstance(err, SystemExit) else repr(err))


@pytest.mark.parametrize("limit, reason", [
    # model.safetensors (about 0.8 MB) is the first file: safetensors' writer fails
    (20_000, "Error while serializing: I/O error: File too large (os error 27)"),
    # model.safetensors fits, optimizer.bin (about 1.7 MB) does not: PyTorch's zip writer fails
    (1_000_000, "[enforce fail at inline_container.cc:"),
])
def test_a_real_write_error_on_the_first_save(images, tmp_path, limit, reason):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    argv = train_argv(images, tmp_path, "--max-steps", "2")
    child = context.Process(target=limited_file_size, args=(argv, limit, queue))
    child.start()
    message = queue.get(timeout=300)
    child.join()
    ckpt_dir = tmp_path / "000-USM-T-1" / "checkpoints"
    assert re.search(re.escape(
        f": error: saving checkpoint step-0000001 into {ckpt_dir} failed: a file could not be "
        f"written ({reason}") + r".*\); a checkpoint needs more than the [\d.]+ MB written, "
        r"[\d,.]+ MB are free there; there is no complete checkpoint yet$", message), message
    assert names(tmp_path / "000-USM-T-1") == []  # the partial folder is gone


#################################################################################
#                                   Pruning                                      #
#################################################################################


def make_checkpoints(root: Path, damaged: str) -> list[Path]:
    """step-0000001..N, where damaged[i] == "x" marks step i + 1 as damaged (a truncated file)."""
    folders = []
    for i, mark in enumerate(damaged, start=1):
        folder = root / "checkpoints" / f"step-{i:07d}"
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(bytes(range(100)))
        write_meta(folder, {"step": i})
        if mark == "x":
            truncate(folder / "weights.bin")
        folders.append(folder)
    return folders


@pytest.mark.parametrize("damaged, keep, survivors", [
    ("...", 1, [3]),      # newest verifies: the usual case
    ("...", 2, [2, 3]),
    ("..x", 1, [2, 3]),   # the new one does not verify: the last verified one stays
    ("..x", 2, [2, 3]),
    (".xx", 1, [1, 3]),   # however far back it is
    (".xx", 2, [1, 2, 3]),
    ("x.x", 1, [2, 3]),
    (".x.", 1, [3]),      # damaged older ones go like any other
    ("xxx", 1, [3]),      # nothing verifies: only --keep-last counts
    ("x..", 3, [1, 2, 3]),
])
def test_pruning_never_deletes_the_last_verified_checkpoint(tmp_path, damaged, keep, survivors):
    folders = make_checkpoints(tmp_path, damaged)
    warnings = []
    deleted = prune(folders, keep, warnings.append)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"step-{i:07d}" for i in survivors]
    assert deleted == [f for i, f in enumerate(folders, start=1) if i not in survivors]
    newest_good = damaged.rfind(".")
    skipped = damaged[newest_good + 1:]  # the damaged ones newer than the newest verified one
    assert len(warnings) == len(skipped) and all("Skipping a damaged checkpoint" in w
                                                 for w in warnings)


def test_a_save_that_does_not_verify_keeps_the_older_one_through_training(images, tmp_path,
                                                                        monkeypatch):
    # A disk that corrupts what is written: step 2 and 3 do not verify after their save.
    real = train.write_meta

    def write_then_corrupt(folder, meta):
        real(folder, meta)
        if meta["step"] > 1:
            flip_bit(folder / "optimizer.bin")

    monkeypatch.setattr(train, "write_meta", write_then_corrupt)
    exp = run(images, tmp_path, "--max-steps", "3")  # --keep-last 1
    assert names(exp) == ["step-0000001", "step-0000003"]
    log = (exp / "log.txt").read_text()
    # after step 2: step 2 skipped; after step 3: steps 3 and 2
    assert log.count("Skipping a damaged checkpoint") == 3
    args = train.parse_args(train_argv(images, tmp_path))
    assert train.find_resume(args, print) == (exp, exp / "checkpoints" / "step-0000001")


#################################################################################
#                                   sample.py                                    #
#################################################################################


def sample_argv(ckpt: Path, out: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--sample-dir", str(out), "--num-samples", "5",
            "--batch-size", "2", "--num-sampling-steps", "3"]


def kill_after_first_batch(argv: list[str]) -> None:
    real = sample.save_samples

    def save_and_die(*args):
        real(*args)
        kill_self()

    sample.save_samples = save_and_die
    sample.main(sample.parse_args(argv))


def test_sample_killed_mid_run_then_the_same_command_completes_it(two_checkpoints, tmp_path):
    argv = sample_argv(two_checkpoints, tmp_path / "s")
    in_killed_child(kill_after_first_batch, argv)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["000000.png", "000001.png"]
    assert not (tmp_path / "s.npz").exists()
    sample.main(sample.parse_args(argv))
    sample.main(sample.parse_args(sample_argv(two_checkpoints, tmp_path / "straight")))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"],
                                  np.load(tmp_path / "straight.npz")["arr_0"])


@pytest.fixture
def no_encoders(monkeypatch):
    """Checkpoint errors must come before any encoder (VAE, CLIP) loads."""
    def refuse(*args):
        raise AssertionError("an encoder was loaded before the checkpoint was checked")

    monkeypatch.setattr(sample, "load_encoders", refuse)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "is not a checkpoint this code reads (torch.load: "),
    ([1, 2, 3], "is not a checkpoint this code reads: it holds a list, not a dict"),
    ({"ema": {"step": 3}}, "is not a checkpoint this code reads: no state dict"),
    (torch.nn.Linear(2, 2).state_dict(),
     "holds weights of another model than the USM-B/1 this command builds"),
])
def test_sample_refuses_a_pt_it_does_not_know_before_the_vae(tmp_path, no_encoders, content,
                                                             message):
    pt = tmp_path / "foreign.pt"
    if isinstance(content, bytes):
        pt.write_bytes(content)
    else:
        torch.save(content, pt)
    with pytest.raises(SystemExit) as error:
        sample.main(sample.parse_args(sample_argv(pt, tmp_path / "s")))
    assert f"{pt} {message}" in str(error.value.code)
    assert not (tmp_path / "s").exists()


def test_sample_refuses_a_damaged_checkpoint_and_skips_one_in_an_experiment(
        experiment, tmp_path, no_encoders, capsys):
    latest = experiment / "checkpoints" / "step-0000002"
    message = truncate(latest / "custom_checkpoint_0.pkl")
    with pytest.raises(SystemExit) as error:
        sample.main(sample.parse_args(sample_argv(latest, tmp_path / "s")))
    assert str(error.value.code).endswith(f": error: --ckpt: {message}")
    # An experiment folder: its newest checkpoint that verifies (then the encoders load).
    with pytest.raises(AssertionError, match="encoder was loaded"):
        sample.main(sample.parse_args(sample_argv(experiment, tmp_path / "s")))
    assert f"warning: Skipping a damaged checkpoint: {message}" in capsys.readouterr().err
    settings = json.loads((tmp_path / "s" / "sample_settings.json").read_text())
    assert settings["checkpoint"] == str((experiment / "checkpoints" / "step-0000001").resolve())
