"""Train USM (or the Zigma baseline) with accelerate, on class-labelled image folders, unlabelled
image folders or COCO captions, in the VAE's latent space or in pixel space.

    accelerate launch train.py --model USM-B/1 --data-path data/afhq --batch_size 8 \\
      --num-classes 0 --results_dir results --learn_pos_emb --sample-every 20000 \\
      --ckpt-every 10000 --use_ckpt --sampling log --use_convtranspose --skip_conn

Every option is accepted with dashes and with underscores (--batch-size / --batch_size). Each run
writes <results_dir>/<NNN>-<model>/ with log.txt, samples/step-XXXXXXX.png, tensorboard/ and
checkpoints/step-XXXXXXX/ (accelerate's save_state + meta.json; docs/cluster.md#checkpoints). A run
started again with the same --results-dir and --model resumes the newest experiment from its latest
checkpoint that verifies against its checksums, exactly where it stopped (same data order and
random draws).

Several processes on CPUs (gloo): accelerate 1.15's `--cpu` launcher starts one process unless
mpirun is set up, so use its torchrun launcher with the CPU forced:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py ...

Unreadable image files stop the run naming the file (--on-corrupt fail, the default), or with
--on-corrupt skip every file is decoded once before training and the bad ones are left out, each
named in log.txt and counted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    broadcast_object_list,
    gather_object,
    is_tensorboard_available,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.utils import save_image
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from checkpoints import (
    CheckpointError,
    abandon_save,
    is_write_error,
    newest_verified,
    prune,
    read_meta,
    verify_checkpoint,
    write_meta,
)
from cli import (
    add_ignored,
    add_model_options,
    add_option,
    add_sampler_options,
    add_scan_backend,
    fail,
    ignored_note,
    int_at_least,
    positive_int,
    use_scan_backend,
)
from data import (
    CorruptImageError,
    DataError,
    build_dataset,
    cache_latents,
    collate,
    drop_labels,
    is_coco,
    latent_cache_path,
    pick_captions,
    random_flip,
    random_view,
)
from diffusion import RectifiedFlow, create_diffusion
from encoders import (
    encode_images,
    load_text_encoder,
    load_vae,
    vae_downsample_factor,
)
from evaluate_fid import RESIZES, compute_statistics, frechet_distance, load_inception
from preemption import StopConditions, deadline, parse_duration
from sampling import (
    CHECKPOINT_RE,
    SAMPLE_STEPS,
    ImageSampler,
    build_model,
    flow_sampler,
    nfe_summary,
    sampler_problem,
    step_checkpoints,
    to_uint8,
)

GRID_COLUMNS = 8
GRID_ROWS = 2  # unconditional and text grids; class-conditional grids have one row per class
MAX_GRID_CLASSES = 16

logger = logging.getLogger("train")


#################################################################################
#                                Command line                                    #
#################################################################################


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    # Data
    add_option(p, "data-path", required=True,
               help="folder with train/ and val/ or test/ (ImageFolder), or COCO captions with "
                    "annotations/ (docs/training.md#data)")
    add_option(p, "has-text", action="store_true",
               help="text-conditional (the authors' flag): --data-path must be COCO captions, "
                    "which are text-conditional with or without it")
    add_option(p, "cache-latents", action="store_true",
               help="encode the train set (and its mirror images) once and train from the cache")
    add_option(p, "on-corrupt", choices=["fail", "skip"], default="fail",
               help="fail: stop at the first unreadable image, naming it; skip: decode every file "
                    "before training and leave out the unreadable ones (listed in log.txt)")
    add_option(p, "num-workers", type=int, default=4)
    # Model (shared with sample.py)
    add_model_options(p)
    add_option(p, "use-ckpt", action="store_true", help="gradient checkpointing (saves memory)")
    add_scan_backend(p)
    # Objective
    add_option(p, "sampling", choices=["log", "uniform"], default="log",
               help="rectified-flow training times: logit-normal or uniform in [0, 1]")
    add_option(p, "cond-drop-prob", type=float, default=0.1,
               help="probability of the null class / empty caption (for guidance)")
    # Optimisation
    add_option(p, "batch-size", type=positive_int, default=8, help="per process")
    add_option(p, "lr", type=float, default=1e-4)
    add_option(p, "warmup-steps", type=int_at_least(0), default=0,
               help="linear learning-rate warm-up from 0 over this many steps (default 0: none, "
                    "as the authors trained)")
    add_option(p, "lr-schedule", choices=["constant", "cosine"], default="constant",
               help="constant (the authors'), or cosine decay to 0 at the last step")
    add_option(p, "weight-decay", type=float, default=0.0)
    add_option(p, "ema-decay", type=float, default=0.9999)
    add_option(p, "grad-clip", type=float, default=0.0,
               help="max gradient norm, clipped before the step; 0 (default): no clipping, as "
                    "the authors trained")
    add_option(p, "mixed-precision", choices=["no", "fp16", "bf16"],
               help="default: accelerate's config / launch flag")
    add_option(p, "max-steps", type=positive_int, default=400_000)
    add_option(p, "epochs", type=positive_int, help="stop after this many epochs (or --max-steps)")
    add_option(p, "global-seed", type=int, default=0)
    # Output
    add_option(p, "results-dir", default="results")
    add_option(p, "resume", default="auto",
               help="auto: the newest experiment of this model in --results-dir, if it has a "
                    "checkpoint; none: a new experiment; or an experiment / checkpoint folder")
    add_option(p, "ckpt-every", type=positive_int, default=10_000)
    add_option(p, "keep-last", type=positive_int, default=3,
               help="step checkpoints kept (best/ apart)")
    add_option(p, "sample-every", type=positive_int, default=20_000,
               help="grid of EMA samples every N steps, and FID on the val split (when there is "
                    "one) with a best/ checkpoint when it improves, as the authors' script did")
    add_option(p, "cfg-scale", type=float, default=1.0,
               help="guidance for sample grids and FID (1 = none)")
    add_sampler_options(p)  # for sample grids and FID
    add_option(p, "fid-every", type=int,
               help="FID every N steps instead (default: --sample-every); 0 disables FID")
    add_option(p, "fid-images", type=positive_int, default=1000,
               help="reference images (and as many samples) for FID: the whole split if it has "
                    "no more, else a fixed random subset")
    add_option(p, "fid-reference", choices=["val", "train"], default="val",
               help="the split FID compares with: val (the USM authors') or train (CompVis')")
    add_option(p, "fid-resize", choices=list(RESIZES), default="tf1",
               help="to Inception's 299 px: tf1 (torchmetrics <= 1.7) or antialias (>= 1.8); "
                    "evaluate_fid.py --resize")
    add_option(p, "samples", type=positive_int,
               help="the authors' FID size: this many batches of --batch-size reference images "
                    "per process (overrides --fid-images)")
    add_option(p, "inception", help="FID Inception TorchScript file (default: the packaged one)")
    add_option(p, "log-every", type=positive_int, default=100,
               help="loss logged, and the processes agree whether to stop, every N steps")
    # Clusters
    add_option(p, "time-limit", type=parse_duration,
               help="H:MM:SS (e.g. 3:55:00) from the start: save and stop before it, leaving room "
                    "for the slowest steps and save seen; under SLURM the job's end counts too")
    add_option(p, "requeue", action="store_true",
               help="SLURM: after a stop on SIGTERM, SIGUSR1 or the time limit, run `scontrol "
                    "requeue $SLURM_JOB_ID` so the job resumes by itself")
    add_option(p, "report-to", choices=["tensorboard", "none"], default="tensorboard")
    add_ignored(p, "experiment-dir")  # the authors' train.py never read it
    args = p.parse_args(argv)
    if problem := sampler_problem(args, args.objective):
        p.error(problem)
    return args


#################################################################################
#                           Experiment folders, checkpoints                      #
#################################################################################


def find_resume(args: argparse.Namespace, warn) -> tuple[Path, Path] | None:
    """(experiment folder, checkpoint) to resume, verified against its checksums; None for a new
    experiment. Damaged checkpoints are skipped (each named through `warn`) for the newest one that
    verifies; a checkpoint named with --resume must verify itself."""
    results, name = Path(args.results_dir), args.model.replace("/", "-")
    if args.resume == "none":
        return None
    if args.resume != "auto":
        path = Path(args.resume)
        if CHECKPOINT_RE.fullmatch(path.name):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                raise fail(f"--resume {path}: {err}. Resume from another checkpoint, or pass "
                           "--resume none to start a new experiment") from err
            return path.parent.parent, path
        candidates = [path]
    else:
        pattern = re.compile(rf"(\d+)-{re.escape(name)}")
        numbered = sorted((int(m[1]), p) for p in results.glob("*")
                          if (m := pattern.fullmatch(p.name)))
        candidates = [p for _, p in numbered]
    for exp_dir in reversed(candidates):  # the newest experiment that has checkpoints
        if found := step_checkpoints(exp_dir):
            damaged = []
            if (verified := newest_verified(found, damaged.append)) is None:
                raise fail(f"every checkpoint of {exp_dir} is damaged:\n  " + "\n  ".join(damaged)
                           + "\nPass --resume none to start a new experiment")
            for message in damaged:
                warn(message)
            return exp_dir, verified
    if args.resume != "auto":
        raise fail(f"--resume {args.resume}: no complete checkpoint there")
    return None


def new_experiment(args: argparse.Namespace) -> Path:
    """<results_dir>/<NNN>-<model>, NNN one more than any experiment there."""
    results, name = Path(args.results_dir), args.model.replace("/", "-")
    taken = [int(m[1]) for p in results.glob("*") if (m := re.match(r"(\d+)-", p.name))]
    exp_dir = results / f"{max(taken, default=-1) + 1:03d}-{name}"
    exp_dir.mkdir(parents=True)
    return exp_dir


def save_checkpoint(accelerator: Accelerator, folder: Path, meta: dict) -> None:
    """accelerate's save_state into a hidden sibling, checksums into meta.json, then a rename: a
    crash mid-write leaves a .tmp-* folder that resuming ignores, never a broken checkpoint under
    the real name. A disk error (no space, read-only, quota) on any process removes the partial
    folder and stops every process with one line saying what failed and what is left."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    main = accelerator.is_main_process
    phases = (lambda: main and tmp.exists() and shutil.rmtree(tmp),
              lambda: accelerator.save_state(str(tmp)),  # every process writes its RNG state
              lambda: main and publish_checkpoint(tmp, folder, meta))
    for phase in phases:  # the processes agree after each, where a barrier would stand
        error = None
        try:
            phase()
        except Exception as err:
            if not is_write_error(err):
                raise
            error = err
        stop_if_any_failed(accelerator, error, tmp, folder)


def publish_checkpoint(tmp: Path, folder: Path, meta: dict) -> None:
    """meta.json (last: it lists the other files' checksums), then the rename into place."""
    write_meta(tmp, meta)
    if folder.exists():  # best/ is replaced in place
        old = folder.with_name(f".old-{folder.name}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def stop_if_any_failed(accelerator: Accelerator, error: BaseException | None, partial: Path,
                       folder: Path) -> None:
    """Every process says whether its part of a save failed (one small all-gather, in place of a
    barrier); if any did, all of them stop with the main process's one line, so none is left
    waiting in a collective for a process that has stopped."""
    if error is not None and not isinstance(error, OSError):  # pickled to the other processes
        error = RuntimeError(str(error))
    failed = [err for err in gather_object([error]) if err is not None]
    if not failed:
        return
    message = None
    if accelerator.is_main_process:
        last = newest_verified(step_checkpoints(folder.parent.parent), logger.warning)
        message = abandon_save(failed[0], partial, last)
    raise fail(broadcast_object_list([message])[0])


def checkpoint_meta(args: argparse.Namespace, model_kwargs: dict, step: int, **extra) -> dict:
    """meta.json's content (save_checkpoint adds the checksums)."""
    return {"model": args.model, "step": step, "args": vars(args), "model_kwargs": model_kwargs,
            **extra}


def prune_checkpoints(exp_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints, and always the newest one that verifies."""
    prune(step_checkpoints(exp_dir), keep, logger.warning)


def setup_logging(exp_dir: Path, is_main: bool) -> None:
    """Main process: console and <exp>/log.txt. Other processes: errors only."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    if is_main:
        formatter = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(), logging.FileHandler(exp_dir / "log.txt")):
            handler.setFormatter(formatter)
            logger.addHandler(handler)


#################################################################################
#                                   Helpers                                      #
#################################################################################


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for every parameter, in two multi-tensor kernels
    (a loop of per-parameter ops launches hundreds of small kernels per step on a GPU)."""
    ema_params, model_params = dict(ema.named_parameters()), dict(model.named_parameters())
    ema_list = [ema_params[name] for name in model_params]
    torch._foreach_mul_(ema_list, decay)
    torch._foreach_add_(ema_list, [p.detach() for p in model_params.values()], alpha=1 - decay)


def learning_rate(step: int, max_steps: int, args: argparse.Namespace) -> float:
    """The learning rate of optimizer step `step` (1-based): --lr, ramped up linearly over
    --warmup-steps, then constant or cosine-decayed to 0 at max_steps. A function of the step alone,
    so a resumed run continues the schedule exactly."""
    lr = args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr
    if args.lr_schedule == "cosine" and step > args.warmup_steps:
        progress = (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps)
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def checked_mean_loss(accelerator: Accelerator, loss_sum: torch.Tensor, steps: int,
                      train_steps: int, first_unchecked: int, weights: list[torch.Tensor],
                      exp_dir: Path, votes: list[float]) -> tuple[float, list[float]]:
    """The mean loss over the last `steps` steps and all processes, and the mean of the
    processes' stop votes (preemption.py), read from the device in one reduction and one
    synchronisation. A non-finite loss or weight (since step `first_unchecked`) stops every
    process (all see the same values), naming the last good checkpoint: no later one is written."""
    largest_weight = torch.stack(torch._foreach_norm(weights, float("inf"))).amax()  # nan, inf
    local = torch.cat([torch.stack([loss_sum / steps, largest_weight.float()]),
                       torch.tensor(votes, device=loss_sum.device)])
    mean_loss, largest_weight, *mean_votes = accelerator.reduce(local, "mean").tolist()
    if math.isfinite(mean_loss) and math.isfinite(largest_weight):
        return mean_loss, mean_votes
    last = step_checkpoints(exp_dir)
    accelerator.end_training()
    where = (f"at step {train_steps}" if first_unchecked == train_steps
             else f"in steps {first_unchecked}-{train_steps}")
    problem = (f"loss is {mean_loss} {where}" if not math.isfinite(mean_loss)
               else f"weights are not finite after step {train_steps}")
    raise SystemExit(f"train.py: {problem}; stopping. "
                     f"Last good checkpoint: {last[-1] if last else 'none'}")


def check_data(args: argparse.Namespace, train_set, classes: list[str]) -> None:
    """Inputs that would only fail later (or silently train the wrong thing) are refused now."""
    if is_coco(args.data_path) and args.num_classes:
        raise fail("COCO captions are text-conditional: use --num-classes 0")
    if args.has_text and not is_coco(args.data_path):
        raise fail(f"--has_text needs COCO captions: {args.data_path} has no "
                   "annotations/train.json nor annotations/captions_train2014.json")
    if args.num_classes and args.num_classes != len(classes):
        found = f"{len(classes)} class folders ({', '.join(classes[:10])})" if classes else (
            "no class folders")
        raise fail(f"--num-classes {args.num_classes} but {args.data_path}/train has {found}")
    if args.vae != "none" and args.channels == 1:
        raise fail("the VAE encodes RGB images: use --vae none for grayscale pixel-space training")


def create_objective(args: argparse.Namespace) -> tuple:
    """(training objective, sampler for grids and FID): rectified flow sampled as the sampler
    options say (default: 25 Euler steps, as in the paper), or DiT's Gaussian diffusion (learned
    sigma) sampled with 25 DDIM steps."""
    if args.objective == "rf":
        return RectifiedFlow(sampling=args.sampling), flow_sampler(args)[0]
    return create_diffusion(""), create_diffusion(f"ddim{SAMPLE_STEPS}")


def grid_conditions(args, captioned_set):
    """What the sample grids show: one row per class (up to 16), the first captions of a data set,
    or unconditional samples."""
    if args.num_classes:
        rows = min(args.num_classes, MAX_GRID_CLASSES)
        return torch.arange(rows).repeat_interleave(GRID_COLUMNS)
    if is_coco(args.data_path):
        n = min(GRID_COLUMNS * GRID_ROWS, len(captioned_set))
        return [captioned_set.samples[i][1][0] for i in range(n)]
    return GRID_COLUMNS * GRID_ROWS


def save_grid(generate: ImageSampler, conditions, path: Path, seed: int) -> None:
    save_image(generate(conditions, seed), path, nrow=GRID_COLUMNS, normalize=True,
               value_range=(-1, 1))
    if isinstance(conditions, list):  # captions of a text grid, in grid order
        path.with_suffix(".txt").write_text("\n".join(conditions) + "\n")


def fid_subset(size: int, n: int, seed: int) -> list[int]:
    """The reference images' indices: the whole split when it has at most n images, else n drawn
    at random (fixed by the seed). Not the first n: image folders list one class after another."""
    if n >= size:
        return list(range(size))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:n].tolist())


@torch.no_grad()
def compute_fid(accelerator, generate: ImageSampler, reference_set, fid_images: int, args,
                inception, reference: tuple | None) -> tuple[float, tuple]:
    """FID of `fid_images` generated images against as many reference images (counted in images;
    see fid_subset). The samples use the reference images' own labels / first captions, so both
    sets have the same mix of conditions; each process handles a shard, features are gathered.
    Returns (fid, reference statistics), the latter computed on the first call only."""
    indices = fid_subset(len(reference_set), fid_images, args.global_seed)
    shard = Subset(reference_set, indices[accelerator.process_index::accelerator.num_processes])
    # Its own generator: starting the loader must not draw from the training RNG (exact resume).
    loader = DataLoader(shard, batch_size=args.batch_size, collate_fn=collate,
                        generator=torch.Generator())
    real, fake = [], []
    generate.nfe.clear()  # count this evaluation's model evaluations only
    for i, (images, conditions) in enumerate(loader):
        if reference is None:
            real.append(inception(to_uint8(images.to(accelerator.device))).cpu())
        if isinstance(conditions, list):
            conditions = [captions[0] for captions in conditions]
        elif not args.num_classes:
            conditions = len(images)
        seed = args.global_seed + 1 + accelerator.process_index + accelerator.num_processes * i
        fake.append(inception(to_uint8(generate(conditions, seed))).cpu())
    if generate.nfe:
        logger.info(f"FID sampling, this process: {nfe_summary(generate.nfe)}")

    def statistics(features: list[torch.Tensor]) -> tuple:
        # gather_object joins the processes' lists of feature batches (shards may be uneven)
        return compute_statistics(torch.cat(gather_object(features)), nn.Identity())

    if reference is None:
        reference = statistics(real)
    return frechet_distance(*statistics(fake), *reference), reference


#################################################################################
#                                  Training                                      #
#################################################################################


def model_inputs(x, cond, args, vae, text_encoder, cached: bool) -> tuple[torch.Tensor, dict]:
    """A batch as the objective sees it, with this step's random flips and condition dropout."""
    with torch.no_grad():
        if cached:  # latent pairs (image, mirror image)
            x = random_view(x)
        else:
            x = random_flip(x)
            x = encode_images(vae, x) if vae is not None else x
        kwargs = {}
        if args.num_classes:
            kwargs["y"] = drop_labels(cond, args.num_classes, args.cond_drop_prob)
        if text_encoder is not None:
            kwargs["context"] = text_encoder(pick_captions(cond, args.cond_drop_prob))
    return x, kwargs


def batches_from(loader, accelerator: Accelerator, step: int) -> Iterator:
    """Endless batches, starting where an uninterrupted run is after `step` steps: the epoch's
    shuffle is seeded by the epoch number, and the batches already seen in it are skipped (as
    indices, no image is read)."""
    epoch, skip = divmod(step, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def check_resumable(resume_from: Path, model_kwargs: dict) -> None:
    """The checkpoint must hold the model this command builds (gradient checkpointing aside)."""
    meta = json.loads((resume_from / "meta.json").read_text())
    saved = {k: v for k, v in meta["model_kwargs"].items() if k != "use_checkpoint"}
    wanted = {k: v for k, v in json.loads(json.dumps(model_kwargs)).items()
              if k != "use_checkpoint"}
    if saved != wanted:
        raise fail(f"{resume_from} holds a model built with {saved}, this command builds "
                   f"{wanted}; pass --resume none to start a new experiment")


#################################################################################
#                                    Setup                                       #
#################################################################################


@dataclass
class Run:
    """Everything the training loop works with, built by `setup`."""
    args: argparse.Namespace
    accelerator: Accelerator
    exp_dir: Path
    model: nn.Module  # as accelerate prepared it
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    objective: object
    loader: DataLoader
    encoders: tuple  # (VAE or None, text encoder or None)
    cached: bool  # the loader yields cached latent pairs
    evaluation: Evaluation
    model_kwargs: dict  # what meta.json records to rebuild the model
    step: int  # the step training starts from, then the step it reached
    max_steps: int
    skipped: list[Path]  # corrupt images left out

    def checkpoint(self, step: int) -> Path:
        return self.exp_dir / "checkpoints" / f"step-{step:07d}"


def setup(args: argparse.Namespace) -> Run:
    """Refuse bad input before anything loads, then build the run in an order that makes resuming
    exact: models seeded alike on every process, training draws seeded per process."""
    channels = 3 if args.vae != "none" else args.channels  # the VAE encodes RGB
    try:
        train_set, classes = build_dataset(args.data_path, "train", args.image_size, channels)
    except DataError as err:
        raise fail(str(err)) from err
    check_data(args, train_set, classes)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if use_tensorboard(args) else None,
        project_dir=args.results_dir,
        # The sampler reshuffles from global_seed + epoch, the same on every process, so the data
        # order is a function of the step alone: what exact resuming needs.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=args.global_seed),
    )
    scan_backend = use_scan_backend(args.scan_backend, accelerator.device)  # before any output
    # The checkpoint to resume, verified before anything heavy loads.
    skipped_checkpoints = []
    resume = find_resume(args, skipped_checkpoints.append) if accelerator.is_main_process else None
    resume = broadcast_object_list([resume])[0]
    vae, text_encoder = load_encoders(args, accelerator.device)
    factor = vae_downsample_factor(vae)
    if args.image_size % factor:
        raise fail(f"--image-size {args.image_size} must be a multiple of {factor} (the VAE's "
                   "down-sampling factor)")
    in_channels = vae.config.latent_channels if vae is not None else train_set.channels
    input_size = args.image_size // factor
    # Model and EMA start identical on every process (same seed); the training draws are then
    # seeded per process so that each process adds its own noise.
    set_seed(args.global_seed)
    context_dim = text_encoder.hidden_size if text_encoder is not None else None
    try:
        model, model_kwargs = build_model(args, in_channels, input_size, context_dim)
    except ValueError as err:
        raise fail(str(err)) from err
    ema = deepcopy(model).to(accelerator.device).requires_grad_(False).eval()
    set_seed(args.global_seed, device_specific=True)

    exp_dir, resume_from = open_experiment(args, accelerator, resume)
    logger.info(scan_backend)
    for message in skipped_checkpoints:
        logger.warning(message)
    logger.info(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()):,}")
    dataset, skipped = training_data(args, train_set, vae, accelerator.num_processes)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers, collate_fn=collate,
                        pin_memory=torch.cuda.is_available(),
                        # The loader's own generator: starting an epoch must not draw from the
                        # training RNG, or a resumed run would add different noise.
                        generator=torch.Generator().manual_seed(args.global_seed))
    logger.info(f"Data: {len(dataset):,} images in {args.data_path} ({len(classes)} class "
                f"folders); global batch {args.batch_size * accelerator.num_processes}")
    # fused: AdamW's update as one kernel over all parameters (CPU and CUDA), the same arithmetic
    # as the default per-tensor loop; on the demo's model it is 2.9 ms of a 300 ms step, not 13.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(ema)  # saved as custom_checkpoint_0.pkl
    objective, sampler = create_objective(args)
    step = resume_state(accelerator, resume_from, model_kwargs)
    generate = ImageSampler(ema, sampler, vae, text_encoder, in_channels, input_size,
                            args.cfg_scale)
    evaluation = Evaluation(args, accelerator, generate, train_set, exp_dir, model_kwargs)
    start_trackers(args, accelerator, exp_dir)
    max_steps = args.max_steps
    if args.epochs is not None:
        max_steps = min(max_steps, args.epochs * len(loader))
    return Run(args, accelerator, exp_dir, model, ema, optimizer, objective, loader,
               (vae, text_encoder), dataset is not train_set, evaluation, model_kwargs, step,
               max_steps, skipped)


def load_encoders(args: argparse.Namespace, device: torch.device) -> tuple:
    """The frozen VAE (None in pixel space) and, for COCO captions, the CLIP text encoder."""
    try:
        vae = load_vae(args.vae, device)
        text_encoder = (load_text_encoder(args.text_encoder, device) if is_coco(args.data_path)
                        else None)
    except OSError as err:  # what the hub raises offline or for a folder that is not a model
        raise fail(f"{err}\n(`python download.py vae` / `python download.py clip` fetch the "
                   "default encoders into the Hugging Face cache)") from err
    return vae, text_encoder


def open_experiment(args: argparse.Namespace, accelerator: Accelerator,
                    resume: tuple[Path, Path] | None) -> tuple[Path, Path | None]:
    """(experiment folder, checkpoint to resume or None): a new folder unless resuming, written
    only now that the inputs have been checked; leftovers of unfinished saves removed; log.txt."""
    if resume is None:
        exp_dir = new_experiment(args) if accelerator.is_main_process else None
        resume = broadcast_object_list([exp_dir])[0], None
    exp_dir = resume[0]
    if accelerator.is_main_process:
        (exp_dir / "checkpoints").mkdir(exist_ok=True)
        (exp_dir / "samples").mkdir(exist_ok=True)
        for leftover in (exp_dir / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(leftover)
    setup_logging(exp_dir, accelerator.is_main_process)
    logger.info(f"Experiment folder {exp_dir}")
    if note := ignored_note(args):
        logger.info(note)
    return resume


def training_data(args: argparse.Namespace, train_set, vae, processes: int) -> tuple:
    """(the data set to train on: images, or their latent cache; corrupt images left out)."""
    skipped = train_set.remove_corrupt() if args.on_corrupt == "skip" else []
    for path in skipped:
        logger.warning(f"Skipping corrupt image {path}")
    dataset = train_set
    if args.cache_latents and vae is None:
        logger.warning("--cache-latents has no effect in pixel space (--vae none)")
    try:
        if args.cache_latents and vae is not None:
            cache = latent_cache_path(Path(args.results_dir) / "latent-cache", train_set, args.vae)
            logger.info(f"Latent cache {cache}")
            dataset = cache_latents(train_set, vae, cache, args.batch_size, args.num_workers,
                                    args.global_seed)
    except CorruptImageError as err:
        raise fail(f"{err}\nRemove the file, or pass --on-corrupt skip") from err
    if len(dataset) < args.batch_size * processes:
        raise fail(f"{len(dataset)} training images, fewer than one batch per process "
                   f"({args.batch_size} x {processes})")
    return dataset, skipped


def resume_state(accelerator: Accelerator, resume_from: Path | None, model_kwargs: dict) -> int:
    """Load the checkpoint to resume (model, optimizer, EMA, every process's RNG); its step."""
    if resume_from is None:
        return 0
    check_resumable(resume_from, model_kwargs)
    accelerator.load_state(str(resume_from))
    step = json.loads((resume_from / "meta.json").read_text())["step"]
    logger.info(f"Resumed from {resume_from} at step {step} "
                "(--resume none starts a new experiment instead)")
    return step


def use_tensorboard(args: argparse.Namespace) -> bool:
    return args.report_to == "tensorboard" and is_tensorboard_available()


def start_trackers(args: argparse.Namespace, accelerator: Accelerator, exp_dir: Path) -> None:
    if args.report_to == "tensorboard" and not use_tensorboard(args):
        logger.warning("tensorboard is not installed: logging to log.txt only")
    if use_tensorboard(args):
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in vars(args).items()}
        # A run name relative to --results-dir: the events land in <exp>/tensorboard.
        accelerator.init_trackers(f"{exp_dir.name}/tensorboard", config=hparams)


class Evaluation:
    """EMA sample grids every --sample-every steps, and FID on the --fid-reference split every
    --fid-every (default: at --sample-every, as the authors' script, when that split exists) with
    checkpoints/best/ replaced when it improves. Calling it is the training loop's one call."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator,
                 generate: ImageSampler, train_set, exp_dir: Path, model_kwargs: dict) -> None:
        self.args, self.accelerator, self.generate = args, accelerator, generate
        self.exp_dir, self.model_kwargs = exp_dir, model_kwargs
        self.val_set = None
        try:
            self.val_set, _ = build_dataset(args.data_path, "val", args.image_size,
                                            train_set.channels)
        except DataError as err:
            if args.fid_every and args.fid_reference == "val":
                raise fail(f"{err} (FID is measured on val images; --fid-reference train uses "
                           "the train split)") from err
        self.reference_set = train_set if args.fid_reference == "train" else self.val_set
        self.fid_every = args.fid_every
        if self.fid_every is None:  # the authors' behaviour, where the split can give an FID
            has_fid = self.reference_set is not None and len(self.reference_set) > 1
            self.fid_every = args.sample_every if has_fid else 0
            if self.reference_set is not None and not has_fid:
                logger.warning(f"FID off: the {args.fid_reference} split has "
                               f"{len(self.reference_set)} image (FID needs 2)")
        self.fid_images = args.fid_images
        if args.samples is not None:
            self.fid_images = args.samples * args.batch_size * accelerator.num_processes
            logger.info(f"--samples {args.samples}: FID on {self.fid_images} "
                        f"{args.fid_reference} images ({args.samples} batches of "
                        f"{args.batch_size} per process)")
        self.conditions = grid_conditions(args, self.val_set or train_set)
        self.inception = (load_inception(args.inception, accelerator.device, args.fid_resize)
                          if self.fid_every else None)
        self.reference, self.best_fid = None, math.inf
        if (best := exp_dir / "checkpoints" / "best").is_dir():
            try:
                self.best_fid = read_meta(best)["fid"]
            except CheckpointError as err:  # the next FID measured replaces it
                logger.warning(f"{err}; best/ will be replaced")

    def due(self, step: int, last: bool) -> bool:
        every = [self.args.sample_every, *([self.fid_every] if self.fid_every else [])]
        return last or any(step % n == 0 for n in every)

    def __call__(self, step: int, last: bool) -> None:
        if step % self.args.sample_every == 0 or last:
            if self.accelerator.is_main_process:
                grid = self.exp_dir / "samples" / f"step-{step:07d}.png"
                save_grid(self.generate, self.conditions, grid, self.args.global_seed)
                logger.info(f"Saved sample grid {grid}")
            self.accelerator.wait_for_everyone()
        if self.fid_every and (step % self.fid_every == 0 or last):
            fid, self.reference = compute_fid(self.accelerator, self.generate,
                                              self.reference_set, self.fid_images, self.args,
                                              self.inception, self.reference)
            logger.info(f"(step={step:07d}) FID={fid:.3f} "
                        f"({min(self.fid_images, len(self.reference_set))} images)")
            self.accelerator.log({"fid": fid}, step=step)
            if fid < self.best_fid:
                self.best_fid = fid
                save_checkpoint(self.accelerator, self.exp_dir / "checkpoints" / "best",
                                checkpoint_meta(self.args, self.model_kwargs, step, fid=fid))


#################################################################################
#                               Loop and finish                                  #
#################################################################################


def train_step(run: Run, x: torch.Tensor, cond, step: int) -> torch.Tensor:
    """Optimizer step `step` (1-based) on one batch; returns its loss, left on the device."""
    args, accelerator = run.args, run.accelerator
    x, kwargs = model_inputs(x, cond, args, *run.encoders, run.cached)
    loss = run.objective.training_losses(run.model, x, kwargs)["loss"].mean()
    accelerator.backward(loss)
    if args.grad_clip > 0:  # off by default: the USM release never clipped (CompVis' Zigma
        # clipped after the step, which is no clipping of that step's update)
        accelerator.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, run.max_steps, args)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema, accelerator.unwrap_model(run.model), args.ema_decay)
    return loss.detach().float()


def is_check_point(run: Run, step: int) -> bool:
    """Where the loss is read, and the processes agree whether to stop: every --log-every steps,
    at every checkpoint, at the last step."""
    return step % run.args.log_every == 0 or step % run.args.ckpt_every == 0 or (
        step == run.max_steps)


def work_ahead(run: Run, step: int) -> tuple[int, bool]:
    """Steps from `step` to the next check point, and whether an evaluation falls in them."""
    ahead = next(n for n in range(1, run.args.log_every + 1) if is_check_point(run, step + n))
    return ahead, any(run.evaluation.due(s, s == run.max_steps)
                      for s in range(step + 1, step + ahead + 1))


def train_loop(run: Run, stop: StopConditions) -> list[str]:
    """Train from run.step to run.max_steps, or until the processes agree to stop; returns why
    they stopped ([] when training finished). Losses stay on the device until a check point:
    reading one every step would make the CPU wait for the GPU at every step."""
    args, accelerator = run.args, run.accelerator
    weights = [*run.model.parameters(), *run.ema.parameters()]
    loss_sum, loss_steps, log_start = torch.zeros((), device=accelerator.device), 0, time.time()
    first_unchecked, reasons = run.step + 1, []
    logger.info(f"Training from step {run.step} to {run.max_steps}")
    run.model.train()
    progress = tqdm(total=run.max_steps, initial=run.step, unit="step", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    batches = batches_from(run.loader, accelerator, run.step)
    stop.start(run.step)
    with logging_redirect_tqdm(loggers=[logger]):
        while run.step < run.max_steps and not reasons:
            try:
                x, cond = next(batches)
            except CorruptImageError as err:
                raise fail(f"{err}\nRemove the file, or pass --on-corrupt skip") from err
            loss_sum += train_step(run, x, cond, run.step + 1)
            run.step, loss_steps = run.step + 1, loss_steps + 1
            step, last = run.step, run.step == run.max_steps
            progress.update()
            if is_check_point(run, step):
                votes = stop.votes(step, *work_ahead(run, step))
                avg_loss, votes = checked_mean_loss(accelerator, loss_sum, loss_steps, step,
                                                    first_unchecked, weights, run.exp_dir, votes)
                reasons = [] if last else stop.agreed(votes, accelerator.num_processes)
                first_unchecked = step + 1
            if step % args.log_every == 0 or last:
                steps_per_sec = loss_steps / (time.time() - log_start)
                progress.set_postfix(loss=f"{avg_loss:.4f}")
                logger.info(f"(step={step:07d}) loss={avg_loss:.4f} "
                            f"steps/sec={steps_per_sec:.2f}")
                accelerator.log({"loss": avg_loss, "steps_per_sec": steps_per_sec}, step=step)
                loss_sum.zero_()
                loss_steps, log_start = 0, time.time()
            if step % args.ckpt_every == 0 or last or reasons:
                with stop.timed("save"):
                    save_checkpoint(accelerator, run.checkpoint(step),
                                    checkpoint_meta(args, run.model_kwargs, step))
                    if accelerator.is_main_process:
                        prune_checkpoints(run.exp_dir, args.keep_last)
                logger.info(f"Saved checkpoint {run.checkpoint(step)}")
            if run.evaluation.due(step, last) and not reasons:
                with stop.timed("eval"):
                    run.evaluation(step, last)
    progress.close()
    return reasons


def finish(run: Run, reasons: list[str]) -> Path:
    """Say how the run ended; after a stop for the scheduler, requeue the job if asked."""
    if run.skipped:
        logger.warning(f"Skipped {len(run.skipped)} corrupt image(s), listed at the top of "
                       "log.txt")
    if reasons:
        logger.info(f"Stopped at step {run.step} of {run.max_steps} on {' and '.join(reasons)}; "
                    f"saved {run.checkpoint(run.step)}: run the same command to resume from it")
    else:
        logger.info("Done.")
    run.accelerator.end_training()
    scheduler_stop = any(not reason.startswith("SIGINT") for reason in reasons)
    if run.args.requeue and scheduler_stop and run.accelerator.is_main_process:
        requeue(os.environ["SLURM_JOB_ID"])
    return run.exp_dir


def requeue(job_id: str) -> None:
    """Put this SLURM job back in the queue; it starts again with the same command, which
    resumes from the checkpoint just saved."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        problem = result.stderr.strip() if result.returncode else None
    except OSError as err:  # no scontrol on PATH
        problem = str(err)
    if problem:
        logger.warning(f"scontrol requeue {job_id} failed: {problem}")
    else:
        logger.info(f"Requeued SLURM job {job_id}")


def main(args: argparse.Namespace) -> Path:
    """Train as configured; returns the experiment folder."""
    if args.requeue and "SLURM_JOB_ID" not in os.environ:
        raise fail("--requeue requeues a SLURM job, and SLURM_JOB_ID is not set")
    with StopConditions(deadline(args.time_limit), announce=logger.warning) as stop:
        run = setup(args)
        if stop.deadline is not None:
            end = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stop.deadline))
            logger.info(f"Stopping before {end} (--time-limit, or the SLURM job's end)")
        reasons = train_loop(run, stop)
    return finish(run, reasons)


if __name__ == "__main__":
    main(parse_args())
