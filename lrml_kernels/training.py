"""The training loop: data -> negatives -> fused step -> evaluation -> metrics and checkpoints.

``fit(TrainConfig(...), out_dir)`` is what ``lrml train`` runs. Everything random (shuffling and
negative sampling) comes from one ``torch.Generator`` on the training device whose state is saved
in every checkpoint, so ``resume=True`` continues exactly where the last checkpoint was taken and
reaches the same result as an uninterrupted run (bitwise on the CPU).

Files written to ``out_dir``: ``checkpoint.pt`` (after every epoch and every
``checkpoint_every`` steps; written to a temporary file, fsynced, then renamed, so a crash never
leaves a broken checkpoint; plain values only, loaded without running code: see
:mod:`lrml_kernels.checkpoints`), ``metrics.json`` (same atomic write) and ``learning_curve.png``.

Model selection (``select_on="valid"``): a validation split is carved out of the training data
(:func:`lrml_kernels.data.carve_validation`), every evaluation reads it (never the test items),
the best epoch by validation nDCG@k is kept (in the checkpoint too, so resume keeps it), training
stops after ``patience`` evaluations without improvement, and only then is the test split read,
once, for the selected epoch (``best.pt`` holds that model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lrml_kernels import backends, checkpoints
from lrml_kernels import data as lkdata
from lrml_kernels.errors import BackendUnavailable
from lrml_kernels.metrics import PROTOCOLS, evaluate
from lrml_kernels.model import LRML
from lrml_kernels.trainer import DEFAULT_LR, OPTIMIZERS, LRMLTrainer

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

# Options that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = ("epochs", "max_steps", "device", "progress", "checkpoint_every", "eval_every")


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN/Inf loss or gradient; the last good checkpoint is left intact."""


@dataclass
class TrainConfig:
    """Every option of ``lrml train`` (the CLI flags are these names with dashes)."""

    data: str = "synthetic"
    epochs: int = 15
    dim: int = 64
    memory_slots: int = 20
    negatives: int = 10
    margin: float = 1.0
    lr: float | None = None
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
    eval_every: int = 1
    seed: int = 0
    fused_optimizer: bool = True
    reject_positives: bool = True
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
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in (
            "epochs",
            "dim",
            "memory_slots",
            "negatives",
            "batch_size",
            "eval_k",
            "eval_every",
        ):
            positive(name)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.eval not in (*PROTOCOLS, "none"):
            raise ValueError(f"eval must be one of {(*PROTOCOLS, 'none')}, got {self.eval!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.fused_optimizer and self.optimizer == "rowwise_adagrad":
            raise ValueError("rowwise_adagrad exists only as a fused optimizer (--fused-optimizer)")
        if not self.fused_optimizer and self.on_nonfinite == "skip":
            raise ValueError("on_nonfinite='skip' needs the fused optimizer (--fused-optimizer)")
        backends.check_device(self.device)  # one that exists here (touches no device)
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}")
        if self.select_on == "valid" and self.eval == "none":
            raise ValueError("select_on='valid' needs an evaluation protocol (eval='none' given)")
        if self.patience is not None:
            if isinstance(self.patience, bool) or not isinstance(self.patience, int):
                raise ValueError(f"patience must be a positive integer, got {self.patience!r}")
            if self.patience < 1:
                raise ValueError(f"patience must be a positive integer, got {self.patience!r}")
            if self.select_on != "valid":
                raise ValueError("patience (early stopping) needs select_on='valid'")


class _UnfusedStep:
    """Autograd + torch optimizers + projection: the reference way to train (``--no-fused``)."""

    def __init__(self, model: LRML, cfg: TrainConfig):
        self.model = model
        lr = cfg.lr if cfg.lr is not None else TRAIN_LR[cfg.optimizer]
        emb, dense = [model.user_emb, model.item_emb], [model.keys, model.memory]
        if cfg.optimizer == "adam":
            self.opts = [torch.optim.SparseAdam(emb, lr=lr), torch.optim.Adam(dense, lr=lr)]
        elif cfg.optimizer == "adagrad":
            self.opts = [torch.optim.Adagrad(emb + dense, lr=lr)]
        else:
            self.opts = [torch.optim.SGD(emb + dense, lr=lr)]

    def set_lr(self, lr: float) -> None:
        for o in self.opts:
            for group in o.param_groups:
                group["lr"] = lr

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
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, sd):
        for o, s in zip(self.opts, sd, strict=True):
            o.load_state_dict(s)


def build(cfg: TrainConfig, num_users: int, num_items: int):
    """The model and its step function for ``cfg`` (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    model = LRML(
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
    )
    if cfg.fused_optimizer:
        lr = cfg.lr if cfg.lr is not None else TRAIN_LR[cfg.optimizer]
        skip = cfg.on_nonfinite == "skip"
        return model, LRMLTrainer(model, cfg.optimizer, lr, skip_nonfinite=skip)
    return model, _UnfusedStep(model, cfg)


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_compatible(ckpt: dict, cfg: TrainConfig, world: int) -> None:
    """Refuse to resume ``ckpt`` with other options or another number of processes."""
    if ckpt.get("world_size", 1) != world:
        raise ValueError(
            f"refusing to resume: the checkpoint was written by {ckpt.get('world_size', 1)} "
            f"processes and this run has {world}"
        )
    old, new = ckpt["config"], asdict(cfg)
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        what = "options differ from the checkpoint's"
        if {"data", "seed"} & set(diff):  # the seed draws the synthetic data and the split
            what = "the checkpoint was trained on different data"
        raise ValueError(
            f"refusing to resume: {what} ({changes}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )


def _check_same_data(ckpt: dict, cfg: TrainConfig, fingerprint: str) -> None:
    if ckpt["data_fingerprint"] != fingerprint:
        raise ValueError(
            "refusing to resume: the checkpoint was trained on different data "
            f"(checkpoint data {ckpt['config'].get('data')!r}, fingerprint "
            f"{ckpt['data_fingerprint'][:12]}; now {cfg.data!r}, {fingerprint[:12]})"
        )


def _plot_curve(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(epochs, [h["loss"] for h in history], "o-", color="tab:red", label="loss")
    ax1.set_xlabel("epoch")
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


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
    """
    from tqdm.auto import tqdm

    cfg.validate()
    # A backend that cannot run on the device is refused now, not after the data is loaded.
    backends.resolve(cfg.backend, torch.device(cfg.device))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume and (out is None or not (out / CHECKPOINT).exists()):
        raise FileNotFoundError(f"--resume: no checkpoint at {out and out / CHECKPOINT}")
    rank, world = _rank_world()
    ckpt = None
    if resume:  # a foreign file or other options are refused before the data is loaded
        ckpt = checkpoints.read(out / CHECKPOINT, resume=True)
        _check_compatible(ckpt, cfg, world)
    select = cfg.select_on == "valid"
    if split is None:
        split = lkdata.load(cfg.data, seed=cfg.seed, validation=select)
    elif select and not split.has_validation:
        split = lkdata.carve_validation(split, seed=cfg.seed)
    eval_split = split.validation() if select else split  # what every epoch's evaluation reads
    device = torch.device(cfg.device)
    # (a hash of the whole split, test items included: taken only where a checkpoint needs it,
    # so that a run writing nothing, like a tuning trial, never reads the test arrays)
    fingerprint = split.fingerprint() if out is not None else None
    model, stepper = build(cfg, split.num_users, split.num_items)

    # int32 or int64 as the split holds them (int32: half the memory, and on the CPU no copy at
    # all); each batch is widened to the int64 indices the model takes.
    train_u = _index_tensor(split.train.users, device)
    train_i = _index_tensor(split.train.items, device)
    n = train_u.shape[0]
    if n == 0:
        raise ValueError(f"data set {cfg.data!r} has no training interactions")
    exclude_csr = None
    if cfg.reject_positives:
        indptr, indices = split.train_csr()
        exclude_csr = (
            torch.as_tensor(indptr, device=device),
            torch.as_tensor(indices, device=device),
        )
    n_local = n // world  # every rank runs the same number of equal-sized steps
    steps_per_epoch = math.ceil(n_local / cfg.batch_size)
    gen = torch.Generator(device=device)  # negatives: one stream per rank
    gen.manual_seed(cfg.seed + 1_000_003 * rank)

    history: list[dict] = []
    best = None  # select_on="valid": {"epoch", "valid_hr", "valid_ndcg", "model"}
    epoch, step_in_epoch, global_step = 0, 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    elapsed = 0.0
    if ckpt is not None:
        _check_same_data(ckpt, cfg, fingerprint)
        try:
            model.load_state_dict(ckpt["model"])
            stepper.load_state_dict(ckpt["trainer"])
            gen.set_state(ckpt["gen_states"][rank])
        except (RuntimeError, KeyError, IndexError, TypeError) as exc:
            raise checkpoints.CheckpointError(
                f"{out / CHECKPOINT} does not fit the model it was written for (damaged?): "
                + checkpoints.one_line(exc)
            ) from None
        history = ckpt["history"]
        epoch, step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        global_step = ckpt["global_step"]
        loss_sum = ckpt["loss_sum"].to(device)
        elapsed = ckpt["epoch_seconds"]
        best = ckpt.get("best")
    writer = out if rank == 0 else None
    if writer is not None:  # temporary files of writes that a crash interrupted
        for stale in writer.glob(f".{CHECKPOINT}.tmp*"):
            stale.unlink()

    def checkpoint():
        gen_states = [gen.get_state()]
        if world > 1:
            gen_states = [None] * world
            torch.distributed.all_gather_object(gen_states, gen.get_state())
        if writer is None:
            return
        # A finite loss can hide a non-finite gradient for one step: never save such a model.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise NonFiniteLossError(
                f"non-finite parameters after step {global_step}; the last good checkpoint is "
                "left as it was"
            )
        state = {
            "version": _version(),
            "config": asdict(cfg),
            "data_fingerprint": fingerprint,
            "num_users": split.num_users,
            "num_items": split.num_items,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "model": model.state_dict(),
            "trainer": stepper.state_dict(),
            "gen_states": gen_states,
            "world_size": world,
            "loss_sum": loss_sum,
            "epoch_seconds": elapsed,
            "history": history,
            "best": best,
        }
        checkpoints.save(state, out / CHECKPOINT)

    def write_metrics(records: list[dict], final: bool = True, extra=None):
        if writer is None:
            return
        doc = {
            "config": asdict(cfg),
            "data": split.name,
            "num_users": split.num_users,
            "num_items": split.num_items,
            "train_interactions": n,
            "epochs": records,
        }
        if final:
            doc["final"] = records[-1] if records else {}
        doc.update(extra or {})
        text = json.dumps(doc, indent=2).encode()
        checkpoints.atomic_write(out / METRICS, lambda f: f.write(text))
        if records:
            _plot_curve(records, out / CURVE)

    pairs_per_row = 1 + cfg.negatives
    base_lr = cfg.lr if cfg.lr is not None else TRAIN_LR[cfg.optimizer]
    total_steps = cfg.epochs * steps_per_epoch  # the schedule spans --epochs, not --max-steps
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    stop = cfg.patience is not None and _stale(history, best) >= cfg.patience  # (on resume)
    while epoch < cfg.epochs and not stop:
        # The epoch's order depends only on (seed, epoch): the same on every rank and on resume.
        order_gen = torch.Generator(device=device)
        order_gen.manual_seed(cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, device=device, generator=order_gen)
        perm = perm[rank : n_local * world : world]
        bar = tqdm(
            total=steps_per_epoch,
            initial=step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or rank != 0,
            unit="batch",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        t0 = time.perf_counter() - elapsed
        while step_in_epoch < steps_per_epoch:
            if cfg.max_steps is not None and global_step >= cfg.max_steps:
                stop = True
                break
            idx = perm[step_in_epoch * cfg.batch_size : (step_in_epoch + 1) * cfg.batch_size]
            users, pos = train_u[idx].long(), train_i[idx].long()
            neg = lkdata.sample_negatives(
                users, split.num_items, cfg.negatives, generator=gen, exclude_csr=exclude_csr
            )
            items = torch.cat([pos[:, None], neg], dim=1)
            if cfg.lr_schedule == "cosine":
                t = min(1.0, global_step / max(1, total_steps))
                stepper.set_lr(base_lr * (0.05 + 0.475 * (1 + math.cos(math.pi * t))))
            loss = stepper.step(users, items)
            if cfg.on_nonfinite == "skip":  # the step was not applied: leave it out of the sum
                loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
            else:  # remember the first bad step on the device (no host sync per step)
                first_bad = torch.where(
                    (first_bad < 0) & ~torch.isfinite(loss), global_step + 1, first_bad
                )
            loss_sum += loss.double()
            step_in_epoch += 1
            global_step += 1
            due = cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0
            report = due or step_in_epoch % 50 == 0 or step_in_epoch == steps_per_epoch
            # The loss is checked before any checkpoint is written: every step where reading it
            # costs nothing (CPU), every 50 steps on a GPU (a host sync).
            if report or loss_sum.device.type == "cpu":
                seen = loss_sum.item()
                if not math.isfinite(seen):
                    bad = int(first_bad)
                    raise NonFiniteLossError(
                        f"non-finite loss at step {bad} (epoch {epoch + 1}, batch "
                        f"{bad - (global_step - step_in_epoch)}); the last good checkpoint "
                        "is left as it was"
                    )
            if report:
                rate = (
                    step_in_epoch
                    * cfg.batch_size
                    * world
                    * pairs_per_row
                    / (time.perf_counter() - t0)
                )
                bar.set_postfix(
                    loss=f"{seen / (step_in_epoch * cfg.batch_size * world):.4f}",
                    pairs_s=f"{rate:,.0f}",
                )
                bar.update(step_in_epoch - bar.n)
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                elapsed = time.perf_counter() - t0
                checkpoint()
        bar.close()
        partial = step_in_epoch < steps_per_epoch  # stopped by max_steps inside the epoch
        if partial and step_in_epoch == 0:
            break
        seconds = time.perf_counter() - t0
        rows = min(step_in_epoch * cfg.batch_size, n_local) * world
        record = {
            "epoch": epoch + 1,
            "steps": step_in_epoch,
            "loss": loss_sum.item() / max(rows, 1),
            "seconds": seconds,
            "pairs_per_s": rows * pairs_per_row / max(seconds, 1e-9),
        }
        if not math.isfinite(record["loss"]):
            raise NonFiniteLossError(f"non-finite loss in epoch {epoch + 1}")
        last = epoch + 1 == cfg.epochs or stop
        if cfg.eval != "none" and ((epoch + 1) % cfg.eval_every == 0 or last):
            t1 = time.perf_counter()
            m = evaluate(model, eval_split, cfg.eval, cfg.eval_k, shard=(rank, world))
            pre = "valid_" if select else ""
            record.update(
                {pre + "hr": m["hr"], pre + "ndcg": m["ndcg"]},
                eval_seconds=time.perf_counter() - t1,
            )
            if cfg.progress and rank == 0:
                print(
                    f"epoch {epoch + 1}: loss {record['loss']:.4f}  {pre[:-1]} HR@{cfg.eval_k} "
                    f"{m['hr']:.4f}  nDCG@{cfg.eval_k} {m['ndcg']:.4f}  ({cfg.eval})",
                    file=sys.stderr,
                )
        if partial:  # keep the mid-epoch state: --resume finishes this epoch
            record["partial"] = True
            elapsed = seconds
            checkpoint()
            write_metrics(history + [record])
            return {
                "config": asdict(cfg),
                "epochs": history + [record],
                "final": record,
                "model": model,
            }
        history.append(record)
        if "valid_ndcg" in record and (best is None or record["valid_ndcg"] > best["valid_ndcg"]):
            best = {
                "epoch": record["epoch"],
                "valid_hr": record["valid_hr"],
                "valid_ndcg": record["valid_ndcg"],
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        if cfg.patience is not None and _stale(history, best) >= cfg.patience:
            stop = True
            record["early_stop"] = True
        epoch += 1
        step_in_epoch, elapsed = 0, 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        checkpoint()
        write_metrics(history, final=False)
        if on_epoch is not None:
            on_epoch(record)
    final = history[-1] if history else {}
    if select and best is not None:
        model.load_state_dict(best["model"])
        final = {
            "selected_epoch": best["epoch"],
            "valid_hr": best["valid_hr"],
            "valid_ndcg": best["valid_ndcg"],
            "epochs_run": len(history),
            "stopped_early": bool(history and history[-1].get("early_stop")),
        }
        if test:  # the one read of the test split: after selection, for the selected epoch
            t = evaluate_test(model, split, cfg)
            final.update(hr=t["hr"], ndcg=t["ndcg"], test=t)
        if writer is not None:
            doc = {
                "version": _version(),
                "config": asdict(cfg),
                "data_fingerprint": fingerprint,
                "num_users": split.num_users,
                "num_items": split.num_items,
                "epoch": best["epoch"],
                "model": best["model"],
            }
            checkpoints.save(doc, out / BEST)
    write_metrics(history, final=False, extra={"final": final})
    return {
        "config": asdict(cfg),
        "epochs": history,
        "final": final,
        "model": model,
    }


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
        cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
        cfg.device = str(device)
        cfg.validate()
        model, _ = build(cfg, ckpt["num_users"], ckpt["num_items"])
        model.load_state_dict(ckpt["model"])
    except BackendUnavailable:
        raise
    except (RuntimeError, TypeError, ValueError) as exc:
        why = checkpoints.one_line(exc)
        raise checkpoints.CheckpointError(f"{path}: not a usable LRML checkpoint ({why})") from None
    return model, ckpt
