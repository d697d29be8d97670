"""Command-line helpers shared by train.py and sample.py."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from diffusion.rectified_flow import DOPRI5_ATOL, DOPRI5_RTOL, SAMPLERS
from models import All_models
from sampling import SAMPLE_STEPS
from selective_scan import BACKENDS, resolve_backend, set_backend
from selective_scan.dispatch import warn_cpu_fallback, warn_slow_path


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


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """An argparse type for floats > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
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


#################################################################################
#                Options train.py and sample.py share (defined once)             #
#################################################################################

# What describes a model and its encoders, with train.py's defaults. sample.py takes the same
# options with no default, meaning "as the checkpoint records", and checks the ones given.
MODEL_DEFAULTS = dict(model="USM-B/1", image_size=256, num_classes=0, channels=None, vae="ema",
                      text_encoder="openai/clip-vit-large-patch14", learn_pos_emb=False,
                      skip_conn=True, use_convtranspose=True, skip_gate=False, stages=None,
                      objective="rf")
ENCODER_OPTIONS = ("vae", "text_encoder")  # may be swapped at sampling (e.g. the ema / mse VAEs)


def add_model_options(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """The model and encoder options, with MODEL_DEFAULTS or (from_checkpoint) None."""
    default = dict.fromkeys(MODEL_DEFAULTS) if from_checkpoint else MODEL_DEFAULTS
    add_option(parser, "model", choices=list(All_models), default=default["model"],
               metavar="MODEL", help=f"one of: {', '.join(All_models)}")
    add_option(parser, "image-size", type=positive_int, default=default["image_size"])
    add_option(parser, "num-classes", type=int, default=default["num_classes"],
               help="class-conditional when > 0 (the class folders' count); 0 = unconditional")
    add_option(parser, "channels", type=int, choices=[1, 3],
               help="pixel space only: 1 = grayscale, 3 = RGB (default: as the data)")
    add_option(parser, "vae", default=default["vae"],
               help="ema | mse (Stable Diffusion VAEs) | an AutoencoderKL folder | none (pixels)")
    add_option(parser, "text-encoder", default=default["text_encoder"],
               help="CLIP text model (hub id or folder) for COCO captions")
    add_option(parser, "learn-pos-emb", action="store_true", default=default["learn_pos_emb"],
               help="learnable positional embedding (starts at zeros); else the fixed sin-cos")
    add_switch(parser, "skip-conn", "no-skip-conn", "USM skip connections (default on)",
               default=default["skip_conn"])
    add_switch(parser, "use-convtranspose", "no-convtranspose",
               "USM up-sampling by ConvTranspose2d (default on; off: nearest + 3x3 conv, ours: "
               "the authors' PixelShuffle alternative crashes in their code)",
               default=default["use_convtranspose"])
    add_option(parser, "skip-gate", action="store_true", default=default["skip_gate"],
               help="USM blocks without SS2D's SiLU(z) gate (the authors' --skip_gate)")
    add_option(parser, "stages", type=stage_list, help="USM encoder blocks per stage, e.g. 4,4,4")
    add_option(parser, "objective", choices=["rf", "gaussian"], default=default["objective"],
               help="rf: rectified flow (the paper's); gaussian: DiT's diffusion, learned sigma")


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """Rectified flow's sampler, with no defaults here: sampling.sampler_problem checks them
    against the model's objective and sampling.flow_sampler fills in the defaults."""
    add_option(parser, "sampler", choices=SAMPLERS,
               help="rectified flow: ODE solver (default euler, the USM paper's; dopri5: "
                    "torchdiffeq's adaptive solver, CompVis' for ZigMa)")
    add_option(parser, "num-sampling-steps", type=positive_int,
               help=f"euler / heun: ODE steps (default {SAMPLE_STEPS}, the paper's)")
    add_option(parser, "atol", type=positive_float,
               help=f"dopri5's absolute tolerance (default {DOPRI5_ATOL:g}, CompVis')")
    add_option(parser, "rtol", type=positive_float,
               help=f"dopri5's relative tolerance (default {DOPRI5_RTOL:g}, CompVis')")


class _Ignored(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.ignored = [*namespace.ignored, option_string]


def add_ignored(parser: argparse.ArgumentParser, name: str, takes_value: bool = True) -> None:
    """Accept a flag the authors' script accepted without using it; args.ignored lists the ones
    given, for the script to say so in one log line."""
    add_option(parser, name, action=_Ignored, nargs=None if takes_value else 0, dest="ignored",
               default=[], help=argparse.SUPPRESS)


def ignored_note(args: argparse.Namespace) -> str | None:
    """The log line for flags accepted and ignored, or None."""
    if not args.ignored:
        return None
    return (f"Ignoring {', '.join(dict.fromkeys(args.ignored))}: accepted for the authors' "
            "command lines, where it had no effect either")
def add_scan_backend(parser: argparse.ArgumentParser) -> None:
    """--scan-backend: which selective scan the models run (see `use_scan_backend`)."""
    add_option(parser, "scan-backend", choices=BACKENDS, default="auto",
               help="auto: on a GPU mamba_ssm's CUDA kernel when it loads, else the Triton scan "
                    "(checked against the PyTorch scan at first use), on the CPU the C++ scan "
                    "when it builds (on first use), else the PyTorch scan; torch: always the "
                    "PyTorch scan; cpu, mamba_ssm, triton: that fused scan or refuse to start "
                    "(`python -m selective_scan` says what loads here)")


def use_scan_backend(backend: str, device: torch.device) -> str:
    """Make `backend` the process-wide scan backend and return the line to log: the backend a run
    on `device` uses, and why. Refuses (SystemExit) where mamba_ssm, triton or cpu was asked for
    and cannot run; "auto" without the device's fused scan warns once, naming the error and the
    fix."""
    try:
        used, why = resolve_backend(device, backend)
    except RuntimeError as err:  # refused: the process-wide setting stays as it was
        raise fail(f"--scan-backend {backend}: {err}") from err
    set_backend(backend)
    if used == "torch" and backend == "auto":
        if device.type == "cuda":
            warn_slow_path()
        elif device.type == "cpu":
            warn_cpu_fallback()
    return f"Selective scan backend: {used} ({why})"
