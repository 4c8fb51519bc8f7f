"""``lrml tune``: hyperparameter search on the validation split with Optuna.

Every trial is ``fit(..., select_on="valid", test=False)``: it trains on the training data less
the validation items, reports its validation nDCG@k after every epoch (the median pruner stops
trials that fall behind), and its value is the best validation nDCG@k of its epochs. With
``seeds=S`` a trial trains S times, with training seeds ``seed .. seed + S - 1`` on the one split
that ``seed`` carves, and its value is the mean of their best validation nDCG@k: on a small data
set, where two configurations differ by less than one seed's spread, a single seed selects the
luckiest run rather than the best configuration. The test
split is never read: not by a trial, not to choose the best, not for the plots. ``lrml train
--config OUT/best_config.json`` then trains the chosen configuration and reports its test
metrics once.

The study lives in an Optuna storage (``sqlite:///FILE``): running the same command again
resumes it; ``trials`` is the study's total, so a resumed study runs only the trials it lacks. The
study keeps the options that its trials share (user attribute ``base_config``: those that no run
searched) and refuses to resume with other values of them, which would make trials incomparable.
Outputs in ``out_dir``: ``best_config.json`` (options of ``lrml train``; keys starting with ``_``
are notes that ``--config`` ignores), ``trials.json`` and the study's plots (PNG). Once a trial has
completed, the two JSON files are rewritten after every trial, and all the outputs at the end, on
Ctrl-C and when a trial fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from lrml_kernels import data as lkdata
from lrml_kernels.checkpoints import atomic_write
from lrml_kernels.errors import MissingExtra
from lrml_kernels.training import TRAIN_LR, NonFiniteLossError, TrainConfig, check_int, fit

BEST_CONFIG = "best_config.json"
TRIALS = "trials.json"
START = "start"  # the user attribute of the trials of the options given and of start_from
BASE = "base_config"  # the study's user attribute: the options its trials share, as JSON
SEEDS = "tune_seeds"  # BASE's entry of the training seeds per trial

#: The search space: parameter -> ("categorical", choices) or ("float"/"int", low, high, log).
#: ``lr`` is searched as a factor of the optimizer's default learning rate (TRAIN_LR), so that
#: one range fits every optimizer; the configuration written holds the learning rate itself.
SPACE: dict[str, tuple] = {
    "optimizer": ("categorical", ["adam", "adagrad", "rowwise_adagrad", "sgd"]),
    "lr": ("float", 0.1, 10.0, True),
    "relation_lr_scale": ("float", 0.001, 1.0, True),
    "lr_schedule": ("categorical", ["constant", "cosine"]),
    "dim": ("categorical", [32, 64, 100, 128]),
    "memory_slots": ("categorical", [5, 10, 20, 50]),
    "negatives": ("int", 1, 20, True),
    "margin": ("float", 0.1, 2.0, True),
    "distance": ("categorical", ["l2", "squared_l2", "l1"]),
    "relation": ("categorical", ["pair", "shared"]),
    "max_norm": ("categorical", [0.5, 1.0, 2.0, None]),
    "batch_size": ("categorical", [256, 512, 1024, 2048]),
    "popularity_negatives": ("categorical", [0.0, 0.25, 0.5, 0.75]),
}

#: Options that do not describe the model or its training (left out of ``best_config.json``).
_RUN_OPTIONS = ("device", "backend", "progress", "checkpoint_every", "max_steps")


def suggest(trial, base: TrainConfig, search=tuple(SPACE)) -> TrainConfig:
    """``base`` with the parameters named in ``search`` drawn by ``trial``."""
    _check_search(search)
    chosen = {}
    for name in search:
        kind, *spec = SPACE[name]
        key = "lr_factor" if name == "lr" else name
        if kind == "categorical":
            chosen[name] = trial.suggest_categorical(key, spec[0])
        elif kind == "float":
            chosen[name] = trial.suggest_float(key, spec[0], spec[1], log=spec[2])
        else:
            chosen[name] = trial.suggest_int(key, spec[0], spec[1], log=spec[2])
    if "lr" in chosen:
        optimizer = chosen.get("optimizer", base.optimizer)
        chosen["lr"] = TRAIN_LR[optimizer] * chosen["lr"]
    if chosen.get("optimizer") == "rowwise_adagrad" and not base.fused_optimizer:
        chosen["fused_optimizer"] = True  # rowwise_adagrad exists only fused
    return replace(base, **chosen, select_on="valid", progress=False)


def base_params(base: TrainConfig, search=tuple(SPACE)) -> dict:
    """``base``'s values as the study's parameters (``lr`` as ``lr_factor``), those of ``search``
    that lie in :data:`SPACE` (the others are drawn): the start point of the options given."""
    _check_search(search)
    params = {}
    for name in search:
        kind, *spec = SPACE[name]
        value = getattr(base, name)
        if name == "lr":
            default = TRAIN_LR[base.optimizer]
            name, value = "lr_factor", (default if value is None else value) / default
        inside = value in spec[0] if kind == "categorical" else spec[0] <= value <= spec[1]
        if inside and not (kind == "int" and isinstance(value, float)):
            params[name] = value
    return params


def start_params(base: TrainConfig, options: dict, search=tuple(SPACE)) -> dict:
    """The study's parameters of ``options`` (``TrainConfig`` field names): their values of the
    searched parameters, those not given taken from ``base`` (:func:`base_params`). A value that
    lies outside :data:`SPACE` (say ``relation="none"`` of a CML configuration started in an LRML
    study) is left to the sampler."""
    return base_params(_start_config(base, options, search), search)


def _start_config(base: TrainConfig, options: dict, search) -> TrainConfig:
    """``base`` with the values of ``options`` of the searched parameters."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in a start point")
    return replace(base, **{k: v for k, v in options.items() if k in search})


def _check_search(search) -> None:
    unknown = sorted(set(search) - set(SPACE))
    if unknown:
        raise ValueError(f"cannot search {unknown}: the search space has {sorted(SPACE)}")
    twice = sorted({n for n in search if list(search).count(n) > 1})
    if twice:
        raise ValueError(f"search names {', '.join(twice)} more than once")


def tune(
    base: TrainConfig,
    out_dir,
    *,
    trials: int = 50,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str = "lrml",
    search=tuple(SPACE),
    split=None,
    progress: bool = True,
    start_from=(),
    seeds: int = 1,
) -> dict:
    """Run (or resume) the study; write its outputs; return ``{"best": ..., "trials": ...}``.

    Args:
        base: the options not searched (data, epochs per trial, patience, eval protocol, seed...);
            a resumed study refuses values other than those it was run with. ``max_steps`` is
            refused: a trial stopped mid-epoch has no validation result to compare.
        out_dir: where the best configuration, the trial list and the plots go.
        trials: the study's total number of finished trials (a resumed study runs the rest).
        timeout: stop starting trials after this many seconds (None: no limit).
        storage: an Optuna storage URL, e.g. ``sqlite:///study.db`` (None: in memory).
        study_name: the study's name in the storage.
        search: the parameters of :data:`SPACE` to search (the others come from ``base``);
            ``popularity_negatives`` is left out when ``base.reject_positives`` is off (it needs
            it).
        split: a ready split (a validation split is carved if it has none); its test arrays
            are never read.
        start_from: option dicts (``TrainConfig`` field names, e.g. another study's
            ``best_config.json``) whose values of the searched parameters are tried after
            ``base``'s (:func:`start_params`). Each of these start points, ``base`` first, is tried
            unless the study holds a completed trial of it; a value outside :data:`SPACE` is
            drawn by the sampler, and a point that the study's ``trials`` leave no room for is
            not tried (both with a warning on stderr).
        seeds: training seeds per trial (``base.seed`` onwards; the split stays the one
            ``base.seed`` carves); the trial's value is the mean of their best validation nDCG@k.
            Epoch e of seed i is reported as step ``i * base.epochs + e`` (the pruner compares
            each seed's curve with the other trials' same seed). A resumed study refuses another
            number of seeds.

    A KeyboardInterrupt or an error ends the study after its outputs are written (once a trial
    has completed) and propagates. Without Optuna it raises
    :class:`~lrml_kernels.errors.MissingExtra` (``pip install 'lrml_kernels[tune]'``).
    """
    try:
        import optuna
    except ImportError:
        raise MissingExtra("lrml tune needs Optuna: pip install 'lrml_kernels[tune]'") from None

    search = tuple(search)
    _check_search(search)
    check_int("trials", trials)
    check_int("seeds", seeds)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if base.max_steps is not None:
        raise ValueError(
            "max_steps cannot limit a trial: one stopped mid-epoch has no validation result "
            "(limit the trials with epochs)"
        )
    base = replace(base, select_on="valid")
    base.validate()
    if not base.reject_positives and "popularity_negatives" in search:
        search = tuple(name for name in search if name != "popularity_negatives")
        if not search:
            raise ValueError(
                "nothing to search: popularity_negatives needs reject_positives, and the search "
                "has nothing else"
            )
        _warn("popularity_negatives is not searched: it needs reject_positives")
    starts = [("the options given", base)]
    starts += [
        (f"start point {i}", _start_config(base, o, search)) for i, o in enumerate(start_from, 1)
    ]
    fixed = {**_base_config(base, search), SEEDS: seeds}
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=base.seed),
            # a trial is pruned once its epoch-e validation nDCG is below the median of the
            # earlier trials' at epoch e (after 5 finished trials, from epoch 2 on); the trials
            # of the options given and of start_from always run to the end (they are the
            # reference points, and an option that learns slowly at first, as popularity
            # negatives do, would be cut)
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        )
    except Exception as exc:  # the storage's own errors (sqlalchemy's: no such dialect, no
        # such folder, not a database); a bug of this module would not come from this call
        if storage is None or isinstance(exc, ValueError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"storage {storage!r}: {first}") from None
    stored = study.user_attrs.get(BASE) if study.trials else None
    if stored is not None:
        # (a study from before these options: one seed a trial, every rating)
        stored = {SEEDS: 1, "min_rating": None, **stored}
        differ = sorted(k for k in set(stored) & set(fixed) if stored[k] != fixed[k])
        if differ:
            was = ", ".join(f"{k} {stored[k]!r} (here {fixed[k]!r})" for k in differ)
            raise ValueError(
                f"study {study_name!r} was run with other options, its trials would not compare: "
                f"{was} (another --study-name starts a new study)"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if split is None:
        split = lkdata.load(
            base.data,
            min_rating=base.min_rating,
            num_negatives=base.eval_negatives,
            seed=base.seed,
            validation=True,
        )
    elif not split.has_validation:
        split = lkdata.carve_validation(split, seed=base.seed)
    # the options that every trial of the study shared (a study created before this attribute
    # existed: the options of this run)
    shared = fixed if stored is None else {k: v for k, v in stored.items() if k in fixed}
    if shared != stored:
        study.set_user_attr(BASE, shared)

    def objective(trial):
        cfg = suggest(trial, base, search)
        trial.set_user_attr("config", _config_doc(cfg))
        t0 = time.perf_counter()
        finals = []
        for i in range(seeds):

            def report(record, i=i):
                if "valid_ndcg" in record:
                    trial.report(record["valid_ndcg"], i * base.epochs + record["epoch"])
                    if not trial.user_attrs.get(START) and trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

            try:
                r = fit(replace(cfg, seed=base.seed + i), None, split=split, on_epoch=report,
                        test=False)  # fmt: skip
            except (NonFiniteLossError, RuntimeError) as exc:
                # A diverging configuration is as bad as it gets, not the end of the study. (The
                # C++ CPU kernel reports a loss beyond the float range as a RuntimeError "...
                # without overflow" rather than as inf; other RuntimeErrors are bugs and
                # propagate.)
                if isinstance(exc, RuntimeError) and "overflow" not in str(exc):
                    raise
                trial.set_user_attr("diverged", str(exc))
                return 0.0
            finals.append(r["final"])
        trial.set_user_attr("selected_epoch", finals[0]["selected_epoch"])
        trial.set_user_attr("valid_hr", sum(f["valid_hr"] for f in finals) / seeds)
        if seeds > 1:
            trial.set_user_attr("seed_valid_ndcg", [f["valid_ndcg"] for f in finals])
            trial.set_user_attr("seed_selected_epoch", [f["selected_epoch"] for f in finals])
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return sum(f["valid_ndcg"] for f in finals) / seeds

    state = optuna.trial.TrialState
    finished = len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))
    _queue_starts(study, starts, search, room=trials - finished)
    # A resumed study must not replay the random start-up draws of its first run: the sampler's
    # seed moves on with the number of trials already stored.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
    t0 = time.perf_counter()

    def write(plots: bool = True) -> dict:
        return _write_outputs(study, out, time.perf_counter() - t0, plots=plots)

    def completed() -> bool:
        return bool(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))

    def after_trial(*_) -> None:  # the JSON files, should the process be killed later
        if completed():
            write(plots=False)

    try:
        if trials > finished:
            with _quiet_interrupted_trial():
                study.optimize(
                    objective,
                    n_trials=trials - finished,
                    timeout=timeout,
                    gc_after_trial=False,
                    show_progress_bar=False,
                    callbacks=[after_trial],
                )
    except BaseException:  # Ctrl-C or a failed trial: the outputs of the trials done, then stop
        if completed():
            write()
        raise
    return write()


class _InterruptedTrialFilter(logging.Filter):
    """Drops Optuna's two warnings about a trial that Ctrl-C stopped (its traceback, then its
    value None): the caller reports the interrupt in one line; other failures are logged."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.interrupted.add(message.split(" failed with ", 1)[0])
            return False
        head = message.split(" failed with value ", 1)[0]
        return head == message or head not in self.interrupted


@contextlib.contextmanager
def _quiet_interrupted_trial():
    """:class:`_InterruptedTrialFilter` on the logger of Optuna's optimisation loop."""
    logger = logging.getLogger("optuna.study._optimize")
    quiet = _InterruptedTrialFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _base_config(base: TrainConfig, search) -> dict:
    """``base``'s options that are not searched: those that a study's trials must share."""
    doc = _config_doc(base)
    for name in search:
        doc.pop(name)
    return doc


def _queue_starts(study, starts, search, room: int) -> None:
    """Queue each start point ``(label, config)`` that the study holds no completed trial of
    and has not queued yet, while ``room`` (the trials to run) allows; warn on stderr of a point
    with values outside :data:`SPACE` (drawn instead) and of the points left out."""
    from optuna.trial import TrialState

    # (params, start label or True) of the completed and the queued trials
    tried = [
        (t.params, t.user_attrs.get(START))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    queued = [(t.system_attrs.get("fixed_params", {}), t.user_attrs.get(START)) for t in waiting]
    left_out = []
    for label, cfg in starts:
        params = base_params(cfg, search)
        drawn = [n for n in search if ("lr_factor" if n == "lr" else n) not in params]
        # a point with values drawn by the sampler matches other trials in what is left of it:
        # it is tried unless a trial of it, by its label, was
        if any(_holds(p, params) and (not drawn or s == label) for p, s in tried + queued):
            continue
        if len(queued) >= room:
            left_out.append(label)
            continue
        if drawn:
            values = ", ".join(f"{n} {getattr(cfg, n)!r}" for n in drawn)
            _warn(f"{label}: {values} outside the search space, drawn by the sampler")
        study.enqueue_trial(params, user_attrs={START: label})
        queued.append((params, label))
    if left_out:
        _warn(f"not tried, the study's trials are used up (raise --trials): {', '.join(left_out)}")


def _holds(trial_params: dict, params: dict) -> bool:
    """Whether a trial of ``trial_params`` has ``params``' values (floats within 1e-9)."""

    def same(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9)
        return a == b

    return all(k in trial_params and same(trial_params[k], v) for k, v in params.items())


def _warn(message: str) -> None:
    print(f"lrml tune: warning: {message}", file=sys.stderr)


def _config_doc(cfg: TrainConfig) -> dict:
    doc = asdict(cfg)
    for k in _RUN_OPTIONS:
        doc.pop(k)
    return doc


def _write_outputs(study, out: Path, seconds: float, plots: bool = True) -> dict:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "user_attrs": t.user_attrs,
                "seconds": t.duration.total_seconds() if t.duration else None,
            }
        )
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    result = {"study": study.study_name, "trials": rows, "seconds_this_run": seconds}
    _write_json(out / TRIALS, result)
    if not complete:
        return {"best": None, **result}
    best = study.best_trial
    if best.user_attrs.get("diverged"):  # every completed trial diverged: nothing to recommend
        return {"best": None, "all_diverged": True, **result}
    config = dict(best.user_attrs["config"])
    config["_tuned"] = {
        "study": study.study_name,
        "trial": best.number,
        "valid_ndcg": best.value,
        "valid_hr": best.user_attrs.get("valid_hr"),
        "selected_epoch": best.user_attrs.get("selected_epoch"),
        "finished_trials": len([r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]),
        "note": "chosen on the validation split only; the test split was never read",
    }
    if "seed_valid_ndcg" in best.user_attrs:  # seeds > 1: the values above are their means
        config["_tuned"]["seeds"] = len(best.user_attrs["seed_valid_ndcg"])
        for key in ("seed_valid_ndcg", "seed_selected_epoch"):
            config["_tuned"][key] = best.user_attrs[key]
    _write_json(out / BEST_CONFIG, config)
    drawn = _plot_study(study, out) if plots else []
    return {"best": config, "plots": [p.name for p in drawn], **result}


def _write_json(path: Path, doc) -> None:
    text = json.dumps(_finite(doc), indent=2, allow_nan=False).encode()
    atomic_write(path, lambda f: f.write(text))


def _finite(v):
    """``v`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _plot_study(study, out: Path) -> list[Path]:
    """Optuna's matplotlib plots of the study, as PNG (a plot that cannot be drawn yet, e.g.
    importances with one trial, is left out)."""
    import warnings

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError:
        return []
    written = []
    plots = {
        "optimization_history.png": ovm.plot_optimization_history,
        "intermediate_values.png": ovm.plot_intermediate_values,
        "param_importances.png": ovm.plot_param_importances,
    }
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's "experimental" warnings
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                plt.close("all")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = out / name
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
