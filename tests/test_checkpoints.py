"""Checkpoints cannot run code (issue 19): a malicious pickle is refused without executing it,
foreign and damaged files get one clear error line, and a checkpoint holding more than plain
values (an earlier version's) is refused with the way to convert it, which then works."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lrml_kernels import checkpoints
from lrml_kernels.checkpoints import CheckpointError
from lrml_kernels.cli import main
from lrml_kernels.training import CHECKPOINT, TrainConfig, fit, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = dict(
    data="synthetic-small",
    epochs=1,
    dim=8,
    memory_slots=4,
    negatives=2,
    batch_size=256,
    backend="torch",
    eval="none",
    max_steps=4,
    checkpoint_every=2,
)


class RunsCode:
    """Unpickling this object runs ``touch MARKER`` (``os.system``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint written by ``fit`` (mid-epoch: it can be resumed) and its directory."""
    out = tmp_path_factory.mktemp("good")
    fit(TrainConfig(**OPTS, progress=False), out)
    return out / CHECKPOINT


def plain_dict(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_args(out, *extra) -> list[str]:
    args = ["train", "--out", str(out), "--no-progress", "--threads", "1"]
    for k, v in OPTS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + list(extra)


# ----------------------------------------------------------------------------------------------
# A malicious pickle
# ----------------------------------------------------------------------------------------------


def malicious(path, marker, fmt: str) -> None:
    """A checkpoint-looking file whose unpickling would create ``marker``."""
    ckpt = {"config": {}, "model": {}, "num_users": 1, "num_items": 1, "evil": RunsCode(marker)}
    if fmt == "torch.save":
        torch.save(ckpt, path)
    else:  # a bare pickle, as a foreign tool might write
        with open(path, "wb") as f:
            pickle.dump(ckpt, f)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_a_malicious_checkpoint_does_not_run_its_code(tmp_path, fmt):
    marker = tmp_path / "marker"
    path = tmp_path / CHECKPOINT
    malicious(path, marker, fmt)
    with pytest.raises(CheckpointError) as info:
        checkpoints.read(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
    if fmt == "torch.save":  # the refusal names what the file would have run
        assert "posix.system" in str(info.value) and "convert-checkpoint" in str(info.value)
    else:
        assert "not a whole torch.save zip archive" in str(info.value)


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_cli_refuses_a_malicious_checkpoint_in_one_line(tmp_path, error_line, no_data, fmt):
    marker = tmp_path / "marker"
    malicious(tmp_path / CHECKPOINT, marker, fmt)
    assert main(["evaluate", str(tmp_path / CHECKPOINT)]) == 2
    error_line("evaluate")
    assert main(train_args(tmp_path, "--resume")) == 2  # refused before any data is loaded
    error_line("train")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Foreign and damaged files
# ----------------------------------------------------------------------------------------------


def write_foreign(path, kind: str, good_path) -> None:
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "json":
        path.write_text('{"model": {}}')
    elif kind == "truncated":
        blob = good_path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind in ("a bit flipped in a weight", "a name changed in its pickle"):
        # (torch.load reads both without a complaint: it does not check the CRC-32s)
        blob = bytearray(good_path.read_bytes())
        if kind == "a bit flipped in a weight":
            weights = plain_dict(good_path)["model"]["user_emb"].numpy().tobytes()
            at = blob.find(weights) + len(weights) // 2
            blob[at] ^= 0x10
        else:  # an option this version does not know would be left out
            at = blob.find(b"on_nonfinite")
            blob[at : at + 12] = b"on_nonfinitf"
        path.write_bytes(blob)
    elif kind == "a member flagged as a directory":
        # one bit of the central directory: torch.load would read uninitialised memory for it
        blob = bytearray(good_path.read_bytes())
        entry = blob.find(b"PK\x01\x02")  # the first member's central-directory record
        blob[entry + 38] ^= 0x10  # its external attributes: the MS-DOS directory bit
        path.write_bytes(blob)
    elif kind == "a bit flipped in the end-of-archive record":
        blob = bytearray(good_path.read_bytes())
        blob[-37] ^= 1  # the zip64 locator's disk count: zipfile.is_zipfile raises
        path.write_bytes(blob)
    elif kind == "a pickle that makes the loader raise TypeError":
        # a whole archive (right CRC-32s) whose pickle calls OrderedDict(True)
        blob = io.BytesIO()
        torch.save({}, blob)
        with zipfile.ZipFile(blob) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                pkl = b"\x80\x02ccollections\nOrderedDict\n\x88\x85R."
                dst.writestr(
                    info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info)
                )
    elif kind == "a list":
        torch.save([1, 2, 3], path)
    elif kind == "a bare state_dict":
        torch.save(plain_dict(good_path)["model"], path)
    elif kind == "wrong types":
        ckpt = plain_dict(good_path)
        ckpt["num_users"] = "many"
        torch.save(ckpt, path)
    elif kind == "wrong shapes":
        ckpt = plain_dict(good_path)
        ckpt["model"]["keys"] = torch.zeros(3, 3)
        torch.save(ckpt, path)


FOREIGN = [
    ("random bytes", "not a whole torch.save zip archive"),
    ("empty", "not a whole torch.save zip archive"),
    ("json", "not a whole torch.save zip archive"),
    ("truncated", "not a whole torch.save zip archive"),
    ("a bit flipped in a weight", "Bad CRC-32 for file 'archive/data"),
    ("a name changed in its pickle", "Bad CRC-32 for file 'archive/data"),
    ("a member flagged as a directory", "is flagged as a directory"),
    ("a bit flipped in the end-of-archive record", "not a whole torch.save zip archive"),
    ("a pickle that makes the loader raise TypeError", "damaged or not a checkpoint"),
    ("a list", "holds a list, not a dict"),
    ("a bare state_dict", "it lacks 'config'"),
    ("wrong types", "'num_users' should be a int"),
    ("wrong shapes", "not a usable LRML checkpoint"),
]


@pytest.mark.parametrize("kind, words", FOREIGN)
def test_foreign_or_damaged_files_get_a_clear_error(
    tmp_path, good, error_line, no_data, kind, words
):
    path = tmp_path / "file.pt"
    write_foreign(path, kind, good)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path)
    assert main(["evaluate", str(path)]) == 2
    assert words in error_line("evaluate")


def test_a_checkpoint_written_without_crc32s_still_loads(tmp_path, good):
    path = tmp_path / "no-crc.pt"
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # every member's CRC-32 is written as 0
    try:
        torch.save(plain_dict(good), path)
    finally:
        torch.serialization.set_crc32_options(was)
    model, ckpt = load_checkpoint(path)
    assert torch.equal(model.user_emb.detach(), plain_dict(good)["model"]["user_emb"])


def test_resume_refuses_a_checkpoint_that_cannot_be_resumed(tmp_path, good, error_line, no_data):
    ckpt = plain_dict(good)
    del ckpt["gen_states"]  # e.g. the first version's single "gen_state"
    torch.save(ckpt, tmp_path / CHECKPOINT)
    assert main(train_args(tmp_path, "--resume")) == 2
    line = error_line("train")
    assert "not a checkpoint to resume from" in line and "'gen_states'" in line


def test_resume_refuses_a_damaged_model_without_a_traceback(tmp_path, good, error_line):
    ckpt = plain_dict(good)
    ckpt["model"]["memory"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / CHECKPOINT)
    assert main(train_args(tmp_path, "--resume")) == 2
    assert "does not fit the model" in error_line("train")


def test_resume_refuses_a_checkpoint_from_another_kind_of_device(tmp_path, good, error_line):
    ckpt = plain_dict(good)
    # what a CUDA generator's state looks like (seed and offset, 16 bytes); this run is on the CPU
    ckpt["gen_states"] = [torch.zeros(16, dtype=torch.uint8)]
    torch.save(ckpt, tmp_path / CHECKPOINT)
    assert main(train_args(tmp_path, "--resume")) == 2
    assert "written on another kind of device than 'cpu'" in error_line("train")


# ----------------------------------------------------------------------------------------------
# What is written, and checkpoints that hold more than plain values
# ----------------------------------------------------------------------------------------------


def test_fit_writes_plain_values_even_from_numpy_options(tmp_path):
    # A sweep started from Python with numpy numbers (np.float64 passes for a float).
    lr, margin = np.logspace(-2, 0, 2)
    cfg = TrainConfig(**{**OPTS, "max_steps": 2}, lr=lr, margin=margin, progress=False)
    fit(cfg, tmp_path)
    ckpt = plain_dict(tmp_path / CHECKPOINT)
    assert type(ckpt["config"]["lr"]) is float and type(ckpt["config"]["margin"]) is float
    assert (ckpt["config"]["lr"], ckpt["config"]["margin"]) == (0.01, 1.0)


def test_to_plain_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]\[1\]: a builtins.object"):
        checkpoints.to_plain({"x": [1, object()]})
    rng = np.random.default_rng(3)
    state = {"np": np.random.RandomState(1), "gen": rng, "a": np.arange(3)}
    checkpoints.save(state, tmp_path / "x.pt")
    plain = plain_dict(tmp_path / "x.pt")
    assert torch.equal(plain["a"], torch.arange(3))
    restored = np.random.default_rng()
    restored.bit_generator.state = plain["gen"]  # numpy RNG state survives as plain values
    assert restored.integers(1 << 30) == rng.integers(1 << 30)


def earlier_version(good, path) -> dict:
    """``good`` as a checkpoint holding numpy numbers, a pickled TrainConfig and numpy RNG state,
    as a version that stored such objects would have written it; returns the plain original."""
    ckpt = plain_dict(good)
    old = dict(ckpt)
    old["config"] = TrainConfig(**ckpt["config"])
    old["num_users"] = np.int64(ckpt["num_users"])
    old["epoch_seconds"] = np.float64(ckpt["epoch_seconds"])
    old["numpy_rng"] = np.random.RandomState(0)
    torch.save(old, path)
    return ckpt


def test_an_earlier_checkpoint_is_refused_with_how_to_convert_it(tmp_path, good, error_line):
    old = tmp_path / "old.pt"
    earlier_version(good, old)
    assert main(["evaluate", str(old)]) == 2
    line = error_line("evaluate")
    assert "lrml convert-checkpoint OLD NEW" in line and "only for files you trust" in line
    assert "lrml_kernels.training.TrainConfig" in line and "numpy" in line


def test_convert_checkpoint_makes_it_load_safely_and_resume(tmp_path, good, capsys):
    old, new = tmp_path / "old.pt", tmp_path / "run" / CHECKPOINT
    new.parent.mkdir()
    want = earlier_version(good, old)
    assert main(["convert-checkpoint", str(old), str(new)]) == 0
    assert "TrainConfig" in capsys.readouterr().err
    got = plain_dict(new)  # weights_only: plain values only
    assert got["config"] == dataclasses.asdict(TrainConfig(**want["config"]))
    assert type(got["num_users"]) is int and got["num_users"] == want["num_users"]
    assert torch.is_tensor(got["numpy_rng"]["state"]["key"])
    for name, t in want["model"].items():
        assert torch.equal(got["model"][name], t), name
    model, _ = load_checkpoint(new)
    assert torch.equal(model.keys.detach(), want["model"]["keys"])
    # the converted checkpoint resumes: the run finishes its epoch
    assert main(train_args(new.parent, "--resume", "--max-steps", "6")) == 0, capsys.readouterr()
    assert plain_dict(new)["global_step"] == 6


def test_convert_checkpoint_of_a_plain_file_rewrites_it_unchanged(
    tmp_path, good, capsys, error_line
):
    new = tmp_path / "new.pt"
    assert main(["convert-checkpoint", str(good), str(new)]) == 0
    assert "plain values only already" in capsys.readouterr().err
    a, b = plain_dict(good), plain_dict(new)
    assert a.keys() == b.keys() and a["config"] == b["config"]
    assert main(["convert-checkpoint", str(tmp_path / "none.pt"), str(new)]) == 2
    error_line("convert-checkpoint")
    damaged = tmp_path / "damaged.pt"  # converting it would give it CRC-32s that hide the damage
    write_foreign(damaged, "a bit flipped in a weight", good)
    assert main(["convert-checkpoint", str(damaged), str(new)]) == 2
    assert "Bad CRC-32 for file 'archive/data" in error_line("convert-checkpoint")


def test_a_checkpoint_from_before_popularity_negatives_resumes_with_uniform_ones(tmp_path, good):
    ckpt = plain_dict(good)
    del ckpt["config"]["popularity_negatives"]
    torch.save(ckpt, tmp_path / CHECKPOINT)
    opts = {**OPTS, "max_steps": 6, "progress": False}
    with pytest.raises(ValueError, match=r"popularity_negatives: 0\.0 -> 0\.5"):
        fit(TrainConfig(**opts, popularity_negatives=0.5), tmp_path, resume=True)
    r = fit(TrainConfig(**opts), tmp_path, resume=True)
    assert r["config"]["popularity_negatives"] == 0.0


def test_a_checkpoint_from_before_relation_lr_scale_resumes_as_it_was_trained(tmp_path, good):
    """Written before the option existed, a checkpoint was trained with the relation at lr
    (scale 1.0): it resumes with that scale, and is refused with today's default."""
    ckpt = plain_dict(good)
    del ckpt["config"]["relation_lr_scale"]
    del ckpt["trainer"]["relation_lr_scale"]
    torch.save(ckpt, tmp_path / CHECKPOINT)
    opts = {**OPTS, "max_steps": 6, "progress": False}
    with pytest.raises(ValueError, match=r"relation_lr_scale: 1\.0 -> 0\.01"):
        fit(TrainConfig(**opts), tmp_path, resume=True)
    r = fit(TrainConfig(**opts, relation_lr_scale=1.0), tmp_path, resume=True)
    assert r["config"]["relation_lr_scale"] == 1.0
    _, meta = load_checkpoint(tmp_path / CHECKPOINT)
    assert meta["config"]["relation_lr_scale"] == 1.0


def test_a_checkpoint_trained_with_cuda_graphs_loads_on_the_cpu(tmp_path, good, capsys):
    """--cuda-graph is how the model was trained, not something the loaded model needs: a
    GPU run's checkpoint evaluates and recommends on the CPU."""
    ckpt = plain_dict(good)
    ckpt["config"].update(cuda_graph=True, device="cuda", backend="cuda")
    torch.save(ckpt, tmp_path / CHECKPOINT)
    model, meta = load_checkpoint(tmp_path / CHECKPOINT)
    assert meta["config"]["cuda_graph"] is True
    want, _ = load_checkpoint(good)
    for a, b in zip(model.parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b)
    args = [str(tmp_path / CHECKPOINT), "--backend", "torch"]
    assert main(["evaluate", *args, "--eval", "sampled"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"] == "sampled"
    assert main(["recommend", *args, "--k", "2", "--users", "0", "--no-progress"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "user,rank,item,distance" and [r.split(",")[1] for r in rows[1:]] == [
        "1",
        "2",
    ]


def test_a_write_deletes_only_the_temporaries_of_gone_writers(tmp_path):
    # What SIGKILL leaves beside a file written by atomic_write (checkpoints, recommend's lists):
    # the next write of that file deletes a gone process's temporary once it is STALE_SECONDS
    # old; a live process's (this test's parent) and a fresh one (maybe another machine's) stay.
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    gone = int(done.stdout)
    path = tmp_path / "lists.tsv"
    old = time.time() - 2 * checkpoints.STALE_SECONDS
    stale, fresh, live, other = (
        tmp_path / f".lists.tsv.tmp{gone}",
        tmp_path / f".lists.tsv.tmp{gone}",
        tmp_path / f".lists.tsv.tmp{os.getppid()}",
        tmp_path / f".other.tsv.tmp{gone}",
    )
    for tmp in (stale, live, other):
        tmp.write_bytes(b"torn")
        os.utime(tmp, (old, old))
    checkpoints.atomic_write(path, lambda f: f.write(b"whole"))
    assert path.read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other.exists()
    fresh.write_bytes(b"torn")  # written just now: the next write leaves it
    checkpoints.atomic_write(path, lambda f: f.write(b"again"))
    assert fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, fresh.name, live.name, other.name]
    )


def test_a_full_disk_is_an_oserror_naming_the_file_and_keeps_the_old_one(tmp_path):
    # torch.save reports a failed write as RuntimeError("... unexpected pos ..."): the CLI would
    # print it as a traceback. A file-size limit (the same EFBIG/ENOSPC path) in a child process.
    script = f"""
import errno, resource, torch
from pathlib import Path
from lrml_kernels import checkpoints
path = Path({str(tmp_path / "ckpt.pt")!r})
checkpoints.atomic_write(path, lambda f: torch.save({{"x": torch.zeros(4)}}, f))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    checkpoints.atomic_write(path, lambda f: torch.save({{"x": torch.zeros(1 << 16)}}, f))
except OSError as exc:
    assert exc.errno == errno.EFBIG and str(path) in str(exc), exc
    print("OSError", exc)
"""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.startswith("OSError"), done.stderr[-2000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["x"].shape == (4,)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# checkpoints: the checks of check(), os_error_under and atomic_write's fsync
def _ckpt(**over):
    ckpt = {"config": {}, "model": {"w": torch.zeros(2)}, "num_users": 3, "num_items": 4}
    return {**ckpt, **over}


def _resumable(**over):
    resume = dict(
        trainer={}, epoch=1, step_in_epoch=0, global_step=10, gen_states=[],
        loss_sum=torch.zeros(()), epoch_seconds=1.5, history=[], data_fingerprint="f",
    )  # fmt: skip
    return _ckpt(**{**resume, **over})


def test_check_refuses_a_bool_for_an_int_and_takes_an_int_for_a_float(tmp_path):
    from lrml_kernels.checkpoints import check

    with pytest.raises(CheckpointError, match="'num_users' should be a int, not a bool"):
        check(_ckpt(num_users=True), tmp_path / "x.pt")
    check(_resumable(epoch_seconds=3), tmp_path / "x.pt", resume=True)  # 3 s stored as an int
    with pytest.raises(CheckpointError, match="'epoch_seconds' should be a float, not a str"):
        check(_resumable(epoch_seconds="3"), tmp_path / "x.pt", resume=True)


def test_read_refuses_a_model_entry_that_is_not_a_tensor(tmp_path):
    path = tmp_path / "x.pt"
    checkpoints.save(_ckpt(model={"w": torch.zeros(2), "n": 3}), path)
    with pytest.raises(CheckpointError, match="the model's 'n' are not tensors"):
        checkpoints.read(path)


def test_an_interrupt_during_a_failing_write_stays_an_interrupt(tmp_path):
    def write(f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise KeyboardInterrupt  # noqa: B904 (as a Ctrl-C there: its __context__ the OSError)

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(tmp_path / "x.pt", write)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_fsyncs_the_file_before_it_renames_it(tmp_path, monkeypatch):
    import stat

    calls, fsync, replace = [], os.fsync, os.replace

    def traced_fsync(fd):
        st = os.fstat(fd)
        calls.append(("fsync", "file" if stat.S_ISREG(st.st_mode) else "dir", st.st_size))
        fsync(fd)

    def traced_replace(a, b):
        calls.append(("replace",))
        replace(a, b)

    monkeypatch.setattr(checkpoints.os, "fsync", traced_fsync)
    monkeypatch.setattr(checkpoints.os, "replace", traced_replace)
    checkpoints.atomic_write(tmp_path / "x.bin", lambda f: f.write(b"whole"))
    assert calls[0] == ("fsync", "file", 5) and calls[1] == ("replace",)
    assert calls[2][:2] == ("fsync", "dir")
