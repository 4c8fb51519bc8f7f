"""The training loop end to end: ``lrml_kernels.training.fit`` on a loaded split, beside the fused
step alone on the same sizes.

``train loop`` times what ``lrml train`` reports as pairs/s: the steps of ``fit`` with everything
around them (the epoch's permutation slices, the gathers, the negatives drawn without the user's
training items, the items concatenated, the step, the loss read back every 50 steps), the data
already loaded and split (the set-up before the first step is ``benchmarks/data_setup.py``'s).
Its tables and batch are the size's (B rows × 1 positive + C-1 negatives, d, N; Adam, relation
"pair", distance "squared_l2": ``lrml train``'s defaults), its data synthetic (:data:`INTERACTIONS`
interactions, at the Netflix size those of ``--data synthetic-netflix``).

In the same test, interleaved with the loop (round by round), the provider's fused step is timed
alone on batches of the same data made beforehand: the record's ``step_pairs_per_s`` and
``loop_vs_step`` (the loop's pairs/s over the step's) say what the loop costs beyond the step.
"""

from __future__ import annotations

import functools
import math

import benchlib as bl
import pytest
import torch

from lrml_kernels import data as lkdata
from lrml_kernels.batches import Batch, BatchPipeline, EpochOrder
from lrml_kernels.training import TrainConfig, build, fit

PROVIDERS = ("torch", "cpu", "triton", "cuda")
# Interactions of each size's synthetic data (netflix: lrml train --data synthetic-netflix).
INTERACTIONS = {
    "tiny": 20_000,
    "small": 1_000_209,
    "netflix": lkdata.SYNTHETIC["synthetic-netflix"][2],
}
LOOP_STEPS = 200  # steps per timed fit at --lrml-budget 1, scaled with it (smoke: SMOKE_STEPS)
MIN_LOOP_STEPS = 20
SMOKE_STEPS = 3
ROUNDS = 3  # rounds of (the step alone, then one fit); the record keeps the fastest of each


@functools.lru_cache(maxsize=1)
def _split(size: bl.Size):
    x = lkdata.synthetic(size.U, size.I, INTERACTIONS[size.name], seed=0, name=size.name)
    return lkdata.leave_one_out(x, num_negatives=None)


def _config(case: bl.Case, provider: str, steps: int) -> TrainConfig:
    s = case.size
    return TrainConfig(
        data=f"synthetic-{s.name}",
        epochs=steps,  # max_steps stops it (an epoch of the tiny data is shorter)
        dim=s.d,
        memory_slots=s.N,
        negatives=s.C - 1,
        batch_size=s.B,
        device=case.device,
        backend=provider,
        eval="none",
        progress=False,
        max_steps=steps,
    )


def _batches(case: bl.Case, cfg: TrainConfig, split, steps: int) -> list[Batch]:
    """``steps`` batches of the training data as the loop makes them (random rows, negatives
    without the user's training items), prepared before any clock starts."""
    dev = torch.device(case.device)
    users = torch.as_tensor(split.train.users, device=dev)
    indptr, indices = split.train_csr()
    csr = (torch.as_tensor(indptr, device=dev), torch.as_tensor(indices, device=dev))
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    pipeline = BatchPipeline(
        users,
        torch.as_tensor(split.train.items, device=dev),
        cfg.batch_size,
        split.num_items,
        cfg.negatives,
        gen,
        csr,
    )
    try:
        order = EpochOrder(users.shape[0], seed=0, epoch=0, device=dev)
        return list(pipeline.epoch(order, 0, min(steps, -(-len(order) // cfg.batch_size))))
    finally:
        pipeline.close()


def _step_seconds(case: bl.Case, cfg: TrainConfig, split, batches: list[Batch]) -> float:
    """Seconds of the fused steps alone on ``batches``, on a fresh model of ``cfg``."""
    model, stepper = build(cfg, split.num_users, split.num_items)
    stepper.step(batches[0].users, batches[0].items)  # warm-up: optimizer state, kernels
    t0 = bl.synchronized_clock(case.device)
    for b in batches:
        stepper.step(b.users, b.items)
    return bl.synchronized_clock(case.device) - t0


@pytest.mark.lrml(dtypes=("fp32",))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_loop(benchmark, case, provider):
    bl.require(provider, case.device)
    split = _split(case.size)
    bl.LOOP_DATA_READY.add(case.size.name)  # (the next cases of the size reuse it)
    s = case.size
    if bl.SETTINGS["disabled"]:
        epochs = benchmark(lambda: fit(_config(case, provider, SMOKE_STEPS), None, split=split))
        assert sum(e["steps"] for e in epochs["epochs"]) == SMOKE_STEPS
        assert all(math.isfinite(e["loss"]) for e in epochs["epochs"])
        return
    fit(_config(case, provider, 2), None, split=split)  # warm-up: JIT, kernels, allocator
    steps = max(MIN_LOOP_STEPS, min(LOOP_STEPS, round(LOOP_STEPS * bl.SETTINGS["budget_s"])))
    cfg = _config(case, provider, steps)
    batches = _batches(case, cfg, split, steps)
    loop_s, step_s = [], []

    def one_round():  # the step alone, then the loop: side by side in every round
        step_s.append(_step_seconds(case, cfg, split, batches))
        epochs = fit(cfg, None, split=split)["epochs"]
        assert sum(e["steps"] for e in epochs) == steps
        assert all(math.isfinite(e["loss"]) for e in epochs)
        loop_s.append(sum(e["seconds"] for e in epochs))  # fit's own clock: steps, not set-up

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    pairs = steps * s.B * s.C
    bl.record_time(
        benchmark, case, provider, min(loop_s), workload="train loop", variant="adam", pairs=pairs,
        extra={
            "steps": steps, "interactions": len(split.train.users),
            "step_pairs_per_s": pairs / min(step_s), "loop_vs_step": min(step_s) / min(loop_s),
            "timer": f"fit's epoch clocks, fastest of {ROUNDS} fits of {steps} steps",
        },
    )  # fmt: skip
