"""USM-T against Zigma-T on Fashion-MNIST, on a CPU: same steps, batch, width and objective.

    OMP_NUM_THREADS=1 python -m experiments.fashion_mnist --parallel 2   # ~45 min on 2 CPU cores
    python -m experiments.fashion_mnist --quick --work-dir /tmp/fm --out /tmp/fm/out  # smoke test

Three runs, each class-conditional in pixel space (28x28 padded to 32x32), patch 2: USM-T/2,
USM-T/2 without skip connections (the paper's ablation) and Zigma-T/2. Each is trained with
train.py, sampled with sample.py (25 Euler steps, no guidance, classes balanced) and scored on
the samples' central 28x28 (the padding cropped off) against the first --ref-images Fashion-MNIST
test images by two Frechet distances (evaluate_fid): FID in the standard Inception features, and
the same distance in the 128-d features of a small CNN trained here on the train split
(experiments/classifier.py). Writes <out>/fashion_mnist.{md,json} and one sample grid per run.

Everything lands in --work-dir; a rerun reuses finished training, samples, classifier and
statistics. --parallel runs that many of the three runs at once (one thread each fits 2 cores).
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from benchmarks.flops import METHOD as FLOPS_METHOD
from benchmarks.flops import count_flops
from download import (
    FASHION_MNIST_SOURCE,
    export_fashion_mnist,
    fashion_mnist_files,
    read_idx,
)
from evaluate_fid import compute_statistics, frechet_distance, load_inception
from experiments.classifier import FashionCNN, accuracy, train_classifier
from loader import load_checkpoint
from models import All_models
from sampling import step_checkpoints

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name in the table -> (model, extra train.py options); the slowest first
    "Zigma-T/2": ("Zigma-T/2", []),
    "USM-T/2": ("USM-T/2", []),
    "USM-T/2, no skip connections": ("USM-T/2", ["--no-skip-conn"]),
}
PAD = 2  # train.py pads 28x28 to 32x32 with 2 black pixels per side
# The tiny models train for only a few hundred steps: a high learning rate and a short EMA.
TRAIN_OPTIONS = ["--vae", "none", "--image-size", "32", "--num-classes", "10", "--lr", "1e-3",
                 "--ema-decay", "0.99", "--num-workers", "0", "--report-to", "none",
                 "--global-seed", "0"]


def slug(name: str) -> str:
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in name.lower())).strip("-")


def launcher(processes: int) -> list[str]:
    """How a script starts on `processes` CPU processes: python itself for one; accelerate's
    multi-process launcher for more, on CPUs and gloo (ACCELERATE_USE_CPU=1, see README)."""
    if processes == 1:
        return [sys.executable]
    with socket.socket() as free:  # a port of its own: several launches may run at once
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return ["env", "ACCELERATE_USE_CPU=1", sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def shown(command: list[str]) -> str:
    """A command as the report shows it: `python` for this interpreter, paths relative to the
    repository."""
    return " ".join(command).replace(sys.executable, "python").replace(f"{ROOT}/", "")


def run_command(command: list[str], log: Path) -> float:
    """Run a repository script, appending its output to log; returns its wall-clock seconds."""
    start = time.time()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def cached_json(path: Path, compute) -> dict:
    """path's content, else compute() written there (how reruns reuse finished work)."""
    if not path.exists():
        path.write_text(json.dumps(compute(), indent=2))
    return json.loads(path.read_text())


def test_images(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    files = fashion_mnist_files(FASHION_MNIST_SOURCE, ROOT / "data" / "fashion-mnist" / "raw")
    images = torch.from_numpy(read_idx(files["t10k-images-idx3-ubyte.gz"])[:limit].copy())
    labels = torch.from_numpy(read_idx(files["t10k-labels-idx1-ubyte.gz"])[:limit].astype(np.int64))
    return images[:, None], labels


def get_classifier(args: argparse.Namespace, work: Path) -> tuple[FashionCNN, float]:
    """The Fashion-MNIST CNN (trained once, then loaded) and its test accuracy."""
    path = work / "classifier.pt"
    if not path.exists():
        files = fashion_mnist_files(FASHION_MNIST_SOURCE, ROOT / "data" / "fashion-mnist" / "raw")
        images = read_idx(files["train-images-idx3-ubyte.gz"])[:args.classifier_images]
        labels = read_idx(files["train-labels-idx1-ubyte.gz"])[:args.classifier_images]
        model = train_classifier(torch.from_numpy(images.copy())[:, None],
                                 torch.from_numpy(labels.astype(np.int64)), args.classifier_epochs)
        torch.save(model.state_dict(), path)
    model = FashionCNN()
    model.load_state_dict(torch.load(path))
    return model.eval(), accuracy(model, *test_images(10_000))


def statistics(images: torch.Tensor, extractors: dict) -> dict:
    return {name: compute_statistics(images, net) for name, net in extractors.items()}


def distances(stats: dict, reference: dict) -> dict:
    return {name: frechet_distance(*stats[name], *reference[name]) for name in stats}


def reference_statistics(args: argparse.Namespace, extractors: dict) -> dict:
    """Statistics of the first --ref-images test images in each feature space (computed once)."""
    path = args.work_dir / f"reference-{args.ref_images}.npz"
    if not path.exists():
        stats = statistics(test_images(args.ref_images)[0], extractors)
        np.savez(path, **{f"{name}_{i}": v for name, s in stats.items() for i, v in enumerate(s)})
    with np.load(path) as data:
        return {name: (data[f"{name}_0"], data[f"{name}_1"]) for name in extractors}


def params_and_gflops(checkpoint: Path) -> tuple[int, float]:
    """Parameters and forward GFLOPs for one image, counted as benchmarks/ counts them."""
    meta, _ = load_checkpoint(checkpoint)
    with torch.device("meta"):
        model = All_models[meta["model"]](**meta["model_kwargs"])
        x, t, y = torch.randn(1, 1, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
        flops = count_flops(model, x, t, y=y)["total"]
    return sum(p.numel() for p in model.parameters()), flops / 1e9


def train(name: str, options: list[str], args: argparse.Namespace, processes: int = 1) -> dict:
    """Train one configuration with train.py on `processes` CPU processes into <work-dir>/<name>
    (skipped when done there): its last checkpoint, wall-clock seconds and command."""
    folder = args.work_dir / slug(name)
    folder.mkdir(parents=True, exist_ok=True)
    command = [*launcher(processes), "train.py", "--data-path", str(args.data_path),
               "--results-dir", str(folder / "train"), *options]
    timing = cached_json(folder / "train.json",
                         lambda: {"seconds": run_command(command, folder / "commands.log")})
    experiment = next((folder / "train").iterdir())
    shutil.copy(experiment / "log.txt", args.out / f"{args.prefix}_{slug(name)}.log")
    return dict(checkpoint=step_checkpoints(experiment)[-1], train_seconds=timing["seconds"],
                train_command=shown(command))


def sample(name: str, checkpoint: Path, options: list[str], args: argparse.Namespace) -> dict:
    """--num-samples class-balanced samples and a grid of `checkpoint` with sample.py into
    <work-dir>/<name> (skipped when done there)."""
    folder = args.work_dir / slug(name)
    folder.mkdir(parents=True, exist_ok=True)
    samples = folder / f"samples-{args.num_samples}"
    grid = args.out / f"{args.prefix}_{slug(name)}.png"
    command = [sys.executable, "sample.py", "--ckpt", str(checkpoint), "--num-samples",
               str(args.num_samples), "--batch-size", "100", "--sample-dir", str(samples),
               "--grid", str(grid), "--grid-per-class", str(args.grid_per_class), *options]
    timing = cached_json(folder / "sample.json",
                         lambda: {"seconds": run_command(command, folder / "commands.log")})
    params, gflops = params_and_gflops(checkpoint)
    return dict(name=name, params=params, gflops=gflops, sample_seconds=timing["seconds"],
                grid=grid.name, samples=f"{samples}.npz", sample_command=shown(command))


def train_and_sample(name: str, args: argparse.Namespace) -> dict:
    """One of RUNS trained and sampled: same steps, batch and sampler for all."""
    model, extra = RUNS[name]
    trained = train(name, ["--model", model, "--batch-size", str(args.batch_size),
                           "--max-steps", str(args.steps), "--ckpt-every", str(args.steps),
                           "--sample-every", str(args.steps),
                           "--fid-every", "0",  # FID is scored below
                           "--log-every", str(max(1, args.steps // 10)), *TRAIN_OPTIONS, *extra],
                    args)
    sampled = sample(name, trained.pop("checkpoint"),
                     ["--cfg-scale", "1", "--num-sampling-steps", str(args.sampling_steps)], args)
    return dict(**sampled, **trained, model=model, options=extra)


def score(row: dict, args: argparse.Namespace, extractors: dict, reference: dict) -> dict:
    """row with the Frechet distances of its samples' central 28x28 to the reference."""
    def compute() -> dict:
        with np.load(row["samples"]) as data:  # (N, 32, 32, 3), grey repeated over RGB
            images = torch.from_numpy(data["arr_0"][:, PAD:-PAD, PAD:-PAD, :1].copy())
        return distances(statistics(images.permute(0, 3, 1, 2), extractors), reference)

    scores = cached_json(args.work_dir / slug(row["name"]) / "scores.json", compute)
    return {**row, "fid": scores["inception"], "fd_classifier": scores["classifier"]}


def run_and_score(jobs: list[Callable[[], list[dict]]], args: argparse.Namespace
                  ) -> tuple[list[dict], float]:
    """Run the jobs (each trains and samples, returning rows), --parallel at a time, while this
    thread prepares the classifier and the reference statistics; then score every row. Returns
    the scored rows and the classifier's test accuracy."""
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = [pool.submit(job) for job in jobs]
        classifier, classifier_acc = get_classifier(args, args.work_dir)
        extractors = {"inception": load_inception(), "classifier": classifier.features}
        reference = reference_statistics(args, extractors)
        rows = [score(row, args, extractors, reference)
                for run in as_completed(runs) for row in run.result()]
    return rows, classifier_acc


def report(args: argparse.Namespace, command: str, rows: list[dict], classifier_acc: float
           ) -> str:
    lines = [
        "# Fashion-MNIST: USM-T against Zigma-T on a CPU",
        "",
        f"Class-conditional rectified flow in pixel space (28x28 padded to 32x32), patch 2, width "
        f"64, batch {args.batch_size}, {args.steps} steps (AdamW lr 1e-3, EMA 0.99). Samples: "
        f"{args.num_samples} per model, {args.sampling_steps} Euler steps, no guidance, classes "
        f"balanced. Scored on their central 28x28 against the first "
        f"{args.ref_images} Fashion-MNIST test images. FID: Inception pool3 features; FD "
        f"(classifier): the same Frechet distance in the 128-d penultimate features of a small "
        f"CNN trained here (test accuracy {classifier_acc:.1%}). Lower is better.",
        "",
        "| model | parameters | GFLOPs / image | training time | sampling time | FID | "
        "FD (classifier) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.3f} M | {r['gflops']:.4f} | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['sample_seconds'] / 60:.1f} min | "
                     f"{r['fid']:.1f} | {r['fd_classifier']:.2f} |")
    lines += [
        "",
        f"GFLOPs: forward pass, one 32x32x1 image, class-conditional. {FLOPS_METHOD}",
        f"Times: wall-clock of the train.py / sample.py processes (start-up included), "
        f"{args.parallel} run(s) at a time with OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '(unset)')} on {os.cpu_count()} CPU cores shared with "
        "other jobs: rough, and only comparable within one table.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "Sample grids (one row per class: t-shirt/top, trouser, pullover, dress, coat, sandal, "
        "shirt, sneaker, bag, ankle boot):",
        "",
    ]
    lines += [f"- {r['name']}: ![{r['name']}]({r['grid']})" for r in rows]
    lines += ["", "Per-run commands:", ""]
    for r in rows:
        lines += [f"    {r['train_command']}", f"    {r['sample_command']}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / "results" / "fashion_mnist")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--data-path", type=Path, default=ROOT / "data" / "fashion-mnist")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--ref-images", type=int, default=1000)
    p.add_argument("--classifier-images", type=int, default=60_000)
    p.add_argument("--classifier-epochs", type=int, default=1)
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--parallel", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 steps, 10 samples and 10 reference images, 2 sampling steps")
    args = p.parse_args(argv)
    args.prefix = "fashion_mnist"  # of the per-run grids and logs in --out
    if args.quick:
        args.steps, args.batch_size, args.num_samples, args.sampling_steps = 2, 4, 10, 2
        args.ref_images, args.classifier_images, args.grid_per_class = 10, 500, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([f"OMP_NUM_THREADS={threads}"] * bool(threads) + [
        "python -m experiments.fashion_mnist", *(argv or sys.argv[1:])])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data_path / "val").is_dir():
        export_fashion_mnist(args.data_path, limit_per_class=20 if args.quick else None)

    rows, classifier_acc = run_and_score(
        [lambda name=name: [train_and_sample(name, args)] for name in RUNS], args)
    rows.sort(key=lambda row: list(RUNS).index(row["name"]))
    result = dict(settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  command=command, classifier_test_accuracy=classifier_acc, runs=rows)
    (args.out / "fashion_mnist.json").write_text(json.dumps(result, indent=2))
    (args.out / "fashion_mnist.md").write_text(report(args, command, rows, classifier_acc))
    print(report(args, command, rows, classifier_acc))


if __name__ == "__main__":
    main()
