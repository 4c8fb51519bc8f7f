"""Run one pytest selection as several processes at once, for the GPU check.

A fresh GPU machine compiles every Triton kernel variant (and every torch.compile graph) on its
host, one at a time in a process: the GPU test matrix is bound by those compiles, not by the GPU.
Split over processes, the machine's cores compile in parallel (Triton's and Inductor's on-disk
caches are shared and written atomically, so processes that meet the same kernel only repeat
work).

Usage::

    python benchmarks/pytest_shards.py --shards S --log LOG PATH... -- PYTEST_OPTION...

collects the tests of ``PATH... PYTEST_OPTION...`` (``pytest --collect-only -q``), deals them
round-robin into S shards (fewer if there are fewer tests), runs ``python -m pytest
PYTEST_OPTION... <the shard's test ids>`` for every shard at once, and writes LOG: each shard's
output in turn under a ``=== shard i/S`` header, then one line that sums them, ``sharded: 120
passed, 7 skipped in 61 s (6 shards)``, which is also printed. The exit status is 0 when every
shard passed (pytest's 5, "no tests", counts as passed), else the first failing shard's. SIGINT
or SIGTERM is passed on to every shard as SIGINT (pytest still reports), and LOG is still written.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTCOMES = ("failed", "passed", "skipped", "xfailed", "xpassed", "error", "errors", "deselected")
_COUNT = re.compile(r"(\d+) (" + "|".join(OUTCOMES) + r")\b")


def collect(paths: list[str], options: list[str]) -> list[str]:
    """The test ids of a selection, in pytest's order (its modifyitems hooks included)."""
    options = [o for o in options if not re.fullmatch(r"-[qv]+|--quiet|--verbose", o)]
    run = subprocess.run(  # one -q: one id a line (-qq would give counts per file)
        [sys.executable, "-m", "pytest", *paths, *options, "--collect-only", "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode not in (0, 5):
        raise SystemExit(f"pytest_shards: collection failed (rc={run.returncode}):\n{run.stdout}")
    ids = []
    for line in run.stdout.splitlines():  # the ids, one a line, end at the first blank line
        if not line.strip():
            break
        if "::" in line:
            ids.append(line)
    return ids


def deal(ids: list[str], shards: int) -> list[list[str]]:
    """Round-robin: neighbours in pytest's order (often one kernel's variants) go apart."""
    shards = min(shards, len(ids))
    return [ids[i::shards] for i in range(shards)]


def totals(outputs: list[str]) -> dict[str, int]:
    """Outcome counts summed over the shards' final summary lines."""
    sums: dict[str, int] = {}
    for text in outputs:
        lines = [line for line in text.splitlines() if _COUNT.search(line) and " in " in line]
        for count, what in _COUNT.findall(lines[-1] if lines else ""):
            what = "errors" if what == "error" else what
            sums[what] = sums.get(what, 0) + int(count)
    return sums


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    t0 = time.monotonic()
    ids = collect(args.paths, options)
    if not ids:  # (pytest given no ids would run its whole test path)
        args.log.write_text("sharded: no tests collected\n")
        print("sharded: no tests collected")
        return 0
    groups = deal(ids, args.shards)
    procs, files = [], []
    stop = []

    def forward(signum, frame):  # stop the shards; the loop below still gathers their output
        stop.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(groups):
            files.append(open(Path(tmp, f"shard{i}.log"), "w+"))  # noqa: SIM115 (closed below)
            cmd = [sys.executable, "-m", "pytest", *options, *group]
            procs.append(subprocess.Popen(cmd, stdout=files[-1], stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        outputs = []
        for f in files:
            f.seek(0)
            outputs.append(f.read())
            f.close()
    for s, handler in old.items():
        signal.signal(s, handler)
    failed = [c for c in codes if c not in (0, 5)]
    sums = totals(outputs)
    summary = ", ".join(f"{n} {what}" for what, n in sums.items()) or "no tests ran"
    line = f"sharded: {summary} in {time.monotonic() - t0:.0f} s ({len(groups)} shards)"
    if stop:
        line += f"; stopped by signal {stop[0]}"
    with open(args.log, "w") as log:
        for i, (group, text) in enumerate(zip(groups, outputs, strict=True)):
            log.write(f"=== shard {i + 1}/{len(groups)}: {len(group)} tests, rc={codes[i]}\n")
            log.write(text if text.endswith("\n") else text + "\n")
        log.write(line + "\n")
    print(line)
    return failed[0] if failed else (128 + stop[0] if stop else 0)


if __name__ == "__main__":
    sys.exit(main())
