"""Run one pytest selection as several processes at once, for the GPU check.

A fresh GPU machine compiles every Triton kernel variant (and every torch.compile graph) on its
host, one at a time in a process: the GPU test matrix is bound by those compiles, not by the GPU.
Split over processes, the machine's cores compile in parallel (Triton's and Inductor's on-disk
caches are shared and written atomically, so processes that meet the same kernel only repeat
work).

Usage::

    python benchmarks/pytest_shards.py --shards S --log LOG [--grace G] [--hang-dump H]
                                       [--work DIR] PATH... -- PYTEST_OPTION...

collects the tests of ``PATH... PYTEST_OPTION...`` (``pytest --collect-only -q``), deals them
round-robin into S shards (fewer if there are fewer tests), runs ``pytest PYTEST_OPTION... <the
shard's test ids>`` for every shard at once, and writes LOG: each shard's output in turn under a
``=== shard i/S`` header, then one line that sums them, ``sharded: 120 passed, 7 skipped in 61 s
(6 shards)``, which is also printed. Tests that never ran (the run was stopped, a shard died) are
counted in it (``4 not run``), and a test still running when the run stopped is named.

Nothing is lost when this process is killed: each shard writes its output straight into a file of
DIR (``--work``; default a temporary folder, removed at the end), and LOG is rewritten from those
files every second while the shards run (headed "running"). Each shard runs in a session of its
own (a signal to this process's group does not reach it) and dies with this process. A small
plugin in each shard records which test starts and how it ends (so a hung test is named) and dumps
every thread's stack on SIGUSR1; ``--hang-dump H`` adds ``-o faulthandler_timeout=H`` (a test
running longer than H seconds dumps its stack into the log).

SIGINT or SIGTERM: every shard gets SIGUSR1 (its stacks) and one SIGINT (pytest still reports);
a shard still running G seconds later (``--grace``, default 2) is killed; LOG is written. The exit
status is 0 when every shard passed (pytest's 5, "no tests", counts as passed), else the first
failing shard's (128 + N for a shard killed by signal N), else 128 + the signal that stopped the
run; a collection that fails exits with pytest's status and LOG holds its stdout and stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTCOMES = ("failed", "passed", "skipped", "xfailed", "xpassed", "error", "errors", "deselected")
_COUNT = re.compile(r"(\d+) (" + "|".join(OUTCOMES) + r")\b")
ORDER = ("failed", "passed", "skipped", "xfailed", "xpassed", "errors", "deselected")
WORKER = "--shard-worker"  # argv[1] of a shard: this file runs pytest with the plugin below
SNAPSHOT_S = 1.0  # LOG is rewritten this often while the shards run


# ----------------------------------------------------------------------------------------------
# In each shard: pytest with a plugin that records progress


class ShardProgress:
    """pytest plugin of a shard: ``start ID`` and ``end OUTCOME ID`` lines into a file, flushed
    at once; SIGUSR1 dumps every thread's stack into the shard's output."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        self.outcome: dict[str, str] = {}

    def pytest_configure(self, config):
        import faulthandler

        # fd 2 is the shard's output file here (pytest captures it only while a test runs)
        self._err = os.fdopen(os.dup(2), "w")
        faulthandler.register(signal.SIGUSR1, file=self._err, all_threads=True)
        self.file.write("ready\n")

    def pytest_runtest_logstart(self, nodeid, location):
        self.file.write(f"start\t{nodeid}\n")

    def pytest_runtest_logreport(self, report):
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            new = "failed" if report.when == "call" else "errors"
        elif report.skipped:
            new = "xfailed" if xfail else "skipped"
        elif report.when == "call":
            new = "xpassed" if xfail else "passed"
        else:
            return
        if self.outcome.get(report.nodeid) not in ("failed", "errors"):
            self.outcome[report.nodeid] = new

    def pytest_runtest_logfinish(self, nodeid, location):
        self.file.write(f"end\t{self.outcome.get(nodeid, 'passed')}\t{nodeid}\n")


def worker(argv: list[str]) -> int:
    """``pytest_shards.py --shard-worker PROGRESS PYTEST_ARG...``: one shard."""
    sys.path[0] = os.getcwd()  # as `python -m pytest` (not this script's folder)
    import pytest

    return int(pytest.main(argv[1:], plugins=[ShardProgress(argv[0])]))


# ----------------------------------------------------------------------------------------------
# The parent


def collect(paths: list[str], options: list[str], stopped) -> tuple[list[str], str, int]:
    """(the test ids of a selection in pytest's order, pytest's output, its exit status)."""
    options = [o for o in options if not re.fullmatch(r"-[qv]+|--quiet|--verbose", o)]
    proc = subprocess.Popen(  # one -q: one id a line (-qq would give counts per file)
        [sys.executable, "-m", "pytest", *paths, *options, "--collect-only", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()),
    )  # fmt: skip
    sent = None
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if stopped() and sent is None:
                sent = time.monotonic()
                _signal_group(proc, signal.SIGINT)
            elif sent is not None and time.monotonic() - sent > 2:
                _signal_group(proc, signal.SIGKILL)
    text = out + (f"\n--- stderr ---\n{err}" if err.strip() else "")
    ids = []
    for line in out.splitlines():  # the ids, one a line, end at the first blank line
        if not line.strip():
            break
        if "::" in line:
            ids.append(line)
    return ids, text, proc.returncode


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


def _die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGKILL when this process dies (Linux), whatever kills it."""

    def preexec():
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(137)

    return preexec


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the shard leads its own session: its helpers too


class Shard:
    def __init__(self, i: int, ids: list[str], work: Path):
        self.i, self.ids = i, ids
        self.out = work / f"shard{i + 1}.log"
        self.progress = work / f"shard{i + 1}.progress"
        self.proc: subprocess.Popen | None = None
        self.started = time.monotonic()
        self.killed = False

    def start(self, options: list[str]) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), WORKER, str(self.progress),
               *options, *self.ids]  # fmt: skip
        with open(self.out, "ab") as fh:  # the shard writes it itself: nothing in between
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )  # fmt: skip

    def note(self, text: str) -> None:
        """A line of this process's into the shard's output (both append)."""
        with contextlib.suppress(OSError), open(self.out, "a") as fh:
            fh.write(f"\n--- pytest_shards: {text}\n")

    def text(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except OSError:
            return ""

    def state(self) -> tuple[dict[str, int], set[str], list[str], bool]:
        """(outcome counts of the tests that ended, the ids that started, those still running,
        whether the plugin ran)."""
        try:
            lines = self.progress.read_text().splitlines()
        except OSError:
            lines = []
        counts: dict[str, int] = {}
        started, running = set(), {}
        for line in lines:
            parts = line.split("\t")
            if parts[0] == "start" and len(parts) == 2:
                started.add(parts[1])
                running[parts[1]] = True
            elif parts[0] == "end" and len(parts) == 3:
                counts[parts[1]] = counts.get(parts[1], 0) + 1
                running.pop(parts[2], None)
        return counts, started, list(running), "ready" in lines


def _summary(shards: list[Shard]) -> tuple[str, list[str], int]:
    """(outcome counts as text, the ids still running, the tests that never started)."""
    sums: dict[str, int] = {}
    running: list[str] = []
    not_run = 0
    for sh in shards:
        counts, started, now, plugin = sh.state()
        if not plugin:  # (the plugin did not load: pytest's own summary line)
            counts = totals([sh.text()])
            done = sum(v for k, v in counts.items() if k != "deselected")
            not_run += max(0, len(sh.ids) - done)
        else:
            not_run += len(set(sh.ids) - started)
        running += now
        for what, n in counts.items():
            sums[what] = sums.get(what, 0) + n
    parts = [f"{sums[w]} {w}" for w in ORDER if sums.get(w)]
    parts += [f"{n} {w}" for w, n in sums.items() if w not in ORDER and n]
    if running:
        parts.append(f"{len(running)} interrupted")
    if not_run:
        parts.append(f"{not_run} not run")
    return ", ".join(parts) or "no tests ran", running, not_run


def write_log(path: Path, shards: list[Shard], codes: list[int | None], last: str) -> None:
    """LOG: each shard's output under its header, then ``last``; replaced in one step."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as log:
        for sh, code in zip(shards, codes, strict=True):
            if code is None:
                state = f"running ({time.monotonic() - sh.started:.0f} s)"
            elif sh.killed:
                state = f"killed after the grace (rc={code})"
            else:
                state = f"rc={code}"
            log.write(f"=== shard {sh.i + 1}/{len(shards)}: {len(sh.ids)} tests, {state}\n")
            text = sh.text()
            log.write(text if text.endswith("\n") or not text else text + "\n")
        log.write(last + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER]:
        return worker(argv[1:])
    options = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--grace", type=float, default=2.0, help="seconds from SIGINT to SIGKILL")
    ap.add_argument("--hang-dump", type=float, default=None, help="faulthandler_timeout (s)")
    ap.add_argument("--work", type=Path, default=None, help="the shards' output files (kept)")
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    t0 = time.monotonic()
    stop: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # fmt: skip
    try:
        with contextlib.ExitStack() as stack:
            work = args.work
            if work is None:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            work.mkdir(parents=True, exist_ok=True)
            return _run(args, options, work, stop, t0)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _run(args, options: list[str], work: Path, stop: list[int], t0: float) -> int:
    args.log.write_text(f"pytest_shards: collecting {' '.join(args.paths)} ...\n")
    ids, text, rc = collect(args.paths, options, lambda: bool(stop))
    if rc not in (0, 5) or stop:
        why = f"stopped by signal {stop[0]}" if stop else f"rc={rc}"
        line = f"pytest_shards: collection failed ({why}):"
        args.log.write_text(f"{line}\n{text.rstrip()}\n{line}\n")
        print(f"{line}\n{text.rstrip()}")
        return rc if rc not in (0, 5) else 128 + stop[0]
    if not ids:  # (pytest given no ids would run its whole test path)
        args.log.write_text("sharded: no tests collected\n")
        print("sharded: no tests collected")
        return 0
    if args.hang_dump:
        options = ["-o", f"faulthandler_timeout={args.hang_dump:g}", *options]
    shards = [Shard(i, group, work) for i, group in enumerate(deal(ids, args.shards))]
    for sh in shards:
        sh.start(options)
    stopped_at = None
    last_snapshot = 0.0
    while True:
        codes = [sh.proc.poll() for sh in shards]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        if stop and stopped_at is None:  # one SIGUSR1 (stacks), one SIGINT per shard
            stopped_at = now
            for sh, c in zip(shards, codes, strict=True):
                if c is None:
                    what = ", ".join(sh.state()[2]) or "no test"
                    sh.note(f"stopped by signal {stop[0]} after {now - t0:.0f} s, running {what}: "
                            "every thread's stack (SIGUSR1), then SIGINT")  # fmt: skip
                    if sh.state()[3]:
                        _signal_group(sh.proc, signal.SIGUSR1)
                        time.sleep(0.05)
                    _signal_group(sh.proc, signal.SIGINT)
        elif stopped_at is not None and now - stopped_at > args.grace:
            for sh, c in zip(shards, codes, strict=True):
                if c is None:
                    sh.killed = True
                    sh.note(f"still running {args.grace:g} s after SIGINT: killed (SIGKILL)")
                    _signal_group(sh.proc, signal.SIGKILL)
            for sh in shards:
                sh.proc.wait()
            continue
        if now - last_snapshot >= SNAPSHOT_S:
            last_snapshot = now
            counts, running, _ = _summary(shards)
            line = f"sharded (running, {now - t0:.0f} s): {counts} so far ({len(shards)} shards)"
            if running:
                line += f"; running now: {', '.join(running)}"
            write_log(args.log, shards, codes, line)
        time.sleep(0.1)
    codes = [sh.proc.returncode for sh in shards]
    summary, running, not_run = _summary(shards)
    line = f"sharded: {summary} in {time.monotonic() - t0:.0f} s ({len(shards)} shards)"
    if stop:
        line += f"; stopped by signal {stop[0]}"
    if running:
        line += f"; still running when stopped: {', '.join(running)}"
    write_log(args.log, shards, codes, line)
    print(line)
    failed = [128 - c if c < 0 else c for c in codes if c not in (0, 5)]
    if failed:
        return failed[0]
    if stop:
        return 128 + stop[0]
    return 1 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
