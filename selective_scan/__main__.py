"""`python -m selective_scan`: which selective-scan backends load here, why the others do not and
how to fix that; a forward + backward parity check against the PyTorch scan of the C++ CPU scan
(when it builds) and, on a GPU, of mamba_ssm's kernel and of the Triton scan (when they load).
Exit status 1 when a fused scan disagrees, or when a GPU is visible but neither loads."""

import sys

import torch

from .check import PARITY_TOL, kernel_parity, kernel_report
from .cpu import load_cpu_kernel
from .dispatch import load_triton_scan, mamba_ssm_available


def parity_ok(backend: str, dtypes: tuple[torch.dtype, ...], **shape: int) -> bool:
    """Print the parity of `backend` with the PyTorch scan per dtype; True when all pass."""
    ok = True
    for dtype in dtypes:
        try:
            errors, tol = kernel_parity(dtype, backend=backend, **shape), PARITY_TOL[dtype]
        except RuntimeError as err:  # e.g. the Triton scan failed its first-use check
            print(f"parity {backend} vs PyTorch scan, {dtype}: FAILED ({err})")
            ok = False
            continue
        worst = max(errors, key=errors.get)
        passed = errors[worst] <= tol
        ok &= passed
        print(f"parity {backend} vs PyTorch scan, {dtype}: {'ok' if passed else 'FAILED'} "
              f"(largest relative error {errors[worst]:.1e} in {worst}, tolerance {tol:.0e})")
    return ok


def main() -> int:
    print(kernel_report())
    ok = True
    if load_cpu_kernel()[0] is None:
        print("the C++ CPU scan did not build: CPU runs take the PyTorch scan, several times "
              "slower")
    else:
        ok &= parity_ok("cpu", (torch.float32,), dim=64, length=256)
    if not torch.cuda.is_available():
        print("no GPU: mamba_ssm's kernel is not needed here")
        return 0 if ok else 1
    gpu_backends = [name for name, loads in (("mamba_ssm", mamba_ssm_available()),
                                             ("triton", load_triton_scan()[0] is not None))
                    if loads]
    if not gpu_backends:
        print("a GPU without mamba_ssm's kernel or Triton: training takes the slow PyTorch scan")
        return 1
    for backend in gpu_backends:
        ok &= parity_ok(backend, (torch.float32, torch.bfloat16))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
