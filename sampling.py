"""What train.py (sample grids, FID) and sample.py share: where a run's checkpoints are, how a run's
options build its model, and how a trained model turns noise into images."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn

from diffusion import RectifiedFlow
from diffusion.rectified_flow import DOPRI5_ATOL, DOPRI5_RTOL
from encoders import decode_latents
from models import All_models, USM_models

CHECKPOINT_RE = re.compile(r"step-(\d+)")  # checkpoints/step-0010000, as train.py names them
SAMPLE_STEPS = 25  # the paper samples with 25 Euler steps; Gaussian grids use DDIM with as many


def step_checkpoints(exp_dir: Path) -> list[Path]:
    """Complete step checkpoints of an experiment folder, oldest first. Renaming .tmp-* into place
    is the last thing a save does, so a half-written checkpoint never matches."""
    steps = {}
    for folder in (Path(exp_dir) / "checkpoints").glob("step-*"):
        if match := CHECKPOINT_RE.fullmatch(folder.name):
            steps[int(match[1])] = folder
    return [steps[step] for step in sorted(steps)]


def build_model(args: argparse.Namespace, in_channels: int, input_size: int,
                context_dim: int | None) -> tuple[nn.Module, dict]:
    """The model train.py's options describe and its exact constructor kwargs (meta.json stores
    them to rebuild it). A size the model cannot take is a ValueError worded in options."""
    kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=args.num_classes,
                  context_dim=context_dim, learn_sigma=args.objective == "gaussian",
                  learn_pos_emb=args.learn_pos_emb, use_checkpoint=args.use_ckpt)
    if args.model in USM_models:  # Zigma's constructors do not take the U-shape options
        kwargs.update(skip_conn=args.skip_conn, use_convtranspose=args.use_convtranspose,
                      skip_gate=args.skip_gate)
        if args.stages:
            kwargs["stages"] = args.stages
    try:
        return All_models[args.model](**kwargs), kwargs
    except ValueError as err:
        space = "pixel space" if args.vae == "none" else f"latents of the {args.vae} VAE"
        raise ValueError(f"--image-size {args.image_size} gives a {input_size}x{input_size} input "
                         f"({space}) that {args.model} cannot take: {err}") from err


# The rectified-flow sampler options (cli.add_sampler_options); None means "the default".
FLOW_SAMPLER_OPTIONS = ("num_sampling_steps", "sampler", "atol", "rtol")


def sampler_problem(args: argparse.Namespace, objective: str) -> str | None:
    """What is wrong with the sampler options for a model of this objective, or None."""
    given = [f"--{name.replace('_', '-')}" for name in FLOW_SAMPLER_OPTIONS
             if getattr(args, name) is not None]
    if objective != "rf" and given:
        return f"{' / '.join(given)}: rectified flow's sampler options; this is Gaussian diffusion"
    if objective != "rf":
        return None
    if args.sampler == "dopri5" and args.num_sampling_steps is not None:
        return "--num-sampling-steps is for euler and heun: dopri5 chooses its own steps"
    if args.sampler != "dopri5" and (args.atol is not None or args.rtol is not None):
        return "--atol / --rtol are the tolerances of --sampler dopri5"
    return None


def flow_sampler(args: argparse.Namespace, t_min: float = 0.0) -> tuple[RectifiedFlow, str]:
    """(the rectified-flow sampler the options ask for, its short name for folders and logs).
    Defaults: the paper's 25 Euler steps; dopri5 with CompVis' tolerances. Call sampler_problem
    first."""
    solver = args.sampler or "euler"
    steps = args.num_sampling_steps or SAMPLE_STEPS
    atol = DOPRI5_ATOL if args.atol is None else args.atol
    rtol = DOPRI5_RTOL if args.rtol is None else args.rtol
    name = f"dopri5-atol{atol:g}-rtol{rtol:g}" if solver == "dopri5" else f"{solver}{steps}"
    sampler = RectifiedFlow(steps, sampler=solver, t_min=t_min, atol=atol, rtol=rtol)
    return sampler, name + ("-authors-time" if t_min else "")


def nfe_summary(nfe: list[int]) -> str:
    """One log line from the model evaluations of each batch (ImageSampler.nfe)."""
    return (f"{sum(nfe)} model evaluations over {len(nfe)} batches: {min(nfe)}-{max(nfe)} per "
            f"batch, mean {sum(nfe) / len(nfe):.1f}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], rounded to nearest (as DiT saves its samples)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ImageSampler:
    """Turns noise into images with a trained (EMA) model: guidance, sampler, VAE decoding.

    conditions: a LongTensor of class labels, a list of captions, or None (unconditional).
    nfe: the number of model evaluations (NFE) of each batch sampled, appended by from_noise; a
    guided evaluation counts once, though it runs the network on the conditional and the
    unconditional batch. The caller reads and clears it.
    """

    def __init__(self, model: nn.Module, sampler, vae, text_encoder, in_channels: int,
                 input_size: int, cfg_scale: float = 1.0):
        self.model, self.sampler, self.cfg_scale = model, sampler, cfg_scale
        self.vae, self.text_encoder = vae, text_encoder
        self.shape = (in_channels, input_size, input_size)
        # Guidance's unconditional branch sees the empty caption, what caption dropout trained on.
        self.null_context = text_encoder([""]) if text_encoder is not None else None
        self.nfe: list[int] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, conditions: torch.Tensor | list[str] | int, seed: int) -> torch.Tensor:
        """Images from noise drawn with its own seed (conditions may also be a count, for
        unconditional images). The caller's RNG is untouched, so training grids from different
        steps are comparable and sampling never shifts the random stream exact resuming needs."""
        n = conditions if isinstance(conditions, int) else len(conditions)
        device = self.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            z = torch.randn(n, *self.shape, device=device)
            return self.from_noise(z, None if isinstance(conditions, int) else conditions)

    @torch.no_grad()
    def from_noise(self, z: torch.Tensor, conditions: torch.Tensor | list[str] | None = None
                   ) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W), from the given noise (B, *self.shape)."""
        kwargs = {}
        if isinstance(conditions, torch.Tensor):
            kwargs["y"] = conditions.to(z.device)
        elif conditions is not None:
            kwargs["context"] = self.text_encoder(conditions)
        model_fn = self.model
        if kwargs and self.cfg_scale != 1:
            model_fn = self.model.forward_with_cfg
            kwargs.update(cfg_scale=self.cfg_scale, null_context=self.null_context)
        calls = 0

        def counted(*args, **kwargs) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return model_fn(*args, **kwargs)

        x = self.sampler.sample(counted, z, model_kwargs=kwargs)
        self.nfe.append(calls)
        return decode_latents(self.vae, x) if self.vae is not None else x.clamp(-1, 1)
