#!/usr/bin/env bash
# Compile every .cu under csrc/ with the machine's nvcc for sm_90 and sm_80 (CI gate: CUDA code
# that does not compile cannot land). The .cu files need no torch headers. With --binding, also
# syntax-check the CUDA binding layer (csrc/cuda/*.cpp) against torch's headers and the CUDA
# toolkit's, stubbing the one generated header a CPU-only torch wheel lacks.
# Usage: csrc/check_nvcc.sh [--binding]   (exit 0: all compiled; 77: nvcc not found)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "check_nvcc: nvcc not found, skipped" >&2
  exit 77
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
while IFS= read -r -d '' cu; do
  echo "nvcc -c ${cu#"$here"/} (sm_90, sm_80)"
  if ! "$NVCC" -std=c++17 -O3 -Werror all-warnings -I"$here" \
      -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80 \
      -c "$cu" -o "$out/$(basename "$cu").o"; then
    status=1
  fi
done < <(find "$here" -name '*.cu' -print0 | sort -z)
if [[ "${1:-}" == "--binding" ]]; then
  PY="${PYTHON:-python}"
  TI="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))')"
  PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  CUDA_INC=""
  for c in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [[ -n "$c" && -f "$c/include/cuda_runtime.h" ]]; then CUDA_INC="$c/include"; break; fi
  done
  mkdir -p "$out/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  inc=(-I"$here" -isystem "$out/stub" -isystem "$CUDA_INC" -isystem "$PYINC")
  for d in $TI; do inc+=(-isystem "$d"); done
  for cpp in "$here"/cuda/*.cpp; do
    echo "c++ -fsyntax-only ${cpp#"$here"/}"
    "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -DUSE_CUDA "${inc[@]}" "$cpp" || status=1
  done
fi
exit $status
