"""Stopping cleanly on a cluster: real signals sent to real train.py / sample.py processes (1
process, and 2 CPU processes started as docs/training.md#several-processes starts them),
the time limit and --requeue, and a checkpoint write that fails on the main process of 2. A stopped
run is resumed with the same command and compared, tensor for tensor, with one never interrupted."""

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import preemption
import sample
import train
from checkpoints import verify_checkpoint
from preemption import StopConditions, StopSignals
from tests.fixtures import make_image_folder
from tests.test_train import LAUNCH_ENV, REPO, TINY, checkpoint_state, free_port

STEPS = 24
COMMON = ["--num-classes", "2", "--ema-decay", "0.5", "--ckpt-every", "1000", "--log-every", "2"]


def train_argv(data: Path, results: Path, *extra: str) -> list[str]:
    return [*TINY, *COMMON, "--data-path", str(data), "--results-dir", str(results),
            "--max-steps", str(STEPS), *extra]


def launch(argv: list[str], processes: int, env: dict | None = None,
           **popen) -> subprocess.Popen:
    """train.py: `python train.py` for 1 process, else docs/training.md's accelerate launch on
    CPUs."""
    command = [sys.executable, "train.py", *argv]
    if processes > 1:
        command[1:2] = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                        str(processes), "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "train.py"]
    return subprocess.Popen(command, cwd=REPO, env={**LAUNCH_ENV, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def finished(process: subprocess.Popen, rc: int | None = 0) -> str:
    output = process.communicate(timeout=300)[0]
    if rc is not None:
        assert process.returncode == rc, output[-3000:]
    return output


def wait_for(path: Path, text: str, process: subprocess.Popen) -> None:
    """Until `text` appears in the file (the run is that far), failing if the run ends first."""
    deadline = time.monotonic() + 240
    while not (path.is_file() and text in path.read_text()):
        assert process.poll() is None, f"ended before {text!r}: {process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


def workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes a launcher started (its children, by their RANK)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # ended meanwhile
        rank = [v for v in environ if v.startswith(b"RANK=")]
        if ppid == launcher and rank:
            found[int(rank[0][5:])] = int(stat.parent.name)
    return found


def checkpoints_of(exp: Path) -> list[str]:
    return sorted(p.name for p in (exp / "checkpoints").iterdir())


def assert_same_state(got: Path, expected: dict) -> None:
    state = checkpoint_state(got)
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


#################################################################################
#                  The stop logic alone: signals, votes, the deadline            #
#################################################################################


def test_signals_are_recorded_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(announce=lambda message: None) as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == ["SIGUSR1", "SIGTERM", "SIGINT"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_deadline_leaves_room_for_the_slowest_steps_evaluation_and_save():
    clock = Clock()
    stop = StopConditions(deadline=1105.0, announce=print, clock=clock)
    stop.start(0)
    clock.now = 1010.0  # 5 steps of 2 s
    assert stop.votes(5, 5, eval_ahead=False) == [0, 0, 0, 0]  # 1010 + 5 x 2 = 1020
    with stop.timed("save"):
        clock.now += 7
    with stop.timed("eval"):
        clock.now += 20
    clock.now += 5 * 3.4  # slower steps; the save and the evaluation are not step time
    assert stop.votes(10, 5, eval_ahead=True) == [0, 0, 0, 0]  # 1054 + 5 x 3.4 + 20 + 7 = 1098
    assert stop.slowest == {"step": pytest.approx(3.4), "eval": 20.0, "save": 7.0}
    clock.now += 5 * 2  # quick steps again: the slowest one still counts
    assert stop.votes(15, 5, eval_ahead=False) == [0, 0, 0, 0]  # 1064 + 17 + 7 = 1088
    assert stop.votes(15, 5, eval_ahead=True) == [0, 0, 0, 1]  # 1064 + 17 + 20 + 7 = 1108


def test_an_untimed_save_counts_as_long_as_the_setup():
    clock = Clock()
    stop = StopConditions(deadline=1095.0, announce=print, clock=clock)
    clock.now = 1030.0  # a setup of 30 s: it builds the state a save will write
    stop.start(0)
    clock.now = 1050.0  # 5 steps of 4 s
    assert stop.votes(5, 5, eval_ahead=False) == [0, 0, 0, 1]  # 1050 + 5 x 4 + 30 > 1095
    with stop.timed("save"):  # once a save is timed, its own time counts instead
        clock.now += 2
    clock.now += 5 * 4
    assert stop.votes(10, 5, eval_ahead=False) == [0, 0, 0, 0]  # 1072 + 5 x 4 + 2 <= 1095


def test_agreement_from_the_averaged_votes():
    agreed = StopConditions.agreed
    assert agreed([0, 0, 0, 0], 2) == []
    assert agreed([0.5, 0, 0, 0], 2) == ["SIGTERM (received by 1 of 2 processes)"]
    assert agreed([1, 0, 0, 0.5], 2) == ["SIGTERM", "time limit"]
    assert agreed([0, 0.25, 0, 0], 4) == ["SIGUSR1 (received by 1 of 4 processes)"]


def test_time_limit_syntax_and_slurm_end_time(monkeypatch):
    assert preemption.parse_duration("3:55:00") == 14100
    assert preemption.parse_duration("1:30") == 90 and preemption.parse_duration("45") == 45
    for bad in ("1:x", "-5", "1:2:3:4", ""):
        with pytest.raises(SystemExit):
            train.parse_args(["--data-path", "d", "--time-limit", bad])
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert preemption.deadline(None) is None
    assert preemption.deadline(60) == pytest.approx(time.time() + 60, abs=1)
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 30))
    assert preemption.deadline(60) == pytest.approx(time.time() + 30, abs=1)
    assert preemption.deadline(None) == pytest.approx(time.time() + 30, abs=1)


#################################################################################
#              Real signals to train.py: 1 process, and 2 on CPUs                #
#################################################################################


EXP = "000-USM-T-1"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=5, size=8)


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> dict[int, dict]:
    """{processes: final model, EMA and optimizer of a run never interrupted} (run side by side)."""
    results = {n: tmp_path_factory.mktemp(f"straight-{n}") for n in (1, 2)}
    runs = {n: launch(train_argv(images, folder), n) for n, folder in results.items()}
    for process in runs.values():
        finished(process)
    return {n: checkpoint_state(folder / EXP / "checkpoints" / f"step-{STEPS:07d}")
            for n, folder in results.items()}


@pytest.fixture
def scontrol(tmp_path, monkeypatch) -> Path:
    """A fake `scontrol` first on PATH, in a SLURM job 4242: it writes down its arguments."""
    calls = tmp_path / "scontrol-calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return calls


# docs/cluster.md's sbatch script: torchrun passes SIGUSR1 on to the workers, as it does SIGTERM.
SBATCH_ENV = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


@pytest.mark.slow
@pytest.mark.parametrize("processes, sig, to, reason", [
    (1, signal.SIGINT, "all", "SIGINT"),
    (2, signal.SIGUSR1, "all", "SIGUSR1"),  # the launcher too, as SLURM signals a job step
    (2, signal.SIGTERM, "rank 1", "SIGTERM (received by 1 of 2 processes)"),
])
def test_a_signal_stops_every_process_at_one_step_and_the_same_command_resumes_exactly(
        images, straight, tmp_path, scontrol, processes, sig, to, reason):
    argv = train_argv(images, tmp_path, "--requeue")
    exp = tmp_path / EXP
    env = {**SBATCH_ENV, "PATH": os.environ["PATH"], "SLURM_JOB_ID": "4242"}
    run = launch(argv, processes, env)
    wait_for(exp / "log.txt", "(step=0000004)", run)
    ranks = workers(run.pid) if processes > 1 else {0: run.pid}
    targets = [ranks[1]] if to == "rank 1" else [run.pid, *ranks.values()]
    for pid in targets:
        os.kill(pid, sig)
    output = finished(run, rc=None if to == "all" and processes > 1 else 0)  # torchrun: 1

    log = (exp / "log.txt").read_text()
    stopped = re.search(rf"Stopped at step (\d+) of {STEPS} on (.+); saved (.+): run the same "
                        r"command to resume from it\n", log)
    assert stopped, log + output[-3000:]
    step = int(stopped[1])
    assert stopped[2] == reason and step < STEPS and step % 2 == 0  # at a check point
    assert stopped[3] == str(exp / "checkpoints" / f"step-{step:07d}")
    assert checkpoints_of(exp) == [f"step-{step:07d}"]
    meta = verify_checkpoint(exp / "checkpoints" / f"step-{step:07d}")
    assert meta["step"] == step
    assert sorted(name for name in meta["files"] if name.startswith("random_states")) == [
        f"random_states_{rank}.pkl" for rank in range(processes)]  # every process saved there
    # the scheduler's signals requeue the job (once), a person's Ctrl-C does not
    assert (scontrol.read_text() if scontrol.exists() else "") == (
        "" if sig == signal.SIGINT else "requeue 4242\n")

    finished(launch(argv, processes, env))
    log = (exp / "log.txt").read_text()
    assert f"Resumed from {exp / 'checkpoints' / f'step-{step:07d}'} at step {step}" in log
    assert_same_state(exp / "checkpoints" / f"step-{STEPS:07d}", straight[processes])


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(images, tmp_path):
    # checks every 1000 steps: only the second Ctrl-C can end this run soon
    run = launch(train_argv(images, tmp_path, "--max-steps", "100000", "--log-every", "1000"), 1)
    log = tmp_path / EXP / "log.txt"
    wait_for(log, "Training from step 0", run)
    run.send_signal(signal.SIGINT)
    wait_for(log, "SIGINT received: stopping cleanly (Ctrl-C again stops at once)", run)
    run.send_signal(signal.SIGINT)
    output = finished(run, rc=None)
    assert run.returncode != 0 and "KeyboardInterrupt" in output
    assert checkpoints_of(tmp_path / EXP) == [] and "Stopped at step" not in log.read_text()


#################################################################################
#                    The time limit, --requeue, a failed save                    #
#################################################################################


@pytest.mark.slow
def test_the_time_limit_saves_and_stops_before_it_then_requeues(images, tmp_path, scontrol):
    limit = 12
    start = time.monotonic()
    exp = train.main(train.parse_args(train_argv(
        images, tmp_path, "--max-steps", "2000", "--time-limit", f"0:00:{limit}",
        "--requeue")))
    assert time.monotonic() - start < limit
    stopped = re.search(r"Stopped at step (\d+) of 2000 on time limit; saved ",
                        (exp / "log.txt").read_text())
    assert stopped and checkpoints_of(exp) == [f"step-{int(stopped[1]):07d}"]
    verify_checkpoint(exp / "checkpoints" / f"step-{int(stopped[1]):07d}")
    assert scontrol.read_text() == "requeue 4242\n"
    assert "Requeued SLURM job 4242" in (exp / "log.txt").read_text()


def test_requeue_needs_slurm_and_a_finished_run_is_not_requeued(images, tmp_path, scontrol,
                                                                 monkeypatch):
    exp = train.main(train.parse_args(train_argv(images, tmp_path, "--max-steps", "2",
                                                 "--requeue")))
    assert not scontrol.exists() and "Done." in (exp / "log.txt").read_text()
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(SystemExit, match="--requeue requeues a SLURM job, and SLURM_JOB_ID is "
                                         "not set"):
        train.main(train.parse_args(train_argv(images, tmp_path, "--requeue")))


def limit_file_size(limit: int):
    """For Popen's preexec_fn: files larger than `limit` bytes fail to write (EFBIG, as a quota
    would), in the launcher and every process it starts. Python ignores SIGXFSZ already."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_save_failing_on_the_main_process_stops_both_processes_with_its_message(
        images, tmp_path):
    # model.safetensors (about 0.8 MB, the main process's first file) cannot be written; the
    # other process's random_states_1.pkl can
    run = launch(train_argv(images, tmp_path, "--ckpt-every", "2"), 2,
                 preexec_fn=limit_file_size(200_000))
    output = finished(run, rc=1)
    ckpt_dir = tmp_path / EXP / "checkpoints"
    message = (f"error: saving checkpoint step-0000002 into {ckpt_dir} failed: a file could not "
               "be written (Error while serializing: I/O error: File too large (os error 27))")
    assert output.count(message) == 2, output[-3000:]  # each process says it, none waits
    assert checkpoints_of(tmp_path / EXP) == []


#################################################################################
#                                   sample.py                                    #
#################################################################################


@pytest.fixture(scope="module")
def checkpoint(images, tmp_path_factory) -> Path:
    exp = train.main(train.parse_args(train_argv(images, tmp_path_factory.mktemp("ckpt"),
                                                 "--max-steps", "2")))
    return exp / "checkpoints" / "step-0000002"


def sample_argv(ckpt: Path, out: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--sample-dir", str(out), "--num-samples", "20",
            "--batch-size", "2", "--num-sampling-steps", "10"]


@pytest.mark.slow
def test_sample_stops_on_sigterm_after_its_batch_and_the_same_command_completes(checkpoint,
                                                                                tmp_path):
    out = tmp_path / "s"
    run = subprocess.Popen([sys.executable, "sample.py", *sample_argv(checkpoint, out)],
                           cwd=REPO, env=LAUNCH_ENV, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    output = finished(run, rc=1)
    stopped = re.search(r"sample.py: stopped on SIGTERM with (\d+) of the 20 images this "
                        rf"process had to render written in {out}; run the same command", output)
    assert stopped, output[-3000:]
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == [f"{i:06d}.png" for i in range(int(stopped[1]))] and len(written) < 20
    assert len(written) % 2 == 0 and not list(out.glob(".*.tmp"))  # whole batches
    assert not (tmp_path / "s.npz").exists()
    sample.main(sample.parse_args(sample_argv(checkpoint, out)))
    sample.main(sample.parse_args(sample_argv(checkpoint, tmp_path / "straight")))
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"],
                                  np.load(tmp_path / "straight.npz")["arr_0"])
