"""Selective scan speed: forward + backward of each backend against the token-by-token reference.

    python -m benchmarks.bench_scan                  # CPU: batch 4, Di 128, L 1024, N 16, float32
    python -m benchmarks.bench_scan --device cuda    # also mamba_ssm's kernel and the Triton scan
    python -m benchmarks.bench_scan --cpu-table benchmarks/results/scan_cpu.md   # torch vs cpu

A benchmark, not a test: it prints the median time of one forward pass plus the backward pass to
all eight inputs (u, delta, A, B, C, D, z, delta_bias), after warm-up, and the speed-up over
`selective_scan_ref`. `time_fn` and `time_backends` are also used by benchmarks/benchmark.py.
--cpu-table writes the torch and cpu backends side by side, at 1 and 2 threads: the scan at the
shapes of the demo's model (USM-T/4 on 32x32x1 images at batch 32) and at (4, 128, 1024, 16), and
that model's training step. The two backends are timed in turns, so that a machine busy with other
work slows both alike and their ratio stays meaningful.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from diffusion import RectifiedFlow
from models import All_models
from selective_scan import mamba_ssm_available, selective_scan, selective_scan_ref, set_backend
from selective_scan.check import scan_inputs
from selective_scan.cpu import load_cpu_kernel
from selective_scan.dispatch import load_triton_scan

# (batch, Di, L, N) of the demo's scans: USM-T/4 at batch 32 scans 64, 16, 4 and 1 tokens.
DEMO_SCANS = [(32, 128, 64, 16), (32, 128, 16, 16), (32, 128, 4, 16), (32, 128, 1, 16)]
LONG_SCAN = (4, 128, 1024, 16)


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
    """Forward + backward time of the reference, the torch backend, the cpu backend on CPU when
    it builds and, on CUDA when installed, mamba_ssm's kernel and the Triton scan. One dict per
    backend: backend, shape (B, Di, L, N), ms, speedup."""
    inputs = scan_inputs(batch, dim, length, state, dtype, device)
    grad_out = torch.randn_like(inputs["u"])
    scans = {"reference": selective_scan_ref, "torch": partial(selective_scan, backend="torch")}
    if device == "cpu" and load_cpu_kernel()[0] is not None:
        scans["cpu"] = partial(selective_scan, backend="cpu")
    if device.startswith("cuda") and mamba_ssm_available():
        scans["mamba_ssm"] = partial(selective_scan, backend="mamba_ssm")
    if device.startswith("cuda") and load_triton_scan()[0] is not None:
        scans["triton"] = partial(selective_scan, backend="triton")
    ms = {name: 1e3 * time_fn(fwd_bwd(scan, inputs, grad_out), warmup, repeats)
          for name, scan in scans.items()}
    shape = (batch, dim, length, state)
    return [
        {"backend": name, "shape": shape, "ms": t, "speedup": ms["reference"] / t}
        for name, t in ms.items()
    ]


def fwd_bwd(scan: Callable[..., Tensor], inputs: dict[str, Tensor], grad_out: Tensor
            ) -> Callable[[], object]:
    """One forward and the backward to every input."""
    return lambda: torch.autograd.grad(
        scan(**inputs, delta_softplus=True), list(inputs.values()), grad_out)


def time_in_turns(fns: dict[str, Callable[[], object]], warmup: int, repeats: int
                  ) -> dict[str, float]:
    """Median milliseconds of each fn, called in turns (a, b, a, b, ...) after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def training_step(backend: str, batch: int = 32, model: str = "USM-T/4", **model_kwargs
                  ) -> Callable[[], object]:
    """One training step of a Fashion-MNIST-sized model (default the demo's USM-T/4; 32x32x1
    images, 10 classes, rectified flow, AdamW) with `backend` as the process-wide scan."""
    torch.manual_seed(0)
    model = All_models[model](input_size=32, in_channels=1, num_classes=10, **model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.py's
    flow, x, y = RectifiedFlow(), torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> None:
        set_backend(backend)
        loss = flow.training_losses(model, x, {"y": y})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def cpu_table(warmup: int, repeats: int) -> list[dict]:
    """torch vs cpu backend at 1 and 2 threads: the scan's forward + backward at DEMO_SCANS and
    LONG_SCAN, and the demo model's training step. One dict per row."""
    rows, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for shape in [*DEMO_SCANS, LONG_SCAN]:
                inputs = scan_inputs(*shape, torch.float32, "cpu")
                grad_out = torch.randn_like(inputs["u"])
                ms = time_in_turns({b: fwd_bwd(partial(selective_scan, backend=b), inputs, grad_out)
                                    for b in ("torch", "cpu")}, warmup, repeats)
                rows.append({"what": f"scan fwd+bwd {shape}", "threads": n, **ms})
            ms = time_in_turns({b: training_step(b) for b in ("torch", "cpu")}, warmup, repeats)
            rows.append({"what": "USM-T/4 training step, batch 32", "threads": n, **ms})
    finally:
        torch.set_num_threads(threads)
        set_backend("auto")
    return rows


def write_cpu_table(path: Path, warmup: int, repeats: int) -> None:
    load = os.getloadavg()[0]
    rows = cpu_table(warmup, repeats)
    lines = [
        "# Selective scan on the CPU: the PyTorch scan (torch) against the C++ scan (cpu)", "",
        f"Command: `python -m benchmarks.bench_scan --cpu-table {path}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch "
        f"{torch.__version__}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at "
        f"end. Median of {repeats} after {warmup} warm-up, the two backends timed in turns; "
        f"scan shapes are (batch, Di, L, N), float32, delta_softplus, all of D, z, delta_bias.", "",
        "| what | threads | torch (ms) | cpu (ms) | speed-up |", "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['what']} | {r['threads']} | {r['torch']:.2f} | {r['cpu']:.2f} | "
              f"{r['torch'] / r['cpu']:.1f}x |" for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
    parser.add_argument("--cpu-table", type=Path,
                        help="only the torch vs cpu comparison (see above), written here as .md")
    args = parser.parse_args()
    if args.cpu_table:
        if load_cpu_kernel()[0] is None:
            raise SystemExit(f"the C++ CPU scan did not build: {load_cpu_kernel()[1]}")
        write_cpu_table(args.cpu_table, args.warmup, args.repeats)
        return

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
