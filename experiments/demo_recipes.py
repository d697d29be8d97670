"""The search for scripts/demo.sh's recipe: the best Fashion-MNIST samples for the wall time of the
old demo on a 2-core CPU.

    python -m experiments.demo_recipes                  # every recipe, one after the other (~4 h)
    python -m experiments.demo_recipes --only "USM-T/4, 1200 steps"  # one recipe (and the old demo)

Each recipe is a training (model, batch, steps, learning-rate schedule, EMA, CPU processes) and a
sampler (steps, solver, guidance scale); several recipes share a training. Every training runs
train.py at one thread per process (the demo's setting), every recipe samples 1000 class-balanced
images with sample.py, scored as experiments/fashion_mnist.py scores its runs: FID and the Frechet
distance in a Fashion-MNIST classifier's features, against the first 1000 test images. The old
demo recipe is in every table, measured by the same code. A rerun reuses finished work in
--work-dir. Writes <out>/demo_recipes.{md,json} and a grid per recipe.
"""

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

from download import export_fashion_mnist
from evaluate_fid import load_inception
from experiments.fashion_mnist import (
    ROOT,
    fashion_mnist,
    frechet_distances,
    get_classifier,
    reference_statistics,
    sample,
    slug,
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
    "new demo: USM-T/4, 2 processes x batch 32, 1200 steps, lr 5e-3": ("T/4 b64 x2 lr 5e-3",
                                                                        sampler()),
    "USM-T/4, batch 16, 2000 steps, warm-up + cosine, EMA 0.995": ("T/4 b16 cosine", sampler()),
}


def train_and_sample(name: str, recipes: list[str], args: argparse.Namespace) -> list[dict]:
    """One training, then each recipe that samples from it."""
    trained = train(name, TRAININGS[name]["options"], args, TRAININGS[name]["processes"])
    checkpoint = trained.pop("checkpoints")[-1]
    shutil.copy(trained.pop("log"), args.out / f"{args.prefix}_{slug(name)}.log")
    return [{**sample(recipe, checkpoint, RECIPES[recipe][1], args,
                      args.out / f"{args.prefix}_{slug(recipe)}.png"),
             **trained, "name": recipe, "training": name} for recipe in recipes]


def run_and_score(jobs: list[Callable[[], list[dict]]], args: argparse.Namespace
                  ) -> tuple[list[dict], float]:
    """Run the jobs (each trains and samples, returning rows), --parallel at a time, while this
    thread prepares the classifier and the reference statistics; then score every row. Returns
    the scored rows and the classifier's test accuracy."""
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = [pool.submit(job) for job in jobs]
        classifier, classifier_acc = get_classifier(args)
        nets = {"inception": load_inception(), "classifier": classifier.features}
        reference = reference_statistics(f"test-{args.ref_images}",
                                         fashion_mnist("t10k")[0][:args.ref_images], nets,
                                         args.work_dir)
        rows = []
        for run in as_completed(runs):
            for row in run.result():
                scores = frechet_distances(row["samples"], args.work_dir / slug(row["name"]) /
                                           "scores.json", nets, reference)
                rows.append({**row, "grid": Path(row["grid"]).name, "fid": scores["inception"],
                             "fd_classifier": scores["classifier"]})
    return rows, classifier_acc


def report(rows: list[dict], command: str, classifier_acc: float) -> str:
    old = rows[0]  # the old demo
    lines = [
        "# Demo recipes: Fashion-MNIST samples for the old demo's training time",
        "",
        "Class-conditional rectified flow in pixel space (28x28 padded to 32x32), each process at "
        "one thread; 1000 samples per recipe, classes balanced, scored on their central 28x28 "
        "against the first 1000 Fashion-MNIST test images. FID: Inception pool3 features; FD "
        "(classifier): the same distance in the 128-d features of a small CNN trained on the train "
        f"split (test accuracy {classifier_acc:.1%}). Lower is better; x old: the ratio to the old "
        "demo's. Training time: train.py's wall clock (start-up, training, and the 100-image grid "
        "at guidance 3 it draws at the end), which is what the demo costs, but taken while other "
        "runs shared the CPU: rough. The step counts were set from the step costs measured alone; "
        "docs/experiments.md times scripts/demo.sh run alone.",
        "",
        "| recipe | training time | FID | x old | FD (classifier) | x old |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['train_seconds'] / 60:.1f} min | {r['fid']:.1f} | "
                     f"{r['fid'] / old['fid']:.2f} | {r['fd_classifier']:.1f} | "
                     f"{r['fd_classifier'] / old['fd_classifier']:.2f} |")
    lines += ["", "Command:", "", f"    {command}", "", "Each recipe's commands:", ""]
    for r in rows:
        lines += [f"- {r['name']}:", "", f"      {r['train_command']}",
                  f"      {r['sample_command']}", ""]
    lines += ["Grids (one row per class):", ""]
    lines += [f"- {r['name']}: ![{r['name']}]({r['grid']})" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / "results" / "demo_recipes")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--data-path", type=Path, default=ROOT / "data" / "fashion-mnist")
    p.add_argument("--only", nargs="+", choices=list(RECIPES),
                   help="these recipes only (and the old demo)")
    p.add_argument("--parallel", type=int, default=1,
                   help="trainings run at the same time (their times then share the CPU)")
    args = p.parse_args(argv)
    args.num_samples, args.ref_images, args.grid_per_class = 1000, 1000, 8
    args.classifier_images, args.classifier_epochs = 60_000, 1  # the whole train split
    args.prefix = "demo_recipe"  # of the per-recipe grids and logs in --out
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # the demo's setting, inherited by train.py / sample.py
    command = " ".join(["python -m experiments.demo_recipes", *(argv or sys.argv[1:])])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data_path / "val").is_dir():
        export_fashion_mnist(args.data_path)

    old_demo = next(iter(RECIPES))  # in every table: the ratios are to it
    chosen = [old_demo, *(r for r in args.only if r != old_demo)] if args.only else list(RECIPES)
    by_training: dict[str, list[str]] = {}
    for recipe in chosen:
        by_training.setdefault(RECIPES[recipe][0], []).append(recipe)
    rows, classifier_acc = run_and_score(
        [partial(train_and_sample, name, recipes, args) for name, recipes in by_training.items()],
        args)
    rows.sort(key=lambda row: list(RECIPES).index(row["name"]))
    (args.out / "demo_recipes.json").write_text(json.dumps(
        dict(command=command, classifier_test_accuracy=classifier_acc, recipes=rows), indent=2))
    (args.out / "demo_recipes.md").write_text(report(rows, command, classifier_acc))
    print(report(rows, command, classifier_acc))


if __name__ == "__main__":
    main()
