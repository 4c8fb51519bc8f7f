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
#                is spent waiting for it, inside that limit)
#   4 bench      the headline workloads at Netflix size (benchlib.HEADLINE): hinge fwd+bwd in
#                both relations at B = 4096 x 5 and at B = 2^20 x 2 (fp32, bf16; at 2^20 x 2 also
#                tf32: fp32 tables at matmul precision "high", eager and triton), the train step,
#                the epoch, the all-user top-10 (fp32); compile peers in fp32 after each size;
#                the train loop (fit on synthetic Netflix data beside its step: issue 19's GPU
#                target) last of all
#   5 profile    benchmarks/profile_gpu.py: torch.profiler over a train step and a hinge fwd+bwd
#                (B = 4096 x 5, B = 2^20 x 2) for the torch, triton and cuda backends (at 2^20 x 2
#                also torch and triton with TF32 dots)
#   6 report     benchmarks/report.py: the Markdown table of step 4 (from bench.json, else from
#                the partial record bench.jsonl)
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
# at least the step's floor, at most what leaves the later steps their floors (below its floor
# only when the time is gone: a step left less than 5 s is not run). Shares (%): env 5,
# build 12, gpu-tests 40, bench 30, profile 10, report 3; floors (s): env 30, build 15,
# gpu-tests 20, bench 27, profile 12, report 8. So every step runs at every budget from 120 s
# up, each limit scales with the budget, a step that ends early leaves its time to the later
# ones, and the whole check (the waits between steps included) ends within the budget: the
# steps' limits never exceed it less 3 s for the script itself. --plan prints the limits; at
# 300 s: env 30, build 33, gpu-tests 112, bench 85, profile 28, report 9. A step is stopped by
# SIGINT 5 s before its limit (pytest still writes its JSON) and SIGKILL at it. Inside their
# limits the steps plan their own work: the bench starts no benchmark after its deadline (an
# absolute time: the end of its limit less 5 s, less 4 x cap, less 3 s to finish; a compile
# peer needs 20 s more, the train loop's first case the time its data set-up takes) and skips
# the rest as "out of time"; each slow workload (top-k, epoch) of a provider is capped at
# cap = budget / 100 s (3 s at 300 s), timed on a subset, scaled and marked; the profile
# stops starting pieces near its limit and lists those it left out.
#
# A failed step does not stop the later ones (the machine time is used in full). Step 1 stops
# the check only when torch cannot be imported or sees no CUDA device (the dry run: no torch);
# a step 1 that fails otherwise (a hang, a failed bandwidth measurement) is a warning and the
# check carries on without LRML_COPY_GBPS. A failed build sets LRML_KERNELS_NO_JIT (the failed
# libraries) for the later steps, so that no process builds them again. table.md is always
# written: by report.py from bench.json, else from bench.jsonl (a bench cut short), else (no
# results, report.py failed or hung, the check stopped or was killed by SIGINT/SIGTERM/SIGHUP)
# a stub by this script, headed INCOMPLETE and saying why. Any failure or anything left out: the
# summary names it, the table is headed INCOMPLETE and the exit status is 1 (128 + N when the
# check was stopped by signal N: the running steps are stopped first).
# Environment: PYTHON (default .venv/bin/python where it exists, else python3), LRML_GPU_CHECK_TOTAL_S
# (the budget, default 300; a device tool command runs at most 600 s: keep it <= 560),
# LRML_COMMIT (the commit measured, where the tree was copied without .git),
# LRML_GPU_CHECK_REQUIRE (providers that must have results, default eager,compile,triton,cuda),
# LRML_GPU_CHECK_BENCH_ARGS (more pytest options for the bench, split on whitespace, e.g.
# "--lrml-workloads=all --lrml-size=netflix,netflix-epoch,small" for every workload),
# LRML_GPU_CHECK_FAIL=<step>[,<step>...] (tests: make those steps fail at once; env: as if no
# GPU; prewarm is a step here), LRML_GPU_CHECK_HANG=<step>[,...] (tests: those steps hang,
# ignoring SIGINT, until they are killed).
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

steps=(env build gpu-tests bench profile report)
declare -A share=([env]=5 [build]=12 [gpu-tests]=40 [bench]=30 [profile]=10 [report]=3)
declare -A floor=([env]=30 [build]=15 [gpu-tests]=20 [bench]=27 [profile]=12 [report]=8)
grace=5     # SIGINT this long before a step's limit, SIGKILL at it
own=3       # the script's own seconds (start, summary; SECONDS counts whole ones)
min_run=7   # a step left less than this is not run (it needs more than the grace)
fits=560    # the longest budget that fits the device tool's 600 s per command, set-up included
min_total=0 # (the floors and own, below)
for i in "${steps[@]}"; do min_total=$((min_total + floor[$i])); done
min_total=$((min_total + own))

out=""
if [[ $mode != plan ]]; then
  out="$1"
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
fi
cd "$(dirname "$0")/.."
repo="$(pwd -P)"

# stub REASON: table.md, headed INCOMPLETE, where no report was written (any way the check ends).
stub() {
  [[ -n $out && ! -s "$out/table.md" ]] || return 0
  local jsonl="" why="${1#INCOMPLETE: }"
  [[ -s "$out/bench.jsonl" ]] && jsonl=" bench.jsonl holds $(($(wc -l <"$out/bench.jsonl") - 1)) record(s) of the bench: \`python benchmarks/report.py bench.jsonl\` tabulates them."
  printf '## %s\n\n> **INCOMPLETE: %s**\n\nNo table of benchmark results: gpu_check.log says what ran and what failed.%s\n' \
    "${title:-GPU check}" "$why" "$jsonl" >"$out/table.md" 2>/dev/null || true
}

total_raw="${LRML_GPU_CHECK_TOTAL_S:-300}"
if ! [[ "$total_raw" =~ ^[0-9]+$ ]] || ((10#$total_raw < 120)); then
  msg="LRML_GPU_CHECK_TOTAL_S must be a whole number of seconds >= 120 (got '$total_raw')"
  echo "gpu_check.sh: $msg" >&2
  stub "$msg"
  exit 2
fi
total_s=$((10#$total_raw)) # (10#: 0300 is 300 s, not octal)
long_note=""
if ((total_s > fits)); then
  long_note="note: a budget over ${fits} s does not fit one command of the device tool (600 s at most, set-up included)"
fi
cap=$((total_s / 100)) # seconds one provider may spend on one slow workload
((cap >= 1)) || cap=1
ncpu=$(nproc 2>/dev/null || echo 2)
test_shards=$((ncpu / 2 < 6 ? ncpu / 2 : 6)) # pytest processes of the gpu tests
((test_shards >= 1)) || test_shards=1
warm_shards=$((ncpu / 4 < 4 ? ncpu / 4 : 4)) # of the prewarm (Netflix-size tables each)
((warm_shards >= 1)) || warm_shards=1
shard_grace=3 # pytest_shards: SIGINT to its shards, SIGKILL this long after (< grace)

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
  ((lim >= floor[$name])) || lim=${floor[$name]}
  ((lim <= left - after)) || lim=$((left - after)) # (below the floor only when time is gone)
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
  [[ -z $long_note ]] || echo "gpu_check.sh: $long_note" >&2
  exit 0
fi

if [[ -n ${PYTHON:-} ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
start=$SECONDS
log="$out/gpu_check.log"
files=(gpu_check.log gpu_tests.log bench.log bench.json bench.jsonl table.md profile.md)
for f in "${files[@]}" gpu_tests.log.tmp build.log chart.png; do rm -f "$out/$f"; done # (old runs)
tmp="$(mktemp -d)"
export PYTHONUNBUFFERED=1
# One arch list for every process: the build directory's name does not hold the arch list, so a
# process with another list (torch's default from the GPU: 9.0+PTX) would rebuild the CUDA library.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# The commit: LRML_COMMIT, else git's where this tree is the repository's root (a tree copied
# into another repository would otherwise be labelled with that repository's commit).
top="$(git rev-parse --show-toplevel 2>/dev/null || true)"
own_git=0
[[ -n $top && "$(cd "$top" && pwd -P)" == "$repo" ]] && own_git=1
if ((own_git)); then
  dirty=no
  [[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] || dirty=yes
else
  dirty=unknown
fi
if [[ -n ${LRML_COMMIT:-} ]]; then
  commit="$LRML_COMMIT"
elif ((own_git)); then
  commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo 'unknown (set LRML_COMMIT)')"
else
  commit="unknown (set LRML_COMMIT)"
fi
title="GPU check $(date -u '+%Y-%m-%d'), commit $commit"
failed=()
warnings=()
summary=()
current=""     # the step running now
step_pid=""    # its process (the leader of its process group: timeout's)
prewarm=""     # the prewarm's, while it runs
stopped_by=""  # the signal that stopped the check

say() { echo "$*" | tee -a "$log"; }
fold() { [[ ! -e $1 ]] || sed 's/^/   | /' "$1" | tee -a "$log"; } # a step's output into the log
now_epoch() { printf -v "$1" '%(%s)T' -1; }
injected() { [[ ",${2:-}," == *",$1,"* ]]; }

# stop_groups PID...: SIGINT to the process groups the PIDs lead (timeout's: a step and all its
# processes), SIGKILL to what is left of them after the grace.
stop_groups() {
  local pid t alive
  for pid in "$@"; do kill -INT -- -"$pid" 2>/dev/null || kill -INT "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "$@"; do ! kill -0 "$pid" 2>/dev/null || alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "$@"; do
    kill -KILL -- -"$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# finish: the summary lines, the verdict; the exit status into $rc.
finish() {
  say ""
  say "== summary ($((SECONDS - start)) s of ${total_s} s)"
  local line
  for line in "${summary[@]}"; do say "   $line"; done
  for line in "${warnings[@]}"; do say "   WARNING: $line"; done
  say "   $(find "$out" -mindepth 1 | wc -l) files in $out"
  if [[ -n $stopped_by ]]; then
    say "GPU CHECK STOPPED by SIG$stopped_by during step ${current:-none}${failed[*]:+; failed: ${failed[*]}}"
  elif ((${#failed[@]})); then
    say "GPU CHECK FAILED: ${failed[*]}"
    rc=1
  else
    say "GPU CHECK OK$([[ $mode == dry-run ]] && echo ' (dry run)')${warnings[*]:+ (with warnings)}"
    rc=0
  fi
}

# on_signal NAME NUMBER: stop the running step and the prewarm, write the stub report and the
# summary, exit 128 + NUMBER.
on_signal() {
  trap '' INT TERM HUP
  stopped_by="$1"
  local pids=() pid
  for pid in $step_pid $prewarm; do pids+=("$pid"); done
  for pid in "${pids[@]}"; do kill -INT -- -"$pid" 2>/dev/null || true; done # (at once)
  stub "the check was stopped by SIG$1 during step ${current:-none} ($((SECONDS - start)) s into the ${total_s} s budget)"
  say "== stopped by SIG$1 during step ${current:-none}: stopping its processes"
  [[ -z $current ]] || failed+=("$current (stopped by SIG$1)")
  stop_groups "${pids[@]}"
  finish
  exit $((128 + $2))
}
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP
trap 'stub "gpu_check.sh ended early (an error of the script itself: see its output)"; rm -rf "$tmp"' EXIT

# limit_of NAME: the limit of step NAME now (step_limit of the time left), into $limit.
limit_of() { limit=$(step_limit "$1" $((total_s - own - (SECONDS - start)))); }

# run_step NAME LIMIT LOGFILE COMMAND...
# Runs COMMAND with its output to LOGFILE under LIMIT seconds (from limit_of, just before), in
# the background (so that a signal to this script is handled at once); $step_rc is its status.
run_step() {
  local name="$1" limit="$2" steplog="$3"
  shift 3
  if injected "$name" "${LRML_GPU_CHECK_FAIL:-}"; then
    set -- bash -c "echo 'step $name: failure injected by LRML_GPU_CHECK_FAIL' >&2; exit 7"
  elif injected "$name" "${LRML_GPU_CHECK_HANG:-}"; then
    set -- bash -c "trap '' INT; echo 'step $name: hang injected by LRML_GPU_CHECK_HANG' >&2; while :; do sleep 1; done # $out"
  fi
  step_rc=0
  if ((limit < min_run)); then
    step_rc=124
    failed+=("$name (not run: out of time)")
    summary+=("$name: NOT RUN: ${limit} s left of the budget")
    say "== step $name: not run, only ${limit} s left of the budget"
    return 0
  fi
  say "== step $name (limit ${limit} s, $((SECONDS - start)) s into the ${total_s} s budget): $*"
  current="$name"
  local t0=$SECONDS
  timeout -s INT -k "$grace" $((limit - grace)) "$@" >>"$steplog" 2>&1 &
  step_pid=$!
  wait "$step_pid" || step_rc=$?
  step_pid="" current=""
  local dt=$((SECONDS - t0)) rc=$step_rc
  if [[ $rc -eq 0 ]]; then
    summary+=("$name: ok (${dt} s of ${limit} s)")
    say "   ok (${dt} s): $(awk 'NF { l = $0 } END { print l }' "$steplog")"
  else
    local why="rc=$rc"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then why="timed out after ${limit} s"; fi
    local verdict=FAILED
    if [[ $name == env ]]; then # (whether it stops the check: the caller decides)
      verdict=WARNING
    else
      failed+=("$name ($why)")
    fi
    local where="$(basename "$steplog")"
    [[ $steplog != "$tmp"/* ]] || where="gpu_check.log"
    [[ $name != gpu-tests ]] || where="gpu_tests.log"
    summary+=("$name: $verdict ($why, ${dt} s), log: $where")
    if [[ $steplog == "$tmp"/* ]]; then # folded into the log in full right after
      say "   $verdict ($why, ${dt} s); its output:"
    else
      say "   $verdict ($why, ${dt} s); last lines of $(basename "$steplog"):"
      tail -n 25 "$steplog" 2>/dev/null | sed 's/^/   | /' | tee -a "$log" || true
    fi
  fi
  return 0
}

say "gpu_check $([[ $mode == dry-run ]] && echo '(DRY RUN) ')$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit (uncommitted changes: $dirty), output $out"
say "budget ${total_s} s; $(plan)"
[[ -z $long_note ]] || say "$long_note"
say "python: $py"
if ! command -v "$py" >/dev/null 2>&1; then
  say "PYTHON=$py is not found: nothing can run (set PYTHON to a Python with torch)"
  failed+=("env (no python)")
  stub "PYTHON=$py is not found"
  finish
  exit 1
fi

# 1 env -------------------------------------------------------------------------------------------
# Stops the check only when torch is missing or sees no GPU (exit status 3 and a NO_DEVICE line);
# any other failure (a hang, a crash, a failed bandwidth measurement) is a warning.
env_args=()
[[ $mode == dry-run ]] && env_args=(--dry-run)
limit_of env
now_epoch t
if injected env "${LRML_GPU_CHECK_FAIL:-}"; then # (as if there were no GPU)
  LRML_GPU_CHECK_FAIL=",${LRML_GPU_CHECK_FAIL}," # (not the generic injection: the exit status 3)
  LRML_GPU_CHECK_FAIL="${LRML_GPU_CHECK_FAIL//,env,/,}"
  run_step env "$limit" "$tmp/env.log" bash -c "echo 'NO_DEVICE: injected by LRML_GPU_CHECK_FAIL'; exit 3"
else
  run_step env "$limit" "$tmp/env.log" "$py" benchmarks/benchlib.py env "${env_args[@]}" \
    --end-at $((t + limit - grace - 1))
fi
fold "$tmp/env.log"
if [[ $step_rc -eq 3 ]] && grep -q '^NO_DEVICE' "$tmp/env.log"; then
  summary[-1]="env: FAILED (no usable $([[ $mode == dry-run ]] && echo 'torch' || echo 'GPU'): nothing else can run)"
  failed+=("env (no usable $([[ $mode == dry-run ]] && echo 'torch' || echo 'GPU'))")
  say "step env: $(sed -n 's/^NO_DEVICE: //p' "$tmp/env.log" | tail -n 1): nothing else can run$(
    [[ -z ${PYTHON:-} ]] && echo " (PYTHON is not set: $py was used; set PYTHON to a Python with torch)")"
  stub "step env found no usable $([[ $mode == dry-run ]] && echo 'torch' || echo 'GPU'): $(sed -n 's/^NO_DEVICE: //p' "$tmp/env.log" | tail -n 1)"
  finish
  exit 1
elif [[ $step_rc -ne 0 ]]; then
  warnings+=("step env failed (rc=$step_rc$([[ $step_rc -eq 124 || $step_rc -eq 137 ]] && echo ', timed out')): carrying on without its versions and LRML_COPY_GBPS (the bench measures the bandwidth itself)")
  say "   WARNING: ${warnings[-1]}"
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
if [[ $step_rc -ne 0 ]]; then
  # Every later process would build a failed library again, one after the other under the
  # build lock (6 test shards, the prewarm's, the bench, the profile): they do not.
  nojit="$(sed -n 's/^\(cpu\|cuda\) library: build failed:.*/\1/p' "$tmp/build.log" | paste -sd, -)"
  export LRML_KERNELS_NO_JIT="${nojit:-1}"
  say "   the build failed: LRML_KERNELS_NO_JIT=$LRML_KERNELS_NO_JIT for the later steps (no just-in-time build of ${nojit:-any library}; its backend reports unavailable)"
  warnings+=("LRML_KERNELS_NO_JIT=$LRML_KERNELS_NO_JIT after the failed build")
fi

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
hang_dump=$(((limit - grace) / 2)) # a test running longer dumps its stack into the log
((hang_dump >= 5)) || hang_dump=5
if injected prewarm "${LRML_GPU_CHECK_FAIL:-}"; then
  timeout 5 bash -c "echo 'prewarm: failure injected by LRML_GPU_CHECK_FAIL'; exit 7" \
    >"$tmp/prewarm.out" 2>&1 &
elif injected prewarm "${LRML_GPU_CHECK_HANG:-}"; then
  timeout -s INT -k "$grace" $((limit - grace)) bash -c "trap '' INT; echo 'prewarm: hang injected'; while :; do sleep 1; done # $out" \
    >"$tmp/prewarm.out" 2>&1 &
elif ((limit > min_run)); then
  timeout -s INT -k "$grace" $((limit - grace)) "$py" benchmarks/pytest_shards.py \
    --shards "$warm_shards" --grace "$shard_grace" --log "$tmp/prewarm.log" \
    --work "$tmp/prewarm-shards" benchmarks/ -- "${select[@]}" "${bench_extra[@]}" \
    --benchmark-disable --deselect benchmarks/bench_train_loop.py >"$tmp/prewarm.out" 2>&1 &
else
  true &
fi
prewarm=$!
run_step gpu-tests "$limit" "$tmp/gpu-tests.out" "$py" benchmarks/pytest_shards.py \
  --shards "$test_shards" --grace "$shard_grace" --hang-dump "$hang_dump" \
  --log "$out/gpu_tests.log" --work "$tmp/test-shards" tests/ -- -m gpu -q -p no:cacheprovider -ra
if [[ $step_rc -ne 0 ]]; then
  tail -n 25 "$tmp/gpu-tests.out" 2>/dev/null | sed 's/^/   | /' | tee -a "$log" || true
fi
# pytest_shards killed (no final line): the log from the shards' own output files, in full
if ! tail -n 1 "$out/gpu_tests.log" 2>/dev/null | grep -q '^sharded: \|^pytest_shards: collection failed'; then
  {
    echo "=== pytest_shards did not finish (step gpu-tests: rc=$step_rc); each shard's own output:"
    for f in "$tmp"/test-shards/shard*.log; do
      [[ -e $f ]] || continue
      echo "=== $(basename "$f" .log)"
      cat "$f"
    done
    echo "=== pytest_shards's output:"
    cat "$tmp/gpu-tests.out" 2>/dev/null || true
    echo "=== its last snapshot: $(tail -n 1 "$out/gpu_tests.log" 2>/dev/null)"
    running="$(cat "$tmp"/test-shards/shard*.progress 2>/dev/null | awk -F'\t' '
      $1 == "start" { r[$2] = 1 } $1 == "end" { delete r[$3] } END { for (k in r) printf "%s ", k }' || true)"
    echo "gpu_check: tests running when pytest_shards was killed: ${running:-none recorded}"
  } >"$tmp/gpu_tests.log"
  mv "$tmp/gpu_tests.log" "$out/gpu_tests.log"
  rm -f "$out/gpu_tests.log.tmp"
  say "   gpu_tests.log: rebuilt from the shards' output files (pytest_shards did not finish)"
fi

# 4 bench -----------------------------------------------------------------------------------------
# First the prewarm ends (the GPU must be the bench's alone): at most a third of the bench's
# limit is spent waiting for it, inside that limit. Then the deadline (an absolute time) leaves
# the longest capped benchmark (4 x cap), the SIGINT grace and 3 s to finish inside the limit.
limit_of bench
bench_limit=$limit
waited=$SECONDS
while kill -0 "$prewarm" 2>/dev/null && ((SECONDS - waited < bench_limit / 3)); do sleep 0.5; done
prewarm_state=""
if kill -0 "$prewarm" 2>/dev/null; then
  prewarm_state="stopped: still running after $((SECONDS - waited)) s of waiting"
  stop_groups "$prewarm"
fi
prc=0
wait "$prewarm" 2>/dev/null || prc=$?
prewarm=""
if [[ -z $prewarm_state ]]; then
  case $prc in
    0) prewarm_state="ok" ;;
    124 | 137) prewarm_state="timed out (killed at the gpu-tests limit)" ;;
    *) prewarm_state="FAILED (rc=$prc)" ;;
  esac
fi
prewarm_last="$(awk 'NF { l = $0 } END { print l }' "$tmp/prewarm.out" 2>/dev/null || true)"
[[ -n $prewarm_last ]] || prewarm_last="$(tail -n 1 "$tmp/prewarm.log" 2>/dev/null || true)"
say "== prewarm (beside gpu-tests, ${warm_shards} shards; waited $((SECONDS - waited)) s for it): $prewarm_state: ${prewarm_last:-no output}"
[[ $prewarm_state == ok ]] || summary+=("prewarm: $prewarm_state (the bench compiles what it lacks)")
limit=$((bench_limit - (SECONDS - waited)))
now_epoch t
deadline_at=$((t + limit - grace - 4 * cap - 3))
bench=("$py" -m pytest benchmarks/ "${select[@]}" -ra --benchmark-json="$out/bench.json"
  --lrml-jsonl="$out/bench.jsonl" --benchmark-columns=median,rounds --benchmark-sort=name
  -o faulthandler_timeout=$(((limit - grace) * 2 / 3 > 5 ? (limit - grace) * 2 / 3 : 5))
  --lrml-deadline-at="$deadline_at" "${bench_extra[@]}")
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
now_epoch t
run_step profile "$limit" "$tmp/profile.log" "$py" benchmarks/profile_gpu.py "$out/profile.md" \
  "${prof[@]}" --end-at=$((t + limit - grace - 2))
fold "$tmp/profile.log"

# 6 report ----------------------------------------------------------------------------------------
if ((${#failed[@]})); then
  status="INCOMPLETE: failed step(s): ${failed[*]}"
elif [[ $mode == dry-run ]]; then
  status="DRY RUN on the CPU: the script's logic, not GPU numbers"
else
  status=""
fi
for line in "${warnings[@]}"; do status="${status:+$status; }WARNING: $line"; done
require="${LRML_GPU_CHECK_REQUIRE:-eager,compile,triton,cuda}"
[[ $mode == dry-run ]] && require="eager"
limit_of report
# (bench.json, else the partial record bench.jsonl: report.py decides, inside its limit)
run_step report "$limit" "$tmp/report.log" bash -c '"$@" >/dev/null' report "$py" \
  benchmarks/report.py "$out/bench.json" --partial "$out/bench.jsonl" --markdown "$out/table.md" \
  --require "$require" --status "${status:-complete}" --title "$title"
fold "$tmp/report.log" # its messages (stderr); the table itself is printed last
if [[ ! -s "$out/table.md" ]]; then
  [[ $step_rc -ne 0 ]] || failed+=("report (no table.md)")
  stub "${status:+$status; }report.py wrote no table (rc=$step_rc: see gpu_check.log)"
  say "   report.py wrote no table.md: a stub instead"
fi

# summary, the profile's summary, then the table --------------------------------------------------
finish
echo ""
[[ -s "$out/profile.md" ]] && sed '/^### /,$d' "$out/profile.md"
[[ -s "$out/table.md" ]] && cat "$out/table.md"
exit $rc
