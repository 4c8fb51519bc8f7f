#!/usr/bin/env bash
# The test suite: unit tests (Triton through its CPU interpreter where there is no GPU), then every
# benchmark once as a smoke test. Arguments are passed to the unit-test pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${LRML_VENV:-.venv}/bin/python"
"$py" -m pytest tests -q "$@"
"$py" -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider
