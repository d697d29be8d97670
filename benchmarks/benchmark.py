"""Efficiency benchmark: USM against Zigma on the same hardware (SPEC "Published numbers").

    python -m benchmarks.benchmark                 # CPU: a few minutes on 2 quiet cores
    python -m benchmarks.benchmark --full          # CPU: also the heavy cases (see --full)
    python -m benchmarks.benchmark --device cuda   # GPU: everything timed, mamba_ssm if installed

For each model at 256 px (32x32x4 SD-VAE latents), without and with text (CLIP-like context
77x768): parameters, forward GFLOPs per image (benchmarks/flops.py), latency of one sampling
step (batch 1), throughput of one training step (forward + backward + AdamW), and the peak memory
of each (CUDA allocator peak; on CPU the peak RSS of a fresh process minus its RSS after imports).
Then the scaling with the latent size (tokens) against a DiT of the same width, and the selective
scan backends. Writes <out>.md, <out>.json and scaling_<name>.png.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from benchmarks.bench_scan import time_backends, time_fn
from benchmarks.flops import METHOD, count_flops
from cli import add_scan_backend, use_scan_backend
from models import All_models
from selective_scan import resolve_backend, set_backend

matplotlib.use("Agg")  # headless: the plot is only written to a file
import matplotlib.pyplot as plt  # noqa: E402

LATENT_CHANNELS = 4  # SD-VAE latents: 256x256x3 -> 32x32x4
MAIN_SIZE = 32  # the paper's setting: 256 px images
CONTEXT = (77, 768)  # CLIP ViT-L/14 text encoder, last hidden state
# The paper's anchors (SPEC): GFLOPs without / with text, and its relative claims.
PAPER = {
    "gflops": {"USM": (20.66, 40.84), "Zigma": (64.12, 105.94)},
    "faster": (0.73, 0.81),  # "x% faster sampling step", without / with text
    "less_memory": "30-39%",
}
# DiT sizes (Peebles & Xie 2023, Table 1; T matches our tiny CPU models): width, depth, heads.
DIT_SIZES = {"XL": (1152, 28, 16), "L": (1024, 24, 16), "B": (768, 12, 12), "S": (384, 12, 6),
             "T": (64, 12, 1)}


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

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.vit.forward_features(x))


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


def params_and_flops(name: str, size: int, text: bool) -> tuple[int, int]:
    """Parameter count and forward FLOPs for one image, on the meta device (nothing computed)."""
    with torch.device("meta"):
        model = build(name, size, text)
        x, t, kwargs = inputs(1, size, text, torch.device("meta"))
        flops = count_flops(model, x, t, **kwargs)["total"]
    return sum(p.numel() for p in model.parameters()), flops


def peak_bytes(device: torch.device) -> int:
    """High-water mark of this process: CUDA allocator peak, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # VmHWM of this process's own memory map (Linux). Not getrusage's ru_maxrss: exec carries
    # the parent's peak over into a spawned child, hiding everything below it.
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmHWM:")).split()[1]) * 1024


def measure(name: str, size: int, text: bool, train_batch: int | None, checkpoint: bool,
            device: str, threads: int, warmup: int, repeats: int, scan_backend: str = "auto",
            precision: str = "no") -> dict[str, float]:
    """Time one sampling step (and one training step), each after `warmup` untimed runs.

    Runs in a fresh process, so its memory high-water mark belongs to this model alone. The
    training peak is read after the sampling one: the high-water mark cannot be lowered on CPU,
    which is harmless because training holds everything sampling does and more. `checkpoint`
    recomputes each block in the backward pass (the authors train with --use_ckpt).
    `scan_backend` is the selective scan's; precision "bf16" / "fp16" runs under autocast.
    """
    torch.set_num_threads(threads)
    set_backend(scan_backend)  # a spawned process starts from the default
    dev = torch.device(device)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                         enabled=precision != "no")
    base = peak_bytes(dev)
    torch.manual_seed(0)
    model = build(name, size, text, checkpoint).to(dev)
    x, t, kwargs = inputs(1, size, text, dev)
    model.eval()
    with torch.inference_mode(), amp:
        result = {"sample_ms": 1e3 * time_fn(lambda: model(x, t, **kwargs), warmup, repeats)}
    result["sample_mb"] = (peak_bytes(dev) - base) / 2**20
    if train_batch:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        x, t, kwargs = inputs(train_batch, size, text, dev)
        target = torch.randn_like(x)  # the velocity target of rectified flow: same shapes

        def train_step() -> None:
            with amp:
                loss = F.mse_loss(model(x, t, **kwargs).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        result["train_img_s"] = train_batch / time_fn(train_step, warmup, repeats)
        result["train_mb"] = (peak_bytes(dev) - base) / 2**20
    return result


def measure_isolated(**kwargs) -> dict[str, float]:
    """`measure` in a fresh spawned process (spawn: a forked child would share our heap)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, **kwargs).result()


def main_table(args: argparse.Namespace, timing: dict) -> list[dict]:
    """Both models without and with text at 256 px: the paper's efficiency table."""
    rows = []
    for text in (False, True):
        for name in args.models:
            params, flops = params_and_flops(name, MAIN_SIZE, text)
            family = name.split("-")[0]
            paper = PAPER["gflops"][family][text] if name in ("USM-B/1", "Zigma-B/1") else None
            print(f"measuring {name} text={text}", flush=True)
            rows.append({"model": name, "text": text, "params_m": params / 1e6,
                         "gflops": flops / 1e9, "paper_gflops": paper,
                         **measure_isolated(name=name, size=MAIN_SIZE, text=text,
                                            train_batch=args.batch if not text
                                            or args.train_text else None, **timing)})
    return rows


def ratios(rows: list[dict], models: list[str]) -> list[dict]:
    """First model over second for each figure, per text setting; None where a figure was not
    measured (or a peak read 0, as it does in-process)."""
    out = []
    for text in (False, True):
        a, b = ({r["model"]: r for r in rows if r["text"] == text}[m] for m in models)
        over = {k: a[k] / b[k] if a.get(k) and b.get(k) else None
                for k in ("gflops", "sample_ms", "sample_mb", "train_img_s", "train_mb")}
        out.append({"text": text, **over, "paper_gflops": PAPER["gflops"]["USM"][text]
                    / PAPER["gflops"]["Zigma"][text], "paper_faster": PAPER["faster"][text]})
    return out


def scaling(args: argparse.Namespace, timing: dict, main: list[dict]) -> list[dict]:
    """GFLOPs at every latent size; latency and memory up to args.timed_max."""
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
                print(f"measuring {name} at {size}x{size}", flush=True)
                row |= measure_isolated(name=name, size=size, text=False, train_batch=None,
                                        **timing)
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    metrics = [("gflops", "forward GFLOPs / image"), ("sample_ms", "sampling step (ms, batch 1)"),
               ("sample_mb", "sampling peak memory (MiB)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def num(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def saved(ratio: float | None) -> str:
    """'x% less' from a ratio first / second."""
    return num(None if ratio is None else 1 - ratio, ".0%")


def report(meta: dict, main: list[dict], rel: list[dict], scale: list[dict],
           scan: list[dict]) -> str:
    a, b = meta["models"]
    text_label = {False: "no", True: "77x768"}
    main_rows = [[r["model"], text_label[r["text"]], num(r["params_m"]), num(r["gflops"], ".2f"),
                  num(r["gflops"] / 2, ".2f"), num(r["paper_gflops"], ".2f"),
                  num(r["sample_ms"]), num(r["sample_mb"], ".0f"),
                  num(r.get("train_img_s"), ".3g"), num(r.get("train_mb"), ".0f")] for r in main]
    rel_rows = [[text_label[r["text"]], f"{r['gflops']:.2f} ({r['paper_gflops']:.2f})",
                 f"{1 / r['sample_ms']:.2f}x",  # sampling steps per second, a over b
                 f"{1 / r['sample_ms'] - 1:.0%} ({r['paper_faster']:.0%})", saved(r["sample_ms"]),
                 saved(r["sample_mb"]), f"{saved(r['train_mb'])} ({PAPER['less_memory']})",
                 num(r["train_img_s"], ".2f")] for r in rel]
    scale_rows = [[str(r["size"]), str(r["tokens"]), r["model"], num(r["gflops"], ".2f"),
                   num(r.get("sample_ms")), num(r.get("sample_mb"), ".0f")] for r in scale]
    scan_rows = [[r["backend"], str(r["shape"]), num(r["ms"], ".2f"), num(r.get("speedup"), ".1f")]
                 for r in scan]
    return "\n\n".join([
        f"# Efficiency benchmark: {a} vs {b} ({meta['device']})",
        f"Command: `{meta['command']}`  \n"
        f"Date: {meta['date']}; torch {meta['torch']}; {meta['hardware']}; "
        f"threads: {meta['threads']}; load average {meta['load']} on {os.cpu_count()} cores"
        + (" (other work was running: the timings are noisy)" if meta["busy"] else ""),
        f"FLOPs: {METHOD}  \n"
        f"Timing: median of {meta['repeats']} runs after {meta['warmup']} warm-up. Sampling step "
        f"= one forward at batch 1 in inference mode; training step = forward + backward + AdamW "
        f"at batch {meta['batch']} (random latents, MSE to a random velocity), "
        f"{'with' if meta['checkpoint'] else 'without'} per-block gradient checkpointing (the "
        f"authors train with --use_ckpt). Peak memory: {meta['memory']}, weights included. "
        f"Selective scan backend: {meta['scan_backend']}"
        + (" (it holds (B, Di, L, N) intermediates per layer that the fused CUDA kernel keeps "
           "on chip, so its memory is not the paper's)" if meta["scan_backend"] == "torch" else "")
        + ".",
        f"## {a} vs {b}, 256 px (32x32x4 latents, 1024 tokens)",
        table(["model", "text", "params (M)", "GFLOPs", "GMACs", "paper 'GFLOPs'",
               "sampling step (ms)", "sampling peak (MiB)", f"training (img/s, batch "
               f"{meta['batch']})", "training peak (MiB)"], main_rows),
        "– = not measured (on CPU, training with text needs --full).",
        f"## Ratios {a} / {b} (paper in brackets)",
        f"'x% faster' is ambiguous; both readings are given: speed gained = {b} time / {a} time "
        f"- 1, time saved = 1 - {a} time / {b} time. The FLOP ratio does not depend on "
        "counting FLOPs or MACs.",
        table(["text", "GFLOPs ratio", "sampling speed-up", "faster (speed gained)", "time saved",
               "sampling memory saved", "training memory saved", "training img/s ratio"],
              rel_rows),
        "## Scaling with the number of tokens (no text, batch 1)",
        f"DiT = timm ViT Blocks of the same width (cost only, no adaLN). Latency and memory at "
        f"latents up to {meta['timed_max']} unless --full (– = not measured).",
        table(["latent", "tokens", "model", "GFLOPs", "sampling step (ms)", "peak (MiB)"],
              scale_rows),
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
    parser.add_argument("--batch", type=int, help="training batch (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--no-ckpt", action="store_true",
                        help="train without per-block gradient checkpointing (needs far more "
                        "memory with the torch scan)")
    parser.add_argument("--sizes", default="16,32,64,128", help="latent sizes for the scaling")
    parser.add_argument("--full", action="store_true",
                        help="on CPU also time the scaling sizes over 32 and training with "
                        "text (always done on GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up and 1 timed run, small scan shapes: a smoke test")
    parser.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/"
                        "<device type>): writes <out>.md, <out>.json, scaling_<name>.png")
    add_scan_backend(parser)
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    if len(args.models) != 2 or not all(m in All_models for m in args.models):
        parser.error(f"--models needs two of {sorted(All_models)}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    args.batch = args.batch or (1 if cpu else 8)
    # Heavy cases on CPU wait for --full: timing latents over 32x32, training with text.
    args.train_text = args.full or not cpu
    args.timed_max = max(args.sizes) if args.train_text else 32
    args.out = args.out or Path("benchmarks/results") / device.type
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    warmup, repeats = (1, 1) if args.quick else ((1, 2) if cpu else (3, 10))
    print(use_scan_backend(args.scan_backend, device), flush=True)
    timing = {"device": args.device, "threads": torch.get_num_threads(), "warmup": warmup,
              "repeats": repeats, "checkpoint": not args.no_ckpt,
              "scan_backend": args.scan_backend}
    plot_path = args.out.parent / f"scaling_{args.out.name}.png"
    # The thread count changes the timings: record it as part of the command when set.
    threads_var = os.environ.get("OMP_NUM_THREADS")
    env = [f"OMP_NUM_THREADS={threads_var}"] if threads_var else []
    meta = {
        "command": " ".join([*env, "python -m benchmarks.benchmark", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "device": device.type, "hardware": hardware(device),
        "threads": timing["threads"],
        "models": args.models, "batch": args.batch, "checkpoint": not args.no_ckpt,
        "warmup": warmup, "repeats": repeats,
        "timed_max": args.timed_max, "plot": plot_path.name,
        "memory": "peak RSS of a fresh process minus its RSS after imports" if cpu else
                  "CUDA allocator peak",
        "flops_method": METHOD,
        "scan_backend": resolve_backend(device)[0],
    }
    load_start = os.getloadavg()[0]
    main_rows = main_table(args, timing)
    rel = ratios(main_rows, args.models)
    scale = scaling(args, timing, main_rows)
    scan = scan_backends(args.device, args.quick, warmup, repeats)
    # The load at the end includes this benchmark's own threads; beyond them, others ran.
    load_end = os.getloadavg()[0]
    meta["load"] = f"{load_start:.2f} at start, {load_end:.2f} at end"
    meta["busy"] = load_start > 1 or load_end > timing["threads"] + 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(scale, plot_path)
    text = report(meta, main_rows, rel, scale, scan)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "main": main_rows, "ratios": rel, "scaling": scale, "scan": scan},
        indent=1))
    print(text)


if __name__ == "__main__":
    main()
