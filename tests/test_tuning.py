"""``lrml tune``: a tiny study that never reads the test items, resumes from SQLite, and writes a
configuration that ``lrml train --config`` reads."""

import dataclasses
import json
import logging
import math

import pytest

from lrml_kernels import data
from lrml_kernels.cli import main
from lrml_kernels.training import TRAIN_LR, TrainConfig

optuna = pytest.importorskip("optuna")

from lrml_kernels import tuning  # noqa: E402
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


def test_seeds_average_the_training_seeds_on_one_split(tmp_path, one_thread, monkeypatch):
    # seeds=2: each trial trains with seeds 7 and 8 on the split seed 7 carves; its value is the
    # mean of the two best validation nDCGs, seed i's epoch e reported as step 2 * i + e
    runs = []
    real_fit = tuning.fit

    def fit(cfg, out_dir, *, split, **kw):
        runs.append((cfg.seed, id(split)))
        return real_fit(cfg, out_dir, split=split, **kw)

    monkeypatch.setattr(tuning, "fit", fit)
    r = tune(tiny(seed=7), tmp_path, trials=2, search=("lr",), progress=False, seeds=2)
    assert [seed for seed, _ in runs] == [7, 8, 7, 8] and len({s for _, s in runs}) == 1
    for t in r["trials"]:
        per_seed = t["user_attrs"]["seed_valid_ndcg"]
        assert len(per_seed) == 2 and per_seed[0] != per_seed[1]
        assert t["value"] == pytest.approx(sum(per_seed) / 2)
        assert sorted(int(k) for k in t["intermediate"]) == [1, 2, 3, 4]
        assert t["intermediate"]["2"] != t["intermediate"]["4"]  # seed 7's and seed 8's
    best = json.loads((tmp_path / "best_config.json").read_text())
    assert best["seed"] == 7 and best["_tuned"]["seeds"] == 2
    assert best["_tuned"]["valid_ndcg"] == pytest.approx(sum(best["_tuned"]["seed_valid_ndcg"]) / 2)


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
    cap = capsys.readouterr()
    best = json.loads(cap.out)
    assert best == json.loads((out / "best_config.json").read_text())
    wrote = next(line for line in cap.err.splitlines() if line.startswith("wrote"))
    head = f"wrote {out}/best_config.json, trials.json"
    assert wrote.startswith(head)  # the plots it says it wrote: all there are
    assert sorted(wrote[len(head) :].split(", ")[1:]) == sorted(p.name for p in out.glob("*.png"))
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


def interrupt_fit(monkeypatch, at: int, seen=None):
    """``tuning.fit`` that raises KeyboardInterrupt (Ctrl-C) on its ``at``-th call (1-based),
    first storing in ``seen`` what trials.json held then."""
    from lrml_kernels import tuning

    calls = []
    real = tuning.fit

    def fit(cfg, out_dir, **kw):
        calls.append(cfg)
        if len(calls) == at:
            if seen is not None:
                out = seen.pop("out")
                seen["trials"] = json.loads((out / "trials.json").read_text())["trials"]
            raise KeyboardInterrupt
        return real(cfg, out_dir, **kw)

    monkeypatch.setattr(tuning, "fit", fit)
    return calls


SEARCH = ("optimizer", "lr", "negatives")
START = [{"optimizer": "sgd", "lr": 0.05, "negatives": 3}]


def test_an_interrupted_start_point_is_tried_again(tmp_path, one_thread, monkeypatch):
    kw = dict(storage=f"sqlite:///{tmp_path / 's.db'}", search=SEARCH, progress=False)
    base = base_params(tiny(), SEARCH)
    start = start_params(tiny(), START[0], SEARCH)
    # Ctrl-C during the first trial (the options given): it is left FAIL
    interrupt_fit(monkeypatch, at=1)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny(), tmp_path / "out", trials=3, start_from=START, **kw)
    monkeypatch.undo()
    r = tune(tiny(), tmp_path / "out", trials=2, start_from=START, **kw)
    runs = [t for t in r["trials"] if t["state"] == "COMPLETE"]
    assert [t["state"] for t in r["trials"]] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert sorted(t["params"]["optimizer"] for t in runs) == ["adam", "sgd"]
    assert all(t["user_attrs"]["start"] for t in runs)
    assert next(t for t in runs if t["params"]["optimizer"] == "adam")["params"] == base
    # Ctrl-C during a start point's trial: the next run tries it again, not the options given
    interrupt_fit(monkeypatch, at=1)
    start2 = [{"optimizer": "adagrad", "lr": 0.1, "negatives": 4}]
    with pytest.raises(KeyboardInterrupt):
        tune(tiny(), tmp_path / "out", trials=3, start_from=start2, **kw)
    monkeypatch.undo()
    r = tune(tiny(), tmp_path / "out", trials=3, start_from=[*START, *start2], **kw)
    assert [t["state"] for t in r["trials"]][3:] == ["FAIL", "COMPLETE"]
    assert r["trials"][4]["params"] == start_params(tiny(), start2[0], SEARCH) != start
    assert r["trials"][4]["user_attrs"]["start"]


def test_outputs_are_written_after_each_trial_and_on_ctrl_c(
    tmp_path, capsys, one_thread, monkeypatch
):
    out = tmp_path / "out"
    seen = {"out": out}
    calls = interrupt_fit(monkeypatch, at=2, seen=seen)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny(), out, trials=3, search=SEARCH, progress=False, start_from=START)
    assert len(calls) == 2
    # after the first trial: the JSON files; on Ctrl-C, the interrupted trial and the plots too
    assert [t["state"] for t in seen["trials"]] == ["COMPLETE", "WAITING"]
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL"]
    assert json.loads((out / "best_config.json").read_text())["_tuned"]["trial"] == 0
    assert (out / "optimization_history.png").stat().st_size > 0
    # the command line: exit status 130 and one line
    capsys.readouterr()
    interrupt_fit(monkeypatch, at=1)
    argv = ["tune", "--data", "synthetic-small", "--dim", "8", "--epochs", "1", "--trials", "1"]
    optuna_log = OptunaRecords()
    with optuna_log:
        assert main([*argv, "--backend", "torch", "--no-progress", "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith("lrml tune: interrupted; ")
    # ... without Optuna's traceback of the interrupted trial and its "failed with value None"
    assert not [r for r in optuna_log.records if "Trial 0 failed" in r.getMessage()]


class OptunaRecords(logging.Handler):
    """The records that reach Optuna's own handler (its logger does not propagate)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("optuna").addHandler(self)

    def __exit__(self, *exc):
        logging.getLogger("optuna").removeHandler(self)


def test_a_failed_trial_is_still_logged(tmp_path, one_thread, monkeypatch):
    # Only the interrupted trial's warnings are dropped: another error keeps its traceback.
    from lrml_kernels import tuning

    def fit(cfg, out_dir, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tuning, "fit", fit)
    optuna_log = OptunaRecords()
    with optuna_log, pytest.raises(RuntimeError, match="a bug"):
        tune(tiny(), tmp_path / "out", trials=1, search=SEARCH, progress=False)
    failed = [r for r in optuna_log.records if "Trial 0 failed" in r.getMessage()]
    assert len(failed) == 2 and isinstance(failed[0].exc_info[1], RuntimeError)


def test_options_are_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="max_steps cannot limit a trial"):
        tune(tiny(max_steps=3), out, trials=2)
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            tune(tiny(), out, timeout=bad)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="trials must be a positive integer"):
            tune(tiny(), out, trials=bad)
        with pytest.raises(ValueError, match="seeds must be a positive integer"):
            tune(tiny(), out, seeds=bad)
    assert not out.exists()
    argv = ["tune", "--data", "synthetic-small", "--out", str(out)]
    config = tmp_path / "c.json"  # (--max-steps is not an option of tune: a config's value)
    config.write_text('{"max_steps": 3}')
    for extra in (
        ["--config", str(config), "--trials", "2"],
        ["--timeout", "-5"],
        ["--seeds", "0"],
    ):
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        assert len(capsys.readouterr().err.splitlines()) == 1
    assert not out.exists()
    # a storage that cannot be opened: one line naming it (were sqlalchemy tracebacks)
    (tmp_path / "garbage.db").write_text("hello")
    for storage, words in [
        ("foo://bar", "Can't load plugin"),
        (f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}", "unable to open database file"),
        (f"sqlite:///{tmp_path / 'garbage.db'}", "file is not a database"),
    ]:
        capsys.readouterr()
        assert main([*argv, "--trials", "1", "--no-progress", "--storage", storage]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lrml tune: error: storage {storage!r}: ") and words in err, err
        assert len(err.splitlines()) == 1


def test_no_reject_positives_leaves_popularity_negatives_out(tmp_path, capsys, one_thread):
    start = [{"popularity_negatives": 0.5, "negatives": 3}]
    search = ("negatives", "popularity_negatives")
    r = tune(tiny(reject_positives=False), tmp_path, trials=2, search=search, progress=False,
             start_from=start)  # fmt: skip
    assert [t["state"] for t in r["trials"]] == ["COMPLETE", "COMPLETE"]
    assert [t["params"] for t in r["trials"]] == [{"negatives": 2}, {"negatives": 3}]
    assert {t["user_attrs"]["config"]["popularity_negatives"] for t in r["trials"]} == {0.0}
    assert "popularity_negatives is not searched" in capsys.readouterr().err


def test_a_study_resumes_only_with_the_options_it_was_run_with(tmp_path, one_thread):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    kw = dict(storage=storage, study_name="t", progress=False)
    tune(tiny(), tmp_path / "out", trials=1, search=("lr", "negatives"), **kw)
    study = optuna.load_study(study_name="t", storage=storage)
    assert study.user_attrs["base_config"]["epochs"] == 2
    assert "lr" not in study.user_attrs["base_config"]
    with pytest.raises(ValueError, match=r"data 'synthetic-small' \(here 'synthetic'\), "
                       r"epochs 2 \(here 1\)"):  # fmt: skip
        tune(
            dataclasses.replace(tiny(), epochs=1, data="synthetic"),
            tmp_path / "other",
            trials=2,
            search=("lr",),
            **kw,
        )
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match=r"tune_seeds 1 \(here 2\)"):
        tune(tiny(), tmp_path / "other", trials=2, search=("lr", "negatives"), seeds=2, **kw)
    # an option searched in any run is no longer one the study's trials share
    tune(tiny(), tmp_path / "out", trials=1, search=("lr", "margin"), **kw)
    study = optuna.load_study(study_name="t", storage=storage)
    assert {"lr", "margin", "negatives"}.isdisjoint(study.user_attrs["base_config"])
    tune(
        dataclasses.replace(tiny(margin=0.5), negatives=3),
        tmp_path / "out",
        trials=1,
        search=("lr",),
        **kw,
    )
    # a study recorded before min_rating existed trained on every rating
    study = optuna.load_study(study_name="t", storage=storage)
    base = {k: v for k, v in study.user_attrs["base_config"].items() if k != "min_rating"}
    study.set_user_attr("base_config", base)
    rated = tmp_path / "rated.csv"
    rated.write_text("user,item,rating\n0,0,5\n0,1,3\n1,1,4\n1,0,5\n")
    other = dataclasses.replace(tiny(margin=0.5), negatives=3, data=f"csv:{rated}", min_rating=4)
    with pytest.raises(ValueError, match=r"min_rating None \(here 4\)"):
        tune(other, tmp_path / "other", trials=1, search=("lr",), **kw)
    # a study from before the attribute: this run's options are recorded
    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    old.add_trial(optuna.trial.create_trial(value=0.0, user_attrs={"config": {}}))
    r = tune(tiny(), tmp_path / "old", trials=2, search=("lr",), **{**kw, "study_name": "old"})
    assert [t["state"] for t in r["trials"]] == ["COMPLETE", "COMPLETE"]
    recorded = optuna.load_study(study_name="old", storage=storage).user_attrs["base_config"]
    assert recorded["negatives"] == 2 and "lr" not in recorded


def test_start_points_not_tried_are_reported(tmp_path, capsys, one_thread):
    kw = dict(storage=f"sqlite:///{tmp_path / 's.db'}", search=SEARCH, progress=False)
    tune(tiny(), tmp_path, trials=1, **kw)
    capsys.readouterr()
    r = tune(tiny(), tmp_path, trials=1, start_from=START, **kw)
    assert [t["state"] for t in r["trials"]] == ["COMPLETE"]  # not left queued for a later run
    err = capsys.readouterr().err
    assert (
        "warning: not tried, the study's trials are used up (raise --trials): start point 1" in err
    )
    # the options given outside the space: their trial draws the value, and says so
    r = tune(
        dataclasses.replace(tiny(), batch_size=32),
        tmp_path / "b",
        trials=1,
        search=("batch_size",),
        progress=False,
    )
    assert r["trials"][0]["params"]["batch_size"] in SPACE["batch_size"][1]
    err = capsys.readouterr().err
    assert "the options given: batch_size 32 outside the search space, drawn by the sampler" in err


def test_non_finite_values_are_written_as_null(tmp_path, monkeypatch):
    from lrml_kernels import tuning

    final = {"selected_epoch": 1, "valid_hr": math.nan, "valid_ndcg": math.inf}
    monkeypatch.setattr(tuning, "fit", lambda *a, **kw: {"final": final})
    r = tune(tiny(), tmp_path, trials=1, search=("lr",), progress=False)
    assert r["trials"][0]["value"] == math.inf

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON")

    for name in ("trials.json", "best_config.json"):
        json.loads((tmp_path / name).read_text(), parse_constant=no_constants)
    trials = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert trials[0]["value"] is None and trials[0]["user_attrs"]["valid_hr"] is None
    tuned = json.loads((tmp_path / "best_config.json").read_text())["_tuned"]
    assert tuned["valid_ndcg"] is None and tuned["valid_hr"] is None


def test_a_start_point_with_values_outside_the_space_is_still_tried(tmp_path, capsys, one_thread):
    # (dim 48 is not among the searched dims: what was left of the point, {}, matched the
    # options given, so the point was never tried and no warning was given)
    kw = dict(storage=f"sqlite:///{tmp_path / 's.db'}", search=("dim",), progress=False)
    r = tune(tiny(), tmp_path, trials=3, start_from=[{"dim": 48}], **kw)
    starts = [t["user_attrs"].get("start") for t in r["trials"]]
    assert starts[:2] == ["the options given", "start point 1"] and not starts[2]
    assert "start point 1: dim 48 outside the search space, drawn by the sampler" in (
        capsys.readouterr().err
    )
    # resumed: it was tried (known by its label), so it is not queued again
    r = tune(tiny(), tmp_path, trials=4, start_from=[{"dim": 48}], **kw)
    assert [t["user_attrs"].get("start") for t in r["trials"]].count("start point 1") == 1


def test_search_mistakes_and_an_all_diverged_study_are_errors_not_results(tmp_path, capsys):
    with pytest.raises(ValueError, match="search names lr more than once"):  # (was a KeyError)
        tune(tiny(), tmp_path / "a", trials=1, search=("lr", "lr"))
    with pytest.raises(ValueError, match="nothing to search"):  # (ran trials of nothing)
        tune(tiny(reject_positives=False), tmp_path / "b", search=("popularity_negatives",))
    # every trial diverges: no best_config.json (it named a diverged configuration, exit 0)
    sgd = tiny(optimizer="sgd", lr=1e30, max_norm=None)
    r = tune(sgd, tmp_path / "c", trials=2, search=("margin",), progress=False)
    assert r["best"] is None and r["all_diverged"]
    assert not (tmp_path / "c" / tuning.BEST_CONFIG).exists()
    argv = ["tune", "--data", "synthetic-small", "--epochs", "1", "--trials", "2", "--lr", "1e30"]
    argv += ["--optimizer", "sgd", "--max-norm", "0", "--search", "margin", "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("lrml tune: error: every completed trial diverged")
        and len(err.splitlines()) == 1
    ), err


def test_ctrl_c_before_any_trial_says_none_completed(tmp_path, capsys, monkeypatch):
    # (said "OUT holds the trials completed" of an empty folder)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning, "tune", interrupted)
    out = tmp_path / "t"
    assert main(["tune", "--data", "synthetic-small", "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err == "lrml tune: interrupted; no trial had completed\n"


def test_a_full_disk_under_the_study_is_one_line(monkeypatch, tmp_path, capsys):
    # (optuna's StorageInternalError from SQLite's failed commit was a traceback)
    def full_disk(*args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit"
            ) from exc

    monkeypatch.setattr(tuning, "tune", full_disk)
    db = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["tune", "--data", "synthetic-small", "--storage", db, "--out", str(tmp_path / "t")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"lrml tune: error: the study's storage {db} failed: No space left on device"
    ), err
