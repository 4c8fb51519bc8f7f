"""Full-catalogue top-k of the triton backend against brute force (SPEC.md "Ranking all items").

Brute force: the reference distance of every (user, item), excluded items removed, a stable sort
by (distance, item id). Returned distances must match; ids must match wherever the ranking is
unambiguous at the test tolerance, and within exact ties the kernel must order ids ascending.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import reference

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


def test_fp16_topk():
    B, I = 5, 50
    params, users = make(7, I, 7, 24, B, torch.float16)
    dist, ids = T.topk(*params, users, 12, None, "squared_l2", 1e-3)
    assert dist.dtype == torch.float16
    full = brute_distances([p.float() for p in params], users, "squared_l2")
    # Ranking is on the fp16-rounded distances: compare values at fp16 resolution.
    check_topk(dist, ids, full.half().double(), None, 12, 2e-3)


def test_matches_reference_topk_on_random_data():
    params, users = make(20, 300, 20, 100, 11, torch.float64, seed=7)
    exclude, _ = random_exclude(11, 300, seed=8, p=0.1)
    for distance in DISTANCES:
        d1, i1 = T.topk(*params, users, 25, exclude, distance, 1e-3)
        d2, i2 = reference.lrml_topk(*params, users, 25, exclude=exclude, distance=distance)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(d1, d2, rtol=1e-9, atol=1e-9)
