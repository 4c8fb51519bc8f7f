"""The attention and relation vectors of (user, item) pairs (``lrml_relations``, SPEC.md).

One program per block of ``BLOCK_B`` pairs, built from the distance kernels' pieces and run
under their launch configuration (:func:`~lrml_kernels.triton.distance_kernels.block_config`):
the logits ``z = (p ⊙ q) Kᵀ`` accumulated over d in chunks, the masked max-subtracted softmax
``a``, stored ``[B, N]``, then ``r = a M`` chunk by chunk, stored ``[B, d]``. Forward only.
fp16/bf16/fp32 parameters are computed in fp32, fp64 in fp64; outputs in the parameter dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrml_kernels.triton import distance_kernels as TD


@triton.jit
def _lrml_relations_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [B] int32/int64
    items, stride_ib,  # [B] int32/int64
    A_out, stride_ab, stride_an,  # [B, N] out: attention
    R_out, stride_rb, stride_rd,  # [B, d] out: relation vectors
    B, U, I, N, d,
    IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
):  # fmt: skip
    """Program ``pid`` owns the pairs ``pid · BLOCK_B ..`` (users[b], items[b])."""
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    b_mask = offs_b < B
    n_mask = offs_n < N
    u, u_ok = TD._load_indices(users + offs_b * stride_ub, offs_b, b_mask, U)
    it, it_ok = TD._load_indices(items + offs_b * stride_ib, offs_b, b_mask, I)
    z = TD._logits(
        P, stride_pu, stride_pd, Q, stride_qi, stride_qd, K, stride_kn, stride_kd,
        u, u_ok, it, it_ok, offs_n, n_mask, d,
        IS_FP64, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_DC,
    )  # fmt: skip
    a = TD._softmax(z, n_mask)
    tl.store(
        A_out + offs_b[:, None] * stride_ab + offs_n[None, :] * stride_an,
        a.to(A_out.dtype.element_ty),
        mask=b_mask[:, None] & n_mask[None, :],
    )
    for d0 in range(0, d, BLOCK_DC):
        od = d0 + tl.arange(0, BLOCK_DC)
        dm = od < d
        Mc = TD._load_rows(M, offs_n, n_mask, od, dm, stride_mn, stride_md, IS_FP64)
        r = tl.dot(a, Mc, input_precision=DOT_PREC)
        tl.store(
            R_out + offs_b[:, None] * stride_rb + od[None, :] * stride_rd,
            r.to(R_out.dtype.element_ty),
            mask=b_mask[:, None] & dm[None, :],
        )


@torch.no_grad()
def relations(user_emb, item_emb, keys, memory, users, items, config=None):
    """``(a [B, N], r [B, d])`` of the pairs ``(users[b], items[b])`` (users, items: ``[B]``),
    in the parameter dtype. ``config`` overrides :func:`TD.block_config`."""
    B = users.shape[0]
    N, d = keys.shape
    a = user_emb.new_empty(B, N)
    r = user_emb.new_empty(B, d)
    if B == 0:
        return a, r
    dots = TD._dot_precision(user_emb.dtype)
    cfg = config or TD.block_config(B, N, d, user_emb, dots=dots)
    with TD._device_guard(user_emb):
        _lrml_relations_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
            *TD._param_args(user_emb, item_emb, keys, memory),
            users, users.stride(0),
            items, items.stride(0),
            a, a.stride(0), a.stride(1),
            r, r.stride(0), r.stride(1),
            B, user_emb.shape[0], item_emb.shape[0], N, d,
            IS_FP64=user_emb.dtype == torch.float64,
            DOT_PREC=dots,
            **TD._launch_options(cfg),
        )  # fmt: skip
    return a, r
