"""Fused LRML distances and hinge loss (SPEC.md): forward and backward Triton kernels.

Kernels (K and M, N × d, are tiny and re-read per chunk from L1/L2; the gathered rows stream):

- ``_lrml_pair_forward_kernel`` (relation="pair"): program ``rb · C + c`` owns column ``c`` of
  a block of ``BLOCK_B`` rows (C programs per row block, so B = 4096 × 5 gives 1280 programs
  on 132 SMs; the C programs of a block are adjacent, so ``P[users]`` is read from HBM once).
  It walks d in chunks of ``BLOCK_DC``: pass 1 accumulates the logits ``z = (p ⊙ q) Kᵀ``
  (``tl.dot``), then a max-subtracted softmax, pass 2 ``r = a M`` (``tl.dot``),
  ``e = p + r − q`` and the distance.
- ``_lrml_shared_forward_kernel`` (relation="shared"): program ``rb`` owns every column of its
  block: one attention (column 0), then per chunk ``p + r₀`` and every column's ``q``.
- ``_hinge_kernel``: the per-row hinge losses and ``∂L_b/∂D`` from the fp32 distances.
- ``_lrml_backward_kernel``: program ``pid`` of G (as many as are resident: 1 per SM) takes row
  blocks ``pid, pid + G, …``; it recomputes ``s, a, r, e`` chunk by chunk (cheaper than storing
  them; for l2, the fused trainer's step hands it the forward's D, which saves the pass over d
  that recomputes it: one of four), writes the row gradients (``[B, d]`` compute dtype,
  ``[B, C, d]``) and adds its keys/memory contributions into its own ``[N, d]`` partial slots;
  the ``[G, N, d]`` partials are then summed over G in a fixed order. No atomics anywhere:
  same inputs, same bits.

Why chunks: a ``tl.dot`` in IEEE fp32 runs on CUDA cores, and its lowering holds the whole
reduction dimension of both operands in registers; with full-d tiles every configuration spilled
kilobytes per thread on sm_90 (forward at BLOCK_B 64: 5.2 KB stack). 16-row blocks, chunks of
16-32 columns walked by a rolled loop, ``num_stages=1`` (pipelining the gathers doubled the
live registers) and the warps/register caps of :func:`block_config` keep every production
configuration spill-free (ptxas -v, sm_90a, Triton 3.9; d = 64/100/128, N = 10/20, fp32/bf16,
both relations, every distance): forward 16 × 32 tiles, 4 warps, ≤ 128 registers (4 programs
per SM); backward 16 × 16 tiles, 8 warps (4 with tf32 dots), ≤ 255 registers (1 program per
SM; 2-3 with tf32); with tf32 dots at large batches 64-row blocks (:func:`block_config`).

Roofline (H200: ~4.2 TB/s measured copy bandwidth, ~67 TFLOP/s fp32 FMA, d = 100, N = 20,
fp32, 8-byte indices, every gathered row counted as an HBM read):

- forward + hinge, per row: p 400 B + C × (q 400 + index 8 + D/G 12) + 12 ≈ 0.4 + 0.42 C KB;
  backward, per row: p, q again + G, W + GP 400 + GQ 400 C ≈ 0.8 + 0.81 C KB. Per pair at
  C = 5: ~0.5 KB forward, ~1.0 KB backward.
- FLOPs per pair: forward 4Nd = 8 K useful (logits, r), 16 K as executed (N padded to 32,
  d to 128); backward 12Nd = 24 K useful (logits, r, ga, gM, gs, gK), ~57 K executed (r is
  recomputed in each of its passes; d = 100 padded to 112), ~50 K where the l2 distances come
  from the forward (the trainer's step).
- relation="pair", B = 4096 × 5, fwd + bwd: 30 MB → 7 µs at copy bandwidth; 1.5 GFLOP →
  22 µs at FMA peak. B = 2^20 × 2: 3.9 GB → 0.92 ms; 154 GFLOP → 2.3 ms. IEEE fp32 dots
  make these kernels FMA-bound (~22 FLOP/B useful, ~50 executed, against a ridge of ~16
  FLOP/B), and likely slower than that: Triton's FMA dots read their operands from shared
  memory, about one value per FFMA (backward SASS at d = 100: 224-288 values loaded per
  thread against 196-276 FFMA; forward 169-269 against 128-260), and an SM's shared memory
  serves 32 values a clock to its 128 FMA lanes, so ~25% of the FMA peak (~9 ms at
  2^20 × 2) unless a GPU run shows otherwise. TF32 dots
  (``torch.set_float32_matmul_precision("high")``) move them to the tensor cores and under
  the memory roof. bf16 rows halve the bytes (2^20 × 2: ~2 GB, ~0.5 ms) and
  leave the FLOPs as they are, 4-5× over the memory roof on the FMA units: bf16 dots are
  always tf32.

Precision: fp16/bf16/fp32 parameters are computed in fp32 (results cast back to the parameter
dtype); float64 parameters are computed in float64 (``tl.dot`` in fp64). The dots of bf16
parameters take tf32 operands (:func:`_dot_precision`: bf16's own rounding is 4× coarser);
fp32 ``tl.dot`` runs in IEEE fp32 unless torch's fp32 matmul precision is not "highest" (then
TF32; read by :func:`lrml_kernels.precision.fp32_matmul_precision`, whichever API set it);
fp16 dots run in IEEE fp32. The float arguments (``eps``, ``margin``, the mean's ``1/B``) are
fp64: a compiled launch types a Python float fp32 unless the kernel annotates it (the interpreter
keeps the double), which rounded them for float64 parameters; each kernel casts them to its
compute dtype first (:func:`_scalar`: an fp64 scalar would promote fp32 tiles), so fp32 kernels
see fp32(eps) as before.

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
from lrml_kernels.precision import fp32_matmul_precision

DISTANCE_CODES = {"l2": 0, "squared_l2": 1, "l1": 2}
REDUCTIONS = ("sum", "mean", "none")

# Off a GPU (static reports) the launch rules assume an H200's SM count.
H200_SMS = 132
# 32-bit registers per SM on sm_90: with the backward's register cap, how many of its programs
# are resident at once (each takes row blocks pid, pid + programs, ... and keeps its own
# keys/memory partial sums).
REGISTERS_PER_SM = 65536
WIDE_BLOCK_B = 64  # rows per program of the tensor-core kernels at large batches (block_config)


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
def _scalar(x, IS_FP64: tl.constexpr):
    """A float argument (fp64, module docstring) in the compute dtype: left fp64, it would
    promote every fp32 tile it meets to fp64."""
    if IS_FP64:
        y = tl.full((), x, tl.float64)
    else:
        y = tl.full((), x, tl.float32)
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
def _softmax(z, n_mask):
    """Masked, max-subtracted softmax of logits ``z [rows, BLOCK_N]`` along the memory slots.

    The backward recomputes this rather than reloading saved statistics: re-normalising
    ``exp(z − max)`` keeps ``Σ a = 1`` to rounding even when the logits are huge and the softmax
    saturates, where ``exp(z − lse)`` would leave an O(ulp(lse)) error that the softmax backward
    ``a (ga − ⟨a, ga⟩)`` amplifies.
    """
    z = tl.where(n_mask[None, :], z, float("-inf"))
    ex = tl.exp(z - tl.max(z, axis=1)[:, None])
    return ex / tl.sum(ex, axis=1)[:, None]


@triton.jit
def _row_term(e, DISTANCE: tl.constexpr):
    """Per-row partial sums of one d-chunk of residuals: ``Σ e²`` (l2, squared_l2) or ``Σ |e|``."""
    if DISTANCE == 2:
        t = tl.sum(tl.abs(e), axis=1)
    else:
        t = tl.sum(e * e, axis=1)
    return t


@triton.jit
def _finish_distance(acc, eps, DISTANCE: tl.constexpr):
    """Distances from the summed row terms of :func:`_row_term`."""
    if DISTANCE == 0:
        dist = tl.sqrt(acc + eps)
    else:
        dist = acc
    return dist


@triton.jit
def _residual_grad_chunk(e, coef, DISTANCE: tl.constexpr):
    """``ge = g ∂D/∂e`` for one chunk: ``coef e`` (l2: coef = g / D; squared_l2: 2g) or
    ``coef sign(e)`` (l1: coef = g, sign(0) = 0)."""
    if DISTANCE == 2:
        de = tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0)).to(e.dtype)
    else:
        de = e
    return coef[:, None] * de


@triton.jit
def _grad_coef(g, acc, eps, DISTANCE: tl.constexpr):
    """The per-pair factor of :func:`_residual_grad_chunk` from ``g = ∂L/∂D`` and the row terms."""
    if DISTANCE == 0:
        coef = g / tl.sqrt(acc + eps)
    elif DISTANCE == 1:
        coef = 2.0 * g
    else:
        coef = g
    return coef


@triton.jit
def _logits(
    P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
    u, u_ok, it, it_ok, offs_n, n_mask, d,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
):  # fmt: skip
    """``z = (p ⊙ q) Kᵀ [BLOCK_B, BLOCK_N]``, accumulated over d in chunks of ``BLOCK_DC``."""
    z = _upcast(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), IS_FP64)
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + tl.arange(0, BLOCK_DC)
        dm = od < d
        p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
        q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
        Kc = _load_rows(K, offs_n, n_mask, od, dm, stride_kn, stride_kd, IS_FP64)
        z = tl.dot(p * q, tl.trans(Kc), acc=z, input_precision=DOT_PREC, out_dtype=z.dtype)
    return z


@triton.jit
def _accumulate(ptrs, x, mask, add):
    """``*ptrs = x (+ *ptrs where add)`` at locations this program owns alone (no atomics). The
    barrier orders this program's earlier stores there before the load, whatever thread made
    them."""
    tl.debug_barrier()
    x += tl.load(ptrs, mask=tl.where(add, mask, False), other=0.0).to(x.dtype)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _lrml_pair_forward_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [B] int32/int64
    items, stride_ib, stride_ic,  # [B, C] int32/int64
    D_out, stride_db, stride_dc,  # [B, C] out: distances
    B, C, U, I, N, d,
    eps: tl.float64,  # (module docstring, Precision)
    DISTANCE: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
):  # fmt: skip
    """relation="pair": program ``rb · C + c`` owns column ``c`` of row block ``rb``."""
    eps = _scalar(eps, IS_FP64)
    pid = tl.program_id(0).to(tl.int64)
    c = pid % C
    offs_b = (pid // C) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    b_mask = offs_b < B
    n_mask = offs_n < N
    u, u_ok = _load_indices(users + offs_b * stride_ub, offs_b, b_mask, U)
    it, it_ok = _load_indices(items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I)

    z = _logits(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        u, u_ok, it, it_ok, offs_n, n_mask, d,
        IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC,
    )  # fmt: skip
    a = _softmax(z, n_mask)
    acc = _upcast(tl.zeros((BLOCK_B,), dtype=tl.float32), IS_FP64)
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + tl.arange(0, BLOCK_DC)
        dm = od < d
        p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
        q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
        Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
        r = tl.dot(a, Mc, input_precision=DOT_PREC)
        acc += _row_term(p + r - q, DISTANCE)
    dist = _finish_distance(acc, eps, DISTANCE)
    tl.store(
        D_out + offs_b * stride_db + c * stride_dc, dist.to(D_out.dtype.element_ty), mask=b_mask
    )


@triton.jit
def _lrml_shared_forward_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [B] int32/int64
    items, stride_ib, stride_ic,  # [B, C] int32/int64
    D_out, stride_db, stride_dc,  # [B, C] out: distances
    B, C, U, I, N, d,
    eps: tl.float64,  # (module docstring, Precision)
    DISTANCE: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """relation="shared": program ``rb`` owns every column of row block ``rb``; one attention
    (column 0) per row, then ``e = p + r₀ − q_c`` for every column, chunk by chunk."""
    eps = _scalar(eps, IS_FP64)
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    b_mask = offs_b < B
    n_mask = offs_n < N
    u, u_ok = _load_indices(users + offs_b * stride_ub, offs_b, b_mask, U)
    it0, it0_ok = _load_indices(items + offs_b * stride_ib, offs_b, b_mask, I)

    z = _logits(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        u, u_ok, it0, it0_ok, offs_n, n_mask, d,
        IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC,
    )  # fmt: skip
    a0 = _softmax(z, n_mask)
    acc = _upcast(tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32), IS_FP64)
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + tl.arange(0, BLOCK_DC)
        dm = od < d
        p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
        Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
        pr = p + tl.dot(a0, Mc, input_precision=DOT_PREC)
        for c in range(C):
            it, it_ok = _load_indices(items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I)
            q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
            acc += tl.where(offs_c[None, :] == c, _row_term(pr - q, DISTANCE)[:, None], 0.0)
    dist = _finish_distance(acc, eps, DISTANCE)
    tl.store(
        D_out + offs_b[:, None] * stride_db + offs_c[None, :] * stride_dc,
        dist.to(D_out.dtype.element_ty),
        mask=b_mask[:, None] & (offs_c[None, :] < C),
    )


@triton.jit
def _hinge_kernel(
    D, stride_db, stride_dc,  # [B, C] compute dtype: distances
    L_out, stride_Lb,  # [B] parameter dtype: per-row hinge losses
    G_out, stride_gb, stride_gc,  # [B, C] compute dtype: ∂L_b/∂D[b, c]
    B, C,
    margin: tl.float64,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``L_b = Σ_{c≥1} relu(margin + D[b, 0] − D[b, c])`` and its gradient w.r.t. ``D``."""
    margin = tl.full((), margin, D.dtype.element_ty)  # the compute dtype (see _scalar)
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    b_mask = offs_b < B
    mask = b_mask[:, None] & (offs_c[None, :] < C)
    dist = tl.load(D + offs_b[:, None] * stride_db + offs_c[None, :] * stride_dc, mask=mask)
    d0 = tl.load(D + offs_b * stride_db, mask=b_mask)
    h = margin + d0[:, None] - dist
    neg = mask & (offs_c[None, :] > 0)
    # active unless h <= 0: a NaN term (a NaN distance) makes the loss NaN and passes its
    # gradient, as relu(NaN) does in the reference (torch's relu backward is 0 only where h <= 0)
    active = neg & ((h > 0) | (h != h))
    loss = tl.sum(tl.where(active, h, 0.0), axis=1)
    g = tl.where(active, -1.0, 0.0)
    g = tl.where(offs_c[None, :] == 0, -tl.sum(g, axis=1)[:, None], g)
    tl.store(
        G_out + offs_b[:, None] * stride_gb + offs_c[None, :] * stride_gc,
        g.to(G_out.dtype.element_ty),
        mask=mask,
    )
    tl.store(L_out + offs_b * stride_Lb, loss.to(L_out.dtype.element_ty), mask=b_mask)


@triton.jit
def _keys_pass(
    P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
    M, stride_mn, stride_md, GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
    gk_base, stride_gkd, offs_b, b_mask, u, u_ok, it, it_ok, c, offs_n, n_mask, offs_k, d,
    a, gz, coef, add_k, add_p,
    GP_HAS_GE: tl.constexpr, DISTANCE: tl.constexpr, IS_FP64: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_DC: tl.constexpr,
):  # fmt: skip
    """The last backward pass over d for the pairs (users, items[:, c]) of a row block, given
    the attention ``a``, the logit gradient ``gz`` and the factor ``coef`` of ``ge``:
    ``gs = gz K``, ``gK += gzᵀ (p ⊙ q)``, ``GQ[:, c] = gs ⊙ p − ge`` and
    ``GP += gs ⊙ q (+ ge if GP_HAS_GE)``."""
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + offs_k
        dm = od < d
        bd_mask = b_mask[:, None] & dm[None, :]
        p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
        q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
        Kc = _load_rows(K, offs_n, n_mask, od, dm, stride_kn, stride_kd, IS_FP64)
        Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
        ge = _residual_grad_chunk(p + tl.dot(a, Mc, input_precision=DOT_PREC) - q, coef, DISTANCE)
        gs = tl.dot(gz, Kc, input_precision=DOT_PREC)  # [BLOCK_B, BLOCK_DC]
        gKc = tl.dot(tl.trans(gz), p * q, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_DC]
        _accumulate(gk_base + od[None, :] * stride_gkd, gKc, n_mask[:, None] & dm[None, :], add_k)
        tl.store(
            GQ + offs_b[:, None] * stride_gqb + c * stride_gqc + od[None, :] * stride_gqd,
            (gs * p - ge).to(GQ.dtype.element_ty),
            mask=bd_mask,
        )
        gp = gs * q
        if GP_HAS_GE:
            gp += ge
        _accumulate(
            GP + offs_b[:, None] * stride_gpb + od[None, :] * stride_gpd, gp, bd_mask, add_p
        )


@triton.jit
def _pair_backward_column(
    P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
    M, stride_mn, stride_md, items, stride_ib, stride_ic, G, stride_gb, stride_gc,
    Dist, stride_db, stride_dc,
    GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
    gk_base, stride_gkd, gm_base, stride_gmd,
    offs_b, b_mask, u, u_ok, rw, offs_n, n_mask, offs_k, c, add, I, d, eps,
    DISTANCE: tl.constexpr, HAS_D: tl.constexpr, IS_FP64: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):  # fmt: skip
    """relation="pair", column ``c`` of one row block, in four passes over d (each recomputes
    what it needs rather than keeping [BLOCK_B, d] tiles live): logits; distance (l2 without
    the forward's ``Dist`` only); ``ga = ge Mᵀ`` and ``gM += aᵀ ge``; ``gs = gz K``,
    ``gK += gzᵀ s`` and the row gradients."""
    it, it_ok = _load_indices(items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I)
    g = _upcast(tl.load(G + offs_b * stride_gb + c * stride_gc, mask=b_mask, other=0.0), IS_FP64)
    g = tl.where(g == 0, 0.0, g * rw)  # an inactive hinge term stays 0 under rw = inf or NaN
    z = _logits(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        u, u_ok, it, it_ok, offs_n, n_mask, d,
        IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC,
    )  # fmt: skip
    # padding rows (s = 0): logit 0, not 0 · ±inf = NaN, which gK += gzᵀ s would sum in
    a = _softmax(tl.where(b_mask[:, None], z, 0.0), n_mask)
    if HAS_D:  # (l2 only) ∂D/∂e = e / D with the forward's D
        dist = tl.load(Dist + offs_b * stride_db + c * stride_dc, mask=b_mask, other=1.0)
        coef = g / _upcast(dist, IS_FP64)
    else:
        acc = _upcast(tl.zeros((BLOCK_B,), dtype=tl.float32), IS_FP64)
        if DISTANCE == 0:
            for d0 in range(0, d, BLOCK_DC):
                od = d0 + offs_k
                dm = od < d
                p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
                q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
                Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
                acc += _row_term(p + tl.dot(a, Mc, input_precision=DOT_PREC) - q, DISTANCE)
        coef = _grad_coef(g, acc, eps, DISTANCE)
    coef = tl.where(b_mask, coef, 0.0)  # no 0/0 on padding

    ga = _upcast(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), IS_FP64)
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + offs_k
        dm = od < d
        p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
        q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
        Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
        ge = _residual_grad_chunk(p + tl.dot(a, Mc, input_precision=DOT_PREC) - q, coef, DISTANCE)
        ga = tl.dot(ge, tl.trans(Mc), acc=ga, input_precision=DOT_PREC, out_dtype=ga.dtype)
        gMc = tl.dot(tl.trans(a), ge, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_DC]
        _accumulate(gm_base + od[None, :] * stride_gmd, gMc, n_mask[:, None] & dm[None, :], add)
    gz = a * (ga - tl.sum(a * ga, axis=1)[:, None])

    _keys_pass(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        M, stride_mn, stride_md, GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
        gk_base, stride_gkd, offs_b, b_mask, u, u_ok, it, it_ok, c, offs_n, n_mask, offs_k, d,
        a, gz, coef, add, c > 0,
        True, DISTANCE, IS_FP64, DOT_PREC, BLOCK_DC,
    )  # fmt: skip


@triton.jit
def _shared_backward_tile(
    P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
    M, stride_mn, stride_md, items, stride_ib, stride_ic, G, stride_gb, stride_gc,
    Dist, stride_db, stride_dc,
    GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
    gk_base, stride_gkd, gm_base, stride_gmd,
    offs_b, b_mask, u, u_ok, rw, offs_n, n_mask, offs_k, add, C, I, d, eps,
    DISTANCE: tl.constexpr, HAS_D: tl.constexpr, IS_FP64: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DC: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """relation="shared", one row block, every column, in three passes over d (plus one for the
    l2 distances without the forward's ``Dist``): the relation of column 0 collects
    ``gr₀ = Σ_c ge_c``."""
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    c_mask = offs_c < C
    it0, it0_ok = _load_indices(items + offs_b * stride_ib, offs_b, b_mask, I)
    g = tl.load(
        G + offs_b[:, None] * stride_gb + offs_c[None, :] * stride_gc,
        mask=b_mask[:, None] & c_mask[None, :],
        other=0.0,
    )
    g = _upcast(g, IS_FP64)
    g = tl.where(g == 0, 0.0, g * rw[:, None])  # [BLOCK_B, BLOCK_C]; as in the pair pass
    z = _logits(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        u, u_ok, it0, it0_ok, offs_n, n_mask, d,
        IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC,
    )  # fmt: skip
    # padding rows (s = 0): logit 0, not 0 · ±inf = NaN, which gK += gzᵀ s would sum in
    a0 = _softmax(tl.where(b_mask[:, None], z, 0.0), n_mask)
    bc_mask = b_mask[:, None] & c_mask[None, :]
    if HAS_D:  # (l2 only) ∂D/∂e = e / D with the forward's D
        dist = tl.load(
            Dist + offs_b[:, None] * stride_db + offs_c[None, :] * stride_dc,
            mask=bc_mask,
            other=1.0,
        )
        coef = g / _upcast(dist, IS_FP64)  # [BLOCK_B, BLOCK_C]
    else:
        acc = _upcast(tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32), IS_FP64)
        if DISTANCE == 0:
            for d0 in range(0, d, BLOCK_DC):
                od = d0 + offs_k
                dm = od < d
                p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
                Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
                pr = p + tl.dot(a0, Mc, input_precision=DOT_PREC)
                for c in range(C):
                    it, it_ok = _load_indices(
                        items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I
                    )
                    q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
                    term = _row_term(pr - q, DISTANCE)[:, None]
                    acc += tl.where(offs_c[None, :] == c, term, 0.0)
        coef = _grad_coef(g, acc, eps, DISTANCE)  # [BLOCK_B, BLOCK_C]
    coef = tl.where(bc_mask, coef, 0.0)  # no 0/0 on padding
    coef0 = tl.sum(tl.where(offs_c[None, :] == 0, coef, 0.0), axis=1)

    ga = _upcast(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), IS_FP64)
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + offs_k
        dm = od < d
        bd_mask = b_mask[:, None] & dm[None, :]
        p = _load_rows(P, u, u_ok, od, dm, stride_pu, stride_pd, IS_FP64)
        q = _load_rows(Q, it0, it0_ok, od, dm, stride_qi, stride_qd, IS_FP64)
        Mc = _load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
        pr = p + tl.dot(a0, Mc, input_precision=DOT_PREC)
        gr = _residual_grad_chunk(pr - q, coef0, DISTANCE)
        for c in range(1, C):
            it, it_ok = _load_indices(items + offs_b * stride_ib + c * stride_ic, offs_b, b_mask, I)
            q = _load_rows(Q, it, it_ok, od, dm, stride_qi, stride_qd, IS_FP64)
            coef_c = tl.sum(tl.where(offs_c[None, :] == c, coef, 0.0), axis=1)
            ge = _residual_grad_chunk(pr - q, coef_c, DISTANCE)
            gr += ge
            tl.store(
                GQ + offs_b[:, None] * stride_gqb + c * stride_gqc + od[None, :] * stride_gqd,
                (-ge).to(GQ.dtype.element_ty),
                mask=bd_mask,
            )
        ga = tl.dot(gr, tl.trans(Mc), acc=ga, input_precision=DOT_PREC, out_dtype=ga.dtype)
        gMc = tl.dot(tl.trans(a0), gr, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_DC]
        _accumulate(gm_base + od[None, :] * stride_gmd, gMc, n_mask[:, None] & dm[None, :], add)
        tl.store(GP + offs_b[:, None] * stride_gpb + od[None, :] * stride_gpd, gr, mask=bd_mask)
    gz = a0 * (ga - tl.sum(a0 * ga, axis=1)[:, None])

    _keys_pass(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        M, stride_mn, stride_md, GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
        gk_base, stride_gkd, offs_b, b_mask, u, u_ok, it0, it0_ok, 0, offs_n, n_mask, offs_k, d,
        a0, gz, coef0, add, True,
        False, DISTANCE, IS_FP64, DOT_PREC, BLOCK_DC,
    )  # fmt: skip


@triton.jit
def _lrml_backward_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [B]
    items, stride_ib, stride_ic,  # [B, C]
    G, stride_gb, stride_gc,  # [B, C] ∂L/∂D (any float dtype, any strides)
    Dist, stride_db, stride_dc,  # [B, C] compute dtype: the forward's D (HAS_D: l2 only)
    W, stride_wb,  # [B] per-row factor on G (HAS_W), e.g. the upstream grad of per-row losses
    GP, stride_gpb, stride_gpd,  # [B, d] out (compute dtype): gradient of each gathered user row
    GQ, stride_gqb, stride_gqc, stride_gqd,  # [B, C, d] out: gradient of each gathered item row
    GK, stride_gkp, stride_gkn, stride_gkd,  # [programs, N, d] out: per-program partials
    GM, stride_gmp, stride_gmn, stride_gmd,  # [programs, N, d] out: idem for memory
    B, C, U, I, N, d,
    scale: tl.float64, eps: tl.float64,
    DISTANCE: tl.constexpr, SHARED: tl.constexpr, HAS_W: tl.constexpr, HAS_D: tl.constexpr,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` of ``G`` owns row blocks ``pid, pid + G, …`` (all their columns), in that
    order, and sums its keys/memory contributions into its own ``[N, d]`` slots: no atomics,
    and a fixed order of additions (the slots are summed afterwards, also in a fixed order)."""
    scale = _scalar(scale, IS_FP64)
    eps = _scalar(eps, IS_FP64)
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_DC)
    n_mask = offs_n < N
    gk_base = GK + pid.to(tl.int64) * stride_gkp + offs_n[:, None] * stride_gkn
    gm_base = GM + pid.to(tl.int64) * stride_gmp + offs_n[:, None] * stride_gmn
    for tile in range(pid, tl.cdiv(B, BLOCK_B), tl.num_programs(0)):
        offs_b = (tile * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # < B + BLOCK_B: int32
        b_mask = offs_b < B
        u, u_ok = _load_indices(users + offs_b * stride_ub, offs_b, b_mask, U)
        if HAS_W:
            rw = tl.load(W + offs_b * stride_wb, mask=b_mask, other=0.0)
            rw = _upcast(rw, IS_FP64) * scale
        else:
            rw = _upcast(tl.zeros((BLOCK_B,), dtype=tl.float32), IS_FP64) + scale
        if SHARED:
            _shared_backward_tile(
                P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
                M, stride_mn, stride_md, items, stride_ib, stride_ic, G, stride_gb, stride_gc,
                Dist, stride_db, stride_dc,
                GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
                gk_base, stride_gkd, gm_base, stride_gmd,
                offs_b, b_mask, u, u_ok, rw, offs_n, n_mask, offs_k, tile > pid, C, I, d, eps,
                DISTANCE, HAS_D, IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC, BLOCK_C,
            )  # fmt: skip
        else:
            for c in range(C):
                add = (tile > pid) | (c > 0)  # this program already wrote its K/M slots
                _pair_backward_column(
                    P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
                    M, stride_mn, stride_md, items, stride_ib, stride_ic, G, stride_gb, stride_gc,
                    Dist, stride_db, stride_dc,
                    GP, stride_gpb, stride_gpd, GQ, stride_gqb, stride_gqc, stride_gqd,
                    gk_base, stride_gkd, gm_base, stride_gmd,
                    offs_b, b_mask, u, u_ok, rw, offs_n, n_mask, offs_k, c, add, I, d, eps,
                    DISTANCE, HAS_D, IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC,
                )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    """The operands of every ``tl.dot``: tf32 (tensor cores) for bf16 parameters, and for fp32
    ones where the user allowed TF32 for fp32 matmuls; IEEE (FMA units) otherwise.

    bf16 values are exact in tf32, and truncating an fp32 product or softmax weight to tf32
    (2⁻¹⁰) errs 4× less than bf16's own rounding of the results (2⁻⁸), so a bf16 model loses
    nothing it could keep. fp16 (2⁻¹¹) is finer than tf32, and fp32 at "highest" asks for IEEE:
    both stay on the FMA units, where the dots bound the kernels (module docstring, Roofline).
    """
    if dtype == torch.bfloat16 or (dtype == torch.float32 and fp32_matmul_precision() != "highest"):
        return "tf32"
    return "ieee"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sm_count(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return H200_SMS


def block_config(B: int, N: int, d: int, t: torch.Tensor, backward: bool = False,
                 dots: str | None = None) -> dict:  # fmt: skip
    """Tile shapes, warps and register caps (from the sm_90 register reports, module docstring)
    for the tables ``t`` and dot precision ``dots`` (None: :func:`_dot_precision`'s for them).

    A program works on 16-row blocks (tl.dot needs 16) and walks d in chunks of ``BLOCK_DC``
    columns (a runtime trip count: ptxas keeps the loop rolled), so only a few
    ``[16, BLOCK_DC]`` tiles are live: 16 × 32 over 4 warps in the forward (``maxnreg`` 128:
    4 programs per SM; left to itself ptxas sometimes settled lower and spilled a few words),
    16 × 16 over 8 warps in the backward, which keeps more tiles live (every register ptxas
    wants: 128-244 in IEEE fp32, 1 program per SM, no spills at any d, N, distance, relation
    or batch shape of the report in Triton 3.6 or 3.9). Triton's IEEE dots are FMA loops over
    each thread's elements of a blocked layout, their operands read from shared memory: on
    16 warps (512 threads) a 16 × 16 tile is held twice, and the backward's 16 × 16 dots ran
    twice (per program 1.5-2x the FFMA and shared-memory load instructions of 8 warps, counted
    in the SASS at d = 100). Tensor-core dots (tf32) are MMAs whose warps Triton lays along
    the rows: the backward takes 4 warps (each computes every tile of its 16 rows; on 8, twice
    as many did the same), and at a batch of at least 64 rows per SM, 64-row blocks on 8
    warps (below). Under the interpreter, one chunk and large row blocks: fewer, bigger numpy
    operations.
    """
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, triton.next_power_of_2(N))
    if _interpreted(t):
        block_b = min(512, max(16, triton.next_power_of_2(B)))
        return {"BLOCK_B": block_b, "BLOCK_N": block_n, "BLOCK_DC": block_d}
    dots = dots or _dot_precision(t.dtype)
    block_dc = 16 if backward else min(block_d, 32)
    cfg = {"BLOCK_B": 16, "BLOCK_N": block_n, "BLOCK_DC": block_dc, "num_stages": 1}
    if dots == "tf32" and triton.cdiv(B, WIDE_BLOCK_B) >= _sm_count(t):
        # Tensor-core dots and a batch that fills the SMs with 64-row blocks: 8 warps
        # (warpgroup MMA: M = 64 per warpgroup) share the 64 rows. With 16-row blocks the MMA
        # layouts give each of 8 warps the same 16 rows (8 of them on one m16 tile), so a
        # program holds and multiplies the same fragments up to 8 times over; at 64 rows the
        # same registers (forward 69-128, backward 182-255) carry 4x the rows and load each
        # chunk of K and M once per 64 rows instead of per 16.
        cfg["BLOCK_B"] = WIDE_BLOCK_B
        return {**cfg, "num_warps": 8, "maxnreg": 255 if backward else 128}
    if not backward:
        return {**cfg, "num_warps": 4, "maxnreg": 128}
    # The backward takes every register ptxas wants. tf32 on 4 warps: 137-255 registers, 2-3
    # programs per SM (on 16 warps it spilled ~150 B; on 2, 8-48 B). IEEE on 8 warps (on 16,
    # capped at 128 registers, the shared relation spilled 4-32 B in Triton 3.6); fp64 (the
    # tests' exact references, twice the registers a tile: on 16 warps it spilled 0.2-1.9 KB,
    # on 8 0-104 B).
    return {**cfg, "num_warps": 4 if dots == "tf32" else 8, "maxnreg": 255}


def _hinge_block_rows(B: int, block_c: int, t: torch.Tensor) -> int:
    """Rows per program of ``_hinge_kernel``: tiles of up to 1,024 elements, halved (down to
    16 rows) while the launch would leave SMs without a program (B = 4096 × 5: 16 rows, 256
    programs on 132 SMs, instead of 32 programs of 128 rows)."""
    rows = max(16, min(128, 1024 // block_c))
    if not _interpreted(t):
        while rows > 16 and triton.cdiv(B, rows) < _sm_count(t):
            rows //= 2
    return rows


def _backward_programs(B: int, cfg: dict, t: torch.Tensor) -> int:
    """One program per row block up to as many as the SMs hold at once (from the register cap);
    beyond that each program takes several row blocks (and the [programs, N, d] partial
    buffers stay small)."""
    tiles = triton.cdiv(B, cfg["BLOCK_B"])
    if _interpreted(t):
        return tiles
    regs = cfg.get("maxnreg") or REGISTERS_PER_SM // (32 * cfg["num_warps"])
    per_sm = max(1, REGISTERS_PER_SM // (regs * 32 * cfg["num_warps"]))
    return min(tiles, per_sm * _sm_count(t))


def _param_args(user_emb, item_emb, keys, memory):
    return (
        user_emb, user_emb.stride(0), user_emb.stride(1),
        item_emb, item_emb.stride(0), item_emb.stride(1),
        keys, keys.stride(0), keys.stride(1),
        memory, memory.stride(0), memory.stride(1),
    )  # fmt: skip


def _launch_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "programs"}


def forward_launch(
    user_emb, item_emb, keys, memory, users, items, *, distance, relation, eps, margin=0.0,
    hinge=False, store_d=True, config=None, exact=False,
):  # fmt: skip
    """Run the forward kernels. Returns ``(D or None, L or None, G or None)``.

    ``D [B, C]`` and ``L [B]`` in the parameter dtype and ``G = ∂L_b/∂D [B, C]`` in the compute
    dtype. The distance kernel writes ``D`` (in the compute dtype when the hinge follows); the
    hinge kernel reads it and writes ``L`` and ``G``. ``config`` overrides :func:`block_config`.
    ``exact`` (the top-k re-score): ``D`` in the compute dtype and IEEE dots whatever torch's
    fp32 matmul precision. An item index outside ``[0, I)`` (-1) gives the distance to q = 0.
    """
    B, C = items.shape
    N, d = keys.shape
    dtype = user_emb.dtype
    ct = _compute_dtype(dtype)
    dev = user_emb.device
    shared = relation == "shared"
    D = torch.empty(B, C, dtype=ct if hinge or exact else dtype, device=dev)
    dots = "ieee" if exact else _dot_precision(dtype)
    cfg = config or block_config(B, N, d, user_emb, dots=dots)
    blocks = triton.cdiv(B, cfg["BLOCK_B"])
    args = (
        *_param_args(user_emb, item_emb, keys, memory),
        users, users.stride(0),
        items, items.stride(0), items.stride(1),
        D, D.stride(0), D.stride(1),
        B, C, user_emb.shape[0], item_emb.shape[0], N, d,
        float(eps),
    )  # fmt: skip
    consts = {
        "DISTANCE": DISTANCE_CODES[distance],
        "IS_FP64": dtype == torch.float64,
        "DOT_PREC": dots,
        **_launch_options(cfg),
    }
    L = G = None
    with _device_guard(user_emb):
        if B:
            if shared:
                bc = triton.next_power_of_2(C)
                _lrml_shared_forward_kernel[(blocks,)](*args, **consts, BLOCK_C=bc)
            else:
                _lrml_pair_forward_kernel[(blocks * C,)](*args, **consts)
        if hinge:
            L = torch.empty(B, dtype=dtype, device=dev)
            G = torch.empty(B, C, dtype=ct, device=dev)
            block_c = triton.next_power_of_2(C)
            block_r = _hinge_block_rows(B, block_c, D)
            if B:
                _hinge_kernel[(triton.cdiv(B, block_r),)](
                    D, D.stride(0), D.stride(1),
                    L, L.stride(0),
                    G, G.stride(0), G.stride(1),
                    B, C, float(margin),
                    BLOCK_R=block_r, BLOCK_C=block_c,
                )  # fmt: skip
    return (D if store_d else None), L, G


def backward_launch(
    user_emb, item_emb, keys, memory, users, items, G, W=None, scale=1.0, *, distance,
    relation, eps, row_dtype=None, config=None, D=None,
):  # fmt: skip
    """Run the backward kernel. ``g[b, c] = G[b, c] · W[b] · scale`` is ``∂L/∂D``.

    ``D``: the forward's distances ``[B, C]`` in the compute dtype, or None. With distance l2
    the kernel takes ``∂D/∂e = e / D`` from them and skips a pass over d (one of four).

    Returns ``(grad_user_rows [B, d], grad_item_rows [B, C, d], grad_keys [N, d],
    grad_memory [N, d])``: rows in ``row_dtype`` (default the parameter dtype), keys/memory
    summed in the compute dtype (per-program partials, then a fixed-order sum over programs)
    and cast to the parameter dtype. ``config`` overrides :func:`block_config` (with
    ``programs``: how many programs share the row blocks).
    """
    B, C = items.shape
    N, d = keys.shape
    dtype = user_emb.dtype
    ct = _compute_dtype(dtype)
    dev = user_emb.device
    row_dtype = dtype if row_dtype is None else row_dtype
    dots = _dot_precision(dtype)
    cfg = config or block_config(B, N, d, user_emb, backward=True, dots=dots)
    programs = cfg.get("programs") or _backward_programs(B, cfg, user_emb)
    programs = max(1, min(programs, triton.cdiv(B, cfg["BLOCK_B"])))
    GP = torch.empty(B, d, dtype=ct, device=dev)
    GQ = torch.empty(B, C, d, dtype=row_dtype, device=dev)
    GK = torch.empty(programs, N, d, dtype=ct, device=dev)
    GM = torch.empty(programs, N, d, dtype=ct, device=dev)
    if B == 0:
        return GP.to(row_dtype), GQ, keys.new_zeros(N, d), memory.new_zeros(N, d)
    Wt = W if W is not None else G
    has_d = D is not None and distance == "l2"
    Dt = D if has_d else G
    with _device_guard(user_emb):
        _lrml_backward_kernel[(programs,)](
            *_param_args(user_emb, item_emb, keys, memory),
            users, users.stride(0),
            items, items.stride(0), items.stride(1),
            G, G.stride(0), G.stride(1),
            Dt, Dt.stride(0), Dt.stride(1),
            Wt, Wt.stride(0),
            GP, GP.stride(0), GP.stride(1),
            GQ, GQ.stride(0), GQ.stride(1), GQ.stride(2),
            GK, GK.stride(0), GK.stride(1), GK.stride(2),
            GM, GM.stride(0), GM.stride(1), GM.stride(2),
            B, C, user_emb.shape[0], item_emb.shape[0], N, d,
            float(scale), float(eps),
            DISTANCE=DISTANCE_CODES[distance], SHARED=relation == "shared",
            HAS_W=W is not None, HAS_D=has_d, IS_FP64=dtype == torch.float64,
            DOT_PREC=dots, BLOCK_C=triton.next_power_of_2(C),
            **_launch_options(cfg),
        )  # fmt: skip
    # Fixed-order reduction of the per-program partials: same inputs, same bits.
    return GP.to(row_dtype), GQ, GK.sum(0).to(dtype), GM.sum(0).to(dtype)


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


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "lrml_kernels: the triton backend is differentiable once (no double backward); use "
        'backend="torch" for higher-order gradients'
    )


_distances_fwd.register_autograd(_distances_backward, setup_context=_setup_distances)
_hinge_fwd.register_autograd(_hinge_backward, setup_context=_setup_hinge)
# A gradient of these ops is a constant to autograd: differentiating it raises instead of
# silently losing the second-order terms (as the cpu and cuda backends do).
_backward_op.register_autograd(_no_double_backward)


# ----------------------------------------------------------------------------------------------
# Backend functions (inputs validated and contiguous by lrml_kernels.ops)
# ----------------------------------------------------------------------------------------------


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
    return _distances_fwd(
        user_emb, item_emb, keys, memory, users, items, distance, relation, float(eps),
        bool(sparse_grad),
    )  # fmt: skip


def hinge_loss(
    user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps, reduction,
    sparse_grad,
):  # fmt: skip
    """Fused hinge loss: scalar ("sum", "mean") or per-row ``[B]`` ("none")."""
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
    D, L, G = forward_launch(
        user_emb, item_emb, keys, memory, users, items, distance=distance, relation=relation,
        eps=eps, margin=margin, hinge=True,
    )  # fmt: skip
    scale = 1.0 / B if reduction == "mean" else 1.0
    gp, gq, gK, gM = backward_launch(
        user_emb, item_emb, keys, memory, users, items, G, None, scale, distance=distance,
        relation=relation, eps=eps, D=D,
    )  # fmt: skip
    return _reduce(L, reduction), gp, gq, gK, gM
