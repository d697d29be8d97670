"""Sample many images from a train.py checkpoint, e.g. for FID, on one or several processes (the
role of DiT's sample_ddp.py).

    accelerate launch sample.py --model USM-B/1 --batch_size 2 --num-classes 0 \\
      --learn_pos_emb --use_convtranspose --ckpt <ckpt-path> --num_samples 1000 --skip_conn

--ckpt is a checkpoint folder (<experiment>/checkpoints/step-0010000 or best), an experiment folder
(its newest checkpoint that verifies), a .pt file, a diffusers pipeline folder (python -m loader
export), or one on the Hugging Face Hub, hf://<owner>/<repo>[@<revision>][/<file>] (fetched into the
Hub cache; HF_HUB_OFFLINE=1 reads it from there). The model is rebuilt from what the checkpoint
records (meta.json); the model options above may be left out, and when given they must agree with
it. A damaged checkpoint (checksums in meta.json), or a file that holds no checkpoint of these
models, is refused by name before any encoder loads.

Output: <sample-dir>/000000.png, 000001.png, ... and <sample-dir>.npz, whose arr_0 is the uint8
(N, H, W, 3) array the ADM / DiT evaluation suite reads. Grayscale samples are stored there with
their one channel repeated three times, as that suite's Inception network takes RGB (FID is the
same: evaluate_fid.py scores one-channel images that way too); the PNGs keep one channel.

Process i of P renders samples i, i + P, i + 2P, ...; samples already on disk are kept, so a run
started again finishes an interrupted one. SIGTERM, SIGUSR1 or Ctrl-C end the batch under way (a
second Ctrl-C stops at once), then the run, saying how far it got. Sample i's noise comes from a
generator seeded with (--global-seed, i) and its class or caption from i alone, so the images do
not depend on the number of processes or the batch size. DDPM (--respacing without "ddim") adds
fresh noise at every step, drawn per batch, so only its starting noise has that property; dopri5
(--sampler dopri5) chooses one sequence of steps for a whole batch, so its images depend on the
batch within its tolerance. The log gives the number of model evaluations (NFE) per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from checkpoints import CheckpointError, newest_verified
from cli import (
    ENCODER_OPTIONS,
    MODEL_DEFAULTS,
    add_ignored,
    add_model_options,
    add_option,
    add_sampler_options,
    add_scan_backend,
    fail,
    ignored_note,
    int_list,
    positive_int,
    use_scan_backend,
)
from diffusion import create_diffusion
from download import save_png
from encoders import load_text_encoder, load_vae, vae_downsample_factor
from hub import local_checkpoint
from loader import AUTHORS_T_MIN, USM_AUTHORS, build_model, load_checkpoint
from preemption import StopSignals
from sampling import (
    ImageSampler,
    flow_sampler,
    nfe_summary,
    sampler_problem,
    step_checkpoints,
    to_uint8,
)
from sampling import build_model as build_model_from_options

# Options that describe the model (cli.py, shared with train.py). They default to what the
# checkpoint records; for a checkpoint that records nothing (a bare state dict) to train.py's.
MODEL_OPTIONS = tuple(name for name in MODEL_DEFAULTS if name not in ENCODER_OPTIONS)
DDPM_STEPS = "250"  # DiT's FID protocol for Gaussian diffusion


#################################################################################
#                                Command line                                    #
#################################################################################


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    # Checkpoint
    add_option(p, "ckpt", required=True,
               help="checkpoint folder (.../checkpoints/step-XXXXXXX or best), experiment folder "
                    "(its latest checkpoint), .pt file, diffusers pipeline folder, or one on the "
                    "Hugging Face Hub: hf://<owner>/<repo>[@<revision>][/<path>]")
    add_option(p, "weights", choices=["ema", "model"], default="ema",
               help="ema: the EMA weights (a checkpoint without them gives its model weights)")
    # The model and its encoders: default from the checkpoint; given, checked against it (the
    # encoders may be swapped, e.g. the ema and mse SD VAEs).
    add_model_options(p, from_checkpoint=True)
    add_option(p, "has-text", action="store_true",
               help="the authors' flag: the checkpoint must be text-conditional (--captions)")
    add_scan_backend(p)
    # The authors' sample.py accepted these and used none of them.
    for name in ("results-dir", "experiment-dir", "epochs", "num-workers"):
        add_ignored(p, name)
    add_ignored(p, "use-ckpt", takes_value=False)  # gradient checkpointing: training only
    # What to sample
    add_option(p, "num-samples", type=positive_int, default=50_000)
    add_option(p, "batch-size", type=positive_int, default=32, help="per process")
    add_option(p, "global-seed", type=int, default=0, help="non-negative")
    add_option(p, "cfg-scale", type=float, default=1.0,
               help="classifier-free guidance against the null class / empty caption (1 = none)")
    add_option(p, "class-labels", type=int_list(0, "class indices such as 3,5"),
               help="class-conditional: sample i has label i mod len(list) of this list "
                    "(default: every class, balanced)")
    add_option(p, "captions", type=Path,
               help="text-conditional: one caption per non-empty line, sample i uses caption "
                    "i mod (number of captions)")
    add_sampler_options(p)
    add_option(p, "respacing",
               help=f"Gaussian diffusion: e.g. ddim50 (DDIM) or 250 (DDPM, default {DDPM_STEPS})")
    # Output
    add_option(p, "sample-dir",
               help="default: samples/<experiment>-<checkpoint>-<settings>")
    add_option(p, "grid", type=Path, help="also write a grid of samples to this PNG")
    add_option(p, "grid-per-class", type=positive_int, default=8,
               help="grid columns: one row per class of this many samples, or (unconditional, "
                    "text) up to this many rows")
    args = p.parse_args(argv)
    if args.global_seed < 0:  # numpy's SeedSequence, which seeds every sample, takes no negatives
        p.error(f"--global-seed must be non-negative, got {args.global_seed}")
    return args


#################################################################################
#                           Checkpoint -> model                                  #
#################################################################################


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint folder or .pt file; an experiment folder gives its latest step checkpoint; an
    hf:// name the file in the Hugging Face cache (fetched when missing and online)."""
    try:
        path = local_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise fail(f"--ckpt {err}") from err
    if not path.exists():
        raise fail(f"--ckpt {path} not found: give a checkpoint folder written by train.py "
                   "(e.g. results/000-USM-B-1/checkpoints/step-0010000), an experiment folder "
                   "or a .pt file")
    if path.is_dir() and (path / "checkpoints").is_dir():
        steps = step_checkpoints(path)
        if not steps:
            raise fail(f"--ckpt {path}: the experiment has no complete checkpoint yet")
        damaged = []
        if (newest := newest_verified(steps, damaged.append)) is None:
            raise fail(f"--ckpt {path}: every checkpoint is damaged:\n  " + "\n  ".join(damaged))
        for message in damaged:
            print(f"{Path(sys.argv[0]).name}: warning: {message}", file=sys.stderr)
        return newest
    return path


def show(value) -> str:
    """An option's value as it is written on a command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def model_options(args: argparse.Namespace, meta: dict) -> argparse.Namespace:
    """The options the checkpoint was trained with, as train.py's args; those given on this
    command line must agree with the ones it records."""
    recorded = dict(meta.get("args", {}))
    # model_kwargs are what built the model: they win over args where the names are shared.
    recorded.update({k: v for k, v in meta.get("model_kwargs", {}).items() if k in MODEL_OPTIONS})
    if "model" in meta:
        recorded["model"] = meta["model"]
    if recorded.get("vae") == "none" and "in_channels" in meta.get("model_kwargs", {}):
        recorded["channels"] = meta["model_kwargs"]["in_channels"]  # pixel space: image channels
    options, mismatches = {**MODEL_DEFAULTS, **recorded, "use_ckpt": False}, []
    for name in MODEL_DEFAULTS:
        given = getattr(args, name)
        if given is None:
            continue
        # JSON turned tuples into lists; None means "the default" (e.g. stages), not a value.
        if (name in MODEL_OPTIONS and recorded.get(name) is not None
                and json.loads(json.dumps(given)) != recorded[name]):
            mismatches.append(f"--{name.replace('_', '-')}: {show(given)} here, "
                              f"{show(recorded[name])} in the checkpoint")
        options[name] = given
    if mismatches:
        raise fail(f"options that disagree with the checkpoint {args.ckpt}: "
                   + "; ".join(mismatches) + ". Leave them out to use the checkpoint's.")
    return argparse.Namespace(**options)


def load_encoders(options: argparse.Namespace, text: bool, device: torch.device) -> tuple:
    """(VAE or None for pixel space, CLIP text encoder or None)."""
    try:
        vae = load_vae(options.vae, device)
        text_encoder = load_text_encoder(options.text_encoder, device) if text else None
    except OSError as err:  # what the hub raises offline or for a folder that is not a model
        raise fail(f"{err}\n(`python download.py vae` / `python download.py clip` fetch the "
                   "default encoders into the Hugging Face cache)") from err
    return vae, text_encoder


def create_model(options: argparse.Namespace, meta: dict, vae, text_encoder) -> nn.Module:
    """The checkpoint's model, from its recorded constructor kwargs, else from the options."""
    if "model_kwargs" in meta:  # gradient checkpointing only saves memory when training
        model = build_model(meta["model"], {**meta["model_kwargs"], "use_checkpoint": False})
    else:
        in_channels = vae.config.latent_channels if vae is not None else options.channels or 3
        input_size = options.image_size // vae_downsample_factor(vae)
        context_dim = text_encoder.hidden_size if text_encoder is not None else None
        try:
            model, _ = build_model_from_options(options, in_channels, input_size, context_dim)
        except ValueError as err:
            raise fail(str(err)) from err
    # A swapped encoder must still fit the model.
    if vae is not None and vae.config.latent_channels != model.in_channels:
        raise fail(f"--vae {options.vae} gives {vae.config.latent_channels}-channel latents, the "
                   f"model takes {model.in_channels} channels")
    if vae is None and model.in_channels not in (1, 3):
        raise fail(f"the model takes {model.in_channels}-channel VAE latents: pass --vae")
    context_dim = meta.get("model_kwargs", {}).get("context_dim")
    if text_encoder is not None and context_dim not in (None, text_encoder.hidden_size):
        raise fail(f"--text-encoder {options.text_encoder} gives {text_encoder.hidden_size}-d "
                   f"states, the model takes {context_dim}-d")
    return model


def weight_problems(state_dict: dict, expected: dict, shapes: bool = True) -> list[str]:
    """Every key, and with `shapes` every shape, in which a state dict differs from a model's."""
    problems = [f"missing {k}" for k in sorted(expected.keys() - state_dict.keys())]
    problems += [f"unexpected {k}" for k in sorted(state_dict.keys() - expected.keys())]
    problems += [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
                 for k in sorted(expected.keys() & state_dict.keys())
                 if shapes and state_dict[k].shape != expected[k].shape]
    return problems


def refuse_other_model(problems: list[str], ckpt: Path, name: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise fail(f"{ckpt} holds weights of another model than the {name} this command builds "
                   f"({len(problems)} difference{'s' if len(problems) > 1 else ''}):\n  {shown}")


def check_weights_early(state_dict: dict, options: argparse.Namespace, meta: dict, text: bool,
                        ckpt: Path) -> None:
    """Refuse weights of another model before any encoder loads. The model is built on PyTorch's
    meta device (no memory). Without recorded kwargs, its channels, input size and text width come
    from the encoders; stand-ins take their place, and as they change shapes but not names, only
    the names are compared then."""
    with torch.device("meta"):
        if "model_kwargs" in meta:
            model, exact = build_model(meta["model"], meta["model_kwargs"]), True
        else:
            try:
                model, _ = build_model_from_options(options, options.channels or 3,
                                                    options.image_size, 64 if text else None)
            except ValueError:  # the size is checked, and named, once the VAE is known
                return
            exact = options.vae == "none" and not text
    refuse_other_model(weight_problems(state_dict, model.state_dict(), shapes=exact), ckpt,
                       options.model)


def load_weights(model: nn.Module, name: str, ckpt: Path, state_dict: dict) -> nn.Module:
    """Load the weights into the model, naming every key or shape that does not fit."""
    refuse_other_model(weight_problems(state_dict, model.state_dict()), ckpt, name)
    model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False)


def create_sampler(args: argparse.Namespace, objective: str, source: str) -> tuple[object, str]:
    """(sampler, short name for the folder name) from the flags of the checkpoint's objective.
    The USM authors' checkpoints are sampled on their own time grid
    (docs/upstream.md#time-convention)."""
    if problem := sampler_problem(args, objective):
        raise fail(problem + (" (--respacing, e.g. ddim50 or 250)" if objective != "rf" else ""))
    if objective == "rf":
        if args.respacing:
            raise fail("--respacing is for Gaussian diffusion; this checkpoint is rectified flow "
                       "(--sampler, --num-sampling-steps, --atol, --rtol)")
        return flow_sampler(args, AUTHORS_T_MIN if source == USM_AUTHORS else 0.0)
    respacing = args.respacing or DDPM_STEPS
    try:  # learned sigma, linear schedule: how train.py trains it
        diffusion = create_diffusion(respacing)
    except ValueError as err:
        raise fail(f"--respacing {respacing}: {err}") from err
    return diffusion, respacing if respacing.startswith("ddim") else f"ddpm{respacing}"


#################################################################################
#                          Conditions, noise, sharding                           #
#################################################################################


def read_captions(path: Path) -> list[str]:
    try:
        captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as err:
        raise fail(f"--captions {path}: {err}") from err
    if not captions:
        raise fail(f"--captions {path} has no captions")
    return captions


def check_conditions(args: argparse.Namespace, num_classes: int, text: bool) -> list[int]:
    """The labels samples cycle through ([] unless class-conditional), after checking that the
    conditioning flags fit the model."""
    if args.class_labels and not num_classes:
        raise fail("--class-labels needs a class-conditional checkpoint (this one has no classes)")
    if bool(args.captions) != text:
        raise fail("a text-conditional checkpoint needs --captions FILE" if text else
                   "--captions needs a text-conditional checkpoint")
    if args.cfg_scale != 1 and not (num_classes or text):
        raise fail("--cfg-scale needs a class- or text-conditional checkpoint")
    labels = list(args.class_labels or range(num_classes))
    if labels and max(labels) >= num_classes:
        raise fail(f"--class-labels {max(labels)} is not a class of this checkpoint "
                   f"(0..{num_classes - 1})")
    if args.grid and labels and args.num_samples < len(labels) * args.grid_per_class:
        raise fail(f"a grid of {args.grid_per_class} samples per class needs --num-samples >= "
                   f"{len(labels) * args.grid_per_class}")
    return labels


def batch_conditions(indices: list[int], labels: list[int], captions: list[str] | None
                     ) -> torch.Tensor | list[str] | None:
    """Labels / captions of these samples: sample i's depend on i alone (balanced cycles)."""
    if labels:
        return torch.tensor([labels[i % len(labels)] for i in indices])
    if captions:
        return [captions[i % len(captions)] for i in indices]
    return None


def sample_seed(global_seed: int, index: int) -> int:
    """Seed of sample `index`: SeedSequence hashes (global_seed, index) into well-mixed 64 bits,
    so nearby indices and seeds give unrelated noise and 64 bits make collisions negligible."""
    sequence = np.random.SeedSequence(global_seed, spawn_key=(index,))
    return int(sequence.generate_state(1, np.uint64)[0])


def sample_noise(indices: list[int], shape: tuple[int, ...], global_seed: int) -> torch.Tensor:
    """(len(indices), *shape) standard normal noise, each sample's from its own CPU generator: the
    same values whichever batch, process or device draws it."""
    generators = [torch.Generator().manual_seed(sample_seed(global_seed, i)) for i in indices]
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def shard_indices(num_samples: int, process_index: int, num_processes: int) -> range:
    """Process i of P renders i, i + P, ...: every index exactly once over the processes."""
    return range(process_index, num_samples, num_processes)


#################################################################################
#                                   Output                                       #
#################################################################################


def png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def default_sample_dir(ckpt: Path, options: argparse.Namespace, args: argparse.Namespace,
                       sampler_name: str) -> Path:
    """samples/<experiment>-<checkpoint>-<settings>: every setting that changes the images (as
    DiT's folder names), so a later run with other settings never resumes into this folder."""
    source = (f"{ckpt.parent.parent.name}-{ckpt.name}" if ckpt.parent.name == "checkpoints"
              else ckpt.stem)
    name = (f"{source}-{args.weights}-size-{options.image_size}-vae-{Path(options.vae).name}-"
            f"{sampler_name}-cfg-{args.cfg_scale}-seed-{args.global_seed}")
    if args.class_labels:
        name += "-classes-" + "-".join(map(str, args.class_labels))
    if args.captions:
        name += f"-captions-{args.captions.stem}"
    return Path("samples") / name


def prepare_folder(folder: Path, grid: Path | None, settings: dict) -> None:
    """Create the output folders, prove they are writable, and refuse to resume into a folder of
    samples made with other settings (kept PNGs would be mixed with new ones)."""
    for target in [folder, *([grid.parent] if grid else [])]:
        try:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise fail(f"cannot write to {target}: {err}") from err
    record = folder / "sample_settings.json"
    if record.exists():
        previous = json.loads(record.read_text())
        changed = [f"{k}: {previous.get(k)} -> {v}" for k, v in settings.items()
                   if previous.get(k) != v]
        if changed:
            raise fail(f"{folder} holds samples made with other settings ({'; '.join(changed)}); "
                       "choose another --sample-dir")
    else:  # the same content from every process; the rename keeps the file whole
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, record)


def is_complete(path: Path, size: tuple[int, int], mode: str) -> bool:
    """An existing sample to keep: a readable PNG of the expected size and mode."""
    try:
        with Image.open(path) as image:
            if image.size != size or image.mode != mode:
                return False
            image.verify()  # checks every chunk's CRC: catches a damaged file
        return True
    except (OSError, SyntaxError):  # PIL reports broken PNGs as either
        return False


def save_samples(images: torch.Tensor, indices: list[int], folder: Path) -> None:
    """(B, 1 or 3, H, W) images in [-1, 1] -> PNGs; grayscale stays one channel."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    for index, image in zip(indices, pixels, strict=True):
        save_png(image.squeeze(-1) if image.shape[-1] == 1 else image, png_path(folder, index))


def write_npz(folder: Path, num_samples: int) -> Path:
    """<folder>.npz with arr_0 = uint8 (N, H, W, 3) of samples 0..N-1, written atomically."""
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    images = np.empty((num_samples, *first.shape), np.uint8)
    for i in tqdm(range(num_samples), desc="npz", unit="img"):
        images[i] = np.asarray(Image.open(png_path(folder, i)).convert("RGB"))
    path = folder.with_name(f"{folder.name}.npz")  # not with_suffix: names hold "cfg-1.5"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=images)
    os.replace(tmp, path)
    return path


def save_grid(folder: Path, path: Path, num_samples: int, labels: list[int], columns: int) -> None:
    """A grid of samples already on disk: one row per label (sample i has label
    labels[i mod L], so row r holds r, r + L, r + 2L, ...), else the first samples."""
    if labels:
        indices = [row + len(labels) * k for row in range(len(labels)) for k in range(columns)]
    else:
        indices = list(range(min(num_samples, columns * columns)))
    images = [pil_to_tensor(Image.open(png_path(folder, i))) for i in indices]
    grid = make_grid(torch.stack(images), nrow=columns)  # 2 px padding, as train.py's grids
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


#################################################################################
#                                  Sampling                                      #
#################################################################################


def main(args: argparse.Namespace) -> Path:
    """Sample as configured; returns the sample folder."""
    # Everything that can be refused is checked before any model is loaded.
    scan_backend = use_scan_backend(args.scan_backend, PartialState().device)
    ckpt = resolve_checkpoint(args.ckpt)
    try:  # ours, the USM authors' or CompVis', converted to our names and checksum-verified
        meta, state_dict = load_checkpoint(ckpt, args.weights)
    except CheckpointError as err:
        raise fail(f"--ckpt: {err}") from err
    except KeyError as err:
        raise fail(f"{err.args[0]}; use --weights ema") from err
    options = model_options(args, meta)
    text = (meta["model_kwargs"].get("context_dim") is not None if "model_kwargs" in meta
            else args.captions is not None)  # a bare state dict: the flags say what it is
    if args.has_text and not text:
        raise fail(f"--has_text, but {ckpt} is not text-conditional")
    check_weights_early(state_dict, options, meta, text, ckpt)
    labels = check_conditions(args, options.num_classes, text)
    captions = read_captions(args.captions) if args.captions else None
    sampler, sampler_name = create_sampler(args, options.objective, meta.get("source", ""))
    folder = Path(args.sample_dir or default_sample_dir(ckpt, options, args, sampler_name))
    settings = dict(checkpoint=str(ckpt.resolve()), step=meta.get("step"), weights=args.weights,
                    vae=options.vae, sampler=sampler_name, cfg_scale=args.cfg_scale,
                    global_seed=args.global_seed, labels=labels,
                    captions=hashlib.sha1("\n".join(captions).encode()).hexdigest()
                    if captions else None)
    prepare_folder(folder, args.grid, settings)

    state = Accelerator()  # reads accelerate launch's settings (processes, CPU, device)
    state.print(scan_backend)
    if note := ignored_note(args):
        state.print(note)
    # Only DDPM's per-step noise draws from the global RNG; seeded per process as DiT does.
    torch.manual_seed(args.global_seed * state.num_processes + state.process_index)
    vae, text_encoder = load_encoders(options, text, state.device)
    model = create_model(options, meta, vae, text_encoder)
    model = load_weights(model, options.model, ckpt, state_dict).to(state.device)
    in_channels, (input_size, _) = model.in_channels, model.input_size  # train.py's are square
    generate = ImageSampler(model, sampler, vae, text_encoder, in_channels, input_size,
                            args.cfg_scale)

    # This process's samples that are not on disk yet, judged by the size and mode they must have.
    side = input_size * vae_downsample_factor(vae)
    mode = "L" if vae is None and in_channels == 1 else "RGB"
    todo = [i for i in shard_indices(args.num_samples, state.process_index, state.num_processes)
            if not is_complete(png_path(folder, i), (side, side), mode)]
    state.print(f"Sampling {args.num_samples} images into {folder} with {state.num_processes} "
                f"process(es); this one renders {len(todo)} still missing")
    progress = tqdm(total=len(todo), unit="img", disable=not state.is_main_process)
    with StopSignals() as signals:  # SIGTERM & co. end the batch under way, then the run
        for start in range(0, len(todo), args.batch_size):
            indices = todo[start:start + args.batch_size]
            z = sample_noise(indices, generate.shape, args.global_seed).to(state.device)
            images = generate.from_noise(z, batch_conditions(indices, labels, captions))
            save_samples(images, indices, folder)
            progress.update(len(indices))
            if signals.received:  # a failure to the launcher, which stops the other processes
                raise SystemExit(f"sample.py: stopped on {signals.received[0]} with "
                                 f"{start + len(indices)} of the {len(todo)} images this process "
                                 f"had to render written in {folder}; run the same command to "
                                 "finish")
    progress.close()
    if generate.nfe:  # what a sampler costs, adaptive ones (dopri5) above all
        state.print(f"Sampler {sampler_name}, this process: {nfe_summary(generate.nfe)}")

    state.wait_for_everyone()  # every shard is on disk
    if state.is_main_process:
        state.print(f"Wrote {write_npz(folder, args.num_samples)}")
        if args.grid:
            save_grid(folder, args.grid, args.num_samples, labels, args.grid_per_class)
            state.print(f"Wrote {args.grid}")
    state.wait_for_everyone()
    return folder


if __name__ == "__main__":
    main(parse_args())
