"""FID feature extraction on a CPU: the TorchScript Inception file as it is (before) against
evaluate_fid.FastInception, the same weights in eager channels-last PyTorch (after).

    python -m benchmarks.bench_fid --out benchmarks/results/fid_cpu.md
    python -m benchmarks.bench_fid --images 1000 --out ...   # the demo's FID size (~20 min)

A benchmark, not a test: it times both networks in turns (so that other work on the machine slows
both alike) on real Fashion-MNIST test images at the batch sizes that evaluate_fid.py (50) and the
demo's in-training FID (32) use, on one thread by the thread's CPU time (what the core spent, not
the time spent waiting for it) and on every core by the wall clock, and reports images per second
per core. Then it computes the features of --images test images and as many training images with
both networks (after: on one thread, where NNPACK runs some convolutions, and on every core, where
oneDNN runs all), and reports their largest difference and the FIDs.
"""

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

from benchmarks.bench_scan import cpu_machine, times_in_turns
from download import FASHION_MNIST_SOURCE, fashion_mnist_files, read_idx
from evaluate_fid import (
    InceptionFeatures,
    compute_statistics,
    default_inception_path,
    frechet_distance,
    load_inception,
)


def fashion_mnist_images(split: str, n: int) -> torch.Tensor:
    """The first n uint8 images (n, 1, 28, 28) of a Fashion-MNIST split ("train" or "t10k")."""
    files = fashion_mnist_files(FASHION_MNIST_SOURCE, Path("data/fashion-mnist/raw"))
    images = read_idx(files[f"{split}-images-idx3-ubyte.gz"])[:n]
    return torch.from_numpy(images.copy())[:, None]


def torchscript_inception() -> InceptionFeatures:
    """The network as it ran before FastInception: the TorchScript file's own forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation
        return InceptionFeatures(torch.jit.load(default_inception_path(), map_location="cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[50, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=200,
                        help="test images (and as many training images) for the FID check")
    parser.add_argument("--out", type=Path, help="write the results here (.md)")
    args = parser.parse_args()
    cores = torch.get_num_threads()  # torch's default: one thread per core
    nets = {"before": torchscript_inception(), "after": load_inception()}
    load_start = os.getloadavg()[0]
    lines = [
        "# FID features on a CPU: the TorchScript Inception (before) against FastInception "
        "(after)", "",
        f"Command: `python -m benchmarks.bench_fid {' '.join(sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}"
        f"; {cpu_machine()[0]}, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}. Seconds per image (median and minimum of "
        f"{args.repeats}, the two timed in turns after a warm-up): on one thread from the "
        f"thread's CPU time, on {cores} threads from the wall clock times {cores} (core-seconds)"
        "; images per second per core from the median.", "",
        "| batch | threads | before (s/image, median / min) | after | before (images/s/core) | "
        "after | speed-up |", "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    # one thread by its CPU time, then (on a machine of several cores) all of them by the wall
    # clock; either way seconds times threads are core-seconds
    thread_counts = [1] + [cores] * (cores > 1)
    for threads in thread_counts:
        torch.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        for batch in args.batch_sizes:
            images = fashion_mnist_images("t10k", batch)
            with torch.inference_mode():
                ms = times_in_turns({name: partial(net, images) for name, net in nets.items()},
                                    warmup=1, repeats=args.repeats, clock=clock)
            b, a = ([statistics.median(ms[name]) / 1e3 / batch * threads,
                     min(ms[name]) / 1e3 / batch * threads] for name in ("before", "after"))
            lines.append(f"| {batch} | {threads} | {b[0]:.3f} / {b[1]:.3f} | {a[0]:.3f} / "
                         f"{a[1]:.3f} | {1 / b[0]:.2f} | {1 / a[0]:.2f} | {b[0] / a[0]:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", f"Load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} after the "
              "timings.", ""]

    test, train = fashion_mnist_images("t10k", args.images), fashion_mnist_images("train",
                                                                                   args.images)

    def features(net: torch.nn.Module, threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return [torch.cat([net(b) for b in x.split(50)]).double() for x in (test, train)]

    runs = {"before": features(nets["before"], cores)}
    runs |= {f"after, {t} thread{'s' * (t > 1)}": features(nets["after"], t) for t in thread_counts}
    fids = {name: frechet_distance(*compute_statistics(f[0], torch.nn.Identity()),
                                   *compute_statistics(f[1], torch.nn.Identity()))
            for name, f in runs.items()}
    before = torch.cat(runs["before"])
    lines.append(f"Features of {args.images} Fashion-MNIST test and {args.images} training "
                 f"images, and the FID between the two sets: before, FID {fids['before']:.4f}")
    for name in list(runs)[1:]:
        relative = ((torch.cat(runs[name]) - before).abs().max() / before.abs().max()).item()
        lines.append(f"- {name}: largest difference {relative:.1e} of the largest feature; FID "
                     f"{fids[name]:.4f}, {abs(fids[name] - fids['before']):.1e} from before's")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
