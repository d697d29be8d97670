"""`python -m selective_scan`: which selective-scan backends load here, why the others do not and
how to fix that; on a GPU with mamba_ssm's kernel, a forward + backward parity check of the kernel
against the PyTorch scan. Exit status 1 when a GPU is visible but the kernel is missing or wrong."""

import sys

import torch

from .check import PARITY_TOL, kernel_parity, kernel_report
from .dispatch import mamba_ssm_available


def main() -> int:
    print(kernel_report())
    if not torch.cuda.is_available():
        print("no GPU: the PyTorch scan is the backend here, as it should be")
        return 0
    if not mamba_ssm_available():
        print("a GPU without mamba_ssm's kernel: training takes the slow PyTorch scan")
        return 1
    ok = True
    for dtype, tol in ((torch.float32, PARITY_TOL[torch.float32]),
                       (torch.bfloat16, PARITY_TOL[torch.bfloat16])):
        errors = kernel_parity(dtype)
        worst = max(errors, key=errors.get)
        passed = errors[worst] <= tol
        ok &= passed
        print(f"parity kernel vs PyTorch scan, {dtype}: {'ok' if passed else 'FAILED'} "
              f"(largest relative error {errors[worst]:.1e} in {worst}, tolerance {tol:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
