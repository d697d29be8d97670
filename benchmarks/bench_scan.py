"""Selective scan speed: forward + backward of each backend against the token-by-token reference.

    python -m benchmarks.bench_scan                  # CPU: batch 4, Di 128, L 1024, N 16, float32
    python -m benchmarks.bench_scan --device cuda    # also mamba_ssm's kernel when it is installed

A benchmark, not a test: it prints the median time of one forward pass plus the backward pass to
all eight inputs (u, delta, A, B, C, D, z, delta_bias), after warm-up, and the speed-up over
`selective_scan_ref`. `time_fn` and `time_backends` are also used by benchmarks/benchmark.py.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from selective_scan import mamba_ssm_available, selective_scan, selective_scan_ref
from selective_scan.check import scan_inputs


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall-clock seconds of `repeats` calls of fn(), after `warmup` untimed calls.
    CUDA work is synchronised before the clock is read."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backends(
    batch: int = 4,
    dim: int = 128,
    length: int = 1024,
    state: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 5,
) -> list[dict]:
    """Forward + backward time of the reference, the torch backend and, on CUDA when installed,
    mamba_ssm's kernel. One dict per backend: backend, shape (B, Di, L, N), ms, speedup."""
    inputs = scan_inputs(batch, dim, length, state, dtype, device)
    grad_out = torch.randn_like(inputs["u"])
    scans = {"reference": selective_scan_ref, "torch": partial(selective_scan, backend="torch")}
    if device.startswith("cuda") and mamba_ssm_available():
        scans["mamba_ssm"] = partial(selective_scan, backend="mamba_ssm")

    def fwd_bwd(scan: Callable[..., Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(
            scan(**inputs, delta_softplus=True), list(inputs.values()), grad_out
        )

    ms = {name: 1e3 * time_fn(fwd_bwd(scan), warmup, repeats) for name, scan in scans.items()}
    shape = (batch, dim, length, state)
    return [
        {"backend": name, "shape": shape, "ms": t, "speedup": ms["reference"] / t}
        for name, t in ms.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128, help="Di, the scanned channels")
    parser.add_argument("--length", type=int, default=1024, help="L, the tokens")
    parser.add_argument("--state", type=int, default=16, help="N, Mamba's d_state")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()

    rows = time_backends(
        args.batch, args.dim, args.length, args.state, getattr(torch, args.dtype), args.device,
        args.warmup, args.repeats,
    )
    threads = torch.get_num_threads()
    print(
        f"selective scan, forward + backward: batch {args.batch}, Di {args.dim}, L {args.length}, "
        f"N {args.state}, {args.dtype} on {args.device} ({threads} CPU threads), "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    for row in rows:
        print(f"  {row['backend']:<10} {row['ms']:10.1f} ms   {row['speedup']:7.1f}x reference")
    if not any(row["backend"] == "mamba_ssm" for row in rows):
        print("  mamba_ssm  not timed (needs CUDA and `source scripts/setup_cuda.sh`)")
    if args.json:
        config = {**vars(args), "json": str(args.json), "cpu_threads": threads}
        args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
