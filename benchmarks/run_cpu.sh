#!/usr/bin/env bash
# The full CPU run behind the README's CPU table, in one command, from anywhere:
#   bash benchmarks/run_cpu.sh
# Runs every benchmark on the CPU at the small (MovieLens-1M) and Netflix sizes, every provider
# that can run here, then writes benchmarks/results/cpu-<date>.{json,md,png} and puts the table
# and chart into benchmarks/README.md and README.md. Takes 12-30 minutes on 2 cores. Environment:
#   PYTHON           the interpreter (default .venv/bin/python if present, else python3)
#   LRML_BENCH_STAT  median (default) or min: the CPU statistic the table shows (min for a
#                    machine shared with other work; the JSON keeps both)
#   LRML_BENCH_BUDGET seconds of timed rounds per benchmark (default 1.0)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
stamp="$(date -u +%Y-%m-%d)"
res=benchmarks/results
mkdir -p "$res"
base="$res/cpu-$stamp"
rm -f "$base.jsonl"
"$py" -m pytest benchmarks/ -q -p no:cacheprovider -ra --lrml-device=cpu --lrml-size=full \
  --lrml-budget="${LRML_BENCH_BUDGET:-1.0}" --benchmark-json="$base.json" \
  --lrml-jsonl="$base.jsonl" --benchmark-columns=median,min,rounds --benchmark-sort=name
rm -f "$base.jsonl" # the JSON is complete: the incremental record is not needed
"$py" benchmarks/report.py "$base.json" --stat "${LRML_BENCH_STAT:-median}" \
  --markdown "$base.md" --png "$base.png" --readme benchmarks/README.md cpu \
  --title "CPU, $stamp"
# The project README embeds the same table and chart.
"$py" benchmarks/report.py "$base.json" --stat "${LRML_BENCH_STAT:-median}" --png "$base.png" \
  --readme README.md cpu --title "CPU, $stamp" >/dev/null
