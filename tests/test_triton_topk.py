"""Full-catalogue top-k of the triton backend against brute force (SPEC.md "Ranking all items").

Brute force: the reference distance of every (user, item) in float64, excluded items removed, a
stable sort by (distance, item id). Returned distances must match; ids must match wherever the
ranking is unambiguous at the test tolerance, and within exact ties the kernel must order ids
ascending. The screened path (SPEC.md "Exact top-k from a screen") is checked for what makes it
exact: its lower bounds hold and are not vacuous, near-ties planted at the top-k boundary (closer
than the screening error) come out in the exact order, and with the error bound switched off the
same test fails.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import reference
from lrml_kernels.precision import using_fp32_matmul_precision

pytest.importorskip("triton")
T = importlib.import_module("lrml_kernels.triton")
TK = importlib.import_module("lrml_kernels.triton.topk_kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DISTANCES = ("l2", "squared_l2", "l1")


def make(U, I, N, d, B, dtype=torch.float64, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    params = [
        (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
        for n in (U, I, N, N)
    ]
    users = torch.randint(0, U, (B,), generator=g).to(DEVICE)
    return params, users


def random_exclude(B, I, seed=1, p=0.3, full_rows=(), empty_rows=()):
    """CSR exclusion lists (sorted per row) and the dense mask used to check them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, I, generator=g) < p
    for b in full_rows:
        mask[b] = True
    for b in empty_rows:
        mask[b] = False
    counts = mask.sum(1)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    indices = mask.nonzero()[:, 1]  # row-major: sorted within each row
    return (indptr.to(DEVICE), indices.to(DEVICE)), mask


def brute_distances(params, users, distance):
    P, Q, K, M = (p.double() for p in params)
    B, I = users.shape[0], Q.shape[0]
    items = torch.arange(I, device=Q.device).expand(B, I)
    return reference.lrml_distances(P, Q, K, M, users, items, distance=distance).cpu()


def check_topk(dist, ids, full, excluded, k, tol):
    """Compare (dist, ids) [B, k] with brute force over ``full [B, I]`` minus ``excluded``."""
    dist, ids = dist.double().cpu(), ids.cpu()
    B, I = full.shape
    assert dist.shape == (B, k) and ids.shape == (B, k) and ids.dtype == torch.int64
    for b in range(B):
        keep = torch.arange(I) if excluded is None else (~excluded[b]).nonzero()[:, 0]
        dv = full[b, keep]
        order = torch.argsort(dv, stable=True)  # keep is ascending: ties stay by smaller id
        exp_i, exp_d = keep[order], dv[order]
        n = min(k, keep.numel())
        assert (ids[b, n:] == -1).all() and torch.isinf(dist[b, n:]).all()
        got = ids[b, :n]
        assert (got >= 0).all() and got.unique().numel() == n
        if excluded is not None:
            assert not excluded[b, got].any()
        torch.testing.assert_close(dist[b, :n], exp_d[:n], rtol=tol, atol=tol)
        torch.testing.assert_close(full[b, got], exp_d[:n], rtol=tol, atol=tol)
        # Unambiguous ranks (gap to both neighbours above the tolerance): ids must match.
        ext = torch.cat([exp_d, torch.tensor([float("inf")], dtype=exp_d.dtype)])
        for j in range(n):
            lo_gap = ext[j] - ext[j - 1] if j > 0 else float("inf")
            if lo_gap > 4 * tol * max(1.0, abs(float(ext[j]))) and (
                ext[j + 1] - ext[j] > 4 * tol * max(1.0, abs(float(ext[j])))
            ):
                assert got[j] == exp_i[j], (b, j)
        # Exact ties in the output: ascending ids.
        if n > 1:
            tie = dist[b, 1:n] == dist[b, : n - 1]
            assert (got[1:][tie] > got[:-1][tie]).all()


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_topk_matches_brute_force(distance, dtype, with_exclude):
    B, I = 9, 61
    params, users = make(13, I, 7, 37, B, dtype)
    exclude, mask = (
        random_exclude(B, I, full_rows=(2,), empty_rows=(0,)) if with_exclude else (None, None)
    )
    full = brute_distances(params, users, distance)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for k in (1, 10, I + 7):
        dist, ids = lk.lrml_topk(
            *params, users, k, exclude=exclude, distance=distance, backend="triton"
        )
        assert dist.dtype == dtype
        check_topk(dist, ids, full, mask, k, tol)
        if with_exclude:
            assert (ids[2] == -1).all() and torch.isinf(dist[2]).all()  # every item excluded


def test_fp64_eps_reaches_the_kernels_in_fp64_on_the_gpu(gpu_scalar_args):
    # A compiled launch types a Python float argument fp32 unless the kernel annotates it (the
    # interpreter keeps the double): fp64 distances with an fp32-rounded eps = 0.1 are off by
    # ~2e-9 relative near D = sqrt(eps), in the re-score and on the direct path alike.
    I = 150
    params, users = make(6, I, 5, 9, 4, scale=0.05)
    items = torch.arange(I, device=DEVICE).expand(4, I)
    full = reference.lrml_distances(*params, users, items, eps=0.1).cpu()
    for k in (5, I):  # screened and re-scored; direct (more candidates than MAX_CANDIDATES)
        dist, ids = lk.lrml_topk(*params, users, k, eps=0.1, backend="triton")
        torch.testing.assert_close(dist.cpu(), full.gather(1, ids.cpu()), rtol=1e-13, atol=0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_items_tie_to_smaller_id(distance):
    B, I = 6, 40
    params, users = make(8, I, 5, 20, B)
    Q = params[1]
    for dup in (3, 17, 25, 39):
        Q[dup] = Q[11]
    Q[30] = Q[0]
    full = brute_distances(params, users, distance)
    dist, ids = T.topk(*params, users, I, None, distance, 1e-3)
    check_topk(dist, ids, full, None, I, 1e-9)
    for b in range(B):
        row = ids[b].tolist()
        pos = [row.index(i) for i in (3, 11, 17, 25, 39)]
        assert pos == sorted(pos) and pos[-1] - pos[0] == 4  # adjacent, ascending ids
        assert dist[b, pos[0]] == dist[b, pos[-1]]  # bitwise ties in the kernel
        assert row.index(0) + 1 == row.index(30)


def test_many_item_tiles_chunks_and_large_k(monkeypatch):
    # Several user chunks (exclusion slices crossing them), several item tiles, k up to 1000.
    monkeypatch.setattr(TK, "CHUNK_ELEMENTS", 3 * 1100)
    B, I = 7, 1100
    params, users = make(10, I, 20, 16, B, torch.float32, seed=4)
    exclude, mask = random_exclude(B, I, seed=5, p=0.2, full_rows=(4,))
    full = brute_distances(params, users, "l2")
    for k in (1000, 1500):
        dist, ids = lk.lrml_topk(*params, users, k, exclude=exclude, backend="triton")
        check_topk(dist, ids, full, mask, k, 2e-5)


def test_d1_n1_and_single_item():
    params, users = make(3, 1, 1, 1, 4)
    for k in (1, 3):
        dist, ids = T.topk(*params, users, k, None, "l2", 1e-3)
        full = brute_distances(params, users, "l2")
        check_topk(dist, ids, full, None, k, 1e-9)
    exclude = (torch.tensor([0, 1, 1, 1, 2], device=DEVICE), torch.tensor([0, 0], device=DEVICE))
    dist, ids = T.topk(*params, users, 2, exclude, "l1", 1e-3)
    assert ids[:, 1].eq(-1).all() and ids[[0, 3], 0].eq(-1).all() and ids[[1, 2], 0].eq(0).all()


@pytest.mark.parametrize("dtype, unit", [(torch.float16, 2e-3), (torch.bfloat16, 8e-3)])
def test_half_precision_topk(dtype, unit):
    B, I = 5, 50
    params, users = make(7, I, 7, 24, B, dtype)
    dist, ids = T.topk(*params, users, 12, None, "squared_l2", 1e-3)
    assert dist.dtype == dtype
    full = brute_distances([p.float() for p in params], users, "squared_l2")
    # Ranking is on the rounded distances: compare values at the dtype's resolution.
    check_topk(dist, ids, full.to(dtype).double(), None, 12, unit)


def test_matches_reference_topk_on_random_data():
    params, users = make(20, 300, 20, 100, 11, torch.float64, seed=7)
    exclude, _ = random_exclude(11, 300, seed=8, p=0.1)
    for distance in DISTANCES:
        d1, i1 = T.topk(*params, users, 25, exclude, distance, 1e-3)
        d2, i2 = reference.lrml_topk(*params, users, 25, exclude=exclude, distance=distance)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(d1, d2, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# The screened path (tensor-core screen, exact re-score, certificate, fallback)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_screened_odd_shapes(distance, dtype):
    # d = 37, N = 7, I = 200 (one full and one partial item tile), B = 1 and B = 9, k = 1 / 10 /
    # more than the catalogue minus the exclusions of row 3 (every item but 5 excluded).
    I = 200
    params, users = make(30, I, 7, 37, 9, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(9, I, generator=g) < 0.2
    mask[3] = True
    mask[3, [0, 57, 128, 150, 199]] = False
    mask[5] = False
    counts = mask.sum(1)
    exclude = (
        torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(DEVICE),
        mask.nonzero()[:, 1].to(DEVICE),
    )
    full = brute_distances(params, users, distance)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for k in (1, 10, 40):
        dist, ids = T.topk(*params, users, k, exclude, distance, 1e-3)
        assert TK.last_stats == {"screened": 9, "fallback": 0}
        check_topk(dist, ids, full, mask, k, tol)
        left = {0, 57, 128, 150, 199}
        assert (ids[3, 5:] == -1).all() and set(ids[3, :5].tolist()) <= left
        assert k < 5 or set(ids[3, :5].tolist()) == left
    dist, ids = T.topk(*params, users[:1], 10, None, distance, 1e-3)
    check_topk(dist, ids, full[:1], None, 10, tol)


def test_screened_user_chunks(monkeypatch):
    # Chunks of 2 users: each chunk's exclusion bitmask starts at its own CSR row.
    B, I = 7, 90
    params, users = make(10, I, 5, 20, B, torch.float32, seed=17)
    exclude, mask = random_exclude(B, I, seed=18, p=0.3, full_rows=(4,))
    whole = T.topk(*params, users, 10, exclude, "l2", 1e-3)
    monkeypatch.setattr(TK, "SCREEN_CHUNK_BYTES", 2 * (5 * 12 + 8 * 20 + 40 * 32))
    parts = T.topk(*params, users, 10, exclude, "l2", 1e-3)
    assert torch.equal(whole[1], parts[1])  # (the interpreter's BLAS rounds by batch shape)
    torch.testing.assert_close(whole[0], parts[0], rtol=1e-6, atol=1e-6)
    check_topk(*parts, brute_distances(params, users, "l2"), mask, 10, 2e-5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_screen_with_the_gpu_tile_shapes(monkeypatch, distance):
    # The GPU launch's tiles (16 users a program, 32-item tiles) through the interpreter: a
    # partial last user block, a partial last item tile, exclusions, several tiles a program.
    gpu = TK.screen_config(7, 37, 10, interpreted=False)
    assert (gpu["BLOCK_U"], gpu["BLOCK_I"]) == (16, 32)
    shapes = {"BLOCK_U": gpu["BLOCK_U"], "BLOCK_I": gpu["BLOCK_I"]}
    config = TK.screen_config
    monkeypatch.setattr(TK, "screen_config", lambda *a: {**config(*a), **shapes})
    B, I = 21, 77
    params, users = make(30, I, 7, 37, B, torch.float32, seed=23)
    exclude, mask = random_exclude(B, I, seed=24, p=0.2, full_rows=(5,))
    dist, ids = T.topk(*params, users, 10, exclude, distance, 1e-3)
    check_topk(dist, ids, brute_distances(params, users, distance), mask, 10, 2e-5)
    assert TK.last_stats["screened"] >= B - 2


@pytest.mark.slow
def test_screened_few_hundred_users():
    B, I = 300, 150
    params, users = make(400, I, 7, 37, B, torch.float32, seed=13)
    exclude, mask = random_exclude(B, I, seed=14, p=0.1)
    full = brute_distances(params, users, "l2")
    dist, ids = T.topk(*params, users, 10, exclude, "l2", 1e-3)
    assert TK.last_stats["fallback"] <= 3
    check_topk(dist, ids, full, mask, 10, 2e-5)


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.5])
@pytest.mark.parametrize("distance", DISTANCES)
def test_screen_lower_bounds_hold_and_are_tight(distance, scale):
    # KC >= I: every item is a candidate, so the kernel reports a lower bound for each. Scales
    # from near-uniform to saturated attention; items 0-5 sit next to users 0-5 (small residuals,
    # where the rewrite cancels).
    I = 100
    params, _ = make(12, I, 7, 37, 6, torch.float32, seed=15, scale=scale)
    users = torch.arange(6, device=DEVICE)
    params[1][:6] = params[0][:6] * (1 + 1e-3)
    keys, drop = TK.screen_launch(*params, users, 60, None, distance, 1e-3)
    full = keys != TK._MAXKEY
    assert (drop == TK._MAXKEY).all() and (full.sum(1) == I).all()
    ids = torch.where(full, keys & 0xFFFFFFFF, -1)
    assert (ids.sort(1).values[:, -I:] == torch.arange(I)).all()
    lo = (keys >> 32).to(torch.int32).view(torch.float32).double()[full]
    exact = TK.rescore_launch(*params, users, ids, distance, 1e-3).double()[full]
    assert (lo <= exact).all(), (exact - lo).min()
    if scale > 1:
        return  # ‖p‖ ≈ 9 and peaked attention: valid, but (by design) loose
    # Not vacuous: the bound is within a few screening units of the exact value.
    unit = TK.SCREEN_UNIT
    assert ((exact - lo) <= 100 * unit * (1 + exact)).all(), ((exact - lo) / (1 + exact)).max()
    assert ((exact - lo) / (1 + exact)).max() > unit / 64  # and it is the screen that is rounded


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_rescore_is_the_direct_distance_in_the_compute_dtype(monkeypatch, dtype):
    # The re-score (the distance kernels' pair forward) gives fp32 for fp16/fp32 and fp64 for
    # fp64, with IEEE dots whatever torch's fp32 matmul precision (the interpreter ignores the
    # dot precision, so the launch is checked); an empty slot (-1) is finite.
    TD = importlib.import_module("lrml_kernels.triton.distance_kernels")
    kernel, precisions = TD._lrml_pair_forward_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                precisions.append(kwargs["DOT_PREC"])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(TD, "_lrml_pair_forward_kernel", Spy())
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    params, users = make(9, 40, 7, 37, 5, dtype, seed=17)
    full = brute_distances(params, users, "l2")
    ids = torch.randint(0, 40, (5, 32), generator=torch.Generator().manual_seed(18))
    ids[:, -3:] = -1
    got = TK.rescore_launch(*params, users, ids.to(DEVICE), "l2", 1e-3)
    assert precisions == ["ieee"]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(got).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    ok = ids >= 0
    expect = full.gather(1, ids.clamp(min=0))[ok]
    torch.testing.assert_close(got.double().cpu()[ok], expect, rtol=tol, atol=tol)


def planted_near_ties(dtype, copies, spread, seed=21, k=10):
    """One user; ``copies`` items near its k-th nearest item q, invisible to the screen.

    Each copy is ``q + spread·‖q‖·v`` with a unit ``v`` orthogonal to q and to the rows of M (so
    ‖q‖ and Mq do not move to first order) and far below the tf32/bf16 resolution of q: the
    screen sees the same item every time, while the exact distances differ by ~spread. Every
    seventh copy is exact (an exact tie with q, broken by id).
    """
    I, d, N = 160, 37, 7
    params, users = make(4, I, N, d, 1, seed=seed)
    users[:] = 0
    Q, M = params[1], params[3]
    base = int(torch.argsort(brute_distances(params, users, "l2")[0])[k - 1])
    span = torch.cat([Q[base : base + 1], M]).T.cpu()  # [d, N + 1]
    ortho = torch.linalg.qr(span, mode="complete").Q[:, N + 1 :]  # [d, d - N - 1]
    g = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(I, generator=g)
    slots = slots[slots != base][:copies]
    for c, i in enumerate(slots.tolist()):
        v = ortho @ torch.randn(d - N - 1, generator=g, dtype=torch.float64)
        step = (c % 7 - 3) * spread * Q[base].norm() / v.norm()
        Q[i] = Q[base] + step * v.to(DEVICE)
    return [x.to(dtype) for x in params], users, slots


@pytest.mark.parametrize(
    ("dtype", "spread", "tol"), [(torch.float64, 1e-6, 1e-9), (torch.float32, 2e-4, 1e-6)]
)
@pytest.mark.parametrize("copies", [12, 70])
def test_planted_near_ties_at_the_boundary(dtype, spread, tol, copies):
    params, users, slots = planted_near_ties(dtype, copies, spread)
    users = users.repeat(2)  # row 1: the same user with its nearest item and two copies excluded
    full = brute_distances(params, users, "l2")
    gone = sorted([int(full[1].argmin()), *slots[:2].tolist()])
    mask = torch.zeros(full.shape, dtype=torch.bool)
    mask[1, gone] = True
    exclude = (torch.tensor([0, 0, 3], device=DEVICE), torch.tensor(gone, device=DEVICE))
    dist, ids = T.topk(*params, users, 10, exclude, "l2", 1e-3)
    check_topk(dist, ids, full, mask, 10, tol)
    # Distinct exact distances closer to the k-th than the tf32 screening error (~1e-3 relative).
    dk = full[0].sort().values[9]
    assert full[0][(full[0] - dk).abs() < 2e-3 * dk].unique().numel() >= 3
    assert set(ids[0].tolist()) & set(slots.tolist())  # the planted items are in play
    if copies > TK.candidates_for(10):
        assert TK.last_stats["fallback"] == 2  # more near-ties than candidates: certified exact
    else:
        assert TK.last_stats["fallback"] == 0


def test_fallback_users_keep_their_own_exclusions():
    # The planted user 0 fails the certificate (more near-ties than candidates) in rows 1 and 3
    # of 4, between certified rows: the direct path's exclusions must be rows 1 and 3's own
    # (the failed rows' slice of the CSR), not the first two rows'.
    params, users, slots = planted_near_ties(torch.float64, 70, 1e-6)
    users = torch.tensor([1, 0, 2, 0], device=DEVICE)
    full = brute_distances(params, users, "l2")
    near = full[1].argsort()[:3].tolist()
    rows = [sorted(full[0].argsort()[:4].tolist()), sorted([near[0], *slots[:2].tolist()]),
            sorted(full[2].argsort()[:5].tolist()), sorted(near[1:])]  # fmt: skip
    mask = torch.zeros(full.shape, dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, row] = True
    indptr = torch.tensor([0, *torch.tensor([len(r) for r in rows]).cumsum(0).tolist()])
    exclude = (indptr.to(DEVICE), torch.tensor(sum(rows, []), device=DEVICE))
    dist, ids = T.topk(*params, users, 10, exclude, "l2", 1e-3)
    assert TK.last_stats == {"screened": 2, "fallback": 2}
    check_topk(dist, ids, full, mask, 10, 1e-9)


@pytest.mark.parametrize("k", [5, 200], ids=["screened", "direct"])
def test_unchecked_exclusions_outside_the_catalogue_are_ignored(k):
    """With ``validate=False`` the exclusion indices are not checked: one outside ``[0, I)`` is
    ignored on both paths (the screen's bitmask drops it). Before, the direct path (k = 200:
    beyond the screen's candidate lists) scattered it into its id block: I + 3 raised an
    IndexError (on CUDA a device-side assert) and -1 excluded the last item, I - 1."""
    params, users = make(3, 20, 4, 8, 3)
    valid = (torch.tensor([0, 1, 2, 2]), torch.tensor([5, 3]))
    bad = (torch.tensor([0, 2, 3, 5]), torch.tensor([-1, 5, 3, 19 + 4, -7]))
    want = lk.lrml_topk(*params, users, k, exclude=tuple(t.to(DEVICE) for t in valid),
                        backend="triton")  # fmt: skip
    got = lk.lrml_topk(*params, users, k, exclude=tuple(t.to(DEVICE) for t in bad),
                       backend="triton", validate=False)  # fmt: skip
    assert TK.last_stats["fallback"] == (3 if k == 200 else 0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (got[1][2, : min(k, 20)] >= 0).all()  # row 2 excludes nothing: item 19 included


def test_near_tie_test_fails_without_the_error_bound(monkeypatch):
    # The screen's own values as lower bounds (no margin) and no certificate: the planted
    # boundary comes out in the screen's order (by id), which the check must reject.
    monkeypatch.setattr(TK, "BOUND_SCALE", 0.0)
    monkeypatch.setattr(TK, "CERTIFY", False)
    params, users, _ = planted_near_ties(torch.float64, 70, 1e-6)
    full = brute_distances(params, users, "l2")
    dist, ids = T.topk(*params, users, 10, None, "l2", 1e-3)
    with pytest.raises(AssertionError):
        check_topk(dist, ids, full, None, 10, 1e-9)


def test_full_protocol_evaluation_runs_on_the_screened_topk():
    # lk.evaluate(protocol="full") goes through the model's backend lrml_topk: the triton
    # backend's ranks equal the torch reference's (the distances here are far from ties).
    from types import SimpleNamespace

    from lrml_kernels.metrics import full_ranks

    torch.manual_seed(0)
    U, I = 30, 90
    model = lk.LRML(U, I, 16, 5, backend="triton")
    g = torch.Generator().manual_seed(3)
    train = (torch.rand(U, I, generator=g) < 0.2).nonzero()
    indptr = torch.searchsorted(train[:, 0], torch.arange(U + 1))
    test_items = torch.randint(0, I, (U,), generator=g)
    split = SimpleNamespace(
        test_users=torch.arange(U).numpy(),
        test_items=test_items.numpy(),
        train_csr=lambda: (indptr.numpy(), train[:, 1].numpy()),
    )
    ranks = full_ranks(model, split, k=10)
    assert TK.last_stats["screened"] == U
    model.backend = "torch"
    assert torch.equal(ranks, full_ranks(model, split, k=10))
    assert 0 < ranks.lt(10).sum() < U


def test_shapes_beyond_the_screen_take_the_direct_path():
    params, users = make(4, 20, 3, 600, 2, seed=41)
    assert not TK.screen_fits(3, 600, "l2") and TK.screen_fits(20, 100, "l1")
    dist, ids = T.topk(*params, users, 5, None, "l2", 1e-3)
    assert TK.last_stats == {"screened": 0, "fallback": 2}
    check_topk(dist, ids, brute_distances(params, users, "l2"), None, 5, 1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
def test_direct_chunks_beyond_shared_memory_take_the_pair_forward(monkeypatch, distance):
    # The direct kernel holds d and N whole: at N = 200 (d = 100) its tiles would need ~295 KB
    # of shared memory on sm_90 (227 KB allowed), so such chunks take the pair forward kernels,
    # as do catalogues of more item tiles than a grid's second axis holds.
    assert TK.direct_fits(20, 100, torch.float32) and not TK.direct_fits(200, 100, torch.float32)
    assert not TK.direct_fits(20, 256, torch.float64)
    params, users = make(9, 50, 6, 37, 4, seed=43)
    direct = TK.chunk_distances(*params, users, distance, 1e-3)
    with monkeypatch.context() as m:  # more item tiles than a grid's second axis holds
        m.setattr(TK, "MAX_GRID_AXIS1", 0)
        m.setattr(TK, "_direct_kernel", None)  # (not launched)
        tiled_out = TK.chunk_distances(*params, users, distance, 1e-3)
    torch.testing.assert_close(tiled_out, direct, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(TK, "direct_fits", lambda N, d, dtype: False)
    paired = TK.chunk_distances(*params, users, distance, 1e-3)
    torch.testing.assert_close(paired, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(paired, brute_distances(params, users, distance), rtol=1e-12,
                               atol=1e-12)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("distance", DISTANCES)
def test_gpu_netflix_items_screened_is_exact(distance):
    # Netflix catalogue (17,770 items, d = 100, N = 20), unit-ball embeddings, ~50 exclusions per
    # user: the screened answer is the direct formula's; the fallback rate is printed.
    B, I = 2048, 17770
    params, users = make(50_000, I, 20, 100, B, torch.float32, seed=31, scale=0.1)
    exclude, mask = random_exclude(B, I, seed=32, p=50 / I)
    dist, ids = T.topk(*params, users, 10, exclude, distance, 1e-3)
    stats = dict(TK.last_stats)
    print(f"{distance}: {stats}")
    assert stats["fallback"] < B // 10
    full = TK.chunk_distances(*params, users, distance, 1e-3).double().cpu()  # direct formula
    check_topk(dist, ids, full, mask, 10, 1e-6)


def test_the_screen_is_tf32_at_every_fp32_matmul_precision():
    # "medium" too: bf16 screening operands widened the bound 8x and sent nearly every
    # Netflix-shaped user to the direct path, so the screen's bounds do not follow the flag
    params, _ = make(12, 100, 7, 37, 6, torch.float32, seed=15, scale=0.3)
    users = torch.arange(6, device=DEVICE)
    got = []
    for precision in ("highest", "high", "medium"):
        with using_fp32_matmul_precision(precision):
            got.append(TK.screen_launch(*params, users, 60, None, "l2", 1e-3))
    for keys, drop in got[1:]:
        assert torch.equal(keys, got[0][0]) and torch.equal(drop, got[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_select_ranks_nan_of_either_sign_last(dtype):
    # fp32 selects by the distance's bits: a NaN with its sign bit set (x86 makes such NaNs) is a
    # negative int32 and sorted first; NaN ranks after every number and +inf, before empty slots
    dist = torch.tensor([[0.5, float("nan"), 0.2, float("inf"), float("nan"), 0.9]], dtype=dtype)
    dist[0, 1] = -dist[0, 1].abs()
    assert torch.signbit(dist[0, 1])
    ids = torch.tensor([[0, 1, 2, 3, 4, -1]])
    d, i = TK._select(dist.to(DEVICE), ids.to(DEVICE), 6)
    assert i.tolist() == [[2, 0, 3, 1, 4, -1]]
    assert d[0, :3].tolist() == torch.tensor([0.2, 0.5, float("inf")], dtype=dtype).tolist()
    assert torch.isnan(d[0, 3:5]).all() and d[0, 5] == float("inf")


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("k", [5, 299, 300])
def test_nan_items_and_users_rank_last_as_the_reference(distance, k):
    # a NaN item after every number, a NaN user's items in id order (SPEC "Top-k"); k = 300 is
    # the whole catalogue (the direct path), k = 5 the screen
    (P, Q, K, M), _ = make(3, 300, 3, 6, 1, dtype=torch.float32, seed=13)
    Q[3] = float("nan")
    P[2] = -torch.tensor(float("nan"))
    users = torch.arange(3, device=DEVICE)
    dist, ids = lk.lrml_topk(P, Q, K, M, users, k, distance=distance, backend="triton")
    d2, i2 = lk.lrml_topk(P, Q, K, M, users, k, distance=distance, backend="torch")
    assert torch.equal(ids, i2)
    torch.testing.assert_close(dist, d2, equal_nan=True)
    assert torch.equal(ids[2].cpu(), torch.arange(k)) and torch.isnan(dist[2]).all()
    assert not torch.isnan(dist[:2, : min(k, 299)]).any()
