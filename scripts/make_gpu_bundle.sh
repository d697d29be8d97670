#!/usr/bin/env bash
# Fill .gpu-bundle/ (or DIR) with what a GPU machine without network needs beyond its own Python
# 3.12 with a CUDA torch: the source distributions of the CUDA kernels (mamba-ssm, causal-conv1d)
# and wheels (CPython 3.12, manylinux x86_64) of the pure-Python requirements such machines lack.
# Run it where PyPI is reachable; carry the folder along; then, on the GPU machine:
#   bash scripts/setup_cuda.sh --bundle .gpu-bundle     (or scripts/gpu_check.sh --bundle ...)
# Usage: bash scripts/make_gpu_bundle.sh [DIR]
#
# The machines this was made for (Python 3.12, torch 2.11.0+cu130, triton 3.6, accelerate,
# transformers, huggingface_hub, safetensors, timm, einops, torchdiffeq, torchmetrics, numpy,
# pillow, tqdm, matplotlib, tensorboard, scipy, ninja, nvcc 13.0) lack diffusers (encoders.py)
# and the kernels. setup_cuda.sh installs the bundle with pip's resolver against the packages
# already there (--no-index), so a wheel here is only installed where the machine has no
# version that fits; pip names any requirement that neither provides.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/.gpu-bundle}"
python="${PYTHON:-$root/.venv/bin/python}"  # with torch: pip runs the kernels' setup.py

# The kernels (requirements-cuda.txt), at fixed versions: their builds are what gpu_check times.
SDISTS=(mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0)
# diffusers and those of its requirements outside the list above (requests and its own, the
# importlib_metadata backport), safetensors (diffusers wants >= 0.8, older machines have less);
# wheel: both kernels' setup.py import it, and Python 3.12 environments need not have it.
WHEELS=(diffusers importlib_metadata zipp filelock regex requests charset_normalizer idna
        urllib3 certifi safetensors wheel packaging setuptools)

version() {  # the tested version, from requirements-lock.txt
  local v
  v="$(grep -i "^${1//_/[-_]}==" "$root/requirements-lock.txt" | cut -d= -f3)"
  [ -n "$v" ] || { echo "make_gpu_bundle: $1 is not in requirements-lock.txt" >&2; return 1; }
  echo "$v"
}

rm -rf "$out" && mkdir -p "$out"
pip=("$python" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$out")
for spec in "${SDISTS[@]}"; do
  # pip prepares an sdist's metadata, and these setup.py import torch and wheel for it (and
  # compile nothing when told to skip).
  MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    "${pip[@]}" --no-binary=:all: --no-build-isolation "$spec"
done
pins=()
for name in "${WHEELS[@]}"; do
  if [ "$name" = setuptools ] || [ "$name" = wheel ]; then
    pins+=("$name")  # not in the lock (pip freeze leaves them out): the newest
  else
    pins+=("$name==$(version "$name")") || exit 1
  fi
done
"${pip[@]}" --only-binary=:all: --implementation cp --python-version 3.12 --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 "${pins[@]}"  # (older pips do not infer the older tags)
# What setup_cuda.sh --bundle installs (pip pulls the rest from the bundle as needed).
diffusers="diffusers==$(version diffusers)"
printf '%s\n' "${SDISTS[@]}" "$diffusers" > "$out/install.txt"
du -sh "$out"
ls "$out"
