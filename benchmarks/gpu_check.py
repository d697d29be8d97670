"""One command for any GPU: does the fast path work here, and how fast is it?

    bash scripts/gpu_check.sh          # = python -m benchmarks.gpu_check; about 5-10 min on an H100

Offline and idempotent (scratch files in a temporary folder, the report replaced whole):
1. environment and kernel report (`python -m selective_scan`);
2. mamba_ssm's kernel against the PyTorch scan, output and every gradient, float32 and bfloat16,
   at USM-B's full-resolution shapes (batch 8, Di 1536, L 1024, N 16);
3. USM-B/1 and Zigma-B/1 at 256 px (32x32x4 latents), bf16 autocast, with and without gradient
   checkpointing, each with each backend that loads: training img/s at batch 8 and its peak
   memory, sampling-step latency at batch 1 (benchmarks/benchmark.py's `measure_training` and
   `measure_sampling`, each in a fresh process);
4. a short real run: train.py (USM-T/2, bf16, generated images; the loss must fall) and sample.py
   on its checkpoint.
Writes benchmarks/results/gpu.md (--out). Without CUDA it says so and exits 2, writing nothing.
"""

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.benchmark import isolated, measure_sampling, measure_training, table
from selective_scan import mamba_ssm_available
from selective_scan.check import PARITY_TOL, kernel_report, scan_parity
from selective_scan.dispatch import selective_scan

REPO = Path(__file__).resolve().parents[1]
USM_B_SCAN = {"batch": 8, "dim": 1536, "length": 1024, "state": 16}  # first stage of USM-B/1
MODELS = ("USM-B/1", "Zigma-B/1")
BATCH, SIZE = 8, 32  # latents of 256 px images
COLORS = ((230, 40, 90), (30, 160, 220), (250, 210, 40), (60, 200, 90))  # one per class


def parity_rows(backend: str, against: str, device: str, shape: dict) -> list[dict]:
    """scan_parity of two backends in float32 and bfloat16, judged against PARITY_TOL."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        errors = scan_parity(lambda **kw: selective_scan(**kw, backend=backend),
                             lambda **kw: selective_scan(**kw, backend=against),
                             **shape, dtype=dtype, device=device)
        worst = max(errors, key=errors.get)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "errors": errors,
                     "worst": worst, "tol": PARITY_TOL[dtype],
                     "ok": errors[worst] <= PARITY_TOL[dtype]})
    return rows


def model_rows(backends: list[str], warmup: int, repeats: int) -> list[dict]:
    """Training and sampling figures for every model x backend x checkpointing; a configuration
    that does not fit in memory is recorded as such."""
    rows = []
    for name in MODELS:
        for backend in backends:
            for checkpoint in (False, True):
                print(f"measuring {name}, {backend} scan, checkpointing {checkpoint}", flush=True)
                row = {"model": name, "backend": backend, "checkpoint": checkpoint}
                common = dict(name=name, size=SIZE, text=False, device="cuda", threads=1,
                              warmup=warmup, repeats=repeats, scan_backend=backend,
                              precision="bf16")
                try:
                    row |= isolated(measure_training, batch=BATCH, checkpoint=checkpoint,
                                    **common)
                    row |= isolated(measure_sampling, batch=BATCH, **common)
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                rows.append(row)
    return rows


def make_images(root: Path, per_class: int = 16, size: int = 32) -> Path:
    """An ImageFolder of flat-colour images, one colour per class: learnable in a few steps."""
    for split in ("train", "val"):
        for k, color in enumerate(COLORS):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), color).save(folder / f"{i:03d}.png")
    return root


def run_script(command: list[str]) -> str:
    """Run a repository script; its log (stderr), or RuntimeError with the log's end."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[1:3])} failed:\n{result.stderr[-3000:]}")
    return result.stderr


def training_run(work: Path, steps: int = 300) -> dict:
    """train.py and sample.py as a user runs them; returns the logged losses and the samples."""
    data = make_images(work / "data")
    train = [sys.executable, "train.py", "--model", "USM-T/2", "--data-path", str(data),
             "--results-dir", str(work / "results"), "--vae", "none", "--image-size", "32",
             "--num-classes", str(len(COLORS)), "--batch-size", "32", "--lr", "1e-3",
             "--ema-decay", "0.99", "--max-steps", str(steps), "--log-every", str(steps // 6),
             "--ckpt-every", str(steps), "--sample-every", str(steps),
             "--mixed-precision", "bf16", "--report-to", "none", "--num-workers", "2"]
    log = run_script(train)
    losses = [float(x) for x in re.findall(r"\(step=\d+\) loss=(\S+)", log)]  # log lines only
    backend = re.search(r"Selective scan backend: .*", log)[0]
    npz = work / "samples.npz"
    sample = [sys.executable, "sample.py", "--ckpt", str(work / "results" / "000-USM-T-2"),
              "--num-samples", "16", "--batch-size", "16", "--sample-dir", str(npz.with_suffix(""))]
    run_script(sample)
    images = np.load(npz)["arr_0"]
    return {"command": " ".join(train[1:]), "losses": losses, "backend": backend,
            "falls": len(losses) > 1 and losses[-1] < 0.5 * losses[0],
            "samples": list(images.shape)}


def report(meta: dict, parity: list[dict], models: list[dict], run: dict) -> str:
    """benchmarks/results/gpu.md from the measurements."""
    names = ["out", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    parity_table = table(
        ["dtype", *names, "tolerance", "result"],
        [[r["dtype"], *(f"{r['errors'][n]:.1e}" for n in names), f"{r['tol']:.0e}",
          "ok" if r["ok"] else f"FAILED ({r['worst']})"] for r in parity],
    ) if parity else "Not run: mamba_ssm's kernel does not load here (see the report above)."
    model_table = table(
        ["model", "scan", "checkpointing", "training img/s", "training peak (MiB)",
         "sampling step (ms)", "sampling peak (MiB)"],
        [[r["model"], r["backend"], "yes" if r["checkpoint"] else "no",
          *((r["error"], "–", "–", "–") if "error" in r else
            (f"{r['train_img_s']:.1f}", f"{r['train_mb']:.0f}", f"{r['sample_ms']:.1f}",
             f"{r['sample_mb']:.0f}"))] for r in models])
    losses = ", ".join(f"{x:.4f}" for x in run["losses"])
    return "\n\n".join([
        f"# GPU check ({meta['gpu']})",
        f"Command: `bash scripts/gpu_check.sh` ({meta['date']})",
        "## Environment and kernels", f"```\n{meta['kernels']}\n```",
        f"## Kernel vs PyTorch scan (batch {USM_B_SCAN['batch']}, Di {USM_B_SCAN['dim']}, "
        f"L {USM_B_SCAN['length']}, N {USM_B_SCAN['state']})",
        "max |kernel - torch| / max |torch| for the output and the gradient of each input.",
        parity_table,
        f"## {' vs '.join(MODELS)}, 256 px (32x32x4 latents), bf16 autocast",
        f"Training: forward + backward + AdamW at batch {BATCH}; sampling step: one forward at "
        f"batch 1; peak memory: torch.cuda.max_memory_allocated of a fresh process; median of "
        f"{meta['repeats']} after {meta['warmup']} warm-up.",
        model_table,
        "## A short real run",
        f"`python {run['command']}`, then sample.py on its checkpoint.  \n"
        f"{run['backend']}  \nLogged losses: {losses} "
        f"({'falls' if run['falls'] else 'DOES NOT FALL'}); samples: {run['samples']}.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu.md")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 1 timed run, 60 steps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing measured, nothing written",
              file=sys.stderr)
        return 2
    warmup, repeats = (1, 1) if args.quick else (2, 5)
    kernels = kernel_report()
    print(kernels, flush=True)
    kernel = mamba_ssm_available()
    parity = parity_rows("mamba_ssm", "torch", "cuda", USM_B_SCAN) if kernel else []
    models = model_rows(["torch", "mamba_ssm"] if kernel else ["torch"], warmup, repeats)
    with tempfile.TemporaryDirectory() as work:
        run = training_run(Path(work), 60 if args.quick else 300)
    meta = {"gpu": torch.cuda.get_device_name(), "kernels": kernels, "warmup": warmup,
            "repeats": repeats, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    text = report(meta, parity, models, run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)  # the report appears whole or not at all
    print(text)
    ok = kernel and all(r["ok"] for r in parity) and run["falls"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
