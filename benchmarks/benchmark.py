"""Efficiency benchmark: USM against Zigma on the same hardware (the published numbers:
docs/upstream.md#published-numbers).

    python -m benchmarks.benchmark                 # CPU: a few minutes on 2 quiet cores
    python -m benchmarks.benchmark --full          # CPU: also the heavy cases (see --full)
    python -m benchmarks.benchmark --device cuda   # GPU: everything, mamba_ssm if installed
    python -m benchmarks.benchmark --flops-only    # only benchmarks/results/flops.md (a minute)

For each model at 256 px (32x32x4 SD-VAE latents), without and with text (CLIP-like context
77x768): parameters; forward FLOPs per image by our counter and by fvcore, per component
(benchmarks/flops.py); the latency of one sampling step at batch 1 and the sampling throughput at
a realistic batch; training throughput and peak memory with and without per-block gradient
checkpointing, the memory split into what the parameters cost (weights, gradients, AdamW) and the
rest (activations). Then the scaling with the latent size (tokens) against a DiT of the same
width, and the selective scan backends. Every memory figure comes from a fresh process (CUDA
allocator peak; on CPU the peak RSS, VmHWM, minus the RSS after imports). Writes <out>.md,
<out>.json, scaling_<name>.png and flops.md beside them.
"""

import argparse
import datetime
import functools
import importlib.metadata
import json
import multiprocessing
import os
import platform
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.models.vision_transformer import VisionTransformer

from benchmarks.bench_scan import time_backends, time_fn
from benchmarks.flops import COMPONENTS, METHOD, count_components, count_flops, fvcore_components
from cli import add_scan_backend, use_scan_backend
from models import All_models
from selective_scan import resolve_backend, set_backend

matplotlib.use("Agg")  # headless: the plot is only written to a file
import matplotlib.pyplot as plt  # noqa: E402

LATENT_CHANNELS = 4  # SD-VAE latents: 256x256x3 -> 32x32x4
MAIN_SIZE = 32  # the paper's setting: 256 px images
CONTEXT = (77, 768)  # CLIP ViT-L/14 text encoder, last hidden state
AUTHORS_BATCH = 8  # --batch_size of the authors' training command
# The paper's anchors (docs/upstream.md#published-numbers): GFLOPs without / with text, and its
# relative claims.
PAPER = {
    "gflops": {"USM": (20.66, 40.84), "Zigma": (64.12, 105.94)},
    "faster": (0.73, 0.81),  # "x% faster sampling step", without / with text
    "less_memory": "30-39%",
}
# What fvcore could see of the authors' networks: their mixers call mamba_ssm's fused kernels,
# opaque to a jit trace. USM's SS2D calls selective_scan_fn (the scan alone); CompVis Zigma's
# Mamba calls mamba_inner_fn, which fuses conv1d, x_proj, dt_proj, the scan and out_proj.
FUSED = {"USM": ("scan",), "Zigma": ("mixer conv", "mixer x/dt/out proj", "scan")}
# Bytes per parameter while training with AdamW in float32: weight, gradient, two moments.
BYTES_PER_PARAM = {"weights": 4, "gradients": 4, "adamw": 8}
# DiT sizes (Peebles & Xie 2023, Table 1; T matches our tiny CPU models): width, depth, heads.
DIT_SIZES = {"XL": (1152, 28, 16), "L": (1024, 24, 16), "B": (768, 12, 12), "S": (384, 12, 6),
             "T": (64, 12, 1)}
TEXT_LABEL = {False: "no", True: "77x768"}


class DiT(nn.Module):
    """The cost of a DiT: timm's ViT Blocks (attention + MLP) on the same tokens, no pooling.

    adaLN and the timestep embedder are left out: they act on one vector per image, a negligible
    cost next to the blocks, so `t` is accepted only to share the models' call signature.
    """

    def __init__(self, input_size: int, patch_size: int, width: int, depth: int, heads: int):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=input_size, patch_size=patch_size, in_chans=LATENT_CHANNELS,
            embed_dim=width, depth=depth, num_heads=heads, num_classes=0, global_pool="",
            class_token=False,
        )
        self.out = nn.Linear(width, patch_size**2 * LATENT_CHANNELS)
        self.grid, self.patch = input_size // patch_size, patch_size

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Back to the input's shape, so that it trains on the same loss as the other models.
        tokens = self.out(self.vit.forward_features(x))
        return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=self.patch,
                         q=self.patch)


def dit_like(name: str) -> str:
    """The DiT of the same size letter and patch as a registry model: USM-B/1 -> DiT-B/1."""
    return "DiT-" + name.split("-", 1)[1]


def build(name: str, size: int, text: bool, checkpoint: bool = False) -> nn.Module:
    family, config = name.split("-", 1)
    if family == "DiT":
        letter, patch = config.split("/")
        return DiT(size, int(patch), *DIT_SIZES[letter])
    # Learned positional embeddings as in the authors' commands (--learn_pos_emb; Zigma's default).
    return All_models[name](input_size=size, in_channels=LATENT_CHANNELS, learn_pos_emb=True,
                            context_dim=CONTEXT[1] if text else None, use_checkpoint=checkpoint)


def inputs(batch: int, size: int, text: bool, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(batch, LATENT_CHANNELS, size, size, device=device)
    kwargs = {"context": torch.randn(batch, *CONTEXT, device=device)} if text else {}
    return x, torch.rand(batch, device=device), kwargs


@functools.cache
def n_params(name: str, size: int, text: bool) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(name, size, text).parameters())


def params_and_flops(name: str, size: int, text: bool) -> tuple[int, int]:
    """Parameter count and forward FLOPs for one image, on the meta device (nothing computed)."""
    with torch.device("meta"):
        model = build(name, size, text)
        x, t, kwargs = inputs(1, size, text, torch.device("meta"))
        flops = count_flops(model, x, t, **kwargs)["total"]
    return sum(p.numel() for p in model.parameters()), flops


#################################################################################
#                      Measurements, each in a fresh process                     #
#################################################################################


def peak_bytes(device: torch.device) -> int:
    """High-water mark of this process: CUDA allocator peak, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # VmHWM of this process's own memory map (Linux). Not getrusage's ru_maxrss: exec carries
    # the parent's peak over into a spawned child, hiding everything below it.
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmHWM:")).split()[1]) * 1024


def _setup(threads: int, scan_backend: str, device: str, precision: str
           ) -> tuple[torch.device, torch.autocast]:
    """A spawned measuring process's settings: threads, scan backend (a spawned process starts
    from the default), device, and autocast for precision "bf16" / "fp16" ("no": off)."""
    torch.set_num_threads(threads)
    set_backend(scan_backend)
    dev = torch.device(device)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                         enabled=precision != "no")
    return dev, amp


def measure_sampling(name: str, size: int, text: bool, batch: int, device: str, threads: int,
                     warmup: int, repeats: int, scan_backend: str = "auto",
                     precision: str = "no") -> dict[str, float]:
    """Latency and peak memory of one sampling step at batch 1, then throughput and peak at
    `batch` (read second: the high-water mark cannot be lowered on CPU)."""
    dev, amp = _setup(threads, scan_backend, device, precision)
    base = peak_bytes(dev)
    torch.manual_seed(0)
    model = build(name, size, text).to(dev).eval()
    result = {}
    for n, key in ((1, "sample"), (batch, "sample_batch")):
        x, t, kwargs = inputs(n, size, text, dev)
        with torch.inference_mode(), amp:
            seconds = time_fn(lambda: model(x, t, **kwargs), warmup, repeats)  # noqa: B023 (called here)
        result[f"{key}_ms"] = 1e3 * seconds
        result[f"{key}_img_s"] = n / seconds
        result[f"{key}_mb"] = (peak_bytes(dev) - base) / 2**20
    return result


def measure_training(name: str, size: int, text: bool, batch: int, checkpoint: bool, device: str,
                     threads: int, warmup: int, repeats: int, scan_backend: str = "auto",
                     precision: str = "no") -> dict[str, float]:
    """Throughput and peak memory of training steps (forward + backward + AdamW) at `batch`.

    `checkpoint` recomputes each block in the backward pass (the authors train with --use_ckpt).
    """
    dev, amp = _setup(threads, scan_backend, device, precision)
    base = peak_bytes(dev)
    torch.manual_seed(0)
    model = build(name, size, text, checkpoint).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x, t, kwargs = inputs(batch, size, text, dev)
    target = torch.randn_like(x)  # the velocity target of rectified flow: same shapes

    def train_step() -> None:
        with amp:
            loss = F.mse_loss(model(x, t, **kwargs).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = time_fn(train_step, warmup, repeats)
    return {"train_img_s": batch / seconds, "train_mb": (peak_bytes(dev) - base) / 2**20}


def isolated(fn: Callable[..., dict], **kwargs) -> dict:
    """fn(**kwargs) in a fresh spawned process (spawn: a forked child would share our heap), so
    the memory high-water mark belongs to that one model and regime."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, **kwargs).result()


def memory_split(params: int, peak_mib: float) -> dict[str, float]:
    """The training peak as what the parameters cost (computed: float32 weights, gradients and
    AdamW's two moments) and the rest above the baseline: activations and temporaries."""
    mib = {f"{k}_mb": params * b / 2**20 for k, b in BYTES_PER_PARAM.items()}
    return mib | {"activations_mb": peak_mib - sum(mib.values())}


def available_bytes(device: torch.device) -> int:
    """Memory a measurement may use: free GPU memory, or MemAvailable of this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return int(next(x for x in meminfo if x.startswith("MemAvailable:")).split()[1]) * 1024


#################################################################################
#                                 The tables                                     #
#################################################################################


def main_table(args: argparse.Namespace, timing: dict) -> list[dict]:
    """Both models without and with text at 256 px: parameters, FLOPs and sampling."""
    rows = []
    for text in (False, True):
        for name in args.models:
            params, flops = params_and_flops(name, MAIN_SIZE, text)
            family = name.split("-")[0]
            paper = PAPER["gflops"][family][text] if name in ("USM-B/1", "Zigma-B/1") else None
            print(f"sampling {name} text={text}", flush=True)
            rows.append({"model": name, "text": text, "params_m": params / 1e6,
                         "gflops": flops / 1e9, "paper_gflops": paper,
                         **isolated(measure_sampling, name=name, size=MAIN_SIZE, text=text,
                                    batch=args.sample_batch, **timing)})
    return rows


def activation_bytes_per_token(name: str, text: bool, checkpoint: bool, timing: dict) -> float:
    """Training activations per image-token at batch 1 on an 8x8 token grid (a second or two):
    the rest of the peak above what the parameters cost, over the 64 tokens. What does not grow
    with the tokens (the text context) is counted per token too, so larger grids are
    overestimated, never under."""
    patch = int(name.split("/")[1])
    size = 8 * patch
    peak = isolated(measure_training, name=name, size=size, text=text, batch=1,
                    checkpoint=checkpoint, **timing | {"warmup": 0, "repeats": 1})["train_mb"]
    rest = memory_split(n_params(name, size, text), peak)["activations_mb"]
    return max(rest, 0) * 2**20 / 64


def plan_training(args: argparse.Namespace, timing: dict) -> list[dict]:
    """The training regimes: per checkpointing setting, a latent size and a batch, chosen by the
    rule train_plan_text states. The prediction of a peak: parameters' cost + activations per
    image-token (measured on an 8x8 grid, growing linearly in tokens as every layer here does)
    x tokens x batch."""
    cheap = args.cpu and not args.full
    if args.train_size or args.train_batch or cheap:
        size = args.train_size or (MAIN_SIZE // 2 if cheap else MAIN_SIZE)
        batch = args.train_batch or (1 if cheap else AUTHORS_BATCH)
        return [{"size": size, "batch": batch, "checkpoint": c} for c in (False, True)]
    budget = 0.8 * available_bytes(torch.device(args.device))
    regimes = []
    for checkpoint in (False, True):
        per_token = {m: activation_bytes_per_token(m, args.train_text, checkpoint, timing)
                     for m in args.models}
        fits = [(s, b) for s in (MAIN_SIZE, MAIN_SIZE // 2) for b in range(AUTHORS_BATCH, 0, -1)
                if all(predicted_bytes(m, s, b, args.train_text, per_token[m]) < budget
                       for m in args.models)]
        size, batch = fits[0] if fits else (MAIN_SIZE // 2, 1)
        regimes.append({"size": size, "batch": batch, "checkpoint": checkpoint})
    return regimes


def predicted_bytes(name: str, size: int, batch: int, text: bool, per_token: float) -> float:
    """Training peak predicted from the parameters' cost and the activations per image-token."""
    tokens = (size // int(name.split("/")[1])) ** 2
    return sum(BYTES_PER_PARAM.values()) * n_params(name, size, text) + per_token * batch * tokens


def train_plan_text(args: argparse.Namespace) -> str:
    """How the training regimes were chosen, for the report."""
    if args.train_size or args.train_batch:
        return "Regime given on the command line (--train-size, --train-batch)."
    if args.cpu and not args.full:
        return ("Default CPU regime: 16x16 latents at batch 1 (cheap, not the authors' batch 8 "
                "at 32x32; --full plans the largest regime that fits).")
    return ("Regime planned from the free memory: the authors' batch 8 at 32x32 where both models "
            "are predicted to fit in 80% of it, else the largest batch at 32x32, else at 16x16 "
            "(prediction: parameters' cost + activations per image-token measured on an 8x8 "
            "token grid x tokens x batch).")


def training_table(args: argparse.Namespace, timing: dict) -> list[dict]:
    """Both models in every training regime (and with text where args.train_text)."""
    rows = []
    for regime in plan_training(args, timing):
        for text in (False, True) if args.train_text else (False,):
            for name in args.models:
                print(f"training {name} text={text} {regime}", flush=True)
                measured = isolated(measure_training, name=name, text=text, **regime, **timing)
                params = n_params(name, regime["size"], text)
                rows.append({"model": name, "text": text, **regime, **measured,
                             **memory_split(params, measured["train_mb"])})
    return rows


def flop_components(models: list[str]) -> list[dict]:
    """Our count and fvcore's per component for each model, without and with text, at 256 px.

    fvcore traces real tensors (a jit trace cannot run on the meta device); the scan is opaque
    and computes nothing, so a B model takes seconds."""
    rows = []
    for text in (False, True):
        for name in models:
            print(f"counting FLOPs of {name} text={text}", flush=True)
            torch.manual_seed(0)
            model = build(name, MAIN_SIZE, text).eval()
            x, t, kwargs = inputs(1, MAIN_SIZE, text, torch.device("cpu"))
            ours = count_components(model, x, t, **kwargs)
            fvcore = fvcore_components(model, x, t, None, kwargs.get("context"))
            rows.append({"model": name, "text": text, "ours": ours, "fvcore": fvcore})
    return rows


def conventions(row: dict) -> dict[str, float]:
    """GFLOPs of one model under each counting convention, beside the paper's figure."""
    ours, fvcore = sum(row["ours"].values()), sum(row["fvcore"].values())
    hidden = sum(row["fvcore"][c] for c in FUSED.get(row["model"].split("-")[0], ()))
    return {"ours": ours / 1e9, "ours_macs": ours / 2e9, "fvcore": fvcore / 1e9,
            "fvcore_fused": (fvcore - hidden) / 1e9}


def ratios(main: list[dict], train: list[dict], flops: list[dict], models: list[str],
           sample_batch: int) -> list[dict]:
    """Each of the paper's claims, the regime where we measured it, ours beside the paper's.

    `ours` is first / second (a ratio) for FLOPs and memory, second / first - 1 (speed gained)
    for sampling speed; None where a figure was not measured."""
    def pair(rows: list[dict], **where) -> tuple[dict, dict]:
        match = {r["model"]: r for r in rows if all(r[k] == v for k, v in where.items())}
        return match[models[0]], match[models[1]]

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    out = []
    for text in (False, True):
        paper_flops = PAPER["gflops"]["USM"][text] / PAPER["gflops"]["Zigma"][text]
        counted = [conventions(r) for r in pair(flops, text=text)]
        for key, how in (("ours", "our count"), ("fvcore", "fvcore on our modules"),
                         ("fvcore_fused", "fvcore, the authors' fused kernels hidden")):
            out.append({"claim": "one third of the GFLOPs", "paper": f"{paper_flops:.2f}",
                        "regime": f"forward, 1 image, text {TEXT_LABEL[text]}, {how}",
                        "kind": "ratio", "ours": counted[0][key] / counted[1][key]})
        a, b = pair(main, text=text)
        faster = f"{PAPER['faster'][text]:.0%} faster"
        for key, regime in (("sample", "batch 1"), ("sample_batch", f"batch {sample_batch}")):
            out.append({"claim": "faster sampling step", "paper": faster,
                        "regime": f"sampling {regime}, text {TEXT_LABEL[text]}", "kind": "faster",
                        "ours": over(b.get(f"{key}_ms"), a.get(f"{key}_ms"))})
            out.append({"claim": "less memory", "paper": PAPER["less_memory"] + " less",
                        "regime": f"sampling {regime}, text {TEXT_LABEL[text]}", "kind": "less",
                        "ours": over(a.get(f"{key}_mb"), b.get(f"{key}_mb"))})
    for r in train:
        if r["model"] != models[0]:
            continue
        a, b = pair(train, text=r["text"], size=r["size"], batch=r["batch"],
                    checkpoint=r["checkpoint"])
        out.append({"claim": "less memory", "paper": PAPER["less_memory"] + " less",
                    "regime": f"training, {regime_label(r)}, text {TEXT_LABEL[r['text']]}",
                    "kind": "less", "ours": over(a["train_mb"], b["train_mb"])})
    return out


def regime_label(row: dict) -> str:
    ckpt = "with" if row["checkpoint"] else "without"
    return f"{row['size']}x{row['size']} latents, batch {row['batch']}, {ckpt} checkpointing"


def scaling(args: argparse.Namespace, timing: dict, main: list[dict], train: list[dict]
            ) -> list[dict]:
    """GFLOPs at every latent size; sampling latency and memory up to args.timed_max; training
    memory at batch 1 without checkpointing up to args.train_max."""
    rows = []
    for size in args.sizes:
        for name in [*args.models, dit_like(args.models[0])]:
            _, flops = params_and_flops(name, size, text=False)
            patch = int(name.split("/")[1])
            row = {"model": name, "size": size, "tokens": (size // patch) ** 2,
                   "gflops": flops / 1e9}
            done = [r for r in main if size == MAIN_SIZE and r["model"] == name and not r["text"]]
            if done:  # measured already for the main table
                row |= {k: done[0][k] for k in ("sample_ms", "sample_mb")}
            elif size <= args.timed_max:
                print(f"sampling {name} at {size}x{size}", flush=True)
                measured = isolated(measure_sampling, name=name, size=size, text=False, batch=1,
                                    **timing)
                row |= {k: measured[k] for k in ("sample_ms", "sample_mb")}
            done = [r for r in train if (r["model"], r["size"], r["batch"], r["text"],
                                         r["checkpoint"]) == (name, size, 1, False, False)]
            if done:
                row["train_mb"] = done[0]["train_mb"]
            elif size <= args.train_max:
                print(f"training memory of {name} at {size}x{size}", flush=True)
                row["train_mb"] = isolated(
                    measure_training, name=name, size=size, text=False, batch=1,
                    checkpoint=False, **timing | {"warmup": 0, "repeats": 1})["train_mb"]
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    metrics = [("gflops", "forward GFLOPs / image"), ("sample_ms", "sampling step (ms, batch 1)"),
               ("sample_mb", "sampling peak memory (MiB)"),
               ("train_mb", "training peak memory (MiB, batch 1,\nno checkpointing)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(20, 4.4))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for name in dict.fromkeys(r["model"] for r in rows):
            # Log axes: a peak that read 0 (measured in-process) cannot be drawn.
            pts = [(r["tokens"], r[key]) for r in rows if r["model"] == name and r.get(key, 0) > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Cost against tokens: the scan grows linearly, attention quadratically")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scan_backends(device: str, quick: bool, warmup: int, repeats: int) -> list[dict]:
    """bench_scan's forward + backward timing at the shape of a B model's full-resolution layer
    (Di 1536, 1024 tokens), against the token-by-token reference (and mamba_ssm on CUDA)."""
    dim, length = (64, 256) if quick else (1536, MAIN_SIZE**2)
    return time_backends(1, dim, length, 16, torch.float32, device, warmup, repeats)


#################################################################################
#                                 The reports                                    #
#################################################################################


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def num(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def claim_figure(row: dict) -> str:
    """A ratios row's own figure: a ratio, '78% faster (44% less time)' or '12% less'."""
    value = row["ours"]
    if value is None:
        return "–"
    if row["kind"] == "faster":  # value = b time / a time
        if value < 1:
            return f"{1 / value - 1:.0%} slower"
        return f"{value - 1:.0%} faster ({1 - 1 / value:.0%} less time)"
    if row["kind"] == "less":
        return f"{1 - value:.0%} less" if value <= 1 else f"{value - 1:.0%} more"
    return f"{value:.2f}"


# Why the counters differ, component by component (flops.md).
DIFFERENCES = {
    "scan": "fvcore cannot see the scan (here an opaque op, in the paper mamba_ssm's kernel); "
            "ours adds Mamba's 9·B·L·Di·N + B·L·Di",
    "norms": "fvcore counts LayerNorm as 4 flops per element (5 with affine) and skips RMSNorm "
             "(aten::rms_norm has no fvcore formula); ours counts no norm",
    "cross-attention": "fvcore has no formula for scaled_dot_product_attention: it counts only "
                       "the q/kv/out projections; ours adds 2·L·S·d for QK^T and for AV",
}


def flops_report(meta: dict, flops: list[dict]) -> str:
    """flops.md: both counters per component, the conventions and the paper's figures."""
    a, b = meta["models"]
    header = ["component"]
    for r in flops:
        header += [f"{r['model']} {TEXT_LABEL[r['text']]}: ours", "fvcore x 2"]
    rows = []
    for c in COMPONENTS:
        if not any(r["ours"][c] or r["fvcore"][c] for r in flops):
            continue
        rows.append([c] + [num(x, ".3f") for r in flops
                           for x in (r["ours"][c] / 1e9, 2 * r["fvcore"][c] / 1e9)])
    rows.append(["**total**"] + [f"**{x:.2f}**" for r in flops for x in
                                 (sum(r["ours"].values()) / 1e9,
                                  2 * sum(r["fvcore"].values()) / 1e9)])
    notes = [f"- **{c}**: {why}." for c, why in DIFFERENCES.items()]
    conv_rows = []
    for r in flops:
        family = r["model"].split("-")[0]
        paper = PAPER["gflops"][family][r["text"]] if r["model"][-3:] == "B/1" else None
        conv = conventions(r)
        close = [k for k, v in conv.items() if paper and abs(v / paper - 1) < 0.02]
        conv_rows.append([r["model"], TEXT_LABEL[r["text"]], num(conv["ours"], ".2f"),
                          num(conv["ours_macs"], ".2f"), num(conv["fvcore"], ".2f"),
                          num(conv["fvcore_fused"], ".2f"), num(paper, ".2f"),
                          ", ".join(close) or "none"])
    return "\n\n".join([
        f"# FLOPs of {a} and {b}: our counter against fvcore",
        f"Command: `{meta['command']}`; torch {meta['torch']}; fvcore {meta['fvcore']}.",
        f"Ours: {METHOD}  \nfvcore: `fvcore.nn.FlopCountAnalysis` on a jit trace of the same "
        "model (real tensors, 1 image at 32x32x4, the scan traced as an opaque op). fvcore counts "
        "one multiply-add as one flop, so its figures are doubled below to compare with ours "
        "(2 FLOPs per multiply-add); each component is the sum of the ops of the modules it "
        "names (benchmarks/flops.py `component`).",
        "## Per component (GFLOPs per image, 256 px)",
        table(header, rows),
        "Every other component agrees exactly: both counters count Linear, matmul and "
        "convolution layers (depthwise, strided and transposed) from their shapes. The "
        "differences:",
        "\n".join(notes),
        "## Counting conventions against the paper's table (G per image)",
        "- ours: our counter, FLOPs = 2 x multiply-adds, scan by Mamba's formula\n"
        "- ours in MACs: the same in multiply-adds (what fvcore-style tables call 'FLOPs')\n"
        "- fvcore: fvcore on our modules (multiply-adds; no scan, no attention product, no "
        "RMSNorm)\n"
        "- fvcore, fused hidden: what fvcore would have reported on the authors' code, whose "
        "fused mamba_ssm kernels hide from a trace the scan in USM (selective_scan_fn) and "
        "conv1d, x_proj, dt_proj, the scan and out_proj in Zigma (mamba_inner_fn); only "
        "Zigma's in_proj stays visible",
        table(["model", "text", "ours", "ours in MACs", "fvcore", "fvcore, fused hidden",
               "paper", "within 2% of the paper"], conv_rows),
        "## The cost of text: with text - without, per convention (G per image)",
        "The paper's own difference is a second anchor: it does not depend on how the Mamba "
        "layers were counted, only on the counting unit.",
        table(["model", "ours", "ours in MACs", "fvcore", "fvcore, fused hidden", "paper"],
              text_cost_rows(flops)),
    ]) + "\n"


def text_cost_rows(flops: list[dict]) -> list[list[str]]:
    rows = []
    for name in dict.fromkeys(r["model"] for r in flops):
        without, with_text = (conventions(r) for r in flops if r["model"] == name)
        paper = PAPER["gflops"][name.split("-")[0]] if name[-3:] == "B/1" else None
        rows.append([name] + [num(with_text[k] - without[k], ".2f") for k in without]
                    + [num(paper and paper[1] - paper[0], ".2f")])
    return rows


def report(meta: dict, main: list[dict], train: list[dict], rel: list[dict], scale: list[dict],
           scan: list[dict]) -> str:
    a, b = meta["models"]
    main_rows = [[r["model"], TEXT_LABEL[r["text"]], num(r["params_m"]), num(r["gflops"], ".2f"),
                  num(r["gflops"] / 2, ".2f"), num(r["paper_gflops"], ".2f"),
                  num(r["sample_ms"]), num(r["sample_mb"], ".0f"),
                  num(r["sample_batch_img_s"], ".3g"), num(r["sample_batch_mb"], ".0f")]
                 for r in main]
    train_rows = [[r["model"], TEXT_LABEL[r["text"]], regime_label(r),
                   num(r["train_img_s"], ".3g"), num(r["train_mb"], ".0f"),
                   num(r["weights_mb"] + r["gradients_mb"] + r["adamw_mb"], ".0f"),
                   num(r["activations_mb"], ".0f")] for r in train]
    rel_rows = [[r["claim"], r["paper"], r["regime"], claim_figure(r)] for r in rel]
    scale_rows = [[str(r["size"]), str(r["tokens"]), r["model"], num(r["gflops"], ".2f"),
                   num(r.get("sample_ms")), num(r.get("sample_mb"), ".0f"),
                   num(r.get("train_mb"), ".0f")] for r in scale]
    scan_rows = [[r["backend"], str(r["shape"]), num(r["ms"], ".2f"), num(r.get("speedup"), ".1f")]
                 for r in scan]
    return "\n\n".join([
        f"# Efficiency benchmark: {a} vs {b} ({meta['device']})",
        f"Command: `{meta['command']}`  \n"
        f"Date: {meta['date']}; torch {meta['torch']}; {meta['hardware']}; "
        f"threads: {meta['threads']}; load average {meta['load']} on {os.cpu_count()} cores"
        + (" (other work was running: the timings are noisy)" if meta["busy"] else ""),
        f"FLOPs: {METHOD} Cross-checked with fvcore per component in [flops.md](flops.md).  \n"
        f"Timing: median of {meta['repeats']} runs after {meta['warmup']} warm-up. Sampling step "
        f"= one forward in inference mode; training step = forward + backward + AdamW (random "
        f"latents, MSE to a random velocity). Peak memory: {meta['memory']}, in a fresh process "
        f"per model and regime, weights included. Selective scan backend: {meta['scan_backend']}"
        + (" (it holds (B, Di, L, N) intermediates per layer that the fused CUDA kernel keeps "
           "on chip, so its memory is not the paper's)" if meta["scan_backend"] == "torch" else "")
        + ".",
        f"## {a} vs {b}, 256 px (32x32x4 latents, 1024 tokens): FLOPs and sampling",
        table(["model", "text", "params (M)", "GFLOPs", "GMACs", "paper 'GFLOPs'",
               "sampling step (ms, batch 1)", "sampling peak (MiB, batch 1)",
               f"sampling (img/s, batch {meta['sample_batch']})",
               f"sampling peak (MiB, batch {meta['sample_batch']})"], main_rows),
        "## Training",
        f"One row per model and regime. The peak is split into what the parameters cost, "
        f"computed (float32 weights, gradients and AdamW's two moments: 16 bytes per "
        f"parameter), and the rest: activations and temporaries. {meta['train_plan']}",
        table(["model", "text", "regime", "img/s", "peak (MiB)",
               "parameters + gradients + AdamW (MiB)", "activations, the rest (MiB)"],
              train_rows),
        f"## The paper's claims: {a} against {b}",
        "'x% faster' is ambiguous; both readings are given: speed gained = "
        f"{b} time / {a} time - 1, and less time = 1 - {a} time / {b} time. The FLOP ratio does "
        "not depend on counting FLOPs or MACs; the three counting conventions are explained in "
        "[flops.md](flops.md).",
        table(["claim", "paper", "regime", "ours"], rel_rows),
        "## Scaling with the number of tokens (no text, batch 1)",
        f"DiT = timm ViT Blocks of the same width (cost only, no adaLN). Sampling at latents up "
        f"to {meta['timed_max']}, training memory (without checkpointing) up to "
        f"{meta['train_max']} (– = not measured; more with --full).",
        table(["latent", "tokens", "model", "GFLOPs", "sampling step (ms)", "sampling peak (MiB)",
               "training peak (MiB)"], scale_rows),
        f"![scaling]({meta['plot']})",
        "## Selective scan backends",
        "Forward + backward of one scan (benchmarks/bench_scan.py).",
        table(["backend", "shape (B, Di, L, N)", "ms", "speed-up vs reference"], scan_rows),
    ]) + "\n"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="USM-B/1,Zigma-B/1",
                        help="two registry names, compared as first / second")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-size", type=int, help="training latent size (default: planned, "
                        "see --full)")
    parser.add_argument("--train-batch", type=int, help="training batch (default: planned)")
    parser.add_argument("--sample-batch", type=int,
                        help="batch of the sampling throughput (default 2 on CPU, the authors' "
                        "sample.py command, 16 on GPU)")
    parser.add_argument("--sizes", default="16,32,64,128", help="latent sizes for the scaling")
    parser.add_argument("--full", action="store_true",
                        help="on CPU also: training at the authors' batch 8 on 32x32 latents or "
                        "the largest batch that fits (planned from the free memory), training "
                        "with text, sampling at every scaling size and training memory up to "
                        "32x32 (always done on GPU)")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count FLOPs (ours and fvcore's) and write flops.md")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up and 1 timed run, small scan shapes: a smoke test")
    parser.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/"
                        "<device type>): writes <out>.md, <out>.json, scaling_<name>.png and "
                        "flops.md beside them")
    add_scan_backend(parser)
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    if len(args.models) != 2 or not all(m in All_models for m in args.models):
        parser.error(f"--models needs two of {sorted(All_models)}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.cpu = torch.device(args.device).type == "cpu"
    args.sample_batch = args.sample_batch or (2 if args.cpu else 16)
    # Heavy cases on CPU wait for --full: timing latents over 32x32, training with text,
    # training memory over 16x16 latents.
    args.train_text = args.full or not args.cpu
    args.timed_max = max(args.sizes) if args.train_text else MAIN_SIZE
    args.train_max = max(args.sizes) if not args.cpu else MAIN_SIZE if args.full else 16
    args.out = args.out or Path("benchmarks/results") / torch.device(args.device).type
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    warmup, repeats = (1, 1) if args.quick else ((1, 2) if args.cpu else (3, 10))
    print(use_scan_backend(args.scan_backend, device), flush=True)
    timing = {"device": args.device, "threads": torch.get_num_threads(), "warmup": warmup,
              "repeats": repeats, "scan_backend": args.scan_backend}
    plot_path = args.out.parent / f"scaling_{args.out.name}.png"
    # The thread count changes the timings: record it as part of the command when set.
    threads_var = os.environ.get("OMP_NUM_THREADS")
    env = [f"OMP_NUM_THREADS={threads_var}"] if threads_var else []
    meta = {
        "command": " ".join([*env, "python -m benchmarks.benchmark",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "device": device.type,
        "hardware": hardware(device), "threads": timing["threads"],
        "models": args.models, "sample_batch": args.sample_batch,
        "warmup": warmup, "repeats": repeats,
        "timed_max": args.timed_max, "train_max": args.train_max, "plot": plot_path.name,
        "memory": "peak RSS (VmHWM of /proc/self/status) minus the RSS after imports" if args.cpu
                  else "CUDA allocator peak",
        "flops_method": METHOD,
        "scan_backend": resolve_backend(device)[0],
        "train_plan": train_plan_text(args),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    flops = flop_components(args.models)
    meta["fvcore"] = importlib.metadata.version("fvcore")
    flops_path = args.out.parent / "flops.md"
    flops_path.write_text(flops_report(meta, flops))
    if args.flops_only:
        print(flops_path.read_text())
        return
    load_start = os.getloadavg()[0]
    main_rows = main_table(args, timing)
    train_rows = training_table(args, timing)
    rel = ratios(main_rows, train_rows, flops, args.models, args.sample_batch)
    scale = scaling(args, timing, main_rows, train_rows)
    scan = scan_backends(args.device, args.quick, warmup, repeats)
    # The load at the end includes this benchmark's own threads; beyond them, others ran.
    load_end = os.getloadavg()[0]
    meta["load"] = f"{load_start:.2f} at start, {load_end:.2f} at end"
    meta["busy"] = load_start > 1 or load_end > timing["threads"] + 1
    plot(scale, plot_path)
    text = report(meta, main_rows, train_rows, rel, scale, scan)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "main": main_rows, "training": train_rows, "ratios": rel,
         "flops": flops, "scaling": scale, "scan": scan}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
