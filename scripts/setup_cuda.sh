#!/usr/bin/env bash
# Build and install the CUDA kernels: mamba-ssm's selective scan (selective_scan_cuda) and
# causal-conv1d, against the torch already there. Needs Linux, an NVIDIA GPU (or
# TORCH_CUDA_ARCH_LIST) and nvcc of the same CUDA major version as torch's build.
# Usage: source scripts/setup.sh && source scripts/setup_cuda.sh            (online, into .venv)
#        source scripts/setup_cuda.sh --bundle .gpu-bundle                 (offline, see below)
#        bash scripts/setup_cuda.sh --bundle DIR --dry-run   (CPU: the plumbing, nothing compiled)
# Python: the project's .venv (VENV=...) when there is one, else the machine's own `python3`,
# which must have torch: nothing is installed into it then, no torch either. The packages go to
# pip's --prefix GPU_ENV (default .gpu-env/), whose site-packages the sourcing shell gets on
# PYTHONPATH (scripts/gpu_check.sh does that itself).
# --bundle DIR: the folder of scripts/make_gpu_bundle.sh; no network (pip --no-index); the kernels
# are built from source, and of the bundle's wheels pip takes only what the machine lacks.
# Settings (environment):
#   TORCH_CUDA_ARCH_LIST  GPU architectures to build for (default: this GPU's, e.g. "9.0"); the
#                         only ones built (scripts/nvcc_arch_filter.sh)
#   MAX_JOBS              parallel compile jobs (default: all cores, fewer if memory is short)
#   FORCE_BUILD=1         online: build from source at once instead of trying a prebuilt wheel
# Ends with `python -m selective_scan`, which must report both kernels as loaded.
setup_cuda() (
  set -euo pipefail
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  bundle="" prefix="${GPU_ENV:-$root/.gpu-env}" dry_run=0
  while (($#)); do
    case "$1" in
      --bundle) bundle="$(cd "$2" && pwd)"; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      *) echo "setup_cuda: unknown option $1" >&2; exit 2 ;;
    esac
  done
  [ "$dry_run" = 0 ] || [ -n "$bundle" ] || { echo "setup_cuda: --dry-run needs --bundle" >&2; exit 2; }
  python="${VENV:-$root/.venv}/bin/python"
  if [ -x "$python" ]; then
    prefix=""  # install into the project's environment
  else
    python=python3
    "$python" -c 'import torch' 2>/dev/null || { echo "setup_cuda: neither $root/.venv nor a" \
      "python3 with torch: run scripts/setup.sh first" >&2; exit 1; }
  fi
  [ "$dry_run" = 1 ] && prefix="$(mktemp -d)"  # scratch: the dry run leaves nothing behind
  pip=("$python" -m pip install --disable-pip-version-check)
  [ -n "$prefix" ] && pip+=(--prefix "$prefix")
  [ -n "$bundle" ] && pip+=(--no-index --find-links "$bundle")
  export PIP_BREAK_SYSTEM_PACKAGES=1  # a distribution's python: installs go to --prefix anyway
  put_on_path() {  # the prefix's site-packages on PYTHONPATH, so pip sees what it installed
    local site
    [ -n "$prefix" ] || return 0
    site="$(find "$prefix" -maxdepth 5 -type d -name '*-packages' 2>/dev/null | head -n 1)"
    [ -z "$site" ] || export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  }
  put_on_path
  echo "setup_cuda: $("$python" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')," \
    "into ${prefix:-its environment}${bundle:+, offline from $bundle}"

  if [ "$dry_run" = 0 ]; then
    cuda_bin="${CUDA_HOME:-/usr/local/cuda}/bin"  # the toolkit's usual place, if not on PATH
    command -v nvcc >/dev/null || [ ! -x "$cuda_bin/nvcc" ] || export PATH="$cuda_bin:$PATH"
    command -v nvcc >/dev/null || { echo "setup_cuda: nvcc not found: install the CUDA toolkit" \
      "and put its bin/ on PATH (or set CUDA_HOME)" >&2; exit 1; }
    # torch takes nvcc's ../ for the toolkit, wrong where nvcc on PATH is a wrapper script (e.g.
    # /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc): nvcc says where it lives.
    if [ -z "${CUDA_HOME:-}" ]; then
      here="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')"
      [ -z "$here" ] || export CUDA_HOME="$(dirname "$(head -n 1 <<< "$here")")"
    fi
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
    # Every core; an nvcc job on these kernels takes up to ~3 GiB, so fewer on a small machine.
    jobs="$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) / (3 * 1024 * 1024) ))"
    jobs="$(( jobs < $(nproc) ? (jobs > 1 ? jobs : 1) : $(nproc) ))"
    export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$jobs}"
    export REAL_NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
    export PYTORCH_NVCC="$root/scripts/nvcc_arch_filter.sh"
    echo "setup_cuda: torch CUDA $torch_cuda, nvcc $nvcc_cuda (CUDA_HOME ${CUDA_HOME:-not set})," \
      "arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS $MAX_JOBS"
  else  # the kernels' Python code only: exercises the offline install without a compiler
    export MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE
  fi
  export MAMBA_KEEP_CUDA_BUILD=TRUE  # newer mamba-ssm: else no selective scan kernel

  if [ -n "$bundle" ]; then
    # Both setup.py import wheel, setuptools and packaging (taken from the machine where it has
    # them); the rest of the bundle with pip's resolver (the kernels without their requirements:
    # the selective scan needs none beyond torch and einops, mamba-ssm 2.3 lists Mamba-3's).
    kernels=() others=()
    while read -r spec; do
      case "$spec" in mamba-ssm*|causal-conv1d*) kernels+=("$spec") ;; ?*) others+=("$spec") ;; esac
    done < "$bundle/install.txt"
    [ "${#kernels[@]}" = 0 ] || "${pip[@]}" --quiet wheel setuptools packaging
    put_on_path
    [ "${#others[@]}" = 0 ] || "${pip[@]}" --quiet "${others[@]}"
    start=$SECONDS
    # The two builds side by side (mamba-ssm has ten kernel files, causal-conv1d six): together
    # about one compile job per core. Never a prebuilt wheel from GitHub (FORCE_BUILD).
    pids=()
    for spec in "${kernels[@]}"; do
      MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE "${pip[@]}" --quiet --no-deps \
        --no-build-isolation --no-cache-dir "$spec" &
      pids+=($!)
    done
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    [ "$failed" = 0 ] || { echo "setup_cuda: a kernel did not build (above)" >&2; exit 1; }
    echo "setup_cuda: kernels built and installed in $(( SECONDS - start )) s"
  else
    install_kernels() {  # $1: TRUE = build from source, FALSE = take a prebuilt wheel if one fits
      local rebuild=()
      [ "$1" = TRUE ] && rebuild=(--no-cache-dir --force-reinstall --no-deps)
      MAMBA_FORCE_BUILD="$1" CAUSAL_CONV1D_FORCE_BUILD="$1" "${pip[@]}" --no-build-isolation \
        "${rebuild[@]}" -r "$root/requirements-cuda.txt"
    }
    "${pip[@]}" --quiet ninja packaging setuptools wheel
    loads='import selective_scan_cuda, causal_conv1d_cuda'
    if [ "${FORCE_BUILD:-0}" = 1 ] || ! { install_kernels FALSE && "$python" -c "$loads"; }; then
      echo "setup_cuda: no prebuilt wheel loads here; building from source (minutes)"
      start=$SECONDS
      install_kernels TRUE
      echo "setup_cuda: kernels built and installed in $(( SECONDS - start )) s"
    fi
  fi
  put_on_path
  cd "$root"
  if [ "$dry_run" = 1 ]; then
    # Each package install.txt names, as the check's python sees it: the machine's or the bundle's.
    "$python" - "$bundle/install.txt" <<'EOF_PY'
import re, sys
from importlib.metadata import version
names = [re.split("[=<>]", line)[0] for line in open(sys.argv[1]).read().split()]
print("setup_cuda: dry run: installed offline (kernels without their CUDA code):",
      ", ".join(f"{name} {version(name)}" for name in names))
EOF_PY
    rm -rf "$prefix"
  else
    "$python" -m selective_scan
  fi
)
setup_cuda "$@" || { _rc=$?; return $_rc 2>/dev/null || exit $_rc; }
if [ ! -x "${VENV:-$(dirname "${BASH_SOURCE[0]}")/../.venv}/bin/python" ]; then
  # The prefix's packages for this shell (when sourced) and what it runs next.
  _site="$(find "${GPU_ENV:-$(dirname "${BASH_SOURCE[0]}")/../.gpu-env}" -maxdepth 5 -type d \
    -name '*-packages' 2>/dev/null | head -n 1)"
  [ -z "$_site" ] || export PYTHONPATH="$(cd "$_site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
  unset _site
fi
