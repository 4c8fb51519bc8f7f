"""Fused LRML distances and hinge loss (SPEC.md): forward and backward Triton kernels.

One program owns ``BLOCK_B`` rows of the batch. It gathers ``P[users]`` once, keeps ``K`` and ``M``
on-chip, and for every column ``c`` gathers ``Q[items[:, c]]``, forms ``s = p ⊙ q``, the logits
``s Kᵀ`` (``tl.dot``), a max-subtracted softmax, ``r = a M`` (``tl.dot``), ``e = p + r − q`` and the
distance. The forward writes ``D [B, C]`` (or, fused with the hinge, the per-row losses ``[B]`` and
``∂L_b/∂D [B, C]``) and nothing of size ``[B, C, d]`` or ``[B, C, N]``. The backward
recomputes ``s, a, r, e`` (all on chip; cheaper than reloading) and writes the per-row embedding
gradients (``[B, d]`` and ``[B, C, d]``, coalesced) and per-program fp32 partial gradients of
``K`` and ``M``, summed afterwards in a fixed order (deterministic); with deterministic algorithms
disabled and many programs, an atomic-add path is used instead.

Precision: fp16/bf16/fp32 parameters are computed in fp32 (results cast back to the parameter
dtype); float64 parameters are computed in float64 (``tl.dot`` in fp64). fp32 ``tl.dot`` runs in
IEEE fp32 unless ``torch.get_float32_matmul_precision()`` is not "highest" (then TF32).

Layout (Liger-Kernel style): kernels, then launchers, then the registered custom ops
(``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``), then the backend
functions called by :mod:`lrml_kernels.ops`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lrml_kernels.gradients import table_grad

DISTANCE_CODES = {"l2": 0, "squared_l2": 1, "l1": 2}
REDUCTIONS = ("sum", "mean", "none")

# The atomic-add path for the keys/memory gradients is taken only on CUDA, only when
# torch.are_deterministic_algorithms_enabled() is False, and only with at least this many programs
# (below it, the [programs, N, d] partial buffer is small and its fixed-order sum is as fast).
ATOMIC_MIN_PROGRAMS = 256


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _upcast(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _load_indices(ptr, offs, mask, size):
    """Gather indices as int64; out-of-range ones are clamped to row 0 and reported as invalid."""
    idx = tl.load(ptr, mask=mask, other=0).to(tl.int64)
    ok = mask & (idx >= 0) & (idx < size)
    return tl.where(ok, idx, 0), ok


@triton.jit
def _load_rows(base, rows, row_ok, offs_d, d_mask, stride_r, stride_d, IS_FP64: tl.constexpr):
    """``base[rows, :d]`` as a ``[BLOCK, BLOCK_D]`` compute-dtype tile (zeros where masked)."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    x = tl.load(ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    return _upcast(x, IS_FP64)


@triton.jit
def _attention(s, K, M, n_mask, DOT_PREC: tl.constexpr):
    """``a = softmax(s Kᵀ)`` (max-subtracted, masked to N) and ``r = a M``.

    The backward recomputes this rather than reloading saved statistics: re-normalising
    ``exp(z − max)`` keeps ``Σ a = 1`` to rounding even when the logits are huge and the softmax
    saturates, where ``exp(z − lse)`` would leave an O(ulp(lse)) error that the softmax backward
    ``a (ga − ⟨a, ga⟩)`` amplifies.
    """
    z = tl.dot(s, tl.trans(K), input_precision=DOT_PREC)  # [BLOCK_B, BLOCK_N]
    z = tl.where(n_mask[None, :], z, float("-inf"))
    m = tl.max(z, axis=1)
    ex = tl.exp(z - m[:, None])
    den = tl.sum(ex, axis=1)
    a = ex / den[:, None]
    r = tl.dot(a, M, input_precision=DOT_PREC)  # [BLOCK_B, BLOCK_D]
    return a, r


@triton.jit
def _attention_backward(gr, a, s, K, M, gK, gM, DOT_PREC: tl.constexpr):
    """Softmax-attention backward for a row block: returns ``gs`` and the updated gK, gM."""
    gM = tl.dot(tl.trans(a), gr, acc=gM, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_D]
    ga = tl.dot(gr, tl.trans(M), input_precision=DOT_PREC)  # [BLOCK_B, BLOCK_N]
    gz = a * (ga - tl.sum(a * ga, axis=1)[:, None])
    gK = tl.dot(tl.trans(gz), s, acc=gK, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_D]
    gs = tl.dot(gz, K, input_precision=DOT_PREC)  # [BLOCK_B, BLOCK_D]
    return gs, gK, gM


@triton.jit
def _distance(e, eps, DISTANCE: tl.constexpr):
    """Row distances of residuals ``e [BLOCK_B, BLOCK_D]`` (padded entries are zero)."""
    if DISTANCE == 0:
        dist = tl.sqrt(tl.sum(e * e, axis=1) + eps)
    elif DISTANCE == 1:
        dist = tl.sum(e * e, axis=1)
    else:
        dist = tl.sum(tl.abs(e), axis=1)
    return dist


@triton.jit
def _distance_grad(e, dist, DISTANCE: tl.constexpr):
    """``∂D/∂e``: ``e / D`` (l2), ``2e`` (squared_l2), ``sign(e)`` with sign(0) = 0 (l1)."""
    if DISTANCE == 0:
        de = e / dist[:, None]
    elif DISTANCE == 1:
        de = 2.0 * e
    else:
        de = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)).to(e.dtype)
    return de


@triton.jit
def _residual_grad(e, g, mask, eps, DISTANCE: tl.constexpr):
    """``ge = g ∂D/∂e`` for a row block, zero on padded rows/columns (no NaN from 0/0 there)."""
    de = _distance_grad(e, _distance(e, eps, DISTANCE), DISTANCE)
    return tl.where(mask, g[:, None] * de, 0.0)


@triton.jit
def _lrml_forward_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [B] int32/int64
    items, stride_ib, stride_ic,  # [B, C] int32/int64
    D_out, stride_db, stride_dc,  # [B, C] parameter dtype (STORE_D)
    L_out, stride_Lb,  # [B] parameter dtype (HINGE): per-row hinge losses
    G_out, stride_gb, stride_gc,  # [B, C] fp32/fp64 (HINGE): ∂L_b/∂D[b, c]
    B, C, U, I, N, d,
    margin, eps,
    DISTANCE: tl.constexpr, SHARED: tl.constexpr, HINGE: tl.constexpr,
    STORE_D: tl.constexpr, IS_FP64: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    b_mask = offs_b < B
    n_mask = offs_n < N
    d_mask = offs_d < d

    Kt = _load_rows(K, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd, IS_FP64)
    Mt = _load_rows(M, offs_n, n_mask, offs_d, d_mask, stride_mn, stride_md, IS_FP64)
    u, u_ok = _load_indices(users + offs_b * stride_ub, offs_b, b_mask, U)
    p = _load_rows(P, u, u_ok, offs_d, d_mask, stride_pu, stride_pd, IS_FP64)

    # Column 0 (the positive): its relation is reused by every column when SHARED.
    it, it_ok = _load_indices(items + offs_b * stride_ib, offs_b, b_mask, I)
    q = _load_rows(Q, it, it_ok, offs_d, d_mask, stride_qi, stride_qd, IS_FP64)
    a0, r0 = _attention(p * q, Kt, Mt, n_mask, DOT_PREC)
    d0 = _distance(p + r0 - q, eps, DISTANCE)
    if STORE_D:
        tl.store(D_out + offs_b * stride_db, d0.to(D_out.dtype.element_ty), mask=b_mask)
    if HINGE:
        loss = tl.zeros_like(d0)
        g0 = tl.zeros_like(d0)

    for c in range(1, C):
        it, it_ok = _load_indices(items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I)
        q = _load_rows(Q, it, it_ok, offs_d, d_mask, stride_qi, stride_qd, IS_FP64)
        if SHARED:
            r = r0
        else:
            a, r = _attention(p * q, Kt, Mt, n_mask, DOT_PREC)
        dc = _distance(p + r - q, eps, DISTANCE)
        if STORE_D:
            tl.store(
                D_out + offs_b * stride_db + c * stride_dc,
                dc.to(D_out.dtype.element_ty),
                mask=b_mask,
            )
        if HINGE:
            h = margin + d0 - dc
            active = h > 0
            loss += tl.where(active | (h != h), h, 0.0)  # NaN propagates, as relu(NaN) does
            g0 += tl.where(active, 1.0, 0.0)
            tl.store(
                G_out + offs_b * stride_gb + c * stride_gc,
                tl.where(active, -1.0, 0.0).to(G_out.dtype.element_ty),
                mask=b_mask,
            )
    if HINGE:
        tl.store(G_out + offs_b * stride_gb, g0.to(G_out.dtype.element_ty), mask=b_mask)
        tl.store(L_out + offs_b * stride_Lb, loss.to(L_out.dtype.element_ty), mask=b_mask)


@triton.jit
def _lrml_backward_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [B]
    items, stride_ib, stride_ic,  # [B, C]
    G, stride_gb, stride_gc,  # [B, C] ∂L/∂D (any float dtype, any strides)
    W, stride_wb,  # [B] per-row factor on G (HAS_W), e.g. the upstream grad of per-row losses
    GP, stride_gpb, stride_gpd,  # [B, d] out: gradient of each gathered user row
    GQ, stride_gqb, stride_gqc, stride_gqd,  # [B, C, d] out: gradient of each gathered item row
    GK, stride_gkp, stride_gkn, stride_gkd,  # [programs, N, d] partials ([1, N, d] if ATOMIC)
    GM, stride_gmp, stride_gmn, stride_gmd,  # [programs, N, d] idem for memory
    B, C, U, I, N, d,
    scale, eps,
    DISTANCE: tl.constexpr, SHARED: tl.constexpr, HAS_W: tl.constexpr, ATOMIC: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    b_mask = offs_b < B
    n_mask = offs_n < N
    d_mask = offs_d < d
    bd_mask = b_mask[:, None] & d_mask[None, :]

    Kt = _load_rows(K, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd, IS_FP64)
    Mt = _load_rows(M, offs_n, n_mask, offs_d, d_mask, stride_mn, stride_md, IS_FP64)
    u, u_ok = _load_indices(users + offs_b * stride_ub, offs_b, b_mask, U)
    p = _load_rows(P, u, u_ok, offs_d, d_mask, stride_pu, stride_pd, IS_FP64)
    gK = tl.zeros((BLOCK_N, BLOCK_D), dtype=p.dtype)
    gM = tl.zeros((BLOCK_N, BLOCK_D), dtype=p.dtype)

    if HAS_W:
        rw = _upcast(tl.load(W + offs_b * stride_wb, mask=b_mask, other=0.0), IS_FP64) * scale
    else:
        rw = _upcast(tl.zeros((BLOCK_B,), dtype=tl.float32), IS_FP64) + scale
    g0 = _upcast(tl.load(G + offs_b * stride_gb, mask=b_mask, other=0.0), IS_FP64) * rw

    # Column 0.
    it0, it0_ok = _load_indices(items + offs_b * stride_ib, offs_b, b_mask, I)
    q0 = _load_rows(Q, it0, it0_ok, offs_d, d_mask, stride_qi, stride_qd, IS_FP64)
    s0 = p * q0
    a0, r0 = _attention(s0, Kt, Mt, n_mask, DOT_PREC)
    e0 = p + r0 - q0
    ge0 = _residual_grad(e0, g0, bd_mask, eps, DISTANCE)
    gp = ge0
    if SHARED:
        gr0 = ge0  # the shared relation collects gr of every column
    else:
        gs0, gK, gM = _attention_backward(ge0, a0, s0, Kt, Mt, gK, gM, DOT_PREC)
        gp += gs0 * q0
        gq0 = gs0 * p - ge0
        tl.store(
            GQ + offs_b[:, None] * stride_gqb + offs_d[None, :] * stride_gqd,
            gq0.to(GQ.dtype.element_ty),
            mask=bd_mask,
        )

    for c in range(1, C):
        it, it_ok = _load_indices(items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I)
        q = _load_rows(Q, it, it_ok, offs_d, d_mask, stride_qi, stride_qd, IS_FP64)
        g = _upcast(
            tl.load(G + offs_b * stride_gb + c * stride_gc, mask=b_mask, other=0.0), IS_FP64
        )
        g = g * rw
        if SHARED:
            e = p + r0 - q
            ge = _residual_grad(e, g, bd_mask, eps, DISTANCE)
            gr0 += ge
            gp += ge
            gq = -ge
        else:
            s = p * q
            a, r = _attention(s, Kt, Mt, n_mask, DOT_PREC)
            e = p + r - q
            ge = _residual_grad(e, g, bd_mask, eps, DISTANCE)
            gs, gK, gM = _attention_backward(ge, a, s, Kt, Mt, gK, gM, DOT_PREC)
            gp += ge + gs * q
            gq = gs * p - ge
        tl.store(
            GQ + offs_b[:, None] * stride_gqb + c * stride_gqc + offs_d[None, :] * stride_gqd,
            gq.to(GQ.dtype.element_ty),
            mask=bd_mask,
        )

    if SHARED:
        gs0, gK, gM = _attention_backward(gr0, a0, s0, Kt, Mt, gK, gM, DOT_PREC)
        gp += gs0 * q0
        gq0 = gs0 * p - ge0
        tl.store(
            GQ + offs_b[:, None] * stride_gqb + offs_d[None, :] * stride_gqd,
            gq0.to(GQ.dtype.element_ty),
            mask=bd_mask,
        )
    tl.store(
        GP + offs_b[:, None] * stride_gpb + offs_d[None, :] * stride_gpd,
        gp.to(GP.dtype.element_ty),
        mask=bd_mask,
    )

    nd_mask = n_mask[:, None] & d_mask[None, :]
    if ATOMIC:
        tl.atomic_add(
            GK + offs_n[:, None] * stride_gkn + offs_d[None, :] * stride_gkd, gK, mask=nd_mask
        )
        tl.atomic_add(
            GM + offs_n[:, None] * stride_gmn + offs_d[None, :] * stride_gmd, gM, mask=nd_mask
        )
    else:
        tl.store(
            GK + pid * stride_gkp + offs_n[:, None] * stride_gkn + offs_d[None, :] * stride_gkd,
            gK,
            mask=nd_mask,
        )
        tl.store(
            GM + pid * stride_gmp + offs_n[:, None] * stride_gmn + offs_d[None, :] * stride_gmd,
            gM,
            mask=nd_mask,
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 (or fp64) products unless the user allowed TF32 for fp32 matmuls."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_config(B: int, N: int, d: int, t: torch.Tensor, backward: bool = False) -> dict:
    """Block sizes and warps (a heuristic keyed on d and N; no autotuning).

    Every tile is at least 16 wide (tl.dot). On a GPU, ``BLOCK_B × BLOCK_D`` is bounded so the
    ``[BLOCK_B, BLOCK_D]`` fp32 tiles (p, q, s, e, gradients) stay in registers; the backward
    holds more of them and gets half the rows. Under the interpreter, big blocks mean fewer
    programs and less Python overhead.
    """
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, triton.next_power_of_2(N))
    if _interpreted(t):
        return {
            "BLOCK_B": min(512, max(16, triton.next_power_of_2(B))),
            "BLOCK_N": block_n,
            "BLOCK_D": block_d,
        }
    budget = 4096 if backward else 8192
    if t.dtype == torch.float64:
        budget //= 2
    block_b = max(16, min(64, budget // block_d))
    # The backward keeps ~10 [BLOCK_B, BLOCK_D] fp32 tiles live (p, q, s, e, gp, gs, gq, K, M, gK,
    # gM): 8 warps from 2048 elements per tile keep that near 256 registers per thread.
    limit = 2048 if backward else 4096
    num_warps = 4 if block_b * max(block_d, block_n) < limit else 8
    return {"BLOCK_B": block_b, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps}


def _param_args(user_emb, item_emb, keys, memory):
    return (
        user_emb, user_emb.stride(0), user_emb.stride(1),
        item_emb, item_emb.stride(0), item_emb.stride(1),
        keys, keys.stride(0), keys.stride(1),
        memory, memory.stride(0), memory.stride(1),
    )  # fmt: skip


def forward_launch(
    user_emb, item_emb, keys, memory, users, items, *, distance, relation, eps, margin=0.0,
    hinge=False, store_d=True,
):  # fmt: skip
    """Run the forward kernel. Returns ``(D or None, L or None, G or None)``.

    ``D [B, C]`` and ``L [B]`` in the parameter dtype and
    ``G = ∂L_b/∂D [B, C]`` in the compute dtype.
    """
    B, C = items.shape
    N, d = keys.shape
    dtype = user_emb.dtype
    ct = _compute_dtype(dtype)
    dev = user_emb.device
    shared = relation == "shared"
    D = torch.empty(B, C, dtype=dtype, device=dev) if store_d else None
    L = torch.empty(B, dtype=dtype, device=dev) if hinge else None
    G = torch.empty(B, C, dtype=ct, device=dev) if hinge else None
    dummy = torch.empty(1, 1, dtype=ct, device=dev)
    Dt, Lt, Gt = (x if x is not None else dummy for x in (D, L, G))
    cfg = block_config(B, N, d, user_emb)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    with _device_guard(user_emb):
        _lrml_forward_kernel[grid](
            *_param_args(user_emb, item_emb, keys, memory),
            users, users.stride(0),
            items, items.stride(0), items.stride(1),
            Dt, Dt.stride(0), Dt.stride(1),
            Lt, Lt.stride(0),
            Gt, Gt.stride(0), Gt.stride(1),
            B, C, user_emb.shape[0], item_emb.shape[0], N, d,
            float(margin), float(eps),
            DISTANCE=DISTANCE_CODES[distance], SHARED=shared, HINGE=hinge,
            STORE_D=store_d, IS_FP64=dtype == torch.float64,
            DOT_PREC=_dot_precision(dtype),
            **cfg,
        )  # fmt: skip
    return D, L, G


def _use_atomics(t: torch.Tensor, programs: int) -> bool:
    return (
        t.device.type == "cuda"
        and not torch.are_deterministic_algorithms_enabled()
        and programs >= ATOMIC_MIN_PROGRAMS
    )


def backward_launch(
    user_emb, item_emb, keys, memory, users, items, G, W=None, scale=1.0, *, distance,
    relation, eps, row_dtype=None, atomic=None,
):  # fmt: skip
    """Run the backward kernel. ``g[b, c] = G[b, c] · W[b] · scale`` is ``∂L/∂D``.

    Returns ``(grad_user_rows [B, d], grad_item_rows [B, C, d], grad_keys [N, d],
    grad_memory [N, d])``: rows in ``row_dtype`` (default the parameter dtype), keys/memory
    reduced in the compute dtype and cast to the parameter dtype.
    """
    B, C = items.shape
    N, d = keys.shape
    dtype = user_emb.dtype
    ct = _compute_dtype(dtype)
    dev = user_emb.device
    row_dtype = dtype if row_dtype is None else row_dtype
    cfg = block_config(B, N, d, user_emb, backward=True)
    programs = triton.cdiv(B, cfg["BLOCK_B"])
    if atomic is None:
        atomic = _use_atomics(user_emb, programs)
    GP = torch.empty(B, d, dtype=row_dtype, device=dev)
    GQ = torch.empty(B, C, d, dtype=row_dtype, device=dev)
    if atomic:
        GK = torch.zeros(1, N, d, dtype=ct, device=dev)
        GM = torch.zeros(1, N, d, dtype=ct, device=dev)
    else:
        GK = torch.empty(programs, N, d, dtype=ct, device=dev)
        GM = torch.empty(programs, N, d, dtype=ct, device=dev)
    Wt = W if W is not None else G
    with _device_guard(user_emb):
        _lrml_backward_kernel[(programs,)](
            *_param_args(user_emb, item_emb, keys, memory),
            users, users.stride(0),
            items, items.stride(0), items.stride(1),
            G, G.stride(0), G.stride(1),
            Wt, Wt.stride(0),
            GP, GP.stride(0), GP.stride(1),
            GQ, GQ.stride(0), GQ.stride(1), GQ.stride(2),
            GK, GK.stride(0), GK.stride(1), GK.stride(2),
            GM, GM.stride(0), GM.stride(1), GM.stride(2),
            B, C, user_emb.shape[0], item_emb.shape[0], N, d,
            float(scale), float(eps),
            DISTANCE=DISTANCE_CODES[distance], SHARED=relation == "shared",
            HAS_W=W is not None, ATOMIC=atomic, IS_FP64=dtype == torch.float64,
            DOT_PREC=_dot_precision(dtype),
            **cfg,
        )  # fmt: skip
    # Fixed-order reduction of the per-program partials: same inputs, same bits.
    gK = GK.sum(0).to(dtype)
    gM = GM.sum(0).to(dtype)
    return GP, GQ, gK, gM


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------
# Registered custom ops (opaque to torch.compile; fake impls give it the shapes)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("lrml_triton::distances_fwd", mutates_args=())
def _distances_fwd(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    distance: str,
    relation: str,
    eps: float,
    sparse_grad: bool,
) -> torch.Tensor:
    """``D [B, C]``; ``sparse_grad`` only tells the backward which layout to return."""
    D, _, _ = forward_launch(
        user_emb, item_emb, keys, memory, users, items, distance=distance, relation=relation,
        eps=eps,
    )  # fmt: skip
    return D


@_distances_fwd.register_fake
def _(user_emb, item_emb, keys, memory, users, items, distance, relation, eps, sparse_grad):
    return user_emb.new_empty(items.shape)


@torch.library.custom_op("lrml_triton::hinge_fwd", mutates_args=())
def _hinge_fwd(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    margin: float,
    distance: str,
    relation: str,
    eps: float,
    sparse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L [B] per-row hinge losses, G = ∂L_b/∂D [B, C])`` from one fused kernel."""
    _, L, G = forward_launch(
        user_emb, item_emb, keys, memory, users, items, distance=distance, relation=relation,
        eps=eps, margin=margin, hinge=True, store_d=False,
    )  # fmt: skip
    return L, G


@_hinge_fwd.register_fake
def _(user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps, sparse_grad):
    ct = _compute_dtype(user_emb.dtype)
    return user_emb.new_empty(items.shape[0]), user_emb.new_empty(items.shape, dtype=ct)


@torch.library.custom_op("lrml_triton::backward", mutates_args=())
def _backward_op(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    G: torch.Tensor,
    W: torch.Tensor | None,
    distance: str,
    relation: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row embedding gradients (accumulation dtype) and the keys/memory gradients."""
    return backward_launch(
        user_emb, item_emb, keys, memory, users, items, G, W, distance=distance,
        relation=relation, eps=eps, row_dtype=_accumulation_dtype(user_emb.dtype),
    )  # fmt: skip


@_backward_op.register_fake
def _(user_emb, item_emb, keys, memory, users, items, G, W, distance, relation, eps):
    B, C = items.shape
    d = keys.shape[1]
    rt = _accumulation_dtype(user_emb.dtype)
    return (
        user_emb.new_empty(B, d, dtype=rt),
        user_emb.new_empty(B, C, d, dtype=rt),
        keys.new_empty(keys.shape),
        memory.new_empty(memory.shape),
    )


def _save(ctx, inputs, options, G=None):
    user_emb, item_emb, keys, memory, users, items = inputs[:6]
    ctx.distance, ctx.relation, ctx.eps, ctx.sparse_grad = options
    ctx.shapes = (user_emb.shape[0], item_emb.shape[0])
    ctx.dtype = user_emb.dtype
    extra = () if G is None else (G,)
    ctx.save_for_backward(user_emb, item_emb, keys, memory, users, items, *extra)


def _setup_distances(ctx, inputs, output):
    _save(ctx, inputs, inputs[6:10])


def _setup_hinge(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    _save(ctx, inputs, inputs[7:11], G=output[1])


def _grads(ctx, G, W):
    user_emb, item_emb, keys, memory, users, items = ctx.saved_tensors[:6]
    gp, gq, gK, gM = _backward_op(
        user_emb, item_emb, keys, memory, users, items, G, W, ctx.distance, ctx.relation, ctx.eps
    )
    need = ctx.needs_input_grad
    U, I = ctx.shapes
    g_user = table_grad(gp, users, U, ctx.dtype, ctx.sparse_grad) if need[0] else None
    g_item = table_grad(gq, items, I, ctx.dtype, ctx.sparse_grad) if need[1] else None
    return g_user, g_item, gK if need[2] else None, gM if need[3] else None


def _distances_backward(ctx, grad_D):
    return (*_grads(ctx, grad_D, None), None, None, None, None, None, None)


def _hinge_backward(ctx, grad_L, grad_G):
    G = ctx.saved_tensors[6]
    return (*_grads(ctx, G, grad_L), None, None, None, None, None, None, None)


_distances_fwd.register_autograd(_distances_backward, setup_context=_setup_distances)
_hinge_fwd.register_autograd(_hinge_backward, setup_context=_setup_hinge)


# ----------------------------------------------------------------------------------------------
# Backend functions (inputs validated and contiguous by lrml_kernels.ops)
# ----------------------------------------------------------------------------------------------


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype == torch.bfloat16 and _interpreted(t):
        raise TypeError(
            "triton backend: bfloat16 parameters need a CUDA GPU (the Triton interpreter "
            "cannot compute in bfloat16); use float16/float32/float64 on the CPU"
        )


def _reduce(L: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return L.sum()
    if reduction == "mean":
        return L.mean() if L.numel() else L.sum()  # 0, not NaN, for an empty batch
    if reduction == "none":
        return L
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def distances(user_emb, item_emb, keys, memory, users, items, distance, relation, eps, sparse_grad):
    """``D [B, C]`` (differentiable w.r.t. the four parameters)."""
    _check_dtype(user_emb)
    return _distances_fwd(
        user_emb, item_emb, keys, memory, users, items, distance, relation, float(eps),
        bool(sparse_grad),
    )  # fmt: skip


def hinge_loss(
    user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps, reduction,
    sparse_grad,
):  # fmt: skip
    """Fused hinge loss: scalar ("sum", "mean") or per-row ``[B]`` ("none")."""
    _check_dtype(user_emb)
    L, _ = _hinge_fwd(
        user_emb, item_emb, keys, memory, users, items, float(margin), distance, relation,
        float(eps), bool(sparse_grad),
    )  # fmt: skip
    return _reduce(L, reduction)


@torch.no_grad()
def hinge_loss_grads(
    user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps, reduction
):
    """Forward and backward in one call, without autograd (for a fused sparse optimizer).

    Returns ``(loss, grad_user_rows [B, d], grad_item_rows [B, C, d], grad_keys [N, d],
    grad_memory [N, d])``: the gradients of ``loss`` (of ``loss.sum()`` for reduction="none")
    w.r.t. each gathered row (NOT scattered: row b of ``grad_user_rows`` belongs to
    ``users[b]``), and of keys and memory; all in the parameter dtype.
    """
    _check_dtype(user_emb)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    B, C = items.shape
    if B == 0:
        d = keys.shape[1]
        L = user_emb.new_zeros(0)
        return (
            _reduce(L, reduction),
            user_emb.new_zeros(0, d),
            user_emb.new_zeros(0, C, d),
            torch.zeros_like(keys),
            torch.zeros_like(memory),
        )
    _, L, G = forward_launch(
        user_emb, item_emb, keys, memory, users, items, distance=distance, relation=relation,
        eps=eps, margin=margin, hinge=True, store_d=False,
    )  # fmt: skip
    scale = 1.0 / B if reduction == "mean" else 1.0
    gp, gq, gK, gM = backward_launch(
        user_emb, item_emb, keys, memory, users, items, G, None, scale, distance=distance,
        relation=relation, eps=eps,
    )  # fmt: skip
    return _reduce(L, reduction), gp, gq, gK, gM
