"""The fused sparse optimizer step against autograd + the torch optimizer + project_()."""

import copy

import pytest
import torch

import lrml_kernels as lk
from lrml_kernels.backends import why_unavailable
from lrml_kernels.trainer import LRMLTrainer


def torch_optimizers(m, name, lr):
    if name == "adam":
        return [
            torch.optim.SparseAdam([m.user_emb, m.item_emb], lr=lr),
            torch.optim.Adam([m.keys, m.memory], lr=lr),
        ]
    if name == "adagrad":
        return [torch.optim.Adagrad(m.parameters(), lr=lr)]
    return [torch.optim.SGD(m.parameters(), lr=lr)]


# triton: on CPU tensors through the interpreter, the Triton row update (triton/row_update.py)
BACKENDS = ["torch"] + [b for b in ("cpu", "triton") if why_unavailable(b, "cpu") is None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
@pytest.mark.parametrize("relation", ["pair", "shared"])
def test_fused_step_matches_torch_optimizer_for_20_steps(name, relation, backend):
    # backend="cpu" with adam runs the C++ row update (row_adam_); the reference runs torch ops.
    torch.manual_seed(0)
    fused = lk.LRML(
        30, 25, dim=8, memory_slots=3, relation=relation, sparse=True, backend=backend
    ).double()
    ref = copy.deepcopy(fused)
    ref.backend = "torch"
    trainer = LRMLTrainer(fused, name, lr=0.05)
    opts = torch_optimizers(ref, name, 0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        users = torch.randint(0, 10, (16,), generator=g)  # few users: many repeats
        items = torch.randint(0, 8, (16, 4), generator=g)
        loss = trainer.step(users, items)
        for o in opts:
            o.zero_grad()
        want = ref(users, items)
        want.backward()
        for o in opts:
            o.step()
        ref.project_(users, items)
        torch.testing.assert_close(loss, want.detach())
    for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert (fused.user_emb[:10].norm(dim=1) <= 1 + 1e-9).all()  # the touched rows


def test_rowwise_adagrad_updates_only_touched_rows_with_one_accumulator_per_row():
    torch.manual_seed(0)
    m = lk.LRML(30, 25, dim=8, memory_slots=3, max_norm=None).double()
    before = m.user_emb.detach().clone()
    tr = LRMLTrainer(m, "rowwise_adagrad", lr=0.1)
    users = torch.tensor([1, 1, 4])
    items = torch.randint(0, 25, (3, 3))
    tr.step(users, items)
    changed = (m.user_emb != before).any(1)
    assert changed.nonzero().flatten().tolist() == [1, 4]
    assert tr.state["user_emb"]["sum"].shape == (30,)
    assert (tr.state["user_emb"]["sum"][[0, 2, 3]] == 0).all()


def test_skip_nonfinite_leaves_the_model_untouched():
    m = lk.LRML(10, 10, dim=4, memory_slots=2)
    with torch.no_grad():
        m.keys[0, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    tr = LRMLTrainer(m, "adam", skip_nonfinite=True)
    tr.step(torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    assert tr.skipped == 1 and tr.steps == 0
    for a, b in zip(m.parameters(), before, strict=True):
        assert torch.equal(a.detach().nan_to_num(), b.nan_to_num())


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = lk.LRML(10, 10, dim=4, memory_slots=2)
    tr = LRMLTrainer(m, "adam")
    tr.step(torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    m2 = copy.deepcopy(m)
    tr2 = LRMLTrainer(m2, "adam")
    tr2.load_state_dict(copy.deepcopy(tr.state_dict()))
    u, i = torch.tensor([1, 2]), torch.tensor([[1, 5], [3, 0]])
    tr.step(u, i)
    tr2.step(u, i)
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="optimizer"):
        LRMLTrainer(m, "sgd").load_state_dict(tr.state_dict())


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        LRMLTrainer(lk.LRML(3, 3, dim=2, memory_slots=1), "lbfgs")
