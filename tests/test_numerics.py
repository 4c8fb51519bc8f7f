"""Numerical edge cases (issue 8): every backend that runs here against lrml_kernels.reference.

Cases: softmax logits up to ±1e4 (saturated and near-saturated), all-equal logits, N = 1, the l2
distance at e = 0 (finite gradient thanks to eps), l1 at e = 0 (sign(0) = 0), fp16/bf16 parameters
with large norms, and the hinge exactly at the margin (subgradient 0, as torch's relu).

Inputs are built so the values that decide the result are exact in every dtype (integer logits,
integer residuals): a backend may sum in any order and still must agree with the float64
reference of the same rounded inputs within the error bounds of tests/_tolerance.py. Each case
checks the forward and the four parameter gradients (through the hinge loss and through a
weighted sum of the distances), and where it
applies the fused per-row gradients of ``hinge_loss_grads`` (the trainer's path) and top-k.
"""

from __future__ import annotations

import math

import _tolerance
import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import backends, reference

# Small torch ops: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in backends.BACKENDS if backends.why_unavailable(b, DEVICE) is None]
DISTANCES = ("l2", "squared_l2", "l1")
RELATIONS = ("pair", "shared")
TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


def close(actual, expected, dtype, what=""):
    """assert_close with rtol = atol = TOL[dtype], atol scaled by the largest expected value
    (for closed forms and top-k, which the shared helper does not cover)."""
    tol = TOL[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def leaves(params):
    return [p.detach().clone().requires_grad_() for p in params]


def hinge_run(fn, params, users, items, **kw):
    """(loss, grads) of ``fn`` = a backend's lrml_hinge_loss or reference.lrml_hinge_loss."""
    ps = leaves(params)
    loss = fn(*ps, users, items, **kw)
    loss.sum().backward()
    return loss.detach(), [p.grad for p in ps]


def check_backend(backend, params, users, items, *, margin=0.5, kinks=True, **kw):
    """Hinge loss, distances and their gradients of ``backend`` against the float64 reference
    of the same (rounded) parameters, within the error bounds of tests/_tolerance.py; hinge
    terms (and l1 coordinates) within rounding of their kink are excluded and counted, unless
    ``kinks=False`` (inputs built to sit exactly on the kink: subgradient 0 is compared)."""
    return _tolerance.check_backend(backend, params, users, items, margin=margin, kinks=kinks, **kw)


def check_fused_grads(backend, params, users, items, margin, kinks=True, **kw):
    """``hinge_loss_grads`` (the fused trainer's path): loss, per-row gradients and keys/memory
    against the float64 reference, as in :func:`check_backend`."""
    args = (margin, kw.get("distance", "l2"), kw.get("relation", "pair"), kw.get("eps", 1e-3))
    loss, gp, gq, gK, gM = backends.get(backend, params[0].device).hinge_loss_grads(
        *params, users, items, *args, "sum"
    )
    ref = _tolerance.reference_with_bounds(
        params, users, items, op="hinge", margin=margin, kinks=kinks,
        stored_d=backend == "torch", tf32=_tolerance.tf32_dots(backend, params[0].dtype), **kw,
    )  # fmt: skip
    _tolerance.assert_matches(f"{backend} hinge_loss_grads", ref, loss, [None, None, gK, gM],
                              (gp, gq))  # fmt: skip


def to(params, dtype):
    return [p.to(dtype=dtype, device=DEVICE) for p in params]


def idx(*rows):
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


# ----------------------------------------------------------------------------------------------
# Softmax: logits up to ±1e4, all equal, N = 1
# ----------------------------------------------------------------------------------------------


def extreme_logit_inputs(N: int = 6, d: int = 8, top: float = 1e4):
    """Parameters whose attention logits reach ±``top`` exactly (integers: exact in any order).

    p, q have entries ±1, so s = p ⊙ q has entries ±1 and z = K s is an integer sum of integer
    keys. With v the sign pattern of (user 0, item 0): slot 0 has z = +top for that pair and
    −top for item 1 (s = −v); slot 1 the opposite; slot 2 is top − 2 (a softmax that is
    saturated but not one-hot); slot 3 random integers; slot 4 zero; slot 5 equals slot 0 (an
    exact tie at the top).
    """
    g = torch.Generator().manual_seed(3)
    c = top / d
    assert c == int(c)
    P = torch.randint(0, 2, (4, d), generator=g).double() * 2 - 1
    Q = torch.randint(0, 2, (6, d), generator=g).double() * 2 - 1
    Q[0] = P[0]
    Q[1] = -P[0]
    v = P[0] * Q[0]  # all ones
    rows = [c * v, -c * v, c * v, torch.randint(-100, 101, (d,), generator=g).double(), 0 * v]
    rows[2] = rows[2].clone()
    rows[2][0] -= 2  # z = top − 2 for s = v
    rows.append(c * v)
    assert 1 <= N <= len(rows)
    K = torch.stack(rows[:N])
    M = torch.randn(N, d, generator=g, dtype=torch.float64)
    users = idx(0, 0, 1, 2, 3, 0)
    items = idx([0, 1, 2, 3], [1, 0, 4, 5], [2, 2, 0, 1], [3, 4, 5, 0], [5, 1, 1, 1], [0, 0, 1, 1])
    return [P, Q, K, M], users, items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("distance", DISTANCES)
def test_logits_up_to_1e4(backend, dtype, distance):
    params, users, items = extreme_logit_inputs()
    params = to(params, dtype)
    z = (params[0][users][:, None].double() * params[1][items].double()) @ params[2].double().T
    assert float(z.max()) >= 0.99e4 and float(z.min()) <= -0.99e4  # bf16: 1250 -> 1248
    for relation in RELATIONS:
        check_backend(
            backend, params, users, items, distance=distance, relation=relation, margin=1.0
        )
    check_fused_grads(backend, params, users, items, 1.0, distance=distance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_logits_up_to_1e4(backend):
    params, users, _ = extreme_logit_inputs()
    params = to(params, torch.float64)
    for distance in DISTANCES:
        got_d, got_i = lk.lrml_topk(*params, users, 4, distance=distance, backend=backend)
        want_d, want_i = reference.lrml_topk(*params, users, 4, distance=distance)
        assert torch.isfinite(got_d).all()
        close(got_d, want_d, torch.float64, f"{backend} topk {distance}")
        # Ids may differ only inside exact ties (slot 0 and 5 tie, items repeat sign patterns).
        full = reference.lrml_distances(
            *params, users, torch.arange(6, device=DEVICE).expand(len(users), 6), distance=distance
        )
        close(full.gather(1, got_i), want_d, torch.float64, f"{backend} topk ids {distance}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 1e4], ids=["zero", "1e4"])
def test_all_equal_logits_give_uniform_attention(backend, scale):
    # Every key row identical: z_n is the same for every slot (0, or ±1e4 for the large scale),
    # so a = 1/N (N = 5, not a power of two) and r = mean(M) exactly as far as rounding goes.
    params, users, items = extreme_logit_inputs(N=5)
    P, Q, _, M = params
    K = (P[0] * Q[0] * scale / 8).expand(5, 8).clone()
    params = to([P, Q, K, M], torch.float64)
    for distance in DISTANCES:
        for relation in RELATIONS:
            check_backend(backend, params, users, items, distance=distance, relation=relation)
    # Closed form: e = p + mean(M) − q.
    D = lk.lrml_distances(*params, users, items, distance="squared_l2", backend=backend)
    p, q = params[0][users][:, None], params[1][items]
    close(D, ((p + params[3].mean(0) - q) ** 2).sum(-1), torch.float64, "closed form")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_single_memory_slot(backend, dtype):
    # N = 1: a = 1 whatever the logit (here ±1e4 and everything between), r = M[0], and the keys
    # get no gradient at all: gz = a (ga − a ga) = 0 exactly.
    params, users, items = extreme_logit_inputs(N=1)
    params = to(params, dtype)
    for distance in DISTANCES:
        for relation in RELATIONS:
            check_backend(backend, params, users, items, distance=distance, relation=relation)
        _, grads = hinge_run(
            lambda *a, **k: lk.lrml_hinge_loss(*a, backend=backend, **k),
            params,
            users,
            items,
            distance=distance,
            margin=5.0,
        )
        assert torch.count_nonzero(grads[2]) == 0, f"{backend}: keys gradient with N = 1"
        assert torch.count_nonzero(grads[3]) > 0
        p, q = params[0][users][:, None].double(), params[1][items].double()
        e = p + params[3][0].double() - q
        D = lk.lrml_distances(*params, users, items, distance=distance, backend=backend)
        close(D, reference.distance_from_residual(e, distance, 1e-3), dtype, "D with N = 1")


# ----------------------------------------------------------------------------------------------
# Distances at e = 0
# ----------------------------------------------------------------------------------------------


def zero_residual_inputs(dtype, partial: bool = False):
    """Memory M = 0 (so r = 0) and item rows equal to user rows: e = p − q = 0 exactly for the
    pairs (u, u). With ``partial`` some coordinates of some items differ (e has exact zeros
    next to non-zeros)."""
    g = torch.Generator().manual_seed(5)
    U, d, N = 5, 7, 3
    P = torch.randn(U, d, generator=g, dtype=torch.float64)
    Q = P.clone()
    if partial:
        Q[1, :3] += 0.25
        Q[3, 4:] -= 0.5
    K = torch.randn(N, d, generator=g, dtype=torch.float64)
    M = torch.zeros(N, d, dtype=torch.float64)
    users = idx(0, 1, 2, 3, 4, 1)
    items = idx([0, 1, 2], [1, 0, 1], [2, 2, 2], [3, 4, 3], [4, 0, 4], [1, 1, 3])
    return to([P, Q, K, M], dtype), users, items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_l2_at_zero_residual_has_finite_gradient(backend, dtype, distance):
    params, users, items = zero_residual_inputs(dtype)
    for relation in RELATIONS:
        check_backend(
            backend, params, users, items, distance=distance, relation=relation, margin=3.0
        )
    D = lk.lrml_distances(*params, users, items, distance=distance, backend=backend)
    want = math.sqrt(1e-3) if distance == "l2" else 0.0
    zero = items == users[:, None]
    assert zero.any()
    torch.testing.assert_close(D[zero].double(), torch.full_like(D[zero], want).double())
    check_fused_grads(backend, params, users, items, 3.0, distance=distance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("partial", [False, True], ids=["e=0", "some e_j=0"])
def test_l1_at_zero_residual_uses_sign_zero(backend, dtype, partial):
    params, users, items = zero_residual_inputs(dtype, partial)
    for relation in RELATIONS:
        check_backend(
            backend, params, users, items, distance="l1", relation=relation, margin=3.0,
            kinks=False,
        )  # fmt: skip
    check_fused_grads(backend, params, users, items, 3.0, distance="l1", kinks=False)
    # The pair (4, 4) has e = 0 and is the positive of row 4 (its only pair with e = 0): the
    # gradient of D[4, 0] alone w.r.t. user row 4 is sign(0) = 0 in every coordinate, plus the
    # attention path, which M = 0 switches off.
    ps = leaves(params)
    D = lk.lrml_distances(*ps, users, items, distance="l1", backend=backend)
    D[4, 0].backward()
    assert torch.count_nonzero(ps[0].grad) == 0 and torch.count_nonzero(ps[1].grad) == 0


# ----------------------------------------------------------------------------------------------
# Half precision with large norms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
def test_half_precision_with_large_norms(backend, dtype, distance):
    # Rows of norm ~25 (25x the unit ball): ‖e‖² reaches thousands (fp16 still holds the loss),
    # the logits reach hundreds (saturated softmax). Everything is computed in fp32.
    g = torch.Generator().manual_seed(11)
    d, N = 16, 5
    P, Q, K, M = (torch.randn(n, d, generator=g, dtype=torch.float64) * 6 for n in (4, 7, N, N))
    users = idx(0, 1, 2, 3, 2)
    items = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(5)]).to(DEVICE)
    params = to([P, Q, K, M], dtype)
    assert float(params[0].double().norm(dim=1).min()) > 15
    # The margin keeps every hinge argument away from its kink at this precision (a kink
    # within rounding error of the distances would flip the subgradient).
    p64 = [p.double() for p in params]
    D = [
        reference.lrml_distances(*p64, users, items, distance=distance, relation=r)
        for r in RELATIONS
    ]
    # (on the CPU: the H200 run failed here mixing these CUDA distances with CPU margins)
    diffs = torch.cat([(x[:, :1] - x[:, 1:]).flatten() for x in D]).cpu()
    margins = torch.linspace(0, float(diffs.abs().max()), 101, dtype=torch.float64)[1:]
    margin = float(margins[(margins[:, None] + diffs).abs().min(1).values.argmax()])
    assert float((margin + diffs).abs().min()) > 0.01 * float(D[0].max())
    for relation in RELATIONS:
        check_backend(
            backend, params, users, items, distance=distance, relation=relation, margin=margin
        )


@pytest.mark.gpu
@pytest.mark.parametrize("distance", DISTANCES)
def test_triton_bf16_large_norms_gpu(distance):
    test_half_precision_with_large_norms("triton", torch.bfloat16, distance)


# ----------------------------------------------------------------------------------------------
# Hinge exactly at the margin
# ----------------------------------------------------------------------------------------------

# distance -> (eps, margin): with p = 0 and M = 0, D(q) is ‖q‖ (l2 with eps = 0), ‖q‖² or ‖q‖₁.
AT_MARGIN = {"l2": (0.0, 1.0), "squared_l2": (1e-3, 3.0), "l1": (1e-3, 1.0)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # masked lanes
def test_hinge_exactly_at_the_margin(backend, dtype, distance):
    # Items: q0 = (1,0,0,0) the positive (D = 1), q1 = (2,0,0,0) with margin + D0 − D1 = 0
    # exactly (the kink: subgradient 0, as torch.relu), q2 = (3,0,0,0) inactive, and q0 again
    # (margin + 0 > 0: active). All distances are exact integers in every dtype.
    eps, margin = AT_MARGIN[distance]
    d, N = 4, 3
    P = torch.zeros(2, d, dtype=torch.float64)
    Q = torch.zeros(3, d, dtype=torch.float64)
    Q[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(2)
    K = torch.randn(N, d, generator=g, dtype=torch.float64)
    M = torch.zeros(N, d, dtype=torch.float64)
    params = to([P, Q, K, M], dtype)
    users, items = idx(0, 1), idx([0, 1, 2, 0], [0, 0, 1, 2])
    D = reference.lrml_distances(*params, users, items, distance=distance, eps=eps).double()
    args = (margin + D[:, :1] - D[:, 1:]).cpu()
    assert args[0, 0] == 0 and args[0, 1] < 0 and args[0, 2] == margin  # row 0: one active term
    assert args[1, 0] == margin and args[1, 1] == 0 and args[1, 2] < 0  # row 1: one active term
    for relation in RELATIONS:
        kw = {"distance": distance, "relation": relation, "eps": eps}
        check_backend(backend, params, users, items, margin=margin, kinks=False, **kw)
        loss = lk.lrml_hinge_loss(*params, users, items, margin=margin, backend=backend, **kw)
        assert float(loss) == 2 * margin
        check_fused_grads(backend, params, users, items, margin, kinks=False, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_l2_with_eps_zero_at_zero_residual_agrees_with_reference(backend):
    # eps = 0 is allowed; then ∂D/∂e = e / D is 0/0 at e = 0. Not a guarantee of finiteness, but
    # every backend must fail the same way the reference does (NaN in the same gradients).
    params, users, items = zero_residual_inputs(torch.float64)
    kw = {"distance": "l2", "eps": 0.0, "margin": 3.0}
    loss, grads = hinge_run(
        lambda *a, **k: lk.lrml_hinge_loss(*a, backend=backend, **k), params, users, items, **kw
    )
    ref, ref_grads = hinge_run(reference.lrml_hinge_loss, params, users, items, **kw)
    close(loss, ref, torch.float64)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert torch.equal(torch.isfinite(g), torch.isfinite(rg))


# ----------------------------------------------------------------------------------------------
# Non-finite parameters: every backend gives the reference's NaN (and finite values) where it
# gives them
# ----------------------------------------------------------------------------------------------

KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
NONFINITE = {
    "nan": float("nan"),
    "-nan": -float("nan"),  # sign bit set, as x86 arithmetic makes NaNs
    "inf": float("inf"),
    "-inf": float("-inf"),
}


def nonfinite_inputs(table: str, value: str):
    """fp32 parameters with NONFINITE[value] in one coordinate of item 2 (``table="item"``: the
    positive of rows 0 and 3, a negative of row 1; row 2 is clean) or of key 0 (``"key"``)."""
    g = torch.Generator().manual_seed(11)
    U, I, N, d = 4, 10, 3, 5
    P = torch.randn(U, d, generator=g) * 0.5
    Q = torch.randn(I, d, generator=g) * 0.5
    K = torch.randn(N, d, generator=g)
    M = torch.randn(N, d, generator=g) * 0.3
    x = torch.tensor([NONFINITE[value]])
    if value == "-nan":
        x = torch.tensor([float("nan")]).neg()
        assert x.view(torch.int32)[0] < 0
    (Q if table == "item" else K)[2 if table == "item" else 0, 1] = x[0]
    users, items = idx(0, 1, 2, 3), idx([2, 3, 4], [5, 2, 6], [7, 8, 9], [2, 1, 0])
    return to([P, Q, K, M], torch.float32), users, items


def same_nonfinite(actual, expected, what):
    """NaN where ``expected`` has NaN, the same infinities, the finite values within TOL."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN at {a.isnan()} but {e.isnan()}"
    close(a, e, torch.float32, what)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("value", ["nan", "-nan"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_nan_hinge_term_passes_its_gradient_as_the_reference(backend, relation, distance, value):
    # relu(NaN) is NaN and torch's relu backward is 0 only where its argument is <= 0: a hinge
    # term at NaN is active, in the loss and in ∂L/∂D. The kernels gave it 0, so the positive of
    # a row with a NaN negative (item 5), and the negatives of a row whose positive is NaN (items
    # 0, 1), got other finite gradients than the reference; the cpu backend also dropped the
    # pair from the backward, so the user rows, keys and memory stayed finite.
    params, users, items = nonfinite_inputs("item", value)
    kw = {"distance": distance, "relation": relation}
    loss, grads = hinge_run(
        lambda *a, **k: lk.lrml_hinge_loss(*a, backend=backend, **k),
        params, users, items, reduction="none", **kw,
    )  # fmt: skip
    ref, ref_grads = hinge_run(
        reference.lrml_hinge_loss, params, users, items, reduction="none", **kw
    )
    same_nonfinite(loss, ref, "loss")
    for name, g, rg in zip(("P", "Q", "K", "M"), grads, ref_grads, strict=True):
        same_nonfinite(g, rg, f"grad {name}")
    if relation == "pair":  # (shared: the NaN column's relation gradient reaches them all)
        assert ref_grads[1][[0, 1, 5]].isfinite().all() and ref_grads[1][[0, 1, 5]].abs().sum() > 0
    fused = backends.get(backend, params[0].device).hinge_loss_grads(
        *params, users, items, 0.5, distance, relation, 1e-3, "sum"
    )
    ref_fused = backends.TORCH_BACKEND.hinge_loss_grads(
        *params, users, items, 0.5, distance, relation, 1e-3, "sum"
    )
    for name, g, rg in zip(("loss", "P", "Q", "K", "M"), fused, ref_fused, strict=True):
        same_nonfinite(g, rg, f"hinge_loss_grads {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("case", ["item=nan", "item=inf", "key=inf", "key=-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_zero_upstream_gradient_at_a_nonfinite_pair_as_the_reference(
    backend, relation, distance, case
):
    # A zero ∂L/∂D (an inactive hinge term, a zero weight on D) times a NaN or infinite local
    # derivative is NaN in the reference's chain rule (0 · NaN, 0 · inf): at a NaN or ±inf D, or
    # through a non-finite key or memory value. The cpu backend dropped every pair with a zero
    # upstream gradient from its backward and left finite gradients there.
    table, value = case.split("=")
    params, users, items = nonfinite_inputs(table, value)
    kw = {"distance": distance, "relation": relation}
    weights = (torch.arange(items.numel()) % 3).reshape(items.shape).to(params[0])  # zeros too

    def weighted(fn):
        return lambda *a, **k: (fn(*a, **k) * weights).sum()

    for what, fn, ref_fn in (
        ("distances", weighted(lambda *a, **k: lk.lrml_distances(*a, backend=backend, **k)),
         weighted(reference.lrml_distances)),
        ("hinge", lambda *a, **k: lk.lrml_hinge_loss(*a, backend=backend, **k),
         reference.lrml_hinge_loss),
    ):  # fmt: skip
        _, grads = hinge_run(fn, params, users, items, **kw)
        _, ref_grads = hinge_run(ref_fn, params, users, items, **kw)
        for name, g, rg in zip(("P", "Q", "K", "M"), grads, ref_grads, strict=True):
            same_nonfinite(g, rg, f"{what}: grad {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("value", ["inf", "-inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_an_infinite_key_gives_the_reference_key_gradient(backend, relation, value):
    # Every pair here has the infinite logit at -inf (slot 0 gets no attention) or NaN: the
    # reference's key gradient is finite where no pair's is NaN. The triton backward's padding
    # rows (s = 0) had logits 0 · ±inf = NaN, and gK += gzᵀ s summed NaN into every key.
    params, users, items = nonfinite_inputs("key", value)
    kw = {"distance": "l2", "relation": relation}
    _, grads = hinge_run(
        lambda *a, **k: lk.lrml_distances(*a, backend=backend, **k).sum(), params, users, items,
        **kw,
    )  # fmt: skip
    _, ref_grads = hinge_run(
        lambda *a, **k: reference.lrml_distances(*a, **k).sum(), params, users, items, **kw
    )
    for name, g, rg in zip(("P", "Q", "K", "M"), grads, ref_grads, strict=True):
        same_nonfinite(g, rg, f"grad {name}")


def finite_where_the_reference_is(actual, expected, what):
    """Non-finite exactly where ``expected`` is (inf and NaN alike: a backend that scales a
    finite gradient by inf gives ±inf where the reference's chain rule gives NaN), the finite
    values within TOL."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isfinite(), e.isfinite()), f"{what}: finite at {a.isfinite()}"
    close(a.nan_to_num(0.0, 0.0, 0.0), e.nan_to_num(0.0, 0.0, 0.0), torch.float32, what)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_nonfinite_upstream_gradient_reaches_only_the_active_hinge_terms(
    backend, relation, reduction, value
):
    # torch's relu backward is 0 where the hinge term is inactive, whatever the upstream
    # gradient: an inf or NaN row weight (reduction="none") or loss gradient leaves the terms it
    # does not reach at 0. The kernels multiplied the weight into a 0 (0 · inf = NaN): the cpu
    # kernel's positive column of a row with no active term, the C++ fused autograd's scaling of
    # its saved gradients, the triton backward's G · W, so one bad weight on an inactive row made
    # every key and memory gradient NaN.
    g = torch.Generator().manual_seed(5)
    U, I, N, d, B, C = 6, 20, 3, 5, 4, 4
    params = to([torch.randn(n, d, generator=g) for n in (U, I, N, N)], torch.float32)
    # distinct items: a row's positive repeated as its negative cancels exactly at weight 1
    # and is inf − inf = NaN at inf, which a kernel that sums first and scales second keeps at 0
    users, items = idx(0, 1, 2, 3), torch.randperm(I, generator=g)[: B * C].reshape(B, C)
    items = items.to(DEVICE)
    D = reference.lrml_distances(*params, users, items, relation=relation)
    gaps = D[:, 1:] - D[:, :1]  # term c of row b is active iff margin > gaps[b, c - 1]
    bad = NONFINITE[value]
    if reduction == "none":  # row 1 has no active term, the others have some
        margins = [float(gaps[1].min()) - 0.25]
        assert (gaps[[0, 2, 3]].min() < margins[0]).all(), "the case needs active terms"
        upstream = torch.tensor([1.0, bad, 1.0, 1.0], device=DEVICE)
    else:  # no active term at all, then some
        mid = gaps.flatten().sort().values[gaps.numel() // 2 - 1 :][:2].mean()
        margins = [float(gaps.min()) - 0.25, float(mid)]  # (mid: no term at its kink)
        upstream = torch.tensor(bad, device=DEVICE)

    def run(fn, margin):
        ps = leaves(params)
        loss = fn(*ps, users, items, margin=margin, relation=relation, reduction=reduction)
        loss.backward(upstream)
        return [p.grad for p in ps]

    for margin in margins:
        grads = run(lambda *a, **k: lk.lrml_hinge_loss(*a, backend=backend, **k), margin)
        ref_grads = run(reference.lrml_hinge_loss, margin)
        if margin == margins[0]:  # nothing active reaches the bad weight: all finite
            assert all(rg.isfinite().all() for rg in ref_grads)
        else:
            assert not all(rg.isfinite().all() for rg in ref_grads)
        for name, gr, rg in zip(("P", "Q", "K", "M"), grads, ref_grads, strict=True):
            finite_where_the_reference_is(gr, rg, f"margin {margin:.3g}: grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_cuda_nonfinite_upstream_gradient_gpu(relation, reduction, value):
    # the cuda backend's hinge_grad_D and the fused autograd's where on CUDA tensors (the
    # triton backend's G · W is the interpreter's to check, the same kernel code)
    test_a_nonfinite_upstream_gradient_reaches_only_the_active_hinge_terms(
        "cuda", relation, reduction, value
    )
