#!/usr/bin/env bash
# Prove the GPU path on this machine: kernel report, kernel vs PyTorch parity, USM-B vs Zigma-B
# speed and memory, a short training + sampling run. Writes benchmarks/results/gpu.md.
# Offline; exits 2 without writing anything when no CUDA device is visible.
# Usage: bash scripts/gpu_check.sh [--quick] [--out FILE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python3
cd "$root"
HF_HUB_OFFLINE=1 exec "$python" -m benchmarks.gpu_check "$@"
