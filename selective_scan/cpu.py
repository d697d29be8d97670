"""The "cpu" backend: the selective scan fused in C++ (cpu_scan.cpp), forward and backward.

The extension is compiled on first use by `torch.utils.cpp_extension` and cached in torch's
extensions folder (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), one build per
instruction set. It includes no torch header, so the build takes seconds; processes that start
together (pytest workers, DDP ranks) build it once, behind the OS file lock torch takes in the
build folder. It needs a C++ compiler (`CXX`, default c++) and ninja; where the build fails,
`load_cpu_kernel` says why and the dispatcher falls back to the PyTorch scan.

The kernel scans in float32 (float64 for float64 inputs), like the PyTorch scan, with
torch.get_num_threads() threads. Its backward recomputes the states from those the forward saved
at every tile start, so nothing of size (B, Di, L, N) is kept for it.
"""

import ctypes
import functools
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from .reference import compute_dtype

SOURCE = Path(__file__).with_name("cpu_scan.cpp")
C_TYPES = {torch.float32: "float", torch.float64: "double"}
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


class ScanProblem(ctypes.Structure):
    """cpu_scan.cpp's ScanProblem, field by field."""
    _fields_ = (
        [(name, ctypes.c_int64)
         for name in ("batch", "dim", "length", "state", "groups", "softplus", "threads")]
        + [(name, ctypes.c_void_p)
           for name in (*INPUTS, "out", "states", "grad_out", "du", "ddelta", "dz", "dA_part",
                        "dD_part", "dbias_part", "dB_part", "dC_part")]
    )


def build_flags(capability: str | None = None) -> tuple[str, list[str]]:
    """(build name, compiler flags) for the widest vectors torch's own kernels use (capability,
    default torch.backends.cpu.get_cpu_capability()): 16-lane AVX-512 or 8-lane AVX2 code, with
    FMA (the name keeps such a build from loading on a machine without them, e.g. through a
    shared home directory); elsewhere the compiler's default instruction set, which on Arm
    (aarch64) includes NEON. GCC and clang (macOS's compiler) take the same flags."""
    flags = ["-O3", "-ffp-contract=fast", "-Wno-psabi"]  # a * b + c as one FMA where there is one
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "usm_selective_scan_cpu_avx512", [*flags, "-mavx512f", "-mavx2", "-mfma"]
    if capability == "AVX2":
        return "usm_selective_scan_cpu_avx2", [*flags, "-mavx2", "-mfma"]
    return "usm_selective_scan_cpu", flags


@functools.cache
def load_cpu_kernel() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel, or (None, why it did not build or load). Builds on first use."""
    # Importing cpp_extension logs a warning about CUDA_HOME on machines without a GPU: moot here.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        name, flags = build_flags()
        path = cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, is_python_module=False)
        library = ctypes.CDLL(path)
    except Exception as err:  # no compiler, no ninja, a failed build, an unloadable library
        return None, brief_error(err)
    finally:
        cpp_logger.setLevel(level)
    for direction in ("fwd", "bwd"):
        for c_type in C_TYPES.values():
            kernel = getattr(library, f"selective_scan_{direction}_{c_type}")
            kernel.argtypes, kernel.restype = [ctypes.POINTER(ScanProblem)], None
    for constant in ("lanes", "tile"):
        getattr(library, f"selective_scan_{constant}").restype = ctypes.c_int64
    return library, ""


def brief_error(err: Exception) -> str:
    """A build error in a line: its first words and the first line of the output that says what
    went wrong (torch's message quotes the compiler's command lines and output at length)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    cause = next((line for line in lines[1:] if re.search(r"error|not found|no such", line, re.I)
                  and " -c " not in line and not line.startswith(("FAILED", "ninja"))), None)
    head = lines[0].split(": [")[0][:300]  # drop the command line that the first line quotes
    return f"{type(err).__name__}: {head}" + (f": {cause[:300]}" if cause else "")


def run_kernel(direction: str, dtype: torch.dtype, **fields: Tensor | int | None) -> None:
    """Call the kernel (direction "fwd" or "bwd") on contiguous tensors of `dtype`; absent
    optional tensors are None (null pointers)."""
    problem = ScanProblem(threads=torch.get_num_threads())
    for name, value in fields.items():
        setattr(problem, name, value.data_ptr() if isinstance(value, Tensor) else value)
    library = load_cpu_kernel()[0]
    getattr(library, f"selective_scan_{direction}_{C_TYPES[dtype]}")(ctypes.byref(problem))


class CpuScan(torch.autograd.Function):
    """selective_scan_fn's contract on CPU tensors, through the C++ kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool) -> Tensor:
        dtype = compute_dtype(u.dtype)
        batch, dim, length = u.shape
        state, groups = A.shape[1], 1 if B.dim() == 3 else B.shape[1]
        library = load_cpu_kernel()[0]
        lanes, tile = library.selective_scan_lanes(), library.selective_scan_tile()
        blocks = groups * -(-(dim // groups) // lanes)  # blocks of W channels within each group
        inputs = {name: None if t is None else t.detach().to(dtype).contiguous()
                  for name, t in zip(INPUTS, (u, delta, A, B, C, D, z, delta_bias), strict=True)}
        sizes = {"batch": batch, "dim": dim, "length": length, "state": state, "groups": groups,
                 "softplus": int(delta_softplus)}
        out = torch.empty(batch, dim, length, dtype=dtype)
        states = None  # at every tile start, for the backward
        if any(ctx.needs_input_grad):
            states = torch.empty(batch, blocks, -(-length // tile), state, lanes, dtype=dtype)
        run_kernel("fwd", dtype, **sizes, **inputs, out=out, states=states)
        ctx.save_for_backward(*inputs.values(), states)
        ctx.sizes, ctx.blocks = sizes, blocks
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        *inputs, states = ctx.saved_tensors
        inputs = dict(zip(INPUTS, inputs, strict=True))
        u, B, sizes = inputs["u"], inputs["B"], ctx.sizes
        batch, dim, length, state = (sizes[k] for k in ("batch", "dim", "length", "state"))
        grads = {
            "du": torch.empty_like(u), "ddelta": torch.empty_like(u), "dz": torch.empty_like(u),
            "dA_part": u.new_empty(batch, dim, state), "dD_part": u.new_empty(batch, dim),
            "dbias_part": u.new_empty(batch, dim),
            "dB_part": u.new_empty(batch, ctx.blocks, state, length),
            "dC_part": u.new_empty(batch, ctx.blocks, state, length),
        }
        run_kernel("bwd", u.dtype, **sizes, **inputs, states=states,
                   grad_out=grad_out.to(u.dtype).contiguous(), **grads)

        def over_groups_blocks(part: Tensor) -> Tensor:  # a group's blocks share its B and C
            return part.view(batch, sizes["groups"], -1, state, length).sum(2).view(B.shape)

        result = (grads["du"], grads["ddelta"], grads["dA_part"].sum(0),
                  over_groups_blocks(grads["dB_part"]), over_groups_blocks(grads["dC_part"]),
                  grads["dD_part"].sum(0), grads["dz"], grads["dbias_part"].sum(0))
        return (*(None if dtype is None else g.to(dtype)
                  for g, dtype in zip(result, ctx.dtypes, strict=True)), None)


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
    """Same contract as `selective_scan_ref`, for CPU tensors; `load_cpu_kernel` must succeed."""
    return CpuScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
