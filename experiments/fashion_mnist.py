"""USM against Zigma on Fashion-MNIST at equal training time, on a CPU, with error bars.

    python -m experiments.fashion_mnist --parallel 2   # about 2 h on 2 CPU cores
    python -m experiments.fashion_mnist --quick --work-dir /tmp/fm --out /tmp/fm/out  # smoke test

The paper's claim (better samples than Zigma for less compute) shrunk to what two CPU cores train
in minutes: class-conditional rectified flow in pixel space (28x28 padded to 32x32), patch 4 (64
tokens; at patch 2 a Zigma step costs 1.7 s and the study would take a day), width 64, batch 32.
Three models: USM-T/4, Zigma-T/4 and USM-T/4 without its skip connections (the paper's ablation).

1. Budgets. Each model's training step is timed (one thread, the models in turns), so a budget of
   T minutes is T * 60 / (seconds per step) steps of that model: equal wall-clock budgets that do
   not depend on what else the machine runs while the runs train. The training FLOPs each model
   spends in a budget are reported beside it (benchmarks/flops.py's counter).
2. Learning rate, per model: --lrs at seed 0 for the largest budget, trained on the train split
   less its last --held-out images and scored against those held-out images (FD in the
   classifier's features); the model keeps the rate with the lowest distance. The test images are
   not looked at.
3. Each model at its rate, --seeds seeds (seed 0 is the sweep's run), scored at every budget
   against the first --ref-images test images: FD in the 128-d features of a small Fashion-MNIST
   CNN (experiments/classifier.py) on --num-samples class-balanced samples, and FID (Inception
   pool3) on the first --fid-samples of them (Inception: about 0.1 s of CPU time per image,
   benchmarks/results/fid_cpu.md).
   Samples: 25 Euler steps, no guidance.

Every train.py / sample.py run and every score lands in --work-dir and is reused by a rerun (an
interrupted training resumes from its last checkpoint). Writes <out>/fashion_mnist.{md,json,png}
and a sample grid per model.
"""

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_scan import time_in_turns, training_step
from benchmarks.flops import METHOD as FLOPS_METHOD
from benchmarks.flops import count_flops
from download import FASHION_MNIST_SOURCE, export_fashion_mnist, fashion_mnist_files, read_idx
from evaluate_fid import compute_statistics, frechet_distance, load_inception
from experiments.classifier import FashionCNN, accuracy, train_classifier
from models import All_models
from sampling import step_checkpoints

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name in the table -> (registry name, extra train.py options)
    "USM-T/4": ("USM-T/4", []),
    "Zigma-T/4": ("Zigma-T/4", []),
    "USM-T/4, no skip connections": ("USM-T/4", ["--no-skip-conn"]),
}
PAD = 2  # train.py pads 28x28 to 32x32 with 2 black pixels per side
TRAIN_OPTIONS = ["--vae", "none", "--image-size", "32", "--num-classes", "10",
                 "--ema-decay", "0.99", "--fid-every", "0", "--num-workers", "0",
                 "--report-to", "none"]
SAMPLER = ["--cfg-scale", "1", "--num-sampling-steps", "25"]
CLASSIFIER_IMAGES = 59_000  # the classifier never sees the held-out images either


#################################################################################
#                        Running the repository's scripts                       #
#################################################################################

def slug(name: str) -> str:
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in name.lower())).strip("-")


def launcher(processes: int) -> list[str]:
    """How a script starts on `processes` CPU processes: python itself for one; accelerate's
    multi-process launcher for more, on CPUs and gloo (ACCELERATE_USE_CPU=1, see
    docs/training.md#several-processes)."""
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


def cached_json(path: Path, compute: Callable[[], object]) -> dict:
    """path's content, else compute() written there (how reruns reuse finished work)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute(), indent=2))
    return json.loads(path.read_text())


def train(name: str, options: list[str], args: argparse.Namespace, processes: int = 1) -> dict:
    """Train one configuration with train.py on `processes` CPU processes into <work-dir>/<name>
    (skipped when done there; an interrupted run resumes): its step checkpoints, oldest first,
    its wall-clock seconds and command."""
    folder = args.work_dir / slug(name)
    folder.mkdir(parents=True, exist_ok=True)
    command = [*launcher(processes), "train.py", "--data-path", str(args.data_path),
               "--results-dir", str(folder / "train"), *options]
    timing = cached_json(folder / "train.json",
                         lambda: {"seconds": run_command(command, folder / "commands.log")})
    (experiment,) = (folder / "train").iterdir()  # train.py resumes into the same experiment
    return dict(checkpoints=step_checkpoints(experiment), train_seconds=timing["seconds"],
                train_command=shown(command), log=experiment / "log.txt")


def sample(name: str, checkpoint: Path, options: list[str], args: argparse.Namespace,
           grid: Path) -> dict:
    """--num-samples class-balanced samples of `checkpoint` with sample.py into
    <work-dir>/<name>, and a grid at `grid` (skipped when done)."""
    folder = args.work_dir / slug(name)
    folder.mkdir(parents=True, exist_ok=True)
    samples = folder / f"samples-{args.num_samples}"
    command = [sys.executable, "sample.py", "--ckpt", str(checkpoint), "--num-samples",
               str(args.num_samples), "--batch-size", "100", "--sample-dir", str(samples),
               "--grid", str(grid), "--grid-per-class", str(args.grid_per_class), *options]
    timing = cached_json(folder / "sample.json",
                         lambda: {"seconds": run_command(command, folder / "commands.log")})
    return dict(samples=f"{samples}.npz", grid=grid, sample_seconds=timing["seconds"],
                sample_command=shown(command))


#################################################################################
#                         Images, features and distances                       #
#################################################################################

def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and labels of the "train" or "t10k" split, in file order."""
    files = fashion_mnist_files(FASHION_MNIST_SOURCE, ROOT / "data" / "fashion-mnist" / "raw")
    images = torch.from_numpy(read_idx(files[f"{split}-images-idx3-ubyte.gz"]).copy())
    labels = torch.from_numpy(read_idx(files[f"{split}-labels-idx1-ubyte.gz"]).astype(np.int64))
    return images[:, None], labels


def get_classifier(args: argparse.Namespace) -> tuple[FashionCNN, float]:
    """The Fashion-MNIST CNN (trained once on the first --classifier-images train images, then
    loaded) and its test accuracy."""
    path = args.work_dir / "classifier.pt"
    if not path.exists():
        images, labels = fashion_mnist("train")
        model = train_classifier(images[:args.classifier_images], labels[:args.classifier_images],
                                 args.classifier_epochs)
        torch.save(model.state_dict(), path)
    model = FashionCNN()
    model.load_state_dict(torch.load(path))
    return model.eval(), accuracy(model, *fashion_mnist("t10k"))


def reference_statistics(name: str, images: torch.Tensor, extractors: dict, work: Path) -> dict:
    """Mean and covariance of `images` in each feature space of `extractors` (cached by name)."""
    path = work / f"reference-{name}.npz"
    if not path.exists():
        stats = {net: compute_statistics(images, f) for net, f in extractors.items()}
        np.savez(path, **{f"{net}_{i}": v for net, s in stats.items() for i, v in enumerate(s)})
    with np.load(path) as data:
        return {net: (data[f"{net}_0"], data[f"{net}_1"]) for net in extractors}


def sample_images(samples: str) -> torch.Tensor:
    """The central 28x28 of sample.py's .npz (N, 32, 32, 3 of grey): uint8 (N, 1, 28, 28)."""
    with np.load(samples) as data:
        return torch.from_numpy(data["arr_0"][:, PAD:-PAD, PAD:-PAD, :1].copy()).permute(0, 3, 1, 2)


def frechet_distances(samples: str, cache: Path, extractors: dict, reference: dict,
                      limits: dict[str, int] | None = None) -> dict[str, float]:
    """Frechet distance of the samples to the reference in each feature space (cached); limits:
    use only the first N samples in a space (sample.py cycles the classes, so any prefix of a
    multiple of 10 is balanced)."""
    def compute() -> dict[str, float]:
        images = sample_images(samples)
        return {net: frechet_distance(*compute_statistics(images[:(limits or {}).get(net)], f),
                                      *reference[net]) for net, f in extractors.items()}
    return cached_json(cache, compute)


#################################################################################
#                                   The study                                   #
#################################################################################

def model_kwargs(extra: list[str]) -> dict:
    """The constructor arguments MODELS' extra train.py options stand for."""
    return {"skip_conn": False} if "--no-skip-conn" in extra else {}


def step_seconds(args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one training step of each model (batch --batch-size, one thread, the scan
    `auto` picks, the models timed in turns; cached)."""
    def measure() -> dict[str, float]:
        steps = {name: training_step("auto", args.batch_size, model, **model_kwargs(extra))
                 for name, (model, extra) in MODELS.items()}
        ms = time_in_turns(steps, warmup=2, repeats=args.timing_repeats)
        return {name: t / 1e3 for name, t in ms.items()}
    return cached_json(args.work_dir / "step_seconds.json", measure)


def budget_steps(args: argparse.Namespace, seconds: float) -> list[int]:
    """Steps of a model whose step takes `seconds` at each budget: multiples of the smallest, so
    one run checkpoints at all of them."""
    unit = max(1, round(args.budget_minutes * 60 / args.budgets_of[-1] / seconds))
    return [unit * k for k in args.budgets_of]


def model_size(model: str, extra: list[str]) -> dict:
    """Parameters and forward GFLOPs of one image, counted on the meta device (no weights)."""
    with torch.device("meta"):
        net = All_models[model](input_size=32, in_channels=1, num_classes=10,
                                **model_kwargs(extra))
        x, t, y = torch.randn(1, 1, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
        flops = count_flops(net, x, t, y=y)["total"]
    return dict(params=sum(p.numel() for p in net.parameters()), gflops=flops / 1e9)


def training_tflops(gflops: float, batch: int, steps: int) -> float:
    """Training TFLOPs: 3x the forward (backward ~ 2x forward) per image, times batch and steps."""
    return 3 * gflops * batch * steps / 1e3


def train_run(name: str, lr: float, seed: int, steps: list[int], args: argparse.Namespace
              ) -> dict:
    """One training of MODELS[name] for the largest budget, checkpointed at every budget."""
    model, extra = MODELS[name]
    every = math.gcd(*steps)
    return train(f"{name} lr {lr:g} seed {seed}", [
        "--model", model, "--batch-size", str(args.batch_size), "--lr", str(lr),
        "--global-seed", str(seed), "--max-steps", str(steps[-1]), "--ckpt-every", str(every),
        "--keep-last", str(steps[-1] // every), "--log-every", str(every),
        "--sample-every", str(steps[-1] + 1),  # no grid: sample.py draws them
        *TRAIN_OPTIONS, *extra], args)


def score_run(name: str, lr: float, seed: int, steps: list[int], scored_steps: list[int],
              reference: tuple[str, dict], args: argparse.Namespace) -> list[dict]:
    """Train (or reuse) one run and score its checkpoints at scored_steps against the reference
    (its name and statistics); one row per checkpoint."""
    run = train_run(name, lr, seed, steps, args)
    checkpoints = {int(c.name.split("-")[1]): c for c in run["checkpoints"]}
    ref_name, ref_stats = reference
    rows = []
    for step in scored_steps:
        tag = f"{name} lr {lr:g} seed {seed} step {step}"
        drawn = sample(tag, checkpoints[step], SAMPLER, args,
                       args.work_dir / slug(tag) / "grid.png")
        nets = {net: f for net, f in extractors(args).items() if net in ref_stats}
        scores = frechet_distances(drawn["samples"], args.work_dir / slug(tag) /
                                   f"scores-{ref_name}.json", nets, ref_stats,
                                   {"inception": args.fid_samples})
        rows.append(dict(model=name, lr=lr, seed=seed, step=step, budget_index=steps.index(step),
                         **scores, **drawn, train_seconds=run["train_seconds"],
                         train_command=run["train_command"]))
    return rows


_local = threading.local()  # one Inception network per worker thread (TorchScript, not shared)


def extractors(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """This thread's feature extractors: Inception and the classifier's features."""
    if not hasattr(_local, "nets"):
        _local.nets = {"inception": load_inception(), "classifier": args.classifier.features}
    return _local.nets


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(table: list[dict], path: Path) -> None:
    """FID and classifier FD (mean +- std over seeds) against training minutes and FLOPs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey="row")
    for row, metric, label in ((0, "fid", "FID"), (1, "classifier", "FD (classifier)")):
        for col, x_key, x_label in ((0, "minutes", "training time (minutes, one core)"),
                                    (1, "tflops", "training TFLOPs")):
            ax = axes[row, col]
            for name in MODELS:
                points = [r for r in table if r["model"] == name]
                ax.errorbar([p[x_key] for p in points], [p[metric][0] for p in points],
                            yerr=[p[metric][1] for p in points], marker="o", capsize=3,
                            label=name)
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{label} (lower is better)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("Fashion-MNIST, equal training budgets: mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b): |t| > ~2.8 (3 + 3 seeds) is p < 0.05."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    spread = (sa ** 2 / len(a) + sb ** 2 / len(b)) ** 0.5
    return (ma - mb) / spread if spread > 0 else float("inf") * np.sign(ma - mb)


def report(args: argparse.Namespace, command: str, result: dict) -> str:
    seconds, sweep, table = result["step_seconds"], result["sweep"], result["table"]
    lines = [
        "# Fashion-MNIST: USM against Zigma at equal training time",
        "",
        "Class-conditional rectified flow in pixel space (28x28 padded to 32x32), patch 4, width "
        f"64, batch {args.batch_size}, AdamW at a constant rate, EMA 0.99, one thread per run. "
        f"Budgets: {', '.join(f'{m:g}' for m in result['budget_minutes'])} minutes of training "
        "steps on one core, converted into steps by each model's measured step time. Samples: "
        f"{args.num_samples} per checkpoint, 25 Euler steps, no guidance, classes balanced, "
        f"their central 28x28 scored against the first {args.ref_images} test images: FD "
        "(classifier) in the 128-d features of a small CNN trained here (test accuracy "
        f"{result['classifier_test_accuracy']:.1%}) on all {args.num_samples}; FID on the first "
        f"{args.fid_samples} (biased upwards at this size: compare within this table only). "
        f"Mean +- standard deviation over seeds {', '.join(map(str, range(args.seeds)))}. "
        "Lower is better.",
        "",
        "## Step times and learning rates",
        "",
        "| model | parameters | GFLOPs / image | s / step | lr: FD (classifier) on held-out |",
        "|---|---|---|---|---|",
    ]
    for name in MODELS:
        runs = [r for r in sweep if r["model"] == name]
        chosen = result["lr"][name]
        lrs = ", ".join(("**" if r["lr"] == chosen else "") + f"{r['lr']:g}: {r['classifier']:.1f}"
                        + ("**" if r["lr"] == chosen else "") for r in runs)
        info = result["models"][name]
        lines.append(f"| {name} | {info['params'] / 1e6:.3f} M | {info['gflops']:.4f} | "
                     f"{seconds[name]:.3f} | {lrs} |")
    lines += [
        "",
        f"The sweep trains each model at every rate for the largest budget (seed 0) on the train "
        f"split less its last {args.held_out} images and scores it against those images; the "
        "rate in bold is kept.",
        "",
        "## Results",
        "",
        "| budget | model | steps | training TFLOPs | FID | FD (classifier) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['minutes']:g} min | {r['model']} | {r['steps']} | {r['tflops']:.2f} | "
                     f"{r['fid'][0]:.1f} +- {r['fid'][1]:.1f} | "
                     f"{r['classifier'][0]:.1f} +- {r['classifier'][1]:.1f} |")
    lines += [
        "",
        "USM-T/4 minus each other model, per budget, with Welch's t (|t| > 2.8 is a difference "
        "larger than the seed-to-seed spread explains, p < 0.05 for 3 + 3 seeds):",
        "",
        "| budget | against | FID difference (t) | FD (classifier) difference (t) |",
        "|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        lines.append(f"| {c['minutes']:g} min | {c['against']} | {c['fid']:+.1f} "
                     f"({c['fid_t']:+.1f}) | {c['classifier']:+.1f} ({c['classifier_t']:+.1f}) |")
    lines += [
        "",
        "![FID and FD against training time and FLOPs](fashion_mnist.png)",
        "",
        f"GFLOPs: forward pass, one 32x32x1 image. {FLOPS_METHOD} Training FLOPs: 3x the forward "
        "per image, times batch and steps.",
        f"Step times: {args.timing_repeats} steps of each model in turns after 2 warm-up steps "
        "(median), one thread, in this process. The train.py runs themselves ran "
        f"{args.parallel} at a time; their wall clocks (start-up included) are in "
        "fashion_mnist.json.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "Samples of seed 0 at the largest budget (one row per class: t-shirt/top, trouser, "
        "pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot):",
        "",
    ]
    lines += [f"- {name}: ![{name}]({result['grids'][name]})" for name in MODELS]
    lines += ["", "Each model's commands (seed 0 at its rate; the others differ in "
              "--global-seed and --lr):", ""]
    for name in MODELS:
        r = next(r for r in result["runs"] if r["model"] == name and r["seed"] == 0
                 and r["budget_index"] == len(args.budgets_of) - 1)
        lines += [f"    {r['train_command']}", f"    {r['sample_command']}"]
    return "\n".join(lines) + "\n"


def training_folder(args: argparse.Namespace) -> Path:
    """<work-dir>/data: the exported train split less its last --held-out images (symlinks)."""
    out = args.work_dir / "data"
    first_held_out = 60_000 - args.held_out
    for image in sorted((args.data_path / "train").glob("*/*.png")):
        link = out / "train" / image.parent.name / image.name
        if int(image.stem) < first_held_out and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(image.resolve())
    return out


def study(args: argparse.Namespace) -> dict:
    """Budgets, the learning-rate sweep, then every model at its rate over seeds and budgets."""
    seconds = step_seconds(args)
    steps = {name: budget_steps(args, seconds[name]) for name in MODELS}
    args.classifier, accuracy_ = get_classifier(args)
    train_images, _ = fashion_mnist("train")
    held_out = ("held-out", reference_statistics(
        f"held-out-{args.held_out}", train_images[-args.held_out:],
        {"classifier": args.classifier.features}, args.work_dir))

    def test_reference() -> tuple[str, dict]:  # Inception on --ref-images: minutes, so pooled
        test_images = fashion_mnist("t10k")[0][:args.ref_images]
        return "test", reference_statistics(f"test-{args.ref_images}", test_images,
                                            extractors(args), args.work_dir)

    with ThreadPoolExecutor(args.parallel) as pool:
        reference_job = pool.submit(test_reference)
        sweep_jobs = [pool.submit(score_run, name, lr, 0, steps[name], steps[name][-1:],
                                  held_out, args) for name in MODELS for lr in args.lrs]
        sweep = [row for job in sweep_jobs for row in job.result()]
        lr = {name: min((r for r in sweep if r["model"] == name),
                        key=lambda r: r["classifier"])["lr"] for name in MODELS}
        test = reference_job.result()
        final_jobs = [pool.submit(score_run, name, lr[name], seed, steps[name], steps[name],
                                  test, args) for seed in range(args.seeds) for name in MODELS]
        runs = [row for job in final_jobs for row in job.result()]

    models = {name: model_size(model, extra) for name, (model, extra) in MODELS.items()}
    table, comparisons = [], []
    budget_minutes = [args.budget_minutes * k / args.budgets_of[-1] for k in args.budgets_of]
    for i, minutes in enumerate(budget_minutes):
        for name in MODELS:
            rows = [r for r in runs if r["model"] == name and r["budget_index"] == i]
            table.append(dict(minutes=minutes, model=name, steps=steps[name][i],
                              tflops=training_tflops(models[name]["gflops"], args.batch_size,
                                                     steps[name][i]),
                              fid=mean_std([r["inception"] for r in rows]),
                              classifier=mean_std([r["classifier"] for r in rows])))
        usm = [r for r in runs if r["model"] == "USM-T/4" and r["budget_index"] == i]
        for other in list(MODELS)[1:]:
            rows = [r for r in runs if r["model"] == other and r["budget_index"] == i]
            entry = dict(minutes=minutes, against=other)
            for metric, key in (("fid", "inception"), ("classifier", "classifier")):
                a, b = [r[key] for r in usm], [r[key] for r in rows]
                entry[metric] = statistics.mean(a) - statistics.mean(b)
                entry[f"{metric}_t"] = welch_t(a, b)
            comparisons.append(entry)

    grids = {}
    for name in MODELS:
        last = next(r for r in runs if r["model"] == name and r["seed"] == 0
                    and r["budget_index"] == len(args.budgets_of) - 1)
        grids[name] = f"fashion_mnist_{slug(name)}.png"
        (args.out / grids[name]).write_bytes(Path(last["grid"]).read_bytes())
    strip = ("grid", "samples")
    return dict(step_seconds=seconds, budget_minutes=budget_minutes, steps=steps, lr=lr,
                models=models, classifier_test_accuracy=accuracy_, table=table,
                comparisons=comparisons, grids=grids,
                sweep=[{k: v for k, v in r.items() if k not in strip} for r in sweep],
                runs=[{k: v for k, v in r.items() if k not in strip} for r in runs])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / "results" / "fashion_mnist")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--data-path", type=Path, default=ROOT / "data" / "fashion-mnist")
    p.add_argument("--budget-minutes", type=float, default=4.0,
                   help="the largest budget: minutes of training steps on one core")
    p.add_argument("--budgets-of", type=int, nargs="+", default=[1, 2, 4],
                   help="budgets as multiples of the smallest; the last is --budget-minutes")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--held-out", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--ref-images", type=int, default=1000)
    p.add_argument("--classifier-images", type=int, default=CLASSIFIER_IMAGES)
    p.add_argument("--classifier-epochs", type=int, default=1)
    p.add_argument("--timing-repeats", type=int, default=10)
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: budgets of 1 and 2 steps at batch 4, 2 seeds, 2 rates, "
                        "20 samples")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_minutes, args.budgets_of, args.lrs, args.seeds = 0.0, [1, 2], [1e-3, 3e-3], 2
        args.num_samples, args.fid_samples, args.ref_images, args.held_out = 20, 10, 20, 20
        args.classifier_images, args.timing_repeats, args.grid_per_class = 500, 1, 1
        args.batch_size = 4
    if args.budgets_of != sorted(set(args.budgets_of)) or args.budgets_of[0] < 1:
        p.error("--budgets-of: increasing positive multiples, e.g. 1 2 4")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # One thread per run, inherited by train.py / sample.py: --parallel runs share the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    command = " ".join(["python -m experiments.fashion_mnist", *(argv or sys.argv[1:])])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data_path / "train").is_dir():
        export_fashion_mnist(args.data_path, limit_per_class=20 if args.quick else None)
    source_data, args.data_path = args.data_path, training_folder(args)
    result = study(args)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k != "classifier"}
    result = dict(settings={**settings, "data_path": str(source_data)}, command=command, **result)
    (args.out / "fashion_mnist.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result["table"], args.out / "fashion_mnist.png")
    (args.out / "fashion_mnist.md").write_text(report(args, command, result))
    print(report(args, command, result))


if __name__ == "__main__":
    main()
