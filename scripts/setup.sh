#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with torch, triton (optional), the package in
# editable mode (building the C++ CPU extension ahead of time) and the test tools. Idempotent.
#   LRML_TORCH   the torch requirement (default torch==2.13.0: a CPU build where no GPU is present)
#   LRML_VENV    where the environment goes (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LRML_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "${LRML_TORCH:-torch==2.13.0}"
fi
"${pip[@]}" "numpy>=1.24" "tqdm>=4.60" "ninja>=1.11" "setuptools>=77" wheel \
  "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6.100" "ruff==0.17.6" "matplotlib>=3.7" \
  "optuna>=4.0" "scikit-learn>=1.3"
"${pip[@]}" "triton>=3.6,<3.10" || echo "setup: triton not installed (optional): the triton backend is off"
# Triton 3.6 (torch 2.11's) has a CPU interpreter that fails with numpy >= 2.4
# (lrml_kernels.backends.interpreter_problem_of): keep numpy below 2.4 beside it.
if "$venv/bin/python" -c "import sys, triton; sys.exit(not triton.__version__.startswith('3.6.'))" 2>/dev/null; then
  "${pip[@]}" "numpy>=1.24,<2.4"
fi
# --no-build-isolation: build against the torch just installed (no multi-GB download of another).
"${pip[@]}" --no-build-isolation -e .
"$venv/bin/lrml" info
