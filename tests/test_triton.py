"""The triton backend of lrml_distances / lrml_hinge_loss against the reference (SPEC.md).

On a machine without a GPU, conftest sets TRITON_INTERPRET=1 and everything runs on CPU tensors
through the Triton interpreter (slow: shapes are a pairwise covering set, not a product).
Comparisons with the reference go through tests/_tolerance.py (float64 reference of the same
rounded inputs, error bounds from unit roundoff); assert_close_scaled compares two runs of
the triton backend with each other.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _tolerance import assert_matches, check_backend, reference_with_bounds

import lrml_kernels as lk
from lrml_kernels import reference
from lrml_kernels.precision import using_fp32_matmul_precision

triton = pytest.importorskip("triton")
T = importlib.import_module("lrml_kernels.triton")
TD = importlib.import_module("lrml_kernels.triton.distance_kernels")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DISTANCES = ("l2", "squared_l2", "l1")
RELATIONS = ("pair", "shared")

# All pairs of (d, N, B, C, relation, distance, dtype, index dtype) values in 16 cases.
CASES = [
    (1, 7, 1, 1, "pair", "l2", "float64", "int32"),
    (1, 1, 37, 2, "shared", "squared_l2", "float32", "int64"),
    (37, 20, 1023, 13, "pair", "l1", "float64", "int64"),
    (100, 20, 1, 1, "shared", "l1", "float32", "int32"),
    (128, 7, 37, 13, "pair", "squared_l2", "float32", "int32"),
    (128, 1, 1023, 2, "shared", "l2", "float64", "int32"),
    (37, 7, 1, 2, "shared", "l2", "float32", "int64"),
    (100, 1, 37, 1, "pair", "squared_l2", "float64", "int64"),
    (37, 1, 1, 13, "shared", "squared_l2", "float32", "int32"),
    (128, 20, 37, 2, "pair", "l1", "float64", "int64"),
    (1, 20, 1023, 1, "shared", "squared_l2", "float32", "int32"),
    (100, 20, 37, 13, "shared", "l2", "float32", "int64"),
    (100, 7, 1023, 2, "shared", "l1", "float64", "int64"),
    (1, 1, 1, 13, "shared", "l1", "float32", "int32"),
    (128, 20, 1, 1, "shared", "l1", "float64", "int64"),
    (37, 7, 37, 1, "pair", "l2", "float32", "int64"),
]


def make_inputs(U, I, N, d, B, C, dtype=torch.float64, idx_dtype=torch.int64, scale=1.0, seed=0):
    """Parameters with std ``scale / sqrt(d)``-ish and indices drawn with repeats."""
    g = torch.Generator().manual_seed(seed)
    params = [
        (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
        for n in (U, I, N, N)
    ]
    users = torch.randint(0, U, (B,), generator=g).to(idx_dtype).to(DEVICE)
    items = torch.randint(0, I, (B, C), generator=g).to(idx_dtype).to(DEVICE)
    return params, users, items


def tolerances(dtype):
    return {
        torch.float64: {"rtol": 1e-8, "atol": 1e-8},
        torch.float32: {"rtol": 2e-4, "atol": 2e-4},
        torch.float16: {"rtol": 2e-2, "atol": 2e-2},
        torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
    }[dtype]


def assert_close_scaled(actual, expected, dtype, what=""):
    """assert_close with atol relative to the size of the expected values (sums over batches)."""
    tol = tolerances(dtype)
    expected = expected.to(actual.dtype)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}"
    )


def run_loss(backend, params, users, items, **kw):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    loss = lk.lrml_hinge_loss(*leaves, users, items, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), [p.grad for p in leaves]


def run_distances(backend, params, users, items, **kw):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    D = lk.lrml_distances(*leaves, users, items, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D.shape, generator=g, dtype=torch.float64).to(D.dtype).to(D.device)
    (D * w).sum().backward()
    return D.detach(), [p.grad for p in leaves]


@pytest.mark.parametrize("d, N, B, C, relation, distance, dtype, idx", CASES)
def test_hinge_and_distances_match_reference(d, N, B, C, relation, distance, dtype, idx):
    dtype, idx = getattr(torch, dtype), getattr(torch, idx)
    U, I = max(1, B // 3), max(2, 2 * C)  # few rows: indices repeat
    params, users, items = make_inputs(U, I, N, d, B, C, dtype, idx, scale=0.5)
    check_backend("triton", params, users, items, distance=distance, relation=relation, margin=0.7)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(reduction):
    params, users, items = make_inputs(7, 9, 5, 13, 20, 4, scale=0.3)
    kw = {"reduction": reduction, "margin": 1.0}
    check_backend("triton", params, users, items, ops=("hinge",), **kw)


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_large_logits_do_not_overflow(relation, distance):
    # |s·K| reaches thousands: exp() of the raw logits overflows fp32 (and fp64 beyond ~709).
    params, users, items = make_inputs(6, 8, 7, 40, 9, 3, torch.float32, scale=4.0)
    z = (params[0][users] * params[1][items[:, 0]]) @ params[2].T
    assert float(z.abs().max()) > 800
    kw = {"distance": distance, "relation": relation, "margin": 1e4}  # every hinge active
    check_backend("triton", params, users, items, **kw)  # NaN/inf fail the bound


def test_l1_sign_at_zero_and_hinge_at_zero():
    # e = 0 exactly: q = p, M = 0 (r = 0). The l1 gradient of |x| at 0 is 0, as in torch.
    params, users, items = make_inputs(3, 3, 2, 5, 4, 2)
    params[1] = params[0].clone()
    params[3] = torch.zeros_like(params[3])
    items = users[:, None].repeat(1, 2)
    # kinks=False: sign(0) = 0 is compared, not excluded
    check_backend("triton", params, users, items, ops=("distances",), distance="l1", kinks=False)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("relation", RELATIONS)
def test_hinge_loss_grads_per_row(reduction, relation):
    params, users, items = make_inputs(5, 6, 7, 19, 11, 4, scale=0.4)
    P, Q, K, M = params
    loss, gp, gq, gK, gM = T.hinge_loss_grads(
        P, Q, K, M, users, items, 0.8, "l2", relation, 1e-3, reduction
    )
    ref = reference_with_bounds(
        params, users, items, op="hinge", margin=0.8, relation=relation, reduction=reduction
    )
    assert gp.shape == (11, 19) and gq.shape == (11, 4, 19)
    assert all(t.dtype == torch.float64 for t in (gp, gq, gK, gM))
    assert_matches("hinge_loss_grads", ref, loss, [None, None, gK, gM], (gp, gq))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("relation", RELATIONS)
def test_float_arguments_are_typed_as_on_the_gpu(gpu_scalar_args, relation, dtype):
    # A compiled launch types a Python float argument fp32 unless the kernel annotates it (the
    # interpreter keeps the double): eps, margin and the mean's 1/B must reach the fp64 kernels
    # unrounded, or D, the loss and every gradient are off by ~1e-8 relative on the GPU; and an
    # fp64 argument must not promote the fp32 kernels' tiles (tl.dot of fp64 and fp32 fails).
    params, users, items = make_inputs(5, 6, 7, 19, 11, 4, dtype, scale=0.4)
    kw = {"relation": relation, "margin": 0.3, "eps": 0.1}
    check_backend("triton", params, users, items, reduction="mean", **kw)
    P, Q, K, M = params
    loss, gp, gq, gK, gM = T.hinge_loss_grads(
        P, Q, K, M, users, items, 0.3, "l2", relation, 0.1, "mean"
    )
    ref = reference_with_bounds(params, users, items, op="hinge", reduction="mean", **kw)
    assert_matches("hinge_loss_grads", ref, loss, [None, None, gK, gM], (gp, gq))


def test_fp16_forward_and_backward():
    params, users, items = make_inputs(9, 11, 7, 37, 23, 3, torch.float16, scale=0.5)
    for relation in RELATIONS:
        check_backend("triton", params, users, items, relation=relation)


@pytest.mark.parametrize("distance", DISTANCES)
def test_bf16_forward_and_backward(distance):
    # bf16 tables are loaded, converted to fp32, computed in fp32 and stored back. The
    # interpreter holds bf16 as raw 16-bit integers: it converts them exactly, but arithmetic
    # on them would be integer arithmetic, so this also fails where a kernel computes on a
    # bf16 value before converting it (the GPU's bf16 numerics are the GPU tests' to check).
    params, users, items = make_inputs(9, 11, 7, 37, 23, 3, torch.bfloat16, scale=0.5)
    for relation in RELATIONS:
        check_backend("triton", params, users, items, distance=distance, relation=relation)


def test_bf16_dots_are_tf32_whatever_the_fp32_matmul_precision():
    # bf16 parameters: tf32 operands (tensor cores); fp16 and fp64 IEEE; fp32 follows the flag.
    for flag, fp32 in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        with using_fp32_matmul_precision(flag):
            got = {dt: TD._dot_precision(dt) for dt in (torch.bfloat16, torch.float16)}
            assert got == {torch.bfloat16: "tf32", torch.float16: "ieee"}, flag
            assert TD._dot_precision(torch.float32) == fp32, flag
            assert TD._dot_precision(torch.float64) == "ieee", flag


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_tf32_dots_within_their_error_bound(tensor_core_tf32, distance, relation):
    # The tolerance model of the GPU's tf32 runs (fp32 at matmul precision "high", and every
    # bf16 model: _tolerance.TF32_ROUNDOFF) against the kernels with truncated operands, at the
    # shape of the GPU matrix's tf32 cases; the IEEE bound must be too tight for them.
    params, users, items = make_inputs(80, 300, 20, 100, 257, 5, torch.float32, scale=0.3)
    op = ("hinge",) if relation == "pair" else ("distances",)
    kw = dict(ops=op, distance=distance, relation=relation)
    check_backend("triton", params, users, items, tf32=True, **kw)
    assert tensor_core_tf32["tf32 dots"] > 0
    with pytest.raises(AssertionError, match="beyond the bound"):
        check_backend("triton", params, users, items, tf32=False, **kw)


# bf16 and tf32 on the GPU: tests/test_gpu_matrix.py (every distance and relation, at the shape
# of the first H200 run's test_bf16_gpu / test_tf32_gpu). test_bf16_gpu failed there because
# it compared with the torch backend in bf16, which rounds D to bf16 before the hinge: terms within
# a bf16 ulp of D of the kink (l1: D ~ 30) took the other side, each a whole pair's gradient.


@pytest.mark.gpu
def test_fp32_ieee_gpu_large_batch():
    params, users, items = make_inputs(4000, 3000, 20, 100, 4096, 5, torch.float32, scale=0.2)
    for relation in RELATIONS:
        check_backend("triton", params, users, items, relation=relation, ops=("hinge",))


def test_sparse_grad_equals_dense():
    params, users, items = make_inputs(6, 7, 5, 11, 15, 3, scale=0.5)
    for fn in (lk.lrml_hinge_loss, lk.lrml_distances):
        grads = {}
        for sparse in (False, True):
            leaves = [p.detach().clone().requires_grad_() for p in params]
            fn(*leaves, users, items, backend="triton", sparse_grad=sparse).sum().backward()
            grads[sparse] = [p.grad for p in leaves]
        assert grads[True][0].is_sparse and grads[True][1].is_sparse
        assert not grads[True][2].is_sparse and not grads[True][3].is_sparse
        for dense, sp in zip(grads[False], grads[True], strict=True):
            torch.testing.assert_close(sp.to_dense() if sp.is_sparse else sp, dense)


def test_sparse_grad_with_sparse_optimizer():
    torch.manual_seed(0)
    model = lk.LRML(20, 15, dim=8, memory_slots=3, sparse=True, backend="triton")
    dense_params = [model.keys, model.memory]
    opt_sparse = torch.optim.SparseAdam([model.user_emb, model.item_emb], lr=1e-2)
    opt_dense = torch.optim.Adam(dense_params, lr=1e-2)
    before = model.user_emb.detach().clone()
    users = torch.randint(0, 20, (8,), device=DEVICE)
    items = torch.randint(0, 15, (8, 3), device=DEVICE)
    model.to(DEVICE)
    loss = model(users.to(DEVICE), items.to(DEVICE))
    loss.backward()
    assert model.user_emb.grad.is_sparse
    opt_sparse.step()
    opt_dense.step()
    changed = (model.user_emb.detach().cpu() != before.cpu()).any(1)
    assert changed[users.cpu()].all() and int(changed.sum()) == len(set(users.tolist()))


def test_determinism_bitwise():
    params, users, items = make_inputs(30, 40, 20, 100, 600, 5, torch.float32, scale=0.3)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_loss("triton", params, users, items) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    (l1, g1), (l2, g2) = runs
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows", [16, TD.WIDE_BLOCK_B])
@pytest.mark.parametrize("relation", RELATIONS)
def test_gpu_tiling_matches_one_block(relation, rows):
    # The GPU configurations' structure through the interpreter: d in several chunks, 16-row
    # blocks (64 for tensor-core dots at large batches), a partial last block, fewer backward
    # programs than row blocks (each sums several into its keys/memory partials), against the
    # interpreter's one-chunk, one-block configuration.
    params, users, items = make_inputs(10, 12, 7, 37, 150, 3, scale=0.5)
    P, Q, K, M = params
    tiled = {"BLOCK_B": rows, "BLOCK_N": 16, "BLOCK_DC": 16, "programs": 2}
    W = torch.rand(150, dtype=torch.float64, device=DEVICE)
    for distance in DISTANCES:
        kw = {"distance": distance, "relation": relation, "eps": 1e-3}
        got, want = (
            TD.forward_launch(P, Q, K, M, users, items, margin=0.7, hinge=True, config=cfg, **kw)
            for cfg in (tiled, None)
        )
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        G = want[2]
        got, want = (
            TD.backward_launch(P, Q, K, M, users, items, G, W, 0.5, config=cfg, **kw)
            for cfg in (tiled, None)
        )
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relation", RELATIONS)
def test_backward_takes_l2_distances_from_the_forward(relation):
    # With the forward's D the l2 backward skips its own distance pass: the same gradients (up
    # to the order of D's sum), every gradient linear in 1 / D (twice D: half of each), and
    # the other distances ignore D.
    params, users, items = make_inputs(10, 12, 7, 37, 50, 3, scale=0.5)
    W = torch.rand(50, dtype=torch.float64, device=DEVICE)
    for distance in DISTANCES:
        kw = {"distance": distance, "relation": relation, "eps": 1e-3}
        D, _, G = TD.forward_launch(*params, users, items, margin=0.7, hinge=True, **kw)
        want = TD.backward_launch(*params, users, items, G, W, 0.5, **kw)
        got = TD.backward_launch(*params, users, items, G, W, 0.5, D=D, **kw)
        doubled = TD.backward_launch(*params, users, items, G, W, 0.5, D=2 * D, **kw)
        for a, b, c in zip(got, want, doubled, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            if distance == "l2":
                torch.testing.assert_close(c, 0.5 * b, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(c, b)


def test_out_of_range_indices_are_masked_not_read():
    # validate=False skips the range check: the kernels clamp-and-mask (reads a zero row).
    params, users, items = make_inputs(4, 5, 3, 6, 3, 2)
    users = torch.tensor([0, 1 << 40, -3], device=DEVICE)
    items = torch.tensor([[0, 1], [4, 10**9], [-1, 2]], device=DEVICE)
    D = lk.lrml_distances(*params, users, items, backend="triton", validate=False)
    zero = torch.zeros_like(params[0][:1])
    P = torch.cat([params[0], zero])
    Q = torch.cat([params[1], zero])
    safe_u = torch.where((users >= 0) & (users < 4), users, 4)
    safe_i = torch.where((items >= 0) & (items < 5), items, 5)
    ref = reference.lrml_distances(P, Q, params[2], params[3], safe_u, safe_i)
    assert_close_scaled(D, ref, torch.float64)


def test_noncontiguous_inputs():
    params, users, items = make_inputs(8, 9, 5, 20, 10, 6)
    nc = [p.t().contiguous().t() for p in params]  # column-major views, same values
    assert not nc[0].is_contiguous()
    items_nc = items.t().contiguous().t()
    check_backend("triton", nc, users, items_nc, ops=("hinge",))


def test_opcheck_registered_ops():
    params, users, items = make_inputs(5, 6, 3, 7, 4, 3, torch.float32)
    P, Q, K, M = [p.requires_grad_() for p in params]
    ops = torch.ops.lrml_triton
    for relation in RELATIONS:
        base = (P, Q, K, M, users, items)
        torch.library.opcheck(ops.distances_fwd.default, (*base, "l2", relation, 1e-3, False))
        torch.library.opcheck(ops.hinge_fwd.default, (*base, 0.5, "l1", relation, 1e-3, False))
        _, _, G = TD.forward_launch(
            *(t.detach() for t in (P, Q, K, M)), users, items, distance="l2", relation=relation,
            eps=1e-3, hinge=True,
        )  # fmt: skip
        plain = (*(t.detach() for t in (P, Q, K, M)), users, items, G)
        W = torch.rand(users.shape[0], device=DEVICE)
        for w in (None, W):
            torch.library.opcheck(ops.backward.default, (*plain, w, "l2", relation, 1e-3))


def _compiled_loss_matches(loss_fn, params, users, items, backend="aot_eager"):
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    loss = compiled(*leaves, users, items)
    loss.backward()
    ref = reference_with_bounds(params, users, items, op="hinge", reduction="mean")
    assert_matches("compiled", ref, loss.detach(), [p.grad for p in leaves])


def test_torch_compile_fullgraph_backend_function():
    params, users, items = make_inputs(12, 14, 5, 16, 10, 4, torch.float32, scale=0.5)

    def loss_fn(P, Q, K, M, users, items):
        return T.hinge_loss(P, Q, K, M, users, items, 0.5, "l2", "pair", 1e-3, "mean", False)

    _compiled_loss_matches(loss_fn, params, users, items)


def test_torch_compile_fullgraph_public_op():
    params, users, items = make_inputs(12, 14, 5, 16, 10, 4, torch.float32, scale=0.5)

    def loss_fn(P, Q, K, M, users, items):
        return lk.lrml_hinge_loss(P, Q, K, M, users, items, backend="triton", reduction="mean")

    _compiled_loss_matches(loss_fn, params, users, items)


def test_torch_compile_model_inductor():
    torch.manual_seed(0)
    model = lk.LRML(12, 14, dim=16, memory_slots=5, backend="triton").to(DEVICE)
    users = torch.randint(0, 12, (10,), device=DEVICE)
    items = torch.randint(0, 14, (10, 4), device=DEVICE)

    def loss_fn(users, items):
        return model(users, items) * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(users, items)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.backend = "torch"
    ref = loss_fn(users, items)
    ref.backward()
    assert_close_scaled(loss.detach(), ref.detach(), torch.float32)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert_close_scaled(g, p.grad, torch.float32)


def test_training_tracks_reference():
    torch.manual_seed(0)
    models = {
        b: lk.LRML(60, 50, dim=16, memory_slots=5, backend=b).to(DEVICE)
        for b in ("triton", "torch")
    }
    models["torch"].load_state_dict(models["triton"].state_dict())
    opts = {b: torch.optim.Adam(m.parameters(), lr=1e-2) for b, m in models.items()}
    g = torch.Generator().manual_seed(3)
    losses = {b: [] for b in models}
    for _ in range(50):
        users = torch.randint(0, 60, (64,), generator=g).to(DEVICE)
        items = torch.randint(0, 50, (64, 5), generator=g).to(DEVICE)
        for b, m in models.items():
            opts[b].zero_grad()
            loss = m(users, items)
            loss.backward()
            opts[b].step()
            m.project_(users, items)
            losses[b].append(float(loss.detach()))
    assert losses["triton"][-1] < losses["triton"][0]
    torch.testing.assert_close(
        torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), rtol=1e-3, atol=1e-3
    )


def test_backend_interface():
    assert set(T.devices) == {"cuda", "cpu"}
    for fn in ("distances", "hinge_loss", "topk", "hinge_loss_grads"):
        assert callable(getattr(T, fn))
    assert lk.backends.why_unavailable("triton", DEVICE) is None


@pytest.mark.parametrize("op", ["hinge", "distances"])
def test_double_backward_fails_loudly(op):
    # First-order only: differentiating a gradient raises (no silently missing terms).
    (P, Q, K, M), users, items = make_inputs(20, 30, 3, 8, 4, 3, seed=19)
    for t in (P, Q, K, M):
        t.requires_grad_(True)
    f = lk.lrml_hinge_loss if op == "hinge" else lk.lrml_distances
    out = f(P, Q, K, M, users, items, backend="triton").sum()
    (gK,) = torch.autograd.grad(out, K, create_graph=True)
    with pytest.raises(RuntimeError, match="triton backend is differentiable once"):
        gK.sum().backward(retain_graph=True)
    # a gradient penalty through autograd.grad with inputs: every table's path raises too
    for table in (P, Q, K, M):
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(out + (gK**2).sum(), table, retain_graph=True)
    # first-order gradients under create_graph=True are still the plain ones
    (plain,) = torch.autograd.grad(f(P, Q, K, M, users, items, backend="triton").sum(), K)
    assert torch.equal(gK.detach(), plain)
