#!/usr/bin/env bash
# Build and install the CUDA kernels: mamba-ssm's selective scan (selective_scan_cuda) and
# causal-conv1d, against the torch already in the environment. Needs Linux, an NVIDIA GPU (or
# TORCH_CUDA_ARCH_LIST) and nvcc of the same CUDA major version as torch's build.
# Usage: source scripts/setup.sh && source scripts/setup_cuda.sh   (or: bash scripts/setup_cuda.sh)
# Settings (environment):
#   TORCH_CUDA_ARCH_LIST  GPU architectures to build for (default: this GPU's, e.g. "9.0")
#   MAX_JOBS              parallel compile jobs (default: CPU cores, at most 8: each takes GBs)
#   FORCE_BUILD=1         build from source at once instead of trying a prebuilt wheel first
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR   offline: install from downloaded source distributions
# Ends with `python -m selective_scan`, which must report both kernels as loaded.
setup_cuda() (
  set -euo pipefail
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  python="${VENV:-$root/.venv}/bin/python"
  [ -x "$python" ] || { echo "setup_cuda: run scripts/setup.sh first (no $python)" >&2; exit 1; }
  command -v nvcc >/dev/null || { echo "setup_cuda: nvcc not found: install the CUDA toolkit" \
    "and put its bin/ on PATH (or set CUDA_HOME)" >&2; exit 1; }
  torch_cuda="$("$python" -c 'import torch; print(torch.version.cuda or "")')"
  nvcc_cuda="$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
  [ -n "$torch_cuda" ] || { echo "setup_cuda: this torch is a CPU-only build" >&2; exit 1; }
  if [ "${torch_cuda%%.*}" != "${nvcc_cuda%%.*}" ]; then
    echo "setup_cuda: torch was built with CUDA $torch_cuda but nvcc is CUDA $nvcc_cuda;" \
      "install the CUDA $torch_cuda toolkit" >&2
    exit 1
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # only this GPU: a build for all is many times longer
    TORCH_CUDA_ARCH_LIST="$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)" \
      || { echo "setup_cuda: no GPU visible; set TORCH_CUDA_ARCH_LIST (e.g. 9.0)" >&2; exit 1; }
  fi
  cores="$(nproc)"
  export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(( cores < 8 ? cores : 8 ))}"
  export MAMBA_KEEP_CUDA_BUILD=TRUE  # since mamba-ssm's July 2026 change, else no selective scan
  echo "setup_cuda: torch CUDA $torch_cuda, nvcc $nvcc_cuda, arch $TORCH_CUDA_ARCH_LIST," \
    "MAX_JOBS $MAX_JOBS"
  # --no-build-isolation: the extensions must compile against this torch, not a fresh one.
  "$python" -m pip install --quiet --disable-pip-version-check ninja packaging setuptools wheel
  install_kernels() {  # $1: TRUE = build from source, FALSE = take a prebuilt wheel if one fits
    local rebuild=()
    [ "$1" = TRUE ] && rebuild=(--no-cache-dir --force-reinstall --no-deps)
    MAMBA_FORCE_BUILD="$1" CAUSAL_CONV1D_FORCE_BUILD="$1" "$python" -m pip install \
      --disable-pip-version-check --no-build-isolation "${rebuild[@]}" \
      -r "$root/requirements-cuda.txt"
  }
  loads='import selective_scan_cuda, causal_conv1d_cuda'
  if [ "${FORCE_BUILD:-0}" = 1 ] || ! { install_kernels FALSE && "$python" -c "$loads"; }; then
    echo "setup_cuda: no prebuilt wheel loads here; building from source (minutes)"
    install_kernels TRUE
  fi
  cd "$root" && "$python" -m selective_scan
)
setup_cuda
