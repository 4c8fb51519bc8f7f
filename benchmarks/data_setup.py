"""Time the data set-up that ``lrml train --data NAME`` does before its first step.

    PYTHONPATH=. python benchmarks/data_setup.py [synthetic-netflix]

Prints wall and CPU seconds of each stage: generating the synthetic log, the leave-one-out split
(the evaluation negatives, part of it, also on their own), and the split's fingerprint, then the
fingerprint itself (equal fingerprints: the same data, bit for bit) and the peak memory. CPU time
is the figure to compare on a shared machine, where wall time depends on the other processes.
"""

from __future__ import annotations

import resource
import sys
import time

from lrml_kernels.data import split as S
from lrml_kernels.data.sources import SYNTHETIC
from lrml_kernels.data.synthetic_data import synthetic


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(name: str = "synthetic-netflix") -> None:
    stages: list[tuple[str, float, float]] = []
    inner: list[tuple[str, float, float]] = []  # printed after the stage that contains it
    real = S.sample_eval_negatives

    def negatives(*args, **kwargs):
        t, c = time.perf_counter(), cpu()
        out = real(*args, **kwargs)
        inner.append(("  of which negatives", time.perf_counter() - t, cpu() - c))
        return out

    S.sample_eval_negatives = negatives
    u, i, n = SYNTHETIC[name]
    t0, c0 = time.perf_counter(), cpu()
    t, c = t0, c0

    def stage(label: str) -> None:
        nonlocal t, c
        stages.append((label, time.perf_counter() - t, cpu() - c))
        t, c = time.perf_counter(), cpu()

    x = synthetic(u, i, n, seed=0, name=name)
    stage("synthetic")
    split = S._leave_one_out(x, 100, 0, consume=True)  # what data.load does
    stage("split + negatives")
    stages += inner
    fingerprint = split.fingerprint()
    stage("fingerprint")
    stages.append(("total", time.perf_counter() - t0, cpu() - c0))
    for label, wall, cpu_s in stages:
        print(f"{label:22s} {wall:7.2f} s wall {cpu_s:7.2f} s CPU")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{len(x):,} rows, fingerprint {fingerprint[:16]}, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
