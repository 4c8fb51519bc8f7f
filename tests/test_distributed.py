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
    mp.start_processes(
        worker,
        args=(2, str(tmp_path / "pg"), str(tmp_path), optimizer),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
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
