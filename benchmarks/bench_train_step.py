"""A full training step (forward, backward, optimizer, unit-ball projection of touched rows),
and on the GPU one epoch of synthetic Netflix (100,480,507 positives, 1 negative each).

Providers (Adam, lr 1e-3, relation "pair", distance "l2", every baseline projects its touched
rows after the step, as the fused trainer does). bf16 tables (``--lrml-dtypes`` with bf16, not in
the GPU check's headline): the trainers keep fp32 state and round stochastically, the torch
optimizers of the eager peers keep bf16 state and round to nearest:

  eager         dense embedding gradients + torch.optim.Adam (the plain-PyTorch way)
  eager-sparse  sparse embedding gradients + torch.optim.SparseAdam (keys/memory: Adam)
  compile       as eager-sparse, the row math through torch.compile
  torch/cpu/triton/cuda  lrml_kernels.LRMLTrainer(model, optimizer="adam") on a model of that
                backend (skipped, with the reason, until the trainer lands)
  triton-graph  the triton trainer with cuda_graph=True: the first call captures the step, the
                timed calls replay it (CUDA only; skipped elsewhere)
"""

from __future__ import annotations

import itertools
import math
import time

import benchlib as bl
import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import reference

PROVIDERS = ("eager", "eager-sparse", "compile", "torch", "cpu", "triton", "triton-graph", "cuda")
# Distinct batches the timed steps of a train-step benchmark cycle through (more than the rounds
# of a CPU run). One batch stepped over and over is soon learnt: its hinge terms go inactive, and
# the fused backends skip inactive pairs where the baselines compute them all. On one batch the
# cpu step went from 6.6 to 4.2 ms over its first 50 steps (Netflix size, 2026-12-05).
STEP_BATCHES = 64


def make_step(case: bl.Case, provider: str):
    """(model, step(users, items) -> loss) for ``provider``, on fresh tables."""
    bl.require(provider, case.device)
    s = case.size
    kw = {"device": case.device, "dtype": case.dtype, "validate": False}
    if provider in ("eager", "eager-sparse", "compile"):
        sparse = provider != "eager"
        model = lk.LRML(s.U, s.I, s.d, s.N, sparse=sparse, backend="torch", **kw)
        if sparse:
            opts = [
                torch.optim.SparseAdam([model.user_emb, model.item_emb], lr=bl.LR),
                torch.optim.Adam([model.keys, model.memory], lr=bl.LR),
            ]
        else:
            opts = [torch.optim.Adam(model.parameters(), lr=bl.LR)]
        loss_fn = model
        if provider == "compile":
            rows = bl.compiled(bl.rows_hinge)

            def loss_fn(users, items):
                p, q = reference.gather_rows(
                    model.user_emb, model.item_emb, users, items, sparse_grad=True
                )
                return rows(p, q, model.keys, model.memory, model.relation)

        def step(users, items):
            for opt in opts:
                opt.zero_grad()
            loss = loss_fn(users, items)
            loss.backward()
            for opt in opts:
                opt.step()
            model.project_(users, items)
            return loss

        return model, step
    trainer_cls = bl.trainer_class()
    graph = provider == "triton-graph"
    model = lk.LRML(s.U, s.I, s.d, s.N, backend="triton" if graph else provider, **kw)
    trainer = trainer_cls(model, optimizer="adam", lr=bl.LR, cuda_graph=graph)
    return model, trainer.step


def _step_bytes(case: bl.Case, users, items) -> int:
    """Gathered rows read once, then each touched row updated once by a fused Adam: the row
    read and written, its two fp32 moments read and written."""
    touched = torch.unique(users).numel() + torch.unique(items).numel()
    es = torch.empty((), dtype=case.dtype).element_size()
    B, C = items.shape
    return bl.gathered_row_bytes(case, B, C) + touched * case.size.d * (2 * es + 16)


@pytest.mark.lrml(dtypes=("fp32", "bf16"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, case, provider):
    model, step = make_step(case, provider)
    batches = itertools.cycle([bl.batch(case, seed=7 + k) for k in range(STEP_BATCHES)])
    users, items = next(batches)
    loss = step(users, items)
    assert math.isfinite(float(loss.detach())), f"{provider}: loss {float(loss.detach())}"
    B, C = items.shape
    bl.measure(
        benchmark, case, provider, lambda: step(*next(batches)), workload="train step",
        variant="adam", pairs=B * C, bytes_moved=_step_bytes(case, users, items),
        extra={"optimizer": "adam", "lr": bl.LR, "batches": STEP_BATCHES},
    )  # fmt: skip


@pytest.mark.lrml(devices=("cuda",), sizes=("netflix",), dtypes=("fp32", "bf16"))
@pytest.mark.parametrize("provider", ("eager", "eager-sparse", "torch", "triton", "cuda"))
def test_epoch(benchmark, case, provider):
    """One epoch: ceil(100,480,507 / 2^20) steps of 2^20 positives, 1 negative each, indices
    drawn on the GPU inside the loop (random indices suffice for timing; no data layer). An epoch
    that runs past half of ``--lrml-cap`` (the other half: the model and two warm-up steps;
    without a cap 15 s) stops after that step and its time is scaled to the whole epoch
    (recorded as ``extrapolated``)."""
    model, step = make_step(case, provider)
    s, dev = case.size, case.device
    g = torch.Generator(device=dev)
    g.manual_seed(3)
    cols = 1 + bl.EPOCH_NEGATIVES

    def draw(rows):
        return (
            torch.randint(0, s.U, (rows,), device=dev, generator=g),
            torch.randint(0, s.I, (rows, cols), device=dev, generator=g),
        )

    # Warm-up: kernels compiled, optimizer state allocated, at both batch shapes of the epoch:
    # the last step takes the remainder (865,787 rows at Netflix size), and Triton specialises
    # integer arguments on divisibility by 16, so that odd batch compiles kernel variants of its
    # own, which must not happen inside the timed epoch.
    last = bl.EPOCH_POSITIVES % bl.EPOCH_BATCH or bl.EPOCH_BATCH
    for rows in (bl.EPOCH_BATCH, last):
        step(*draw(rows))
    bl.synchronized_clock(dev)

    cap = bl.SETTINGS["cap_s"] / 2 if bl.SETTINGS["cap_s"] else bl.DEFAULT_EPOCH_CAP_S

    def epoch() -> int:
        # Synchronised every step (a step of 2^20 rows takes milliseconds to a second, the sync
        # microseconds), so that the cap stops the epoch in time.
        t0, done = time.perf_counter(), 0
        while done < bl.EPOCH_POSITIVES:
            rows = min(bl.EPOCH_BATCH, bl.EPOCH_POSITIVES - done)
            step(*draw(rows))
            done += rows
            if bl.synchronized_clock(dev) - t0 > cap:
                break
        return done

    done = benchmark.pedantic(epoch, rounds=1, iterations=1)
    if bl.SETTINGS["disabled"]:
        return
    bl.record_time(
        benchmark, case, provider, benchmark.stats.stats.median, workload="epoch",
        variant="adam, 1 neg", pairs=bl.EPOCH_POSITIVES * cols,
        scale=bl.EPOCH_POSITIVES / done,
        extra={"positives": bl.EPOCH_POSITIVES, "batch": bl.EPOCH_BATCH,
               "timer": "host clock around a synchronised epoch"},
    )  # fmt: skip
