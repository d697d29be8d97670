"""Stopping a run early and cleanly: on a signal, or before a time limit.

Schedulers warn before they kill: SLURM sends SIGUSR1 ahead of time when asked (`--signal=USR1@120`)
and SIGTERM at the end of a job or on preemption, as Kubernetes and most others do; a person types
Ctrl-C (SIGINT). `StopSignals` turns each into a request that the program reads where it can stop
cleanly; a second Ctrl-C stops at once. `StopConditions` adds the time limit and answers the
training loop's one question: should every process stop here?
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
TIME_LIMIT = "time limit"
REASONS = (*(s.name for s in STOP_SIGNALS), TIME_LIMIT)


def parse_duration(text: str) -> float:
    """'H:MM:SS', 'M:SS' or seconds ('3:55:00' is 14100) -> seconds; an argparse type."""
    try:
        fields = [int(field) for field in text.split(":")]
    except ValueError:
        fields = []
    if not 1 <= len(fields) <= 3 or min(fields) < 0:
        raise argparse.ArgumentTypeError(f"expected H:MM:SS such as 3:55:00, got {text!r}")
    seconds = 0
    for field in fields:
        seconds = 60 * seconds + field
    return float(seconds)


def slurm_end_time() -> float | None:
    """The job's end (seconds since the epoch) that SLURM exports to its jobs, when it does."""
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    return float(end) if end.isdigit() else None


class StopSignals:
    """While entered: SIGTERM, SIGUSR1 and SIGINT are recorded in `received`, for the program to
    stop where it can; a second SIGINT raises KeyboardInterrupt at once. The previous handlers
    come back on exit."""

    def __init__(self, announce=lambda message: print(message, file=sys.stderr)):
        self.received: list[str] = []
        self._announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts whatever runs
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if name not in self.received:
            self.received.append(name)
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            self._announce(f"{name} received: stopping cleanly{again}")


class StopConditions(StopSignals):
    """Signals and a deadline (seconds since the epoch, or None), asked at the training loop's
    check points. Every process votes there (`votes`), the votes are averaged across processes
    in a reduction the loop already makes, and `agreed` reads the averaged votes: any process's
    request stops every process at that same step.

    The deadline is met by stopping at the last check point from which the work up to the next
    one and a save still fit: as many steps as there are to the next check, at the slowest step
    time seen, plus the slowest evaluation when one falls in between, plus the slowest save. Steps
    are timed on the host between check points (which wait for the device), evaluations and saves
    by `timed`. Until a save has been timed, the setup's time (from this object's creation to
    `start`) stands for it: the setup builds or loads the state a save writes, and counting an
    untimed save as free let a run overshoot its limit by the length of its first save."""

    def __init__(self, deadline: float | None, announce=None, clock=time.time):
        super().__init__(*([announce] if announce else []))
        self.deadline, self._clock = deadline, clock
        self.slowest = {"step": 0.0, "eval": 0.0, "save": 0.0}
        self._since, self._set_aside, self._step = clock(), 0.0, None
        self.setup = 0.0  # seconds from creation to start: an untimed save's stand-in

    def start(self, step: int) -> None:
        """The loop starts at `step`: step times count from now."""
        now = self._clock()
        if self._step is None:
            self.setup = now - self._since
        self._since, self._set_aside, self._step = now, 0.0, step

    @contextmanager
    def timed(self, kind: str):
        """Time an evaluation ('eval') or a save ('save'), kept apart from the step times."""
        start = self._clock()
        yield
        took = self._clock() - start
        self.slowest[kind] = max(self.slowest[kind], took)
        self._set_aside += took

    def votes(self, step: int, steps_ahead: int, eval_ahead: bool) -> list[float]:
        """This process's votes at a check point after `step`, one per REASONS entry (1: stop).
        The next check point is `steps_ahead` steps on, with an evaluation before it or not."""
        now = self._clock()
        if step > self._step:
            per_step = (now - self._since - self._set_aside) / (step - self._step)
            self.slowest["step"] = max(self.slowest["step"], per_step)
        self._since, self._set_aside, self._step = now, 0.0, step
        ahead = (steps_ahead * self.slowest["step"] + (self.slowest["save"] or self.setup)
                 + (self.slowest["eval"] if eval_ahead else 0.0))
        late = self.deadline is not None and now + ahead > self.deadline
        return [float(name in self.received) for name in REASONS[:-1]] + [float(late)]

    @staticmethod
    def agreed(mean_votes: list[float], processes: int) -> list[str]:
        """Why the processes stop, from their averaged votes ([]: they go on); a signal seen by
        some processes only says how many."""
        reasons = []
        for name, vote in zip(REASONS, mean_votes, strict=True):
            count = round(vote * processes)
            if count:
                reasons.append(name if count == processes or name == TIME_LIMIT
                               else f"{name} (received by {count} of {processes} processes)")
        return reasons


def deadline(time_limit: float | None) -> float | None:
    """When to be done (seconds since the epoch): `time_limit` seconds from now, or the SLURM
    job's end, whichever comes first; None without either."""
    ends = [time.time() + time_limit] if time_limit is not None else []
    if (end := slurm_end_time()) is not None:
        ends.append(end)
    return min(ends, default=None)
