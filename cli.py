"""Command-line helpers shared by train.py and sample.py."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from selective_scan import BACKENDS, resolve_backend, set_backend
from selective_scan.dispatch import warn_slow_path


def add_option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register --name with dashes and with underscores: the authors' README mixes both."""
    dashed, underscored = "--" + name.replace("_", "-"), "--" + name.replace("-", "_")
    flags = [dashed] if dashed == underscored else [dashed, underscored]
    kwargs.setdefault("dest", name.replace("-", "_"))
    parser.add_argument(*flags, **kwargs)


def add_switch(parser: argparse.ArgumentParser, on: str, off: str, help: str,
               default: bool | None = True) -> None:
    """A boolean option: --<on> sets it (the authors' command line passes it even where it is the
    default), --<off> clears it. default=None lets the caller see whether either was given."""
    dest = on.replace("-", "_")
    add_option(parser, on, action="store_true", default=default, help=help)
    add_option(parser, off, action="store_false", dest=dest, default=default,
               help=f"turn off --{on}")


def fail(message: str) -> SystemExit:
    """Bad input found after parsing, reported as argparse reports its own: "prog: error: ..."."""
    return SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_list(minimum: int, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated integers >= minimum, such as `example`."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(n) for n in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {example}, got {text!r}")
        return values

    return parse


stage_list = int_list(1, "block counts such as 4,4,4")  # USM's encoder blocks per stage


def add_scan_backend(parser: argparse.ArgumentParser) -> None:
    """--scan-backend: which selective scan the models run (see `use_scan_backend`)."""
    add_option(parser, "scan-backend", choices=BACKENDS, default="auto",
               help="auto: mamba_ssm's CUDA kernel when it loads and the run is on a GPU, else "
                    "the PyTorch scan; torch: always the PyTorch scan; mamba_ssm: the kernel or "
                    "refuse to start (`python -m selective_scan` says what loads here)")


def use_scan_backend(backend: str, device: torch.device) -> str:
    """Make `backend` the process-wide scan backend and return the line to log: the backend a run
    on `device` uses, and why. Refuses (SystemExit) where mamba_ssm was asked for and cannot run;
    "auto" on a GPU without the kernel warns once, naming the import error and the fix."""
    set_backend(backend)
    try:
        used, why = resolve_backend(device)
    except RuntimeError as err:
        raise fail(f"--scan-backend {backend}: {err}") from err
    if device.type == "cuda" and used == "torch" and backend == "auto":
        warn_slow_path()
    return f"Selective scan backend: {used} ({why})"
