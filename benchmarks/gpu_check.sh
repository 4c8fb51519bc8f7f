#!/usr/bin/env bash
# The one-shot GPU check: everything a scarce, offline GPU machine should do, in one run that
# ends within LRML_GPU_CHECK_TOTAL_S (default 300 s, at least 120 s), from the repository root:
#
#   1 env        GPU, driver, torch/triton/CUDA versions; the copy bandwidth, measured once
#   2 build      the C++ and CUDA libraries of the extension, just in time (ninja), both at once
#                (lrml_kernels.extension.prebuild; TORCH_CUDA_ARCH_LIST=9.0 for the whole check
#                -> -gencode arch=compute_90,code=sm_90, so later processes find the same build)
#   3 gpu-tests  pytest -m gpu tests/ (the test matrix on CUDA tensors; its log says which
#                subset ran), split over processes by benchmarks/pytest_shards.py: a fresh machine
#                compiles every Triton variant on its host, and the shards compile in parallel.
#                Beside it, in the background, the prewarm: the bench's own selection run once
#                (--benchmark-disable, sharded too, the train loop left out), which fills Triton's
#                and Inductor's on-disk caches with the bench's kernels; its output is discarded
#                and it is stopped before the bench starts (at most a third of the bench's limit
#                is spent waiting for it)
#   4 bench      the headline workloads at Netflix size (benchlib.HEADLINE): hinge fwd+bwd in
#                both relations at B = 4096 x 5 and at B = 2^20 x 2 (fp32, bf16; at 2^20 x 2 also
#                tf32: fp32 tables at matmul precision "high", eager and triton), the train step,
#                the epoch, the all-user top-10 (fp32); compile peers in fp32 after each size;
#                the train loop (fit on synthetic Netflix data beside its step: issue 19's GPU
#                target) last of all
#   5 profile    benchmarks/profile_gpu.py: torch.profiler over a train step and a hinge fwd+bwd
#                (B = 4096 x 5, B = 2^20 x 2) for the torch, triton and cuda backends (at 2^20 x 2
#                also torch and triton with TF32 dots)
#   6 report     benchmarks/report.py: the Markdown table of step 4, always written
#
# Usage:   bash benchmarks/gpu_check.sh [--dry-run | --plan] OUTDIR
#   OUTDIR receives 7 files, no subfolders: gpu_check.log (steps 1, 2, 5 and 6, the summary),
#   gpu_tests.log, bench.log, bench.json, bench.jsonl (every record as measured), table.md,
#   profile.md. The profile's summary and the table are printed last.
#   --dry-run: the whole logic on the CPU, on any machine: no bandwidth, the CPU library built
#   (prebuild), the gpu tests run sharded (each skips: no GPU), the prewarm and the headline
#   benchmarks on the CPU at the tiny sizes without the compile peers, the profile of the torch
#   and cpu backends at the tiny sizes, and the report. CI runs it (tests/test_benchmarks_tools.py).
#   --plan: print each step's time limit for this budget (if every step used all of it), run
#   nothing.
#
# Budget. Each step runs under a time limit, computed when it starts from the time left:
#   limit = left x share / (shares of this and the later steps),
# at least the step's floor, at most what leaves the later steps their floors. Shares (%):
# env 5, build 12, gpu-tests 40, bench 30, profile 10, report 3; floors (s): env 20, build 15,
# gpu-tests 20, bench 30, profile 15, report 8. So every step runs at every budget from 120 s
# up, each limit scales with the budget, a step that ends early leaves its time to the later
# ones, and the steps together never exceed the budget less 2 s for the script itself. At 300 s
# (every step using its whole limit; --plan prints these): env 20, build 35, gpu-tests 117,
# bench 87, profile 30, report 9; at 120 s: 20, 15, 30, 30, 15, 8. A step is stopped by SIGINT 3 s before its limit (pytest
# still writes its JSON) and SIGKILL at it. Inside their limits the steps plan their own work: the bench starts no
# benchmark after its deadline (limit - 3 s - 4 x cap; a compile peer needs 20 s more) and
# skips the rest as "out of time"; each slow workload (top-k, epoch) of a provider is capped
# at cap = budget / 100 s (3 s at 300 s), timed on a subset, scaled and marked; the profile
# stops starting pieces near its limit and lists those it left out.
#
# A failed step does not stop the later ones (the machine time is used in full) except step 1
# (no GPU: nothing else can run). The report is always written: from bench.json, else from
# bench.jsonl (a bench cut short), else an INCOMPLETE stub with no numbers. Any failure or
# anything left out: the summary names it, the table is headed INCOMPLETE and the exit status is
# 1.
# Environment: PYTHON (default python3), LRML_GPU_CHECK_TOTAL_S (the budget, default 300),
# LRML_COMMIT (the commit measured, where the tree was copied without .git),
# LRML_GPU_CHECK_REQUIRE (providers that must have results, default eager,compile,triton,cuda),
# LRML_GPU_CHECK_BENCH_ARGS (more pytest options for the bench, split on whitespace, e.g.
# "--lrml-workloads=all --lrml-size=netflix,netflix-epoch,small" for every workload),
# LRML_GPU_CHECK_FAIL=<step>[,<step>...] (tests: make those steps fail at once).
set -euo pipefail

mode=run
if [[ "${1:-}" == "--dry-run" || "${1:-}" == "--plan" ]]; then
  mode="${1#--}"
  shift
fi
if [[ $# -ne 1 && $mode != plan ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --plan] OUTDIR" >&2
  exit 2
fi
total_s="${LRML_GPU_CHECK_TOTAL_S:-300}"
if ! [[ "$total_s" =~ ^[0-9]+$ ]] || ((total_s < 120)); then
  echo "gpu_check.sh: LRML_GPU_CHECK_TOTAL_S must be a whole number of seconds >= 120" >&2
  exit 2
fi

steps=(env build gpu-tests bench profile report)
declare -A share=([env]=5 [build]=12 [gpu-tests]=40 [bench]=30 [profile]=10 [report]=3)
declare -A floor=([env]=20 [build]=15 [gpu-tests]=20 [bench]=30 [profile]=15 [report]=8)
grace=3                # SIGINT this long before a step's limit, SIGKILL at it
own=2                  # the script's own seconds (start, summary; SECONDS counts whole ones)
cap=$((total_s / 100)) # seconds one provider may spend on one slow workload
((cap >= 1)) || cap=1
ncpu=$(nproc 2>/dev/null || echo 2)
test_shards=$((ncpu / 2 < 6 ? ncpu / 2 : 6)) # pytest processes of the gpu tests
((test_shards >= 1)) || test_shards=1
warm_shards=$((ncpu / 4 < 4 ? ncpu / 4 : 4)) # of the prewarm (Netflix-size tables each)
((warm_shards >= 1)) || warm_shards=1

# step_limit NAME LEFT: the time limit of step NAME when LEFT seconds of the budget are left.
step_limit() {
  local name="$1" left="$2" i rest=0 after=0 seen=0 lim
  for i in "${steps[@]}"; do
    [[ $i == "$name" ]] && seen=1
    ((seen)) || continue
    rest=$((rest + share[$i]))
    [[ $i == "$name" ]] || after=$((after + floor[$i]))
  done
  lim=$((left * share[$name] / rest))
  ((lim <= left - after)) || lim=$((left - after))
  ((lim >= floor[$name])) || lim=${floor[$name]}
  echo "$lim"
}

# plan: each step's limit if every step used all of it.
plan() {
  local left=$((total_s - own)) line="" name lim
  for name in "${steps[@]}"; do
    lim=$(step_limit "$name" "$left")
    left=$((left - lim))
    line+="$name ${lim} s, "
  done
  echo "limits if every step used all of its own: ${line%, }; slow-workload cap ${cap} s"
}

if [[ $mode == plan ]]; then
  echo "budget ${total_s} s; $(plan)"
  exit 0
fi

out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
start=$SECONDS
log="$out/gpu_check.log"
files=(gpu_check.log gpu_tests.log bench.log bench.json bench.jsonl table.md profile.md)
for f in "${files[@]}" build.log chart.png; do rm -f "$out/$f"; done # (the last two: old runs)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export PYTHONUNBUFFERED=1
# One arch list for every process: the build directory's name does not hold it, so a process
# with another list (torch's default from the GPU: 9.0+PTX) would rebuild the CUDA library.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
commit="${LRML_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
failed=()
summary=()

say() { echo "$*" | tee -a "$log"; }
fold() { sed 's/^/   | /' "$1" | tee -a "$log"; } # a step's output into the log

# limit_of NAME: the limit of step NAME now (step_limit of the time left), into $limit.
limit_of() { limit=$(step_limit "$1" $((total_s - own - (SECONDS - start)))); }

# run_step NAME LIMIT LOGFILE COMMAND...
# Runs COMMAND with its output to LOGFILE under LIMIT seconds (from limit_of, just before). A
# step always runs: every limit keeps the floors of the later steps out.
run_step() {
  local name="$1" limit="$2" steplog="$3"
  shift 3
  if [[ ",${LRML_GPU_CHECK_FAIL:-}," == *",$name,"* ]]; then
    set -- bash -c "echo 'step $name: failure injected by LRML_GPU_CHECK_FAIL' >&2; exit 7"
  fi
  say "== step $name (limit ${limit} s, $((SECONDS - start)) s into the ${total_s} s budget): $*"
  local t0=$SECONDS rc=0
  timeout -s INT -k "$grace" $((limit - grace)) "$@" >>"$steplog" 2>&1 || rc=$?
  local dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    summary+=("$name: ok (${dt} s of ${limit} s)")
    say "   ok (${dt} s): $(awk 'NF { l = $0 } END { print l }' "$steplog")"
  else
    local why="rc=$rc"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then why="timed out after ${limit} s"; fi
    failed+=("$name ($why)")
    summary+=("$name: FAILED ($why, ${dt} s), log: $(basename "$steplog")")
    if [[ $steplog == "$tmp"/* ]]; then # folded into the log in full right after
      say "   FAILED ($why, ${dt} s); its output:"
    else
      say "   FAILED ($why, ${dt} s); last lines of $(basename "$steplog"):"
      tail -n 25 "$steplog" | sed 's/^/   | /' | tee -a "$log"
    fi
  fi
  return 0
}

say "gpu_check $([[ $mode == dry-run ]] && echo '(DRY RUN) ')$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, output $out"
say "budget ${total_s} s; $(plan)"

# 1 env -------------------------------------------------------------------------------------------
env_args=()
[[ $mode == dry-run ]] && env_args=(--dry-run)
limit_of env
run_step env "$limit" "$tmp/env.log" "$py" benchmarks/benchlib.py env "${env_args[@]}"
fold "$tmp/env.log"
if ((${#failed[@]})); then
  say "step env failed: no usable GPU, nothing else can run"
  say "GPU CHECK FAILED: ${failed[*]}"
  exit 1
fi
gbps="$(sed -n 's/^COPY_GBPS=//p' "$tmp/env.log" | tail -n 1)"
[[ -n "$gbps" ]] && export LRML_COPY_GBPS="$gbps"
# The prewarm's shards share the GPU with the test shards, each holding Netflix-size tables and
# up to ~8 GB of activations at 2^20 x 2: one shard per 32 GiB (4 on an H200, 2 on an 80 GB H100).
gib="$(sed -n 's/^GPU_MEMORY_GIB=//p' "$tmp/env.log" | tail -n 1)"
if [[ "$gib" =~ ^[0-9]+$ ]] && ((gib / 32 < warm_shards)); then
  warm_shards=$((gib / 32 > 1 ? gib / 32 : 1))
  say "   ${gib} GiB of GPU memory: ${warm_shards} prewarm shards"
fi

# 2 build -----------------------------------------------------------------------------------------
# Both libraries at once (prebuild: one process each), then loaded here as the tests will.
limit_of build
if [[ $mode == dry-run ]]; then
  libs="('cpu',)" load=cpu
else
  libs="('cpu', 'cuda')" load=cuda
fi
run_step build "$limit" "$tmp/build.log" env MAX_JOBS="$ncpu" "$py" -c "
import lrml_kernels.extension as e
failed = {k: v for k, v in e.prebuild($libs).items() if v}
for name, why in failed.items():
    print(f'{name} library: build failed:\n{why}')
e.backend('$load')
print('$load backend loaded:', e.library_origin('$load'))
raise SystemExit(1 if failed else 0)"
fold "$tmp/build.log"

# 3 gpu-tests (and the bench's prewarm beside it) -------------------------------------------------
# The bench's selection, shared by the prewarm and step 4.
select=(-q -p no:cacheprovider --lrml-workloads=headline --lrml-cap="$cap")
if [[ $mode == dry-run ]]; then
  export OMP_NUM_THREADS=1 # the CPU stand-in: no thread contention on a shared CI machine
  select+=(--lrml-device=cpu --lrml-size=tiny,tiny-epoch --lrml-budget=0.05 -k "not compile")
  select+=(--lrml-dtypes=fp32,tf32) # (tf32 is on by default on CUDA only)
else
  select+=(--lrml-device=cuda --lrml-size=netflix,netflix-epoch -k "not compile or fp32")
fi
read -ra bench_extra <<<"${LRML_GPU_CHECK_BENCH_ARGS:-}"
limit_of gpu-tests
timeout -s INT -k "$grace" "$limit" "$py" benchmarks/pytest_shards.py --shards "$warm_shards" \
  --log "$tmp/prewarm.log" benchmarks/ -- "${select[@]}" "${bench_extra[@]}" --benchmark-disable \
  --deselect benchmarks/bench_train_loop.py >"$tmp/prewarm.out" 2>&1 &
prewarm=$!
run_step gpu-tests "$limit" "$out/gpu_tests.log" "$py" benchmarks/pytest_shards.py \
  --shards "$test_shards" --log "$out/gpu_tests.log" tests/ -- -m gpu -q -p no:cacheprovider -ra

# 4 bench -----------------------------------------------------------------------------------------
# First the prewarm ends (the GPU must be the bench's alone): at most a third of the bench's
# limit is spent waiting for it. Then the deadline leaves the longest capped benchmark
# (4 x cap) and the SIGINT grace inside the limit.
limit_of bench
waited=$SECONDS
while kill -0 "$prewarm" 2>/dev/null && ((SECONDS - waited < limit / 3)); do sleep 1; done
if kill -0 "$prewarm" 2>/dev/null; then # timeout leads a process group: the shards are in it
  kill -INT -- -"$prewarm" 2>/dev/null || true
  sleep "$grace"
  kill -KILL -- -"$prewarm" 2>/dev/null || true
fi
wait "$prewarm" 2>/dev/null || true
say "== prewarm (beside gpu-tests, ${warm_shards} shards; waited $((SECONDS - waited)) s for it):" \
  "$(tail -n 1 "$tmp/prewarm.out" 2>/dev/null || echo 'no output')"
bench=("$py" -m pytest benchmarks/ "${select[@]}" -ra --benchmark-json="$out/bench.json"
  --lrml-jsonl="$out/bench.jsonl" --benchmark-columns=median,rounds --benchmark-sort=name)
limit_of bench
bench+=(--lrml-deadline=$((limit - grace - 4 * cap)) "${bench_extra[@]}")
run_step bench "$limit" "$out/bench.log" "${bench[@]}"
late=0
[[ -f "$out/bench.jsonl" ]] && late=$(grep -c '"reason": "out of time' "$out/bench.jsonl" || true)
if ((late > 0)); then
  failed+=("bench (${late} benchmarks out of time)")
  summary+=("bench: INCOMPLETE, ${late} benchmarks not run: out of time (see table.md)")
  say "   INCOMPLETE: ${late} benchmarks not run, out of time"
fi

# 5 profile ---------------------------------------------------------------------------------------
if [[ $mode == dry-run ]]; then
  prof=(--device cpu --size tiny --backends torch,cpu)
else
  prof=(--device cuda --size netflix)
fi
limit_of profile
run_step profile "$limit" "$tmp/profile.log" "$py" benchmarks/profile_gpu.py "$out/profile.md" \
  "${prof[@]}" --time-limit=$((limit - grace - 2))
fold "$tmp/profile.log"

# 6 report ----------------------------------------------------------------------------------------
if ((${#failed[@]})); then
  status="INCOMPLETE: failed step(s): ${failed[*]}"
elif [[ $mode == dry-run ]]; then
  status="DRY RUN on the CPU: the script's logic, not GPU numbers"
else
  status=""
fi
run_json="$out/bench.json"
if ! "$py" -c "import json,sys; json.load(open(sys.argv[1]))['benchmarks']" "$run_json" 2>/dev/null; then
  run_json="$out/bench.jsonl" # the run was cut short before pytest-benchmark wrote its JSON
  status="${status:+$status; }INCOMPLETE: results from the partial record bench.jsonl"
fi
require="${LRML_GPU_CHECK_REQUIRE:-eager,compile,triton,cuda}"
[[ $mode == dry-run ]] && require="eager"
title="GPU check $(date -u '+%Y-%m-%d'), commit $commit"
limit_of report
run_step report "$limit" "$tmp/report.log" bash -c '"$@" >/dev/null' report "$py" \
  benchmarks/report.py "$run_json" --markdown "$out/table.md" --require "$require" \
  --status "${status:-complete}" --title "$title"
fold "$tmp/report.log" # its messages (stderr); the table itself is printed last

# summary, the profile's summary, then the table --------------------------------------------------
say ""
say "== summary ($((SECONDS - start)) s of ${total_s} s)"
for line in "${summary[@]}"; do say "   $line"; done
nfiles=$(find "$out" -mindepth 1 | wc -l)
say "   $nfiles files in $out"
if ((${#failed[@]})); then
  say "GPU CHECK FAILED: ${failed[*]}"
  rc=1
else
  say "GPU CHECK OK$([[ $mode == dry-run ]] && echo ' (dry run)')"
  rc=0
fi
echo ""
[[ -s "$out/profile.md" ]] && sed '/^### /,$d' "$out/profile.md"
[[ -s "$out/table.md" ]] && cat "$out/table.md"
exit $rc
