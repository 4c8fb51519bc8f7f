"""The one comparison of a backend with the reference (issue 14), used by every backend test.

A backend's output (distances or hinge loss) and its gradients are compared with the float64
reference computed from the SAME rounded inputs (the parameters as the backend got them, the
upstream gradient as the backend got it), never with a reference that rounds at every op.

Each quantity x gets a first-order bound on the error a correct backend may make, carried along
the computation of SPEC.md in float64 ("running error analysis", Higham, Accuracy and Stability
of Numerical Algorithms, ch. 3): every value is a pair (v, err) and

- a sum or dot product of n terms adds ``γ · Σ|terms|`` with ``γ = n·u_acc + 2·u_dot``
  (n = d, N, or for keys/memory/embedding rows the number of pairs accumulated), and propagates
  the errors of its operands (``Σ err(x)|y| + |x| err(y)``);
- an elementwise op adds ``u_acc·|result|`` and propagates first order (softmax:
  ``|δa_n| ≤ a_n Σ_{m≠n} a_m (|δz_n| + |δz_m|)``: large logits widen the bound, a common shift
  of all of them does not);
- a value stored in the parameter dtype (D, per-pair gradient rows, the outputs) adds
  ``u_out·|value|``;

with the unit roundoffs ``u_out`` of the parameter dtype, ``u_acc`` of the compute dtype (fp32 for
fp16/bf16/fp32, fp64 for fp64) and ``u_dot`` of the dot-product operands (tf32: 2⁻¹⁰, as
Triton passes raw fp32 registers to the tensor cores, which drop the low 13 mantissa bits:
truncation, not rounding; triton-lang/triton#4574; which backend's dots are tf32:
:func:`tf32_dots`).
A backend passes where ``|x_backend − v| ≤ SAFETY · err`` elementwise.

Kinks: a hinge term whose argument ``margin + D[b,0] − D[b,c]`` lies within its own error bound of
0, and (l1) a coordinate ``e_j`` within its error bound of 0, may take either side of the kink in
a correct backend. Those terms are excluded: the reference leaves them out and the bound admits
their whole contribution (their upstream gradient enters with value 0 and error |g|). They are
counted; the count is in every assertion message and in the session's terminal summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import lrml_kernels as lk

SAFETY = 2.0  # the bound is first order; second-order terms and libm's exp/sqrt ulps fit in 2x
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
TF32_ROUNDOFF = 2.0**-10  # truncated operands (module docstring)
TF32_DTYPES = (torch.float32, torch.bfloat16)  # dtypes whose dots may take tf32 operands


def tf32_dots(backend: str, dtype: torch.dtype, fp32_tf32: bool = False) -> bool:
    """Whether ``backend``'s dot products take tf32 operands (SPEC.md, "Precision"): the triton
    backend's for bf16 parameters always, and for fp32 ones under TF32 matmuls (``fp32_tf32``:
    torch's fp32 matmul precision is not "highest"); no other backend's."""
    if backend != "triton":
        return False
    return dtype == torch.bfloat16 or (dtype == torch.float32 and fp32_tf32)


# Totals over the session, for the terminal summary (conftest.py).
STATS = {"comparisons": 0, "excluded": 0, "seconds": 0.0}


def _plus(*terms):
    """The sum of the terms that are not None (None: an exact value's zero error)."""
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


@dataclass
class E:
    """A float64 value and a bound on its rounding error (same shape; None: exact)."""

    v: torch.Tensor
    err: torch.Tensor | None

    @staticmethod
    def exact(v: torch.Tensor) -> E:
        return E(v, None)

    def __add__(self, o: E) -> E:
        return E(self.v + o.v, _plus(self.err, o.err))

    def __sub__(self, o: E) -> E:
        return E(self.v - o.v, _plus(self.err, o.err))

    def __neg__(self) -> E:
        return E(-self.v, self.err)

    def __mul__(self, o: E) -> E:
        # (with the product of the errors: an excluded sign times an excluded hinge weight is
        # 0 ± 1 times 0 ± 1)
        a, b = self.err, o.err
        err = _plus(
            None if a is None else a * o.v.abs(),
            None if b is None else self.v.abs() * b,
            None if a is None or b is None else a * b,
        )
        return E(self.v * o.v, err)

    def scale(self, c: float) -> E:
        return E(self.v * c, None if self.err is None else self.err * abs(c))

    def rounded(self, u: float, floor: float = 0.0) -> E:
        """The value rounded once with unit roundoff u (an op's result, or a store); ``floor``:
        the absolute rounding of the dtype's subnormal range."""
        base = self.v.abs().mul_(u)
        if floor:
            base.add_(floor)
        return E(self.v, base if self.err is None else base.add_(self.err))

    def index(self, *idx) -> E:
        if len(idx) == 2 and idx[1] is None:  # rows, then a new axis
            return E(
                self.v[idx[0]][:, None], None if self.err is None else self.err[idx[0]][:, None]
            )
        return E(self.v[idx], None if self.err is None else self.err[idx])

    def col(self) -> E:
        """A trailing axis of size 1 (to broadcast a per-pair value over d)."""
        return E(self.v[..., None], None if self.err is None else self.err[..., None])

    def error(self) -> torch.Tensor:
        return torch.zeros_like(self.v) if self.err is None else self.err


@dataclass
class Precision:
    u_out: float  # the parameter dtype: stored D, gradient rows, outputs
    u_acc: float  # the compute dtype: sums, elementwise ops
    u_dot: float  # dot-product operands (tf32 truncates them)
    tiny_out: float  # the subnormal spacing of the parameter dtype (stores below it flush)
    tiny_acc: float  # the smallest normal of the compute dtype (exp underflows below it)

    @staticmethod
    def of(dtype: torch.dtype, tf32: bool = False) -> Precision:
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        acc = UNIT_ROUNDOFF[ct]
        dot = TF32_ROUNDOFF if tf32 and dtype in TF32_DTYPES else acc
        fo = torch.finfo(dtype)
        return Precision(UNIT_ROUNDOFF[dtype], acc, dot, fo.tiny * fo.eps, torch.finfo(ct).tiny)

    def store(self, x: E) -> E:
        """x stored in the parameter dtype."""
        return x.rounded(self.u_out, self.tiny_out)

    def gamma(self, n: int) -> float:
        return n * self.u_acc + 2 * self.u_dot


_PRODUCTS = {
    "x yT": lambda x, y: x @ y.T,  # [..., d] x [n, d] -> [..., n]
    "x y": lambda x, y: x @ y,  # [..., n] x [n, d] -> [..., d]
    # sum over pairs: [B, C, n] x [B, C, d] -> [n, d]
    "xT y": lambda x, y: x.reshape(-1, x.shape[-1]).T @ y.reshape(-1, y.shape[-1]),
}


def _dot(x: E, y: E, pr: Precision, n: int, form: str) -> E:
    """The product ``form`` (see _PRODUCTS) summing n terms, with its error bound
    ``err(x)|y| + |x|err(y) + err(x)err(y) + γ_n |x||y|``."""
    f = _PRODUCTS[form]
    xa, ya = x.v.abs(), y.v.abs()
    err = f(xa * pr.gamma(n) if x.err is None else x.err + pr.gamma(n) * xa, ya)
    if y.err is not None:
        err = err + f(xa if x.err is None else xa + x.err, y.err)
    return E(f(x.v, y.v), err)


def _sum(x: E, pr: Precision, dim: int = -1, keepdim: bool = False) -> E:
    n = x.v.shape[dim]
    v = x.v.sum(dim, keepdim=keepdim)
    err = n * pr.u_acc * x.v.abs().sum(dim, keepdim=keepdim)
    return E(v, err if x.err is None else err + x.err.sum(dim, keepdim=keepdim))


def _softmax(z: E, pr: Precision) -> E:
    a = torch.softmax(z.v, dim=-1)
    # δa_n = a_n Σ_m a_m (δz_n − δz_m): a shift of every logit changes nothing (N = 1: exact)
    err = (z.v.shape[-1] + 3) * pr.u_acc * a + pr.tiny_acc
    if z.err is not None:
        az = a * z.err
        err = err + a * ((1 - a) * z.err + az.sum(-1, keepdim=True) - az)
    return E(a, err)


def _attention(p: E, q: E, K: E, M: E, pr: Precision):
    """s = p ⊙ q, a = softmax(K s), r = Mᵀ a for p, q ``[..., d]``."""
    d, N = K.v.shape[1], K.v.shape[0]
    s = (p * q).rounded(pr.u_acc)
    a = _softmax(_dot(s, K, pr, d, "x yT"), pr)
    r = _dot(a, M, pr, N, "x y")
    return s, a, r


def _distance(e: E, distance: str, eps: float, pr: Precision) -> E:
    if distance == "l1":
        return _sum(E(e.v.abs(), e.err), pr)
    sq = _sum((e * e).rounded(pr.u_acc), pr)
    if distance == "squared_l2":
        return sq
    v = torch.sqrt(sq.v + eps)
    return E(v, sq.err / (2 * v) + pr.u_acc * v)


def _residual_grad(e: E, D: E, g: E, distance: str, pr: Precision, kinks: bool):
    """``ge = g ∂D/∂e`` per pair and the number of l1 coordinates excluded at sign(0)."""
    if distance == "l2":
        De = D.col()
        de = E(e.v / De.v, e.err / De.v + e.v.abs() * De.err / De.v**2).rounded(pr.u_acc)
    elif distance == "squared_l2":
        de = e.scale(2.0)
    else:
        sign = E.exact(torch.sign(e.v))
        amb = (e.v.abs() <= SAFETY * e.err) & (e.err > 0) if kinks else torch.zeros_like(e.v) > 0
        sign = E(sign.v.masked_fill(amb, 0.0), amb.to(e.v.dtype))  # either side: error 1
        ge = sign * g.col()
        # an excluded coordinate of a pair with g = 0 changes nothing: not counted
        return ge, int((amb & (g.v[..., None] != 0)).sum())
    return de * g.col(), 0


def _hinge(D: E, margin: float, pr: Precision, row_weight: torch.Tensor, kinks: bool, u: float):
    """Per-row losses L [B], the upstream ∂L/∂D [B, C] (E) and the number of excluded terms.

    row_weight [B]: ∂loss/∂L_b (1, 1/B or the caller's weights); u: the hinge's arithmetic."""
    B, C = D.v.shape
    if C < 2:
        zero = torch.zeros(B, dtype=D.v.dtype, device=D.v.device)
        return E(zero, zero.clone()), E.exact(torch.zeros_like(D.v)), 0
    h = D.index(slice(None), slice(0, 1)) + E.exact(torch.full_like(D.v[:, :1], margin))
    h = (h.rounded(u) - D.index(slice(None), slice(1, None))).rounded(u)
    amb = (h.v.abs() <= SAFETY * h.err) if kinks else torch.zeros_like(h.v) > 0
    active = (h.v > 0) & ~amb
    relu = E(h.v.clamp_min(0), torch.where(active | amb, h.err, torch.zeros_like(h.err)))
    L = _sum(relu, pr)
    w = row_weight[:, None].expand(B, C - 1)
    g_neg = E(-w * active, w.abs() * amb)
    g_pos = E((w * active).sum(1, keepdim=True), (w.abs() * amb).sum(1, keepdim=True))
    g = E(torch.cat([g_pos.v, g_neg.v], 1), torch.cat([g_pos.err, g_neg.err], 1))
    return L, g.rounded(pr.u_acc), int((amb & (w != 0)).sum())


@dataclass
class Reference:
    """The float64 reference of one op with error bounds; ``excluded`` kink terms."""

    out: E
    tables: list  # E of the four parameter gradients (user_emb, item_emb, keys, memory)
    rows: list  # E of the per-pair gradient rows: user rows [B, d], item rows [B, C, d]
    excluded: int = 0
    notes: list = field(default_factory=list)


def _table(rows: E, index: torch.Tensor, num: int, pr: Precision) -> E:
    """Scatter-sum of rows stored in the parameter dtype: each row and each partial sum may be
    rounded to it (torch's embedding backward sums half rows in half), n rows per table row."""
    d = rows.v.shape[-1]
    rows = pr.store(rows)
    idx = index.reshape(-1).long()
    # value, magnitude and error in one scatter_add_ (index_add_ loops over repeated indices)
    src = torch.cat([t.reshape(-1, d) for t in (rows.v, rows.v.abs(), rows.err)], 1)
    out = src.new_zeros(num, 3 * d).scatter_add_(0, idx[:, None].expand(-1, 3 * d), src)
    v, mag, err = out.split(d, 1)
    count = torch.bincount(idx, minlength=num).to(src.dtype)[:, None]
    return E(v, err + count * pr.u_out * mag)


def reference_with_bounds(*args, **kw) -> Reference:
    """:func:`_reference_with_bounds` on one intra-op thread (many mid-sized ops: on a busy
    machine OpenMP threads waiting for a descheduled sibling make them several times slower),
    timed into STATS."""
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_with_bounds(*args, **kw)
    finally:
        torch.set_num_threads(threads)
        STATS["seconds"] += time.perf_counter() - start


def _reference_with_bounds(
    params,
    users,
    items,
    *,
    op: str,
    distance: str = "l2",
    relation: str = "pair",
    eps: float = 1e-3,
    margin: float = 0.5,
    reduction: str = "sum",
    grad_out=None,
    tf32: bool = False,
    kinks: bool = True,
    stored_d: bool = False,
) -> Reference:
    """The float64 reference of ``op`` ("distances" or "hinge") and its gradients, with bounds.

    ``params`` are the backend's inputs (any dtype: their values are used exactly). ``grad_out``
    is the upstream gradient the backend got (``[B, C]`` for distances, ``[B]`` for the hinge
    with reduction="none"; None means ones). ``kinks=False`` compares the exact kink the way the
    reference takes it (subgradient 0; for inputs built to sit on it exactly). ``stored_d``: the
    backend takes the hinge from D rounded to the parameter dtype and evaluates it in that dtype
    (the torch backend does; the fused backends take it from D in the compute dtype).
    """
    dtype = params[0].dtype
    pr = Precision.of(dtype, tf32)
    P, Q, K, M = (E.exact(t.detach().double()) for t in params)
    users, items = users.long(), items.long()
    B, C = items.shape
    N, d = K.v.shape
    p = P.index(users, None)  # [B, 1, d]
    q = Q.index(items)  # [B, C, d]
    if relation == "pair":
        s, a, r = _attention(p, q, K, M, pr)  # [B, C, ·]
    else:
        s, a, r = _attention(p, q.index(slice(None), slice(0, 1)), K, M, pr)  # [B, 1, ·]
    e = ((p + r).rounded(pr.u_acc) - q).rounded(pr.u_acc)
    D = _distance(e, distance, eps, pr)  # [B, C]
    excluded = 0
    if op == "distances":
        out = pr.store(D)
        gD = torch.ones_like(D.v) if grad_out is None else grad_out.detach().double()
        g = E.exact(gD.reshape(B, C))
    elif op == "hinge":
        if reduction == "none":
            w = torch.ones(B, dtype=D.v.dtype, device=D.v.device)
            if grad_out is not None:
                w = grad_out.detach().double().reshape(B)
        else:
            w = torch.full((B,), 1.0 / B if reduction == "mean" and B else 1.0, dtype=D.v.dtype)
            w = w.to(D.v.device)
        u_hinge = pr.u_out if stored_d else pr.u_acc
        L, g, excluded = _hinge(D.rounded(u_hinge), margin, pr, w, kinks, u_hinge)
        if reduction == "none":
            out = L
        else:
            out = _sum(E(L.v[None], L.err[None]), pr)
            out = E(out.v[0], out.err[0])
            if reduction == "mean" and B:
                out = out.scale(1.0 / B).rounded(pr.u_acc)
        out = pr.store(out)
    else:
        raise ValueError(op)
    ge, n_l1 = _residual_grad(e, D, g, distance, pr, kinks)  # [B, C, d]
    excluded += n_l1
    # Backward of SPEC.md, pair by pair, then the sums over pairs.
    gr = ge if relation == "pair" else _sum(ge, pr, dim=1, keepdim=True)  # [B, C or 1, d]
    n_rel = gr.v.shape[0] * gr.v.shape[1]
    gM = _dot(a, gr, pr, n_rel, "xT y")
    ga = _dot(gr, M, pr, d, "x yT")
    t = _sum((a * ga).rounded(pr.u_acc), pr, keepdim=True)
    gz = (a * (ga - t).rounded(pr.u_acc)).rounded(pr.u_acc)
    gK = _dot(gz, s, pr, n_rel, "xT y")
    gs = _dot(gz, K, pr, N, "x y")
    p_att = (gs * q.index(slice(None), slice(0, gs.v.shape[1]))).rounded(pr.u_acc)
    gp = _sum(ge, pr, dim=1) + _sum(p_att, pr, dim=1)  # [B, d]
    gq = -ge
    q_att = (gs * p).rounded(pr.u_acc)
    if relation == "pair":
        gq = gq + q_att
    else:
        first = gq.index(slice(None), slice(0, 1)) + q_att
        gq = E(torch.cat([first.v, gq.v[:, 1:]], 1), torch.cat([first.err, gq.err[:, 1:]], 1))
    tables = [
        _table(gp, users, P.v.shape[0], pr),
        _table(gq, items, Q.v.shape[0], pr),
        pr.store(gK),
        pr.store(gM),
    ]
    rows = [pr.store(gp), pr.store(gq)]
    return Reference(out, tables, rows, excluded)


def relations_with_bounds(params, users, items, *, tf32: bool = False) -> tuple[E, E]:
    """The float64 attention ``a [B, N]`` and relation ``r [B, d]`` of the pairs
    ``(users[b], items[b])`` (``lrml_relations``), with the bounds of a backend that computes
    them in the compute dtype and stores them in the parameter dtype."""
    pr = Precision.of(params[0].dtype, tf32)
    P, Q, K, M = (E.exact(t.detach().double()) for t in params)
    _, a, r = _attention(P.index(users.long()), Q.index(items.long()), K, M, pr)
    return pr.store(a), pr.store(r)


def assert_relations_match(what: str, params, users, items, a, r, *, tf32: bool = False) -> None:
    """A backend's ``(a, r)`` against :func:`relations_with_bounds`, elementwise."""
    STATS["comparisons"] += 1
    want_a, want_r = relations_with_bounds(params, users, items, tf32=tf32)
    assert a.dtype == r.dtype == params[0].dtype
    problems = [
        _violations(f"{what} attention", a, want_a),
        _violations(f"{what} relation", r, want_r),
    ]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def _violations(what: str, actual: torch.Tensor, want: E) -> str | None:
    actual = actual.to_dense() if actual.is_sparse else actual
    a = actual.detach().double().to(want.v.device)
    if a.shape != want.v.shape:
        return f"{what}: shape {tuple(a.shape)}, expected {tuple(want.v.shape)}"
    diff = (a - want.v).abs()
    bound = SAFETY * want.err
    bad = ~(diff <= bound)  # NaN fails
    if not bool(bad.any()):
        return None
    i = int(torch.argmax(torch.where(bad, diff / (bound + 1e-300), -1.0)).item())
    at = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), diff.shape))
    return (
        f"{what}: {int(bad.sum())} of {diff.numel()} elements beyond the bound; worst at {at}: "
        f"got {a.flatten()[i].item():.9g}, reference {want.v.flatten()[i].item():.9g}, "
        f"|diff| {diff.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}"
    )


def assert_matches(what: str, ref: Reference, out=None, grads=None, rows=None) -> int:
    """Assert a backend's output, gradients of the four parameters (None entries are not
    compared) and/or per-pair gradient rows ``(user rows [B, d], item rows [B, C, d])`` against
    ``ref``; returns the number of excluded kink terms (in the message on failure)."""
    STATS["comparisons"] += 1
    STATS["excluded"] += ref.excluded
    problems = []
    if out is not None:
        problems.append(_violations(f"{what} output", out, ref.out))
    for name, g, want in zip(lk.ops.PARAM_NAMES, grads or (), ref.tables, strict=False):
        if g is not None:
            problems.append(_violations(f"{what} grad {name}", g, want))
    for name, g, want in zip(("user rows", "item rows"), rows or (), ref.rows, strict=False):
        problems.append(_violations(f"{what} grad {name}", g, want))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems) + (
        f"\n({ref.excluded} kink terms excluded from the gradient comparison)"
    )
    return ref.excluded


def check(what: str, out, grads, params, users, items, **kw) -> int:
    """:func:`reference_with_bounds` then :func:`assert_matches`; returns the excluded count."""
    ref = reference_with_bounds(params, users, items, **kw)
    return assert_matches(what, ref, out, grads)


def run_op(op: str, backend: str, params, users, items, grad_out=None, **kw):
    """A backend's ``lrml_distances`` (op="distances") or ``lrml_hinge_loss`` (op="hinge") on
    fresh leaves, backward with ``grad_out`` (None: ones); returns ``(out, grads)``."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    fn = lk.lrml_distances if op == "distances" else lk.lrml_hinge_loss
    out = fn(*leaves, users, items, backend=backend, **kw)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    grads = [None if p.grad is None else p.grad.to_dense() for p in leaves]
    return out.detach(), grads


def upstream(items, dtype, seed: int = 1) -> torch.Tensor:
    """Weights of both signs for the backward of the distances, in the parameter dtype."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(items.shape, generator=g, dtype=torch.float64).mul(2).sub(0.7)
    return w.to(dtype).to(items.device)


def check_backend(backend: str, params, users, items, *, ops=("hinge", "distances"), **kw) -> int:
    """The backend's hinge loss and/or distances and their four gradients against the float64
    reference (``kw``: distance, relation, eps, margin, reduction, sparse_grad, kinks, and
    tf32: TF32 fp32 matmuls; the backend's own dot precision follows from :func:`tf32_dots`).
    Returns the number of excluded kink terms."""
    tf32 = tf32_dots(backend, params[0].dtype, kw.pop("tf32", False))
    kinks = kw.pop("kinks", True)
    hinge_only = ("margin", "reduction")
    excluded = 0
    for op in ops:
        opkw = {k: v for k, v in kw.items() if op == "hinge" or k not in hinge_only}
        w = upstream(items, params[0].dtype) if op == "distances" else None
        out, grads = run_op(op, backend, params, users, items, w, **opkw)
        refkw = {k: v for k, v in opkw.items() if k != "sparse_grad"}
        ref = reference_with_bounds(
            params, users, items, op=op, grad_out=w, tf32=tf32, kinks=kinks,
            stored_d=backend == "torch", **refkw,
        )  # fmt: skip
        assert out.dtype == params[0].dtype
        for g, p in zip(grads, params, strict=True):
            assert g is not None and g.dtype == p.dtype and g.shape == p.shape
        excluded += assert_matches(f"{backend} {op}", ref, out, grads)
    return excluded
