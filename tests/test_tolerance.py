"""The shared comparison with the reference (tests/_tolerance.py) is exact, and it can fail."""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_matches, reference_with_bounds

import lrml_kernels as lk
from lrml_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")


def make(dtype, seed=0, U=12, I=40, N=7, d=37, B=37, C=13, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
              for n in (U, I, N, N)]  # fmt: skip
    users = torch.randint(0, U, (B,), generator=g)
    items = torch.randint(0, I, (B, C), generator=g)
    w = torch.randn(B, C, generator=g, dtype=torch.float64).to(dtype)
    return params, users, items, w


def run(op, params, users, items, w, **kw):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    if op == "distances":
        out = lk.lrml_distances(*leaves, users, items, backend="torch", **kw)
        out.backward(w)
    else:
        out = lk.lrml_hinge_loss(*leaves, users, items, backend="torch", margin=0.5, **kw)
        out.backward()
    return out.detach(), [p.grad for p in leaves]


@pytest.mark.parametrize("relation", ["pair", "shared"])
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "l1"])
def test_values_are_the_float64_reference(distance, relation):
    params, users, items, w = make(torch.float64)
    kw = {"distance": distance, "relation": relation}
    for op in ("distances", "hinge"):
        ref = reference_with_bounds(params, users, items, op=op, grad_out=w, **kw)
        out, grads = run(op, params, users, items, w, **kw)
        torch.testing.assert_close(ref.out.v, out, rtol=1e-12, atol=1e-12)
        for want, got in zip(ref.tables, grads, strict=True):
            torch.testing.assert_close(want.v, got, rtol=1e-11, atol=1e-11)
            assert float(want.err.max()) < 1e-10 * max(1.0, float(got.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relation", ["pair", "shared"])
@pytest.mark.parametrize("distance", ["l2", "squared_l2", "l1"])
def test_the_torch_backend_is_within_the_bound(distance, relation, dtype):
    # The torch backend rounds D to the parameter dtype before the hinge (stored_d).
    params, users, items, w = make(dtype, seed=1)
    kw = {"distance": distance, "relation": relation}
    for op in ("distances", "hinge"):
        out, grads = run(op, params, users, items, w, **kw)
        ref = reference_with_bounds(params, users, items, op=op, grad_out=w, stored_d=True, **kw)
        assert_matches(f"torch {op}", ref, out, grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["distances", "hinge"])
@pytest.mark.parametrize("which", range(4))
def test_a_one_percent_error_in_one_row_is_caught(which, op, dtype):
    params, users, items, w = make(dtype, seed=2)
    out, grads = run(op, params, users, items, w)
    ref = reference_with_bounds(params, users, items, op=op, grad_out=w)
    assert_matches("unperturbed", ref, out, grads)
    row = int(grads[which].abs().sum(1).argmax())
    grads[which][row] *= 1.01
    with pytest.raises(AssertionError, match=f"grad {lk.ops.PARAM_NAMES[which]}"):
        assert_matches("perturbed", ref, out, grads)
    out = out * 1.01
    grads[which][row] /= 1.01
    with pytest.raises(AssertionError, match="output"):
        assert_matches("perturbed", ref, out, grads)


def test_kinks_are_excluded_and_counted():
    # Item 1 sits exactly `margin` farther than item 0: the hinge argument is 0 up to rounding.
    params, users, items, _ = make(torch.float32, B=4, C=2, U=4, I=8, seed=3)
    D = reference.lrml_distances(*(p.double() for p in params), users, items)
    margin = float(D[0, 1] - D[0, 0])
    ref = reference_with_bounds(params, users, items, op="hinge", margin=margin)
    assert ref.excluded == 1
    # Either side of the kink passes: the term's contribution is admitted, not compared.
    for m in (margin * (1 - 1e-6), margin * (1 + 1e-6)):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        lk.lrml_hinge_loss(*leaves, users, items, margin=m, backend="torch").backward()
        assert_matches("either side", ref, None, [p.grad for p in leaves])
    with pytest.raises(AssertionError, match="1 kink terms excluded"):
        assert_matches("wrong", ref, None, [p.grad * 1.5 for p in leaves])
    exact = reference_with_bounds(params, users, items, op="hinge", margin=margin, kinks=False)
    assert exact.excluded == 0
