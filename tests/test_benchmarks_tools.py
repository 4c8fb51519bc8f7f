"""Benchmark tools: benchmarks/report.py on hand-made runs, benchmarks/gpu_check.sh --dry-run.

The benchmarks themselves run in CI as a smoke test (`pytest benchmarks --benchmark-disable`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from _bench import load_benchmark

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


report = load_benchmark("report")

NETFLIX = {"U": 480_189, "I": 17_770, "d": 100, "N": 20, "B": 4096, "C": 5}


def _rec(workload, variant, provider, t, device="cpu", size="netflix", pairs=20480, **extra):
    rec = {
        "workload": workload, "variant": variant, "provider": provider, "device": device,
        "size": size, "dtype": "fp32", "pairs": pairs, "time_s": t, "pairs_per_s": pairs / t,
        **NETFLIX, **extra,
    }  # fmt: skip
    return rec


def _write_run(path: Path, records, skipped=(), machine=None) -> Path:
    data = {
        "machine_info": {"lrml": machine or {"cpu_model": "Test CPU", "cpu_count": 2}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [
            {"name": f"test_x[{i}]", "stats": {"median": r["time_s"]}, "extra_info": r}
            for i, r in enumerate(records)
        ],
        "lrml_skipped": list(skipped),
    }
    path.write_text(json.dumps(data))
    return path


def _cpu_run():
    return [
        _rec("hinge fwd+bwd", "pair", "eager", 0.100),
        _rec("hinge fwd+bwd", "pair", "compile", 0.030),
        _rec("hinge fwd+bwd", "pair", "cpu", 0.020),
        _rec("hinge fwd+bwd", "shared", "eager", 0.080),
        _rec("hinge fwd+bwd", "shared", "compile", 0.040),
        _rec("train step", "adam", "eager", 1.0),
        _rec("train step", "adam", "eager-sparse", 0.30),
        _rec("train step", "adam", "compile", 0.25),
        _rec("train step", "adam", "cpu", 0.05),
        # the loop: 200 steps in 12 s is 341k pairs/s, 4.17x compile's 81.9k; its step 0.05 s/step
        _rec(
            "train loop",
            "adam",
            "cpu",
            12.0,
            pairs=200 * 20480,
            loop_vs_step=10.0 / 12.0,
            step_pairs_per_s=20480 / 0.05,
        ),
        _rec("topk", "k=10", "eager", 20.0, users=2048, k=10, peak_extra_mb=1500.0),
        _rec("topk", "k=10", "cpu", 1.0, users=2048, k=10, peak_extra_mb=300.0),
    ]


def test_pivot_rows_and_speedups():
    rows = report.pivot(_cpu_run())
    keys = list(rows)
    assert keys[0] == ("cpu", "hinge fwd+bwd", "pair", "netflix", "fp32")
    workloads = ["hinge fwd+bwd", "hinge fwd+bwd", "train step", "train loop", "topk"]
    assert [k[1] for k in keys] == workloads
    assert rows[keys[0]]["cpu"]["speedup"] == pytest.approx(5.0)
    assert rows[keys[0]]["eager"]["speedup"] == pytest.approx(1.0)


def test_markdown_table_and_target_verdicts(tmp_path):
    skipped = [{"provider": "cpu", "device": "cpu", "size": "netflix", "dtype": "fp32",
                "name": "test_hinge_forward_backward[cpu-netflix-fp32-cpu-shared]",
                "reason": "cpu backend: build failed:\nerror: no compiler"}]  # fmt: skip
    run = report.load(_write_run(tmp_path / "run.json", _cpu_run(), skipped))
    md = report.markdown(run, title="t")
    assert "**CPU: Test CPU**" in md
    assert "| hinge fwd+bwd (pair) |" in md
    assert "20 ms · **5.00×**" in md  # time and speedup over eager side by side
    targets = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()
               if line.startswith("| CPU ")}  # fmt: skip
    pair4 = targets["CPU fwd+bwd, Netflix tables, B=4096×5, pair: cpu ≥ 4× eager"]
    assert "5.00×" in pair4 and "✅ met" in pair4
    pair2 = targets["CPU fwd+bwd, Netflix tables, B=4096×5, pair: cpu ≥ 2× compile"]
    assert "1.50×" in pair2 and "❌ not met" in pair2
    shared = targets["CPU fwd+bwd, Netflix tables, B=4096×5, shared: cpu ≥ 4× eager"]
    assert "not measured (cpu backend: build failed: error: no compiler)" in shared
    # vs the best of eager-sparse / compile: 0.25 / 0.05 = 5x >= 3x
    best = next(v for k, v in targets.items() if "best of eager-sparse" in k)
    assert "5.00×" in best and "vs compile" in best and "✅ met" in best
    loop = targets["CPU train loop, synthetic Netflix, B=4096×5: cpu ≥ 80% of its fused step's "
                   "pairs/s (the step timed beside it)"]  # fmt: skip
    assert "83% (341k vs 410k pairs/s)" in loop and "✅ met" in loop
    plain = next(v for k, v in targets.items() if "best plain sparse step" in k)
    assert "4.17× (341k vs compile 81.9k pairs/s)" in plain and "✅ met" in plain
    mem = next(v for k, v in targets.items() if "peak extra memory" in k)
    assert "300 MB" in mem and "❌ not met" in mem
    assert "GPU" not in "".join(targets)  # no GPU targets for a CPU-only run
    assert "cpu on cpu: cpu backend: build failed: error: no compiler (1 benchmarks)" in md


EPOCH_BW = {"size": "netflix-epoch", "gbps": 1300.0, "bw_fraction": 0.3}


def test_gpu_cells_show_bandwidth_and_extrapolation(tmp_path):
    recs = [
        _rec("hinge fwd+bwd", "pair", "eager", 1e-3, device="cuda"),
        _rec(
            "hinge fwd+bwd", "pair", "triton", 5e-5, device="cuda", gbps=3000.0, bw_fraction=0.7
        ),  # fmt: skip
        _rec(
            "topk",
            "k=10",
            "eager",
            60.0,
            device="cuda",
            users=480_189,
            k=10,
            extrapolated="timed 0.0682 of the work",
        ),  # fmt: skip
        _rec("topk", "k=10", "triton", 2.0, device="cuda", users=480_189, k=10),
        _rec("hinge fwd+bwd", "shared", "eager", 9e-3, device="cuda", size="netflix-epoch"),
        _rec("hinge fwd+bwd", "shared", "triton", 3e-3, device="cuda", **EPOCH_BW),
    ]
    machine = {"gpu": "NVIDIA H200", "driver": "580", "cuda": "13.0", "copy_gbps": 4300.0}
    run = report.load(_write_run(tmp_path / "gpu.json", recs, machine=machine))
    md = report.markdown(run)
    assert "**GPU: NVIDIA H200**" in md and "4300 GB/s" in md
    assert "50 µs · **20.00×** · 3000 GB/s (70%)" in md
    assert "60.00 s†" in md
    # the issues' GPU targets: 10× eager at 4096 × 5, 40 % of the copy bandwidth at 2^20 × 2,
    # all-user top-10 in at most 1 s
    verdicts = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
        for line in md.splitlines()
        if line.startswith("| GPU")
    }
    ten = "GPU fwd+bwd, Netflix tables, B=4096×5, pair: triton ≥ 10× eager"
    assert verdicts[ten][1].startswith("✅ met"), verdicts[ten]
    bw = "GPU fwd+bwd, Netflix tables, B=2^20×2, shared: triton ≥ 40% of the copy bandwidth"
    bw = next(k for k in verdicts if k.startswith(bw))
    assert verdicts[bw][0] == "30% (1300 GB/s)" and verdicts[bw][1].startswith("❌ not met")
    topk = "GPU top-10 for all 480,189 users × 17,770 items: triton ≤ 1.0 s"
    assert verdicts[topk][0] == "2.00 s" and verdicts[topk][1].startswith("❌ not met")


def test_a_memory_target_says_when_a_subset_was_measured(tmp_path):
    # Under --lrml-cap the GPU top-k ranks a subset of the users: its peak memory is that call's,
    # not the all-user workload's that the target names.
    topk = {"device": "cuda", "users": 480_189, "k": 10}
    recs = [
        _rec("topk", "k=10", "triton", 2.0, peak_extra_mb=900.0, extrapolated="timed 0.25", **topk),
        _rec("topk", "k=10", "cuda", 2.0, peak_extra_mb=1200.0, **topk),
    ]
    md = report.markdown(report.load(_write_run(tmp_path / "gpu.json", recs)))
    mem = next(line for line in md.splitlines() if "extra GPU memory" in line)
    assert "| 900 MB (of the timed subset) | ✅ met |" in mem, mem


def test_jsonl_and_min_stat(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [
        _rec("hinge fwd", "pair", "eager", 0.010, time_min_s=0.008),
        _rec("hinge fwd", "pair", "compile", 0.005, time_min_s=0.002),
        {
            "skipped": True,
            "provider": "cpu",
            "device": "cpu",
            "reason": "not built",
            "name": "test_hinge_forward[cpu-netflix-fp32-cpu-pair]",
        },  # fmt: skip
    ]
    machine = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "commit": "abc"}}
    torn = json.dumps(_rec("hinge fwd", "pair", "triton", 0.001))[:40]  # killed mid-write
    path.write_text("\n".join(json.dumps(x) for x in [machine, *lines]) + "\n" + torn)
    run = report.load(path)
    assert len(run["records"]) == 2 and len(run["skipped"]) == 1
    assert report.device_header("cuda", run["machine"], run["commit"]).startswith(
        "**GPU: NVIDIA H100 80GB HBM3** (driver ?, CUDA ?); torch 2.11.0, triton ?, commit `abc`"
    )
    path.write_text(torn + "\n" + json.dumps(lines[0]) + "\n")
    with pytest.raises(json.JSONDecodeError):  # only the last line may be torn
        report.load(path)
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert report.pivot(run["records"])[("cpu", "hinge fwd", "pair", "netflix", "fp32")]["compile"][
        "speedup"
    ] == pytest.approx(2.0)
    fast = report.load(path, "min")
    assert report.pivot(fast["records"])[("cpu", "hinge fwd", "pair", "netflix", "fp32")][
        "compile"
    ]["speedup"] == pytest.approx(4.0)
    assert "fastest" in report.markdown(fast)


def test_main_require_png_and_exit_codes(tmp_path, capsys):
    run = _write_run(tmp_path / "run.json", _cpu_run())
    md, png = tmp_path / "t.md", tmp_path / "c.png"
    assert report.main([str(run), "--markdown", str(md), "--png", str(png)]) == 0
    assert md.read_text().startswith("**CPU: Test CPU**")
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main([str(run), "--require", "eager,triton"]) == 3
    captured = capsys.readouterr()
    assert "INCOMPLETE: no results for required provider(s) triton" in captured.out
    assert "required provider triton measured nothing" in captured.err
    assert report.main([str(tmp_path / "missing.json")]) == 2


def test_png_without_matplotlib_is_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    run = report.load(_write_run(tmp_path / "run.json", _cpu_run()))
    assert report.png(run, tmp_path / "c.png") is False
    assert not (tmp_path / "c.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_report_is_written_without_results_and_says_incomplete(tmp_path):
    md = tmp_path / "t.md"
    assert report.main([str(tmp_path / "bench.jsonl"), "--markdown", str(md), "--status", "s"]) == 2
    text = md.read_text()
    assert text.startswith("> **s; INCOMPLETE: no benchmark results (bench.jsonl: ")
    assert "|" not in text  # no table, no numbers
    # --partial: neither file there, both named
    args = [str(tmp_path / "bench.json"), "--partial", str(tmp_path / "bench.jsonl")]
    assert report.main([*args, "--markdown", str(md)]) == 2
    assert "(bench.json: " in md.read_text() and "; bench.jsonl: " in md.read_text()
    late = {"skipped": True, "provider": "compile", "device": "cuda", "name": "test_x[c]",
            "reason": "out of time: the run's deadline (60 s) was past"}  # fmt: skip
    run = _write_run(tmp_path / "run.json", _cpu_run(), [late])
    assert report.main([str(run), "--markdown", str(md)]) == 0
    assert "INCOMPLETE: 1 benchmark(s) not run, out of time" in md.read_text()


def test_benchlib_caps_and_compiles_once():
    benchlib = load_benchmark("benchlib")
    # a probe of 100 users in 0.5 s: 2 s allow 400 of 1,000; never fewer than the probe's
    assert benchlib.capped_units(1000, 100, 0.5, 2.0) == 400
    assert benchlib.capped_units(1000, 100, 0.5, 0.1) == 100
    assert benchlib.capped_units(1000, 100, 1e-4, 2.0) == 1000
    assert benchlib.compiled(benchlib.rows_hinge) is benchlib.compiled(benchlib.rows_hinge)


class _FakeBenchmark:
    """pytest-benchmark's fixture, as far as the benchmarks use it: one timed call."""

    def __init__(self):
        self.extra_info, self._clock = {}, time.perf_counter
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=None))

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
        t0 = self._clock()
        out = fn()
        self.stats.stats.median = self._clock() - t0
        return out


def test_epoch_warms_up_every_batch_shape_it_times(monkeypatch):
    # The epoch's last step takes the remainder (865,787 rows at Netflix size): Triton compiles
    # new variants for it (integer arguments are specialised on divisibility by 16), which must
    # happen in the warm-up, not inside the timed epoch.
    monkeypatch.syspath_prepend(str(BENCH))
    steps = load_benchmark("bench_train_step")
    bl = steps.bl
    import torch

    shapes = []
    monkeypatch.setattr(steps, "make_step", lambda case, p: (None, lambda u, i: shapes.append(
        tuple(i.shape))))  # fmt: skip
    monkeypatch.setattr(bl, "EPOCH_POSITIVES", 10)
    monkeypatch.setattr(bl, "EPOCH_BATCH", 4)
    monkeypatch.setitem(bl.SETTINGS, "disabled", False)
    monkeypatch.setitem(bl.SETTINGS, "jsonl", None)
    bench = _FakeBenchmark()
    steps.test_epoch(bench, bl.Case("cpu", bl.SIZES["tiny"], torch.float32), "eager")
    warm, timed = shapes[:2], shapes[2:]
    assert timed == [(4, 2), (4, 2), (2, 2)]
    assert set(timed) <= set(warm), (warm, timed)
    assert bench.extra_info["time_s"] > 0 and "extrapolated" not in bench.extra_info


def test_a_long_gpu_call_is_timed_by_events_and_says_so(monkeypatch):
    # The GPU path of measure() on the CPU: torch.cuda's clock stood in for by events that
    # report 0.4 s, then 0.6 s. A call over LONG_CALL_S (the all-user top-k) is timed call by
    # call by those events, and its record says so, not "do_bench".
    bl = load_benchmark("benchlib")
    import torch

    elapsed_ms = iter([400.0, 600.0])

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            pass

        def elapsed_time(self, end):
            return next(elapsed_ms)

    for name, value in {
        "Event": Event, "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "memory_allocated": lambda device=None: 0, "max_memory_allocated": lambda device=None: 0,
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setitem(bl.SETTINGS, "disabled", False)
    monkeypatch.setitem(bl.SETTINGS, "jsonl", None)
    case = bl.Case("cuda", bl.SIZES["tiny"], torch.float32)
    bench = _FakeBenchmark()
    info = bl.measure(bench, case, "triton", lambda: None, workload="topk", pairs=10)
    assert info["time_s"] == pytest.approx(0.5)  # the median of the two event-timed calls
    assert info["timer"] == bl.TIMER_SINGLE_CALLS


# --------------------------------------------------------------------------------------------
# gpu_check.sh --plan / --dry-run


def _gpu_check(
    out: Path | None, *extra_env, mode: str = "--dry-run"
) -> subprocess.CompletedProcess:
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, **dict(extra_env))
    return subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), mode, *([str(out)] if out else [])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


STEPS = ("env", "build", "gpu-tests", "bench", "profile", "report")


def _plan(budget: int) -> dict[str, int]:
    proc = _gpu_check(None, ("LRML_GPU_CHECK_TOTAL_S", str(budget)), mode="--plan")
    assert proc.returncode == 0, proc.stderr
    # "budget 120 s; limits if every step used all of its own: env 20 s, build 15 s, ...; cap ..."
    limits = proc.stdout.split(": ", 1)[1].split(";")[0]
    return {name: int(sec) for name, sec, _ in (x.split(" ") for x in limits.split(", "))}


def test_gpu_check_budget_runs_every_step_within_it():
    plans = {b: _plan(b) for b in (120, 300, 1000)}
    for budget, plan in plans.items():
        assert tuple(plan) == STEPS
        assert sum(plan.values()) <= budget and min(plan.values()) >= 8, (budget, plan)
    for step in STEPS:  # scaled with the budget, never down to nothing
        assert plans[120][step] <= plans[300][step] <= plans[1000][step]
    assert plans[300]["gpu-tests"] >= 110  # the GPU test matrix, sharded over processes
    assert plans[300]["build"] >= 30  # a cold build of both libraries at once: ~25 s
    assert plans[1000]["bench"] == 300  # proportional once the floors no longer bind
    assert sum(plans[120].values()) <= 120 - 3  # the script's own seconds stay out
    assert plans[120]["env"] >= 30  # a cold torch import, nvidia-smi, CUDA, the bandwidth
    for bad in ("100", "08", "1e3", "-5"):
        proc = _gpu_check(None, ("LRML_GPU_CHECK_TOTAL_S", bad), mode="--plan")
        assert proc.returncode == 2 and ">= 120" in proc.stderr, (bad, proc.stderr)
    assert _plan(int("0300")) == plans[300]  # a leading zero: decimal, not octal
    proc = _gpu_check(None, ("LRML_GPU_CHECK_TOTAL_S", "0300"), mode="--plan")
    assert proc.stdout.startswith("budget 300 s;"), proc.stdout
    proc = _gpu_check(None, ("LRML_GPU_CHECK_TOTAL_S", "1000"), mode="--plan")
    assert "does not fit one command of the device tool" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, "120"], ids=["default-budget", "120s"])
def test_gpu_check_dry_run(tmp_path, budget):
    out = tmp_path / "out"
    proc = _gpu_check(out, *([("LRML_GPU_CHECK_TOTAL_S", budget)] if budget else []))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["gpu_check.log", "gpu_tests.log", "bench.log", "bench.json",
                            "bench.jsonl", "table.md", "profile.md"])  # fmt: skip
    assert f"budget {budget or 300} s" in proc.stdout
    assert "GPU CHECK OK (dry run)" in proc.stdout and "WARNING" not in proc.stdout
    for step in STEPS:
        assert f"   {step}: ok" in proc.stdout
    took, budget_s = map(int, re.search(r"== summary \((\d+) s of (\d+) s\)", proc.stdout).groups())
    assert took <= budget_s
    # the bench's deadline is an absolute time (its start-up counts), its record closed
    assert re.search(r"--lrml-deadline-at=\d{10}", proc.stdout)
    assert json.loads((out / "bench.jsonl").read_text().splitlines()[-1])["end"]["exitstatus"] == 0
    # the gpu tests ran through the shards (each skipped: no GPU), the prewarm beside them
    last = (out / "gpu_tests.log").read_text().splitlines()[-1]
    assert last.startswith("sharded: ") and " skipped in " in last and "failed" not in last
    assert re.search(r"== prewarm \(beside gpu-tests, \d+ shards; .*: ok: sharded: \d+ passed",
                     proc.stdout)  # fmt: skip
    table = (out / "table.md").read_text()
    assert "DRY RUN" in table and "INCOMPLETE" not in table
    for row in ("| hinge fwd+bwd (pair) | tiny (", "| hinge fwd+bwd (shared) | tiny-epoch (",
                "| train step (adam) |", "| topk (k=10) |"):  # fmt: skip
        assert row in table
    assert "distances fwd" not in table  # not a headline workload
    assert proc.stdout.rstrip().endswith(table.rstrip())  # the table is printed last
    profile = (out / "profile.md").read_text()
    for piece in ("| torch | hinge fwd+bwd | B=256×5 |", "| cpu | train step | B=256×5 |",
                  "| cpu | hinge fwd+bwd | B=4,096×2 |", "### torch · train step",
                  "| torch-tf32 | hinge fwd+bwd | B=4,096×2 |",
                  "| torch | negatives | B=256×4 |", "| cpu | negatives | B=256×4 |"):  # fmt: skip
        assert piece in profile
    assert "not profiled" not in profile
    bench = json.loads((out / "bench.json").read_text())
    assert {b["extra_info"]["provider"] for b in bench["benchmarks"]} >= {"eager", "cpu"}


def test_gpu_check_failed_steps_are_named_and_the_report_still_written(tmp_path):
    out = tmp_path / "out"
    proc = _gpu_check(out, ("LRML_GPU_CHECK_FAIL", "bench,profile"))
    assert proc.returncode == 1
    assert "bench: FAILED (rc=7" in proc.stdout and "profile: FAILED (rc=7" in proc.stdout
    assert "GPU CHECK FAILED: bench (rc=7) profile (rc=7) report (rc=2)" in proc.stdout
    table = (out / "table.md").read_text()
    assert "INCOMPLETE: failed step(s): bench (rc=7) profile (rc=7)" in table
    assert "no benchmark results (bench.json: " in table and "bench.jsonl: " in table
    assert "|" not in table
    assert proc.stdout.rstrip().endswith(table.rstrip())


@pytest.mark.parametrize("limit", ["--time-limit=0", "--end-at=AT"])
def test_profile_lists_what_it_had_no_time_for(tmp_path, limit):
    # --end-at: a Unix time (the GPU check's: the start-up counts too), here past
    md = tmp_path / "profile.md"
    run = subprocess.run(
        [sys.executable, str(BENCH / "profile_gpu.py"), str(md), "--device", "cpu", "--size",
         "tiny", "--backends", "torch,nope", limit.replace("AT", str(int(time.time())))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    text = md.read_text()
    for piece in ("| torch | hinge fwd+bwd | B=256×5 |", "| torch | train step | B=256×5 |",
                  "| torch | hinge fwd+bwd | B=4,096×2 |"):  # fmt: skip
        assert f"{piece} not profiled: out of time" in text
    assert "| nope | — | — | unavailable: " in text


def test_gpu_check_without_gpu_stops_at_step_one(tmp_path):
    # (the injection stands for "torch sees no GPU": exit status 3 and a NO_DEVICE line)
    out = tmp_path / "out"
    proc = _gpu_check(out, ("LRML_GPU_CHECK_FAIL", "env"))
    assert proc.returncode == 1
    assert "GPU CHECK FAILED: env (no usable torch)" in proc.stdout
    assert "step build" not in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "table.md"]
    assert "> **INCOMPLETE: step env found no usable torch" in (out / "table.md").read_text()
    # a Python without torch: the same, and it says so
    (tmp_path / "torch.py").write_text("raise ImportError('No module named torch (test)')\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    proc = _gpu_check(out, ("PYTHONPATH", path))
    assert proc.returncode == 1 and "torch cannot be imported" in proc.stdout, proc.stdout
    assert "torch cannot be imported" in (out / "table.md").read_text()


def _collected(*paths: str, size: str = "tiny") -> list[str]:
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "--lrml-device=cpu"]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *paths, *args, f"--lrml-size={size}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in run.stdout.splitlines() if "::" in line]


def test_headline_selection_epoch_batch_compile_and_loop_last():
    names = [n.split("::")[1] for n in _collected(
        "benchmarks", "--lrml-workloads=headline", size="tiny,tiny-epoch")]  # fmt: skip
    tests = {n.split("[")[0] for n in names}
    assert tests == {
        "test_hinge_forward_backward",
        "test_train_step",
        "test_topk",
        "test_train_loop",
    }
    epoch_batch = {n.split("[")[0] for n in names if "-tiny-epoch-" in n}
    assert epoch_batch == {"test_hinge_forward_backward"}
    # the train loop last of all (its data set-up is the slowest part), before it the size run
    # first, its compile peers last
    loop = [n for n in names if n.startswith("test_train_loop")]
    assert loop and names[-len(loop) :] == loop
    tiny = [n for n in names if "-tiny-fp32-" in n and n not in loop]
    assert names[: len(tiny)] == tiny
    compile_at = [i for i, n in enumerate(tiny) if "-compile" in n]
    assert compile_at and compile_at == list(range(len(tiny) - len(compile_at), len(tiny)))


@pytest.mark.parametrize("deadline", ["--lrml-deadline=0", "--lrml-deadline-at=AT"])
def test_no_benchmark_starts_after_the_deadline(tmp_path, deadline):
    # --lrml-deadline-at: a Unix time (the GPU check's: the start-up counts too), here past
    jsonl = tmp_path / "run.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_hinge_loss.py", "-q",
         "-p", "no:cacheprovider", "--lrml-device=cpu", "--lrml-size=tiny",
         deadline.replace("AT", str(int(time.time()))),
         f"--lrml-jsonl={jsonl}", "-k", "forward_backward"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    machine, *recs, end = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert machine["machine"]["commit"] and machine["machine"]["devices"] == ["cpu"]
    assert len(recs) == 10 and all(r["reason"].startswith("out of time") for r in recs), recs
    assert end["end"] == {"exitstatus": 0, "not_run": 0}


def test_tf32_rows_run_at_matmul_precision_high_at_the_epoch_batch_only(tmp_path):
    jsonl = tmp_path / "run.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_hinge_loss.py", "-q",
         "-p", "no:cacheprovider", "--lrml-device=cpu", "--lrml-size=tiny,tiny-epoch",
         "--lrml-dtypes=fp32,tf32", "--lrml-budget=0.01", f"--lrml-jsonl={jsonl}",
         "-k", "forward_backward and pair and not compile and not triton"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()][1:]  # (1: the machine)
    timed = {(r["provider"], r["size"], r["dtype"]): r for r in recs if "time_s" in r}
    assert set(timed) == {
        ("eager", "tiny", "fp32"), ("cpu", "tiny", "fp32"),
        ("eager", "tiny-epoch", "fp32"), ("cpu", "tiny-epoch", "fp32"),
        ("eager", "tiny-epoch", "tf32"),
    }  # fmt: skip
    assert {r["matmul_precision"] for k, r in timed.items() if k[2] == "fp32"} == {"highest"}
    assert timed["eager", "tiny-epoch", "tf32"]["matmul_precision"] == "high"
    why = {r["provider"]: r["reason"] for r in recs if r.get("dtype") == "tf32" and "reason" in r}
    assert why == {
        "cpu": "tf32 rows time eager and triton only",
        "cuda": "tf32: the CUDA kernels have no TF32 path",
    }, why


def test_a_bench_file_named_on_the_command_line_is_collected_once():
    one = _collected("benchmarks/bench_hinge_loss.py")
    assert one and len(one) == len(set(one)), "benchmarks collected twice"
    from_dir = [
        n for n in _collected("benchmarks") if n.startswith("benchmarks/bench_hinge_loss.py")
    ]
    assert sorted(one) == sorted(from_dir)


def test_malloc_mode_is_applied_recorded_and_shown(tmp_path):
    benchlib = load_benchmark("benchlib")
    assert benchlib.set_malloc_mode("system") == "system"
    steady = benchlib.set_malloc_mode("steady")
    if platform.libc_ver()[0] == "glibc":
        assert steady.startswith("steady (glibc mmap threshold 32 MB")
    machine = {"cpu_model": "Test CPU", "cpu_count": 2, "malloc": steady}
    run = report.load(_write_run(tmp_path / "run.json", _cpu_run(), machine=machine))
    assert f"malloc: {steady}" in report.markdown(run)


# ----------------------------------------------------------------------------------------------
# benchmarks/pytest_shards.py


def test_pytest_shards_deals_round_robin_and_sums_the_shards(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(7))\n"
        "def test_i(i):\n"
        "    if i == 5:\n"
        "        pytest.skip('five')\n"
        "    assert i != 3\n"
    )
    log = tmp_path / "shards.log"
    run = subprocess.run(
        [sys.executable, str(BENCH / "pytest_shards.py"), "--shards", "3", "--log", str(log),
         str(tmp_path), "--", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr  # pytest's "tests failed"
    text = log.read_text()
    assert re.search(r"^sharded: 1 failed, 5 passed, 1 skipped in \d+ s \(3 shards\)$", text, re.M)
    assert run.stdout.strip() == text.splitlines()[-1]
    # round-robin: shard 1 ran i = 0, 3, 6 (the failure), shards 2 and 3 two tests each
    assert "=== shard 1/3: 3 tests, rc=1" in text and "=== shard 3/3: 2 tests, rc=0" in text
    # an empty selection runs nothing (pytest given no ids would run its whole test path)
    run = subprocess.run(
        [sys.executable, str(BENCH / "pytest_shards.py"), "--shards", "3", "--log", str(log),
         str(tmp_path), "--", "-q", "-k", "nothing_matches"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0 and log.read_text() == "sharded: no tests collected\n"


# ----------------------------------------------------------------------------------------------
# gpu_check.sh: what goes wrong on the GPU machine, on the CPU


def _summary_seconds(stdout: str) -> tuple[int, int]:
    return tuple(map(int, re.search(r"== summary \((\d+) s of (\d+) s\)", stdout).groups()))


@pytest.mark.slow
def test_gpu_check_carries_on_after_a_hung_env_step_and_ends_within_its_budget(tmp_path):
    # step 1 hangs (ignoring SIGINT: killed at its limit): a warning, not the end of the check;
    # a failed build sets LRML_KERNELS_NO_JIT for the later steps; the rest fail at once
    out = tmp_path / "out"
    proc = _gpu_check(
        out, ("LRML_GPU_CHECK_TOTAL_S", "120"), ("LRML_GPU_CHECK_HANG", "env"),
        ("LRML_GPU_CHECK_FAIL", "build,prewarm,gpu-tests,bench,profile"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "WARNING: step env failed (rc=137, timed out)" in proc.stdout
    assert "LRML_KERNELS_NO_JIT=1 for the later steps" in proc.stdout
    assert "== step report" in proc.stdout and "   report: " in proc.stdout
    assert "prewarm: FAILED (rc=7)" in proc.stdout  # named, not a blank status
    took, budget = _summary_seconds(proc.stdout)
    assert 30 <= took <= budget == 120
    table = (out / "table.md").read_text()
    assert table.startswith("## GPU check") and "INCOMPLETE: failed step(s): build (rc=7)" in table
    assert "WARNING: step env failed" in table
    log = (out / "gpu_tests.log").read_text()  # (pytest_shards never ran: the script says so)
    assert log.startswith("=== pytest_shards did not finish (step gpu-tests: rc=7)")


def test_gpu_check_stopped_by_sigterm_stops_its_steps_and_writes_a_report(tmp_path):
    # the device tool's timeout: SIGTERM to the script while a step and the prewarm hang (each
    # ignoring SIGINT, each in a process group of its own): both are stopped, the summary and a
    # stub table written, exit status 128 + 15
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, LRML_GPU_CHECK_HANG="gpu-tests,prewarm",
               LRML_GPU_CHECK_FAIL="build")  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        log = out / "gpu_check.log"
        while "== step gpu-tests" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() - t0 < 120 and proc.poll() is None
            time.sleep(0.2)
        time.sleep(1)
        t1 = time.monotonic()
        proc.terminate()
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15, stdout[-3000:]
    assert time.monotonic() - t1 < 15  # the grace (5 s), once for both groups
    assert "GPU CHECK STOPPED by SIGTERM during step gpu-tests" in stdout
    table = (out / "table.md").read_text()
    assert "INCOMPLETE: the check was stopped by SIGTERM during step gpu-tests" in table
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in left, "a step's process outlived the check"


def test_gpu_check_labels_a_tree_inside_another_repository_as_unknown(tmp_path):
    # the tree copied into another git repository: not that repository's commit
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    outer = tmp_path / "outer"
    (outer / "tree" / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH / "gpu_check.sh", outer / "tree" / "benchmarks")
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    env = {**os.environ, "PYTHON": sys.executable, "LRML_GPU_CHECK_FAIL": "env"}
    env.pop("LRML_COMMIT", None)
    proc = subprocess.run(
        ["bash", str(outer / "tree" / "benchmarks" / "gpu_check.sh"), "--dry-run",
         str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "commit unknown (set LRML_COMMIT) (uncommitted changes: unknown)" in proc.stdout
    bl = load_benchmark("benchlib")
    assert bl.commit_info()[1] is not None  # (this checkout: its own git)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bl, "git", lambda *a: str(outer) if a[0] == "rev-parse" else "M x")
        mp.delenv("LRML_COMMIT", raising=False)
        assert bl.commit_info() == (bl.UNKNOWN_COMMIT, None)
        mp.setenv("LRML_COMMIT", "abc123")
        assert bl.commit_info() == ("abc123", None)
    machine = {"cpu_model": "Test CPU", "commit": "abc123", "dirty": None}
    md = report.markdown(report.load(_write_run(tmp_path / "r.json", _cpu_run(), machine=machine)))
    assert "commit `abc123` (uncommitted changes: unknown)" in md


def test_no_jit_names_the_libraries_not_to_build(monkeypatch):
    # after a failed build the GPU check sets LRML_KERNELS_NO_JIT to the failed libraries
    from lrml_kernels import extension

    for value, off in [("", ()), ("0", ()), ("1", ("cpu", "cuda")), ("cuda", ("cuda",)),
                       ("cpu,cuda", ("cpu", "cuda")), ("yes", ("cpu", "cuda"))]:  # fmt: skip
        monkeypatch.setenv("LRML_KERNELS_NO_JIT", value)
        assert tuple(n for n in ("cpu", "cuda") if extension._jit_disabled(n)) == off, value
    monkeypatch.setenv("LRML_KERNELS_NO_JIT", "cuda")
    with pytest.raises(extension.BackendUnavailable, match="LRML_KERNELS_NO_JIT=cuda"):
        extension._jit_build("cuda")


def test_env_step_warns_about_the_bandwidth_and_stops_only_without_a_gpu(monkeypatch, capsys):
    bl = load_benchmark("benchlib")
    import torch

    monkeypatch.setattr(bl, "nvidia_smi_start", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bl._env_main(dry_run=False)
    assert exc.value.code == 3 and "NO_DEVICE: torch sees no CUDA device" in capsys.readouterr().out
    props = types.SimpleNamespace(name="H200", multi_processor_count=132, total_memory=141 << 30,
                                  major=9, minor=0)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)

    def broken():
        raise RuntimeError("CUDA error: launch failure")

    monkeypatch.setattr(bl, "measure_copy_gbps", broken)
    bl._env_main(dry_run=False)  # no exit: a warning
    text = capsys.readouterr().out
    assert "DEVICE_OK=cuda" in text and "GPU_MEMORY_GIB=141" in text
    assert "WARNING: the bandwidth measurement failed: RuntimeError" in text
    assert "COPY_GBPS=" not in text
    bl._env_main(dry_run=False, end_at=time.time() + 2)  # no time left for it
    assert "WARNING: no bandwidth measurement" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# pytest_shards.py: hangs, kills, collection errors

HANGING = """
import os, signal, time, pytest

def test_fast():
    pass

def test_hang_counts_sigint():
    # the first SIGINT is counted and waited out a little; pytest then stops
    def on_int(signum, frame):
        with open(os.environ["SIGINTS"], "a") as f:
            f.write("INT\\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        time.sleep(0.5)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_int)
    time.sleep(1000)

def test_hang_ignores_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(1000)

@pytest.mark.parametrize("i", range(4))
def test_later(i):
    time.sleep(1000 if os.environ.get("SLOW_LATER") else 0)
"""


def _shards(tmp_path, *pre: str, log: Path, extra=(), env=None):
    return subprocess.run(
        [*pre, sys.executable, str(BENCH / "pytest_shards.py"), "--shards", "2", "--log",
         str(log), *extra, str(tmp_path / "t"), "--", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_pytest_shards_names_a_hung_test_and_loses_nothing_when_stopped(tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout is not installed")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_hang.py").write_text(HANGING)
    sigints = tmp_path / "sigints"
    log = tmp_path / "shards.log"
    # as gpu_check.sh runs it: SIGINT to timeout's process group, SIGKILL 10 s later
    run = _shards(tmp_path, "timeout", "-s", "INT", "-k", "10", "8", log=log, env={"SIGINTS": str(
        sigints)}, extra=["--grace", "2", "--hang-dump", "2"])  # fmt: skip
    assert run.returncode == 124, run.stdout + run.stderr  # (timeout's: the command was stopped)
    text = log.read_text()
    last = text.splitlines()[-1]
    assert re.match(r"sharded: 1 passed, 2 interrupted, 4 not run in \d+ s \(2 shards\); "
                    r"stopped by signal 2; still running when stopped: ", last), last  # fmt: skip
    assert "test_hang.py::test_hang_counts_sigint" in last and "test_hang_ignores_sigint" in last
    assert sigints.read_text() == "INT\n"  # one SIGINT a shard, not two
    assert "killed after the grace (rc=-9)" in text  # the one that ignored it
    assert "Timeout (0:00:02)!" in text and 'test_hang.py", line' in text  # the stacks
    assert "every thread's stack (SIGUSR1), then SIGINT" in text
    # pytest_shards itself killed (SIGKILL): its log is the last snapshot, and no shard is left
    run = _shards(tmp_path, "timeout", "-s", "KILL", "7", log=log, env={"SIGINTS": str(sigints)})
    assert run.returncode in (137, -9)  # (timeout's own group gets the SIGKILL too)
    text = log.read_text()
    assert "=== shard 1/2: 4 tests, running" in text and "sharded (running, " in text
    assert "running now: " in text.splitlines()[-1]
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "t") not in ps
    # no shard worker of this run is left: none runs in its folder (another run's workers, a
    # test suite beside this one, may)
    assert not _processes_in(tmp_path)


def _processes_in(folder: Path) -> list[str]:
    """The command lines of the processes whose working directory is ``folder`` (Linux)."""
    found, folder = [], folder.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if Path(os.readlink(proc / "cwd")) == folder and int(proc.name) != os.getpid():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def test_pytest_shards_writes_the_log_when_collection_fails(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "conftest.py").write_text("raise RuntimeError('broken conftest')\n")
    (tmp_path / "t" / "test_x.py").write_text("def test_x():\n    pass\n")
    log = tmp_path / "shards.log"
    run = _shards(tmp_path, log=log)
    assert run.returncode == 4, run.stdout + run.stderr
    text = log.read_text()
    assert text.startswith("pytest_shards: collection failed (rc=4):")
    assert "broken conftest" in text and "broken conftest" in run.stdout  # (pytest's stderr)


# ----------------------------------------------------------------------------------------------
# report.py on damaged runs, conftest's records of failures, the train loop's reserve


def test_report_lists_invalid_times_and_failed_benchmarks_and_heads_them_incomplete(tmp_path):
    recs = [_rec("hinge fwd+bwd", "pair", "eager", 0.1), _rec("hinge fwd+bwd", "pair", "cpu", 0.02)]
    recs[1]["time_s"], recs[1]["pairs_per_s"] = float("nan"), float("nan")
    zero = _rec("hinge fwd+bwd", "shared", "eager", 0.1)
    zero["time_s"] = 0.0
    failed = {"failed": True, "provider": "cpu", "device": "cpu", "size": "netflix",
              "name": "test_train_step[cpu-netflix-fp32-cpu]",
              "reason": "FAILED (call): AssertionError: loss: relative error 0.5"}  # fmt: skip
    md = tmp_path / "t.md"
    run = _write_run(tmp_path / "run.json", [*recs, zero], [failed])
    assert report.main([str(run), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "nan µs" not in text and "nan×" not in text and "| 0 µs" not in text
    assert "INCOMPLETE: 1 benchmark(s) failed; INCOMPLETE: 2 result(s) without a valid time" in text
    assert "cpu on cpu: invalid time_s (nan): no result (1 benchmarks)" in text
    assert "eager on cpu: invalid time_s (0.0): no result" in text
    assert "FAILED (call): AssertionError: loss: relative error 0.5" in text
    # a record cut short (no closing line, a torn last line) is INCOMPLETE on its own
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text(json.dumps(recs[0]) + "\n")
    assert report.main([str(jsonl), "--markdown", str(md)]) == 0
    assert "INCOMPLETE: run.jsonl ends before its run did (it has no closing line" in md.read_text()
    jsonl.write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[0])[:30])
    report.main([str(jsonl), "--markdown", str(md)])
    assert "(its last record is cut off: cut short)" in md.read_text()
    end = {"end": {"exitstatus": 2, "not_run": 3}}
    jsonl.write_text(json.dumps(recs[0]) + "\n" + json.dumps(end) + "\n")
    report.main([str(jsonl), "--markdown", str(md), "--status", "s"])
    assert md.read_text().startswith(
        "> **s; INCOMPLETE: the run was interrupted; INCOMPLETE: 3 benchmark(s) never ran**"
    )
    # --partial: the JSONL where the JSON is missing, said in the heading
    assert report.main([str(tmp_path / "none.json"), "--partial", str(jsonl), "--markdown",
                        str(md)]) == 0  # fmt: skip
    assert "INCOMPLETE: results from the partial record run.jsonl" in md.read_text()


def test_a_failing_benchmark_is_recorded_and_reported(tmp_path):
    (tmp_path / "failplugin.py").write_text(
        "import pytest\n"
        "@pytest.hookimpl(tryfirst=True)\n"
        "def pytest_runtest_call(item):\n"
        "    if item.name.endswith('-cpu-pair]'):\n"
        "        raise RuntimeError('injected failure')\n"
    )
    jsonl = tmp_path / "run.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_hinge_loss.py", "-q", "-p", "failplugin",
         "-p", "no:cacheprovider", "--lrml-device=cpu", "--lrml-size=tiny", "--lrml-budget=0.01",
         f"--lrml-jsonl={jsonl}", "-k", "forward_backward and pair and (eager or cpu)"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    failed = [r for r in recs if r.get("failed")]
    assert [r["provider"] for r in failed] == ["cpu"], recs
    assert failed[0]["reason"] == "FAILED (call): RuntimeError: injected failure"
    assert recs[-1]["end"] == {"exitstatus": 1, "not_run": 0}
    md = tmp_path / "t.md"
    report.main([str(jsonl), "--markdown", str(md)])
    assert "INCOMPLETE: 1 benchmark(s) failed" in md.read_text()
    assert "cpu on cpu: FAILED (call): RuntimeError: injected failure" in md.read_text()


def test_the_train_loop_starts_only_with_time_for_its_data_set_up(tmp_path):
    bl = load_benchmark("benchlib")
    assert bl.start_reserve_s("test_topk", "compile", "netflix") == bl.COMPILE_RESERVE_S
    assert bl.start_reserve_s("test_topk", "triton", "netflix") == 0
    assert bl.start_reserve_s("test_train_loop", "triton", "netflix") == 45
    bl.LOOP_DATA_READY.add("netflix")  # (the data of the size's first case, reused)
    assert bl.start_reserve_s("test_train_loop", "cuda", "netflix") == bl.LOOP_RESERVE_S
    # a deadline closer than the loop's reserve: no case of it starts (tiny: LOOP_RESERVE_S)
    jsonl = tmp_path / "run.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_train_loop.py", "-q",
         "-p", "no:cacheprovider", "--lrml-device=cpu", "--lrml-size=tiny",
         f"--lrml-deadline-at={time.time() + 8}", f"--lrml-jsonl={jsonl}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()][1:-1]
    assert len(recs) == 4 and all(r["reason"].startswith("out of time") for r in recs), recs


def test_kernel_report_without_nvcc_says_so_and_fails_the_spill_gate(monkeypatch, capsys):
    pytest.importorskip("triton")
    kr = load_benchmark("kernel_report")
    monkeypatch.setattr(kr, "collect", lambda *a, **k: [])
    monkeypatch.setattr(kr, "_nvcc_version", lambda: None)
    assert kr.main(["--subset", "smoke", "--fail-on-spills", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "the CUDA kernels' rows were not built" in err and "--fail-on-spills without" in err
    assert kr.main(["--subset", "smoke", "--fail-on-spills", "--quiet", "--no-cuda"]) == 0
    assert "not built" not in capsys.readouterr().err


def test_data_setup_takes_its_flags_without_a_name():
    ds = load_benchmark("data_setup")
    assert ds.parse(["--compiled-only"]) == ("synthetic-netflix", ("--compiled-only",))
    assert ds.parse(["synthetic-small"]) == ("synthetic-small", ())
    with pytest.raises(SystemExit):
        ds.parse(["no-such-data"])
