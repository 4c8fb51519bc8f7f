"""pytest set-up of the benchmark suite: options, parametrisation, ordering, machine info.

Options (each also read from an environment variable, the command line wins):

  --lrml-size=smoke|full|NAME[,NAME]   LRML_BENCH_SIZE   (default smoke: tiny tables, for CI)
  --lrml-device=auto|cpu|cuda          LRML_BENCH_DEVICE (default auto: cpu, plus cuda if present)
  --lrml-dtypes=auto|fp32[,bf16,...]   LRML_BENCH_DTYPES (default auto: fp32, plus bf16 and tf32
                                       on cuda; tf32 = fp32 tables at matmul precision "high",
                                       only where a test's marker names the size: tf32_sizes)
  --lrml-budget=SECONDS                LRML_BENCH_BUDGET (CPU seconds of timed rounds per benchmark)
  --lrml-malloc=steady|system          LRML_BENCH_MALLOC (default steady: see benchlib, "The
                                       allocator")
  --lrml-jsonl=PATH                    append every record to PATH as soon as it is measured
  --lrml-workloads=all|headline        LRML_BENCH_WORKLOADS (default all; headline: the tests
                                       and dtypes of benchlib.HEADLINE, the GPU check's choice)
  --lrml-cap=SECONDS                   LRML_BENCH_CAP (default none): what one provider may
                                       spend on one slow workload (top-k, epoch): it is timed on
                                       a subset and scaled (marked "extrapolated")
  --lrml-deadline=SECONDS              LRML_BENCH_DEADLINE (default none): seconds after the
                                       start of the run after which no benchmark starts; the
                                       rest are skipped "out of time" (the report says so)
  --lrml-deadline-at=EPOCH             LRML_BENCH_DEADLINE_AT (default none): the same as an
                                       absolute time (Unix seconds: the GPU check's, which
                                       counts the start-up in); with both, the earlier

Test files are ``bench_*.py`` (collected by the hook below; pyproject's defaults stay untouched).
A test declares what it runs on with ``@pytest.mark.lrml(devices=..., sizes=..., dtypes=...,
epoch_batch=..., tf32_sizes=...)`` (``epoch_batch=True``: also at the epoch-batch sizes,
netflix-epoch and tiny-epoch, which run nothing else; ``tf32_sizes``: the sizes at which it also
runs the tf32 case, where --lrml-dtypes has it) and takes the ``case`` argument; providers are a
plain ``parametrize("provider", ...)``. Sizes run in the order given; within a size ``compile``
peers run after every other benchmark (compiling costs the most time: under a deadline, what is
left out); the train loop runs after every size (its data set-up is the slowest part) and starts
only with the time for that set-up left before the deadline (benchlib.start_reserve_s).

A benchmark that fails (an error, a failed check) is recorded too (``"failed": true`` and the
error), and the ``--lrml-jsonl`` file ends with ``{"end": {"exitstatus": ..., "not_run": ...}}``
when the session ends: a file without it was cut short (report.py says so).
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import benchlib
import pytest
import torch

from lrml_kernels.precision import using_fp32_matmul_precision


def pytest_addoption(parser):
    group = parser.getgroup("lrml", "lrml_kernels benchmarks")
    group.addoption("--lrml-size", default=os.environ.get("LRML_BENCH_SIZE", "smoke"))
    group.addoption("--lrml-device", default=os.environ.get("LRML_BENCH_DEVICE", "auto"))
    group.addoption("--lrml-dtypes", default=os.environ.get("LRML_BENCH_DTYPES", "auto"))
    group.addoption(
        "--lrml-budget", type=float, default=float(os.environ.get("LRML_BENCH_BUDGET", "1.0"))
    )
    group.addoption(
        "--lrml-malloc",
        choices=benchlib.MALLOC_MODES,
        default=os.environ.get("LRML_BENCH_MALLOC", "steady"),
    )
    group.addoption("--lrml-jsonl", default=None)
    group.addoption(
        "--lrml-workloads",
        choices=("all", "headline"),
        default=os.environ.get("LRML_BENCH_WORKLOADS", "all"),
    )
    group.addoption("--lrml-cap", type=float, default=_env_float("LRML_BENCH_CAP"))
    group.addoption("--lrml-deadline", type=float, default=_env_float("LRML_BENCH_DEADLINE"))
    group.addoption("--lrml-deadline-at", type=float, default=_env_float("LRML_BENCH_DEADLINE_AT"))


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def pytest_collect_file(file_path, parent):
    # bench_*.py are not test_*.py: collect them here, except where named on the command line
    # (pytest's python plugin collects those itself, and both would run every benchmark twice).
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _devices(config) -> tuple[str, ...]:
    want = config.getoption("--lrml-device")
    if want == "auto":
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    devices = tuple(d.strip() for d in want.split(","))
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise pytest.UsageError(f"--lrml-device: {d!r} is not cpu, cuda or auto")
        if d == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--lrml-device=cuda but torch sees no CUDA device")
    return devices


def _dtypes(config, device: str) -> tuple[str, ...]:
    want = config.getoption("--lrml-dtypes")
    if want == "auto":
        return ("fp32", "bf16", benchlib.TF32) if device == "cuda" else ("fp32",)
    names = tuple(n.strip() for n in want.split(","))
    for n in names:
        if n not in benchlib.PRECISION_NAMES:
            raise pytest.UsageError(
                f"--lrml-dtypes: {n!r} is not one of {list(benchlib.PRECISION_NAMES)}"
            )
    return names


def pytest_configure(config):
    try:
        config._lrml_sizes = benchlib.parse_sizes(config.getoption("--lrml-size"))
    except ValueError as exc:
        raise pytest.UsageError(f"--lrml-size: {exc}") from exc
    s = benchlib.SETTINGS
    s["disabled"] = bool(config.getoption("benchmark_disable", False))
    s["budget_s"] = config.getoption("--lrml-budget")
    s["jsonl"] = config.getoption("--lrml-jsonl")
    s["malloc"] = benchlib.set_malloc_mode(config.getoption("--lrml-malloc"))
    s["cap_s"] = config.getoption("--lrml-cap")
    deadlines = []
    if config.getoption("--lrml-deadline") is not None:
        deadlines.append(time.monotonic() + config.getoption("--lrml-deadline"))
    if config.getoption("--lrml-deadline-at") is not None:  # (epoch -> this process's clock)
        deadlines.append(time.monotonic() + config.getoption("--lrml-deadline-at") - time.time())
    s["deadline"] = min(deadlines) if deadlines else None
    env_bw = os.environ.get("LRML_COPY_GBPS")
    if env_bw:
        s["copy_gbps"] = float(env_bw)
    config._lrml_skipped = []
    config._lrml_reported = set()  # benchmark ids with a report (the rest never ran)
    config._lrml_items = []


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("lrml")
    allow = marker.kwargs if marker else {}
    cases = []
    for size in metafunc.config._lrml_sizes:
        if "sizes" in allow and size.name not in allow["sizes"]:
            continue
        if size.epoch_batch and not allow.get("epoch_batch"):
            continue
        for device in _devices(metafunc.config):
            if "devices" in allow and device not in allow["devices"]:
                continue
            for dt in _dtypes(metafunc.config, device):
                if "dtypes" in allow and dt not in allow["dtypes"]:
                    continue
                tf32 = dt == benchlib.TF32
                if tf32 and size.name not in allow.get("tf32_sizes", ()):
                    continue
                dtype = torch.float32 if tf32 else benchlib.DTYPES[dt]
                cases.append(benchlib.Case(device, size, dtype, tf32=tf32))
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_collection_modifyitems(session, config, items):
    """Run each case's benchmarks together (inputs are built once per case), cases in the order
    of --lrml-size (the GPU check puts the Netflix size first), eager before its peers, the
    compile peers last in each size, and the train loop (which first synthesises and splits its
    data, and takes no cap) after everything else, so that under a deadline it is the one left
    out; --lrml-workloads=headline keeps benchlib.HEADLINE only."""
    sizes = [s.name for s in config._lrml_sizes]
    rank = {p: i for i, p in enumerate(benchlib.PROVIDERS)}
    headline = config.getoption("--lrml-workloads") == "headline"
    bench_items, others, deselected = [], [], []
    for pos, item in enumerate(items):
        cs = getattr(item, "callspec", None)
        if cs is None or "case" not in cs.params:
            others.append(item)
            continue
        case = cs.params["case"]
        if not isinstance(case, benchlib.Case):  # no case of this run fits the test's marker
            deselected.append(item)
            continue
        if headline and not _is_headline(item.originalname, case):
            deselected.append(item)
            continue
        key = (
            item.originalname == "test_train_loop",  # last: it builds Netflix-size data first
            sizes.index(case.size.name),
            cs.params.get("provider") == "compile",
            case.device,
            benchlib.PRECISION_NAMES.index(case.dtype_name),
            item.fspath.basename,
            item.originalname,
            tuple(str(v) for k, v in sorted(cs.params.items()) if k not in ("case", "provider")),
            rank.get(cs.params.get("provider"), len(rank)),
            pos,
        )
        bench_items.append((key, item))
    bench_items.sort(key=lambda ki: ki[0])
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = others + [item for _, item in bench_items]


def pytest_collection_finish(session):
    # the benchmarks of this session (after -k / -m deselection): those never reported never ran
    ids = session.config._lrml_items = []
    for item in session.items:
        cs = getattr(item, "callspec", None)
        if cs is not None and "case" in cs.params:
            ids.append(item.nodeid)


def _is_headline(test: str, case: benchlib.Case) -> bool:
    if test not in benchlib.HEADLINE:
        return False
    dtypes = benchlib.HEADLINE[test]
    return dtypes is None or case.dtype_name in dtypes


def pytest_runtest_setup(item):
    """Past the run's deadline no benchmark starts (a compile peer, the train loop: their
    benchlib.start_reserve_s before it); a tf32 case runs only the providers with a TF32 path."""
    cs = getattr(item, "callspec", None)
    if cs is None or "case" not in cs.params:
        return
    case = cs.params["case"]
    if case.tf32:
        why = benchlib.why_not_tf32(cs.params.get("provider"))
        if why:
            pytest.skip(why)
    need = benchlib.start_reserve_s(item.originalname, cs.params.get("provider"), case.size.name)
    if benchlib.out_of_time(need):
        left = benchlib.SETTINGS["deadline"] - time.monotonic()
        when = f"less than {need:g} s away ({max(left, 0):.0f} s)" if need else "past"
        pytest.skip(f"{benchlib.OUT_OF_TIME}: the run's deadline was {when}")


@pytest.fixture(autouse=True)
def _tf32_matmuls(request):
    """A tf32 case runs at torch's fp32 matmul precision "high" (restored after it)."""
    cs = getattr(request.node, "callspec", None)
    case = cs.params.get("case") if cs else None
    tf32 = isinstance(case, benchlib.Case) and case.tf32
    with using_fp32_matmul_precision("high" if tf32 else None):
        yield


@pytest.fixture(autouse=True)
def _release_cuda_cache(request):
    """Untimed runs (the GPU check's prewarm, beside the GPU tests on one GPU) hand the cached
    blocks of each workload back to the device, so that processes sharing it hold only what
    they use."""
    yield
    if benchlib.SETTINGS["disabled"] and torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(scope="session", autouse=True)
def _copy_bandwidth(request):
    """Measure the device copy bandwidth once per session (read + write bytes), if on CUDA."""
    if "cuda" not in _devices(request.config) or benchlib.SETTINGS["copy_gbps"]:
        return
    if benchlib.SETTINGS["disabled"]:
        return
    benchlib.SETTINGS["copy_gbps"] = benchlib.measure_copy_gbps()
    torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_sessionstart(session):
    # The --lrml-jsonl file's first line: the machine, so that a run cut short (reported from
    # this file, without pytest-benchmark's JSON) still names its GPU, versions and commit.
    if benchlib.SETTINGS["jsonl"]:
        benchlib.record({"machine": _machine(session.config)})


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lrml"] = _machine(config)


def _machine(config) -> dict:
    """What the report's header says about the machine and the code measured."""
    commit, dirty = benchlib.commit_info()
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sizes": [s.name for s in config._lrml_sizes],
        "devices": list(_devices(config)),
        # LRML_COMMIT: the commit measured, where the tree was copied without .git (GPU machine);
        # dirty None: unknown (no .git of this tree's own)
        "commit": commit,
        "dirty": dirty,
        "malloc": benchlib.SETTINGS["malloc"],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_sms"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
        info["driver"] = benchlib.nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
        info["copy_gbps"] = benchlib.SETTINGS["copy_gbps"]
    return info


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    cs = getattr(item, "callspec", None)
    if cs is None or "case" not in cs.params:
        return
    item.config._lrml_reported.add(item.nodeid)
    if rep.failed and rep.when in ("setup", "call"):  # listed as not measured, with the error
        crash = getattr(rep.longrepr, "reprcrash", None)
        reason = getattr(crash, "message", None) or str(rep.longrepr).strip().splitlines()[-1]
        _not_measured(item, cs, f"FAILED ({rep.when}): {reason}", failed=True)
        return
    if not rep.skipped:
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    _not_measured(item, cs, reason)


def _not_measured(item, cs, reason: str, failed: bool = False) -> None:
    case = cs.params["case"]
    entry = {
        "name": item.name,
        "provider": cs.params.get("provider"),
        "device": case.device,
        "size": case.size.name,
        "dtype": case.dtype_name,
        "reason": reason.removeprefix("Skipped: ").removeprefix(
            f"{cs.params.get('provider')} on {case.device}: "
        ),
        "failed" if failed else "skipped": True,
    }
    item.config._lrml_skipped.append(entry)
    benchlib.record(entry)


@pytest.hookimpl(tryfirst=True)  # (before pytest-benchmark writes its JSON)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    config._lrml_end = {
        "exitstatus": int(exitstatus),
        "not_run": len([i for i in config._lrml_items if i not in config._lrml_reported]),
    }
    benchlib.record({"end": config._lrml_end})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lrml_skipped"] = config._lrml_skipped
    output_json["lrml_end"] = getattr(config, "_lrml_end", None)
