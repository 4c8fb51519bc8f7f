"""The training loop: data -> negatives -> fused step -> evaluation -> metrics and checkpoints.

``fit(TrainConfig(...), out_dir)`` is what ``lrml train`` runs. Everything random (shuffling and
negative sampling) comes from one ``torch.Generator`` on the training device whose state is saved
in every checkpoint, so ``resume=True`` continues exactly where the last checkpoint was taken and
reaches the same result as an uninterrupted run (bitwise on the CPU).

Files written to ``out_dir``: ``checkpoint.pt`` (after every epoch and every
``checkpoint_every`` steps; written to a temporary file, fsynced, then renamed, so a crash never
leaves a broken checkpoint; in a background thread while training goes on, from a copy of the
tensors; plain values only, loaded without running code: see :mod:`lrml_kernels.checkpoints`),
``metrics.json`` (same atomic write, in the same thread once the epoch's checkpoint is on disk,
so it never lists an epoch that ``checkpoint.pt`` lacks) and ``learning_curve.png``; the
temporary files of a killed run are deleted when it resumes. A fresh run (not resumed)
first removes those files and ``best.pt`` of an earlier run in ``out_dir``. Ctrl-C stops after the
step under way and checkpoints there (:class:`TrainingInterrupted`).

Per step the loop runs the step and nothing else: the next batch is prepared while it runs
where a core or a side stream is free, else just before it
(:class:`lrml_kernels.batches.BatchPipeline`), and the loss is read back (a host sync on a GPU)
every ``READ_LOSS_EVERY`` steps, at the end of the epoch and before every checkpoint; a NaN/Inf
loss is then reported with the first bad step, and no checkpoint is written after it.

Model selection (``select_on="valid"``): a validation split is carved out of the training data
(:func:`lrml_kernels.data.carve_validation`), every evaluation reads it (never the test items),
the best epoch by validation nDCG@k is kept (in the checkpoint too, so resume keeps it), training
stops after ``patience`` evaluations without improvement, and only then is the test split read,
once, for the selected epoch (``best.pt`` holds that model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lrml_kernels import backends, checkpoints, ops
from lrml_kernels import data as lkdata
from lrml_kernels.batches import BatchPipeline, EpochOrder
from lrml_kernels.errors import BackendUnavailable, LRMLWarning
from lrml_kernels.metrics import PROTOCOLS, evaluate
from lrml_kernels.model import LRML, MODEL_RELATIONS
from lrml_kernels.precision import FP32_MATMUL_PRECISIONS, using_fp32_matmul_precision
from lrml_kernels.reference import DISTANCES
from lrml_kernels.trainer import DEFAULT_LR, OPTIMIZERS, LRMLTrainer, check_relation_lr_scale

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CURVE = "learning_curve.png"
BEST = "best.pt"
SELECT_ON = ("last", "valid")

# "cosine": lr · (0.05 + 0.95 · (1 + cos(π t)) / 2) at the fraction t of all steps done.
LR_SCHEDULES = ("constant", "cosine")
# Learning rates when TrainConfig.lr is None: Adam's was tuned with the cosine schedule on the NCF
# ML-1M files (README, "Tuning the defaults"); Adagrad's are the usual 0.1. SGD's is measured on the
# built-in data (``lrml train --optimizer sgd --lr LR``, defaults otherwise, 2026-12-04): with the
# summed loss 0.1 went non-finite at step 11-15 and 0.03 within the first epoch, 0.02 at step 47;
# 0.015 trained; 0.01 reached HR@10 0.681 / nDCG@10 0.415 in 3 epochs (Adagrad 0.1: 0.692 / 0.421).
TRAIN_LR = {**DEFAULT_LR, "adam": 1e-2, "sgd": 1e-2}
# The keys' and memory's learning rate as a factor of lr (README, "A slower relation").
RELATION_LR_SCALE = 0.01
# Options added since checkpoints were first written, with the value that older checkpoints
# were trained with (not the default of today).
OPTIONS_BEFORE = {
    "relation_lr_scale": 1.0,
    "popularity_negatives": 0.0,
    "dtype": "float32",
    "select_on": "last",
    "patience": None,
    "eval_negatives": 100,
    "min_rating": None,
}
# The parameters' storage dtypes of ``TrainConfig.dtype`` (the kernels compute in fp32 for both).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The largest popularity_negatives alpha (beyond it the most popular items take nearly every draw).
POPULARITY_ALPHA_MAX = 4.0

# Steps between two reads of the loss (a host sync on a GPU): the progress bar is updated and a
# non-finite loss found then, naming its step. Every checkpoint reads it first.
READ_LOSS_EVERY = 50

# Options that may differ between a checkpoint and the run that resumes it (the device within its
# kind: cuda:0 -> cuda:1, not cpu -> cuda; _restore says so).
RESUMABLE_CHANGES = (
    "epochs", "max_steps", "device", "progress", "checkpoint_every", "eval_every", "cuda_graph",
    "matmul_precision",
)  # fmt: skip


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP stopped :func:`fit` after a whole step, and the run
    was checkpointed there: ``--resume`` goes on from that step as if it had not stopped.
    ``signum``: the signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


#: The signals a checkpointing run takes after its step under way: Ctrl-C, ``kill`` / a
#: scheduler's stop, a closed terminal (a signal the process ignores, as under nohup, stays so).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class RunInProgressError(ValueError):
    """Another process holds the output folder: it is training into it now."""


@contextlib.contextmanager
def handling_signals(signums, handler):
    """``handler`` for each of ``signums`` that the process does not ignore (an ignored one, as
    under nohup or SIGINT in a background job, stays ignored), their previous handlers yielded
    and restored after."""
    previous = {s: signal.getsignal(s) for s in signums}
    previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN/Inf loss or gradient; the last good checkpoint is left intact."""


class OtherRankError(RuntimeError):
    """A run of several processes stopped on this rank because of another: its set-up or its
    ``on_epoch`` failed there, or the replicas diverged. The message says which and why."""


def warn_no_users(spec: str, which: str = "test", stacklevel: int = 3) -> None:
    """The warning that the ``which`` split of data set ``spec`` holds no users."""
    warnings.warn(
        f"data set {spec!r}: the {which} split holds no users (a user needs two distinct items, "
        "one to hold out): its HR and nDCG are 0 by convention, not measured",
        LRMLWarning,
        stacklevel=stacklevel,
    )


def check_int(name: str, value, least: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= least`` (1 or 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "positive" if least == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")


@dataclass
class TrainConfig:
    """Every option of ``lrml train`` (the CLI flags are these names with dashes)."""

    data: str = "synthetic"
    # keep only the ratings >= this of a source with ratings (each kept one is a positive);
    # None: every interaction
    min_rating: float | None = None
    epochs: int = 15
    dim: int = 64
    memory_slots: int = 20
    negatives: int = 10
    margin: float = 1.0
    lr: float | None = None
    relation_lr_scale: float = RELATION_LR_SCALE  # keys and memory learn at lr × this
    lr_schedule: str = "cosine"
    optimizer: str = "adam"
    distance: str = "squared_l2"
    relation: str = "pair"
    batch_size: int = 1024
    max_norm: float | None = 1.0
    device: str = "cpu"
    backend: str = "auto"
    eval: str = "sampled"
    eval_k: int = 10
    # the sampled protocol's negatives per held-out item (``ncf:`` data keeps its file's 99)
    eval_negatives: int = 100
    eval_every: int = 1
    seed: int = 0
    fused_optimizer: bool = True
    cuda_graph: bool = False  # the fused step captured as a CUDA graph (LRMLTrainer(cuda_graph=))
    # torch's fp32 matmul precision while fit runs (restored after): "high" puts the fp32 dots of
    # the triton kernels and cuBLAS on the TF32 tensor cores of a CUDA device (SPEC.md, "Precision")
    matmul_precision: str = "highest"
    # the tables', keys' and memory's dtype: "bfloat16" halves the bytes each step moves; the
    # kernels compute in fp32 and the fused optimizer keeps its state in fp32
    dtype: str = "float32"
    reject_positives: bool = True
    # alpha of popularity-aware negatives: each drawn with weight (training count + 1) ** alpha,
    # a training item replaced by a uniform draw (data.sample_negatives); 0: uniform negatives
    popularity_negatives: float = 0.0
    max_steps: int | None = None
    checkpoint_every: int = 0
    on_nonfinite: str = "stop"
    progress: bool = True
    # "last": report the last epoch's test metrics (every evaluation reads the test split).
    # "valid": evaluate on a validation split, keep the epoch with the best validation nDCG@k and
    # report the test metrics of that epoch only.
    select_on: str = "last"
    patience: int | None = None  # select_on="valid": stop after this many evaluations w/o gain

    def validate(self) -> None:
        for name in (
            "epochs",
            "dim",
            "memory_slots",
            "negatives",
            "batch_size",
            "eval_k",
            "eval_every",
        ):
            check_int(name, getattr(self, name))
        for name in ("seed", "eval_negatives", "checkpoint_every"):
            check_int(name, getattr(self, name), least=0)
        if self.seed >= 2**32:  # torch's CPU generator keeps a seed's low 32 bits only
            raise ValueError(
                f"seed must be below 2**32, got {self.seed} (torch's CPU generator keeps 32 bits: "
                f"it would train as seed {self.seed % 2**32})"
            )
        lkdata.check_min_rating(self.data, self.min_rating)
        if self.eval == "sampled" and self.eval_negatives < 1:
            raise ValueError("eval='sampled' needs eval_negatives >= 1")
        ops._check_option("distance", self.distance, DISTANCES)
        ops._check_option("relation", self.relation, MODEL_RELATIONS)
        ops.check_number("margin", self.margin, low=0)
        ops.check_number("max_norm", self.max_norm, low=0, above=True, optional=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.eval not in (*PROTOCOLS, "none"):
            raise ValueError(f"eval must be one of {(*PROTOCOLS, 'none')}, got {self.eval!r}")
        if self.matmul_precision not in FP32_MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul_precision must be one of {FP32_MATMUL_PRECISIONS}, "
                f"got {self.matmul_precision!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32" and not self.fused_optimizer:
            raise ValueError(
                f"dtype={self.dtype!r} needs the fused optimizer (--fused-optimizer), whose state "
                "is fp32; torch's optimizers would keep theirs in the parameters' dtype"
            )
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        check_relation_lr_scale(self.relation_lr_scale)
        if not self.fused_optimizer and self.optimizer == "rowwise_adagrad":
            raise ValueError("rowwise_adagrad exists only as a fused optimizer (--fused-optimizer)")
        if not self.fused_optimizer and self.on_nonfinite == "skip":
            raise ValueError("on_nonfinite='skip' needs the fused optimizer (--fused-optimizer)")
        backends.check_device(self.device)  # one that exists here (touches no device)
        if self.cuda_graph:
            if not self.fused_optimizer:
                raise ValueError("cuda_graph captures the fused step (--fused-optimizer)")
            if torch.device(self.device).type != "cuda":
                raise ValueError(f"cuda_graph needs a CUDA device, got device {self.device!r}")
            if self.on_nonfinite == "skip":
                raise ValueError(
                    "cuda_graph cannot skip non-finite steps (on_nonfinite='skip' reads every "
                    "step's loss on the host); use on_nonfinite='stop'"
                )
            if self.backend in ("torch", "cpu"):
                raise ValueError(
                    f"cuda_graph needs the triton or cuda backend, got backend {self.backend!r}"
                )
        alpha = self.popularity_negatives
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"popularity_negatives must be a number >= 0, got {alpha!r}")
        if not (math.isfinite(alpha) and 0 <= alpha <= POPULARITY_ALPHA_MAX):
            raise ValueError(
                f"popularity_negatives must lie in [0, {POPULARITY_ALPHA_MAX}], got {alpha!r}"
            )
        if alpha > 0 and not self.reject_positives:
            raise ValueError(
                "popularity_negatives replaces drawn training items by uniform ones: it needs "
                "reject_positives (--reject-positives)"
            )
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}")
        if self.select_on == "valid" and self.eval == "none":
            raise ValueError("select_on='valid' needs an evaluation protocol (eval='none' given)")
        if self.patience is not None:
            check_int("patience", self.patience)
            if self.select_on != "valid":
                raise ValueError(
                    "patience (early stopping) needs select_on='valid' (--patience 0: none)"
                )


class _UnfusedStep:
    """Autograd + torch optimizers + projection: the reference way to train (``--no-fused``)."""

    def __init__(self, model: LRML, cfg: TrainConfig):
        self.model = model
        lr = cfg.lr if cfg.lr is not None else TRAIN_LR[cfg.optimizer]
        # one param group per learning rate; "lr_scale" is the group's factor of lr (set_lr)
        emb = {"params": [model.user_emb, model.item_emb], "lr_scale": 1.0}
        dense = {"params": [model.keys, model.memory], "lr_scale": cfg.relation_lr_scale}
        for group in (emb, dense):
            group["lr"] = lr * group["lr_scale"]
        if cfg.optimizer == "adam":
            self.opts = [torch.optim.SparseAdam([emb]), torch.optim.Adam([dense])]
        elif cfg.optimizer == "adagrad":
            self.opts = [torch.optim.Adagrad([emb, dense])]
        else:
            self.opts = [torch.optim.SGD([emb, dense])]

    def set_lr(self, lr: float) -> None:
        for o in self.opts:
            for group in o.param_groups:
                group["lr"] = lr * group["lr_scale"]

    def step(self, users, items):
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss = self.model(users, items)
        loss.backward()
        for o in self.opts:
            o.step()
        self.model.project_(users, items)
        return loss.detach()

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, sd):
        # (a list: as written before 2026-12-07, when the checkpoint check refused it)
        for o, s in zip(self.opts, sd["optimizers"] if isinstance(sd, dict) else sd, strict=True):
            o.load_state_dict(s)


def build_model(cfg: TrainConfig, num_users: int, num_items: int) -> LRML:
    """The model of ``cfg``, initialised from ``cfg.seed`` by a generator of its own, so torch's
    global RNG is left as it was."""
    return LRML(
        num_users,
        num_items,
        cfg.dim,
        cfg.memory_slots,
        distance=cfg.distance,
        relation=cfg.relation,
        margin=cfg.margin,
        max_norm=cfg.max_norm,
        sparse=not cfg.fused_optimizer,
        backend=cfg.backend,
        validate=False,
        device=cfg.device,
        dtype=DTYPES[cfg.dtype],
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build(cfg: TrainConfig, num_users: int, num_items: int):
    """The model and its step function for ``cfg`` (seeded by ``cfg.seed``)."""
    model = build_model(cfg, num_users, num_items)
    if cfg.fused_optimizer:
        lr = cfg.lr if cfg.lr is not None else TRAIN_LR[cfg.optimizer]
        skip = cfg.on_nonfinite == "skip"
        return model, LRMLTrainer(
            model, cfg.optimizer, lr, skip_nonfinite=skip, cuda_graph=cfg.cuda_graph,
            relation_lr_scale=cfg.relation_lr_scale,
        )  # fmt: skip
    return model, _UnfusedStep(model, cfg)


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _stored_options(ckpt: dict) -> dict:
    """The options a checkpoint was trained with, those added since it was written included
    (:data:`OPTIONS_BEFORE`)."""
    return {**OPTIONS_BEFORE, **ckpt["config"]}


def _check_compatible(ckpt: dict, cfg: TrainConfig, world: int) -> None:
    """Refuse to resume ``ckpt`` with other options or another number of processes."""
    if ckpt.get("world_size", 1) != world:
        raise ValueError(
            f"refusing to resume: the checkpoint was written by {ckpt.get('world_size', 1)} "
            f"processes and this run has {world}"
        )
    old, new = _stored_options(ckpt), asdict(cfg)
    unknown = sorted(set(old) - set(new))
    if unknown:
        raise ValueError(
            f"refusing to resume: the checkpoint (lrml_kernels {ckpt.get('version', '?')}) has "
            f"options this version ({_version()}) does not know: "
            + ", ".join(f"{k}={old[k]!r}" for k in unknown)
        )
    if cfg.epochs < ckpt.get("epoch", 0):
        raise ValueError(
            f"refusing to resume: the checkpoint has {ckpt['epoch']} epochs done, more than "
            f"--epochs {cfg.epochs}"
        )
    if _lr_of(old) == _lr_of(new):  # lr None is the optimizer's default: the same either way
        old["lr"] = new["lr"]
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        what = "options differ from the checkpoint's"
        # (the seed draws the synthetic data and the split; min_rating chooses the ratings)
        if {"data", "min_rating", "seed"} & set(diff):
            what = "the checkpoint was trained on different data"
        raise ValueError(
            f"refusing to resume: {what} ({changes}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )


def _lr_of(options: dict) -> float | None:
    """The learning rate a run with ``options`` uses (``lr`` None: its optimizer's default)."""
    lr = options.get("lr")
    return TRAIN_LR.get(options.get("optimizer")) if lr is None else lr


def _check_same_data(ckpt: dict, cfg: TrainConfig, fingerprint: str) -> None:
    if ckpt["data_fingerprint"] != fingerprint:
        raise ValueError(
            "refusing to resume: the checkpoint was trained on different data "
            f"(checkpoint data {ckpt['config'].get('data')!r}, fingerprint "
            f"{ckpt['data_fingerprint'][:12]}; now {cfg.data!r}, {fingerprint[:12]})"
        )


def _plot_curve(history: list[dict], path: Path) -> None:
    try:  # (no pyplot: the caller's backend stays as it was, and a thread may draw)
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax1 = fig.subplots()
    ax1.plot(epochs, [h["loss"] for h in history], "o-", color="tab:red", label="loss")
    ax1.set_xlabel("epoch")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel("mean loss per row", color="tab:red")
    pre = "valid_" if any("valid_hr" in h for h in history) else ""
    evals = [h for h in history if pre + "hr" in h]
    if evals:
        ax2 = ax1.twinx()
        what = "valid " if pre else ""
        x = [h["epoch"] for h in evals]
        ax2.plot(x, [h[pre + "hr"] for h in evals], "s-", label=f"{what}HR@k")
        ax2.plot(x, [h[pre + "ndcg"] for h in evals], "^-", label=f"{what}nDCG@k")
        ax2.set_ylabel("metric")
        ax2.legend(loc="center right")
    fig.tight_layout()
    checkpoints.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def evaluate_test(model, split, cfg: TrainConfig) -> dict:
    """The test metrics of ``model`` (with ``select_on="valid"``: the one read of the test split,
    after selection)."""
    return evaluate(model, split, cfg.eval, cfg.eval_k, shard=_rank_world())


def _stale(history: list[dict], best: dict | None) -> int:
    """Evaluations since the best one."""
    if best is None:
        return 0
    return sum(1 for h in history if "valid_ndcg" in h and h["epoch"] > best["epoch"])


def fit(
    cfg: TrainConfig,
    out_dir=None,
    *,
    resume: bool = False,
    split=None,
    on_epoch=None,
    test: bool = True,
) -> dict:
    """Train LRML as configured; return the metrics dict also written to ``metrics.json``.

    Args:
        cfg: the options. out_dir: where checkpoints and metrics go (None: nothing is written).
        resume: continue from ``out_dir/checkpoint.pt`` (refused if data or options differ).
        split: a ready :class:`lrml_kernels.data.Split` (otherwise ``cfg.data`` is loaded); with
            ``select_on="valid"`` one without a validation split gets one carved out.
        on_epoch: called with each finished epoch's record (``lrml tune`` reports and prunes
            there; an exception it raises ends training).
        test: with ``select_on="valid"``, evaluate the selected epoch on the test split at the
            end (False: the test split is never read).

    Under an initialised process group every rank calls it with the same options but its own
    device: ``lrml train`` sets ``cfg.device = f"cuda:{LOCAL_RANK}"`` and calls
    ``torch.cuda.set_device`` before ``init_process_group("nccl")``; a caller of ``fit`` does
    the same (``"cuda"`` alone is the current device, cuda:0 on every rank unless set). The
    ranks check at set-up that they agree on everything else (:func:`_agree_across_ranks`), and
    at every checkpoint that their replicas are still the same bit for bit.
    """
    # (rank 0 alone makes, holds and removes the folder: the ranks would race over it)
    first = out_dir is not None and _rank_world()[0] == 0
    new_dir = first and not Path(out_dir).exists()
    try:
        cfg.validate()
        # A backend that cannot run on the device is refused now, not after the data is loaded.
        backends.resolve(cfg.backend, torch.device(cfg.device))
        held = _hold_folder(Path(out_dir)) if first else None
    except Exception as exc:
        _agree_across_ranks(None, exc)  # the other ranks stop too, instead of waiting
        raise
    try:
        return _fit(cfg, out_dir, resume, split, on_epoch, test, new_dir)
    finally:
        if held is not None:
            os.close(held)


def _hold_folder(out: Path) -> int | None:
    """Make ``out`` and hold an exclusive ``flock`` on it for the run (the folder itself: no lock
    file to leave behind; the kernel drops it when the process ends, SIGKILL too). A second run
    into the same folder is refused instead of mixing its files with the first's. Returns the
    descriptor to close, or None where there is no ``flock`` (not POSIX)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunInProgressError(
            f"--out {out} is in use: another process is training into it (wait for it to end, "
            "or name another --out)"
        ) from None
    except OSError:  # a file system without locks (some network mounts): train unguarded
        os.close(fd)
        return None
    return fd


def _fit(cfg, out_dir, resume, split, on_epoch, test, new_dir) -> dict:
    def remove_if_empty():  # a run that failed before it wrote anything leaves no empty folder
        if new_dir and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()

    with using_fp32_matmul_precision(cfg.matmul_precision):
        try:
            run = _Run(cfg, out_dir, resume, split)
        except BaseException as exc:  # (a data error, say)
            remove_if_empty()
            if isinstance(exc, Exception):
                _agree_across_ranks(None, exc)  # the other ranks stop too, instead of waiting
            raise
        try:
            if run.world > 1:
                _agree_across_ranks(run.signature(), None)
            return run.train(on_epoch, test)
        except BaseException:  # (out of memory at the first step, say)
            remove_if_empty()
            raise
        finally:
            run.close()


def _agree_across_ranks(signature: dict | None, failed: Exception | None) -> None:
    """Under an initialised process group, check that every rank set up the same run: each
    replica applies the combined batch's update to its own copy of the parameters, so ranks with
    other options, data, package versions or update code would drift apart without an error.
    One ``all_gather_object`` at set-up, which every rank reaches: with its run's ``signature``
    (:meth:`_Run.signature`), or with the exception its set-up raised (``failed``), which then
    stops every rank (the one that failed raises its own). Raises ValueError (the ranks
    disagree) or RuntimeError (another rank failed); nothing in one process."""
    world = _rank_world()[1]
    if world == 1:
        return
    gathered = [None] * world
    mine = ("failed", checkpoints.one_line(failed)) if failed is not None else ("ok", signature)
    try:
        torch.distributed.all_gather_object(gathered, mine)
    except Exception:
        if failed is not None:
            return  # the set-up's own error says more
        raise
    if failed is not None:
        return
    for r, (state, what) in enumerate(gathered):
        if state == "failed":
            raise OtherRankError(f"rank {r} stopped during set-up: {what}")
    sigs = [s for _, s in gathered]
    diffs = []  # the same message on every rank: each value with the ranks that have it
    for key in dict.fromkeys(k for s in sigs for k in s):
        values = [s.get(key) for s in sigs]
        if any(v != values[0] for v in values):
            groups = {}
            for r, v in enumerate(values):
                groups.setdefault(repr(v), []).append(str(r))
            diffs.append(
                f"{key}: "
                + ", ".join(
                    f"rank{'s' if len(rs) > 1 else ''} {', '.join(rs)} {v}"
                    for v, rs in groups.items()
                )
            )
    if diffs:
        raise ValueError(
            "the ranks set up different runs, whose replicas would drift apart: "
            + "; ".join(diffs)
            + ". Every rank needs the same options (but --device and --no-progress), package "
            "versions, backend and data"
        )


def _replica_checksum(model) -> list[int]:
    """Exact integer sums of the bits of each parameter: equal on replicas that are the same bit
    for bit (a difference in one element's last bit changes its sum), cheap (one reduction per
    table, one host sync), and independent of the order in which a device sums integers."""
    sums = []
    for p in model.parameters():
        bits = p.detach().reshape(-1).view(torch.int16 if p.element_size() == 2 else torch.int32)
        sums.append(bits.sum(dtype=torch.int64))
    return torch.stack(sums).tolist()


class _Run:
    """One call of :func:`fit`: its data, model and progress, and the pieces of the loop.

    ``__init__`` is the set-up (options, checkpoint, data, model, resumed state); :meth:`train`
    runs the epochs (:meth:`_train_epoch` the steps, :meth:`_evaluate`, :meth:`_checkpoint`,
    :meth:`_write_metrics`) and then the selection (:meth:`_finish`).
    """

    def __init__(self, cfg: TrainConfig, out_dir, resume: bool, split):
        self.cfg = cfg
        out = self.out = Path(out_dir) if out_dir is not None else None
        if resume and (out is None or not (out / CHECKPOINT).exists()):
            raise FileNotFoundError(f"--resume: no checkpoint at {out and out / CHECKPOINT}")
        self.rank, self.world = rank, world = _rank_world()  # (fit made out: _hold_folder)
        if world > 1 and not cfg.fused_optimizer:
            raise ValueError(
                "fused_optimizer=False trains each process on its own batches (torch's optimizers "
                "are not data-parallel here): use the fused optimizer with more than one process"
            )
        ckpt = None
        if resume:  # a foreign file or other options are refused before the data is loaded
            ckpt = checkpoints.read(out / CHECKPOINT, resume=True)
            _check_compatible(ckpt, cfg, world)
        self.select = cfg.select_on == "valid"
        if split is None:
            t0 = time.perf_counter()
            say = cfg.progress and rank == 0  # (a large set takes a while: say what happens)
            if say:
                print(f"loading {cfg.data} and splitting it ...", file=sys.stderr, flush=True)
            split = lkdata.load(
                cfg.data,
                min_rating=cfg.min_rating,
                num_negatives=cfg.eval_negatives,
                seed=cfg.seed,
                validation=self.select,
            )
            if say:
                print(
                    f"loaded {split.name}: {split.num_users:,} users, {split.num_items:,} items, "
                    f"{len(split.train):,} training interactions "
                    f"({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                )
        elif self.select and not split.has_validation:
            split = lkdata.carve_validation(split, seed=cfg.seed)
        self.split = split
        self.eval_split = split.validation() if self.select else split  # what epochs evaluate
        if cfg.eval != "none" and rank == 0 and len(self.eval_split.test_users) == 0:
            warn_no_users(cfg.data, "validation" if self.select else "test", stacklevel=4)
        device = self.device = torch.device(cfg.device)
        # (a hash of the whole split, test items included: taken only where a checkpoint needs
        # it, so that a run writing nothing, like a tuning trial, never reads the test arrays)
        self.fingerprint = split.fingerprint() if out is not None else None
        self.model, self.stepper = build(cfg, split.num_users, split.num_items)

        # int32 or int64 as the split holds them (int32: half the memory, and on the CPU no copy
        # at all), moved to the device once; each batch is widened to int64 indices.
        train_u = _index_tensor(split.train.users, device)
        train_i = _index_tensor(split.train.items, device)
        self.n = train_u.shape[0]
        if self.n == 0:
            raise ValueError(f"data set {cfg.data!r} has no training interactions")
        exclude_csr = popularity = None
        if cfg.reject_positives:
            indptr, indices = split.train_csr()
            exclude_csr = (
                torch.as_tensor(indptr, device=device),
                torch.as_tensor(indices, device=device),
            )
        if cfg.popularity_negatives > 0:
            counts = np.bincount(split.train.items, minlength=split.num_items)
            popularity = lkdata.popularity_cdf(counts, cfg.popularity_negatives).to(device)
        self.n_local = self.n // world  # every rank runs the same number of equal-sized steps
        self.steps_per_epoch = math.ceil(self.n_local / cfg.batch_size)
        gen = torch.Generator(device=device)  # negatives: one stream per rank
        gen.manual_seed(cfg.seed + 1_000_003 * rank)

        self.history: list[dict] = []
        self.best = None  # select_on="valid": {"epoch", "valid_hr", "valid_ndcg", "model"}
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.loss_sum, self.elapsed = 0.0, 0.0  # of the epoch so far
        self.skipped = [0, 0]  # steps and rows of the epoch skipped (on_nonfinite="skip")
        if ckpt is not None:
            self._restore(ckpt, gen)
        self.gen_state = gen.get_state()  # after the last batch stepped on
        self.losses = _LossWindow(device)
        self.batches = BatchPipeline(
            train_u,
            train_i,
            cfg.batch_size,
            split.num_items,
            cfg.negatives,
            gen,
            exclude_csr,
            popularity,
        )
        self.writer = checkpoints.BackgroundWriter() if out is not None and rank == 0 else None
        if self.writer is not None:  # temporary files of writes that a crash interrupted
            for name in (CHECKPOINT, BEST, METRICS, CURVE):
                checkpoints.remove_stale_temporaries(out / name, min_age=0)
                if ckpt is None:  # a fresh run: an earlier run's files would not describe it
                    (out / name).unlink(missing_ok=True)

    def signature(self) -> dict:
        """What every rank of a data-parallel run must have the same (:func:`_agree_across_ranks`):
        the options but the device and the progress bars (each rank's own), the package versions,
        the backend that steps (``"auto"`` resolved per rank) and whether the Triton row update
        runs (on CUDA it does where Triton imports, else torch ops do), and the data's sizes and
        fingerprint."""
        options = {k: v for k, v in asdict(self.cfg).items() if k not in ("device", "progress")}
        sig = {f"option {k}": v for k, v in options.items()}
        sig["lrml_kernels version"] = _version()
        sig["torch version"] = torch.__version__
        sig["backend"] = backends.resolve(self.cfg.backend, self.device)
        if self.device.type == "cuda":
            sig["Triton row update"] = self.stepper._gpu_row_update(self.model.user_emb) is not None
        split = self.split
        sig["data"] = (split.num_users, split.num_items, self.n, self.fingerprint)
        return sig

    def _restore(self, ckpt: dict, gen: torch.Generator) -> None:
        _check_same_data(ckpt, self.cfg, self.fingerprint)
        state = ckpt["gen_states"][self.rank] if ckpt.get("gen_states") else None
        if isinstance(state, torch.Tensor) and state.numel() != gen.get_state().numel():
            # A CPU generator's state is 5,056 bytes, a CUDA one's 16; the epoch order is drawn
            # differently too (batches.py): the run could not go on as it would have.
            raise ValueError(
                "refusing to resume: the checkpoint was written on another kind of device than "
                f"{gen.device.type!r} (its random generator's state does not fit); resume on the "
                "kind of device it was trained on (the device may change within a kind, e.g. "
                "cuda:0 -> cuda:1)"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.stepper.load_state_dict(ckpt["trainer"])
            gen.set_state(ckpt["gen_states"][self.rank])
        except (RuntimeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise checkpoints.CheckpointError(
                f"{self.out / CHECKPOINT} does not fit the model it was written for (damaged?): "
                + checkpoints.one_line(exc)
            ) from None
        self.history = ckpt["history"]
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.loss_sum = float(ckpt["loss_sum"])
        self.skipped = list(ckpt.get("skipped", [0, 0]))  # (absent before 2026-12-07: none)
        self.elapsed = ckpt["epoch_seconds"]
        self.best = ckpt.get("best")

    def close(self) -> None:
        """Wait for the batch and the checkpoint write under way (after an error too)."""
        self.batches.close()
        if self.writer is not None:
            self.writer.wait(raise_error=False)

    # ------------------------------------------------------------------------------------------

    def train(self, on_epoch, test: bool) -> dict:
        with self._deferred_interrupt():
            return self._train(on_epoch, test)

    @contextlib.contextmanager
    def _deferred_interrupt(self):
        """A run that writes checkpoints (one process, the main thread) takes the first Ctrl-C,
        SIGTERM or SIGHUP (:data:`STOP_SIGNALS`) after the step under way, writes a checkpoint
        there and raises :class:`TrainingInterrupted`; a second one acts at once, as it would
        have without this. ``self.interrupted``: the signal taken, or 0."""
        self.interrupted = 0
        if (
            self.writer is None
            or self.world > 1
            or threading.current_thread() is not threading.main_thread()
        ):
            yield
            return

        def handler(signum, frame):
            self.interrupted = self.interrupted or signum
            signal.signal(signum, previous[signum])

        with handling_signals(STOP_SIGNALS, handler) as previous:
            yield

    def _stop_interrupted(self, t0: float) -> None:
        """Checkpoint the step reached and raise :class:`TrainingInterrupted`."""
        self.elapsed = time.perf_counter() - t0
        self._read_loss()
        self._checkpoint()
        self._wait_for_writes()
        signum = self.interrupted
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        raise TrainingInterrupted(
            f"interrupted{by} after step {self.global_step} (epoch {self.epoch + 1}, batch "
            f"{self.step_in_epoch}); {self.out / CHECKPOINT} holds it: continue with --resume",
            signum,
        )

    def _train(self, on_epoch, test: bool) -> dict:
        cfg = self.cfg
        stop = cfg.patience is not None and _stale(self.history, self.best) >= cfg.patience
        while self.epoch < cfg.epochs and not stop:
            t0 = self._train_epoch()
            if self.interrupted:
                self._stop_interrupted(t0)
            partial = self.step_in_epoch < self.steps_per_epoch  # stopped by max_steps
            if partial and self.step_in_epoch == 0:
                break
            stop = partial
            record = self._epoch_record(time.perf_counter() - t0)
            if cfg.eval != "none" and (
                (self.epoch + 1) % cfg.eval_every == 0 or self.epoch + 1 == cfg.epochs or stop
            ):
                self._evaluate(record)
            if partial:  # keep the mid-epoch state: --resume finishes this epoch
                record["partial"] = True
                self.elapsed = record["seconds"]
                self._checkpoint()
                self._wait_for_writes()  # (metrics.json's "final": once checkpoint.pt holds it)
                self._write_metrics(self.history + [record])
                return self._result(self.history + [record], record)
            self.history.append(record)
            if "valid_ndcg" in record and (
                self.best is None or record["valid_ndcg"] > self.best["valid_ndcg"]
            ):
                self.best = {
                    "epoch": record["epoch"],
                    "valid_hr": record["valid_hr"],
                    "valid_ndcg": record["valid_ndcg"],
                    "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                }
            if cfg.patience is not None and _stale(self.history, self.best) >= cfg.patience:
                stop = True
                if self.epoch + 1 < cfg.epochs:  # (patience out at the last epoch stops nothing)
                    record["early_stop"] = True
            self.epoch += 1
            self.step_in_epoch, self.elapsed, self.loss_sum = 0, 0.0, 0.0
            self.skipped = [0, 0]
            # metrics.json lists the epoch once checkpoint.pt holds it (a crash in between
            # leaves both at the epoch before)
            self._checkpoint(then=self._metrics_writer(self.history, final=False))
            self._on_epoch(on_epoch, record)
        final = self._finish(test)
        # metrics.json reports the final metrics once the checkpoints they describe are on disk
        # (best.pt: a crash in between would leave a run that looks finished without it)
        self._wait_for_writes()
        self._write_metrics(self.history, final=False, extra={"final": final})
        return self._result(self.history, final)

    def _on_epoch(self, on_epoch, record: dict) -> None:
        """``on_epoch(record)`` (if given); an exception it raises on any rank ends training on
        every rank (the others raise too, instead of waiting in the next step's collectives)."""
        failed = None
        try:
            if on_epoch is not None:
                on_epoch(record)
        except Exception as exc:
            failed = exc
        if self.world > 1:
            flag = torch.tensor([failed is not None], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if failed is None and bool(flag.item()):
                raise OtherRankError("on_epoch raised on another rank: training stopped there")
        if failed is not None:
            raise failed

    def _train_epoch(self) -> float:
        """The steps of the current epoch from ``step_in_epoch`` to its end or to ``max_steps``;
        returns the epoch's start on the ``time.perf_counter()`` clock."""
        from tqdm.auto import tqdm

        cfg, world = self.cfg, self.world
        stop_at = self.steps_per_epoch
        if cfg.max_steps is not None:
            stop_at = min(stop_at, self.step_in_epoch + max(0, cfg.max_steps - self.global_step))
        # The epoch's order depends only on (seed, epoch): the same on every rank and on resume.
        order = EpochOrder(self.n, cfg.seed, self.epoch, self.device, self.rank, world)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or self.rank != 0,
            unit="batch",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        base_lr = cfg.lr if cfg.lr is not None else TRAIN_LR[cfg.optimizer]
        total_steps = cfg.epochs * self.steps_per_epoch  # the schedule spans --epochs
        rows_per_step = cfg.batch_size * world
        t0 = time.perf_counter() - self.elapsed
        for batch in self.batches.epoch(order, self.step_in_epoch, stop_at):
            if cfg.lr_schedule == "cosine":
                t = min(1.0, self.global_step / max(1, total_steps))
                self.stepper.set_lr(base_lr * (0.05 + 0.475 * (1 + math.cos(math.pi * t))))
            self.losses.add(self.stepper.step(batch.users, batch.items))
            self.gen_state = batch.gen_state
            self.step_in_epoch += 1
            self.global_step += 1
            due = cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
            # The loss is read back (a host sync on a GPU) every READ_LOSS_EVERY steps, at the
            # end and before every checkpoint, which is therefore never written after a bad step.
            if due or self.step_in_epoch % READ_LOSS_EVERY == 0 or self.step_in_epoch == stop_at:
                self._read_loss()
                rate = (
                    self.step_in_epoch * rows_per_step * (1 + cfg.negatives)
                    / (time.perf_counter() - t0)
                )  # fmt: skip
                bar.set_postfix(
                    loss=f"{self.loss_sum / (self.step_in_epoch * rows_per_step):.4f}",
                    pairs_s=f"{rate:,.0f}",
                )
                bar.update(self.step_in_epoch - bar.n)
            if due:
                self.elapsed = time.perf_counter() - t0
                self._checkpoint()
            if self.interrupted:
                break
        bar.close()
        return t0

    def _read_loss(self) -> None:
        """Add the steps' losses since the last read to ``loss_sum``; stop at a non-finite one
        (``on_nonfinite="skip"``: those steps were not applied; ``skipped`` counts them and
        their rows, which the epoch's mean loss leaves out)."""
        skip = self.cfg.on_nonfinite == "skip"
        first = self.step_in_epoch - self.losses.pending  # the window's first step in the epoch
        self.loss_sum, bad, skipped = self.losses.read(self.loss_sum, skip_nonfinite=skip)
        for i in skipped:
            self.skipped[0] += 1
            self.skipped[1] += self._rows_of(first + i)
        if bad is not None:
            step = self.global_step - bad
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {self.epoch + 1}, batch "
                f"{step - (self.global_step - self.step_in_epoch)}); {self._kept()}"
            )

    def _rows_of(self, step: int) -> int:
        """The rows (all ranks) of the epoch's step ``step`` (0-based): the last may be short."""
        bs = self.cfg.batch_size
        return max(0, min(bs, self.n_local - step * bs)) * self.world

    def _epoch_record(self, seconds: float) -> dict:
        rows = min(self.step_in_epoch * self.cfg.batch_size, self.n_local) * self.world
        steps, skipped_rows = self.skipped
        record = {
            "epoch": self.epoch + 1,
            "steps": self.step_in_epoch,
            "loss": self.loss_sum / max(rows - skipped_rows, 1),  # of the steps applied
            "seconds": seconds,
            "pairs_per_s": rows * (1 + self.cfg.negatives) / max(seconds, 1e-9),
        }
        if steps:
            record["skipped_steps"] = steps
            if steps == self.step_in_epoch:
                raise NonFiniteLossError(
                    f"every step of epoch {self.epoch + 1} ({steps}) had a non-finite loss and "
                    f"was skipped: nothing trains; {self._kept()}"
                )
            if self.rank == 0:
                warnings.warn(
                    f"epoch {self.epoch + 1}: {steps} of {self.step_in_epoch} steps skipped "
                    "(non-finite loss); its loss is the mean over the others",
                    LRMLWarning,
                    stacklevel=2,
                )
        if not math.isfinite(record["loss"]):
            raise NonFiniteLossError(f"non-finite loss in epoch {self.epoch + 1}")
        return record

    def _evaluate(self, record: dict) -> None:
        """This epoch's metrics on the evaluation split, added to ``record``."""
        cfg = self.cfg
        t1 = time.perf_counter()
        m = evaluate(
            self.model, self.eval_split, cfg.eval, cfg.eval_k, shard=(self.rank, self.world),
            progress=cfg.progress and self.rank == 0,
        )  # fmt: skip
        pre = "valid_" if self.select else ""
        record.update(
            {pre + "hr": m["hr"], pre + "ndcg": m["ndcg"]}, eval_seconds=time.perf_counter() - t1
        )
        if cfg.progress and self.rank == 0:
            print(
                f"epoch {self.epoch + 1}: loss {record['loss']:.4f}  {pre[:-1]} HR@{cfg.eval_k} "
                f"{m['hr']:.4f}  nDCG@{cfg.eval_k} {m['ndcg']:.4f}  ({cfg.eval})",
                file=sys.stderr,
            )

    def _checkpoint(self, then: Callable[[], None] | None = None) -> None:
        """Start writing ``checkpoint.pt`` in the background (rank 0; every rank takes part in
        gathering the generators' states, and every rank stops where rank 0's last write failed
        or the parameters, the same on every rank, are not finite); ``then()`` runs once it is
        on disk."""
        failed = None
        if self.writer is not None:
            try:
                self.writer.wait()  # the write before (save() would wait for it too)
            except Exception as exc:
                failed = exc
        gen_states = [self.gen_state]
        if self.world > 1:
            gathered = [None] * self.world
            why = None if failed is None else checkpoints.one_line(failed)
            checksum = _replica_checksum(self.model)
            torch.distributed.all_gather_object(gathered, (self.gen_state, why, checksum))
            gen_states = [state for state, _, _ in gathered]
            if failed is None and gathered[0][1] is not None:
                raise OSError(f"rank 0 could not write its checkpoint: {gathered[0][1]}")
            if failed is None and any(sums != checksum for _, _, sums in gathered):
                ranks = [r for r, (_, _, sums) in enumerate(gathered) if sums != gathered[0][2]]
                raise OtherRankError(
                    f"the replicas diverged by step {self.global_step}: the parameters of rank "
                    f"{', '.join(map(str, ranks))} differ from rank 0's (the ranks computed the "
                    f"same update differently); {self._kept()}"
                )
        if failed is not None:
            raise failed
        if self.out is None:
            return
        # A finite loss can hide a non-finite gradient for one step: never save such a model.
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"non-finite parameters after step {self.global_step}; {self._kept()}"
            )
        if self.writer is None:
            return
        state = {
            **self._header(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "trainer": self.stepper.state_dict(),
            "gen_states": gen_states,
            "world_size": self.world,
            "loss_sum": torch.tensor(self.loss_sum, dtype=torch.float64),
            "skipped": list(self.skipped),
            "epoch_seconds": self.elapsed,
            "history": self.history,
            "best": self.best,
        }
        self.writer.save(state, self.out / CHECKPOINT, then)

    def _kept(self) -> str:
        """What a stopped run leaves behind, for its error message."""
        if self.out is not None and (self.out / CHECKPOINT).exists():
            return "the last good checkpoint is left as it was"
        return "no checkpoint was written"

    def _header(self) -> dict:
        split = self.split
        return {
            "version": _version(),
            "config": asdict(self.cfg),
            "data_fingerprint": self.fingerprint,
            "num_users": split.num_users,
            "num_items": split.num_items,
        }

    def _write_metrics(self, records: list[dict], final: bool = True, extra=None) -> None:
        write = self._metrics_writer(records, final, extra)
        if write is not None:
            write()

    def _metrics_writer(self, records: list[dict], final: bool = True, extra=None):
        """A function that writes ``metrics.json`` and the learning curve as they are now
        (``records`` are serialised at once), or None where nothing is written."""
        if self.writer is None:
            return None
        split = self.split
        doc = {
            "config": asdict(self.cfg),
            "world_size": self.world,  # processes: each steps on batch_size rows
            "data": split.name,
            "num_users": split.num_users,
            "num_items": split.num_items,
            "train_interactions": self.n,
            "epochs": records,
        }
        if final:
            doc["final"] = records[-1] if records else {}
        doc.update(extra or {})
        text = json.dumps(doc, indent=2).encode()
        records = copy.deepcopy(records)  # (the caller's records change after it returns)

        def write() -> None:
            checkpoints.atomic_write(self.out / METRICS, lambda f: f.write(text))
            if records:
                _plot_curve(records, self.out / CURVE)

        return write

    def _wait_for_writes(self) -> None:
        if self.writer is not None:
            self.writer.wait()

    def _finish(self, test: bool) -> dict:
        """The final metrics: the last epoch's, or (``select_on="valid"``) the selected epoch's,
        whose model is loaded, evaluated on the test split and written to ``best.pt``."""
        best = self.best
        if not (self.select and best is not None):
            return self.history[-1] if self.history else {}
        self.model.load_state_dict(best["model"])
        final = {
            "selected_epoch": best["epoch"],
            "valid_hr": best["valid_hr"],
            "valid_ndcg": best["valid_ndcg"],
            "epochs_run": len(self.history),
            "stopped_early": bool(self.history and self.history[-1].get("early_stop")),
        }
        if test:  # the one read of the test split: after selection, for the selected epoch
            t = evaluate_test(self.model, self.split, self.cfg)
            final.update(hr=t["hr"], ndcg=t["ndcg"], test=t)
        if self.writer is not None:
            doc = {**self._header(), "epoch": best["epoch"], "model": best["model"]}
            self.writer.save(doc, self.out / BEST)
        return final

    def _result(self, epochs: list[dict], final: dict) -> dict:
        return {"config": asdict(self.cfg), "epochs": epochs, "final": final, "model": self.model}


class _LossWindow:
    """The steps' losses, kept on the device until they are read back (one host sync).

    :meth:`add` copies a step's loss into the window (one device op, no sync); :meth:`read` adds
    the window to a running sum in step order, in float64 as the steps would one by one (the same
    sum however the steps were grouped into reads: a resumed run adds up as an uninterrupted one).
    """

    def __init__(self, device: torch.device):
        self._window = torch.zeros(READ_LOSS_EVERY, dtype=torch.float64, device=device)
        self._count = 0

    def add(self, loss: torch.Tensor) -> None:
        self._window[self._count] = loss
        self._count += 1

    @property
    def pending(self) -> int:
        """The steps added since the last read."""
        return self._count

    def read(self, total: float, *, skip_nonfinite: bool) -> tuple[float, int | None, list[int]]:
        """``(total + the window's losses, None, skipped)``, ``skipped`` the window positions of
        the non-finite losses (steps that ``skip_nonfinite`` skipped: they add nothing), or
        where a loss is non-finite and not skipped ``(total, k, [])``: the k-th step before the
        last one read is the first bad one."""
        values, self._count = self._window[: self._count].tolist(), 0
        skipped = []
        for i, v in enumerate(values):
            if not math.isfinite(v):
                if not skip_nonfinite:
                    return total, len(values) - 1 - i, []
                skipped.append(i)
                continue
            total += v
        return total, None, skipped


def _index_tensor(a, device: torch.device) -> torch.Tensor:
    """An int32 or int64 index array as a tensor of the same dtype (other dtypes: int64)."""
    t = torch.as_tensor(a, device=device)
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)


def _version() -> str:
    from lrml_kernels import __version__

    return __version__


def load_checkpoint(path, device="cpu") -> tuple[LRML, dict]:
    """The model stored in a training checkpoint, and the checkpoint's metadata.

    The file is loaded without running code (:func:`lrml_kernels.checkpoints.read`); one that is
    not a checkpoint of this package raises :class:`~lrml_kernels.checkpoints.CheckpointError`.
    """
    ckpt = checkpoints.read(path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        stored = _stored_options(ckpt)
        unknown = sorted(set(stored) - known)
        if unknown:  # a newer version's: they may change what the model computes
            warnings.warn(
                f"{path}: the checkpoint (lrml_kernels {ckpt.get('version', '?')}) has options "
                f"this version ({_version()}) does not know, left out: "
                + ", ".join(f"{k}={stored[k]!r}" for k in unknown)
                + "; its scores may differ from the run's",
                LRMLWarning,
                stacklevel=2,
            )
        cfg = TrainConfig(**{k: v for k, v in stored.items() if k in known})
        cfg.device = str(device)
        cfg.cuda_graph = False  # a training option: the model loads on any device, untrained
        cfg.validate()
        model = build_model(cfg, ckpt["num_users"], ckpt["num_items"])
        model.load_state_dict(ckpt["model"])
    except BackendUnavailable:
        raise
    except (RuntimeError, TypeError, ValueError) as exc:
        why = checkpoints.one_line(exc)
        raise checkpoints.CheckpointError(f"{path}: not a usable LRML checkpoint ({why})") from None
    return model, ckpt


def open_checkpoint(path, device="cpu", backend: str | None = None) -> tuple[LRML, dict]:
    """:func:`load_checkpoint` for a command that runs the model (``lrml evaluate``,
    ``recommend``, ``explain``): the device and ``backend`` are checked before the file is read,
    and the model runs on ``backend`` (None: the checkpoint's, which must run on ``device``)."""
    device = backends.check_device(device)
    if backend:
        backends.resolve(backend, device)
    model, ckpt = load_checkpoint(path, device)
    if backend:
        model.backend = backend
        return model, ckpt
    try:
        backends.resolve(model.backend, device)
    except BackendUnavailable as exc:
        raise BackendUnavailable(
            f"{exc} (the checkpoint's backend {model.backend!r}: choose one with --backend)"
        ) from None
    return model, ckpt


def load_checkpoint_data(ckpt: dict, data: str | None = None):
    """``(spec, split)``: the data set ``data`` (default: the one the checkpoint was trained on)
    split as training split it, with the checkpoint's ``min_rating`` and seed and, for a model
    selected on validation, the validation items carved out again (they were not trained on).
    Whether it is the same data is the caller's to check (``split.fingerprint()`` against the
    checkpoint's)."""
    spec = data or ckpt["config"].get("data")
    if not isinstance(spec, str):
        raise ValueError("the checkpoint names no data set: give one with --data")
    stored = _stored_options(ckpt)
    try:
        min_rating = lkdata.check_min_rating(spec, stored["min_rating"])
    except ValueError:  # another data set than the ratings the checkpoint was trained on
        raise ValueError(
            f"{spec!r} is not the data this checkpoint was trained on: it was trained on the "
            f"ratings >= {stored['min_rating']} of {ckpt['config'].get('data')!r}"
        ) from None
    return spec, lkdata.load(
        spec,
        min_rating=min_rating,
        num_negatives=stored["eval_negatives"],
        seed=stored.get("seed", 0),
        validation=stored["select_on"] == "valid",
    )
