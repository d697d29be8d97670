"""What this machine can run, and whether the fast kernels compute what the PyTorch scan does.

`kernel_report()` is the text `python -m selective_scan` prints: torch and CUDA versions, which
backends load and, for each that does not, the error and what fixes it. `scan_parity()` compares
a backend with another scan for the output and the gradient of every input; benchmarks/gpu_check.py
runs it at USM-B's shapes, `python -m selective_scan` at small ones.
"""

import math
import platform
from collections.abc import Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import Tensor

from .conv import load_conv_kernel
from .cpu import load_cpu_kernel
from .dispatch import (
    CPU_BUILD_HINT,
    INSTALL_HINT,
    load_mamba_kernel,
    load_triton_scan,
    selective_scan,
)

# Largest |a - b| / max |b| accepted per dtype for the output and each gradient: float32 differs
# by summation order only; bfloat16 inputs and outputs carry 8 bits of mantissa (about 4e-3).
PARITY_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def scan_inputs(
    batch: int, dim: int, length: int, state: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, Tensor]:
    """Inputs as a Mamba layer makes them at initialisation (Gu & Dao 2023): A = -(1..N), D = 1,
    softplus(delta_bias) = dt log-uniform in [1e-3, 0.1]; activations standard normal."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.empty(dim).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": 0.1 * torch.randn(batch, dim, length, generator=g),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }
    weights = ("A", "D", "delta_bias")  # float32 like Mamba's parameters (the kernel wants it)
    return {
        k: v.to(device, torch.float32 if k in weights else dtype).requires_grad_()
        for k, v in x.items()
    }


def scan_parity(scan: Callable[..., Tensor], against: Callable[..., Tensor], batch: int, dim: int,
                length: int, state: int, dtype: torch.dtype, device: str) -> dict[str, float]:
    """max |a - b| / max |b| between `scan` (a) and `against` (b) on the same inputs, for the
    output ("out") and the gradient of each of u, delta, A, B, C, D, z, delta_bias."""
    inputs = scan_inputs(batch, dim, length, state, dtype, device)
    weight = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    weight = weight.to(device, dtype)  # a random linear loss reaches every gradient entry

    def run(fn: Callable[..., Tensor]) -> dict[str, Tensor]:
        out = fn(**inputs, delta_softplus=True)
        grads = torch.autograd.grad((out * weight).sum(), list(inputs.values()))
        return {"out": out.detach(), **dict(zip(inputs, grads, strict=True))}

    got, expected = run(scan), run(against)
    return {k: ((got[k].float() - expected[k].float()).abs().max()
                / expected[k].float().abs().max().clamp(min=1e-12)).item() for k in expected}


def kernel_parity(dtype: torch.dtype, batch: int = 2, dim: int = 256, length: int = 512,
                  state: int = 16, backend: str = "mamba_ssm") -> dict[str, float]:
    """A fused backend (mamba_ssm or triton on the GPU, cpu on the CPU) against the PyTorch
    scan."""
    device = "cpu" if backend == "cpu" else "cuda"
    return scan_parity(partial(selective_scan, backend=backend),
                       partial(selective_scan, backend="torch"),
                       batch, dim, length, state, dtype, device)


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def backend_status() -> list[dict]:
    """One row per backend: name, loads, detail (version or the import error)."""
    scan, scan_error = load_mamba_kernel()
    conv, conv_error = load_conv_kernel()
    cpu, cpu_error = load_cpu_kernel()
    triton_scan, triton_error = load_triton_scan()
    return [
        {"name": "torch (chunked PyTorch scan)", "loads": True, "detail": "always available"},
        {"name": "cpu (C++ CPU scan, built on first use)", "loads": cpu is not None,
         "detail": cpu._name if cpu else cpu_error},
        {"name": "mamba_ssm (selective_scan_cuda kernel)", "loads": scan is not None,
         "detail": f"mamba-ssm {package_version('mamba-ssm')}" if scan else scan_error},
        {"name": "triton (Triton scan, compiled on a GPU's first use)",
         "loads": triton_scan is not None,
         "detail": f"triton {triton_scan.triton.__version__}" if triton_scan else triton_error},
        {"name": "causal_conv1d (Zigma's causal conv1d)", "loads": conv is not None,
         "detail": f"causal-conv1d {package_version('causal-conv1d')}" if conv else conv_error},
    ]


def environment() -> dict[str, str]:
    """Python, torch and CUDA versions, and the GPU (name, compute capability) if any."""
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch CUDA build": torch.version.cuda or "none (CPU-only build)"}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["GPU"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        env["GPU"] = "none visible to torch"
    return env


def kernel_report() -> str:
    lines = [f"{k}: {v}" for k, v in environment().items()]
    lines.append("backends:")
    rows = backend_status()
    for row in rows:
        lines.append(f"  {'loads ' if row['loads'] else 'MISSING'} {row['name']}: {row['detail']}")
    if not rows[1]["loads"]:
        lines.append(f"fix for cpu: {CPU_BUILD_HINT}")
    if not (rows[2]["loads"] and rows[4]["loads"]):  # mamba_ssm's scan, causal_conv1d
        lines.append(f"fix (on Linux with an NVIDIA GPU and the CUDA toolkit of torch's CUDA "
                     f"build): {INSTALL_HINT}")
    return "\n".join(lines)
