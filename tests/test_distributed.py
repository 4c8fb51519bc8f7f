"""Data-parallel training with torch.distributed (2 Gloo processes on the CPU)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lrml_kernels as lk
from lrml_kernels.trainer import LRMLTrainer

STEPS, B, C = 5, 6, 3


def batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    # Few rows per table: both ranks touch the same rows, so the row updates must be combined.
    return [
        (torch.randint(0, 8, (B,), generator=g), torch.randint(0, 9, (B, C), generator=g))
        for _ in range(STEPS)
    ]


def make_model():
    torch.manual_seed(0)
    return lk.LRML(8, 9, dim=5, memory_slots=3, backend="torch").double()


def spawn_two(fn, tmp_path, arg):
    """``fn(rank, 2, init_file, out_dir, arg)`` in 2 spawned processes (a Gloo group each)."""
    mp.start_processes(
        fn, args=(2, str(tmp_path / "pg"), str(tmp_path), arg), nprocs=2, join=True,
        start_method="spawn",
    )  # fmt: skip


def worker(rank, world, init_file, out_dir, optimizer):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        trainer = LRMLTrainer(model, optimizer, lr=0.05)
        losses = [trainer.step(u, i).item() for u, i in batches(rank)]
        torch.save(
            {"params": [p.detach() for p in model.parameters()], "losses": losses},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_two_gloo_ranks_equal_single_process_on_the_combined_batch(tmp_path, optimizer):
    spawn_two(worker, tmp_path, optimizer)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b), "the replicas diverged"
    model = make_model()
    trainer = LRMLTrainer(model, optimizer, lr=0.05)
    for (u0, i0), (u1, i1), loss in zip(batches(0), batches(1), r0["losses"], strict=True):
        want = trainer.step(torch.cat([u0, u1]), torch.cat([i0, i1]))
        assert loss == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(r0["params"], model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def fit_worker(rank, world, init_file, out_dir, case):
    """``fit`` on 2 ranks in a way that must stop every rank; writes what each rank raised."""
    import datetime
    import json

    from lrml_kernels.training import TrainConfig, fit

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a rank left waiting fails the test, not hangs
    )
    # Both ranks through the connection set-up before either may leave: a rank refused at once
    # (the unfused case) closed its connections while the other was still making its own, which
    # failed there as "Gloo connectFullMesh failed ... Connection closed by peer".
    dist.barrier()
    opts = dict(data="synthetic-small", epochs=2, dim=4, memory_slots=2, batch_size=256)
    opts.update(backend="torch", eval="none", progress=False)
    on_epoch = split = None
    if case == "unfused":
        opts["fused_optimizer"] = False
    elif case == "auto" and rank == 1:  # "auto" resolves to another backend on this rank
        opts["backend"] = "auto"
        os.environ["LRML_KERNELS_BACKEND"] = "torch"
    elif case == "auto":
        opts["backend"] = "auto"  # the cpu backend (the test runs where the extension loads)
    elif case == "data" and rank == 1:  # the same options, other data (as another node's file)
        from lrml_kernels import data as lkdata

        split = lkdata.load("synthetic-small", seed=1)
    elif case == "setup" and rank == 1:
        opts["data"] = "csv:" + os.path.join(out_dir, "no-such-file.csv")
    elif case == "torch" and rank == 1:  # progress bars are each rank's own (and off there)
        opts["progress"] = True
    elif case == "bf16":  # stochastic rounding: the same bits on every rank (int16 checksums)
        opts["dtype"] = "bfloat16"
    elif case == "cpu":  # the C++ row update, checkpoints every 3 steps
        opts.update(backend="cpu", checkpoint_every=3)
    elif case == "diverge" and rank == 1:  # this rank's dense update is off by one bit
        original = LRMLTrainer._update_dense

        def _update_dense(self, name, param, grad):
            original(self, name, param, grad)
            if name == "memory":
                param.data.view(torch.int32)[0, 0] += 1

        LRMLTrainer._update_dense = _update_dense
    elif case == "nonfinite":  # parameters overflow at the first step; every rank checks them
        opts.update(optimizer="sgd", lr=1e39, checkpoint_every=1)
    elif case == "on_epoch" and rank == 1:

        def on_epoch(record):
            raise KeyError("rank 1's callback")

    try:
        fit(TrainConfig(**opts), os.path.join(out_dir, "run"), on_epoch=on_epoch, split=split)
        got = {"raised": None}
    except Exception as exc:
        got = {"raised": type(exc).__name__, "message": str(exc)}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(got, f)


@pytest.mark.parametrize(
    "case, raised",
    [
        ("unfused", [("ValueError", "fused_optimizer=False")] * 2),
        ("nonfinite", [("NonFiniteLossError", "non-finite")] * 2),
        (
            "on_epoch",
            [("OtherRankError", "on_epoch raised on another rank"), ("KeyError", "rank 1")],
        ),
        ("auto", [("ValueError", "backend: rank 0 'cpu', rank 1 'torch'")] * 2),
        ("data", [("ValueError", "data: rank 0 (")] * 2),
        (
            "setup",
            [("OtherRankError", "rank 1 stopped during set-up"), ("ValueError", "no such file")],
        ),
        ("diverge", [("OtherRankError", "replicas diverged by step")] * 2),
    ],
)
def test_a_stop_on_one_rank_stops_every_rank(tmp_path, case, raised):
    import json

    if case == "auto" and "cpu" not in lk.available_backends():
        pytest.skip("needs the cpu backend (the C++ extension) beside the torch one")
    spawn_two(fit_worker, tmp_path, case)
    for rank, (kind, words) in enumerate(raised):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["raised"] == kind and words in got["message"], (rank, got)
    if case in ("setup", "unfused", "data", "auto"):  # nothing written: no folder left behind
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["torch", "bf16", "cpu"])
def test_two_ranks_train_to_the_end_with_their_replicas_equal(tmp_path, case):
    """The checks of the ranks' agreement and replicas pass where nothing differs: every
    checkpoint's comparison of the parameters' bits included (torch ops in fp32 and in bf16; the
    C++ row update)."""
    import json

    if case == "cpu" and case not in lk.available_backends():
        pytest.skip(f"needs the {case} backend")
    spawn_two(fit_worker, tmp_path, case)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"raised": None}
    assert (tmp_path / "run" / "checkpoint.pt").exists()
