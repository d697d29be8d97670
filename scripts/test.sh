#!/usr/bin/env bash
# Quickstart command 2: set up the environment and run the test suite and the linter.
# Usage: bash scripts/test.sh [--fast] [pytest arguments...]
#   --fast: leave out the tests marked slow (end-to-end runs in fresh processes, runs of several
#   processes, tests over 5 s): the edit loop's tier. Without it, everything runs (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
pytest_args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    pytest_args+=(-m "not slow")
  else
    pytest_args+=("$arg")
  fi
done
source scripts/setup.sh dev
set -euo pipefail
ruff check .
# One thread per test process and one process per core: torch's own threads fight over a small
# machine's cores (the suite took 4x longer on 2 cores with 2 threads and no xdist).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n auto ${pytest_args[@]+"${pytest_args[@]}"}
