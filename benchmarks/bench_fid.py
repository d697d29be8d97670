"""FID feature extraction on a CPU: the TorchScript Inception file as it is (before) against
evaluate_fid.FastInception, the same weights in eager channels-last PyTorch (after).

    python -m benchmarks.bench_fid --out benchmarks/results/fid_cpu.md
    python -m benchmarks.bench_fid --images 1000 --out ...   # the demo's FID size (slow: hours)

A benchmark, not a test: on one thread, it times both networks in turns (so that other work on
the machine slows both alike) on real Fashion-MNIST test images at the batch sizes that
evaluate_fid.py (50) and the demo's in-training FID (32) use, and reports images per second per
core from the thread's CPU time (what the core spent, not the time spent waiting for it). Then
it computes the features of --images test images and as many training images with both
networks, and reports their largest difference and the two FIDs.
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
    torch.set_num_threads(1)
    nets = {"before": torchscript_inception(), "after": load_inception()}
    load_start = os.getloadavg()[0]
    lines = [
        "# FID features on a CPU: the TorchScript Inception (before) against FastInception "
        "(after)", "",
        f"Command: `python -m benchmarks.bench_fid {' '.join(sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}"
        f"; {cpu_machine()[0]}, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; one thread. Seconds per image from the "
        f"thread's CPU time (median and minimum of {args.repeats}, the two timed in turns after a "
        "warm-up); images per second per core from the median.", "",
        "| batch | before (s/image, median / min) | after | before (images/s/core) | after | "
        "speed-up |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for batch in args.batch_sizes:
        images = fashion_mnist_images("t10k", batch)
        with torch.inference_mode():
            ms = times_in_turns({name: partial(net, images) for name, net in nets.items()},
                                warmup=1, repeats=args.repeats, clock=time.thread_time)
        b, a = ([statistics.median(ms[name]) / 1e3 / batch, min(ms[name]) / 1e3 / batch]
                for name in ("before", "after"))
        lines.append(f"| {batch} | {b[0]:.3f} / {b[1]:.3f} | {a[0]:.3f} / {a[1]:.3f} | "
                     f"{1 / b[0]:.2f} | {1 / a[0]:.2f} | {b[0] / a[0]:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"Load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} after the "
              "timings (2 cores shared with other work).", ""]

    test, train = fashion_mnist_images("t10k", args.images), fashion_mnist_images("train",
                                                                                   args.images)
    with torch.inference_mode():
        features = {name: [torch.cat([net(b) for b in x.split(50)]) for x in (test, train)]
                    for name, net in nets.items()}
    before, after = (torch.cat(features[name]).double() for name in ("before", "after"))
    relative = ((after - before).abs().max() / before.abs().max()).item()
    fids = {name: frechet_distance(*compute_statistics(f[0], torch.nn.Identity()),
                                   *compute_statistics(f[1], torch.nn.Identity()))
            for name, f in features.items()}
    lines += [
        f"Features of {args.images} Fashion-MNIST test and {args.images} training images: largest "
        f"difference {relative:.1e} of the largest feature. FID (test against training images): "
        f"before {fids['before']:.4f}, after {fids['after']:.4f}, difference "
        f"{abs(fids['before'] - fids['after']):.1e}.",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
