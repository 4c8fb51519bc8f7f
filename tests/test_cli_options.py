"""Options are checked before any data is loaded (issue 19): a device or backend that does not
exist here gets one ``lrml <command>: error:`` line naming what does, in a moment, and the data
loader is never called. CUDA is simulated (``torch.cuda.is_available`` / ``device_count``), so
these run the same on machines with and without GPUs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from lrml_kernels.backends import check_device
from lrml_kernels.cli import main
from lrml_kernels.training import TrainConfig, fit


@pytest.fixture
def cuda_devices(monkeypatch):
    """``cuda_devices(n)``: torch sees ``n`` CUDA devices (0: none)."""

    def see(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


TRAIN = ["train", "--data", "synthetic-netflix", "--no-progress", "--backend", "torch"]
EVALUATE = ["evaluate", "no-such-checkpoint.pt", "--backend", "torch"]
EXPLAIN = ["explain", "no-such-checkpoint.pt", "--backend", "torch"]
RECOMMEND = ["recommend", "no-such-checkpoint.pt", "--backend", "torch"]
COMMANDS = {"train": TRAIN, "evaluate": EVALUATE, "explain": EXPLAIN, "recommend": RECOMMEND}

REFUSED = [  # (CUDA devices, --device, what the error says)
    (0, "cuda", "devices here: cpu"),
    (0, "cuda:0", "devices here: cpu"),
    (0, "tpu", "'tpu' is not a device name; devices here: cpu"),
    (0, "meta", "no such device here; devices here: cpu"),
    (2, "cuda:2", "there are 2 cuda devices; devices here: cpu, cuda:0, cuda:1"),
    (1, "cuda:1", "there is 1 cuda device; devices here: cpu, cuda:0"),
    (2, "tpu:1", "'tpu:1' is not a device name; devices here: cpu, cuda:0, cuda:1"),
]


@pytest.mark.parametrize("cuda, device, words", REFUSED)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_device_that_is_not_here_is_refused_before_the_data(
    cuda_devices, no_data, error_line, command, cuda, device, words
):
    cuda_devices(cuda)
    args = COMMANDS[command] + ["--device", device]
    t0 = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t0 < 2.0  # no data, no checkpoint read, no device touched
    assert words in error_line(command)


def test_a_device_that_is_here_passes_the_checks(cuda_devices, no_data, tmp_path):
    cuda_devices(2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    assert check_device("cuda") == torch.device("cuda")
    assert check_device("cpu") == torch.device("cpu")
    # every option passes; what comes next is the data set (here: the no_data sentinel)
    with pytest.raises(AssertionError, match="the data was loaded"):
        main(TRAIN + ["--device", "cuda:1", "--out", str(tmp_path)])


def test_cuda_graph_options_are_refused_before_the_data(cuda_devices, no_data, error_line):
    cuda_devices(1)
    on_cuda = TRAIN[:-2] + ["--device", "cuda", "--cuda-graph"]
    for extra, words in [
        (["--backend", "torch"], "cuda_graph needs the triton or cuda backend"),
        (["--on-nonfinite", "skip"], "cuda_graph cannot skip non-finite steps"),
    ]:
        assert main(on_cuda + extra) == 2
        assert words in error_line("train")


def test_fit_checks_the_device_and_backend_before_the_data(monkeypatch, no_data, error_line):
    with pytest.raises(ValueError, match="devices here"):
        fit(TrainConfig(device="tpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton: CUDA tensors only
    cpu = ["--device", "cpu", "--backend", "triton"]
    assert main(TRAIN[:-2] + cpu) == 2
    assert "triton backend runs on CUDA tensors" in error_line("train")
    assert main(EVALUATE[:-2] + cpu) == 2
    assert "triton backend runs on CUDA tensors" in error_line("evaluate")


@pytest.mark.parametrize(
    "args, words",
    [
        (TRAIN + ["--threads", "-1"], "--threads must be a positive integer"),
        (EXPLAIN + ["--threads", "0"], "--threads must be a positive integer"),
        (TRAIN + ["--batch-size", "0"], "batch_size must be a positive integer"),
        (TRAIN + ["--relation-lr-scale", "-1"], "relation_lr_scale must be finite and >= 0"),
        (TRAIN + ["--popularity-negatives", "-1"], "popularity_negatives must lie in [0, 4.0]"),
        (
            TRAIN + ["--popularity-negatives", "0.5", "--no-reject-positives"],
            "popularity_negatives replaces drawn training items",
        ),
        (EVALUATE + ["--k", "0"], "--k must be a positive integer"),
        (EVALUATE[:-1] + ["nosuch"], "backend must be 'auto' or one of"),
        (TRAIN + ["--cuda-graph"], "cuda_graph needs a CUDA device, got device 'cpu'"),
        (TRAIN + ["--cuda-graph", "--no-fused-optimizer"], "cuda_graph captures the fused step"),
        (TRAIN + ["--max-norm", "-1"], "max_norm must be a finite number > 0 or None"),
        (TRAIN + ["--margin", "-1"], "margin must be a finite number >= 0"),
        (TRAIN + ["--margin", "nan"], "margin must be a finite number >= 0"),
        (TRAIN + ["--seed", "-1"], "seed must be a non-negative integer"),
        (TRAIN + ["--seed", str(2**63)], "seed must be below 2**32, got 9223372036854775808"),
        # (torch's CPU generator drops the high bits: this seed trained as seed 7, silently)
        (TRAIN + ["--seed", str(2**32 + 7)], "below 2**32, got 4294967303 (torch's CPU gen"),
        (TRAIN + ["--seed", str(2**32 + 7)], "it would train as seed 7)"),
        (TRAIN + ["--eval-negatives", "0"], "eval='sampled' needs eval_negatives >= 1"),
        (TRAIN + ["--checkpoint-every", "-2"], "checkpoint_every must be a non-negative integer"),
        (TRAIN + ["--min-rating", "4"], "'synthetic-netflix' has no ratings: min_rating does not"),
        (TRAIN + ["--min-rating", "nan"], "min_rating must be a finite number or None, got nan"),
        (
            ["train", "--data", "ncf:no/such", "--min-rating", "4"],
            "ncf: files are implicit feedback already: min_rating does not apply",
        ),
    ],
)
def test_other_bad_options_are_refused_before_the_data(no_data, error_line, args, words):
    assert main(args) == 2
    assert words in error_line(args[0])


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"fused_optimizer": "false"}, "option fused_optimizer must be true or false, got 'false'"),
        ({"margin": [1]}, "option margin must be a number, got [1]"),
        ({"seed": 1.5}, "option seed must be an integer, got 1.5"),
        ({"seed": "abc"}, "option seed must be an integer, got 'abc'"),
        ({"lr": "0.1"}, "option lr must be a number or null, got '0.1'"),
        ({"distance": "cosine"}, "distance must be one of"),
        ({"relation": "all"}, "relation must be one of"),
        ({"nosuch": 1}, "unknown option(s) nosuch"),
        ("[1, 2]", "a JSON object of train options expected"),
        ("{oops", "not valid JSON"),
    ],
)
def test_a_config_file_is_checked_before_the_data(no_data, error_line, tmp_path, doc, words):
    path = tmp_path / "c.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    line = error_line("train")
    assert words in line, line
    if not (isinstance(doc, dict) and {"distance", "relation"} & set(doc)):
        assert str(path) in line  # the file's own checks name it


@pytest.mark.parametrize(
    "args, words",
    [
        (["--out", "{file}"], "is a file, not a folder"),
        (["--out", "{file}/run"], "Not a directory"),
        (["--config", "{dir}"], "Is a directory"),
    ],
)
def test_file_mistakes_are_one_line_errors(no_data, error_line, tmp_path, args, words):
    (tmp_path / "f").write_text("x")
    args = [a.format(file=tmp_path / "f", dir=tmp_path) for a in args]
    assert main(["train", *args]) == 2
    assert words in error_line("train")


def test_patience_0_clears_a_config_files_early_stopping(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    def fit(cfg, *args, **kwargs):  # the options reach fit: stop there
        raise Stop(cfg)

    monkeypatch.setattr("lrml_kernels.training.fit", fit)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"select_on": "valid", "patience": 3}))
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "run")]
    with pytest.raises(Stop) as info:
        main([*argv, "--select-on", "last", "--patience", "0"])
    cfg = info.value.args[0]
    assert cfg.select_on == "last" and cfg.patience is None


@pytest.mark.parametrize("command", ["evaluate", "recommend", "explain"])
def test_ctrl_c_outside_training_is_one_line_and_exit_130(monkeypatch, capsys, command):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lrml_kernels.training.open_checkpoint", interrupted)
    assert main(COMMANDS[command]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == f"lrml {command}: interrupted", err


@pytest.mark.parametrize("command", ["evaluate", "recommend"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_command_as_ctrl_c_does(
    monkeypatch, capsys, catchable, command, signum
):
    catchable(signum)

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signum)  # (the handler raises here, in the main thread)
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr("lrml_kernels.training.open_checkpoint", killed)
    before = signal.getsignal(signum)
    assert main(COMMANDS[command]) == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert "Traceback" not in err and err.strip() == f"lrml {command}: stopped by {name}", err
    assert signal.getsignal(signum) is before  # the command's handler is gone again


@pytest.mark.parametrize(
    "command, absent, extra",
    [
        (["tune", "--data", "synthetic-netflix", "--trials", "1"], "optuna", "tune"),
        (EXPLAIN, "sklearn", "explain"),
        (EXPLAIN, "matplotlib", "explain"),
    ],
)
def test_a_missing_optional_dependency_names_its_extra(
    monkeypatch, no_data, error_line, tmp_path, command, absent, extra
):
    # an installed package without the extra: one error line naming it, no traceback
    monkeypatch.setitem(sys.modules, absent, None)  # import absent -> ImportError
    assert main(command + ["--out", str(tmp_path / "out")]) == 2
    assert f"pip install 'lrml_kernels[{extra}]'" in error_line(command[0])


def test_train_without_matplotlib_says_why_there_is_no_curve(monkeypatch, capsys, tmp_path):
    from lrml_kernels import training

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(training, "fit", lambda cfg, out, resume: {"final": {}})
    assert main(TRAIN + ["--out", str(tmp_path)]) == 0
    assert "pip install 'lrml_kernels[plot]'" in capsys.readouterr().err


def test_version(capsys):
    import lrml_kernels

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lrml_kernels {lrml_kernels.__version__}"


def test_tune_offers_only_the_protocols_its_trials_can_select_on(capsys):
    # a trial always selects on validation: --eval none is not among tune's choices
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--eval", "none"])
    assert exit_.value.code == 2
    assert "argument --eval: invalid choice: 'none'" in capsys.readouterr().err
    assert main(["train", "--eval", "none", "--data", "no:such"]) == 2  # train still takes it
    assert "--eval" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "raised, code",
    [
        (
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 26 GB",
            2,
        ),
        ("CUDA out of memory. Tried to allocate 24.00 GiB", 2),
        (MemoryError("Unable to allocate 763. MiB for an array"), 2),  # numpy's (data set-up)
        ("some other failure", None),  # a bug keeps its traceback
    ],
)
def test_out_of_memory_is_one_line_and_leaves_no_folder(
    monkeypatch, capsys, tmp_path, raised, code
):
    # (was a RuntimeError traceback, exit 1, and an empty --out folder left behind)
    from lrml_kernels import trainer

    def step(*args, **kwargs):
        raise raised if isinstance(raised, BaseException) else RuntimeError(raised)

    monkeypatch.setattr(trainer.LRMLTrainer, "step", step)
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        "synthetic-small",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    if code is None:
        with pytest.raises(RuntimeError, match=raised):
            main(argv)
    else:
        assert main(argv) == code
        err = capsys.readouterr().err
        assert err.startswith("lrml train: error: out of memory (") and len(err.splitlines()) == 1
        assert "a smaller --dim, --batch-size or --negatives" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "recommend", "explain", "baseline", "tune"])
def test_commands_but_train_refuse_the_ranks_of_torchrun(monkeypatch, capsys, no_data, command):
    # (every rank ran the whole command: evaluate printed its result once a rank, and the
    # baseline's ranks raced over one --out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"baseline": ["baseline", "popularity"], "tune": ["tune"]}.get(command, [command, "x"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lrml {command}: error: lrml {command} runs in one process; of the commands, only lrml "
        "train uses the processes torchrun starts\n"
    )


@pytest.mark.parametrize("command", ["train", "tune", "baseline"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_the_data(
    tmp_path, no_data, error_line, monkeypatch, command
):
    """Not after an epoch, a trial or a whole evaluation: a file in --out's place, or a folder
    this process may not write in (os.access: the tests may run as root)."""
    head = {
        "train": TRAIN,
        "tune": ["tune", "--no-progress"],
        "baseline": ["baseline", "popularity"],
    }[command]
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main([*head, "--out", str(afile)]) == 2
    assert f"--out {afile} is a file, not a folder" in error_line(command)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != tmp_path)
    assert main([*head, "--out", str(tmp_path / "new" / "run")]) == 2
    assert f"this process may not write in {tmp_path}" in error_line(command)


def test_recommend_refuses_a_folder_as_its_out_file(tmp_path, error_line, no_data):
    assert main([*RECOMMEND, "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder: name the file to write" in error_line("recommend")


def test_baseline_overwrite_keeps_the_old_run_when_its_write_fails(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "best.pt", "metrics.json"):
        (out / name).write_text("old")

    def full_disk(path, write):
        raise OSError(28, f"No space left on device (writing {path})")

    monkeypatch.setattr("lrml_kernels.checkpoints.atomic_write", full_disk)
    args = ["baseline", "popularity", "--data", "synthetic-small", "--out", str(out), "--overwrite"]
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "metrics.json"]
    fresh = tmp_path / "fresh"
    assert main([*args[:-2], str(fresh)]) == 2
    assert not fresh.exists()  # (nothing written: no empty folder left behind)
