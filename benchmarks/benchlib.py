"""Shared pieces of the benchmark suite: sizes, providers, inputs, baselines, timing, records.

Every benchmark test does the same four things: pick a :class:`Case` (device, size, dtype) and a
provider, skip with the reason if the provider cannot run here (:func:`require`), build one callable
on inputs shared by every provider of that case (:func:`tables`, :func:`batch`), and hand it to
:func:`measure`, which times it (pytest-benchmark rounds on the CPU, CUDA events through
``triton.testing.do_bench`` on the GPU) and writes the record that ``report.py`` pivots into
``benchmark.extra_info``.

Run as a script, ``python benchmarks/benchlib.py peakmem ...`` is the top-k memory probe: one fresh
process, see :func:`peak_extra_rss_mb`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    import torch
except ImportError as _exc:  # step 1 of the GPU check says so, and the check stops
    if __name__ == "__main__" and sys.argv[1:2] == ["env"]:
        print(f"NO_DEVICE: torch cannot be imported by {sys.executable} ({_exc})", flush=True)
        sys.exit(3)
    raise

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest benchmarks/` without an installed package
    sys.path.insert(0, str(REPO))

import lrml_kernels as lk  # noqa: E402
from lrml_kernels import backends, reference  # noqa: E402
from lrml_kernels.precision import fp32_matmul_precision  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class Size:
    """Table and batch sizes of one benchmark size."""

    name: str
    U: int  # users
    I: int  # items
    d: int  # embedding dimension
    N: int  # memory slots
    B: int  # batch rows (users)
    C: int  # items per row: 1 positive + C-1 negatives
    topk_users_cpu: int  # users ranked by the top-k workload on the CPU
    topk_users_gpu: int  # ... and on the GPU
    # The epoch's batch (B = 2^20 rows x 2) on the tables of another size: only the benchmarks
    # whose marker says ``epoch_batch=True`` run at it (``tables`` are shared with that size).
    epoch_batch: bool = False


SIZES = {
    # CI smoke test: every code path, seconds.
    "tiny": Size("tiny", 1_000, 500, 100, 20, 256, 5, 64, 64),
    # MovieLens-1M tables, the small batch of the issue (B = 256).
    "small": Size("small", 6_040, 3_706, 100, 20, 256, 5, 256, 6_040),
    # Netflix Prize tables (480,189 x 17,770), the batch of the CPU and H200 targets.
    "netflix": Size("netflix", 480_189, 17_770, 100, 20, 4_096, 5, 2_048, 480_189),
    # Netflix tables, the batch of the GPU epoch: 2^20 users x (1 positive + 1 negative).
    "netflix-epoch": Size("netflix-epoch", 480_189, 17_770, 100, 20, 1 << 20, 2, 0, 0, True),
    # Its dry-run stand-in (gpu_check.sh --dry-run): tiny tables, a 16x larger batch.
    "tiny-epoch": Size("tiny-epoch", 1_000, 500, 100, 20, 4_096, 2, 0, 0, True),
}
PRESETS = {"smoke": ("tiny",), "full": ("small", "netflix")}

# The GPU check's default selection (--lrml-workloads=headline): test -> the dtypes it runs in
# (None: every dtype of the run). Run at the sizes netflix,netflix-epoch: hinge fwd+bwd in both
# relations at B = 4096 x 5 and 2^20 x 2 (fp32 and bf16), the train step, the epoch and the
# all-user top-10 in fp32.
HEADLINE = {
    "test_hinge_forward_backward": None,
    "test_train_step": ("fp32",),
    "test_epoch": ("fp32",),
    "test_topk": ("fp32",),
    "test_train_loop": None,  # (run last of all: its data set-up is the slowest part)
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# "tf32": fp32 tables timed under torch.set_float32_matmul_precision("high"), which puts the dots
# of eager's cuBLAS and of the triton kernels on the tensor cores. Only the benchmarks whose
# marker names it (``tf32_sizes``: the hinge fwd+bwd at the epoch batch, where IEEE dots bound the
# kernels) and only the providers with a TF32 path.
TF32 = "tf32"
TF32_PROVIDERS = ("eager", "triton")
PRECISION_NAMES = ("fp32", "bf16", TF32, "fp16")  # every --lrml-dtypes name, in run order

TOPK_K = 10
TOPK_EXCLUDED_PER_USER = 50
NAIVE_TOPK_CHUNK = 64  # users per chunk of the materialising baseline ([64, I, d])
EPOCH_POSITIVES = 100_480_507  # Netflix Prize training ratings
EPOCH_NEGATIVES = 1
EPOCH_BATCH = 1 << 20
LR = 1e-3


def parse_sizes(spec: str) -> tuple[Size, ...]:
    """``"smoke"``, ``"full"`` or a comma list of size names -> sizes, in the order given."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        for name in PRESETS.get(part, (part,)):
            if name not in SIZES:
                raise ValueError(
                    f"unknown size {name!r}: use one of {sorted(PRESETS) + sorted(SIZES)}"
                )
            if name not in names:
                names.append(name)
    return tuple(SIZES[n] for n in names)


@dataclasses.dataclass(frozen=True)
class Case:
    """Where and at which size a benchmark runs."""

    device: str  # "cpu" or "cuda"
    size: Size
    dtype: torch.dtype
    tf32: bool = False  # fp32 tables timed at matmul precision "high" (TF32)

    @property
    def dtype_name(self) -> str:
        return TF32 if self.tf32 else DTYPE_NAMES[self.dtype]

    @property
    def id(self) -> str:
        return f"{self.device}-{self.size.name}-{self.dtype_name}"

    @property
    def topk_users(self) -> int:
        n = self.size.topk_users_gpu if self.device == "cuda" else self.size.topk_users_cpu
        return min(n, self.size.U)


# ----------------------------------------------------------------------------------------------
# Settings (filled in by conftest.py from the command line)

SETTINGS = {
    "disabled": False,  # --benchmark-disable: run each callable once, no timing
    "budget_s": 1.0,  # CPU: target seconds of timed rounds per benchmark
    "max_rounds": 50,
    "gpu_rep_ms": 200.0,  # do_bench repetition time per benchmark
    "jsonl": None,  # --lrml-jsonl: append every record here as it is measured
    "copy_gbps": None,  # measured device copy bandwidth (read + write), GB/s
    "malloc": "system",  # --lrml-malloc, as set_malloc_mode applied it
    "gpu_baseline_topk_users": 32_768,  # baselines rank this many users, then extrapolate
    "cap_s": None,  # --lrml-cap: seconds one provider may spend on one slow workload
    "deadline": None,  # --lrml-deadline, as time.monotonic(): no benchmark starts after it
}
DEFAULT_EPOCH_CAP_S = 15.0  # an epoch's wall-clock cap without --lrml-cap (with it: half the cap)


def capped_units(total: int, probe_units: int, probe_s: float, cap: float) -> int:
    """How many of ``total`` units (users, steps) to time so that one call takes about ``cap``
    seconds, from a probe that did ``probe_units`` in ``probe_s``: at least the probe's units."""
    per_unit = max(probe_s, 1e-9) / max(probe_units, 1)
    return max(min(probe_units, total), min(total, int(cap / per_unit)))


def synchronized_clock(device: str) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


OUT_OF_TIME = "out of time"  # how a benchmark skipped past the deadline says so (report.py)


COMPILE_RESERVE_S = 20.0  # a compile peer starts only this long before the deadline or earlier
# The train loop's first case of a size builds and splits its synthetic data (Netflix: ~10-25 s
# of CPU) before anything is timed; it starts only this long before the deadline or earlier. The
# later cases of the size reuse the data: they need LOOP_RESERVE_S.
LOOP_SETUP_RESERVE_S = {"netflix": 45.0, "small": 10.0}
LOOP_RESERVE_S = 10.0
LOOP_DATA_READY: set[str] = set()  # sizes whose train-loop data is built (bench_train_loop)


def start_reserve_s(test: str, provider: str | None, size: str) -> float:
    """Seconds a benchmark needs before the run's deadline to start at all: a compile peer
    COMPILE_RESERVE_S, the train loop its data set-up (first case of a size) or LOOP_RESERVE_S,
    any other none (the deadline already leaves the longest capped one)."""
    if provider == "compile":
        return COMPILE_RESERVE_S
    if test == "test_train_loop":
        if size in LOOP_DATA_READY:
            return LOOP_RESERVE_S
        return LOOP_SETUP_RESERVE_S.get(size, LOOP_RESERVE_S)
    return 0.0


def out_of_time(need_s: float = 0.0) -> bool:
    """True once the ``--lrml-deadline`` of the run is less than ``need_s`` seconds away."""
    return SETTINGS["deadline"] is not None and time.monotonic() + need_s > SETTINGS["deadline"]


# ----------------------------------------------------------------------------------------------
# The allocator: every provider measured in its steady state
#
# glibc serves a block at least its mmap threshold (dynamic, up to 32 MB) with a fresh mmap() and
# gives the heap top back above twice that. A provider that allocates and frees ~8 MB tensors
# every call (every one here on the Netflix batch) then page-faults on them in some calls and not
# in others, depending on the heap's history: the eager hinge fwd+bwd (shared) took 6.3 ms in some
# rounds and 10 ms in others of the same benchmark, and medians moved by 30 % between runs.
# "steady" fixes both thresholds so that freed blocks are reused, as a caching allocator
# (jemalloc, tcmalloc: PyTorch's CPU tuning guide) would: the times are the work, not the faults.

MALLOC_MODES = ("steady", "system")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's largest
STEADY_TRIM_THRESHOLD = 1 << 30


def set_malloc_mode(mode: str) -> str:
    """Apply ``mode`` (MALLOC_MODES) to this process; returns what the run records."""
    if mode == "system":
        return "system"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "system (no glibc mallopt here)"
    ok = mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD) == 1 and ok
    if not ok:
        return "system (mallopt refused)"
    return (
        f"steady (glibc mmap threshold {STEADY_MMAP_THRESHOLD >> 20} MB, "
        f"trim threshold {STEADY_TRIM_THRESHOLD >> 20} MB)"
    )


# ----------------------------------------------------------------------------------------------
# Providers
#
#   eager         the plain-PyTorch way (the reference ops; for the train step dense gradients +
#                 torch.optim.Adam; for top-k the chunked materialising [64, I, d] scorer)
#   eager-sparse  train step only: sparse embedding gradients + torch.optim.SparseAdam
#   compile       torch.compile of the eager provider (sparse-gradient workloads: the row math is
#                 compiled, the sparse gather stays eager: inductor cannot compile sparse grads)
#   torch         lrml_kernels' "torch" backend (top-k: the reference's [B, I, N] rewrite; train
#                 step: the fused LRMLTrainer over the torch backend)
#   cpu/triton/cuda  lrml_kernels' backends (train step: LRMLTrainer on a model of that backend)
#   triton-graph  train step only: the triton LRMLTrainer with cuda_graph=True (CUDA only)

PROVIDERS = ("eager", "eager-sparse", "compile", "torch", "cpu", "triton", "triton-graph", "cuda")
BACKEND_PROVIDERS = ("torch", "cpu", "triton", "cuda")
BASELINE = "eager"


@functools.cache
def _why_not(provider: str, device: str) -> str | None:
    if provider in ("eager", "eager-sparse"):
        return None
    if provider == "compile":
        if not hasattr(torch, "compile"):
            return "torch.compile is not in this torch"
        return None
    if provider == "triton-graph":  # train step: the triton trainer captured as a CUDA graph
        if device != "cuda":
            return "CUDA graphs need a CUDA device"
        return backends.why_unavailable("triton", device)
    if provider == "triton" and device == "cpu":
        return "the Triton interpreter is not a performance provider (triton runs on CUDA only)"
    if provider in BACKEND_PROVIDERS:
        return backends.why_unavailable(provider, device)
    raise ValueError(f"unknown provider {provider!r}")


def require(provider: str, device: str) -> None:
    """Skip the current test, with the reason, if ``provider`` cannot run on ``device`` here."""
    import pytest

    reason = _why_not(provider, device)
    if reason:
        pytest.skip(f"{provider} on {device}: {reason}")


def why_not_tf32(provider: str) -> str | None:
    """Why ``provider`` is not timed in the tf32 rows (None: it is)."""
    if provider in TF32_PROVIDERS:
        return None
    if provider == "cuda":
        return "tf32: the CUDA kernels have no TF32 path"
    return f"tf32 rows time {' and '.join(TF32_PROVIDERS)} only"


def trainer_class():
    """``lrml_kernels.LRMLTrainer``, or skip the test saying why it is not there."""
    import pytest

    cls = getattr(lk, "LRMLTrainer", None)
    if cls is None:
        try:
            from lrml_kernels.trainer import LRMLTrainer as cls  # noqa: N813
        except ImportError as exc:
            pytest.skip(f"the fused trainer lrml_kernels.LRMLTrainer is not there yet ({exc})")
    return cls


# ----------------------------------------------------------------------------------------------
# Inputs


def _generator(device: str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def tables(case: Case):
    """The four parameters (P, Q, K, M) of ``case``: leaf tensors that require grad.

    Normal with std 1/sqrt(d) (as ``lrml_kernels.LRML``), drawn in place (no temporaries), seeded.
    Shared by every provider of a case, and by the sizes with the same tables (netflix and
    netflix-epoch); one set of tables is kept at a time.
    """
    s = case.size
    return _tables(case.device, s.U, s.I, s.d, s.N, case.dtype)


@functools.lru_cache(maxsize=1)
def _tables(dev: str, U: int, I: int, d: int, N: int, dtype: torch.dtype):  # noqa: N803
    g = _generator(dev, 1234)
    out = []
    for rows in (U, I, N, N):
        t = torch.empty(rows, d, device=dev, dtype=torch.float32)
        t.normal_(0.0, 1.0 / math.sqrt(d), generator=g)
        out.append(t.to(dtype).requires_grad_(True))
    return tuple(out)


def batch(case: Case, rows: int | None = None, cols: int | None = None, seed: int = 7):
    """Random ``users [B]`` and ``items [B, C]`` (int64) on the case's device."""
    s = case.size
    rows = s.B if rows is None else rows
    cols = s.C if cols is None else cols
    g = _generator(case.device, seed)
    users = torch.randint(0, s.U, (rows,), device=case.device, generator=g)
    items = torch.randint(0, s.I, (rows, cols), device=case.device, generator=g)
    return users, items


def topk_inputs(case: Case, users: int | None = None, seed: int = 11):
    """Users to rank (``arange``) and a CSR exclusion list of ~50 random items per user."""
    s = case.size
    n = case.topk_users if users is None else users
    per_user = min(TOPK_EXCLUDED_PER_USER, max(1, s.I // 10))
    g = _generator(case.device, seed)
    u = torch.arange(n, device=case.device)
    excl = torch.randint(0, s.I, (n, per_user), device=case.device, generator=g)
    excl = excl.sort(dim=1).values.reshape(-1)  # sorted per row; repeats are allowed
    indptr = torch.arange(0, n * per_user + 1, per_user, device=case.device, dtype=torch.int64)
    return u, (indptr, excl)


def clear_grads(params) -> None:
    for t in params:
        t.grad = None


# ----------------------------------------------------------------------------------------------
# Baselines that plain PyTorch users write


def rows_hinge(p, q, keys, memory, relation: str):
    """The reference's hinge loss on gathered rows (what ``compile`` compiles)."""
    D = reference.distances_from_rows(p, q, keys, memory, relation=relation)
    return reference.hinge_from_distances(D, 0.5, "sum")


def naive_chunk_distances(p, item_emb, keys, memory, eps: float = 1e-3):
    """Distances of users ``p [c, d]`` to every item through ``[c, I, d]`` (the direct formula)."""
    s = p[:, None, :] * item_emb[None]  # [c, I, d]
    a = torch.softmax(s @ keys.T, dim=-1)  # [c, I, N]
    e = p[:, None, :] + a @ memory - item_emb[None]  # [c, I, d]
    return torch.sqrt((e * e).sum(-1) + eps)  # [c, I]


def naive_topk(user_emb, item_emb, keys, memory, users, k, exclude, score=naive_chunk_distances):
    """Top-k the way public reimplementations do it: chunks of 64 users scored against every
    item through a ``[64, I, d]`` tensor, excluded items set to +inf, then ``torch.topk``."""
    indptr, indices = exclude
    bounds = indptr.tolist()  # one host copy, not one sync per chunk
    out_d, out_i = [], []
    with torch.no_grad():
        for start in range(0, users.shape[0], NAIVE_TOPK_CHUNK):
            u = users[start : start + NAIVE_TOPK_CHUNK]
            D = score(user_emb[u], item_emb, keys, memory)
            counts = indptr[start + 1 : start + 1 + u.shape[0]] - indptr[start : start + u.shape[0]]
            rows = torch.repeat_interleave(torch.arange(u.shape[0], device=u.device), counts)
            D[rows, indices[bounds[start] : bounds[start + u.shape[0]]]] = float("inf")
            d, i = torch.topk(D, k, dim=1, largest=False, sorted=True)
            out_d.append(d)
            out_i.append(i)
    return torch.cat(out_d), torch.cat(out_i)


@functools.cache
def compiled(fn):
    """``torch.compile(fn)``, specialised to its shapes (no dynamic recompiles), made once per
    function: every case and provider of a workload that calls it (the hinge fwd+bwd and the
    train step share ``rows_hinge``) reuses its graphs, and a new shape compiles one more.

    A compiled function that hits the recompile limit silently falls back to eager, which would
    time the wrong thing: the limit is raised, and where this torch can, hitting it raises.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # old
    setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------
# Byte models (for GB/s): the fewest bytes each workload must move through memory


def gathered_row_bytes(case: Case, rows: int, cols: int) -> int:
    """Bytes of the gathered P and Q rows of a ``[rows, cols]`` batch, each read once."""
    return rows * (1 + cols) * case.size.d * _itemsize(case.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def index_bytes(rows: int, cols: int) -> int:
    return rows * (1 + cols) * 8


# ----------------------------------------------------------------------------------------------
# Timing and records

_BASELINE_TIMES: dict[tuple, float] = {}
_T0 = time.monotonic()
LONG_CALL_S = 0.25  # GPU calls longer than this are timed call by call, not by do_bench


def _time_cpu(benchmark, fn) -> float | None:
    if SETTINGS["disabled"]:
        benchmark(fn)
        return None
    t0 = time.perf_counter()
    fn()  # warm-up (and compilation, for the compile provider)
    first = time.perf_counter() - t0
    rounds = max(3, min(SETTINGS["max_rounds"], math.ceil(SETTINGS["budget_s"] / max(first, 1e-6))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if first < 0.5 else 0)
    benchmark.extra_info["time_min_s"] = benchmark.stats.stats.min
    return benchmark.stats.stats.median


TIMER_DO_BENCH = "cuda events (triton.testing.do_bench median)"
TIMER_SINGLE_CALLS = "cuda events (median of 2 single calls)"  # calls over LONG_CALL_S


def _time_cuda(benchmark, fn) -> tuple[float | None, float | None, str]:
    """(median seconds by CUDA events, peak extra device memory in MB of one call, the timer).

    Calls under ``LONG_CALL_S`` go through ``triton.testing.do_bench``; longer ones (the all-user
    top-k) are timed by events on single calls, so that a 5 s call costs 3 calls, not 15.
    """
    import statistics

    def synced():
        fn()
        torch.cuda.synchronize()

    if SETTINGS["disabled"]:
        benchmark(synced)
        return None, None, TIMER_DO_BENCH
    synced()  # warm-up: compilation, autotuning, allocator
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def event_timed():
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    first = event_timed()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    if first > LONG_CALL_S:
        # One more call, timed by events too; through pytest-benchmark, whose JSON needs stats
        # (its own host clock is not the recorded time).
        second = benchmark.pedantic(event_timed, rounds=1, iterations=1, warmup_rounds=0)
        return statistics.median([first, second]), peak_mb, TIMER_SINGLE_CALLS
    import triton.testing

    # do_bench's repetitions: 200 ms, less under a tight --lrml-cap (cap / 15: a few benchmarks
    # of a workload, each with its warm-up and check, stay inside the cap)
    rep = SETTINGS["gpu_rep_ms"]
    if SETTINGS["cap_s"]:
        rep = min(rep, 1e3 * SETTINGS["cap_s"] / 15)
    t = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    # A few host-timed, synchronised rounds so that pytest-benchmark's own table and JSON have
    # stats too; the recorded time is the event-timed median above.
    benchmark.pedantic(synced, rounds=3, iterations=1, warmup_rounds=0)
    return t / 1e3, peak_mb, TIMER_DO_BENCH


def measure(
    benchmark,
    case: Case,
    provider: str,
    fn,
    *,
    workload: str,
    variant: str = "",
    pairs: int,
    bytes_moved: int | None = None,
    scale: float = 1.0,
    extra: dict | None = None,
):
    """Time ``fn`` (CPU: pytest-benchmark rounds; CUDA: events), then :func:`record_time` it."""
    extra = dict(extra or {})
    if case.device == "cuda":
        t, peak, timer = _time_cuda(benchmark, fn)
        extra.setdefault("timer", timer)
        if peak is not None:
            extra.setdefault("peak_extra_mb", round(peak, 1))
    else:
        t = _time_cpu(benchmark, fn)
        extra.setdefault("timer", "pytest-benchmark rounds (median)")
    return record_time(
        benchmark, case, provider, t, workload=workload, variant=variant, pairs=pairs,
        bytes_moved=bytes_moved, scale=scale, extra=extra,
    )  # fmt: skip


def record_time(
    benchmark,
    case: Case,
    provider: str,
    t: float | None,
    *,
    workload: str,
    variant: str = "",
    pairs: int,
    bytes_moved: int | None = None,
    scale: float = 1.0,
    extra: dict | None = None,
):
    """Write the record of one measurement into ``benchmark.extra_info`` (and the JSONL file).

    ``t``: measured seconds (None when timing is disabled); ``scale`` multiplies it (a subset was
    timed: the record says so in ``extrapolated``); ``pairs`` and ``bytes_moved`` describe the
    full workload.
    """
    info = benchmark.extra_info
    s = case.size
    info.update(
        workload=workload,
        variant=variant,
        provider=provider,
        device=case.device,
        size=s.name,
        dtype=case.dtype_name,
        U=s.U,
        I=s.I,
        d=s.d,
        N=s.N,
        B=s.B,
        C=s.C,
        pairs=pairs,
        threads=torch.get_num_threads(),
        matmul_precision=fp32_matmul_precision(),
        loadavg=round(os.getloadavg()[0], 2),  # a busy machine makes CPU numbers noisy
        cpus=os.cpu_count(),
    )
    info.update(extra or {})
    if t is None:
        return info
    if scale != 1.0:
        info["extrapolated"] = f"timed {1 / scale:.3g} of the work, time scaled by {scale:.3g}"
    t *= scale
    if "time_min_s" in info:
        info["time_min_s"] *= scale
    info["time_s"] = t
    info["pairs_per_s"] = pairs / t
    if bytes_moved:
        info["bytes"] = int(bytes_moved)
        info["gbps"] = bytes_moved / t / 1e9
        if case.device == "cuda" and SETTINGS["copy_gbps"]:
            info["copy_gbps"] = SETTINGS["copy_gbps"]
            info["bw_fraction"] = info["gbps"] / SETTINGS["copy_gbps"]
    key = (workload, variant, case.id)
    if provider == BASELINE:
        _BASELINE_TIMES[key] = t
    if key in _BASELINE_TIMES:
        info["speedup_vs_eager"] = _BASELINE_TIMES[key] / t
    record(info)
    return info


def record(info: dict) -> None:
    """Append one record to the ``--lrml-jsonl`` file (a safety net if the run is cut short)."""
    info.setdefault("done_at_s", round(time.monotonic() - _T0, 2))  # where the run's time went
    path = SETTINGS["jsonl"]
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(info, default=str) + "\n")


def assert_close(actual, expected, dtype: torch.dtype, what: str, tf32: bool = False) -> None:
    """Every provider must compute the same thing as the eager one before it is timed."""
    tol = 1e-2 if tf32 else {torch.float32: 1e-3, torch.float64: 1e-6}.get(dtype, 3e-2)
    a, e = actual.detach().float(), expected.detach().float()
    err = ((a - e).norm() / e.norm().clamp_min(1e-12)).item()
    assert math.isfinite(err) and err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


# ----------------------------------------------------------------------------------------------
# The machine


def git(*args) -> str:
    """The output of ``git ARGS`` in the repository ("" where there is no git or no .git)."""
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


UNKNOWN_COMMIT = "unknown (set LRML_COMMIT)"


def commit_info() -> tuple[str, bool | None]:
    """(the commit measured, whether the tree has uncommitted changes: None if unknown).

    ``LRML_COMMIT`` where set (a tree copied without .git); else git's, but only where this tree
    is the root of its repository: a tree copied into another repository must not be labelled
    with that repository's commit. Uncommitted changes are known only from this tree's own git.
    """
    top = git("rev-parse", "--show-toplevel")
    own = bool(top) and Path(top).resolve() == REPO
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if own else None
    commit = os.environ.get("LRML_COMMIT") or (
        git("rev-parse", "--short=12", "HEAD") if own else ""
    )
    return commit or UNKNOWN_COMMIT, dirty


def measure_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import triton.testing

    x = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).normal_()
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)

    ms = triton.testing.do_bench(copy, warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms / 1e3) / 1e9


def nvidia_smi(*args: str) -> str | None:
    """``nvidia-smi ARGS``'s output, or None where it is missing, fails or hangs (10 s)."""
    try:
        run = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def nvidia_smi_start(*args: str) -> subprocess.Popen | None:
    """``nvidia-smi ARGS`` started in the background (None where it is missing)."""
    try:
        return subprocess.Popen(
            ["nvidia-smi", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    except OSError:
        return None


def _env_main(dry_run: bool, end_at: float | None = None) -> None:
    """Step 1 of the GPU check: versions, the GPU, and the copy bandwidth (``COPY_GBPS=`` line).

    Exit status 3 with a ``NO_DEVICE:`` line when nothing can run: torch sees no CUDA device (the
    dry run: torch cannot be imported, above). Anything else that goes wrong (nvidia-smi, the
    bandwidth) is printed and the status stays 0. ``end_at`` (epoch seconds): no bandwidth
    measurement that could end after it; nvidia-smi is given until then (at most 10 s).
    """
    import platform

    def left() -> float:
        return math.inf if end_at is None else end_at - time.time()

    query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem"
    smi = None if dry_run else nvidia_smi_start(query, "--format=csv")  # (beside the rest)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
        flush=True,
    )
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as exc:
        print(f"triton: not importable ({exc})")
    print(f"lrml_kernels {lk.__version__} (backends are built and probed by the later steps)")
    if dry_run:
        print("DEVICE_OK=cpu (dry run: no GPU used, no bandwidth measurement)")
        return
    if smi is not None:
        try:
            text, _ = smi.communicate(timeout=max(0.5, min(10.0, left() - 10)))
            print(
                text.strip() if smi.returncode == 0 else f"nvidia-smi: exit status {smi.returncode}"
            )
        except subprocess.TimeoutExpired:
            smi.kill()
            print("WARNING: nvidia-smi did not answer in time (left out)")
    else:
        print("nvidia-smi: not found")
    sys.stdout.flush()
    if not torch.cuda.is_available():
        print("NO_DEVICE: torch sees no CUDA device", flush=True)
        sys.exit(3)
    props = torch.cuda.get_device_properties(0)
    gib = props.total_memory / 2**30
    print(f"GPU 0: {props.name}, {props.multi_processor_count} SMs, {gib:.0f} GiB, "
          f"compute capability {props.major}.{props.minor}")  # fmt: skip
    print(f"GPU_MEMORY_GIB={gib:.0f}")
    print("DEVICE_OK=cuda", flush=True)
    if left() < 5:
        print(f"WARNING: no bandwidth measurement: {max(0.0, left()):.0f} s left of the step")
        return
    try:
        gbps = measure_copy_gbps()
    except Exception as exc:  # the check carries on without it (the bench measures it again)
        print(f"WARNING: the bandwidth measurement failed: {type(exc).__name__}: {exc}")
        return
    print(f"device copy bandwidth (1 GiB, read + write): {gbps:.0f} GB/s")
    print(f"COPY_GBPS={gbps:.1f}")


# ----------------------------------------------------------------------------------------------
# Peak memory of one top-k call on the CPU, in a fresh process


def peak_extra_rss_mb(provider: str, size: str, dtype: str = "fp32") -> float:
    """Peak resident memory (MB) one CPU top-k call adds on top of its inputs.

    Method: a fresh Python process with glibc told to return freed memory to the system at once
    (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``, so the resident set tracks live
    allocations), builds the inputs, warms the provider up on one user (JIT build, compilation),
    resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM``
    minus ``VmRSS`` before the call. This counts every allocation of the call: torch tensors, a C++
    extension's own buffers, thread stacks.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "peakmem", provider, size, dtype],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def topk_callable(case: Case, provider: str, user_emb, item_emb, keys, memory, users, exclude,
                  score=None):  # fmt: skip
    """The top-k of ``provider`` as a no-argument callable returning (distances, ids).

    ``score``: for "compile", an already compiled chunk scorer to reuse.
    """
    k = TOPK_K
    if provider == "eager":
        return lambda: naive_topk(user_emb, item_emb, keys, memory, users, k, exclude)
    if provider == "compile":
        score = score or compiled(naive_chunk_distances)
        return lambda: naive_topk(user_emb, item_emb, keys, memory, users, k, exclude, score)
    return lambda: lk.lrml_topk(
        user_emb, item_emb, keys, memory, users, k, exclude=exclude, backend=provider,
        validate=False,
    )  # fmt: skip


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peakmem_main(provider: str, size: str, dtype: str) -> None:
    case = Case("cpu", SIZES[size], DTYPES[dtype])
    with torch.no_grad():
        P, Q, K, M = (t.detach() for t in tables(case))
        users, (indptr, indices) = topk_inputs(case)
        # Warm up on the first chunk of users: JIT build, compilation (for the real chunk shape).
        w = min(NAIVE_TOPK_CHUNK, users.shape[0])
        warm_x = (indptr[: w + 1].clone(), indices[: int(indptr[w])].clone())
        score = compiled(naive_chunk_distances) if provider == "compile" else None
        topk_callable(case, provider, P, Q, K, M, users[:w], warm_x, score)()
        fn = topk_callable(case, provider, P, Q, K, M, users, (indptr, indices), score)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
    print((peak - before) / 1024.0)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "peakmem":
        _peakmem_main(*sys.argv[2:])
    elif sys.argv[1:2] == ["env"]:
        import argparse

        ap = argparse.ArgumentParser(prog="benchlib.py env")
        ap.add_argument("--dry-run", action="store_true")
        ap.add_argument("--end-at", type=float, default=None, help="epoch seconds")
        env_args = ap.parse_args(sys.argv[2:])
        _env_main(dry_run=env_args.dry_run, end_at=env_args.end_at)
    else:
        sys.exit(
            "usage: benchlib.py peakmem PROVIDER SIZE DTYPE | "
            "benchlib.py env [--dry-run] [--end-at EPOCH]"
        )
