"""Turn a benchmark run into a Markdown table (and a PNG bar chart of the speedups).

    python benchmarks/report.py RUN.json [--markdown OUT.md] [--png OUT.png] [--require P,Q]
                                         [--status TEXT] [--title TEXT] [--partial RUN.jsonl]

RUN is the ``--benchmark-json`` file of ``pytest benchmarks/`` or the ``--lrml-jsonl`` file of the
same run (written as it goes, so it survives a run that was cut short). One table row per
(device, workload, variant, size, dtype), one column per provider: the time and the speedup over
the row's ``eager`` provider; on the GPU also the achieved GB/s and its fraction of the measured
copy bandwidth. Below it, every target of the issues with its measured ratio and a verdict.

The table is headed INCOMPLETE (with ``--status`` in front) when a provider named by
``--require`` measured nothing, benchmarks were skipped "out of time" (the run's deadline) or
failed, a result has no valid time (NaN, 0: listed under "Not measured", not tabulated), or the
run ended early: a ``--lrml-jsonl`` record without its closing line (cut short) or a run whose
pytest was interrupted or left benchmarks unrun. ``--partial PATH`` (the GPU check: the run's
``--lrml-jsonl`` record) is read when RUN is missing or unreadable, and says so in the heading.
With ``--markdown``, a file is written even when nothing can be read: the INCOMPLETE heading and
why, no numbers.

Exit status: 0; 2 for unreadable input; 3 when a provider named by ``--require`` measured
nothing (the reasons it was skipped are printed) or the run holds no results. Without matplotlib
the PNG is skipped with a warning, never an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

PROVIDERS = ("eager", "eager-sparse", "compile", "torch", "cpu", "triton", "triton-graph", "cuda")
WORKLOADS = (
    "distances fwd", "hinge fwd", "hinge fwd+bwd", "train step", "train loop", "epoch", "topk",
)  # fmt: skip
SIZES = ("tiny", "tiny-epoch", "small", "netflix", "netflix-epoch")
DTYPES = ("fp32", "bf16", "tf32", "fp16")
DEVICES = ("cpu", "cuda")
BASELINE = "eager"
OUT_OF_TIME = "out of time"  # the reason of a benchmark skipped past the run's deadline

# What each provider column means, per workload (printed under the table).
PROVIDER_NOTES = {
    "distances/hinge": "eager = the reference (`lrml_kernels.reference`, sparse embedding "
    "gradients for fwd+bwd); compile = `torch.compile` of it (fwd+bwd: the sparse gather stays "
    "eager, inductor cannot emit sparse gradients); cpu/triton/cuda = `lrml_kernels` backends",
    "train step / epoch": "eager = dense gradients + `torch.optim.Adam`; eager-sparse = "
    "`sparse=True` + `torch.optim.SparseAdam`; compile = eager-sparse with the row math "
    "compiled; every baseline projects its touched rows; torch/cpu/triton/cuda = "
    '`lrml_kernels.LRMLTrainer(optimizer="adam")` on a model of that backend; triton-graph = '
    "the triton trainer with `cuda_graph=True` (the step replayed as one CUDA graph)",
    "topk": "eager = chunks of 64 users materialising `[64, I, d]` + `torch.topk` (what public "
    "reimplementations do); compile = `torch.compile` of that chunk scorer; torch = the "
    "reference's exact `[B, I, N]` rewrite; cpu/triton/cuda = `lrml_topk` of that backend",
}

# The targets of the issues, checked against the rows of the run.
TARGETS = [
    {
        "what": "CPU fwd+bwd, Netflix tables, B=4096×5, {variant}: {provider} ≥ {ratio}× eager",
        "device": "cpu", "workload": "hinge fwd+bwd", "variants": ("pair", "shared"),
        "size": "netflix", "dtype": "fp32", "providers": ("cpu",), "vs": ("eager",), "ratio": 4,
    },
    {
        "what": "CPU fwd+bwd, Netflix tables, B=4096×5, {variant}: {provider} ≥ {ratio}× compile",
        "device": "cpu", "workload": "hinge fwd+bwd", "variants": ("pair", "shared"),
        "size": "netflix", "dtype": "fp32", "providers": ("cpu",), "vs": ("compile",), "ratio": 2,
    },
    {
        "what": "CPU train step, Netflix tables: fused trainer ({provider}) ≥ {ratio}× eager "
        "dense Adam",
        "device": "cpu", "workload": "train step", "variants": ("adam",), "size": "netflix",
        "dtype": "fp32", "providers": ("cpu",), "vs": ("eager",), "ratio": 10,
    },
    {
        "what": "CPU train step, Netflix tables: fused trainer ({provider}) ≥ {ratio}× best of "
        "eager-sparse / compile (SparseAdam)",
        "device": "cpu", "workload": "train step", "variants": ("adam",), "size": "netflix",
        "dtype": "fp32", "providers": ("cpu",), "vs": ("eager-sparse", "compile"), "ratio": 3,
    },
    {
        "what": "CPU train loop, synthetic Netflix, B=4096×5: {provider} ≥ {min_of_step:.0%} of "
        "its fused step's pairs/s (the step timed beside it)",
        "device": "cpu", "workload": "train loop", "variants": ("adam",), "size": "netflix",
        "dtype": "fp32", "providers": ("cpu",), "min_of_step": 0.8,
    },
    {
        "what": "CPU train loop (as above): {provider} ≥ {ratio}× the pairs/s of the best plain "
        "sparse step (eager-sparse / compile train step, SparseAdam)",
        "device": "cpu", "workload": "train loop", "variants": ("adam",), "size": "netflix",
        "dtype": "fp32", "providers": ("cpu",), "vs_workload": "train step",
        "vs": ("eager-sparse", "compile"), "ratio": 3,
    },
    {
        "what": "CPU top-10, 2,048 users × 17,770 items, ~50 excluded each: {provider} ≥ "
        "{ratio}× the materialising baseline",
        "device": "cpu", "workload": "topk", "variants": None, "size": "netflix", "dtype": "fp32",
        "providers": ("cpu",), "vs": ("eager",), "ratio": 10,
    },
    {
        "what": "CPU top-10 (as above): {provider} peak extra memory ≤ {max_mb} MB",
        "device": "cpu", "workload": "topk", "variants": None, "size": "netflix", "dtype": "fp32",
        "providers": ("cpu",), "max_mb": 256,
    },
    # GPU: the targets of issues 15 (training), 16 (top-k) and 19 (the loop), as they state them
    {
        "what": "GPU fwd+bwd, Netflix tables, B=4096×5, {variant}: {provider} ≥ {ratio}× eager",
        "device": "cuda", "workload": "hinge fwd+bwd", "variants": ("pair", "shared"),
        "size": "netflix", "dtype": "fp32", "providers": ("triton",), "vs": ("eager",),
        "ratio": 10,
    },
    {
        "what": "GPU fwd+bwd, Netflix tables, B=4096×5, {variant}: {provider} ≥ {ratio}× compile",
        "device": "cuda", "workload": "hinge fwd+bwd", "variants": ("pair", "shared"),
        "size": "netflix", "dtype": "fp32", "providers": ("triton",), "vs": ("compile",),
        "ratio": 3,
    },
    {
        "what": "GPU fwd+bwd, Netflix tables, B=2^20×2, {variant}: {provider} ≥ {min_bw:.0%} of "
        "the copy bandwidth (rows read + gradients written)",
        "device": "cuda", "workload": "hinge fwd+bwd", "variants": ("pair", "shared"),
        "size": "netflix-epoch", "dtype": "fp32", "providers": ("triton",), "min_bw": 0.4,
    },
    {
        "what": "GPU train step (Adam), Netflix tables, B=4096×5: {provider} ≥ {ratio}× eager",
        "device": "cuda", "workload": "train step", "variants": ("adam",), "size": "netflix",
        "dtype": "fp32", "providers": ("triton", "triton-graph"), "vs": ("eager",), "ratio": 10,
    },
    {
        "what": "GPU epoch of synthetic Netflix (100M positives, 1 negative, Adam): {provider} ≤ "
        "{max_s} s",
        "device": "cuda", "workload": "epoch", "variants": None, "size": "netflix",
        "dtype": "fp32", "providers": ("triton",), "max_s": 1.0,
    },
    {
        "what": "GPU epoch (as above): {provider} no slower than eager",
        "device": "cuda", "workload": "epoch", "variants": None, "size": "netflix",
        "dtype": "fp32", "providers": ("cuda",), "vs": ("eager",), "ratio": 1,
    },
    {
        "what": "GPU top-10 for all 480,189 users × 17,770 items: {provider} ≤ {max_s} s",
        "device": "cuda", "workload": "topk", "variants": None, "size": "netflix",
        "dtype": "fp32", "providers": ("triton",), "max_s": 1.0,
    },
    {
        "what": "GPU top-10 (as above): {provider} ≥ {ratio}× compile",
        "device": "cuda", "workload": "topk", "variants": None, "size": "netflix",
        "dtype": "fp32", "providers": ("triton",), "vs": ("compile",), "ratio": 10,
    },
    {
        "what": "GPU top-10 (as above): {provider} ≥ {ratio}× the materialising baseline",
        "device": "cuda", "workload": "topk", "variants": None, "size": "netflix",
        "dtype": "fp32", "providers": ("cuda",), "vs": ("eager",), "ratio": 3,
    },
    {
        "what": "GPU top-10 (as above): {provider} extra GPU memory ≤ {max_mb} MB",
        "device": "cuda", "workload": "topk", "variants": None, "size": "netflix",
        "dtype": "fp32", "providers": ("triton",), "max_mb": 2048,
    },
    {
        "what": "GPU train loop, synthetic Netflix, B=4096×5: {provider} ≥ {min_of_step:.0%} of "
        "its fused step's pairs/s (the step timed beside it)",
        "device": "cuda", "workload": "train loop", "variants": ("adam",), "size": "netflix",
        "dtype": "fp32", "providers": ("triton", "cuda"), "min_of_step": 0.8,
    },
]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Loading


def load(path: str | Path, stat: str = "median") -> dict:
    """``{"records": [...], "skipped": [...], "machine": {...}, "commit": {...}}`` of a run.

    ``stat="min"`` reports the fastest CPU round instead of the median one (for a machine shared
    with other work, where load only ever adds time; GPU results are always event-timed medians).
    """
    path = Path(path)
    text = path.read_text()
    records, skipped, machine, commit, end, cut = [], [], {}, {}, None, None
    if path.suffix == ".jsonl":
        lines = [line for line in text.splitlines() if line.strip()]
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # a run killed while it wrote its last record
                    cut = "its last record is cut off"
                    break
                raise
            if "machine" in rec:  # (the first line: benchmarks/conftest.py)
                machine = {"lrml": rec["machine"]}
            elif "end" in rec:  # (the last: the session ended)
                end = rec["end"]
            else:
                (skipped if rec.get("skipped") or rec.get("failed") else records).append(rec)
        if end is None and cut is None:
            cut = "it has no closing line"
    else:
        data = json.loads(text)
        for b in data.get("benchmarks", []):
            rec = dict(b.get("extra_info") or {})
            if "workload" not in rec:
                continue
            rec.setdefault("name", b.get("name", ""))
            if "time_s" not in rec and b.get("stats"):
                rec["time_s"] = b["stats"]["median"]
            records.append(rec)
        skipped = list(data.get("lrml_skipped", []))
        machine = data.get("machine_info", {})
        commit = data.get("commit_info", {})
        end = data.get("lrml_end")
    valid = []
    for r in records:  # a result without a valid time is listed as not measured, not dropped
        t = r.get("time_s")
        if isinstance(t, int | float) and math.isfinite(t) and t > 0:
            valid.append(r)
        else:
            skipped.append({**r, "invalid": True, "reason": f"invalid time_s ({t!r}): no result"})
    records = valid
    if stat == "min":
        for r in records:
            if r.get("time_min_s") and r["device"] == "cpu":
                r["time_s"] = r["time_min_s"]
                r["pairs_per_s"] = r["pairs"] / r["time_s"]
    elif stat != "median":
        raise ValueError(f"stat must be median or min, got {stat!r}")
    return {
        "records": records, "skipped": skipped, "machine": machine, "commit": commit, "stat": stat,
        "end": end, "cut": cut,
    }  # fmt: skip


def load_empty() -> dict:
    """A run with no results."""
    return {"records": [], "skipped": [], "machine": {}, "commit": {}, "stat": "median"}


def incomplete(run: dict, name: str = "the run") -> list[str]:
    """Why ``run`` is incomplete, beyond the providers asked for (one phrase each)."""
    why = []
    if run.get("cut"):
        why.append(f"{name} ends before its run did ({run['cut']}: cut short)")
    end = run.get("end") or {}
    if end.get("exitstatus") == 2:  # pytest's "interrupted"
        why.append("the run was interrupted")
    if end.get("not_run"):
        why.append(f"{end['not_run']} benchmark(s) never ran")
    late = [s for s in run["skipped"] if s.get("reason", "").startswith(OUT_OF_TIME)]
    if late:
        why.append(f"{len(late)} benchmark(s) not run, {OUT_OF_TIME}")
    failed = [s for s in run["skipped"] if s.get("failed")]
    if failed:
        why.append(f"{len(failed)} benchmark(s) failed")
    invalid = [s for s in run["skipped"] if s.get("invalid")]
    if invalid:
        why.append(f"{len(invalid)} result(s) without a valid time")
    return why


def _join(status: str | None, more: str) -> str:
    return f"{status}; {more}" if status else more


def _rank(seq, value) -> int:
    return seq.index(value) if value in seq else len(seq)


def row_key(rec: dict) -> tuple:
    return (rec["device"], rec["workload"], rec.get("variant", ""), rec["size"], rec["dtype"])


def pivot(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows keyed by (device, workload, variant, size, dtype), each ``{provider: record}``."""
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for rec in records:
        rows[row_key(rec)][rec["provider"]] = rec
    order = sorted(
        rows,
        key=lambda k: (
            _rank(DEVICES, k[0]), _rank(WORKLOADS, k[1]), k[2], _rank(SIZES, k[3]),
            _rank(DTYPES, k[4]),
        ),
    )  # fmt: skip
    for row in rows.values():
        base = row.get(BASELINE)
        for rec in row.values():
            if base:
                rec["speedup"] = base["time_s"] / rec["time_s"]
    return {k: rows[k] for k in order}


# ----------------------------------------------------------------------------------------------
# Formatting


def fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} µs"


def fmt_rate(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def shape(rec: dict) -> str:
    if rec["workload"] == "topk":
        return f"{rec.get('users', '?'):,} users × {rec['I']:,} items, k={rec.get('k', '?')}"
    if rec["workload"] == "epoch":
        return f"{rec.get('positives', 0) / 1e6:.1f}M pos × {rec['pairs'] // max(1, rec.get('positives', 1))}, B={rec.get('batch', 0):,}"  # noqa: E501
    return f"B={rec['B']:,}×{rec['C']}"


def tables_label(rec: dict) -> str:
    return f"{rec['size']} ({rec['U']:,}×{rec['I']:,}, d={rec['d']}, N={rec['N']})"


def cell(rec: dict | None) -> str:
    if rec is None:
        return "—"
    parts = [fmt_time(rec["time_s"])]
    if rec.get("extrapolated"):
        parts[0] += "†"
    if "speedup" in rec and rec["provider"] != BASELINE:
        parts.append(f"**{rec['speedup']:.2f}×**")
    if rec["device"] == "cuda" and rec.get("gbps"):
        bw = f"{rec['gbps']:.0f} GB/s"
        if rec.get("bw_fraction"):
            bw += f" ({rec['bw_fraction']:.0%})"
        parts.append(bw)
    if rec["workload"] == "topk" and rec.get("peak_extra_mb") is not None:
        parts.append(f"+{rec['peak_extra_mb']:.0f} MB")
    if rec.get("loop_vs_step"):  # train loop: its pairs/s over the step's, measured beside it
        parts.append(f"{rec['loop_vs_step']:.0%} of the step")
    return " ".join(parts[:1]) + (" · " + " · ".join(parts[1:]) if parts[1:] else "")


def device_header(device: str, machine: dict, commit: dict) -> str:
    lk = machine.get("lrml", {})
    commit_id = lk.get("commit") or (commit.get("id", "")[:12] if commit else "")
    if "dirty" in lk:  # (None: this tree had no git of its own to ask)
        dirty = {True: " (with uncommitted changes)", None: " (uncommitted changes: unknown)"}
        dirty = dirty.get(lk["dirty"], "")
    else:
        dirty = " (with uncommitted changes)" if commit.get("dirty") else ""
    common = (
        f"torch {lk.get('torch', '?')}, triton {lk.get('triton', '?')}, commit "
        f"`{commit_id or '?'}`{dirty}, {lk.get('date', '?')}"
    )
    if device == "cuda":
        bw = lk.get("copy_gbps")
        bw_s = f", measured copy bandwidth {bw:.0f} GB/s (read + write)" if bw else ""
        return (
            f"**GPU: {lk.get('gpu', '?')}** (driver {lk.get('driver', '?')}, CUDA "
            f"{lk.get('cuda', '?')}){bw_s}; {common}"
        )
    malloc = f"; malloc: {lk['malloc']}" if lk.get("malloc") else ""
    return (
        f"**CPU: {lk.get('cpu_model', '?')}**, {lk.get('cpu_count', '?')} cores, "
        f"{lk.get('torch_threads', '?')} torch threads; {common}{malloc}"
    )


def markdown(run: dict, *, title: str | None = None, status: str | None = None) -> str:
    rows = pivot(run["records"])
    out = []
    if title:
        out += [f"## {title}", ""]
    if status:
        out += [f"> **{status}**", ""]
    if run.get("stat") == "min":
        out += ["CPU times are the fastest of each benchmark's rounds (`--stat min`).", ""]
    for device in DEVICES:
        dev_rows = {k: v for k, v in rows.items() if k[0] == device}
        if not dev_rows:
            continue
        providers = [p for p in PROVIDERS if any(p in r for r in dev_rows.values())]
        out += [device_header(device, run["machine"], run["commit"]), ""]
        head = ["workload", "tables", "batch", "dtype", *providers, "best pairs/s"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (_, workload, variant, _, dtype), row in dev_rows.items():
            any_rec = next(iter(row.values()))
            best = max(row.values(), key=lambda r: r["pairs_per_s"])
            name = f"{workload} ({variant})" if variant else workload
            cells = [name, tables_label(any_rec), shape(any_rec), dtype]
            cells += [cell(row.get(p)) for p in providers]
            cells.append(f"{fmt_rate(best['pairs_per_s'])} ({best['provider']})")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        busy = [r for r in run["records"] if r["device"] == device and r.get("loadavg") is not None
                and r["loadavg"] > (r.get("cpus") or 1) + 1]  # fmt: skip
        notes = [
            "Cells: median time · **speedup over eager** (GPU: · achieved GB/s (fraction of the "
            "measured copy bandwidth)); top-k: · peak extra memory. † = timed on a subset, "
            "scaled to the whole workload. pairs/s counts (user, item) pairs scored.",
        ]
        notes += [f"{k}: {v}." for k, v in PROVIDER_NOTES.items()]
        if busy and device == "cpu":
            worst = max(r["loadavg"] for r in busy)
            notes.append(
                f"⚠ {len(busy)} of these results were measured while other processes loaded "
                f"the machine (load average up to {worst:.1f} on {busy[0].get('cpus')} cores): "
                "their absolute times are noisy."
            )
        out += [f"- {n}" for n in notes] + [""]
    skipped = _skip_summary(run["skipped"])
    if skipped:
        out += ["Not measured in this run:", ""]
        out += [f"- {s}" for s in skipped] + [""]
    checks = check_targets(rows, run["skipped"])
    if checks:
        out += ["### Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        out += [f"| {w} | {m} | {v} |" for w, m, v in checks] + [""]
    return "\n".join(out)


def _skip_summary(skipped: list[dict]) -> list[str]:
    by_reason: dict[tuple, set] = defaultdict(set)
    for s in skipped:
        by_reason[(s.get("provider"), s.get("device"), s.get("reason", "").strip())].add(
            s.get("name", "").split("[")[0]
        )
    return [
        f"{prov} on {dev}: {short_reason(reason)} ({len(tests)} benchmarks)"
        for (prov, dev, reason), tests in sorted(by_reason.items(), key=str)
    ]


def short_reason(reason: str, limit: int = 160) -> str:
    """A skip reason on one line (a build error's first lines), at most ``limit`` characters."""
    text = " ".join(line.strip() for line in (reason or "?").splitlines() if line.strip())
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# Targets


def check_targets(rows: dict, skipped: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target whose device and size were in the run."""
    run = {(k[0], k[3]) for k in rows}
    out = []
    for t in TARGETS:
        if (t["device"], t["size"]) not in run:
            continue
        matching = {
            k: v
            for k, v in rows.items()
            if k[0] == t["device"] and k[1] == t["workload"] and k[3] == t["size"]
            and k[4] == t["dtype"] and (t["variants"] is None or k[2] in t["variants"])
        }  # fmt: skip
        variants = t["variants"] or sorted({k[2] for k in matching}) or [""]
        for variant in variants:
            row = next((v for k, v in matching.items() if k[2] == variant), {})
            if "vs_workload" in t:  # the peers are another workload's row of the same shape
                key = (t["device"], t["vs_workload"], variant, t["size"], t["dtype"])
                row = {**rows.get(key, {}), **{p: row[p] for p in t["providers"] if p in row}}
            for provider in t["providers"]:
                what = t["what"].format(variant=variant, provider=provider, **t)
                out.append((what, *_verdict(t, row, provider, skipped)))
    return out


def _verdict(t: dict, row: dict, provider: str, skipped: list[dict]) -> tuple[str, str]:
    rec = row.get(provider)
    if rec is None:
        why = next(
            (short_reason(s["reason"], 100) for s in skipped
             if s.get("provider") == provider and s.get("device") == t["device"]),
            "not in this run",
        )  # fmt: skip
        return "—", f"not measured ({why})"
    if "ratio" in t:
        # Speed over the fastest peer: by time in the same workload, by pairs/s against another
        # workload's peers (their records count other pairs: a step against a whole loop).
        if "vs_workload" in t:
            speed, shown = (lambda r: r["pairs_per_s"]), (lambda r: fmt_rate(r["pairs_per_s"]))
            unit = " pairs/s"
        else:
            speed, shown, unit = (lambda r: 1 / r["time_s"]), (lambda r: fmt_time(r["time_s"])), ""
        peers = [row[p] for p in t["vs"] if p in row]
        if not peers:
            return shown(rec) + unit, f"no {' / '.join(t['vs'])} result to compare with"
        best = max(peers, key=speed)
        ratio = speed(rec) / speed(best)
        measured = f"{ratio:.2f}× ({shown(rec)} vs {best['provider']} {shown(best)}{unit})"
        return measured, _ok(ratio >= t["ratio"])
    if "max_mb" in t:
        mb = rec.get("peak_extra_mb")
        if mb is None:
            return "—", "no memory measurement"
        # a subset's call (--lrml-cap) holds less than the whole workload's would
        note = " (of the timed subset)" if rec.get("extrapolated") else ""
        return f"{mb:.0f} MB{note}", _ok(mb <= t["max_mb"])
    if "min_bw" in t:
        frac = rec.get("bw_fraction")
        if frac is None:
            return "—", "no bandwidth measurement"
        return f"{frac:.0%} ({rec['gbps']:.0f} GB/s)", _ok(frac >= t["min_bw"])
    if "min_of_step" in t:
        frac = rec.get("loop_vs_step")
        if frac is None:
            return "—", "no step timed beside the loop"
        step = fmt_rate(rec["step_pairs_per_s"])
        measured = f"{frac:.0%} ({fmt_rate(rec['pairs_per_s'])} vs {step} pairs/s)"
        return measured, _ok(frac >= t["min_of_step"])
    if "max_s" in t:
        note = " (extrapolated)" if rec.get("extrapolated") else ""
        return fmt_time(rec["time_s"]) + note, _ok(rec["time_s"] <= t["max_s"])
    raise ValueError(f"target without a criterion: {t}")


def _ok(passed: bool) -> str:
    return "✅ met" if passed else "❌ not met"


# ----------------------------------------------------------------------------------------------
# Chart


def png(run: dict, path: str | Path, title: str | None = None) -> bool:
    """A bar chart of the speedup over eager per provider per row; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is not installed, no PNG written", file=sys.stderr)
        return False
    rows = pivot(run["records"])
    devices = [d for d in DEVICES if any(k[0] == d for k in rows)]
    if not devices:
        print("report.py: no results, no PNG written", file=sys.stderr)
        return False
    heights = [sum(1 for k in rows if k[0] == d) for d in devices]
    fig, axes = plt.subplots(
        len(devices), 1, figsize=(10, 1.0 + 0.55 * sum(heights) + 0.8 * len(devices)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    colors = dict(zip(PROVIDERS, plt.cm.tab10.colors, strict=False))
    from matplotlib.ticker import FuncFormatter, LogLocator

    for ax, device in zip(axes[:, 0], devices, strict=True):
        dev_rows = [(k, v) for k, v in rows.items() if k[0] == device]
        labels, seen = [], set()
        for i, (k, row) in enumerate(dev_rows):
            labels.append(f"{k[1]}{' ' + k[2] if k[2] else ''} · {k[3]} · {k[4]}")
            bars = [p for p in PROVIDERS if p != BASELINE and "speedup" in row.get(p, {})]
            width = 0.8 / max(1, len(bars))
            for j, p in enumerate(bars):
                x = row[p]["speedup"]
                y = i + (j - (len(bars) - 1) / 2) * width
                ax.barh(y, x, height=width * 0.95, color=colors[p],
                        label=None if p in seen else p)  # fmt: skip
                seen.add(p)
                ax.text(x, y, f" {x:.2g}×", va="center", fontsize=6)
        ax.set_yticks(range(len(dev_rows)), labels, fontsize=7)
        ax.set_ylim(len(dev_rows) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speedup over eager (log scale; right of the line = faster than eager)")
        lk = run["machine"].get("lrml", {})
        name = lk.get("gpu", "GPU") if device == "cuda" else lk.get("cpu_model", "CPU")
        ax.set_title(f"{device}: {name}", fontsize=9)
        handles, names = ax.get_legend_handles_labels()
        order = sorted(range(len(names)), key=lambda n: PROVIDERS.index(names[n]))
        ax.legend([handles[n] for n in order], [names[n] for n in order], fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------


def update_readme(readme: Path, block: str, body: str) -> None:
    """Replace what lies between ``<!-- block:begin -->`` and ``<!-- block:end -->``."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"report.py: {readme} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="pytest-benchmark --benchmark-json file, or the --lrml-jsonl file")
    ap.add_argument("--markdown", help="write the table here (it is always printed)")
    ap.add_argument("--png", help="write the bar chart here (needs matplotlib)")
    ap.add_argument("--require", default="", help="comma list of providers that must appear")
    ap.add_argument("--status", help="a banner above the table, e.g. INCOMPLETE: ...")
    ap.add_argument("--title")
    ap.add_argument(
        "--partial", metavar="RUN.jsonl",
        help="read this --lrml-jsonl record when RUN is missing or unreadable (INCOMPLETE)",
    )  # fmt: skip
    ap.add_argument(
        "--readme", nargs=2, metavar=("README", "BLOCK"),
        help="replace the text between <!-- BLOCK:begin --> and <!-- BLOCK:end --> in README "
        "with the table (and the chart, if --png)",
    )  # fmt: skip
    ap.add_argument(
        "--stat", choices=("median", "min"), default="median",
        help="CPU rounds: the median (default) or the fastest (for a machine shared with others)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    status = args.status
    name = Path(args.run).name
    try:
        run = load(args.run, args.stat)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"report.py: cannot read {args.run}: {exc}", file=sys.stderr)
        why = f"{name}: {exc}"
        run = None
        if args.partial:
            try:
                run = load(args.partial, args.stat)
                name = Path(args.partial).name
                status = _join(status, f"INCOMPLETE: results from the partial record {name}")
                print(f"report.py: read {args.partial} instead", file=sys.stderr)
            except (OSError, ValueError, KeyError, TypeError) as exc2:
                print(f"report.py: cannot read {args.partial}: {exc2}", file=sys.stderr)
                why += f"; {Path(args.partial).name}: {exc2}"
        if run is None:
            if args.markdown:
                why = f"INCOMPLETE: no benchmark results ({why})"
                Path(args.markdown).write_text(
                    markdown(load_empty(), title=args.title, status=_join(status, why))
                )
            return 2
    missing = [
        p for p in filter(None, (x.strip() for x in args.require.split(",")))
        if not any(r["provider"] == p for r in run["records"])
    ]  # fmt: skip
    if missing:
        status = _join(
            status, f"INCOMPLETE: no results for required provider(s) {', '.join(missing)}"
        )
    for why in incomplete(run, name):
        status = _join(status, f"INCOMPLETE: {why}")
    text = markdown(run, title=args.title, status=status)
    if args.markdown:
        Path(args.markdown).write_text(text)
        heading = "INCOMPLETE" if status and "INCOMPLETE" in status else "complete"
        print(f"report.py: wrote {args.markdown}: {len(pivot(run['records']))} rows, {heading}",
              file=sys.stderr)  # fmt: skip
    wrote_png = bool(args.png) and png(run, args.png, args.title)
    if args.readme:
        readme, block = Path(args.readme[0]), args.readme[1]
        body = text
        if wrote_png:
            rel = Path(args.png).resolve().relative_to(readme.resolve().parent)
            body += f"\n![speedup over eager per provider]({rel.as_posix()})\n"
        update_readme(readme, block, body)
    print(text)
    if missing:
        for p in missing:
            reasons = {short_reason(s["reason"]) for s in run["skipped"] if s["provider"] == p}
            why = "; ".join(sorted(reasons)) or "not in this run"
            print(f"report.py: required provider {p} measured nothing: {why}", file=sys.stderr)
        return 3
    if not run["records"]:
        print("report.py: the run holds no results", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
