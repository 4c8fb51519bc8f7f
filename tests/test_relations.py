"""``lrml_relations``: the attention ``a`` and relation ``r`` of pairs, every backend here against
the float64 reference with the bounds of tests/_tolerance.py; validation before any kernel;
``LRML.relations``. The GPU runs (cuda and triton on CUDA tensors) are in test_gpu_matrix.py; the
triton backend runs here through its CPU interpreter (conftest sets TRITON_INTERPRET).
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_relations_match

import lrml_kernels as lk
from lrml_kernels import backends

# (d, N, B): the odd shapes, plus the N = 1 and d = 1 corners.
SHAPES = [(37, 7, 1), (37, 7, 1023), (1, 1, 37), (100, 20, 257)]
CPU_BACKENDS = ("torch", "cpu", "triton")


def make(d, N, B, dtype=torch.float64, *, scale=1.0, seed=0, idx_dtype=torch.int64):
    """Small tables (indices repeat) and ``B`` pairs."""
    g = torch.Generator().manual_seed(seed)
    U, I = max(1, B // 3), max(2, B // 2)
    params = [
        (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
        for n in (U, I, N, N)
    ]
    users = torch.randint(0, U, (B,), generator=g).to(idx_dtype)
    items = torch.randint(0, I, (B,), generator=g).to(idx_dtype)
    return params, users, items


def require(backend: str) -> None:
    why = backends.why_unavailable(backend, "cpu")
    if why is not None:
        if backend == "cpu":  # CI must build the extension: fail, don't skip
            pytest.fail(f"the cpu backend is unavailable: {why}")
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "d{}-N{}-B{}".format(*s))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_reference(backend, shape, dtype):
    require(backend)
    params, users, items = make(*shape, dtype, scale=0.7)
    a, r = lk.lrml_relations(*params, users, items, backend=backend)
    d, N, B = shape
    assert a.shape == (B, N) and r.shape == (B, d)
    assert_relations_match(backend, params, users, items, a, r)
    # each attention row is a distribution over the N slots
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(B, dtype=dtype), rtol=0, atol=4 * N * 2**-23)


@pytest.mark.parametrize(
    "backend, dtype",
    [(b, torch.float16) for b in CPU_BACKENDS] + [(b, torch.bfloat16) for b in CPU_BACKENDS],
)
def test_half_precision_computed_in_fp32(backend, dtype):
    require(backend)
    params, users, items = make(37, 7, 129, dtype, scale=0.7, idx_dtype=torch.int32)
    a, r = lk.lrml_relations(*params, users, items, backend=backend)
    assert_relations_match(f"{backend} {dtype}", params, users, items, a, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits_saturate_without_overflow(backend):
    # |K s| in the thousands: exp() of the raw logits overflows; a must stay one-hot-like, finite.
    require(backend)
    params, users, items = make(40, 7, 33, torch.float32, scale=4.0)
    z = (params[0][users] * params[1][items]) @ params[2].T
    assert float(z.abs().max()) > 800
    a, r = lk.lrml_relations(*params, users, items, backend=backend)
    assert torch.isfinite(a).all() and torch.isfinite(r).all()
    assert_relations_match(backend, params, users, items, a, r)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_relation_is_the_one_the_distances_use(backend):
    # D(p, q) = ‖p + r − q‖ (l2, eps) with this r: the op and lrml_distances agree.
    require(backend)
    params, users, items = make(13, 5, 20)
    _, r = lk.lrml_relations(*params, users, items, backend=backend)
    P, Q = params[0], params[1]
    D = lk.lrml_distances(*params, users, items[:, None], backend="torch", eps=1e-3)
    e = P[users] + r - Q[items]
    torch.testing.assert_close(((e * e).sum(1) + 1e-3).sqrt(), D[:, 0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_outputs_carry_no_graph(backend):
    require(backend)
    params, users, items = make(8, 3, 5)
    leaves = [p.requires_grad_() for p in params]
    a, r = lk.lrml_relations(*leaves, users, items, backend=backend)
    assert not a.requires_grad and not r.requires_grad


def test_empty_batch():
    params, users, items = make(6, 4, 0)
    a, r = lk.lrml_relations(*params, users, items, backend="cpu")
    assert a.shape == (0, 4) and r.shape == (0, 6)


def test_cpu_result_does_not_depend_on_the_thread_count():
    require("cpu")
    params, users, items = make(37, 7, 1023)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lk.lrml_relations(*params, users, items, backend="cpu")
        torch.set_num_threads(2)
        two = lk.lrml_relations(*params, users, items, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))


def _no_backend(*args, **kwargs):
    raise AssertionError("a backend was chosen: validation must raise before any kernel runs")


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda P, u, i: (P, u.float(), i), TypeError, "users must hold integer"),
        (lambda P, u, i: (P, u, i.double()), TypeError, "items must hold integer"),
        (lambda P, u, i: (P, u[:, None], i), ValueError, "users must be 1-D"),
        (lambda P, u, i: (P, u, i[:, None]), ValueError, "items must be 1-D"),
        (lambda P, u, i: (P, u[:2], i), ValueError, "items has 3 entries but users has 2"),
        (lambda P, u, i: (P, u + 100, i), IndexError, "users holds index 10"),
        (lambda P, u, i: (P, u, i - 100), IndexError, "items holds index -"),
        (lambda P, u, i: ([*P[:3], P[3][:2]], u, i), ValueError, "memory has 2"),
        (lambda P, u, i: ([P[0].float(), *P[1:]], u, i), TypeError, "share one dtype"),
        (lambda P, u, i: ([P[0].long(), *P[1:]], u, i), TypeError, "user_emb must be a floating"),
        (lambda P, u, i: ([P[0][None], *P[1:]], u, i), ValueError, "user_emb must be 2-D"),
        (lambda P, u, i: (P, u.to("meta"), i), ValueError, "users is on meta"),
        (lambda P, u, i: ([P[0].to("meta"), *P[1:]], u, i), ValueError, "one device"),
    ],
)
def test_bad_input_raises_before_any_kernel(monkeypatch, mutate, exc, words):
    params, users, items = make(4, 3, 3)
    params, users, items = mutate(params, users, items)
    monkeypatch.setattr(backends, "get", _no_backend)
    with pytest.raises(exc, match=words):
        lk.lrml_relations(*params, users, items)


def test_validate_false_skips_only_the_range_check(monkeypatch):
    params, users, items = make(4, 3, 3)
    seen = []
    monkeypatch.setattr(backends, "get", lambda *a: seen.append(a) or backends.TORCH_BACKEND)
    lk.lrml_relations(*params, users, items, validate=False)
    assert len(seen) == 1
    with pytest.raises(ValueError, match="users must be 1-D"):
        lk.lrml_relations(*params, users[:, None], items, validate=False)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backend_checks_the_indices_again(backend):
    # validate=False reaches the kernel: the cpu backend checks the range itself (IndexError);
    # the triton kernel masks its loads (no wild read) and the result is defined.
    require(backend)
    params, users, items = make(4, 3, 3)
    bad = items.clone()
    bad[1] = 1000
    if backend == "cpu":
        with pytest.raises(IndexError, match="items holds index 1000"):
            lk.lrml_relations(*params, users, bad, backend=backend, validate=False)
    else:
        a, r = lk.lrml_relations(*params, users, bad, backend=backend, validate=False)
        assert torch.isfinite(a).all() and torch.isfinite(r).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_model_relations_use_the_model_backend(monkeypatch, backend):
    require(backend)
    torch.manual_seed(0)
    model = lk.LRML(40, 30, dim=37, memory_slots=7, backend=backend, dtype=torch.float64)
    users, items = torch.randint(0, 40, (50,)), torch.randint(0, 30, (50,))
    chosen = []
    get = backends.get
    monkeypatch.setattr(backends, "get", lambda name, *a: chosen.append(name) or get(name, *a))
    a, r = model.relations(users, items)
    assert chosen == [backend]
    params = [p.detach() for p in (model.user_emb, model.item_emb, model.keys, model.memory)]
    assert_relations_match(f"LRML.relations {backend}", params, users, items, a, r)


def test_cml_model_has_zero_relations():
    model = lk.LRML(10, 12, dim=8, memory_slots=3, relation="none", backend="torch")
    a, r = model.relations(torch.arange(10), torch.arange(10))
    assert torch.equal(r, torch.zeros(10, 8))
    torch.testing.assert_close(a.sum(1), torch.ones(10))
