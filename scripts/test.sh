#!/usr/bin/env bash
# Quickstart command 2: set up the environment and run the test suite and the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev
set -euo pipefail
ruff check .
python -m pytest -q "$@"
