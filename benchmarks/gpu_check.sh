#!/usr/bin/env bash
# The one-shot GPU check: everything a scarce, offline GPU machine should do, in one run of at
# most 8 minutes (LRML_GPU_CHECK_TOTAL_S, default 470 s), from the repository root:
#
#   1 env        GPU, driver, torch/triton/CUDA versions; the copy bandwidth, measured once
#   2 build      the CUDA extension (JIT, ninja, TORCH_CUDA_ARCH_LIST=9.0 ->
#                -gencode arch=compute_90,code=sm_90), through lrml_kernels.extension.backend
#   3 gpu-tests  pytest -m gpu tests/ (bf16/tf32 tolerances, CUDA extension, determinism, compile)
#   4 bench      the benchmark suite's GPU workloads, Netflix size first, then the small size;
#                fp32 and bf16; torch.compile peers at Netflix fp32 only (compiling costs minutes)
#   5 report     benchmarks/report.py: the Markdown table (and PNG) of step 4
#
# Usage:   bash benchmarks/gpu_check.sh [--dry-run] OUTDIR
#   OUTDIR receives at most 8 files, no subfolders: gpu_check.log build.log gpu_tests.log
#   bench.log bench.json bench.jsonl table.md chart.png. The table is printed last.
#   --dry-run: the CPU-side logic only, on any machine: no bandwidth, no build (the extension's
#   entry point is imported), the gpu tests collected but not run, the benchmarks on the CPU at
#   the smoke size without the compile peers, and the report.
# Every step runs under its own timeout (inside the overall budget); a failed step does not stop
# the later ones (the scarce machine time is used in full) except step 1 (no GPU: nothing else
# can run). Any failure: the table is headed INCOMPLETE, the summary names the failed steps and
# the exit status is 1.
# Environment: PYTHON (default python3), LRML_COMMIT (the commit measured, where the tree was
# copied without .git), LRML_GPU_CHECK_REQUIRE (providers that must have results, default
# eager,compile,triton,cuda), LRML_GPU_CHECK_FAIL=<step> (tests: make that step fail).
set -euo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."

py="${PYTHON:-python3}"
total_s="${LRML_GPU_CHECK_TOTAL_S:-470}"
start=$SECONDS
log="$out/gpu_check.log"
files=(gpu_check.log build.log gpu_tests.log bench.log bench.json bench.jsonl table.md chart.png)
for f in "${files[@]}"; do rm -f "$out/$f"; done
export PYTHONUNBUFFERED=1
failed=()
summary=()

say() { echo "$*" | tee -a "$log"; }

# run_step NAME MAX_SECONDS RESERVE_SECONDS LOGFILE COMMAND...
# Runs COMMAND with output to LOGFILE, under a timeout of MAX_SECONDS, cut so that RESERVE_SECONDS
# of the overall budget stay for the steps after it. SIGINT first (pytest then still writes its
# JSON), SIGKILL 20 s later.
run_step() {
  local name="$1" max="$2" reserve="$3" steplog="$4"
  shift 4
  local left=$((total_s - (SECONDS - start) - reserve))
  local limit=$((max < left ? max : left))
  if ((limit < 10)); then
    say "== step $name: NOT RUN, no time left in the ${total_s} s budget"
    failed+=("$name (not run: out of time)")
    summary+=("$name: NOT RUN (out of time)")
    return 0
  fi
  if [[ "${LRML_GPU_CHECK_FAIL:-}" == "$name" ]]; then
    set -- bash -c "echo 'step $name: failure injected by LRML_GPU_CHECK_FAIL' >&2; exit 7"
  fi
  say "== step $name (limit ${limit} s): $*"
  local t0=$SECONDS rc=0
  timeout -s INT -k 20 "$limit" "$@" >>"$steplog" 2>&1 || rc=$?
  local dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    summary+=("$name: ok (${dt} s)")
    say "   ok (${dt} s): $(tail -n 1 "$steplog")"
  else
    local why="rc=$rc"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then why="timed out after ${limit} s"; fi
    failed+=("$name ($why)")
    summary+=("$name: FAILED ($why, ${dt} s), log: $(basename "$steplog")")
    say "   FAILED ($why, ${dt} s); last lines of $(basename "$steplog"):"
    tail -n 25 "$steplog" | sed 's/^/   | /' | tee -a "$log"
  fi
  return 0
}

say "gpu_check $([[ $dry -eq 1 ]] && echo '(DRY RUN) ')$(date -u '+%Y-%m-%d %H:%M UTC'), commit ${LRML_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}, output $out"

# 1 env -------------------------------------------------------------------------------------------
env_args=()
[[ $dry -eq 1 ]] && env_args=(--dry-run)
run_step env 90 400 "$out/env.tmp" "$py" benchmarks/benchlib.py env "${env_args[@]}"
sed 's/^/   /' "$out/env.tmp" | tee -a "$log"
if ((${#failed[@]})); then
  rm -f "$out/env.tmp"
  say "step env failed: no usable GPU, nothing else can run"
  printf '%s\n' "GPU CHECK FAILED: ${failed[*]}" | tee -a "$log"
  exit 1
fi
gbps="$(sed -n 's/^COPY_GBPS=//p' "$out/env.tmp" | tail -n 1)"
rm -f "$out/env.tmp"
[[ -n "$gbps" ]] && export LRML_COPY_GBPS="$gbps"

# 2 build -----------------------------------------------------------------------------------------
if [[ $dry -eq 1 ]]; then
  run_step build 60 300 "$out/build.log" "$py" -c \
    "import lrml_kernels.extension as e; assert callable(e.backend); print('dry run: extension entry point imported, no build')"
else
  run_step build 150 300 "$out/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
    LRML_KERNELS_VERBOSE_BUILD=1 "$py" -c \
    "import lrml_kernels.extension as e; e.backend('cuda'); print('cuda extension built and loaded')"
fi

# 3 gpu-tests -------------------------------------------------------------------------------------
if [[ $dry -eq 1 ]]; then
  # Collect only; "no tests collected" (5) is fine in a dry run.
  run_step gpu-tests 90 240 "$out/gpu_tests.log" bash -c \
    "$py -m pytest -m gpu tests/ -q -p no:cacheprovider --collect-only; rc=\$?; [ \$rc -eq 5 ] && exit 0; exit \$rc"
else
  run_step gpu-tests 120 240 "$out/gpu_tests.log" "$py" -m pytest -m gpu tests/ -q \
    -p no:cacheprovider -ra
fi

# 4 bench -----------------------------------------------------------------------------------------
bench=("$py" -m pytest benchmarks/ -q -p no:cacheprovider -ra
  --benchmark-json="$out/bench.json" --lrml-jsonl="$out/bench.jsonl"
  --benchmark-columns=median,rounds --benchmark-sort=name)
if [[ $dry -eq 1 ]]; then
  bench+=(--lrml-device=cpu --lrml-size=smoke --lrml-budget=0.05 -k "not compile")
else
  bench+=(--lrml-device=cuda --lrml-size=netflix,small -k "not compile or (netflix and fp32)")
fi
run_step bench 420 25 "$out/bench.log" "${bench[@]}"

# 5 report ----------------------------------------------------------------------------------------
if ((${#failed[@]})); then
  status="INCOMPLETE: failed step(s): ${failed[*]}"
elif [[ $dry -eq 1 ]]; then
  status="DRY RUN on the CPU: the script's logic, not GPU numbers"
else
  status=""
fi
run_json="$out/bench.json"
if ! "$py" -c "import json,sys; json.load(open(sys.argv[1]))['benchmarks']" "$run_json" 2>/dev/null; then
  run_json="$out/bench.jsonl" # the run was cut short before pytest-benchmark wrote its JSON
  status="${status:+$status; }results from the partial record bench.jsonl"
fi
require="${LRML_GPU_CHECK_REQUIRE:-eager,compile,triton,cuda}"
[[ $dry -eq 1 ]] && require="eager"
if [[ -s "$run_json" ]]; then
  title="GPU check $(date -u '+%Y-%m-%d'), commit ${LRML_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
  run_step report 60 0 "$out/report.tmp" "$py" benchmarks/report.py "$run_json" --markdown "$out/table.md" \
    --png "$out/chart.png" --require "$require" --status "${status:-complete}" --title "$title"
else
  failed+=("report (no benchmark results)")
  summary+=("report: FAILED (no benchmark results)")
fi

[[ -f "$out/report.tmp" ]] && { cat "$out/report.tmp" >>"$log"; rm -f "$out/report.tmp"; }

# summary, then the table -------------------------------------------------------------------------
say ""
say "== summary ($((SECONDS - start)) s of ${total_s} s)"
for line in "${summary[@]}"; do say "   $line"; done
nfiles=$(find "$out" -mindepth 1 | wc -l)
say "   $nfiles files in $out"
if ((${#failed[@]})); then
  say "GPU CHECK FAILED: ${failed[*]}"
  rc=1
else
  say "GPU CHECK OK$([[ $dry -eq 1 ]] && echo ' (dry run)')"
  rc=0
fi
say ""
if [[ -s "$out/table.md" ]]; then
  cat "$out/table.md"
else
  echo "(no table: $(if ((${#failed[@]})); then echo "failed: ${failed[*]}"; else echo "no results"; fi))"
fi
exit $rc
