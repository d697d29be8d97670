#!/usr/bin/env bash
# Prove the GPU path on this machine in one command, within a time budget (default 9 min, the
# kernel build included): the kernels built from an offline bundle, kernel report, parity of every
# GPU scan with the PyTorch scan, scan and model speed and memory, a short training + sampling run.
# Writes benchmarks/results/gpu.md (--out), also when a step fails or is cut for time.
# Usage: bash scripts/gpu_check.sh [--bundle DIR] [--budget SECONDS] [--quick] [--out FILE]
#        bash scripts/gpu_check.sh --dry-run [--bundle DIR]   (CPU: the plumbing, tiny shapes)
# Python: .venv (VENV=...) when there is one, else the machine's python3 (setup_cuda.sh).
# Without --dry-run it exits 2 without writing anything when no CUDA device is visible.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
start=$SECONDS
since="$(date +%s.%N)"  # the budget counts from here
export GPU_CHECK_ARGS="$*"  # for the report
python="${VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python3
bundle="" dry_run=() args=()
while (($#)); do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --dry-run) dry_run=(--dry-run); args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
export HF_HUB_OFFLINE=1
if [ ${#dry_run[@]} = 0 ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'
then
  echo "gpu_check: no CUDA device visible to torch; nothing measured, nothing written" >&2
  exit 2
fi
build=(--build "not asked for (no --bundle)")
if [ -n "$bundle" ]; then
  log="$(mktemp)"
  # shellcheck source=setup_cuda.sh
  if source scripts/setup_cuda.sh --bundle "$bundle" "${dry_run[@]}" > "$log" 2>&1; then
    build=(--build "ok in $(( SECONDS - start )) s ($(grep -o 'kernels built.*\|dry run.*' "$log" | tail -n 1))")
  else
    build=(--build "FAILED after $(( SECONDS - start )) s: $(tail -n 20 "$log")")
  fi
  cat "$log"
  rm -f "$log"
fi
exec "$python" -m benchmarks.gpu_check --since "$since" "${build[@]}" "${args[@]}"
