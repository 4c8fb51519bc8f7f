"""``lrml train | tune | baseline | evaluate | recommend | explain | convert-checkpoint | info``:
the command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import threading
import typing
import warnings
from pathlib import Path

from lrml_kernels.backends import BackendUnavailable
from lrml_kernels.checkpoints import os_error_under
from lrml_kernels.errors import LRMLWarning, MissingExtra, Terminated
from lrml_kernels.recommend import EXCLUDE
from lrml_kernels.training import (
    BEST,
    CHECKPOINT,
    CURVE,
    METRICS,
    OtherRankError,
    TrainConfig,
    TrainingInterrupted,
    handling_signals,
    warn_no_users,
)

DEFAULT_OUT = "runs/latest"  # lrml train's output folder when --out is not given
DEFAULT_BASELINE_OUT = "runs/popularity"  # lrml baseline's


def _add_train_args(p: argparse.ArgumentParser, *, tune: bool = False) -> None:
    """The options ``lrml train`` and ``lrml tune`` share; ``tune``: the latter's (its trials
    always select on validation, so they evaluate every time and ``none`` is no protocol)."""
    d = TrainConfig()
    a = p.add_argument
    a(
        "--data",
        default=d.data,
        help="data set: synthetic | synthetic-small | synthetic-netflix | ncf:PREFIX | "
        "movielens:PATH | netflix:PATH | netflix-mat:PATH | csv:FILE | citeulike:FILE "
        "(default: %(default)s)",
    )
    a(
        "--min-rating",
        type=float,
        default=d.min_rating,
        metavar="R",
        help="keep only the ratings >= R of a data set with ratings (movielens, netflix, "
        "netflix-mat, csv with a rating column), each kept one a positive (default: all)",
    )
    a("--epochs", type=int, default=d.epochs, help="epochs (default: %(default)s)")
    a("--dim", type=int, default=d.dim, help="embedding dimension d (default: %(default)s)")
    a("--memory-slots", type=int, default=d.memory_slots, help="N (default: %(default)s)")
    a(
        "--negatives",
        type=int,
        default=d.negatives,
        help="negatives per positive (default: %(default)s)",
    )
    a("--margin", type=float, default=d.margin, help="hinge margin (default: %(default)s)")
    a("--lr", type=float, default=None, help="learning rate (default: per optimizer)")
    a(
        "--relation-lr-scale",
        type=float,
        default=d.relation_lr_scale,
        help="the keys' and memory's learning rate as a factor of --lr; 0 freezes them "
        "(default: %(default)s)",
    )
    a(
        "--lr-schedule",
        default=d.lr_schedule,
        choices=["constant", "cosine"],
        help="learning-rate schedule over all steps (default: %(default)s)",
    )
    a(
        "--optimizer",
        default=d.optimizer,
        choices=["adam", "adagrad", "rowwise_adagrad", "sgd"],
        help="(default: %(default)s)",
    )
    a(
        "--distance",
        default=d.distance,
        choices=["l2", "squared_l2", "l1"],
        help="(default: %(default)s)",
    )
    a(
        "--relation",
        default=d.relation,
        choices=["pair", "shared", "none"],
        help="pair, shared (the loss reuses the positive's relation), none: CML, r = 0 "
        "(default: %(default)s)",
    )
    a("--batch-size", type=int, default=d.batch_size, help="rows per step (default: %(default)s)")
    a(
        "--max-norm",
        type=float,
        default=d.max_norm,
        help="unit-ball radius; 0 disables (default: %(default)s)",
    )
    a("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    a("--backend", default=d.backend, choices=["auto", "torch", "triton", "cpu", "cuda"])
    a(
        "--eval",
        default=d.eval,
        choices=["sampled", "full"] if tune else ["sampled", "full", "none"],
        help="evaluation protocol (default: %(default)s)",
    )
    a("--eval-k", type=int, default=d.eval_k, help="k of HR@k / nDCG@k (default: %(default)s)")
    a(
        "--eval-negatives",
        type=int,
        default=d.eval_negatives,
        help="sampled protocol: negatives ranked against each held-out item (ncf: data keeps "
        "its file's 99; default: %(default)s)",
    )
    a("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs")
    a("--seed", type=int, default=d.seed)
    a(
        "--fused-optimizer",
        action=argparse.BooleanOptionalAction,
        default=d.fused_optimizer,
        help="optimizer fused into the backward, touched rows only (default: on)",
    )
    a(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=d.cuda_graph,
        help="capture the fused step as a CUDA graph per batch shape and replay it: fewer "
        "kernel launches from the host for small batches (CUDA device, triton or cuda "
        "backend, --on-nonfinite stop, one process; default: off)",
    )
    a(
        "--matmul-precision",
        default=d.matmul_precision,
        choices=["highest", "high", "medium"],
        help="torch's fp32 matmul precision for the run: highest = IEEE fp32; high and medium "
        "let the fp32 dots of the triton kernels and of cuBLAS use the TF32 tensor cores of a "
        "CUDA device (faster; operands rounded to 10 bits; torch has no bf16 path for fp32 "
        "matmuls on CUDA, so medium is high there, while on the CPU it lets oneDNN compute "
        "torch's own fp32 matmuls in bf16); the cpu and cuda kernels stay IEEE "
        "(default: %(default)s)",
    )
    a(
        "--dtype",
        default=d.dtype,
        choices=["float32", "bfloat16"],
        help="the parameters' dtype: bfloat16 stores the tables, keys and memory in half the "
        "bytes; the kernels compute in fp32 and the fused optimizer keeps its state in fp32 "
        "(needs --fused-optimizer; default: %(default)s)",
    )
    a(
        "--reject-positives",
        action=argparse.BooleanOptionalAction,
        default=d.reject_positives,
        help="draw negatives only among the items the user has not trained on (default: on)",
    )
    a(
        "--popularity-negatives",
        type=float,
        default=d.popularity_negatives,
        metavar="ALPHA",
        help="draw each negative with weight (training count + 1) ** ALPHA, a training item "
        "replaced by a uniform draw; 0: uniform (default: %(default)s)",
    )
    a(
        "--on-nonfinite",
        default=d.on_nonfinite,
        choices=["stop", "skip"],
        help="on NaN/Inf: stop (the last good checkpoint stays) or skip the step (counted in "
        "the epoch's skipped_steps, with a warning; an epoch of skipped steps only stops)",
    )
    a(
        "--patience",
        type=int,
        default=d.patience,
        help=("a trial stops" if tune else "with --select-on valid: stop")
        + " after this many evaluations without a better validation nDCG@k; 0: no early "
        "stopping (default: 0, clears a --config file's)",
    )
    a(
        "--config",
        default=None,
        metavar="FILE",
        help="JSON file of these options (names with underscores, e.g. lrml tune's "
        "best_config.json); options given on the command line override it",
    )
    a("--no-progress", action="store_true", help="no progress bars")
    a("--threads", type=int, default=None, help="torch CPU threads")


def _add_train_only_args(p: argparse.ArgumentParser) -> None:
    """The options of ``lrml train`` that ``lrml tune`` has not (its trials write nothing, run
    whole epochs and select on validation)."""
    d = TrainConfig()
    a = p.add_argument
    a("--max-steps", type=int, default=None, help="stop after this many steps in all")
    a(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="also checkpoint every N steps (0: only after each epoch)",
    )
    a(
        "--select-on",
        default=d.select_on,
        choices=["last", "valid"],
        help="last: report the last epoch on the test split; valid: carve a validation split "
        "out of the training data, keep the epoch with the best validation nDCG@k and report "
        "the test metrics of that epoch only (default: %(default)s)",
    )
    a(
        "--out",
        default=None,
        help=f"output folder (default: {DEFAULT_OUT}, which each run replaces; a folder named "
        "here that holds a run needs --resume or --overwrite)",
    )
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--overwrite", action="store_true", help="replace the run that --out holds, if any")


def _add_device_args(p: argparse.ArgumentParser, *, backend_choices=None) -> None:
    """``--device``, ``--backend``, ``--no-progress`` and ``--threads`` of the commands that load
    a checkpoint."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, choices=backend_choices)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _read_config(path) -> dict:
    """The options of a ``--config`` file as argparse destinations (``_``-keys are notes), each
    value checked against its option's type."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a JSON object of train options expected")
    types = typing.get_type_hints(TrainConfig)
    values = {k: v for k, v in doc.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    for name, value in values.items():
        if not _of_type(value, types[name]):
            raise ValueError(
                f"{path}: option {name} must be {_type_name(types[name])}, got {value!r}"
            )
    if "progress" in values:
        values["no_progress"] = not values.pop("progress")
    return values


def _of_type(value, tp) -> bool:
    """Whether a JSON value fits an option's annotation (bool, int, float, str, ``X | None``)."""
    args = typing.get_args(tp)
    if args:  # X | None
        return any(_of_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    names[type(None)] = "null"
    return " or ".join(names[a] for a in (typing.get_args(tp) or (tp,)))


def _config(args) -> TrainConfig:
    """The TrainConfig of ``lrml train`` / ``lrml tune``'s options."""
    return TrainConfig(
        data=args.data,
        min_rating=args.min_rating,
        epochs=args.epochs,
        dim=args.dim,
        memory_slots=args.memory_slots,
        negatives=args.negatives,
        margin=args.margin,
        lr=args.lr,
        relation_lr_scale=args.relation_lr_scale,
        lr_schedule=args.lr_schedule,
        optimizer=args.optimizer,
        distance=args.distance,
        relation=args.relation,
        batch_size=args.batch_size,
        max_norm=args.max_norm or None,
        device=args.device,
        backend=args.backend,
        eval=args.eval,
        eval_k=args.eval_k,
        eval_negatives=args.eval_negatives,
        eval_every=args.eval_every,
        seed=args.seed,
        fused_optimizer=args.fused_optimizer,
        cuda_graph=args.cuda_graph,
        matmul_precision=args.matmul_precision,
        dtype=args.dtype,
        reject_positives=args.reject_positives,
        popularity_negatives=args.popularity_negatives,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
        on_nonfinite=args.on_nonfinite,
        progress=not args.no_progress,
        select_on=args.select_on,
        patience=args.patience or None,
    )


def _set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads (None: torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _check_out_folder(out: Path) -> None:
    """Fail before any data is loaded where ``--out`` cannot become a folder to write to (not
    after an epoch's or a study's work): a file in its place, or a folder not writable."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    _check_writable(out if out.exists() else out.parent, f"--out {out}")


def _check_writable(path: Path, what: str) -> None:
    """``path`` (or the nearest folder above it that exists) lets this process create files."""
    while not path.exists() and path != path.parent:
        path = path.parent
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: this process may not write in {path}")


def _refuse_a_run(out: Path, how: str) -> None:
    """An ``--out`` named on the command line that holds a run (a training run's checkpoints, or
    any command's metrics.json) is not replaced in silence: ``ValueError`` saying ``how``."""
    held = [n for n in (CHECKPOINT, BEST, METRICS) if (out / n).is_file()]
    if held:
        if CHECKPOINT not in held:
            how = "replace it with --overwrite, or name another --out"
        raise ValueError(f"--out {out} holds a run ({held[0]}): {how}")


def _train(args) -> int:
    import torch

    from lrml_kernels.training import fit

    _set_threads(args.threads)
    cfg = _config(args)
    out = Path(args.out or DEFAULT_OUT)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: not both")
    if args.out is not None and not (args.resume or args.overwrite):
        _refuse_a_run(out, "continue it with --resume, or replace it with --overwrite")
    _check_out_folder(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun: one process per device
        import torch.distributed as dist

        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            cfg.validate()  # this rank's device exists (fit checks every option again)
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    try:
        result = fit(cfg, out, resume=args.resume)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result["final"], indent=2))
        names = ("metrics.json", "learning_curve.png", CHECKPOINT, "best.pt")
        wrote = ", ".join(n for n in names if (out / n).exists())
        print(f"wrote {out}/{wrote}", file=sys.stderr)
        if not (out / names[1]).exists() and importlib.util.find_spec("matplotlib") is None:
            print(
                f"lrml train: no {names[1]}: matplotlib is not installed "
                "(pip install 'lrml_kernels[plot]')",
                file=sys.stderr,
            )
    return 0


def _tune(args) -> int:
    from lrml_kernels.tuning import SPACE, tune

    _set_threads(args.threads)
    search = tuple(SPACE) if args.search is None else tuple(args.search.split(","))
    cfg = _config(args)
    _check_out_folder(Path(args.out))
    start_from = []
    for path in args.start_from:
        options = _read_config(path)
        options.pop("no_progress", None)
        start_from.append(options)
    try:
        r = tune(
            cfg,
            args.out,
            trials=args.trials,
            timeout=args.timeout,
            storage=args.storage,
            study_name=args.study_name,
            search=search,
            progress=cfg.progress,
            start_from=start_from,
            seeds=args.seeds,
        )
    except Exception as exc:  # the study's storage failing (a full disk, say) is no bug of ours
        if type(exc).__name__ != "StorageInternalError":  # (optuna.exceptions: not imported)
            raise
        cause = os_error_under(exc)
        why = f"{cause.strerror}" if cause is not None else str(exc).splitlines()[0]
        raise OSError(f"the study's storage {args.storage} failed: {why}") from exc
    except KeyboardInterrupt as exc:  # tune has written the outputs of the trials completed
        resume = "; the same command resumes the study" if args.storage else ""
        held = (
            f"{args.out} holds the trials completed"
            if (Path(args.out) / "trials.json").exists()
            else "no trial had completed"
        )
        print(f"lrml tune: {_signal_name(exc)}; {held}{resume}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    if r.get("all_diverged"):
        raise ValueError(
            f"every completed trial diverged (a non-finite loss), so no best_config.json: lower "
            f"the learning rate or its range ({args.out}/trials.json holds the trials)"
        )
    print(json.dumps(r["best"], indent=2))
    plots = ", ".join(r.get("plots", []))
    print(
        f"wrote {args.out}/best_config.json, trials.json{', ' if plots else ''}{plots}",
        file=sys.stderr,
    )
    if not plots and importlib.util.find_spec("matplotlib") is None:
        print(
            "lrml tune: no plots: matplotlib is not installed (pip install 'lrml_kernels[plot]')",
            file=sys.stderr,
        )
    return 0


def _checkpoint_and_data(args):
    """``(model, spec, split, ckpt)`` for ``evaluate`` and ``recommend``: the options (device,
    backend), then the checkpoint, are checked before any data is loaded."""
    from lrml_kernels.training import load_checkpoint_data, open_checkpoint

    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be a positive integer, got {args.k}")
    model, ckpt = open_checkpoint(args.checkpoint, args.device, args.backend)
    if args.k is None:  # lrml evaluate: the k the run evaluated with
        args.k = ckpt["config"].get("eval_k", 10)
    spec, split = load_checkpoint_data(ckpt, args.data)
    shape = (model.user_emb.shape[0], model.item_emb.shape[0])
    if shape != (split.num_users, split.num_items):
        raise ValueError(
            f"{spec!r} is not the data this checkpoint was trained on: it has "
            f"{split.num_users:,} users and {split.num_items:,} items, the model {shape[0]:,} "
            f"and {shape[1]:,}"
        )
    if split.fingerprint() != ckpt.get("data_fingerprint"):
        message = f"{spec!r} is not the data this checkpoint was trained on"
        warnings.warn(message, LRMLWarning, stacklevel=2)
    return model, spec, split, ckpt


def _add_eval_args(p: argparse.ArgumentParser, *, k: int | None, k_help: str) -> None:
    """``--eval`` and ``-k`` of the commands that evaluate a ranker (evaluate, baseline)."""
    p.add_argument(
        "--eval",
        nargs="+",
        default=None,
        choices=["sampled", "full"],
        help="protocols (default: both; full alone where the split has no sampled negatives, "
        "as after training with --eval-negatives 0)",
    )
    p.add_argument("-k", "--k", type=int, default=k, help=f"k of HR@k / nDCG@k (default: {k_help})")


def _protocols(asked: list[str] | None, sampled_negatives: bool, whose: str) -> list[str]:
    """The protocols to run: those ``asked`` (``--eval``), by default both, or full ranking alone
    where there are no sampled negatives (``--eval-negatives 0``), for which an explicit
    sampled is an error naming ``whose`` split it is."""
    if sampled_negatives:
        return asked or ["sampled", "full"]
    if asked and "sampled" in asked:
        raise ValueError(
            f"{whose} --eval-negatives 0: its split has no sampled negatives; use --eval full"
        )
    return asked or ["full"]


def _evaluate(args) -> int:
    from lrml_kernels.metrics import compare, evaluate
    from lrml_kernels.precision import using_fp32_matmul_precision

    _set_threads(args.threads)
    model, spec, split, ckpt = _checkpoint_and_data(args)
    other = None if args.against is None else _other_model(args, spec, split)
    protocols = _protocols(
        args.eval, split.test_negatives is not None, f"{args.checkpoint} was trained with"
    )
    # at the fp32 matmul precision the run evaluated with (TF32 dots on a GPU with "high")
    with using_fp32_matmul_precision(ckpt["config"].get("matmul_precision", "highest")):
        for protocol in protocols:
            kw = {"progress": not args.no_progress}
            if other is None:
                m = evaluate(model, split, protocol, args.k, **kw)
            else:
                m = compare(model, other, split, protocol, args.k, **kw)
            if m["users"] == 0:
                warn_no_users(spec)
            print(json.dumps(m))
    return 0


def _other_model(args, spec, split):
    """The model of ``--against``: trained on the same split as the first (the same data,
    seed, evaluation negatives and validation carve), run on the same device."""
    from lrml_kernels.training import open_checkpoint

    other, ckpt = open_checkpoint(args.against, args.device, args.backend)
    if ckpt.get("data_fingerprint") != split.fingerprint():
        raise ValueError(
            f"--against {args.against} was not trained on the split of {spec!r} that "
            f"{args.checkpoint} is evaluated on (data, --min-rating, --seed, --eval-negatives "
            "and --select-on must match): a paired comparison needs the same held-out items "
            "and the same training data"
        )
    return other


def _user_ids(users: str) -> list[str]:
    """The ids of ``--users``: comma-separated, or ``@FILE``, a file of ids separated by commas
    or line breaks."""
    if users.startswith("@"):
        text = Path(users[1:]).expanduser().read_text(encoding="utf-8-sig")
        where = f"--users {users}"
    else:
        text, where = users, "--users"
    ids = [u.strip() for line in text.splitlines() for u in line.split(",") if u.strip()]
    if not ids:
        raise ValueError(f"{where} names no user id")
    return ids


def _recommend(args) -> int:
    from lrml_kernels import recommend

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.out != "-":
        if not Path(args.out).parent.is_dir():
            raise FileNotFoundError(f"--out {args.out}: its folder does not exist")
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder: name the file to write")
        _check_writable(Path(args.out).parent, f"--out {args.out}")
    ids = None if args.users is None else _user_ids(args.users)
    _set_threads(args.threads)
    model, spec, split, ckpt = _checkpoint_and_data(args)
    users = recommend.user_indices(split, ids)
    rated = None
    if args.exclude == "known" and ckpt["config"].get("min_rating") is not None:
        # the items the user rated below it are known too (data.load dropped them)
        from lrml_kernels import data

        rated = recommend.rated_pairs(split, data.read_source(spec))
    exclude = recommend.exclusion_csr(split, args.exclude, rated)
    k = min(args.k, split.num_items)  # (the lists hold no more: a k of 10^9 needs no memory)
    batches = recommend.recommend_users(model, users, k, exclude, batch_size=args.batch_size)
    rows = recommend.write_csv(
        args.out, split, batches, total=users.size, progress=not args.no_progress
    )
    where = "standard output" if args.out == "-" else args.out
    lists = f"{users.size} user" + ("" if users.size == 1 else "s")
    print(f"wrote {rows} recommendations for {lists} to {where}", file=sys.stderr)
    return 0


def _explain(args) -> int:

    from lrml_kernels import backends, explain

    _set_threads(args.threads)
    backends.check_device(args.device)  # before the checkpoint and the data are read
    try:
        summary = explain.run(
            args.checkpoint,
            args.out,
            data=args.data,
            max_pairs=args.max_pairs,
            seeds=args.seeds,
            folds=args.folds,
            cml=args.cml,
            device=args.device,
            backend=args.backend,
            progress=not args.no_progress,
        )
    except ImportError as exc:  # scikit-learn (the explain extra) is not installed
        print(f"lrml explain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary["claims"], indent=2))
    print(f"wrote {args.out}/report.md, probes.json and the plots (PNG)", file=sys.stderr)
    return 0


def _convert(args) -> int:
    from lrml_kernels import checkpoints

    names = checkpoints.convert(args.old, args.new)
    held = f"it held {', '.join(names)}" if names else "it held plain values only already"
    print(f"wrote {args.new} as plain values ({held})", file=sys.stderr)
    return 0


def _baseline(args) -> int:
    """A baseline ranker evaluated by the same ``evaluate`` as LRML, both protocols."""
    from lrml_kernels import data
    from lrml_kernels.checkpoints import atomic_write
    from lrml_kernels.metrics import PopularityRanker, evaluate

    out = Path(args.out or DEFAULT_BASELINE_OUT)
    if args.out is not None and not args.overwrite:
        _refuse_a_run(out, "replace it with --overwrite, or name another --out")
    _check_out_folder(out)
    protocols = _protocols(args.eval, args.eval_negatives > 0, "this baseline has")
    validation = args.select_on == "valid"
    split = data.load(
        args.data,
        min_rating=args.min_rating,
        num_negatives=args.eval_negatives,
        seed=args.seed,
        validation=validation,
    )
    ranker = PopularityRanker(split)  # counts the training interactions only
    doc = {
        "baseline": args.model,
        "data": split.name,
        "seed": args.seed,
        "eval_negatives": args.eval_negatives,
        "select_on": args.select_on,
        "num_users": split.num_users,
        "num_items": split.num_items,
        "train_interactions": len(split.train),
    }
    if validation:  # nothing to select: reported for comparison with LRML's validation curves
        doc["valid"] = {p: evaluate(ranker, split.validation(), p, args.k) for p in protocols}
    doc["test"] = {p: evaluate(ranker, split, p, args.k) for p in protocols}
    if len(split.test_users) == 0:
        warn_no_users(args.data)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2).encode()
    try:
        atomic_write(out / METRICS, lambda f: f.write(text))
    except BaseException:
        if made:
            out.rmdir()  # (atomic_write leaves nothing in it)
        raise
    for name in (CHECKPOINT, BEST, CURVE):  # --overwrite of a training run: all of it replaced
        (out / name).unlink(missing_ok=True)  # (once the new metrics.json is there)
    print(json.dumps(doc["test"], indent=2))
    print(f"wrote {out / METRICS}", file=sys.stderr)
    return 0


def _info(args) -> int:
    import platform

    import torch

    from lrml_kernels import __version__, backends, extension

    print(
        f"lrml_kernels {__version__}, torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"CUDA available: {torch.cuda.is_available()}")
    for name in backends.BACKENDS:
        reason = backends.why_unavailable(name)
        print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
        origin = extension.library_origin(name) if name in ("cpu", "cuda") else None
        if reason is None and origin:
            print(f"          {origin}")
    return 0


def main(argv=None) -> int:
    from lrml_kernels import __version__

    parser = argparse.ArgumentParser(
        prog="lrml",
        description="Train, tune, evaluate and serve LRML recommenders (lrml COMMAND --help).",
    )
    parser.add_argument("--version", action="version", version=f"lrml_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train LRML and evaluate it every epoch")
    _add_train_args(p)
    _add_train_only_args(p)
    p.set_defaults(func=_train)
    with_config = [p]
    p = sub.add_parser(
        "tune",
        help="search hyperparameters on the validation split (Optuna); never reads the test items",
    )
    _add_train_args(p, tune=True)
    a = p.add_argument
    a("--trials", type=int, default=50, help="the study's total trials (default: %(default)s)")
    a("--timeout", type=float, default=None, help="stop starting trials after SECONDS")
    a("--storage", default=None, help="Optuna storage, e.g. sqlite:///tune.db (default: memory)")
    a("--study-name", default="lrml", help="the study's name in the storage (default: %(default)s)")
    a("--out", default="runs/tune", help="output folder (default: %(default)s)")
    a(
        "--seeds",
        type=int,
        default=1,
        help="training seeds per trial, --seed onwards, on the split --seed carves: a trial's "
        "value is the mean of their best validation nDCG (default: %(default)s)",
    )
    a(
        "--search",
        default=None,
        help="comma-separated parameters to search (default: all of "
        "optimizer,lr,relation_lr_scale,lr_schedule,dim,memory_slots,negatives,margin,distance,"
        "relation,max_norm,batch_size,popularity_negatives); the others keep the options given",
    )
    a(
        "--start-from",
        action="append",
        default=[],
        metavar="FILE",
        help="JSON file of train options (e.g. another study's best_config.json): its values of "
        "the searched parameters are tried right after the options given (repeatable)",
    )
    # (trials select on validation, run whole epochs and write no checkpoints)
    p.set_defaults(func=_tune, select_on="valid", max_steps=None, checkpoint_every=0)
    with_config.append(p)
    p = sub.add_parser("evaluate", help="evaluate a checkpoint (sampled and/or full ranking)")
    p.add_argument("checkpoint", help="path to a checkpoint.pt written by lrml train")
    p.add_argument("--data", default=None, help="data set (default: the checkpoint's)")
    _add_eval_args(p, k=None, k_help="the run's --eval-k")
    p.add_argument(
        "--against",
        default=None,
        metavar="CHECKPOINT",
        help="a second model trained on the same split: a paired comparison per test user "
        "(each metric's difference, its standard error and 95%% interval)",
    )
    _add_device_args(p)
    p.set_defaults(func=_evaluate)
    p = sub.add_parser(
        "recommend",
        help="top-k items for each user from a checkpoint, as CSV user,rank,item,distance with "
        "the data's original ids",
    )
    p.add_argument("checkpoint", help="path to a checkpoint.pt written by lrml train")
    p.add_argument("--data", default=None, help="data set (default: the checkpoint's)")
    p.add_argument("-k", "--k", type=int, default=10, help="items per user (default: %(default)s)")
    p.add_argument(
        "--users",
        default=None,
        metavar="IDS",
        help="comma-separated user ids as the data writes them, or @FILE: a file of them, "
        "one or more a line (default: every user)",
    )
    p.add_argument(
        "--exclude",
        default="known",
        choices=list(EXCLUDE),
        help="items left out of a user's list: known = every item the data holds for the user "
        "(training, validation, test; with a model trained with --min-rating, the items rated "
        "below it too); train = the training items; none (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default="-",
        help="CSV file, written in full or not at all; - = standard output (default: -)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="users per top-k call (default: 1,024 on the CPU, 8,192 on a GPU)",
    )
    _add_device_args(p)
    p.set_defaults(func=_recommend)
    p = sub.add_parser(
        "explain",
        help="what the memory slots learn: probes of the attention and relation vectors for the "
        "rating, time and item and user attributes, against controls; plots and report.md",
    )
    p.add_argument("checkpoint", help="checkpoint.pt of lrml train --data movielens:PATH")
    p.add_argument(
        "--data",
        default=None,
        help="movielens:PATH, with movies.dat + users.dat (ML-1M) or u.item + u.user (ML-100K) "
        "next to the ratings (default: the checkpoint's data)",
    )
    p.add_argument("--out", default="runs/explain", help="output folder (default: %(default)s)")
    p.add_argument(
        "--max-pairs",
        type=int,
        default=50_000,
        help="pairs drawn per seed for the probes, at least 1,000 (default: %(default)s)",
    )
    p.add_argument(
        "--seeds", type=int, default=5, help="seeds of draws and folds, at least 2 (default: 5)"
    )
    p.add_argument(
        "--folds", type=int, default=2, help="cross-validation folds, at least 2 (default: 2)"
    )
    p.add_argument(
        "--cml",
        default=None,
        metavar="CHECKPOINT",
        help="a CML model (lrml train --relation none) on the same training data (its seed and "
        "evaluation negatives may differ): its p - q is a control",
    )
    _add_device_args(p, backend_choices=["auto", "torch", "triton", "cpu", "cuda"])
    p.set_defaults(func=_explain)
    p = sub.add_parser(
        "convert-checkpoint",
        help="rewrite a checkpoint that holds more than plain values (from an earlier version) "
        "so that it loads without running code; this loads OLD in full: only for files you trust",
    )
    p.add_argument("old", help="the checkpoint to convert (its code runs: trusted files only)")
    p.add_argument("new", help="where to write the converted checkpoint (may be OLD)")
    p.set_defaults(func=_convert)
    p = sub.add_parser(
        "baseline", help="evaluate a baseline with the same evaluation as LRML (metrics.json)"
    )
    p.add_argument("model", choices=["popularity"], help="popularity: rank by training count")
    p.add_argument("--data", default=TrainConfig().data, help="data set, as for train")
    p.add_argument(
        "--min-rating", type=float, default=None, metavar="R", help="as for train (default: all)"
    )
    _add_eval_args(p, k=10, k_help="10")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled negatives")
    p.add_argument(
        "--eval-negatives",
        type=int,
        default=TrainConfig().eval_negatives,
        help="sampled protocol: negatives per held-out item, as for train (default: %(default)s)",
    )
    p.add_argument(
        "--select-on",
        default="last",
        choices=["last", "valid"],
        help="valid: carve the validation split first, as lrml train --select-on valid does "
        "(the counts then leave the validation items out; both splits are reported)",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"output folder (default: {DEFAULT_BASELINE_OUT}, which each run replaces; a folder "
        "named here that holds a run needs --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.set_defaults(func=_baseline)
    p = sub.add_parser("info", help="versions and which backends run here")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
        return _run(parser, with_config, args, argv)


def _one_line_warnings(command: str, show):
    """``warnings.showwarning`` that prints the package's warnings (:class:`LRMLWarning`) as
    one ``lrml COMMAND: warning: ...`` line, and the others as ``show`` does."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LRMLWarning):
            print(f"lrml {command}: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _under_torchrun() -> bool:
    """This process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt) in the main thread for
    the command's duration, so that it stops as on Ctrl-C (a signal the process ignores, as under
    nohup, stays ignored). Not for the processes of a torchrun run, whose launcher stops them."""
    if threading.current_thread() is not threading.main_thread() or _under_torchrun():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    signums = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    with handling_signals(signums, handler):
        yield


def _signal_name(exc: BaseException) -> str:
    signum = getattr(exc, "signum", signal.SIGINT)
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _run(parser, with_config, args, argv) -> int:
    try:
        if args.command != "train" and _under_torchrun():
            # (each rank would run the whole command: results printed and files raced over)
            raise ValueError(
                f"lrml {args.command} runs in one process; of the commands, only lrml train "
                "uses the processes torchrun starts"
            )
        if getattr(args, "config", None):  # the file's options, then the command line's again
            values = _read_config(args.config)
            for p in with_config:
                p.set_defaults(**values)
            args = parser.parse_args(argv)
        with _terminate_as_interrupt():
            return args.func(args)
    except BrokenPipeError:  # `lrml recommend ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush)
        return 128 + 13  # as a process that SIGPIPE ended: what the shell reports for `yes | head`
    except (
        ValueError,
        OSError,  # a missing file, a folder given for a file, a full disk, ...
        IndexError,
        BackendUnavailable,
        MissingExtra,  # an optional dependency: the message names the extra to install
        FloatingPointError,  # training.NonFiniteLossError
        OtherRankError,  # a run of several processes stopped by another rank
    ) as exc:
        print(f"lrml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:  # out of memory (torch's, CUDA's, numpy's)
        text = str(exc) or type(exc).__name__
        oom = "can't allocate memory" in text or "out of memory" in text.lower()
        if not (oom or isinstance(exc, MemoryError)):
            raise
        print(
            f"lrml {args.command}: error: out of memory ({text.strip().splitlines()[0]}): "
            "a smaller --dim, --batch-size or --negatives needs less (the data set itself, "
            "its evaluation negatives and the tables with their optimizer state must fit too)",
            file=sys.stderr,
        )
        return 2
    except TrainingInterrupted as exc:
        print(f"lrml {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt as exc:  # Ctrl-C (or Terminated) elsewhere: evaluate, recommend, ...
        print(f"lrml {args.command}: {_signal_name(exc)}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
