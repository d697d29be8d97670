#!/usr/bin/env bash
# Quickstart command 2: set up the environment and run the test suite and the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev
set -euo pipefail
ruff check .
# One thread per test process and one process per core: torch's own threads fight over a small
# machine's cores (the suite took 4x longer on 2 cores with 2 threads and no xdist).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n auto "$@"
