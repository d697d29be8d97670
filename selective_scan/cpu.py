"""The "cpu" backend: the selective scan fused in C++ (cpu_scan.cpp), forward and backward.

The extension is compiled on first use by `torch.utils.cpp_extension` (a few seconds: it includes
no torch header) and cached in torch's extensions folder (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions), one build per instruction set; processes that start together (pytest
workers, DDP ranks) build it once, behind the file lock that torch takes. It needs a C++ compiler
(`CXX`, default c++) and ninja; where the build fails, `load_cpu_kernel` says why and the
dispatcher falls back to the PyTorch scan.

The kernel runs in float32 (float64 for float64 inputs), like the PyTorch scan, on W = 8 channels
per vector and tiles of tokens; threads: torch.get_num_threads(). Its backward recomputes the
states from those saved at every tile start, so nothing of size (B, Di, L, N) is kept.
"""

import ctypes
import functools
import logging

import torch
from torch import Tensor

from .reference import compute_dtype

SOURCE = __file__.removesuffix("cpu.py") + "cpu_scan.cpp"
C_TYPES = {torch.float32: "float", torch.float64: "double"}
SCALAR_NAMES = ("batch", "dim", "length", "state", "groups", "softplus", "threads")
POINTER_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "out", "states", "grad_out",
                 "du", "ddelta", "dz", "dA_part", "dD_part", "dbias_part", "dB_part", "dC_part")


class ScanProblem(ctypes.Structure):
    """cpu_scan.cpp's ScanProblem, field by field."""
    _fields_ = ([(name, ctypes.c_int64) for name in SCALAR_NAMES]
                + [(name, ctypes.c_void_p) for name in POINTER_NAMES])


def build_flags() -> tuple[str, list[str]]:
    """(build name, compiler flags): 8-lane AVX2 + FMA code where torch's own kernels use AVX2
    (the name keeps such a build from loading on a machine without it, e.g. a shared home
    directory), the compiler's default instruction set elsewhere."""
    flags = ["-O3", "-ffp-contract=fast"]  # contraction: a * b + c as one FMA where there is one
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "usm_selective_scan_cpu_avx2", [*flags, "-mavx2", "-mfma"]
    return "usm_selective_scan_cpu", flags


@functools.cache
def load_cpu_kernel() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel, or (None, why it did not build or load). Builds on first use."""
    # Importing cpp_extension logs a warning about CUDA_HOME on machines without a GPU: moot here.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        name, flags = build_flags()
        library = ctypes.CDLL(cpp_extension.load(name, [SOURCE], extra_cflags=flags,
                                                 is_python_module=False))
    except Exception as err:  # no compiler, no ninja, a failed build, an unloadable library
        return None, brief_error(err)
    finally:
        quiet.setLevel(level)
    for fn in ("fwd", "bwd"):
        for dtype in ("float", "double"):
            getattr(library, f"selective_scan_{fn}_{dtype}").argtypes = [ctypes.POINTER(ScanProblem)]
    for constant in ("lanes", "tile"):
        getattr(library, f"selective_scan_{constant}").restype = ctypes.c_int64
    return library, ""


def brief_error(err: Exception) -> str:
    """A build error in a line: its first line, and the compiler's first error if it quotes one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    first_error = next((line for line in lines[1:] if "error" in line.lower()), None)
    return f"{type(err).__name__}: {lines[0][:200]}" + (f" ... {first_error}" if first_error else "")


def cpu_kernel_available() -> bool:
    return load_cpu_kernel()[0] is not None


def blocks_and_tiles(dim: int, groups: int, length: int) -> tuple[int, int]:
    """The kernel's work layout: W-channel blocks (none straddles a B/C group) and token tiles."""
    library = load_cpu_kernel()[0]
    lanes, tile = library.selective_scan_lanes(), library.selective_scan_tile()
    return groups * -(-(dim // groups) // lanes), -(-length // tile)


def run_kernel(direction: str, dtype: torch.dtype, **tensors: Tensor | int | None) -> None:
    """Call the kernel (direction "fwd" or "bwd") on contiguous tensors of `dtype`."""
    problem = ScanProblem(threads=torch.get_num_threads())
    for name, value in tensors.items():
        setattr(problem, name, value.data_ptr() if isinstance(value, Tensor) else value)
    library = load_cpu_kernel()[0]
    kernel = getattr(library, f"selective_scan_{direction}_{C_TYPES[dtype]}")
    kernel(ctypes.byref(problem))


class CpuScan(torch.autograd.Function):
    """selective_scan_fn's contract on CPU tensors, through the C++ kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool) -> Tensor:
        dtype = compute_dtype(u.dtype)
        batch, dim, length = u.shape
        state, groups = A.shape[1], 1 if B.dim() == 3 else B.shape[1]
        blocks, tiles = blocks_and_tiles(dim, groups, length)
        inputs = [None if t is None else t.detach().to(dtype).contiguous()
                  for t in (u, delta, A, B, C, D, z, delta_bias)]
        out = torch.empty(batch, dim, length, dtype=dtype)
        lanes = load_cpu_kernel()[0].selective_scan_lanes()
        states = torch.empty(batch, blocks, tiles, state, lanes, dtype=dtype)  # at tile starts
        sizes = {"batch": batch, "dim": dim, "length": length, "state": state, "groups": groups,
                 "softplus": int(delta_softplus)}
        run_kernel("fwd", dtype, **sizes, **dict(zip(INPUTS, inputs, strict=True)), out=out,
                   states=states)
        ctx.save_for_backward(*inputs, states)
        ctx.sizes, ctx.blocks = sizes, blocks
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        *inputs, states = ctx.saved_tensors
        u, B = inputs[0], inputs[3]
        sizes, dtype = ctx.sizes, u.dtype
        batch, dim, length, state = (sizes[k] for k in ("batch", "dim", "length", "state"))
        grads = {
            "du": torch.empty_like(u), "ddelta": torch.empty_like(u), "dz": torch.empty_like(u),
            "dA_part": u.new_empty(batch, dim, state), "dD_part": u.new_empty(batch, dim),
            "dbias_part": u.new_empty(batch, dim),
            "dB_part": u.new_empty(batch, ctx.blocks, state, length),
            "dC_part": u.new_empty(batch, ctx.blocks, state, length),
        }
        run_kernel("bwd", dtype, **sizes, **dict(zip(INPUTS, inputs, strict=True)), states=states,
                   grad_out=grad_out.to(dtype).contiguous(), **grads)

        def by_group(part: Tensor) -> Tensor:  # the blocks of a group share its B and C
            groups = sizes["groups"]
            return part.view(batch, groups, -1, state, length).sum(2).view(B.shape)

        result = [grads["du"], grads["ddelta"], grads["dA_part"].sum(0), by_group(grads["dB_part"]),
                  by_group(grads["dC_part"]), grads["dD_part"].sum(0), grads["dz"],
                  grads["dbias_part"].sum(0)]
        return (*(None if t is None else g.to(t) for g, t in zip(result, ctx.dtypes, strict=True)),
                None)


INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Same contract as `selective_scan_ref`, on CPU tensors; `load_cpu_kernel` must succeed."""
    return CpuScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
