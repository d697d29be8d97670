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
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from diffusion import RectifiedFlow
from models import All_models
from selective_scan import cpu, mamba_ssm_available, selective_scan, selective_scan_ref, set_backend
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


def times_in_turns(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds (by `clock`) of each of `repeats` calls of each fn, the fns called in turns
    (a, b, a, b, ...) after warm-up, so that other work on the machine slows them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(1e3 * (clock() - start))
    return times


def time_in_turns(fns: dict[str, Callable[[], object]], warmup: int, repeats: int
                  ) -> dict[str, float]:
    """Median milliseconds of each fn, called in turns (see times_in_turns)."""
    return {name: statistics.median(t) for name, t in
            times_in_turns(fns, warmup, repeats).items()}


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


def cpu_table(warmup: int, repeats: int, threads: list[int],
              clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """torch vs cpu backend at each number of threads: the scan's forward + backward at
    DEMO_SCANS and LONG_SCAN, and the demo model's training step. One dict per row, with the
    median and the minimum of each backend's times (ms, by `clock`)."""
    rows, before = [], torch.get_num_threads()

    def row(what: str, n: int, fns: dict[str, Callable[[], object]]) -> dict:
        times = times_in_turns(fns, warmup, repeats, clock)
        return {"what": what, "threads": n, **{b: statistics.median(t) for b, t in times.items()},
                **{f"{b}_min": min(t) for b, t in times.items()}}
    try:
        for n in threads:
            torch.set_num_threads(n)
            for shape in [*DEMO_SCANS, LONG_SCAN]:
                inputs = scan_inputs(*shape, torch.float32, "cpu")
                grad_out = torch.randn_like(inputs["u"])
                rows.append(row(f"scan fwd+bwd {shape}", n, {
                    b: fwd_bwd(partial(selective_scan, backend=b), inputs, grad_out)
                    for b in ("torch", "cpu")}) | {"shape": shape})
            rows.append(row("USM-T/4 training step, batch 32", n,
                            {b: training_step(b) for b in ("torch", "cpu")}))
    finally:
        torch.set_num_threads(before)
        set_backend("auto")
    return rows


# Vector operations (multiplies, adds, FMAs, each on all lanes) per (batch, channel, token, state)
# in cpu_scan.cpp's forward + backward: the recurrence (scan_states) runs twice, 21 each (17 of
# them the exp of dt A), the adjoint recurrence (adjoint_states) 8, the sums across lanes of dB
# and dC about 2.
SCAN_OPS_PER_STATE = 52


def scan_traffic(batch: int, dim: int, length: int, state: int, lanes: int, tile: int) -> int:
    """Bytes the C++ scan's forward + backward (float32, B and C shared by all channels) must
    read or write at least once: u, delta, z and out in the forward; u, delta, z, grad_out, du,
    ddelta and dz in the backward; B and C in both; the states at tile starts, written and read;
    the dB and dC parts of each block of `lanes` channels."""
    tokens = batch * dim * length
    blocks = -(-dim // lanes)
    values = (11 * tokens + 4 * batch * state * length + 2 * tokens * state // tile
              + 2 * batch * blocks * state * length)
    return 4 * values


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second (read + written) of the fastest of `repeats` one-thread copies of mib
    MiB, far more than the caches hold."""
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = min(time_fn(lambda: dst.copy_(src), warmup=1, repeats=1) for _ in range(repeats))
    finally:
        torch.set_num_threads(threads)
    return 2 * src.nbytes / best


def cpu_machine() -> tuple[str, float | None]:
    """(the CPU in words, its clock in MHz as /proc/cpuinfo gives it, None where there is none)."""
    words = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return words, None
    model = re.search(r"model name\s*:\s*(.*)", info)
    mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    flags = set(flags.group(1).split()) if flags else set()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "asimd",
                       "sve") if f in flags]
    return (f"{model.group(1) if model else platform.machine()}, {os.cpu_count()} cores "
            f"({' '.join(isa)})"), float(mhz.group(1)) if mhz else None


def roofline(rows: list[dict], lanes_per_cycle: int, mhz: float | None) -> list[str]:
    """A line per one-thread scan row: how far the cpu backend's fastest time is from the time
    its memory traffic takes at this machine's copy bandwidth, and from the time its vector
    operations take at lanes_per_cycle float lanes per cycle at the clock mhz."""
    library = load_cpu_kernel()[0]
    lanes, tile = library.selective_scan_lanes(), library.selective_scan_tile()
    bandwidth = copy_bandwidth()
    lines = [f"Roofline (threads 1; the cpu backend's minimum): memory at this machine's "
             f"one-thread copy bandwidth, {bandwidth / 1e9:.1f} GB/s (read + written, 256 MiB); "
             f"arithmetic at {lanes_per_cycle} float lanes of FMA per cycle at {mhz} MHz, the "
             f"clock /proc/cpuinfo gives, counting {SCAN_OPS_PER_STATE} vector operations per "
             "state (bench_scan.SCAN_OPS_PER_STATE).", ""]
    for r in rows:
        if r["threads"] != 1 or "shape" not in r:
            continue
        memory_ms = 1e3 * scan_traffic(*r["shape"], lanes, tile) / bandwidth
        line = (f"- {r['shape']}: {r['cpu_min']:.2f} ms is {r['cpu_min'] / memory_ms:.1f}x the "
                f"memory bound ({scan_traffic(*r['shape'], lanes, tile) / 1e6:.1f} MB, "
                f"{memory_ms:.2f} ms)")
        if mhz:
            fma_ms = (1e3 * math.prod(r["shape"]) * SCAN_OPS_PER_STATE
                      / (lanes_per_cycle * mhz * 1e6))
            line += f" and {r['cpu_min'] / fma_ms:.1f}x the FMA bound ({fma_ms:.2f} ms)"
        lines.append(line)
    return lines


CLOCKS = {  # cpu: the process's CPU time, unaffected by waiting for a core on a busy machine
    "wall": (time.perf_counter, "wall-clock"), "cpu": (time.process_time, "process CPU time")}


def write_cpu_table(path: Path, warmup: int, repeats: int, threads: list[int],
                    lanes_per_cycle: int, clock: str = "wall") -> None:
    """The table as a section of the file at path, headed by the build and the machine: a
    section of the same heading is replaced, others are kept."""
    load = os.getloadavg()[0]
    rows = cpu_table(warmup, repeats, threads, CLOCKS[clock][0])
    machine, mhz = cpu_machine()
    build = cpu.build_flags()[0]
    env = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY",) if k in os.environ]
    heading = f"## {build} ({load_cpu_kernel()[0].selective_scan_lanes()} lanes) on {machine}"
    lines = [
        heading, "",
        f"Command: `{' '.join([*env, 'python -m benchmarks.bench_scan', *sys.argv[1:]])}` "
        f"(torch capability {torch.backends.cpu.get_cpu_capability()})  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch "
        f"{torch.__version__}; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at "
        f"end. Median and minimum ({CLOCKS[clock][1]}) of {repeats} after {warmup} warm-up, the "
        "two backends timed in turns; scan shapes are (batch, Di, L, N), float32, "
        "delta_softplus, all of D, z, delta_bias.", "",
        "| what | threads | torch (ms) | cpu (ms) | speed-up | torch min | cpu min | speed-up "
        "(min) |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['what']} | {r['threads']} | {r['torch']:.2f} | {r['cpu']:.2f} | "
              f"{r['torch'] / r['cpu']:.1f}x | {r['torch_min']:.2f} | {r['cpu_min']:.2f} | "
              f"{r['torch_min'] / r['cpu_min']:.1f}x |" for r in rows]
    lines += ["", *roofline(rows, lanes_per_cycle, mhz)]
    section = "\n".join(lines) + "\n"
    print(section)
    title = "# Selective scan on the CPU: the PyTorch scan (torch) against the C++ scan (cpu)\n"
    text = path.read_text() if path.exists() else title
    parts = re.split(r"(?m)^(?=## )", text)
    keep = [p for p in parts[1:] if p.splitlines()[0] != heading]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(parts[0].rstrip("\n") + "\n\n" + "\n".join(
        p.rstrip("\n") + "\n" for p in [*keep, section]))


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
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="--cpu-table: the thread counts")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="--cpu-table: wall-clock time, or (one thread) the process's CPU "
                             "time, which a busy machine's other work does not inflate")
    parser.add_argument("--fma-lanes-per-cycle", type=int, default=16,
                        help="--cpu-table's roofline: float FMAs a core completes per cycle (16: "
                             "two 256-bit FMA units, as AMD Zen 4 for AVX2 and AVX-512 code and "
                             "Intel since Haswell for AVX2)")
    args = parser.parse_args()
    if args.cpu_table:
        if load_cpu_kernel()[0] is None:
            raise SystemExit(f"the C++ CPU scan did not build: {load_cpu_kernel()[1]}")
        if args.clock == "cpu" and args.threads != [1]:
            parser.error("--clock cpu sums the threads' times: give --threads 1")
        write_cpu_table(args.cpu_table, args.warmup, args.repeats, args.threads,
                        args.fma_lanes_per_cycle, args.clock)
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
