"""The reference against an independent per-pair loop in float64 (SPEC.md, term by term)."""

import math

import pytest
import torch

from lrml_kernels import reference

DISTANCES = ["l2", "squared_l2", "l1"]
RELATIONS = ["pair", "shared"]


def naive_pair(p, q, K, M, distance, eps, q_rel=None):
    """D(u, i) for one pair, loops only; ``q_rel`` is the item whose relation is used."""
    q_rel = q if q_rel is None else q_rel
    N, d = len(K), len(K[0])
    s = [p[j] * q_rel[j] for j in range(d)]
    z = [sum(K[n][j] * s[j] for j in range(d)) for n in range(N)]
    zmax = max(z)
    ex = [math.exp(v - zmax) for v in z]
    a = [v / sum(ex) for v in ex]
    r = [sum(a[n] * M[n][j] for n in range(N)) for j in range(d)]
    e = [p[j] + r[j] - q[j] for j in range(d)]
    if distance == "l2":
        return math.sqrt(sum(v * v for v in e) + eps)
    if distance == "squared_l2":
        return sum(v * v for v in e)
    return sum(abs(v) for v in e)


def make(U=6, I=7, d=5, N=3, B=4, C=3, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(U, d, generator=g, dtype=dtype) * scale
    Q = torch.randn(I, d, generator=g, dtype=dtype) * scale
    K = torch.randn(N, d, generator=g, dtype=dtype) * scale
    M = torch.randn(N, d, generator=g, dtype=dtype) * scale
    users = torch.randint(0, U, (B,), generator=g)
    items = torch.randint(0, I, (B, C), generator=g)
    return P, Q, K, M, users, items


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("relation", RELATIONS)
def test_distances_match_naive_loop(distance, relation):
    P, Q, K, M, users, items = make()
    D = reference.lrml_distances(P, Q, K, M, users, items, distance=distance, relation=relation)
    p_, q_, k_, m_ = (t.tolist() for t in (P, Q, K, M))
    for b in range(users.shape[0]):
        for c in range(items.shape[1]):
            p = p_[users[b]]
            q = q_[items[b, c]]
            q_rel = q_[items[b, 0]] if relation == "shared" else q
            want = naive_pair(p, q, k_, m_, distance, 1e-3, q_rel)
            assert D[b, c].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_hinge_matches_formula(reduction):
    P, Q, K, M, users, items = make(C=4)
    D = reference.lrml_distances(P, Q, K, M, users, items)
    L = reference.lrml_hinge_loss(P, Q, K, M, users, items, margin=0.7, reduction=reduction)
    per_row = torch.tensor(
        [
            sum(max(0.0, 0.7 + D[b, 0].item() - D[b, c].item()) for c in range(1, 4))
            for b in range(D.shape[0])
        ],
        dtype=torch.float64,
    )
    want = {"sum": per_row.sum(), "mean": per_row.mean(), "none": per_row}[reduction]
    torch.testing.assert_close(L, want)


def test_hinge_single_column_is_zero():
    P, Q, K, M, users, items = make(C=1)
    assert reference.lrml_hinge_loss(P, Q, K, M, users, items).item() == 0.0


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("relation", RELATIONS)
def test_hinge_gradcheck(distance, relation):
    P, Q, K, M, users, items = make(U=4, I=5, d=3, N=2, B=3, C=3)
    # Repeated indices must accumulate: force a repeat.
    users[1] = users[0]
    items[2, 1] = items[0, 0]
    params = [t.clone().requires_grad_() for t in (P, Q, K, M)]

    def f(*ps):
        # margin large enough that every hinge term is active (the hinge kink is not smooth)
        return reference.lrml_hinge_loss(
            *ps, users, items, margin=100.0, distance=distance, relation=relation
        )

    assert torch.autograd.gradcheck(f, params)


def test_gradients_follow_spec_formulas():
    """Autograd of the reference equals SPEC.md's hand-written gradients for one pair."""
    P, Q, K, M, _, _ = make(U=1, I=1, d=6, N=4)
    p, q = P[0], Q[0]
    params = [t.clone().requires_grad_() for t in (p, q, K, M)]
    D = reference.distances_from_rows(params[0][None], params[1][None, None], params[2], params[3])[
        0, 0
    ]
    D.backward()
    s = p * q
    a = torch.softmax(K @ s, 0)
    r = M.T @ a
    e = p + r - q
    ge = e / D.detach()
    gM = torch.outer(a, ge)
    ga = M @ ge
    gz = a * (ga - (a * ga).sum())
    gK = torch.outer(gz, s)
    gs = K.T @ gz
    torch.testing.assert_close(params[0].grad, ge + gs * q)
    torch.testing.assert_close(params[1].grad, -ge + gs * p)
    torch.testing.assert_close(params[2].grad, gK)
    torch.testing.assert_close(params[3].grad, gM)


def test_shared_relation_ignores_negative_attention():
    P, Q, K, M, users, items = make(C=3)
    Dp = reference.lrml_distances(P, Q, K, M, users, items, relation="shared")
    # Replacing the negatives' relation by the positive's must give the "shared" result.
    p, q = P[users], Q[items]
    r0 = reference.relation_vectors(p, q[:, 0], K, M)[:, None]
    want = torch.sqrt(((p[:, None] + r0 - q) ** 2).sum(-1) + 1e-3)
    torch.testing.assert_close(Dp, want)


def test_softmax_is_stable_for_huge_logits():
    P, Q, K, M, users, items = make(scale=40.0)  # logits ~ 1e5: exp overflows without max-shift
    D = reference.lrml_distances(P, Q, K, M, users, items)
    assert torch.isfinite(D).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computes_in_float32(dtype):
    P, Q, K, M, users, items = make(dtype=torch.float64)
    want = reference.lrml_distances(*(t.to(dtype).double() for t in (P, Q, K, M)), users, items)
    got = reference.lrml_distances(*(t.to(dtype) for t in (P, Q, K, M)), users, items)
    assert got.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("distance", DISTANCES)
def test_rewrite_matches_direct_formula(distance):
    P, Q, K, M, users, _ = make(U=9, I=23, d=11, N=7)
    fast = reference.all_item_distances(P[users], Q, K, M, distance=distance, rewrite=True)
    slow = reference.all_item_distances(P[users], Q, K, M, distance=distance, rewrite=False)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", DISTANCES)
def test_topk_exact_where_the_rewrite_cancels(distance):
    """Items at ‖e‖ ≪ ‖p‖, ‖q‖: the fp32 rewrite loses every digit of ‖e‖² (SPEC.md:
    "cancellation ... check it against the direct formula"), yet top-k must return the k
    smallest direct distances (here the last items: their residuals shrink with the id)."""
    g = torch.Generator().manual_seed(0)
    d, N, I = 16, 3, 50
    P = torch.randn(1, d, generator=g) * 10
    K = torch.randn(N, d, generator=g)
    M = torch.zeros(N, d)
    delta = torch.randn(I, d, generator=g)
    Q = P + delta / delta.norm(dim=1, keepdim=True) * torch.linspace(5e-3, 1e-3, I)[:, None]
    users = torch.zeros(1, dtype=torch.int64)
    dist, ids = reference.lrml_topk(P, Q, K, M, users, 3, distance=distance)
    direct = reference.lrml_distances(P, Q, K, M, users, torch.arange(I)[None], distance=distance)
    want = torch.argsort(direct[0], stable=True)[:3]
    assert ids[0].tolist() == want.tolist() == [49, 48, 47]
    torch.testing.assert_close(dist[0], direct[0, want], rtol=0, atol=0)


def test_topk_rescores_many_near_ties_in_pieces(monkeypatch):
    """Every item equal: all of them are within the screen's tolerance of the k-th, and they are
    re-scored in pieces of the chunk's budget; the answer is the first k ids."""
    monkeypatch.setattr(reference, "TOPK_CHUNK_ELEMENTS", 64)  # a user a chunk, pieces of 12
    P, Q, K, M, users, _ = make(U=2, I=40, d=5, N=3, dtype=torch.float32)
    Q = Q[:1].expand(40, 5).contiguous()
    dist, ids = reference.lrml_topk(P, Q, K, M, torch.arange(2), 13)
    assert torch.equal(ids, torch.arange(13).expand(2, 13))
    assert (dist == dist[:, :1]).all()


def test_topk_ties_by_id_among_near_equal_screen_values():
    """Duplicate items (equal direct distances) are returned by ascending id, also when the
    rewrite rounds them differently from the rest; excluded items never appear."""
    P, Q, K, M, users, _ = make(U=3, I=12, d=5, N=3, dtype=torch.float32)
    Q[[2, 5, 9]] = Q[7].clone()
    users = torch.arange(3)
    D = reference.lrml_distances(P, Q, K, M, users, torch.arange(12).expand(3, 12))
    dist, ids = reference.lrml_topk(P, Q, K, M, users, 12)
    exclude = (torch.tensor([0, 1, 1, 1]), torch.tensor([5]))
    _, ids_ex = reference.lrml_topk(P, Q, K, M, users, 12, exclude=exclude)
    for b in range(3):
        key = sorted(range(12), key=lambda i: (D[b, i].item(), i))
        assert ids[b].tolist() == key
        assert ids_ex[b].tolist() == [i for i in key if not (b == 0 and i == 5)] + [-1] * (b == 0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_topk_excludes_and_pads_like_a_brute_force_sort(distance):
    """lrml_topk (the torch backend's top-k and the oracle of the others) against the naive
    per-pair loop sorted by (distance, id): excluded items never appear, and a user left fewer
    than k items gets -1 / +inf in the last slots, never an excluded candidate in between."""
    P, Q, K, M, _, _ = make(U=3, I=7, d=5, N=3)
    users = torch.tensor([2, 0, 1])
    rows = [[], [0, 3, 4, 6], [1, 2, 5]]  # user 0 keeps 3 of 7 items, user 1 keeps 4
    indptr = torch.tensor([0, 0, 4, 7])
    exclude = (indptr, torch.tensor(sum(rows, [])))
    k = 6
    dist, ids = reference.lrml_topk(P, Q, K, M, users, k, exclude=exclude, distance=distance)
    p_, q_, k_, m_ = (t.tolist() for t in (P, Q, K, M))
    for b, u in enumerate(users.tolist()):
        kept = [i for i in range(7) if i not in rows[b]]
        want = sorted((naive_pair(p_[u], q_[i], k_, m_, distance, 1e-3), i) for i in kept)[:k]
        n = len(want)
        assert ids[b, :n].tolist() == [i for _, i in want]
        assert dist[b, :n].tolist() == pytest.approx([v for v, _ in want], rel=1e-12, abs=1e-12)
        assert ids[b, n:].tolist() == [-1] * (k - n)
        assert torch.isinf(dist[b, n:]).all() and (dist[b, n:] > 0).all()


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("k", [3, 7, 8])
def test_topk_a_nan_item_ranks_last_and_leaves_the_others_exact(distance, k):
    """A NaN item (a diverged row) is last; it must not make the screen's rounding bound NaN,
    which kept no other item for the exact re-score (they came back as -1). A NaN user (user 3)
    gets its items in id order, no empty slot ahead of them."""
    P, Q, K, M, _, _ = make(U=4, I=8, d=6, N=3)
    Q, P = Q.clone(), P.clone()
    Q[3] = float("nan")
    P[3] = float("nan")
    _, nan_ids = reference.lrml_topk(P, Q, K, M, torch.tensor([3, 0]), k, distance=distance)
    assert nan_ids[0].tolist() == list(range(k))
    users = torch.arange(3)
    dist, ids = reference.lrml_topk(P, Q, K, M, users, k, distance=distance)
    direct = reference.lrml_distances(
        P, Q, K, M, users, torch.arange(8).expand(3, 8), distance=distance
    )
    for b in range(3):
        want = sorted((v, i) for i, v in enumerate(direct[b].tolist()) if i != 3) + [(0, 3)]
        assert ids[b].tolist() == [i for _, i in want][:k]
        assert dist[b, : min(k, 7)].tolist() == [v for v, _ in want][: min(k, 7)]
    assert torch.isnan(dist[:, 7:]).all()
