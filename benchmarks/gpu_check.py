"""One command for any GPU: do the kernels build and agree with the PyTorch scan, how fast and how
lean are the models, and does all of it fit in nine minutes?

    bash scripts/gpu_check.sh --bundle .gpu-bundle   # the kernels built offline, then this

Each step runs in its own process with a share of --budget (default 540 s, counted from the start
of scripts/gpu_check.sh, so the kernel build spends it too); a step whose share is short runs
shortened, one that cannot fit is skipped, and gpu.md says so. gpu.md is rewritten after every
step, so it exists whatever fails or is killed:
1. environment and kernel report (`python -m selective_scan`'s);
2. every GPU scan (mamba_ssm, triton) against the PyTorch scan, output and every gradient,
   float32 and bfloat16, at the first stage of USM-B/1 (batch 8, Di 1536, L 1024, N 16); a
   backend that is not available here is reported with the reason;
3. the scan's forward + backward time per backend (mamba_ssm, triton, torch) at USM-B/1's four
   stages (L 1024, 256, 64, 16), float32 and bfloat16;
4. USM-B/1 and Zigma-B/1 at 256 px (32x32x4 latents), bf16 autocast: training img/s at batch 8
   and its peak memory, with and without gradient checkpointing, and sampling-step latency
   (benchmarks/benchmark.py's measurements); then USM-B/1's training with each other backend;
   the paper's claims at this setting: USM-B/1 >= 1.7x Zigma-B/1's training img/s and <= 0.7x
   its memory without checkpointing;
5. a short real run: train.py (USM-T/2, bf16, flat-colour images: the loss must fall), then
   sample.py on its checkpoint.
--dry-run runs the same plumbing on the CPU with tiny shapes (no CUDA call); the test suite runs
it, so a broken script shows before a GPU is at hand.

The one command for a GPU session (the device tool's `run`: the repository root, `python3` with
torch 2.11+cu130 and no mamba-ssm, no network, 10 minutes a command), with timeout_s 600 and
carry [".gpu-bundle"] (made here first: `bash scripts/make_gpu_bundle.sh`):

    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc;
    nvcc --version | tail -n 2; timeout 590 bash scripts/gpu_check.sh --bundle .gpu-bundle
    --out "$OUT/gpu.md" > "$OUT/log.txt" 2>&1; echo "gpu_check rc=$?"; tail -c 8000 "$OUT/log.txt"

(one line); then commit $OUT/gpu.md as benchmarks/results/gpu.md.
"""

import argparse
import datetime
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_scan import fwd_bwd, time_fn
from selective_scan import resolve_backend, selective_scan
from selective_scan.check import (
    PARITY_TOL,
    kernel_report,
    package_version,
    scan_inputs,
    scan_parity,
)

REPO = Path(__file__).resolve().parents[1]
NINE_MINUTES = 540
GPU_BACKENDS = ("mamba_ssm", "triton")  # "triton": selective_scan/ once that backend exists
USM_B_SCANS = [{"batch": 8, "dim": 1536, "length": n, "state": 16} for n in (1024, 256, 64, 16)]
MODELS = ("USM-B/1", "Zigma-B/1")
BATCH, SIZE = 8, 32  # latents of 256 px images
# Seconds each step is planned to take on an H100, and the least it can do anything useful in:
# 345 s in all, the rest of 540 s after a kernel build of about 3 min (estimated from a build
# without a GPU: 20 CPU-min for both kernels, its longest file ~2 min of one core).
PLAN = {"report": (30, 15), "parity": (45, 20), "scan": (40, 15), "models": (150, 60),
        "run": (80, 40)}
DRY = {"scans": [{"batch": 2, "dim": 8, "length": n, "state": 4} for n in (16, 4)],
       "models": ("USM-T/1", "Zigma-T/1"), "batch": 2, "size": 8}
GRACE = 20  # seconds a worker past its deadline may take to finish its measurement
COLORS = ((230, 40, 90), (30, 160, 220), (250, 210, 40), (60, 200, 90))  # one per class


#################################################################################
#                 The measurements, each run in a worker process                 #
#################################################################################


def unavailable(backend: str, device: str) -> str | None:
    """Why `backend` cannot scan tensors on `device` here, or None when it can. Unknown names
    (ValueError: "triton" before selective_scan has it) and missing kernels (RuntimeError) alike."""
    try:
        resolve_backend(device, backend)
    except (ValueError, RuntimeError) as err:
        return f"not available here ({type(err).__name__}: {err})"
    return None


SPENT = "not measured: the step's share of the budget was spent"


def parity(backends: list[str], device: str, shape: dict, deadline: float) -> list[dict]:
    """Each backend against the PyTorch scan in float32 and bfloat16, judged by PARITY_TOL; none
    begun after `deadline` (Unix time), as in every worker."""
    results = []
    for backend in backends:
        why = SPENT if time.time() > deadline else unavailable(backend, device)
        if why:
            results.append({"backend": backend, "unavailable": why})
            continue
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            errors = scan_parity(partial(selective_scan, backend=backend),
                                 partial(selective_scan, backend="torch"), **shape, dtype=dtype,
                                 device=device)
            worst = max(errors, key=errors.get)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "errors": errors,
                         "worst": worst, "tol": PARITY_TOL[dtype],
                         "ok": errors[worst] <= PARITY_TOL[dtype]})
        results.append({"backend": backend, "rows": rows})
    return results


def scan_times(backends: list[str], device: str, shapes: list[dict], warmup: int,
               repeats: int, deadline: float) -> dict:
    """Median forward + backward milliseconds of each available backend per shape and dtype."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            if time.time() > deadline:
                return {"rows": rows, "cut": True}
            inputs = scan_inputs(**shape, dtype=dtype, device=device)
            grad = torch.randn_like(inputs["u"])
            row = {"dtype": str(dtype).removeprefix("torch."), **shape}
            for backend in backends:
                scan = partial(selective_scan, backend=backend)
                row[backend] = 1e3 * time_fn(fwd_bwd(scan, inputs, grad), warmup, repeats)
            rows.append(row)
    return {"rows": rows, "cut": False}


def fresh_peak(fn, **kwargs) -> dict:
    """fn(**kwargs) with the CUDA high-water mark reset first, so that several measurements can
    share one process (on the CPU, --dry-run, it cannot be reset: those figures are plumbing)."""
    gc.collect()  # the previous measurement's model and optimizer state
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        return fn(**kwargs)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}


def model_figures(names: list[str], backend: str, checkpointing: list[bool], sampling: bool,
                  device: str, size: int, batch: int, warmup: int, repeats: int,
                  deadline: float) -> list[dict]:
    """benchmark.py's training figures (img/s, peak MiB) of each model for each checkpointing
    setting, and its sampling figures (step latency at batch 1, peak) in the row without."""
    # Imported here: benchmark.py reaches diffusers (through cli.py), which a machine may lack
    # when the bundle did not install; the other steps still run and gpu.md says what failed.
    from benchmarks.benchmark import measure_sampling, measure_training
    rows = []
    for name in names:
        common = dict(name=name, size=size, text=False, device=device, threads=1,
                      warmup=warmup, repeats=repeats, scan_backend=backend, precision="bf16")
        for checkpoint in checkpointing:
            row = {"model": name, "backend": backend, "checkpoint": checkpoint}
            if time.time() > deadline:
                rows.append(row | {"error": SPENT})
                continue
            row |= fresh_peak(measure_training, batch=batch, checkpoint=checkpoint, **common)
            if sampling and not checkpoint:
                row |= fresh_peak(measure_sampling, batch=batch, **common)
            rows.append(row)
    return rows


WORKERS = {"parity": parity, "scan_times": scan_times, "model_figures": model_figures}


class StepError(RuntimeError):
    pass


def call(worker: str, timeout: float, **kwargs) -> object:
    """WORKERS[worker](**kwargs) in a fresh process (its own CUDA context and memory peak). It
    begins no measurement after `timeout` seconds, and is killed (subprocess.TimeoutExpired) if
    the one under way has not ended GRACE seconds later."""
    kwargs["deadline"] = time.time() + timeout
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--worker", worker, json.dumps(kwargs)],
        cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 0) + GRACE)
    if result.returncode:
        raise StepError(f"{worker} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


#################################################################################
#                                   The steps                                    #
#################################################################################


class Budget:
    """Seconds left of the whole check, and each step's share of them: its plan, less what the
    steps after it need at least."""

    def __init__(self, total: float, since: float):
        self.deadline = since + total

    def share(self, step: str) -> tuple[float, bool]:
        """(seconds this step may take, whether it must run shortened); 0 seconds: skip it."""
        later = list(PLAN)[list(PLAN).index(step) + 1:]
        left = self.deadline - time.time() - sum(PLAN[s][1] for s in later)
        planned, least = PLAN[step]
        return (0.0, True) if left < least else (min(left, planned * 1.5), left < planned)


def models_step(device: str, backends: list[str], dry: bool, short: bool, timeout: float) -> dict:
    """Step 4: both models with the fastest backend there is, each in its own process (the dry
    run: both in one, to stay cheap), then USM-B/1 with each other backend."""
    models, size, batch = (DRY["models"], DRY["size"], DRY["batch"]) if dry else (
        MODELS, SIZE, BATCH)
    short |= dry
    warmup, repeats = (1, 2) if short else (2, 5)
    end = time.monotonic() + timeout
    figures = partial(call, "model_figures", size=size, batch=batch, device=device,
                      warmup=warmup, repeats=repeats)
    rows = []
    groups = [list(models)] if dry else [[name] for name in models]
    for i, names in enumerate(groups):  # an equal part of what is left to each
        rows += figures((end - time.monotonic()) / (len(groups) - i), names=names,
                        backend=backends[0], checkpointing=[False, True], sampling=True)
    # The comparison above comes first; the other backends only in a full run.
    skipped = backends[1:] if short else []
    for backend in [] if short else backends[1:]:
        rows += figures(end - time.monotonic(), names=[models[0]], backend=backend,
                        checkpointing=[False], sampling=False)
    return {"rows": rows, "skipped_backends": skipped, "model": models[0], "warmup": warmup,
            "repeats": repeats}


def environment_report() -> str:
    """Step 1: kernel_report's versions and backends, and what else the timings depend on."""
    from torch.utils.cpp_extension import CUDA_HOME  # (imported here: it warns without CUDA)
    path = shutil.which("nvcc") or (CUDA_HOME and str(Path(CUDA_HOME) / "bin" / "nvcc"))
    nvcc = subprocess.run([path, "--version"], capture_output=True, text=True) if (
        path and Path(path).exists()) else None
    lines = [kernel_report(), f"CPU cores: {os.cpu_count()}",
             *(f"{name}: {package_version(name)}" for name in ("triton", "diffusers")),
             f"nvcc: {nvcc.stdout.strip().splitlines()[-1] if nvcc else 'not found'}"]
    if torch.cuda.is_available():
        lines.append(f"GPU memory: {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} "
                     f"GiB")
    return "\n".join(lines)


def make_images(root: Path, per_class: int = 16, size: int = 32) -> Path:
    """An ImageFolder of flat-colour images, one colour per class: learnable in a few steps."""
    for split in ("train", "val"):
        for k, color in enumerate(COLORS):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), color).save(folder / f"{i:03d}.png")
    return root


def run_script(command: list[str], timeout: float) -> str:
    """A repository script's log (stderr), or StepError with the log's end."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            timeout=max(timeout, 1))
    if result.returncode:
        raise StepError(f"{' '.join(command[1:3])} failed:\n{result.stderr[-3000:]}")
    return result.stderr


def training_run(work: Path, dry: bool, short: bool, timeout: float) -> dict:
    """Step 5: train.py and sample.py as a user runs them; the logged losses and the samples."""
    end = time.monotonic() + timeout
    steps = 4 if dry else 60 if short else 300
    data = make_images(work / "data", size=8 if dry else 32)
    model = ["--model", "USM-T/1", "--stages", "1", "--image-size", "8"] if dry else [
        "--model", "USM-T/2", "--image-size", "32", "--mixed-precision", "bf16"]
    train = [sys.executable, "train.py", *model, "--data-path", str(data),
             "--results-dir", str(work / "results"), "--vae", "none",
             "--num-classes", str(len(COLORS)), "--batch-size", "32", "--lr", "1e-3",
             "--ema-decay", "0.99", "--max-steps", str(steps), "--log-every", str(steps // 4),
             "--ckpt-every", str(steps), "--sample-every", str(steps), "--fid-every", "0",
             "--report-to", "none", "--num-workers", "0" if dry else "2"]
    log = run_script(train, end - time.monotonic())
    losses = [float(x) for x in re.findall(r"\(step=\d+\) loss=(\S+)", log)]  # log lines only
    backend = re.search(r"Selective scan backend: .*", log)[0]
    npz = work / "samples.npz"
    experiment = next((work / "results").iterdir())
    sample = [sys.executable, "sample.py", "--ckpt", str(experiment), "--num-samples", "16",
              "--batch-size", "16", "--sample-dir", str(npz.with_suffix(""))]
    if dry:
        sample += ["--num-sampling-steps", "2"]
    run_script(sample, end - time.monotonic())
    return {"command": " ".join(train[1:]).replace(str(work), "$WORK"), "losses": losses,
            "backend": backend, "falls": len(losses) > 1 and losses[-1] < 0.5 * losses[0],
            "samples": list(np.load(npz)["arr_0"].shape)}


#################################################################################
#                                   The report                                   #
#################################################################################


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def claims(rows: list[dict]) -> list[str]:
    """The paper's two claims at this setting, from the rows without checkpointing of the fastest
    backend: USM-B/1 >= 1.7x Zigma-B/1's training img/s, <= 0.7x its peak memory."""
    plain = {r["model"]: r for r in rows if not r["checkpoint"] and "train_img_s" in r}
    usm, zigma = (plain.get(m) for m in MODELS)
    if not (usm and zigma and usm["backend"] == zigma["backend"]):
        return ["The claims could not be checked: a model's training figures are missing."]
    speed = usm["train_img_s"] / zigma["train_img_s"]
    memory = usm["train_mb"] / zigma["train_mb"]
    return [f"- Training speed, USM-B/1 / Zigma-B/1: **{speed:.2f}x** (claim: at least 1.7x: "
            f"{'met' if speed >= 1.7 else 'NOT met'}).",
            f"- Training peak memory without checkpointing, USM-B/1 / Zigma-B/1: "
            f"**{memory:.2f}x** (claim: at most 0.7x: {'met' if memory <= 0.7 else 'NOT met'})."]


def parity_section(results: list[dict]) -> str:
    names = ["out", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    rows, missing = [], []
    for result in results:
        if "unavailable" in result:
            missing.append(f"- {result['backend']}: {result['unavailable']}")
        for r in result.get("rows", []):
            rows.append([result["backend"], r["dtype"], *(f"{r['errors'][n]:.1e}" for n in names),
                         f"{r['tol']:.0e}", "ok" if r["ok"] else f"FAILED ({r['worst']})"])
    parts = ["max |backend - torch| / max |torch| for the output and the gradient of each input."]
    if rows:
        parts.append(table(["backend", "dtype", *names, "tolerance", "result"], rows))
    return "\n\n".join(parts + (["\n".join(missing)] if missing else []))


def scan_section(result: dict) -> str:
    backends = result["backends"]
    return "Forward + backward (all eight gradients), median ms.\n\n" + table(
        ["dtype", "B", "Di", "L", "N", *backends],
        [[r["dtype"], *(str(r[k]) for k in ("batch", "dim", "length", "state")),
          *(f"{r[b]:.2f}" for b in backends)] for r in result["rows"]]) + (
        f"\n\nThe other shapes: {SPENT}." if result["cut"] else "")


def models_section(result: dict) -> str:
    rows = [[r["model"], r["backend"], "yes" if r["checkpoint"] else "no",
             *((r["error"], "–", "–", "–") if "error" in r else
               (f"{r['train_img_s']:.1f}", f"{r['train_mb']:.0f}",
                f"{r['sample_ms']:.1f}" if "sample_ms" in r else "–",
                f"{r['sample_mb']:.0f}" if "sample_mb" in r else "–"))]
            for r in result["rows"]]
    text = [f"Training: forward + backward + AdamW at batch {BATCH}; sampling step: one forward at "
            f"batch 1; peak memory: torch.cuda.max_memory_allocated, reset before each "
            f"measurement, in one process per model; median of {result['repeats']} after "
            f"{result['warmup']} warm-up.",
            table(["model", "scan", "checkpointing", "training img/s", "training peak (MiB)",
                   "sampling step (ms)", "sampling peak (MiB)"], rows),
            *claims(result["rows"])]
    if result["skipped_backends"]:
        text.append(f"{result['model']} with {', '.join(result['skipped_backends'])}: not "
                    f"measured (the step's share of the budget was short).")
    return "\n\n".join(text)


def run_section(run: dict) -> str:
    losses = ", ".join(f"{x:.4f}" for x in run["losses"])
    return (f"`python {run['command']}`, then sample.py on its checkpoint.  \n{run['backend']}  \n"
            f"Logged losses: {losses} ({'falls' if run['falls'] else 'DOES NOT FALL'}); "
            f"samples: {run['samples']}.")


SECTIONS = {  # step: (title, how its result reads)
    "report": ("Environment and kernels", lambda r: f"```\n{r}\n```"),
    "parity": ("GPU scans vs the PyTorch scan, batch 8, Di 1536, L 1024, N 16", parity_section),
    "scan": ("Scan speed at USM-B/1's stages", scan_section),
    "models": (f"{' vs '.join(MODELS)}, 256 px (32x32x4 latents), bf16 autocast", models_section),
    "run": ("A short real run", run_section),
}


def report(meta: dict, steps: dict) -> str:
    """benchmarks/results/gpu.md from what ran so far: a time line per step (status, seconds,
    budget), then each step's results."""
    total = time.time() - meta["since"]
    fits = "yes" if total <= NINE_MINUTES else "NO"
    lines = [f"# GPU check: {meta['machine']}{' (DRY RUN on the CPU)' if meta['dry'] else ''}",
             f"Command: `bash scripts/gpu_check.sh {meta['args']}` ({meta['date']}).",
             "## Time",
             f"Kernel build (scripts/setup_cuda.sh --bundle): {meta['build']}.  \n"
             f"Build and check together: {total:.0f} s of a {meta['budget']:.0f} s budget "
             f"(fits in 9 minutes: {fits}).",
             table(["step", "status", "seconds", "share (s)"],
                   [[name, s["status"], f"{s['seconds']:.0f}", f"{s['share']:.0f}"]
                    for name, s in steps.items()])]
    for name, step in steps.items():
        title, show = SECTIONS[name]
        lines.append(f"## {title}")
        if "result" in step:
            lines.append(show(step["result"]))
        else:
            lines.append(f"Not measured: {step['status']}.")
    return "\n\n".join(lines) + "\n"


#################################################################################
#                                     Main                                       #
#################################################################################


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu.md")
    parser.add_argument("--budget", type=float, default=NINE_MINUTES,
                        help="seconds for the build and the check together")
    parser.add_argument("--since", type=float, default=time.time(),
                        help="when the budget started (Unix time; scripts/gpu_check.sh: before "
                             "the build)")
    parser.add_argument("--build", default="not asked for", help="how the build went")
    parser.add_argument("--quick", action="store_true", help="every step shortened")
    parser.add_argument("--dry-run", action="store_true", help="the plumbing, on the CPU")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # NAME JSON-KWARGS
    args = parser.parse_args(argv)
    if args.worker:  # a measurement process of `call`: its result is the last line printed
        print(json.dumps(WORKERS[args.worker[0]](**json.loads(args.worker[1]))))
        return 0
    if not (args.dry_run or torch.cuda.is_available()):
        print("gpu_check: no CUDA device visible to torch; nothing measured, nothing written",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    scans = DRY["scans"] if args.dry_run else USM_B_SCANS
    # The dry run's parity also runs a backend that works on the CPU, to exercise the plumbing.
    parity_backends = (["cpu"] if args.dry_run else []) + list(GPU_BACKENDS)
    budget = Budget(args.budget, args.since)
    meta = {"machine": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "dry": args.dry_run, "args": os.environ.get("GPU_CHECK_ARGS", ""),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "build": args.build,
            "since": args.since, "budget": args.budget}
    meta["scan_backends"] = [b for b in parity_backends if not unavailable(b, device)]
    meta["scan_backends"].append("torch")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    steps_to_run = {
        "report": lambda share, short: environment_report(),
        "parity": lambda share, short: call("parity", share, backends=parity_backends,
                                            device=device, shape=scans[0]),
        "scan": lambda share, short: {"backends": meta["scan_backends"], **call(
            "scan_times", share, backends=meta["scan_backends"], device=device, shapes=scans,
            warmup=1 if short else 3, repeats=3 if short else 10)},
        "models": lambda share, short: models_step(device, meta["scan_backends"], args.dry_run,
                                                   short, share),
        "run": lambda share, short: training_run(work, args.dry_run, short, share),
    }
    steps, ok = {}, not args.build.startswith("FAILED")  # (a failed build: the check goes on)
    for name, run in steps_to_run.items():
        share, short = budget.share(name)
        short |= args.quick
        start = time.monotonic()
        step = steps[name] = {"share": share, "seconds": 0.0}
        if share == 0:
            step["status"] = "SKIPPED: too little of the budget left"
            ok = False
        else:
            print(f"gpu_check: {name} ({share:.0f} s{', shortened' if short else ''})", flush=True)
            try:
                step["result"] = run(share, short)
                step["status"] = "shortened" if short else "ok"
            except subprocess.TimeoutExpired:
                step["status"] = f"STOPPED after its {share:.0f} s"
                ok = False
            except Exception as err:  # a failed step is reported, and the next one still runs
                step["status"] = f"FAILED: {type(err).__name__}: {str(err)[-1500:]}".replace(
                    "\n", " ")
                ok = False
        step["seconds"] = time.monotonic() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(report(meta, steps))
        tmp.replace(args.out)  # the report appears whole, after every step
    print(args.out.read_text())
    parity_ok = all(r["ok"] for p in steps["parity"].get("result", []) for r in p.get("rows", []))
    run_ok = args.dry_run or steps["run"].get("result", {}).get("falls", False)
    return 0 if ok and parity_ok and run_ok else 1


if __name__ == "__main__":
    sys.exit(main())
