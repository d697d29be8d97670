"""The search for scripts/demo.sh's recipe: the best Fashion-MNIST samples for the wall time of the
old demo on a 2-core CPU.

    OMP_NUM_THREADS=1 python -m experiments.demo_recipes --parallel 2   # ~2 h on 2 CPU cores
    OMP_NUM_THREADS=1 python -m experiments.demo_recipes --only "old demo" "USM-T/4, cosine"

Each recipe is a training (model, batch, steps, learning-rate schedule, EMA) and a sampler (steps,
solver, guidance scale); several recipes may share a training. Every recipe is trained with
train.py at one thread (the demo's setting), sampled with sample.py (1000 class-balanced samples)
and scored as experiments/fashion_mnist.py scores its runs: FID and the Frechet distance in a
Fashion-MNIST classifier's features, against the first 1000 test images. The old demo recipe is
in the same table, measured in the same run. Writes <out>/demo_recipes.{md,json}.
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from download import export_fashion_mnist
from evaluate_fid import load_inception
from experiments.fashion_mnist import (
    ROOT,
    get_classifier,
    reference_statistics,
    sample,
    score,
    train,
)

COMMON = ["--vae", "none", "--image-size", "32", "--num-classes", "10", "--fid-every", "0",
          "--num-workers", "0", "--report-to", "none", "--global-seed", "0"]


def training(model: str, batch: int, steps: int, lr: float, ema: float = 0.99, warmup: int = 0,
             schedule: str = "constant", processes: int = 1) -> dict:
    """train.py options of one training on `processes` CPU processes (each with batch / processes
    images, one thread); the grid it draws at the end uses guidance 3."""
    return dict(processes=processes, options=[
        "--model", model, "--batch-size", str(batch // processes),
        "--max-steps", str(steps), "--lr", str(lr), "--ema-decay", str(ema),
        "--warmup-steps", str(warmup), "--lr-schedule", schedule, "--ckpt-every", str(steps),
        "--sample-every", str(steps), "--log-every", str(max(1, steps // 8)), "--cfg-scale", "3",
        *COMMON])


def sampler(cfg: float = 3.0, steps: int = 25, solver: str = "euler") -> list[str]:
    return ["--cfg-scale", str(cfg), "--num-sampling-steps", str(steps), "--sampler", solver]


# The steps of each training are set so that it takes the old demo's time: a USM-T/4 step (64
# tokens) costs a third of a USM-T/2 step (256 tokens) at batch 32 on one thread.
TRAININGS = {
    "old demo": training("USM-T/2", 32, 400, 3e-3),
    "T/4 b32": training("USM-T/4", 32, 1200, 3e-3),
    "T/4 b32 cosine": training("USM-T/4", 32, 1200, 3e-3, warmup=100, schedule="cosine"),
    "T/4 b64 cosine": training("USM-T/4", 64, 650, 3e-3, warmup=50, schedule="cosine"),
    "T/4 b16 cosine": training("USM-T/4", 16, 2000, 3e-3, 0.995, 100, "cosine"),
    "T/4 b64 x2": training("USM-T/4", 64, 1200, 3e-3, processes=2),
    "T/4 b64 x2 lr 5e-3": training("USM-T/4", 64, 1200, 5e-3, processes=2),
}
RECIPES = {  # name in the table -> (training, sampler)
    "old demo (USM-T/2, 400 steps, lr 3e-3)": ("old demo", sampler()),
    "USM-T/4, 1200 steps": ("T/4 b32", sampler()),
    "USM-T/4, 1200 steps, warm-up + cosine": ("T/4 b32 cosine", sampler()),
    "USM-T/4, batch 64, 650 steps, warm-up + cosine": ("T/4 b64 cosine", sampler()),
    "USM-T/4, 1200 steps, no guidance": ("T/4 b32", sampler(1.0)),
    "USM-T/4, 1200 steps, guidance 1.5": ("T/4 b32", sampler(1.5)),
    "USM-T/4, 1200 steps, guidance 2": ("T/4 b32", sampler(2.0)),
    "USM-T/4, 2 processes x batch 32, 1200 steps": ("T/4 b64 x2", sampler()),
    "USM-T/4, 2 processes x batch 32, 1200 steps, guidance 4": ("T/4 b64 x2", sampler(4.0)),
    "USM-T/4, 2 processes x batch 32, 1200 steps, guidance 5": ("T/4 b64 x2", sampler(5.0)),
    "USM-T/4, 2 processes x batch 32, 1200 steps, 50 Euler steps": ("T/4 b64 x2",
                                                                     sampler(steps=50)),
    "USM-T/4, 2 processes x batch 32, 1200 steps, lr 5e-3": ("T/4 b64 x2 lr 5e-3", sampler()),
    "USM-T/4, batch 16, 2000 steps, warm-up + cosine, EMA 0.995": ("T/4 b16 cosine", sampler()),
}


def train_and_sample(name: str, recipes: list[str], args: argparse.Namespace) -> list[dict]:
    """One training, then each recipe that samples from it."""
    trained = train(name, TRAININGS[name]["options"], args, TRAININGS[name]["processes"])
    checkpoint = trained.pop("checkpoint")
    return [{**sample(recipe, checkpoint, RECIPES[recipe][1], args), **trained,
             "training": name} for recipe in recipes]


def report(rows: list[dict], command: str, classifier_acc: float) -> str:
    lines = [
        "# Demo recipes: Fashion-MNIST samples for the old demo's training time",
        "",
        "Class-conditional rectified flow in pixel space (28x28 padded to 32x32), trained with "
        "train.py at one thread and sampled with sample.py: 1000 samples per recipe, classes "
        "balanced, scored on their central 28x28 against the first 1000 Fashion-MNIST test "
        "images. FID: Inception pool3 features; FD (classifier): the same distance in the 128-d "
        f"features of a small CNN trained on the train split (test accuracy {classifier_acc:.1%})."
        " Lower is better. Training time: train.py's wall clock (start-up, training, and the "
        "100-image grid at guidance 3 it draws at the end), what the demo costs.",
        "",
        "| recipe | training | sampler | parameters | training time | 1000 samples | FID | "
        "FD (classifier) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train_opts = r["train_command"].split("--model ", 1)[1].split(" --ckpt-every")[0]
        sample_opts = r["sample_command"].split("--cfg-scale", 1)[1]
        lines.append(f"| {r['name']} | `--model {train_opts}` | `--cfg-scale{sample_opts}` | "
                     f"{r['params'] / 1e6:.3f} M | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['sample_seconds'] / 60:.1f} min | {r['fid']:.1f} | "
                     f"{r['fd_classifier']:.1f} |")
    lines += [
        "",
        f"Times: {os.cpu_count()} CPU cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, runs sharing the machine as the "
        "command says: comparable within this table only.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "Grids (one row per class):",
        "",
    ]
    lines += [f"- {r['name']}: ![{r['name']}]({r['grid']})" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / "results" / "demo_recipes")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--data-path", type=Path, default=ROOT / "data" / "fashion-mnist")
    p.add_argument("--only", nargs="+", choices=list(RECIPES), help="these recipes only")
    p.add_argument("--parallel", type=int, default=1, help="trainings run at the same time")
    args = p.parse_args(argv)
    args.num_samples, args.ref_images, args.grid_per_class = 1000, 1000, 8
    args.classifier_images, args.classifier_epochs = 60_000, 1  # as experiments/fashion_mnist.py
    args.prefix = "demo_recipe"  # of the per-recipe grids and logs in --out
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([f"OMP_NUM_THREADS={threads}"] * bool(threads) + [
        "python -m experiments.demo_recipes", *(argv or sys.argv[1:])])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data_path / "val").is_dir():
        export_fashion_mnist(args.data_path)

    chosen = args.only or list(RECIPES)
    by_training: dict[str, list[str]] = {}
    for recipe in chosen:
        by_training.setdefault(RECIPES[recipe][0], []).append(recipe)
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = [pool.submit(train_and_sample, name, recipes, args)
                for name, recipes in by_training.items()]
        classifier, classifier_acc = get_classifier(args, args.work_dir)
        extractors = {"inception": load_inception(), "classifier": classifier.features}
        reference = reference_statistics(args, extractors)
        rows = [score(row, args, extractors, reference)
                for run in as_completed(runs) for row in run.result()]
    rows.sort(key=lambda row: list(RECIPES).index(row["name"]))
    (args.out / "demo_recipes.json").write_text(json.dumps(
        dict(command=command, classifier_test_accuracy=classifier_acc, recipes=rows), indent=2))
    (args.out / "demo_recipes.md").write_text(report(rows, command, classifier_acc))
    print(report(rows, command, classifier_acc))


if __name__ == "__main__":
    main()
