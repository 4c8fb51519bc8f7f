"""The cuda backend's top-k, ``lrml_ext::topk_screened`` (csrc/topk_screened.cpp), on CPU tensors.

The op is written with ATen ops only (GEMM screen, at::topk selection, the pair distances op for
the re-score and the direct path), so the code the cuda backend runs on cuBLAS is run here on the
CPU: against brute-force float64 top-k on odd shapes, with exclusions, duplicate items and
near-ties planted at the k boundary closer than the screening error (SPEC.md "Exact top-k from a
screen", "The GEMM screen (the cuda backend)"); the fallback output says which users the direct
path computed. The GPU test (marked ``gpu``) runs the cuda backend on the Netflix catalogue shape.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from test_extension import check_topk, make, make_exclude

import lrml_kernels as lk
from lrml_kernels import extension, reference
from lrml_kernels.errors import BackendUnavailable
from lrml_kernels.precision import using_fp32_matmul_precision

DISTANCES = ("l2", "squared_l2", "l1")


@pytest.fixture(scope="module")
def ops():
    try:
        extension.backend("cpu")
    except BackendUnavailable as exc:  # CI must build it: fail, don't skip
        pytest.fail(f"the CPU extension did not build: {exc}")
    return torch.ops.lrml_ext


def tables(d, N, B, dtype, *, U, I, seed):
    P, Q, K, M, users, _ = make(d, N, B, 1, dtype, U=U, I=I, seed=seed)
    return (P.detach(), Q.detach().clone(), K.detach(), M.detach()), users


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("k", [1, 13])
@pytest.mark.parametrize("B", [1, 1023])
def test_matches_brute_force(ops, B, k, distance, dtype):
    (P, Q, K, M), users = tables(37, 7, B, dtype, U=200, I=211, seed=B + k)
    Q[5] = Q[17]  # duplicate items: equal distances, the smaller id first
    Q[11] = Q[17]
    indptr, indices = make_exclude(B, 211, seed=3, all_excluded_row=B // 2 if B > 1 else None)
    dist, ids, fallback = ops.topk_screened(
        P, Q, K, M, users, k, indptr, indices, distance, 1e-3, 0
    )
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    check_topk(dist, ids, P, Q, K, M, users, k, (indptr, indices), distance, tol)
    assert dist.dtype == dtype and fallback.shape == (B,) and fallback.dtype == torch.bool
    if distance == "l1":
        assert fallback.all()  # l1 has no rewrite: the direct path
    else:
        assert fallback.float().mean() < 0.05  # random data: the screen certifies nearly all
    if B > 1:
        assert (ids[B // 2] == -1).all() and torch.isinf(dist[B // 2]).all()  # all excluded


@pytest.mark.parametrize("distance", DISTANCES)
def test_k_beyond_the_catalogue_equals_the_cpu_backend(ops, distance):
    (P, Q, K, M), users = tables(37, 7, 23, torch.float64, U=30, I=9, seed=4)
    dist, ids, _ = ops.topk_screened(P, Q, K, M, users, 13, None, None, distance, 1e-3, 0)
    check_topk(dist, ids, P, Q, K, M, users, 13, None, distance, 1e-9)
    assert (ids[:, 9:] == -1).all()
    d2, i2 = ops.topk(P, Q, K, M, users, 13, None, None, distance, 1e-3)
    torch.testing.assert_close(dist, d2, rtol=1e-12, atol=1e-12)
    assert torch.equal(ids, i2)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(("d", "N", "I", "B"), [(1, 1, 1, 3), (1, 1, 40, 5), (2, 3, 17, 0)])
def test_tiny_shapes(ops, d, N, I, B, distance):
    (P, Q, K, M), users = tables(d, N, B, torch.float64, U=4, I=I, seed=10)
    dist, ids, fallback = ops.topk_screened(P, Q, K, M, users, 3, None, None, distance, 1e-3, 0)
    assert dist.shape == ids.shape == (B, 3) and fallback.shape == (B,)
    if B:
        check_topk(dist, ids, P, Q, K, M, users, 3, None, distance, 1e-9)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("k", [5, 299, 300])
def test_nan_distances_rank_last_as_the_reference(ops, distance, dtype, k, device):
    # A NaN item ranks after every number, a NaN user's items come in id order (SPEC "Top-k"):
    # the screen's lower bounds are NaN there, and no NaN may be certified or kept ahead of a
    # number. On CUDA tensors the pair distances are the CUDA kernel's (fmaxf drops NaN).
    if device == "cuda":
        if dtype == torch.float64:
            pytest.skip("the CUDA kernels take fp32, fp16 and bf16")
        extension.backend("cuda")
    (P, Q, K, M), users = tables(6, 3, 3, dtype, U=3, I=300, seed=13)
    Q[3] = -torch.tensor(float("nan"))  # with its sign bit set, as x86 makes NaNs: last too
    P = P.clone()
    P[2] = float("nan")
    P, Q, K, M = (t.to(device) for t in (P, Q, K, M))
    users = torch.arange(3, device=device)
    dist, ids, _ = ops.topk_screened(P, Q, K, M, users, k, None, None, distance, 1e-3, 0)
    d2, i2 = lk.lrml_topk(P, Q, K, M, users, k, distance=distance, backend="torch")
    assert torch.equal(ids, i2)
    torch.testing.assert_close(dist, d2, equal_nan=True)
    assert torch.equal(ids[2].cpu(), torch.arange(k)) and torch.isnan(dist[2]).all()
    assert not torch.isnan(dist[:2, : min(k, 299)]).any()
    if k == 300:
        assert (ids[:2, -1] == 3).all()


def test_certificate_failure_takes_the_direct_path(ops):
    # User 0's nearest item copied into 20 more slots: 21 exact ties. With a candidate list of
    # k = 5 the k-th exact distance equals the smallest dropped lower bound's item's, so the
    # certificate fails and the direct path returns the 5 smallest ids of the 21.
    (P, Q, K, M), users = tables(37, 7, 3, torch.float32, U=3, I=90, seed=5)
    users = torch.tensor([0, 1, 2])
    base = int(brute(P, Q, K, M, users[:1], "l2")[2][0, 0])
    copies = torch.arange(10, 90, 4)
    Q[copies] = Q[base].clone()
    expect = sorted({base, *copies.tolist()})[:5]
    dist, ids, fallback = ops.topk_screened(P, Q, K, M, users, 5, None, None, "l2", 1e-3, 5)
    assert fallback[0] and ids[0].tolist() == expect
    check_topk(dist, ids, P, Q, K, M, users, 5, None, "l2", 2e-4)
    _, ids_default, fallback_default = ops.topk_screened(
        P, Q, K, M, users, 5, None, None, "l2", 1e-3, 0
    )
    assert not fallback_default[0] and torch.equal(ids_default, ids)  # 32 candidates: certified


def planted_near_ties(dtype, copies, spread, seed=21, k=10):
    """One user; ``copies`` items near its k-th nearest item q, invisible to the screen.

    Each copy is ``q + spread·‖q‖·v`` with a unit ``v`` orthogonal to q and to the rows of M (‖q‖
    and Mq do not move to first order) and below the tf32 resolution of q: the screen sees the
    same item every time, the exact distances differ by ~spread. Every seventh copy is an exact
    tie with q, broken by id. (As tests/test_triton_topk.py plants them for the Triton screen.)
    """
    I, d, N = 160, 37, 7
    g = torch.Generator().manual_seed(seed)
    P, Q, K, M = (torch.randn(n, d, generator=g, dtype=torch.float64) * 0.6 for n in (4, I, N, N))
    users = torch.zeros(1, dtype=torch.int64)
    full, _, order = brute(P, Q, K, M, users, "l2")
    base = int(order[0, k - 1])
    span = torch.cat([Q[base : base + 1], M]).T  # [d, N + 1]
    ortho = torch.linalg.qr(span, mode="complete").Q[:, N + 1 :]  # [d, d - N - 1]
    slots = torch.randperm(I, generator=g)
    slots = slots[slots != base][:copies]
    for c, i in enumerate(slots.tolist()):
        v = ortho @ torch.randn(d - N - 1, generator=g, dtype=torch.float64)
        Q[i] = Q[base] + (c % 7 - 3) * spread * Q[base].norm() / v.norm() * v
    return [x.to(dtype) for x in (P, Q, K, M)], users, slots


def brute(P, Q, K, M, users, distance):
    from test_extension import brute_force_topk

    return brute_force_topk(P, Q, K, M, users, 1, None, distance)


@pytest.mark.parametrize(
    ("dtype", "spread", "tol"), [(torch.float64, 1e-6, 1e-9), (torch.float32, 2e-4, 1e-6)]
)
@pytest.mark.parametrize("copies", [12, 70])
@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_planted_near_ties_at_the_boundary(ops, dtype, spread, tol, copies, precision):
    # "medium" float32 matmul precision: the screen rounds its GEMM operands to bf16 instead.
    params, users, slots = planted_near_ties(dtype, copies, spread)
    users = users.repeat(2)  # row 1: the same user, its nearest item and two copies excluded
    full = brute(*params, users, "l2")[0]
    gone = sorted([int(full[1].argmin()), *slots[:2].tolist()])
    indptr, indices = torch.tensor([0, 0, 3]), torch.tensor(gone)
    with using_fp32_matmul_precision(precision):
        dist, ids, fallback = ops.topk_screened(*params, users, 10, indptr, indices, "l2", 1e-3, 0)
    check_topk(dist, ids, *params, users, 10, (indptr, indices), "l2", tol)
    dk = full[0].sort().values[9]  # distinct distances nearer the k-th than the tf32 error
    assert full[0][(full[0] - dk).abs() < 2e-3 * dk].unique().numel() >= 3
    assert set(ids[0].tolist()) & set(slots.tolist())  # the planted items are in play
    # More near-ties than the 32 candidates: not certifiable, recomputed directly. (The bf16
    # screen's bound is 8x wider: there even 12 copies leave too many items within it.)
    if copies > 32:
        assert fallback.all()
    elif precision == "highest":
        assert not fallback.any()


@contextlib.contextmanager
def matmul_fp32_precision(backend, precision):
    """torch 2.9+'s second API: ``torch.backends.<backend>.matmul.fp32_precision``."""
    matmul = getattr(torch.backends, backend).matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = old


@pytest.mark.parametrize(
    ("setting", "bf16"),
    [
        (lambda: using_fp32_matmul_precision("highest"), False),
        (lambda: using_fp32_matmul_precision("high"), False),
        (lambda: using_fp32_matmul_precision("medium"), True),
        (lambda: matmul_fp32_precision("mkldnn", "bf16"), True),
        (lambda: matmul_fp32_precision("cuda", "tf32"), False),
    ],
    ids=["highest", "high", "medium", "onednn-bf16", "cuda-tf32"],
)
def test_the_screen_rounds_to_bf16_where_onednn_may_compute_in_it(ops, setting, bf16):
    # On CPU tensors oneDNN may run an fp32 GEMM in bf16 when its matmul precision is "bf16",
    # which "medium" sets and which torch.backends.mkldnn.matmul.fp32_precision sets alone: the
    # screen then rounds its operands to bf16, whose 8x wider bound certifies no user of random
    # data (the direct path answers, exactly). The op read torch's legacy precision, which
    # raises once the second API has set a backend's ("a mix of the legacy and new APIs"): the
    # cuda backend's top-k failed for a user who set either. (On CUDA tensors cuBLAS computes
    # fp32 GEMMs in fp32 or tf32 at every precision: the screen stays tf32, see the GPU test.)
    (P, Q, K, M), users = tables(37, 7, 64, torch.float32, U=200, I=211, seed=3)
    indptr, indices = make_exclude(64, 211, seed=4)
    with setting():
        dist, ids, fallback = ops.topk_screened(
            P, Q, K, M, users, 10, indptr, indices, "l2", 1e-3, 0
        )
    check_topk(dist, ids, P, Q, K, M, users, 10, (indptr, indices), "l2", 2e-4)
    assert fallback.all() if bf16 else fallback.float().mean() < 0.05


def test_user_chunks_on_the_netflix_catalogue(ops):
    # 17,770 items, N = 20: ~160 users per 1 GiB chunk, so 350 users take three chunks; the
    # answer is the cpu backend's (a different exact algorithm).
    (P, Q, K, M), users = tables(16, 20, 350, torch.float32, U=400, I=17770, seed=6)
    indptr, indices = make_exclude(350, 17770, seed=7)
    dist, ids, fallback = ops.topk_screened(P, Q, K, M, users, 10, indptr, indices, "l2", 1e-3, 0)
    d2, i2 = ops.topk(P, Q, K, M, users, 10, indptr, indices, "l2", 1e-3)
    assert torch.equal(ids, i2)
    torch.testing.assert_close(dist, d2, rtol=1e-6, atol=1e-6)
    assert fallback.sum() <= 3


def test_errors_match_the_topk_op(ops):
    (P, Q, K, M), users = tables(8, 3, 5, torch.float32, U=5, I=6, seed=8)
    cases = [
        ((users, 2, torch.tensor([0, 1]), torch.tensor([0]), "l2"), ValueError, "exclude indptr"),
        (
            (users, 2, torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([99]), "l2"),
            IndexError,
            "exclude indices",
        ),
        ((users, 0, None, None, "l2"), ValueError, "k must be at least 1"),
        ((users, 2, None, None, "cosine"), ValueError, "distance must be one of"),
        ((users + 5, 2, None, None, "l2"), IndexError, "users holds index"),
        ((users.float(), 2, None, None, "l2"), TypeError, "users must hold integer"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.topk(P, Q, K, M, *args, 1e-3)
        with pytest.raises(exc, match=match):
            ops.topk_screened(P, Q, K, M, *args, 1e-3, 0)
    with pytest.raises(TypeError, match="memory"):
        ops.topk_screened(P, Q, K, M.double(), users, 2, None, None, "l2", 1e-3, 0)
    with pytest.raises(ValueError, match="candidates must be 0"):
        ops.topk_screened(P, Q, K, M, users, 4, None, None, "l2", 1e-3, 3)


def test_opcheck(ops):
    (P, Q, K, M), users = tables(37, 7, 9, torch.float64, U=9, I=12, seed=9)
    indptr = torch.tensor([0, 1, 1, 3, 3, 3, 4, 4, 4, 5])
    indices = torch.tensor([2, 0, 5, 1, 3])
    torch.library.opcheck(
        ops.topk_screened.default, (P, Q, K, M, users, 4, indptr, indices, "l2", 1e-3, 0)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("distance", DISTANCES)
def test_gpu_cuda_backend_topk_matches_the_reference(distance):
    # Netflix catalogue (17,770 items, d = 100, N = 20), unit-ball-scale embeddings, ~50
    # exclusions per user: the cuda backend's answer against float64 distances of every item.
    cuda = extension.backend("cuda")
    B, I, k = 1024, 17770, 10
    (P, Q, K, M), users = tables(100, 20, B, torch.float32, U=50_000, I=I, seed=31)
    P, Q, K, M = (t * 0.1 for t in (P, Q, K, M))
    indptr, indices = make_exclude(B, I, seed=32)
    dev = [t.cuda() for t in (P, Q, K, M, users, indptr, indices)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dist, ids = cuda.topk(*dev[:5], k, (dev[5], dev[6]), distance, 1e-3)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    _, _, fallback = torch.ops.lrml_ext.topk_screened(*dev[:5], k, *dev[5:], distance, 1e-3, 0)
    print(f"cuda topk {distance}: {seconds:.3f} s for {B} users, fallback {int(fallback.sum())}")
    if distance != "l1":
        assert fallback.sum() < B // 10
    if distance != "l1" and dev[0].is_cuda:  # (the rehearsal's CPU tensors follow oneDNN)
        with using_fp32_matmul_precision("medium"):  # cuBLAS has no bf16 fp32 GEMM: still tf32
            _, _, fallback = torch.ops.lrml_ext.topk_screened(
                *dev[:5], k, *dev[5:], distance, 1e-3, 0
            )
        assert fallback.sum() < B // 10
    Pd, Qd, Kd, Md = (t.double() for t in dev[:4])
    starts = indptr.tolist()  # host offsets: slicing by CUDA scalars would sync twice per user
    for s in range(0, B, 64):
        u = dev[4][s : s + 64]
        D = reference.all_item_distances(Pd[u], Qd, Kd, Md, distance=distance, rewrite=False)
        for j in range(u.shape[0]):
            b = s + j
            D[j, dev[6][starts[b] : starts[b + 1]]] = float("inf")
        want = D.sort(dim=1).values[:, :k]
        torch.testing.assert_close(dist[s : s + 64].double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(D.gather(1, ids[s : s + 64]), want, rtol=1e-5, atol=1e-6)
    d2, i2 = lk.lrml_topk(*dev[:5], k, exclude=(dev[5], dev[6]), distance=distance, backend="cuda")
    assert torch.equal(i2, ids) and torch.equal(d2, dist)
