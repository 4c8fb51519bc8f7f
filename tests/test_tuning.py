"""``lrml tune``: a tiny study that never reads the test items, resumes from SQLite, and writes a
configuration that ``lrml train --config`` reads."""

import dataclasses
import json

import pytest

from lrml_kernels import data
from lrml_kernels.cli import main
from lrml_kernels.training import TRAIN_LR, TrainConfig

optuna = pytest.importorskip("optuna")

from lrml_kernels.tuning import SPACE, base_params, start_params, suggest, tune  # noqa: E402


def tiny(**kw):
    """A configuration that trains synthetic-small in a second."""
    small = {"data": "synthetic-small", "dim": 8, "memory_slots": 4, "negatives": 2}
    return TrainConfig(**small, epochs=2, batch_size=256, progress=False, backend="torch", **kw)


def test_tune_never_reads_the_test_items_and_resumes(tmp_path, one_thread, poison_test_items):
    split = data.load("synthetic-small", validation=True)
    poison_test_items(split, strict=True)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = ("optimizer", "lr", "negatives", "relation", "distance")
    kw = dict(storage=storage, study_name="t", search=search, split=split, progress=False)
    # a start point: another study's configuration (its margin is not searched here)
    start = [{"optimizer": "sgd", "lr": 0.05, "negatives": 3, "relation": "none", "margin": 2.0}]
    r = tune(tiny(), tmp_path / "out", trials=3, start_from=start, **kw)
    assert [t["state"] for t in r["trials"]] == ["COMPLETE"] * 3
    # the first trial is the options given (lr as the factor of the optimizer's default)
    first = {"optimizer": "adam", "lr_factor": 1.0, "negatives": 2, "relation": "pair"}
    assert r["trials"][0]["params"] == {**first, "distance": "squared_l2"}
    # the second the start point's searched values; its relation "none" is not in the space
    second = r["trials"][1]["params"]
    assert second.pop("relation") in SPACE["relation"][1]
    assert second == {"optimizer": "sgd", "lr_factor": pytest.approx(0.05 / TRAIN_LR["sgd"]),
                      "negatives": 3, "distance": "squared_l2"}  # fmt: skip
    assert r["trials"][1]["user_attrs"]["config"]["margin"] == tiny().margin
    # every trial reported its validation nDCG per epoch (what the median pruner reads)
    assert all(set(t["intermediate"]) == {"1", "2"} for t in r["trials"])
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    values = [t["value"] for t in r["trials"]]
    assert best["_tuned"]["valid_ndcg"] == max(values) and best["select_on"] == "valid"
    assert best["optimizer"] in SPACE["optimizer"][1] and best["dim"] == 8
    assert (tmp_path / "out" / "optimization_history.png").stat().st_size > 0
    # the same study again, start point included: it has its three trials and runs the fourth
    again = tune(tiny(), tmp_path / "out", trials=4, start_from=start, **kw)
    assert [t["number"] for t in again["trials"]] == [0, 1, 2, 3]
    assert [t["value"] for t in again["trials"][:3]] == values
    # (neither the start point again nor a replay of trial 2's random draw)
    assert all(again["trials"][3]["params"] != t["params"] for t in again["trials"][:3])


def test_the_start_trials_are_never_pruned(tmp_path, one_thread, monkeypatch):
    # a pruner that cuts every trial it is asked about: only the reference points run to the end
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    start = [{"optimizer": "sgd", "lr": 0.05, "negatives": 3}]
    search = ("optimizer", "lr", "negatives")
    r = tune(tiny(), tmp_path / "out", trials=4, search=search, progress=False, start_from=start)
    states = [t["state"] for t in r["trials"]]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    assert [bool(t["user_attrs"].get("start")) for t in r["trials"]] == [True, True, False, False]
    assert r["trials"][1]["params"]["optimizer"] == "sgd"


def test_base_params_leave_out_values_outside_the_space():
    base = dataclasses.replace(tiny(lr=0.05, margin=0.5), negatives=40, dim=48)
    params = base_params(base, ("lr", "negatives", "margin", "dim", "relation_lr_scale"))
    # lr 0.05 is 5x Adam's default; 40 negatives and d = 48 are not in the space: drawn
    assert params == {"lr_factor": pytest.approx(5.0), "margin": 0.5, "relation_lr_scale": 0.01}


def test_start_params_take_the_searched_values_and_check_the_names():
    cml = {"optimizer": "sgd", "lr": 0.05, "relation": "none", "dim": 128, "memory_slots": 20}
    params = start_params(tiny(), cml, ("optimizer", "lr", "relation", "dim"))
    assert params == {"optimizer": "sgd", "lr_factor": pytest.approx(0.05 / TRAIN_LR["sgd"]),
                      "dim": 128}  # fmt: skip
    # the optimizer not searched: the same learning rate, as a factor of the base's optimizer
    params = start_params(tiny(), cml, ("lr",))
    assert params == {"lr_factor": pytest.approx(0.05 / TRAIN_LR["adam"])}
    with pytest.raises(ValueError, match="unknown option.*dims"):
        start_params(tiny(), {"dims": 8})


def test_suggest_scales_lr_per_optimizer_and_rejects_unknown_names():
    trial = optuna.trial.FixedTrial({"optimizer": "sgd", "lr_factor": 0.5, "max_norm": None})
    cfg = suggest(trial, tiny(), ("optimizer", "lr", "max_norm"))
    assert cfg.lr == pytest.approx(TRAIN_LR["sgd"] * 0.5) and cfg.max_norm is None
    assert cfg.select_on == "valid"
    with pytest.raises(ValueError, match="cannot search"):
        suggest(trial, tiny(), ("weight_decay",))


def test_train_config_file_and_command_line_override(tmp_path, capsys, one_thread):
    conf = tmp_path / "best.json"
    doc = {"data": "synthetic-small", "epochs": 1, "dim": 8, "memory_slots": 3, "negatives": 2}
    doc.update(optimizer="adagrad", select_on="valid", _tuned={"trial": 4})
    conf.write_text(json.dumps(doc))
    out = tmp_path / "run"
    argv = ["train", "--config", str(conf), "--dim", "6", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    used = json.loads((out / "metrics.json").read_text())["config"]
    assert (used["dim"], used["memory_slots"], used["optimizer"]) == (6, 3, "adagrad")
    assert used["select_on"] == "valid" and used["epochs"] == 1
    capsys.readouterr()
    conf.write_text(json.dumps({"dims": 8}))
    assert main(["train", "--config", str(conf), "--out", str(out)]) == 2
    assert "unknown option(s) dims" in capsys.readouterr().err


def test_cli_tune_then_train_with_its_configuration(tmp_path, capsys, one_thread):
    out = tmp_path / "tune"
    argv = ["tune", "--data", "synthetic-small", "--epochs", "1", "--dim", "8", "--trials", "1"]
    argv += ["--search", "lr,negatives", "--storage", f"sqlite:///{tmp_path / 's.db'}"]
    argv += ["--backend", "torch", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    best = json.loads(capsys.readouterr().out)
    assert best == json.loads((out / "best_config.json").read_text())
    run = tmp_path / "run"
    assert main(["train", "--config", str(out / "best_config.json"), "--out", str(run)]) == 0
    used = json.loads((run / "metrics.json").read_text())
    assert used["config"]["negatives"] == best["negatives"] and used["config"]["lr"] == best["lr"]
    assert used["final"]["selected_epoch"] == 1 and "test" in used["final"]
    # the study resumed with a start point: its second trial
    start = tmp_path / "start.json"
    start.write_text(json.dumps({"negatives": 5, "lr": 0.02, "_tuned": {"trial": 0}}))
    assert main([*argv, "--trials", "2", "--start-from", str(start)]) == 0
    trials = json.loads((out / "trials.json").read_text())["trials"]
    lr_factor = pytest.approx(0.02 / TRAIN_LR["adam"])
    assert trials[1]["params"] == {"negatives": 5, "lr_factor": lr_factor}
    assert main([*argv[:-2], "--search", "weight_decay", "--out", str(out)]) == 2
    start.write_text(json.dumps({"dims": 8}))
    assert main([*argv, "--start-from", str(start)]) == 2
