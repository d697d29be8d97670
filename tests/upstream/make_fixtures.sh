#!/usr/bin/env bash
# Rebuild tests/upstream/fixtures/ from the upstream code (README.md beside this file).
#   bash tests/upstream/make_fixtures.sh [WORK_DIR]     (default /tmp/usm-fixtures)
# Needs git, network access to GitHub and PyPI, python3.11 and python3.10 (Hydra < 1.3 does not
# import on 3.11). Everything it installs stays in WORK_DIR; the tests never run it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mkdir -p "${1:-/tmp/usm-fixtures}" && cd "${1:-/tmp/usm-fixtures}" && pwd)
OUT=$HERE/fixtures
USM_COMMIT=431af0f670c4d0fb4ac15a87ce571808ccd3a609    # ErgastiAlex/U-Shape-Mamba "Fix import"
ZIGMA_COMMIT=37d837bfb787cbd2c349d8bc37596c2009443187  # CompVis/zigma "Update README.md"
cd "$WORK"

checkout() {  # folder, GitHub repository, commit
  [ -d "$1" ] || git clone -q "https://github.com/$2" "$1"
  git -C "$1" checkout -q "$3"
}
checkout usm ErgastiAlex/U-Shape-Mamba "$USM_COMMIT"
checkout zigma CompVis/zigma "$ZIGMA_COMMIT"

venv() {  # folder, interpreter: torch 2.2.0 (CompVis' README) and what the upstream code imports
  [ -x "$1/bin/python" ] && return
  "$2" -m venv "$1"
  "$1/bin/pip" install -q torch==2.2.0 torchvision==0.17.0 "numpy<2" timm==0.9.16 einops==0.7.0 \
    matplotlib
}
venv py311 python3.11
venv py310 python3.10

pair() {  # folder, venv, packages: one Hydra / OmegaConf pair, put first on PYTHONPATH
  [ -d "$1" ] || "$2/bin/pip" install -q --no-compile --target "$1" "${@:3}"
}
pair oc2.1 py310 hydra-core==1.1.2 omegaconf==2.1.2
pair oc2.2 py310 hydra-core==1.2.0 omegaconf==2.2.3
pair oc2.3 py311 hydra-core==1.3.2 omegaconf==2.3.0
# No hydra-core release accepts omegaconf 2.4 (1.3.x require < 2.4): installed without that check.
pair oc2.4 py311 --no-deps hydra-core==1.3.2 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3 \
  PyYAML packaging

rm -rf "$OUT"
run() {  # venv, Hydra/OmegaConf folder or "", make_fixtures.py arguments
  PYTHONPATH=${2:+$WORK/$2} "$1/bin/python" "$HERE/make_fixtures.py" "${@:3}" \
    --zigma-src zigma --out "$OUT"
}
run py311 "" usm --usm-src usm
run py310 oc2.1 compvis --case classes
run py310 oc2.2 compvis --case text
run py311 oc2.3 compvis --case pe2
run py311 oc2.4 compvis --case pe1_single_gpu
run py311 oc2.4 compvis --case pe0_single_gpu
du -sh "$OUT"
