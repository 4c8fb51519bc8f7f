"""The LRML module: parameters, optimizers, sparse gradients, projection, state_dict, compile."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrml_kernels as lk


def batch(U=20, I=15, B=8, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, U, (B,), generator=g), torch.randint(0, I, (B, C), generator=g)


def test_shapes_and_init_scale():
    torch.manual_seed(0)
    m = lk.LRML(300, 200, dim=64, memory_slots=7)
    assert m.user_emb.shape == (300, 64) and m.item_emb.shape == (200, 64)
    assert m.keys.shape == (7, 64) and m.memory.shape == (7, 64)
    assert m.user_emb.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert len(list(m.parameters())) == 4


def test_forward_is_the_hinge_loss_of_distances():
    m = lk.LRML(20, 15, dim=6, memory_slots=3, margin=0.3)
    u, i = batch()
    D = m.distances(u, i)
    want = torch.relu(0.3 + D[:, :1] - D[:, 1:]).sum()
    torch.testing.assert_close(m(u, i), want)


@pytest.mark.parametrize(
    "bad",
    [
        {"dim": 0},
        {"memory_slots": -1},
        {"distance": "x"},
        {"relation": "x"},
        {"max_norm": 0.0},
        {"max_norm": float("nan")},
        {"margin": True},
        {"margin": float("nan")},
        {"eps": float("inf")},
    ],
)
def test_bad_constructor_arguments(bad):
    kw = {"dim": 4, "memory_slots": 2, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        lk.LRML(5, 5, **kw)


def test_project_checks_its_rows_as_the_ops_check_indices():
    m = lk.LRML(5, 4, dim=3, memory_slots=2)
    with pytest.raises(IndexError, match="users holds index -1"):
        m.project_(users=torch.tensor([-1]))
    with pytest.raises(IndexError, match="items holds index 4"):
        m.project_(items=torch.tensor([[0, 4]]))
    with pytest.raises(TypeError, match="integer indices"):
        m.project_(users=torch.tensor([0.0]))
    with torch.no_grad():
        m.user_emb.mul_(10)
    before = m.user_emb.detach().clone()
    m.project_(users=torch.tensor([3, 1, 3], dtype=torch.uint8))  # rows 1 and 3, not a mask
    norms = m.user_emb.detach().norm(dim=1)
    assert torch.allclose(norms[[1, 3]], torch.ones(2))
    assert torch.equal(m.user_emb.detach()[[0, 2, 4]], before[[0, 2, 4]])


@pytest.mark.parametrize("opt", ["sparse_adam", "adagrad", "sgd"])
def test_sparse_gradients_work_with_sparse_optimizers(opt):
    torch.manual_seed(0)
    m = lk.LRML(20, 15, dim=6, memory_slots=3, sparse=True)
    dense = copy.deepcopy(m)
    dense.sparse = False
    u, i = batch()
    m(u, i).backward()
    dense(u, i).backward()
    assert m.user_emb.grad.is_sparse and m.item_emb.grad.is_sparse
    for a, b in zip(m.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a.grad.to_dense(), b.grad)
    if opt == "sparse_adam":
        opts = [
            torch.optim.SparseAdam([m.user_emb, m.item_emb]),
            torch.optim.Adam([m.keys, m.memory]),
        ]
    elif opt == "adagrad":
        opts = [torch.optim.Adagrad(m.parameters())]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=0.1)]
    before = m.user_emb.detach().clone()
    for o in opts:
        o.step()
    changed = (m.user_emb != before).any(1)
    assert changed[u].all() and changed.sum() == u.unique().numel()


def test_project_puts_rows_in_the_ball():
    torch.manual_seed(0)
    m = lk.LRML(20, 15, dim=6, memory_slots=3, max_norm=1.0)
    with torch.no_grad():
        m.user_emb.mul_(10)
        m.item_emb.mul_(10)
    u, i = batch()
    m.project_(u, i)
    norms = m.user_emb.norm(dim=1)
    touched = torch.zeros(20, dtype=torch.bool)
    touched[u] = True
    assert (norms[touched] <= 1 + 1e-6).all()
    assert (norms[~touched] > 1).all()  # untouched rows are left alone
    m.project_()
    assert (m.item_emb.norm(dim=1) <= 1 + 1e-6).all()
    # x <- x / max(1, |x| / max_norm): rows already inside are unchanged
    small = lk.LRML(3, 3, dim=4, memory_slots=2, max_norm=100.0)
    before = small.user_emb.detach().clone()
    small.project_()
    torch.testing.assert_close(small.user_emb.detach(), before)


def test_state_dict_round_trip_and_to():
    m = lk.LRML(20, 15, dim=6, memory_slots=3)
    m2 = lk.LRML(20, 15, dim=6, memory_slots=3)
    m2.load_state_dict(m.state_dict())
    u, i = batch()
    torch.testing.assert_close(m(u, i), m2(u, i))
    m3 = m.to(torch.float64)
    assert m3.user_emb.dtype == torch.float64
    assert m3(u, i).dtype == torch.float64


def test_recommend_returns_sorted_unexcluded_items():
    torch.manual_seed(0)
    m = lk.LRML(20, 15, dim=6, memory_slots=3)
    u = torch.tensor([0, 3])
    ex = (torch.tensor([0, 2, 2]), torch.tensor([1, 4]))
    dist, ids = m.recommend(u, 15, exclude=ex)
    assert (dist[:, :-1] <= dist[:, 1:]).all()
    assert 1 not in ids[0].tolist() and 4 not in ids[0].tolist()
    assert ids[0, -2:].tolist() == [-1, -1] and torch.isinf(dist[0, -2:]).all()
    assert sorted(ids[1].tolist()) == list(range(15))
    full = m.distances(u[1:].expand(15), torch.arange(15)[:, None])[:, 0]
    torch.testing.assert_close(dist[1], full.sort().values)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    m = lk.LRML(20, 15, dim=6, memory_slots=3, backend="torch")
    u, i = batch()
    want = m(u, i)
    want.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = compiled(u, i)
    got.backward()
    torch.testing.assert_close(got, want)
    for p, g in zip(m.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.skipif("cpu" not in lk.available_backends(), reason="needs the cpu backend")
def test_torch_compile_fullgraph_of_a_fresh_process_on_the_default_backend():
    # (the backend's library was loaded on the first call, inside the trace: dynamo refused the
    # loading's lock, on every call, unless something had loaded it eagerly before)
    script = """
import torch, lrml_kernels as lk
m = lk.LRML(10, 12, dim=8, memory_slots=3)
u, i = torch.tensor([0, 1]), torch.tensor([[5, 7], [2, 9]])
got = torch.compile(m, fullgraph=True, backend="aot_eager")(u, i)
torch.testing.assert_close(got, m(u, i))
print("ok")
"""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("backend", lk.available_backends())
def test_sparse_gradients_warn_nothing(backend):
    # torch 2.11 and 2.12 warned "Sparse invariant checks are implicitly disabled ... Memory
    # errors (e.g. SEGFAULT) will occur" at a process's first sparse gradient (once a process:
    # hence a fresh one), though the gradients pass check_invariants=False.
    script = f"""
import warnings
warnings.simplefilter("error", UserWarning)
import torch, lrml_kernels as lk
m = lk.LRML(20, 15, dim=6, memory_slots=3, sparse=True, backend={backend!r})
m(torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]])).backward()
assert m.user_emb.grad.is_sparse
print("ok")
"""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_recommend_on_a_trainable_model_uses_worker_threads_safely():
    # Parameters that require grad, and a catalogue large enough for the kernels to go parallel.
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = lk.LRML(64, 3000, dim=16, memory_slots=4)
        users = torch.arange(64)
        dist, ids = m.recommend(users, 5)
        want_d, want_i = lk.lrml_topk(
            *(p.detach() for p in m.parameters()), users, 5, backend="torch"
        )
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(dist, want_d)
    assert torch.equal(ids, want_i)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in lk.available_backends()])
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_cml_is_lrml_with_relation_zero(backend, distance, one_thread):
    """relation="none" is CML: D = dist(p − q), the loss its hinge, the top-k its nearest items;
    training (fused or through autograd) moves the embeddings and leaves keys and memory alone."""
    torch.manual_seed(0)
    U, I = 20, 15
    m = lk.LRML(U, I, dim=6, memory_slots=3, relation="none", distance=distance, backend=backend)
    assert not m.memory.any() and not m.keys.requires_grad and m.kernel_relation == "pair"
    u, i = batch(U, I)

    def cml(users, items):
        e = m.user_emb.detach()[users][:, None] - m.item_emb.detach()[items]
        sq = (e * e).sum(-1)
        return torch.sqrt(sq + m.eps) if distance == "l2" else sq

    D = cml(u, i)
    torch.testing.assert_close(m.distances(u, i), D)
    torch.testing.assert_close(m(u, i), torch.relu(m.margin + D[:, :1] - D[:, 1:]).sum())
    every = cml(u, torch.arange(I).expand(len(u), I))
    dist, ids = m.recommend(u, 4)
    torch.testing.assert_close(dist, every.sort(dim=1).values[:, :4])
    keys = m.keys.detach().clone()
    users_before = m.user_emb.detach().clone()
    trainer = lk.LRMLTrainer(m, "adam", lr=0.05)
    trainer.step(u, i)
    assert not torch.equal(m.user_emb, users_before)
    assert torch.equal(m.keys, keys) and not m.memory.any()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.05)
    m(u, i).backward()
    opt.step()
    assert m.keys.grad is None and torch.equal(m.keys, keys) and not m.memory.any()


def test_a_model_on_the_meta_device_runs_its_shapes():
    # A dry run with no values (shape inference, deferred initialisation): the index range check,
    # which reads values, has nothing to check and must not fail on the default validate=True.
    m = lk.LRML(5, 9, dim=8, memory_slots=3, device="meta")
    users = torch.tensor([0, 1], device="meta")
    items = torch.zeros(2, 3, dtype=torch.int64, device="meta")
    loss = m(users, items)
    assert loss.device.type == "meta" and loss.shape == ()
    dist = m.distances(users, items)
    assert dist.device.type == "meta" and dist.shape == (2, 3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_autocast_leaves_the_ops_exact(backend):
    """Under torch.autocast the ops compute as outside it: the cpu top-k crashed on the mixed
    dtypes, the torch backend rounded its distances to bf16 (other top-k ids)."""
    if backend not in lk.available_backends():
        pytest.skip(f"{backend} backend not available here")
    torch.manual_seed(0)
    m = lk.LRML(40, 300, dim=16, memory_slots=5, backend=backend)
    users, items = torch.arange(40), torch.randint(0, 300, (40, 4))
    want = m.recommend(users, 10), m.distances(users, items), m.relations(users, items[:, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.recommend(users, 10), m.distances(users, items), m.relations(users, items[:, 0])
        loss = m(users, items)
    assert loss.dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True) if isinstance(g, tuple) else [(g, w)]:
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_model_distances_follow_validate_false():
    m = lk.LRML(5, 4, dim=3, memory_slots=2, backend="torch", validate=False)
    with pytest.raises(IndexError) as info:  # torch's own indexing error, not the op's check
        m.distances(torch.tensor([100]), torch.tensor([[0]]))
    assert "users holds index" not in str(info.value)


def test_model_uses_its_eps():
    torch.manual_seed(0)
    m = lk.LRML(5, 4, dim=3, memory_slots=2, backend="torch", eps=0.5)
    u, i = torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]])
    got = m.distances(u, i)
    P = [t.detach() for t in (m.user_emb, m.item_emb, m.keys, m.memory)]
    torch.testing.assert_close(got, lk.lrml_distances(*P, u, i, eps=0.5, backend="torch"))
    assert not torch.allclose(got, lk.lrml_distances(*P, u, i, eps=1e-3, backend="torch"))
