"""Time the data set-up that ``lrml train --data NAME`` does before its first step.

    PYTHONPATH=. python benchmarks/data_setup.py [NAME] [--compiled-only]
    PYTHONPATH=. python benchmarks/data_setup.py --first-step [lrml train options]

Runs the set-up twice in one process, side by side: on the numpy code alone (what runs where the
C++ extension cannot load, and what ran before its set-up ops existed) and with the extension's
ops (``csrc/cpu/synthetic_cpu.cpp``, ``csrc/cpu/split_cpu.cpp``) on the synthetic data set NAME
(default synthetic-netflix). Prints wall and CPU seconds of each stage: generating the synthetic
log, the leave-one-out split (the evaluation negatives, part of it, also on their own), and the
split's fingerprint; then the fingerprints (equal: the same data, bit for bit) and the peak
memory. CPU time is the figure to compare on a shared machine, where wall time depends on the
other processes. ``--compiled-only`` skips the numpy run.

``--first-step``: the whole start-up instead, in this process (start it fresh): the seconds
from the start of the process to the end of the first training step of ``lrml train`` with
the options given (e.g. ``--data synthetic-netflix --max-steps 1 --eval none --no-progress``),
imports included.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # (before the imports: --first-step counts them)

import gc  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

from lrml_kernels.data import split as S  # noqa: E402
from lrml_kernels.data import synthetic_data as SD  # noqa: E402
from lrml_kernels.data._compiled import plain_pages  # noqa: E402
from lrml_kernels.data.sources import SYNTHETIC  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(name: str) -> tuple[list[tuple[str, float, float]], str, int]:
    """``(stages [(label, wall, cpu)], fingerprint, rows)`` of one set-up of ``name``."""
    stages: list[tuple[str, float, float]] = []
    inner: list[tuple[str, float, float]] = []  # printed after the stage that contains it
    real = S.sample_eval_negatives

    def negatives(*args, **kwargs):
        t, c = time.perf_counter(), cpu()
        out = real(*args, **kwargs)
        inner.append(("  of which negatives", time.perf_counter() - t, cpu() - c))
        return out

    S.sample_eval_negatives = negatives
    with plain_pages():  # (as data.load)
        u, i, n = SYNTHETIC[name]
        t0, c0 = time.perf_counter(), cpu()
        t, c = t0, c0

        def stage(label: str) -> None:
            nonlocal t, c
            stages.append((label, time.perf_counter() - t, cpu() - c))
            t, c = time.perf_counter(), cpu()

        x = SD.synthetic(u, i, n, seed=0, name=name)
        rows = len(x)
        stage("synthetic")
        split = S._leave_one_out(x, 100, 0, consume=True, hash_ahead=True)  # as data.load
        del x
        stage("split + negatives")
        stages += inner
        fingerprint = split.fingerprint()
        stage("fingerprint")
        stages.append(("total", time.perf_counter() - t0, cpu() - c0))
    S.sample_eval_negatives = real
    return stages, fingerprint, rows


def main(name: str = "synthetic-netflix", *flags: str) -> None:
    SD.synthetic(300, 200, 6_000)  # load the extension (and build it if needed) before timing
    runs = {}
    if "--compiled-only" not in flags:
        real = S.data_op, SD.data_op
        S.data_op = SD.data_op = lambda op: None  # as where the extension cannot load
        try:
            runs["numpy"] = run(name)
        finally:
            S.data_op, SD.data_op = real
        gc.collect()
    if S.data_op("latest_rows") is not None:
        runs["extension"] = run(name)
    labels = [label for label, _, _ in next(iter(runs.values()))[0]]
    print(f"{'':22s}" + "".join(f"{k + ' wall':>16s}{k + ' CPU':>15s}" for k in runs))
    for j, label in enumerate(labels):
        cells = "".join(f"{s[j][1]:14.2f} s{s[j][2]:13.2f} s" for s, _, _ in runs.values())
        print(f"{label:22s}{cells}")
    if len(runs) == 2:
        (a, _, _), (b, _, _) = runs.values()
        print(
            f"{'total, numpy / ext':22s}{a[-1][1] / b[-1][1]:14.2f} x{a[-1][2] / b[-1][2]:13.2f} x"
        )
    for k, (_, fingerprint, rows) in runs.items():
        print(f"{k}: {rows:,} rows, fingerprint {fingerprint[:16]}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB")


def first_step(argv: list[str]) -> int:
    """``lrml train ARGV``, printing when its first step has run (seconds since start-up)."""
    from lrml_kernels import cli, training

    build = training.build

    def timed_build(*args, **kwargs):
        model, stepper = build(*args, **kwargs)
        step = stepper.step

        def first(*a, **k):
            out = step(*a, **k)
            stepper.step = step
            print(
                f"first step done {time.perf_counter() - STARTED:.2f} s after start-up "
                f"({cpu():.2f} s CPU)",
                file=sys.stderr,
                flush=True,
            )
            return out

        stepper.step = first
        return model, stepper

    training.build = timed_build
    return cli.main(["train", *argv])


def parse(argv: list[str]) -> tuple[str, tuple[str, ...]]:
    """(the data set's name, the flags) of the set-up timing's command line, in any order."""
    import argparse

    ap = argparse.ArgumentParser(prog="data_setup.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", default="synthetic-netflix", choices=sorted(SYNTHETIC))
    ap.add_argument("--compiled-only", action="store_true", help="skip the numpy run")
    args = ap.parse_args(argv)
    return args.name, ("--compiled-only",) if args.compiled_only else ()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first-step"]:
        sys.exit(first_step(sys.argv[2:]))
    name, flags = parse(sys.argv[1:])
    main(name, *flags)
