"""Where the GPU time goes: torch.profiler over a training step and a hinge fwd+bwd per backend.

    python benchmarks/profile_gpu.py OUT.md [--device cuda|cpu] [--size netflix|tiny]
                                     [--backends torch,triton,cuda] [--time-limit SECONDS]
                                     [--end-at UNIX_TIME]

For each backend that runs here (default: torch, triton, cuda on CUDA; torch, cpu on the CPU),
on generated tables of the size (netflix: 480,189 x 17,770, d = 100, N = 20; no data files):

  hinge fwd+bwd   ``lrml_hinge_loss`` (relation pair, sparse gradients) + backward,
                  at B = 4096 x 5 and at the epoch's batch B = 2^20 x 2 (the sizes netflix and
                  netflix-epoch of benchlib; tiny: 256 x 5 and 4096 x 2); at the epoch's batch
                  also "torch-tf32" and "triton-tf32": the same backend at torch's fp32 matmul
                  precision "high" (TF32 dots: cuBLAS's and the Triton kernels' tensor cores)
  train step      ``LRMLTrainer(model, optimizer="adam")`` on a model of that backend, B = 4096 x 5;
                  on CUDA with triton also "triton-graph": the same step with ``cuda_graph=True``
                  (captured in the warm-up, replayed in the profile: the graph's kernels)
  negatives       the train step's ``sample_negatives`` (B = 4096 users x 4) checked in a CSR of
                  training items of Netflix's shape (:func:`training_csr`): "triton" is the
                  Triton sampler, "torch" the torch ops (a host sync per round), "cpu" the C++
                  extension's membership test; the cuda backend has no sampler of its own

each called twice to warm up (compilation, autotuning, allocator), then:

- profiled over ``CALLS`` calls with ``torch.profiler`` (CPU activity, and CUDA where there is
  one): the table of kernels by device time (on the CPU: operators by self CPU time);
- kernel launches per call: the device kernels in the trace (memcpy and memset counted apart);
- host synchronisations per call: the warnings ``torch.cuda.set_sync_debug_mode("warn")`` raises
  over one more call (only synchronisations through torch's API: a raw ``cudaMemcpy`` in an
  extension is not seen); the wall time of that call.

The work runs in the order hinge B = 4096, train step, negatives, hinge B = 2^20 (each for every
backend that has it) and OUT.md is rewritten after each piece, so a run cut short keeps what was
done. A piece that would start after ``--time-limit`` (seconds from the start) or ``--end-at`` (a
Unix time: the start-up counts too), or with less time left than twice the longest piece so far,
is listed as "not profiled: out of time", never dropped silently. Exit status 0 when every piece of
every available backend was profiled, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

import benchlib as bl
import torch
from report import fmt_time, short_reason

import lrml_kernels as lk
from lrml_kernels import backends
from lrml_kernels.precision import using_fp32_matmul_precision

CALLS = 3  # profiled calls per piece
# Netflix's ratings per user: median about 96, mean 209 (100.5 M / 480,189): a log-normal with both
RATINGS_MEDIAN, RATINGS_MEAN = 96, 209
WARMUP = 2
TOP = 12  # rows of each kernel table
DEFAULT_BACKENDS = {"cuda": ("torch", "triton", "cuda"), "cpu": ("torch", "cpu")}
TF32 = "-tf32"  # a backend name's suffix: the piece runs at fp32 matmul precision "high"
TF32_BACKENDS = ("torch", "triton")  # (the cuda backend has no TF32 path)


@dataclasses.dataclass
class Piece:
    """One (workload, batch, backend) to profile, and what came of it."""

    workload: str  # "hinge fwd+bwd", "train step" or "negatives"
    size: bl.Size  # the batch (B, C) and the tables
    backend: str
    result: dict | None = None
    skipped: str | None = None  # why it was not profiled

    @property
    def batch(self) -> str:
        cols = self.size.C - 1 if self.workload == "negatives" else self.size.C
        return f"B={self.size.B:,}×{cols}"


def _call(piece: Piece, device: str, dtype: torch.dtype):
    """The no-argument callable that does one call of ``piece``."""
    case = bl.Case(device, piece.size, dtype)
    users, items = bl.batch(case)
    if piece.workload == "train step":
        s = case.size
        graph = piece.backend == "triton-graph"  # the triton step captured as one CUDA graph
        backend = "triton" if graph else piece.backend
        model = lk.LRML(s.U, s.I, s.d, s.N, backend=backend, device=device, dtype=dtype,
                        validate=False)  # fmt: skip
        trainer = lk.LRMLTrainer(model, optimizer="adam", lr=bl.LR, cuda_graph=graph)
        return trainer.step, (users, items)
    if piece.workload == "negatives":
        s = case.size
        csr = training_csr(s.U, s.I, device)
        gen = torch.Generator(device).manual_seed(0)
        paths = {
            "triton": {"use_triton": True},
            "torch": {"use_triton": False, "use_extension": False},
            "cpu": {"use_triton": False, "use_extension": True},
        }

        def negatives(users):
            return lk.data.sample_negatives(users, s.I, s.C - 1, generator=gen, exclude_csr=csr,
                                            **paths[piece.backend])  # fmt: skip

        return negatives, (users,)
    params = bl.tables(case)
    backend = piece.backend.removesuffix(TF32)

    def hinge(users, items):
        bl.clear_grads(params)
        loss = lk.lrml_hinge_loss(*params, users, items, relation="pair", backend=backend,
                                  sparse_grad=True, validate=False)  # fmt: skip
        loss.backward()
        return loss

    return hinge, (users, items)


def training_csr(num_users: int, num_items: int, device: str, seed: int = 5):
    """``(indptr, indices)`` int64, each row strictly ascending (as ``Split.train_csr()``):
    per-user counts log-normal with Netflix's median and mean (~100 M entries at Netflix size),
    random items, repeats dropped."""
    g = torch.Generator(device).manual_seed(seed)
    sigma = math.sqrt(2 * math.log(RATINGS_MEAN / RATINGS_MEDIAN))
    z = torch.randn(num_users, generator=g, device=device, dtype=torch.float64)
    counts = (math.log(RATINGS_MEDIAN) + sigma * z).exp().clamp(1, num_items).long()
    rows = torch.repeat_interleave(torch.arange(num_users, device=device), counts)
    keys = rows * num_items + torch.randint(0, num_items, rows.shape, generator=g, device=device)
    keys = keys.sort().values.unique_consecutive()
    counts = torch.bincount(keys // num_items, minlength=num_users)
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0)), keys % num_items


def _device_events(prof) -> list:
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in prof.events() if e.device_type == cuda]


def _is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def _count_syncs(fn, args, device: str) -> tuple[int | None, float]:
    """(host synchronisations of one call by torch's sync debug mode, the call's wall seconds)."""
    counted = device == "cuda" and hasattr(torch.cuda, "set_sync_debug_mode")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = bl.synchronized_clock(device)
        if counted:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args)
        finally:
            if counted:
                torch.cuda.set_sync_debug_mode("default")
        took = bl.synchronized_clock(device) - t0
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return (syncs if counted else None), took


def profile_piece(piece: Piece, device: str, dtype: torch.dtype) -> dict:
    with using_fp32_matmul_precision("high" if piece.backend.endswith(TF32) else None):
        return _profile(piece, device, dtype)


def _profile(piece: Piece, device: str, dtype: torch.dtype) -> dict:
    fn, args = _call(piece, device, dtype)
    for _ in range(WARMUP):
        fn(*args)
    bl.synchronized_clock(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(CALLS):
            fn(*args)
        bl.synchronized_clock(device)
    syncs, wall = _count_syncs(fn, args, device)
    rows: dict[str, list] = {}  # name -> [count, microseconds]
    if device == "cuda":
        events = _device_events(prof)
        for e in events:
            r = rows.setdefault(e.name, [0, 0.0])
            r[0] += 1
            r[1] += e.time_range.elapsed_us()
        launches = sum(1 for e in events if not _is_copy(e.name))
        copies = len(events) - launches
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                rows[e.key] = [e.count, float(e.self_cpu_time_total)]
        launches = sum(n for name, (n, _) in rows.items() if name.startswith("aten::"))
        copies = None
    total = sum(us for _, us in rows.values())
    table = sorted(rows.items(), key=lambda kv: -kv[1][1])
    return {
        "time_per_call_us": total / CALLS, "launches": launches / CALLS,
        "copies": None if copies is None else copies / CALLS, "syncs": syncs, "wall_s": wall,
        "table": [(name, n / CALLS, us / CALLS, us / total if total else 0.0)
                  for name, (n, us) in table[:TOP]],
        "rows": len(table),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Markdown


def _us(us: float) -> str:
    return fmt_time(us / 1e6)


def markdown(pieces: list[Piece], header: str, device: str, unavailable: dict[str, str]) -> str:
    cpu = device != "cuda"
    time_col = "CPU time / call (self, all ops)" if cpu else "device time / call"
    count_col = "aten ops / call" if cpu else "kernels / call (+ memcpy/memset)"
    out = [header, ""]
    out += [f"| backend | workload | batch | {time_col} | {count_col} | host syncs / call | "
            "wall / call | top entry (share) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in pieces:
        r = p.result
        if r is None:
            why = p.skipped or "not profiled yet (the run stopped)"
            out.append(f"| {p.backend} | {p.workload} | {p.batch} | {why} | | | | |")
            continue
        count = f"{r['launches']:.0f}"
        if r["copies"]:
            count += f" (+ {r['copies']:.0f})"
        syncs = f"{r['syncs']}" if r["syncs"] is not None else "n/a (CPU)" if cpu else "n/a"
        top = "—"
        if r["table"]:
            top = f"`{short_reason(r['table'][0][0], 50)}` ({r['table'][0][3]:.0%})"
        out.append(f"| {p.backend} | {p.workload} | {p.batch} | {_us(r['time_per_call_us'])} | "
                   f"{count} | {syncs} | {fmt_time(r['wall_s'])} | {top} |")  # fmt: skip
    for name, why in unavailable.items():
        out.append(f"| {name} | — | — | unavailable: {short_reason(why, 120)} | | | | |")
    out.append("")
    for p in pieces:
        if p.result is None:
            continue
        r = p.result
        what = "operators by self CPU time" if cpu else "kernels by device time"
        out += [f"### {p.backend} · {p.workload} · {p.batch}: {what} (top {TOP} of "
                f"{r['rows']})", "", "| name | calls / call | time / call | share |",
                "|---|---|---|---|"]  # fmt: skip
        out += [f"| `{short_reason(n, 90)}` | {c:.3g} | {_us(us)} | {share:.1%} |"
                for n, c, us, share in r["table"]]  # fmt: skip
        out.append("")
    return "\n".join(out)


def _header(device: str, size: bl.Size, dtype: torch.dtype) -> str:
    import platform

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    if device == "cuda":
        where = f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({platform.machine()}, {os.cpu_count()} cores): a dry run of the logic"
    commit, dirty = bl.commit_info()
    commit += {True: " (with uncommitted changes)", None: " (uncommitted changes: unknown)"}.get(
        dirty, ""
    )
    return (
        f"## Profile: {where}\n\ntorch {torch.__version__}, triton {tv}, Python "
        f"{platform.python_version()}, commit `{commit}`. Tables {size.name} "
        f"({size.U:,}×{size.I:,}, d={size.d}, N={size.N}, {bl.DTYPE_NAMES[dtype]}), generated; "
        f"distance l2, relation pair; hinge with sparse embedding gradients; a backend named "
        f'`…{TF32}` runs at fp32 matmul precision "high" (TF32 dots). {WARMUP} warm-up '
        f"calls, then {CALLS} profiled calls (per-call figures are their mean) and one call "
        'under `torch.cuda.set_sync_debug_mode("warn")` (host syncs, wall time).'
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the Markdown file to write")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--size", choices=("netflix", "tiny"), default="netflix")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--backends", help="comma list (default: by device)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run")
    ap.add_argument(
        "--end-at", type=float, default=None,
        help="Unix time by which the run ends (the GPU check's: the start-up counts too)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    if args.end_at is not None:  # (the earlier of the two)
        left = args.end_at - time.time()
        args.time_limit = left if args.time_limit is None else min(args.time_limit, left)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_gpu.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    names = args.backends.split(",") if args.backends else DEFAULT_BACKENDS[args.device]
    unavailable = {}
    usable = []
    for name in names:
        why = backends.why_unavailable(name, args.device)
        if why:
            unavailable[name] = why
        else:
            usable.append(name)
    small, big = bl.SIZES[args.size], bl.SIZES[f"{args.size}-epoch"]
    dtype = bl.DTYPES[args.dtype]
    pieces = [Piece(w, s, b) for w, s in (("hinge fwd+bwd", small), ("train step", small),
                                          ("negatives", small), ("hinge fwd+bwd", big))
              for b in usable if w != "negatives" or b != "cuda"]  # fmt: skip
    if args.device == "cuda" and "triton" in usable:  # the step as a replayed CUDA graph
        at = 1 + max(i for i, p in enumerate(pieces) if p.workload == "train step")
        pieces.insert(at, Piece("train step", small, "triton-graph"))
    if dtype == torch.float32:  # last: the epoch's batch with TF32 dots
        pieces += [Piece("hinge fwd+bwd", big, b + TF32) for b in TF32_BACKENDS if b in usable]
    header = _header(args.device, small, dtype)
    out = Path(args.out)
    longest = 1.0
    for p in pieces:
        left = None if args.time_limit is None else args.time_limit - (time.monotonic() - t_start)
        if left is not None and left < 2 * longest:
            p.skipped = f"not profiled: out of time ({left:.0f} s of --time-limit left)"
            print(f"{p.backend} · {p.workload} · {p.batch}: {p.skipped}", flush=True)
            continue
        t0 = time.monotonic()
        try:
            p.result = profile_piece(p, args.device, dtype)
        except Exception as exc:  # one backend's failure must not hide the others' profiles
            p.skipped = f"FAILED: {type(exc).__name__}: {short_reason(str(exc), 200)}"
        took = time.monotonic() - t0
        longest = max(longest, took)
        print(f"{p.backend} · {p.workload} · {p.batch}: {p.skipped or 'profiled'} ({took:.1f} s)",
              flush=True)  # fmt: skip
        out.write_text(markdown(pieces, header, args.device, unavailable))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    out.write_text(markdown(pieces, header, args.device, unavailable))
    done = sum(p.result is not None for p in pieces)
    print(f"profiled {done} of {len(pieces)} pieces, {len(unavailable)} backend(s) unavailable; "
          f"wrote {out}")  # fmt: skip
    return 0 if done == len(pieces) else 1


if __name__ == "__main__":
    sys.exit(main())
