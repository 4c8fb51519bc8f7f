"""Training never loses work (issue 8): SIGKILL mid-epoch and mid-checkpoint-write, then
``--resume`` reaches the same metrics and the same parameter bits as an uninterrupted run; the
non-finite guard; what a checkpoint records; refusals through the CLI.

The killed runs are real ``python -m lrml_kernels train`` processes. The uninterrupted reference
run and the resumed runs go through the same code in this process (``fit`` and ``cli.main``), all
on the CPU with one thread and the torch backend, so "the same" means bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import backends, data
from lrml_kernels.cli import main
from lrml_kernels.errors import LRMLWarning
from lrml_kernels.training import CHECKPOINT, METRICS, NonFiniteLossError, TrainConfig, fit

# Small torch ops: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(
    data="synthetic-small",
    epochs=3,
    dim=8,
    memory_slots=4,
    negatives=2,
    batch_size=64,
    backend="torch",
    seed=3,
)
TIMING = ("seconds", "pairs_per_s", "eval_seconds")


def cli_args(out: Path, **over) -> list[str]:
    opts = {**OPTS, **over}
    args = ["train", "--out", str(out), "--no-progress", "--threads", "1"]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    return e


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run: (out dir, metrics.json)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted")
    fit(TrainConfig(**OPTS, progress=False), out)
    torch.set_num_threads(old)
    return out, json.loads((out / METRICS).read_text())


def load(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)


def without_timing(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in epochs]


def assert_same_run(out: Path, reference_run) -> None:
    """Metrics (every epoch's loss/HR/nDCG), parameters and optimizer state: bit for bit."""
    ref_out, ref_metrics = reference_run
    metrics = json.loads((out / METRICS).read_text())
    assert without_timing(metrics["epochs"]) == without_timing(ref_metrics["epochs"])
    for k in ("loss", "hr", "ndcg", "epoch", "steps"):
        assert metrics["final"][k] == ref_metrics["final"][k], k
    got, want = load(out), load(ref_out)
    assert got["global_step"] == want["global_step"] and got["epoch"] == want["epoch"]
    for name, t in want["model"].items():
        assert torch.equal(got["model"][name], t), name
    for name, state in want["trainer"]["state"].items():
        for k, v in state.items():
            w = got["trainer"]["state"][name][k]
            assert torch.equal(w, v) if torch.is_tensor(v) else w == v, (name, k)


def resume(out: Path, capsys) -> None:
    assert main(cli_args(out) + ["--resume"]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# SIGKILL
# ----------------------------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, reference_run, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrml_kernels", *cli_args(out, checkpoint_every=1)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen = None
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                ckpt = load(out)
            except (FileNotFoundError, EOFError, RuntimeError):
                ckpt = None  # not written yet (a rename is atomic: never a torn file)
            if ckpt is not None and ckpt["epoch"] >= 1 and ckpt["step_in_epoch"] >= 5:
                proc.send_signal(signal.SIGKILL)
                seen = ckpt["global_step"]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        rc = proc.wait()
        err = proc.stderr.read().decode()
    assert seen is not None, f"the run ended (rc {rc}) before it could be killed:\n{err}"
    assert rc == -signal.SIGKILL
    ckpt = load(out)  # whatever the kill interrupted, the checkpoint on disk is whole
    assert ckpt["global_step"] >= seen and ckpt["epoch"] < OPTS["epochs"]
    resume(out, capsys)
    assert_same_run(out, reference_run)


# Runs `lrml train` with the checkpoint writer patched: the KILL_AT-th checkpoint write puts half
# of its bytes in the temporary file, fsyncs, and SIGKILLs its own process before the rename.
KILL_DURING_WRITE = r"""
import io, os, signal, sys
import lrml_kernels.checkpoints as C
import lrml_kernels.training as T
from lrml_kernels.cli import main

kill_at, real, count = int(os.environ["KILL_AT"]), C.atomic_write, [0]

def atomic_write(path, write):
    if path.name == T.CHECKPOINT:
        count[0] += 1
        if count[0] == kill_at:
            buf = io.BytesIO()
            write(buf)
            blob = buf.getvalue()

            def half(f):
                f.write(blob[: len(blob) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            return real(path, half)
    return real(path, write)

C.atomic_write = atomic_write
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["epoch end", "mid epoch"])
def test_sigkill_during_checkpoint_write_then_resume_matches_uninterrupted(
    tmp_path, reference_run, capsys, where
):
    # With --checkpoint-every 1, epoch 1 writes one checkpoint per step and one at its end.
    split = data.load(OPTS["data"], seed=OPTS["seed"])
    steps = math.ceil(len(split.train.users) / OPTS["batch_size"])
    kill_at = steps + 1 if where == "epoch end" else steps + 11
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, *cli_args(out, checkpoint_every=1)],
        env={**env(), "KILL_AT": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = list(out.glob(f".{CHECKPOINT}.tmp*"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (out / CHECKPOINT).stat().st_size
    ckpt = load(out)  # the previous checkpoint, untouched by the torn write
    if where == "epoch end":  # after the epoch's last step, before its evaluation and record
        assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["history"]) == (0, steps, [])
    else:
        assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 9)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    resume(out, capsys)
    assert_same_run(out, reference_run)
    assert not list(out.glob(".*.tmp*"))  # (the torn write's temporary is deleted)


# ----------------------------------------------------------------------------------------------
# What a checkpoint records, and refusals through the CLI
# ----------------------------------------------------------------------------------------------


def test_checkpoint_records_config_data_rng_and_version(reference_run):
    out, _ = reference_run
    ckpt = load(out)
    assert ckpt["version"] == lk.__version__
    assert ckpt["config"] == dataclasses.asdict(TrainConfig(**OPTS, progress=False))
    split = data.load(OPTS["data"], seed=OPTS["seed"])
    assert ckpt["data_fingerprint"] == split.fingerprint()
    assert (ckpt["num_users"], ckpt["num_items"]) == (split.num_users, split.num_items)
    assert ckpt["world_size"] == 1 and len(ckpt["gen_states"]) == 1
    gen = torch.Generator()
    gen.set_state(ckpt["gen_states"][0])  # a valid generator state
    assert [e["epoch"] for e in ckpt["history"]] == [1, 2, 3]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"seed": 4}, "different data"),
        ({"dim": 16}, "dim: 8 -> 16"),
        ({"optimizer": "sgd"}, "optimizer: 'adam' -> 'sgd'"),
        ({"distance": "l1"}, "distance"),
    ],
)
def test_cli_refuses_an_incompatible_resume(reference_run, capsys, change, words):
    out, _ = reference_run
    before = (out / CHECKPOINT).read_bytes()
    assert main(cli_args(out, **change) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and words in err and "Traceback" not in err
    assert (out / CHECKPOINT).read_bytes() == before


def test_cli_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert main(cli_args(tmp_path / "empty") + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()  # no empty folder left behind


def test_a_run_that_fails_in_set_up_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(cli_args(out, data="csv:" + str(tmp_path / "missing.csv"))) == 2
    assert "missing.csv" in capsys.readouterr().err and not out.exists()


def test_resume_takes_lr_none_and_the_default_lr_as_one(tmp_path, reference_run, capsys):
    ckpt = load(reference_run[0])
    assert ckpt["config"]["lr"] is None  # the reference run used adam's default, 1e-2
    out = tmp_path / "run"
    out.mkdir()
    torch.save(ckpt, out / CHECKPOINT)
    assert main(cli_args(out, lr=0.01) + ["--resume"]) == 0, capsys.readouterr().err
    assert main(cli_args(out, lr=0.02) + ["--resume"]) == 2
    assert "lr: None -> 0.02" in capsys.readouterr().err


def test_cli_refuses_to_resume_fewer_epochs_than_done(reference_run, capsys):
    out, _ = reference_run
    assert main(cli_args(out, epochs=2) + ["--resume"]) == 2
    assert "has 3 epochs done, more than --epochs 2" in capsys.readouterr().err


def test_resume_refuses_options_this_version_does_not_know(tmp_path, reference_run, capsys):
    ckpt = load(reference_run[0])
    ckpt["config"]["weight_decay"] = 0.1
    ckpt["version"] = "9.0.0"
    out = tmp_path / "run"
    out.mkdir()
    torch.save(ckpt, out / CHECKPOINT)
    assert main(cli_args(out) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "lrml_kernels 9.0.0) has options this version" in err and "weight_decay=0.1" in err


def test_a_checkpoint_from_before_model_selection_resumes(tmp_path, reference_run, capsys):
    ckpt = load(reference_run[0])
    for name in ("select_on", "patience", "eval_negatives"):  # options added since
        del ckpt["config"][name]
    out = tmp_path / "run"
    out.mkdir()
    torch.save(ckpt, out / CHECKPOINT)
    resume(out, capsys)  # nothing left to train: the options compared, the data loaded again
    assert_same_run(out, reference_run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_checkpoints_the_step_reached_then_resume_matches_uninterrupted(
    tmp_path, reference_run, capsys, monkeypatch, catchable, signum
):
    """Ctrl-C, and SIGTERM / SIGHUP (kill, timeout, a scheduler, a closed terminal) alike."""
    catchable(signum)
    real = backends.TORCH_BACKEND.hinge_loss_grads
    calls = [0]

    def interrupted(*args):  # the signal during the 30th step
        calls[0] += 1
        if calls[0] == 30:
            os.kill(os.getpid(), signum)
        return real(*args)

    monkeypatch.setattr(backends.TORCH_BACKEND, "hinge_loss_grads", interrupted)
    out = tmp_path / "run"
    assert main(cli_args(out)) == 128 + signum
    err = capsys.readouterr().err
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    assert f"interrupted{by} after step 30 (epoch 1, batch 30)" in err and "--resume" in err
    assert "Traceback" not in err
    assert load(out)["global_step"] == 30 and load(out)["step_in_epoch"] == 30
    monkeypatch.undo()
    resume(out, capsys)
    assert_same_run(out, reference_run)


def test_an_ignored_sighup_stays_ignored(tmp_path, monkeypatch, capsys):
    """Under nohup SIGHUP is ignored: training must not take it as a stop."""
    real = backends.TORCH_BACKEND.hinge_loss_grads
    calls = [0]

    def hung_up(*args):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(*args)

    monkeypatch.setattr(backends.TORCH_BACKEND, "hinge_loss_grads", hung_up)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert main(cli_args(tmp_path / "run", epochs=1)) == 0, capsys.readouterr().err
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(cli_args(out, epochs=1, select_on="valid")) == 0
    assert (out / "best.pt").exists()
    before = (out / CHECKPOINT).read_bytes()
    assert main(cli_args(out, epochs=1)) == 2
    assert "holds a run (checkpoint.pt): continue it with --resume" in capsys.readouterr().err
    assert (out / CHECKPOINT).read_bytes() == before
    assert main(cli_args(out, epochs=1) + ["--resume", "--overwrite"]) == 2
    assert main(cli_args(out, epochs=1) + ["--overwrite"]) == 0
    assert not (out / "best.pt").exists()  # the earlier run's, gone with it
    assert "wrote " + str(out) + "/metrics.json, learning_curve.png, checkpoint.pt\n" in (
        capsys.readouterr().err
    )
    # without --out: runs/latest, which each run replaces
    monkeypatch.chdir(tmp_path)
    args = cli_args(out, epochs=1)[3:]  # no --out
    assert main(["train", *args]) == 0 and main(["train", *args]) == 0
    assert (tmp_path / "runs" / "latest" / CHECKPOINT).exists()
    # a baseline's folder and a training run's are not replaced by the other command either
    # (only checkpoint.pt was looked for: metrics.json was replaced in silence)
    pop = tmp_path / "pop"
    baseline = ["baseline", "popularity", "--data", "synthetic-small", "--eval", "sampled"]
    assert main([*baseline, "--out", str(pop)]) == 0
    doc = (pop / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(cli_args(pop, epochs=1)) == 2
    assert "holds a run (metrics.json): replace it with --overwrite" in capsys.readouterr().err
    assert main([*baseline, "--out", str(out)]) == 2
    assert f"--out {out} holds a run (checkpoint.pt)" in capsys.readouterr().err
    assert (pop / "metrics.json").read_bytes() == doc and (out / CHECKPOINT).exists()
    assert main([*baseline, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # the run's files gone too
    assert main([*baseline]) == 0 and main([*baseline]) == 0  # runs/popularity: replaced


# ----------------------------------------------------------------------------------------------
# Non-finite loss or gradient
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def poison_step(monkeypatch):
    """``poison_step(k)``: the k-th fused step's loss and gradients become NaN (once)."""

    def arm(k: int):
        real = backends.TORCH_BACKEND.hinge_loss_grads
        calls = [0]

        def poisoned(*args):
            calls[0] += 1
            out = real(*args)
            return tuple(t * float("nan") for t in out) if calls[0] == k else out

        monkeypatch.setattr(backends.TORCH_BACKEND, "hinge_loss_grads", poisoned)
        return calls

    return arm


def small_cfg(**over) -> TrainConfig:
    return TrainConfig(**{**OPTS, "epochs": 1, "eval": "none", "progress": False, **over})


def test_nonfinite_stop_names_the_step_and_never_checkpoints_it(tmp_path, poison_step):
    poison_step(5)
    with pytest.raises(NonFiniteLossError) as info:
        fit(small_cfg(checkpoint_every=1), tmp_path)
    ckpt = load(tmp_path)  # the last good checkpoint: after step 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert ckpt["global_step"] == 4
    assert re.search(r"step 5\b", str(info.value)), str(info.value)


def test_nonfinite_stop_names_the_first_bad_step_at_the_next_loss_read(tmp_path, poison_step):
    # The loss is read back every READ_LOSS_EVERY steps and before every checkpoint (no host sync
    # per step): the steps after the bad one run until that read, which names the bad step and
    # comes before the checkpoint that would have saved the poisoned model.
    calls = poison_step(13)
    with pytest.raises(NonFiniteLossError, match=r"step 13\b"):
        fit(small_cfg(checkpoint_every=10), tmp_path)
    assert calls[0] == 20  # the read before the checkpoint of step 20
    assert load(tmp_path)["global_step"] == 10


def test_cli_reports_nonfinite_loss_as_an_error(tmp_path, poison_step, capsys):
    poison_step(5)
    rc = main(cli_args(tmp_path, epochs=1, eval="none"))
    err = capsys.readouterr().err
    assert rc != 0 and "non-finite" in err and "step" in err


def test_nonfinite_skip_skips_the_step_and_finishes(tmp_path, poison_step):
    calls = poison_step(5)
    with pytest.warns(LRMLWarning, match="steps skipped"):
        result = fit(small_cfg(on_nonfinite="skip", checkpoint_every=1), tmp_path / "full")
    assert calls[0] == result["final"]["steps"] > 5  # every step ran
    assert torch.isfinite(torch.tensor(result["final"]["loss"]))
    ckpt = load(tmp_path / "full")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # The skipped step changed nothing: 5 steps with the 5th skipped leave exactly the
    # parameters of 4 clean steps.
    assert result["final"]["skipped_steps"] == 1
    calls = poison_step(5)
    with pytest.warns(LRMLWarning, match="epoch 1: 1 of 5 steps skipped"):
        r5 = fit(small_cfg(on_nonfinite="skip", max_steps=5), tmp_path / "five")
    assert calls[0] == 5
    poison_step(10**9)
    r4 = fit(small_cfg(max_steps=4), tmp_path / "four")
    five, four = load(tmp_path / "five")["model"], load(tmp_path / "four")["model"]
    for name, t in four.items():
        assert torch.equal(five[name], t), name
    # the epoch's loss is the mean over the steps applied (was: over every row, the skipped
    # step's as 0)
    assert r5["final"]["loss"] == r4["final"]["loss"] and "skipped_steps" not in r4["final"]


def test_nonfinite_skip_of_every_step_is_an_error_not_a_loss_of_0(tmp_path, monkeypatch):
    # (an epoch whose steps were all skipped reported loss 0.0, HR 0, and the run went on)
    real = backends.TORCH_BACKEND.hinge_loss_grads

    def poisoned(*args):
        return tuple(t * float("nan") for t in real(*args))

    monkeypatch.setattr(backends.TORCH_BACKEND, "hinge_loss_grads", poisoned)
    with pytest.raises(NonFiniteLossError, match="every step of epoch 1 .* was skipped"):
        fit(small_cfg(on_nonfinite="skip"), tmp_path)


# Runs `lrml train` with the writer of KILL_FILE patched: it waits (up to 3 s) for metrics.json to
# hold WAIT_FOR (default: the run's final metrics), then SIGKILLs its own process before the file
# is written.
KILL_BEFORE_FILE = r"""
import os, signal, sys, time
from pathlib import Path
import lrml_kernels.checkpoints as C
import lrml_kernels.training as T
from lrml_kernels.cli import main

real = C.atomic_write

def atomic_write(path, write):
    if path.name == os.environ["KILL_FILE"]:
        metrics, deadline = Path(path).with_name(T.METRICS), time.monotonic() + 3
        wait_for = os.environ.get("WAIT_FOR", '"final"')
        while time.monotonic() < deadline and not (
            metrics.exists() and wait_for in metrics.read_text()
        ):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write)

C.atomic_write = atomic_write
sys.exit(main(sys.argv[1:]))
"""


def test_metrics_never_list_an_epoch_the_checkpoint_lacks(tmp_path):
    # Killed at epoch 1's checkpoint write, after waiting up to 3 s for metrics.json to appear:
    # metrics.json is written once the checkpoint is on disk, so it must not exist yet.
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_FILE, *cli_args(out)],
        env={**env(), "KILL_FILE": CHECKPOINT, "WAIT_FOR": '"epochs"'},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / CHECKPOINT).exists() and not (out / METRICS).exists()


@pytest.mark.parametrize(
    "name, over",
    [
        ("best.pt", {"epochs": 2, "select_on": "valid"}),  # the selected epoch's model
        (CHECKPOINT, {"max_steps": 5}),  # the step that --max-steps stops at
    ],
)
def test_metrics_report_the_final_metrics_only_once_the_files_hold_them(
    tmp_path, capsys, name, over
):
    out = tmp_path / "run"
    argv = cli_args(out, **over)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_FILE, *argv],
        env={**env(), "KILL_FILE": name},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / name).exists()
    metrics = out / METRICS  # nothing claims the file yet
    assert not metrics.exists() or "final" not in json.loads(metrics.read_text())
    if name == "best.pt":
        assert main(argv + ["--resume"]) == 0, capsys.readouterr().err
        final = json.loads((out / METRICS).read_text())["final"]
        best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
        assert best["epoch"] == final["selected_epoch"]


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_trains(tmp_path, error_line):
    """Both exited 0 before, the folder ending with one run's checkpoint and the other's best.pt.
    A run holds a flock on its --out (here taken as another process would hold it)."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(cli_args(out, epochs=1)) == 2
        assert f"--out {out} is in use: another process is training into it" in error_line("train")
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    assert main(cli_args(out, epochs=1)) == 0  # released: the run goes ahead
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and lets go at its end
    finally:
        os.close(fd)
