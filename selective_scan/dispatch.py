"""`selective_scan`: one entry point, four backends.

"mamba_ssm" is the fused CUDA kernel of the Mamba authors (`selective_scan_fn`); "triton" is this
package's fused scan in Triton (triton_scan.py), compiled at run time, so a GPU needs nothing built;
"cpu" is this package's fused C++ scan for CPU tensors (cpu.py, compiled on first use); "torch" is
the chunked pure-PyTorch scan, which runs anywhere. "auto" takes the fused kernel of the tensors'
device when it loads (on CUDA: mamba_ssm's, else the Triton scan), and falls back to "torch"
otherwise, with one warning that says why (a missing kernel or compiler never stops a run, but it
slows it several times). The Triton scan is compared with the PyTorch scan at its first use per
device and dtype (`triton_check`); where it fails to compile or disagrees, "auto" runs the PyTorch
scan instead, with one warning that names the error.

The models call `selective_scan(...)` without a backend, so the choice is process-wide:
`set_backend()` sets it (train.py's --scan-backend), `resolve_backend()` says what a device gets
and why. The scan always runs with autocast off: its state and the weights A, D, delta_bias stay in
float32 under bf16/fp16 training (low-precision states are where Mamba's NaNs come from).
"""

import contextlib
import functools
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from .chunked import selective_scan_chunked
from .cpu import brief_error, load_cpu_kernel, selective_scan_cpu

BACKENDS = ("auto", "torch", "cpu", "mamba_ssm", "triton")
INSTALL_HINT = "source scripts/setup_cuda.sh"  # builds mamba-ssm and causal-conv1d (GPU + nvcc)
CPU_BUILD_HINT = "a C++ compiler (CXX, default c++) and ninja (pip install ninja)"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the GPU kernels accept
# The first-use check of the Triton scan: long enough to cross a chunk border (256 tokens), with
# every optional input (check.scan_parity passes D, z, delta_bias and softplus).
TRITON_CHECK_SHAPE = {"batch": 2, "dim": 8, "length": 300, "state": 16}
_backend = "auto"  # process-wide: see set_backend


@functools.cache
def load_mamba_kernel() -> tuple[Callable | None, str]:
    """mamba_ssm's selective_scan_fn, or (None, why it failed). Imported on first use only."""
    try:
        # The compiled extension first: some mamba_ssm versions import it lazily, which would
        # otherwise surface as "No module named 'selective_scan_cuda'" at the first call.
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, OSError (CUDA libraries), ABI mismatch with torch, ...
        return None, f"{type(err).__name__}: {err}"
    return selective_scan_fn, ""


def mamba_ssm_available() -> bool:
    """True when mamba_ssm's compiled selective scan kernel imports."""
    return load_mamba_kernel()[0] is not None


@functools.cache
def load_triton_scan() -> tuple[ModuleType | None, str]:
    """The Triton scan's module (triton_scan.py), or (None, why Triton did not import)."""
    try:
        from . import triton_scan
    except Exception as err:  # no triton (macOS, Windows), or one that does not load
        return None, f"{type(err).__name__}: {err}"
    return triton_scan, ""


@functools.cache
def triton_check(device: str, dtype: torch.dtype) -> str:
    """"" when the Triton scan compiles on `device` and matches the PyTorch scan there with `dtype`
    inputs (output and every gradient within check.PARITY_TOL), else what went wrong. Runs once
    per process per (device, dtype), at the first Triton scan of each."""
    from .check import PARITY_TOL, scan_parity  # check.py imports this module

    scan = load_triton_scan()[0].selective_scan_triton
    try:
        with torch.inference_mode(False), torch.enable_grad():  # sampling runs without grad
            errors = scan_parity(scan, selective_scan_chunked, **TRITON_CHECK_SHAPE, dtype=dtype,
                                 device=device)
    except Exception as err:  # a compile error, an unsupported GPU, a launch failure
        return brief_error(err)
    worst = max(errors, key=errors.get)
    if not errors[worst] <= PARITY_TOL[dtype]:  # NaN fails too
        return (f"it disagrees with the PyTorch scan: relative error {errors[worst]:.1e} in "
                f"{worst}, tolerance {PARITY_TOL[dtype]:.0e}")
    return ""


def set_backend(backend: str) -> None:
    """The backend of every later `selective_scan` call that names none (default "auto")."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _backend = backend


def get_backend() -> str:
    return _backend


def resolve_backend(device: torch.device | str, backend: str | None = None) -> tuple[str, str]:
    """(backend that scans tensors on `device` will use, why), for `backend` or the process-wide
    setting. RuntimeError, saying what to install or change, where "mamba_ssm" or "cpu" cannot
    run. Builds the C++ CPU scan on first use when it may run."""
    backend = backend or _backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_type = torch.device(device).type
    if backend == "torch":
        return "torch", "the PyTorch scan was asked for (--scan-backend torch)"
    if backend == "cpu":
        if device_type != "cpu":
            raise RuntimeError(f"the cpu backend runs on CPU tensors, this run is on {device}; "
                               f"use auto or mamba_ssm")
        library, why_not = load_cpu_kernel()
        if library is None:
            raise RuntimeError(f"the cpu backend needs the C++ CPU scan, which did not build "
                               f"({why_not}); it builds on first use with {CPU_BUILD_HINT}. "
                               f"Elsewhere use the torch backend.")
        return "cpu", "the C++ CPU scan was asked for and builds"
    if backend == "triton":
        module, why_not = load_triton_scan()
        if module is None:
            raise RuntimeError(f"the triton backend needs Triton, which did not import "
                               f"({why_not}); it comes with PyTorch on Linux (`pip install "
                               f"triton`). Elsewhere use the torch backend.")
        if device_type != "cuda" and not (device_type == "cpu" and module.INTERPRETED):
            raise RuntimeError(f"the triton backend runs on CUDA tensors (on CPU tensors only "
                               f"under TRITON_INTERPRET=1), this run is on {device}; use auto or "
                               f"torch")
        return "triton", (f"the Triton scan was asked for and Triton {module.triton.__version__} "
                          f"imports (checked against the PyTorch scan at first use)")
    kernel, why_not = load_mamba_kernel()
    if backend == "mamba_ssm":
        if kernel is None:
            raise RuntimeError(
                f"the mamba_ssm backend needs mamba_ssm's compiled kernel, which did not load "
                f"({why_not}). On a machine with an NVIDIA GPU and CUDA, install it with "
                f"`{INSTALL_HINT}`; elsewhere use the torch backend."
            )
        if device_type != "cuda":
            raise RuntimeError(f"the mamba_ssm backend runs on CUDA tensors, this run is on "
                               f"{device}; use the torch backend")
        return "mamba_ssm", "mamba_ssm's kernel was asked for and loads"
    if device_type == "cpu":
        library, why_not = load_cpu_kernel()
        if library is not None:
            return "cpu", "auto: tensors on cpu, and the C++ CPU scan builds"
        return "torch", f"auto: tensors on cpu, and the C++ CPU scan did not build ({why_not})"
    if device_type != "cuda":
        return "torch", f"auto: tensors on {device}, the fused scans run on CPU or CUDA only"
    if kernel is not None:
        return "mamba_ssm", "auto: mamba_ssm's kernel loads and the tensors are on CUDA"
    module, why_not_triton = load_triton_scan()
    if module is not None:
        return "triton", (f"auto: mamba_ssm's kernel did not load ({why_not}), Triton "
                          f"{module.triton.__version__} imports: the Triton scan, checked against "
                          f"the PyTorch scan at first use (`{INSTALL_HINT}` installs the kernel)")
    return "torch", (f"auto: mamba_ssm's kernel did not load ({why_not}) and Triton did not import "
                     f"({why_not_triton}); install the kernel with `{INSTALL_HINT}`")


@functools.cache
def warn_slow_path() -> None:
    """Once per process: "auto" met (or will meet) CUDA tensors without a fused GPU scan."""
    warnings.warn(
        f"selective_scan: mamba_ssm's kernel did not load ({load_mamba_kernel()[1]}) and Triton "
        f"did not import ({load_triton_scan()[1]}), so the PyTorch scan runs on the GPU: many "
        f"times slower, with (B, Di, L, N) tensors in memory. Install the kernel with "
        f"`{INSTALL_HINT}`, or choose this path knowingly with --scan-backend torch.",
        RuntimeWarning, stacklevel=3)


@functools.cache
def warn_triton_failed(device: str, dtype: torch.dtype) -> None:
    """Once per process per (device, dtype): "auto" chose the Triton scan, and it failed its
    first-use check."""
    warnings.warn(
        f"selective_scan: the Triton scan failed its first-use check on {device} with {dtype} "
        f"inputs ({triton_check(device, dtype)}), so the PyTorch scan runs instead: many times "
        f"slower. `python -m selective_scan` reports the GPU kernels; --scan-backend torch "
        f"chooses this path knowingly.", RuntimeWarning, stacklevel=4)


@functools.cache
def warn_cpu_fallback() -> None:
    """Once per process: "auto" met (or will meet) CPU tensors and the C++ scan did not build."""
    warnings.warn(
        f"selective_scan: the C++ CPU scan did not build ({load_cpu_kernel()[1]}), so the "
        f"PyTorch scan runs: several times slower. It builds on first use with "
        f"{CPU_BUILD_HINT}; or choose this path knowingly with --scan-backend torch.",
        RuntimeWarning, stacklevel=3)


def check_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """ValueError unless the arguments have selective_scan_fn's shapes (see reference.py)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, Di, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (Di={dim}, N), got {A.dtype} {tuple(A.shape)}")
    state = A.shape[1]
    groups = [t.shape[1] if t.dim() == 4 else 1 for t in (B, C)]
    for name, t, g in zip(("B", "C"), (B, C), groups, strict=True):
        fits = t.dim() in (3, 4) and t.shape[0] == batch and t.shape[-2:] == (state, length)
        if not fits or dim % g:
            raise ValueError(
                f"{name} must be (batch={batch}, N={state}, L={length}) or (batch, G, N, L) with G "
                f"dividing Di={dim}, got {tuple(t.shape)}"
            )
    if groups[0] != groups[1]:
        raise ValueError(f"B and C must have the same number of groups, got {groups}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be (Di={dim},), got {tuple(t.shape)}")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Mamba's selective scan (Gu & Dao 2023, eq. 2a/2b, output gated by silu(z)) with the
    arguments of mamba_ssm's `selective_scan_fn`. Returns (batch, Di, L) in u's dtype.

    backend: "torch" (chunked PyTorch, any device), "cpu" (the C++ scan, CPU tensors),
    "mamba_ssm" (CUDA kernel), "triton" (Triton kernels, CUDA tensors; these three RuntimeError
    where they cannot run, "triton" also where it fails its first-use check), "auto" (the fused
    scan of the tensors' device when it loads and, for Triton, passes its check, else "torch"),
    or None for the process-wide setting (`set_backend`, default "auto").
    """
    backend = backend or _backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_shapes(u, delta, A, B, C, D, z, delta_bias)
    device = u.device.type  # float32 state and weights under autocast, always (no meta autocast)
    with (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
          else contextlib.nullcontext()):
        return _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend)


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, backend: str) -> Tensor:
    if backend == "auto":
        backend = _auto_backend(u)
    if backend == "torch":
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "cpu":
        resolve_backend(u.device, "cpu")  # RuntimeError where it cannot run
        return selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    resolve_backend(u.device, backend)  # RuntimeError where the kernel cannot run
    if u.dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"backend={backend!r} takes float32/float16/bfloat16 tensors, got "
                           f"{u.dtype}; use backend='torch'")
    if backend == "triton":
        error = triton_check(str(u.device), u.dtype)
        if error:
            raise RuntimeError(f"the Triton scan failed its first-use check on {u.device} with "
                               f"{u.dtype} inputs: {error}. Use --scan-backend auto or torch.")
        scan = load_triton_scan()[0].selective_scan_triton
        return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    kernel = load_mamba_kernel()[0]
    # The kernel takes activations in u's dtype and the weights A, D, delta_bias in float32.
    return kernel(
        u,
        delta.to(u.dtype),
        A.float(),
        B.to(u.dtype),
        C.to(u.dtype),
        None if D is None else D.float(),
        None if z is None else z.to(u.dtype),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
    )


def _auto_backend(u: Tensor) -> str:
    """What "auto" runs for these tensors, warning once where a fused kernel is missing."""
    if u.is_cuda:
        return _gpu_backend(str(u.device), u.dtype)
    if u.device.type == "cpu":
        if load_cpu_kernel()[0] is not None:
            return "cpu"  # any float dtype: it scans in float32, or float64 for float64
        warn_cpu_fallback()
    return "torch"


def _gpu_backend(device: str, dtype: torch.dtype) -> str:
    """What "auto" runs on a GPU: mamba_ssm's kernel, else the Triton scan where it passes its
    first-use check, else the PyTorch scan, with one warning that says why."""
    if mamba_ssm_available():
        return "mamba_ssm" if dtype in KERNEL_DTYPES else "torch"
    if load_triton_scan()[0] is None:
        warn_slow_path()
    elif dtype in KERNEL_DTYPES:
        if not triton_check(device, dtype):
            return "triton"
        warn_triton_failed(device, dtype)
    return "torch"
