#!/usr/bin/env bash
# nvcc for torch's extension builds (setup_cuda.sh sets PYTORCH_NVCC to this script): compiles for
# the architectures of TORCH_CUDA_ARCH_LIST only. mamba-ssm's and causal-conv1d's setup.py add a
# -gencode for every architecture their CUDA version knows (nine with CUDA 13), whatever
# TORCH_CUDA_ARCH_LIST says, and each one is a full compilation of every kernel: dropping the
# others makes the build several times shorter. The real nvcc: REAL_NVCC (default: nvcc on PATH).
set -euo pipefail
keep=" "
for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do  # "9.0" or "9.0+PTX" -> 90
  arch="${arch%+PTX}"
  keep+="${arch/./} "
done
args=()
dropped=0
while (($#)); do
  case "$1" in
    -gencode) code="$2"; shift 2 ;;            # -gencode arch=compute_90,code=sm_90
    -gencode=*) code="${1#-gencode=}"; shift ;;  # -gencode=arch=compute_90,code=sm_90
    *) args+=("$1"); shift; continue ;;
  esac
  arch="${code#arch=compute_}"
  if [[ "$keep" != *" ${arch%%,*} "* ]]; then
    dropped=1
  elif [[ " ${args[*]} " != *" -gencode $code "* ]]; then  # torch's flags repeat the setup.py's
    args+=(-gencode "$code")
  fi
done
[ "$dropped" = 0 ] || [[ " ${args[*]} " == *" -gencode "* ]] \
  || { echo "nvcc_arch_filter: no -gencode for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >&2; exit 1; }
exec "${REAL_NVCC:-nvcc}" "${args[@]}"
