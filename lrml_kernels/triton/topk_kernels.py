"""Exact full-catalogue top-k (SPEC.md "Ranking all items"): tensor-core screen, exact re-score.

Three steps per block of users (the exactness argument is SPEC.md "Exact top-k from a screen"):

1. **Screen** (:func:`_screen_kernel`, the hot loop). A program owns ``BLOCK_U`` users and streams
   the whole catalogue in tiles of ``BLOCK_I`` items. Per (item tile, user) the logits of every
   memory slot are one GEMM ``z = Q_tile (p ⊙ K)ᵀ`` (``[BLOCK_I, d] × [d, N]``, ``tl.dot`` on
   tensor cores in tf32 whatever the tables' dtype and torch's fp32 matmul precision; the
   operands are rounded to tf32 explicitly, so the interpreter reproduces the GPU's products
   exactly). A spare column of ``Kᵀ`` holds ones, so the same GEMM yields ``p·q``.
   ``l2``/``squared_l2`` then use the rewrite
   ``‖e‖² = ‖p‖² + ‖q‖² − 2p·q + 2a·(Mp) − 2a·(Mq) + aᵀ(MMᵀ)a`` with ``Mp``, ``Mq``, ``MMᵀ``
   precomputed and the quadratic form as a second small GEMM ``W (MMᵀ)``; ``l1`` forms
   ``r = a M`` (a GEMM) and ``e = p + r − q`` on chip. Each screened distance becomes a guaranteed
   **lower bound** ``lo`` on the exact distance (screened value minus a per-pair error bound
   ``δ``). Excluded items (a per-call bitmask) and padding never enter. A running list of the
   ``KC`` smallest ``(lo, id)`` keys per user lives in registers and is merged with each tile by
   ``KC`` rounds of min-extraction (skipped when no key of the tile beats the list), with the
   smallest key that was dropped.
2. **Re-score** (:func:`rescore_launch`): the ``KC`` candidates of every user by the direct SPEC
   formula (``e = p + r − q``; IEEE fp32 dots, fp64 for fp64 parameters). Users × candidates is
   the pair distances op: this is the distance kernels' pair forward (d in chunks, spill-free).
3. **Select and verify** (torch): the k smallest exact distances among the candidates, ties to the
   smaller id. A user's answer is certified when nothing was dropped or its k-th exact distance
   is below the smallest dropped lower bound; an uncertified user (the list was too short for its
   near-ties) is recomputed by the direct all-items path (:func:`_topk_direct`). The result is
   the exact answer either way.

Roofline (Netflix: U = 480,189 users × I = 17,770 items, d = 100, N = 20, k = 10, H200): the logit
GEMMs are 2·U·I·N·d = 3.4e13 FLOP; with the padding of the tile shapes (N+1 → 32, d → 128) the
tensor cores execute 2·U·I·32·128 = 7.0e13, plus the quadratic-form GEMM 2·U·I·32·32 = 1.7e13:
8.7e13 FLOP, 0.18 s at the tf32 dense peak (~495 TFLOP/s; bf16's ~990 would halve it, but its
operands widen the bound 8×: :data:`SCREEN_UNIT`); the screen's
32-item tiles run ``mma.sync`` (HMMA), which does not reach Hopper's ``wgmma`` peak, so budget
~2× that. Scaling ``Kᵀ`` by each user's ``p`` costs ``d·N`` products per (user, tile): ~1e12
flops, ~0.02 s. The per-pair CUDA-core work (softmax over 32 slots: 32 exps, ~8 flops per
slot) is ~2.7e11 exps and ~2.2e12 flops: ~0.07 s on the MUFU units and ~0.03 s on the FMA
pipes, partly overlapped with the MMAs. Memory traffic is small (the items, 9 MB with d padded
to 128, are re-read from L2 by every program of 16 users: ~0.27 TB in all, ~0.03 s; the
candidate lists are B·KC·8 bytes). l1 adds the ``[32, 32] × [32, 128]`` GEMM for ``r`` and ~4
flops per (pair, d) for ``e`` (~3.4e12 flops, ~0.1 s). Static facts (sm_90, d ∈ {64, 100, 128},
N ∈ {10, 20}, fp32 and bf16, KC = 32, with and without the exclusion mask; :func:`screen_config`):
152-254 registers on 2 warps, zero spills in Triton 3.6 and 3.9, 15-56 KB shared memory, HMMA in
the SASS, each MMA tile computed by one warp (``benchmarks/kernel_report.py``,
tests/test_triton_topk_static.py): 4-6 programs per SM, so
one user's GEMM → softmax → GEMM chain overlaps another program's. Expected ~0.3-0.6 s for l2
in tf32 (target ≤ 1 s), ~2× that for l1, plus the users the certificate sends to the direct
path (~30 µs each). These are estimates owed to a GPU run (benchmarks/gpu_check, ``pytest -m
gpu tests/test_triton_topk.py`` prints the fallback rate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrml_kernels.triton import distance_kernels as TD

_rows = TD._load_rows  # base[rows, :d] as a compute-dtype tile (a jit function)
_scalar = TD._scalar  # a float argument in the compute dtype (a jit function)
_interpreted, _device_guard, _compute_dtype = TD._interpreted, TD._device_guard, TD._compute_dtype
_param_args = TD._param_args

DISTANCE_CODES = TD.DISTANCE_CODES
# Unit roundoff of the screening GEMM inputs: tf32 keeps 10 mantissa bits. (bf16 operands, 7
# bits, widen the bound 8x: on Netflix-shaped data nearly every user then failed the certificate
# and took the direct path, 62 of 64 users in l2; so the screen is tf32 at every precision.)
SCREEN_UNIT = 2.0**-11
# Largest candidate list per user; a larger k uses the direct path.
MAX_CANDIDATES = 256
# Bytes of per-chunk working memory of the screened path (exclusion bitmask, fp64 user rows, keys).
SCREEN_CHUNK_BYTES = 1 << 29
# Elements of the per-chunk distance buffer of the direct path (users_chunk × I).
CHUNK_ELEMENTS = 1 << 24
# Multiplier of the screening error bound, and the certificate switch: only tests that show that
# the margin matters change them.
BOUND_SCALE = 1.0
CERTIFY = True
# Statistics of the last call: users certified by the screen, users recomputed directly.
last_stats = {"screened": 0, "fallback": 0}

_MAXKEY = torch.iinfo(torch.int64).max


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_operand(x):
    """Round fp32 ``x`` to tf32 (10 mantissa bits, ties away), the tensor cores' input."""
    b = x.to(tl.int32, bitcast=True)
    return ((b + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _screen_dot(a, b):
    """fp32-accumulated product of operands already rounded to tf32."""
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _merge(state, drop, tile, KC: tl.constexpr):
    """Keep the ``KC`` smallest keys of ``state ∪ tile`` per row; ``drop`` takes the rest's min.

    Keys are unique (the item id is in the low bits) except the empty key int64 max, so ``KC``
    rounds of "take the row minimum, remove it" select them; the list needs no order. A tile none
    of whose keys beats a list's largest (the common case once the lists fill) costs one min.
    """
    big: tl.constexpr = 0x7FFFFFFFFFFFFFFF
    tile_min = tl.min(tile, axis=1)
    if tl.max((tile_min < tl.max(state, axis=1)).to(tl.int32)) > 0:
        offs_c = tl.arange(0, KC)[None, :]
        kept = tl.full(state.shape, big, tl.int64)
        for c in range(KC):
            m = tl.minimum(tl.min(state, axis=1), tl.min(tile, axis=1))[:, None]
            kept = tl.where(offs_c == c, m, kept)
            state = tl.where(state == m, big, state)
            tile = tl.where(tile == m, big, tile)
        drop = tl.minimum(drop, tl.minimum(tl.min(state, axis=1), tl.min(tile, axis=1)))
        state = kept
    else:
        drop = tl.minimum(drop, tile_min)
    return state, drop


@triton.jit
def _screen_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    QS, stride_si, stride_sd,  # [I, d] fp32: item_emb rounded to tf32
    users,  # [B] rows of this chunk
    MP,  # [B, BLOCK_N] fp32: M p_u (zero beyond N)
    MQ,  # [I, BLOCK_N] fp32: M q_i (zero beyond N)
    G,  # [BLOCK_N, BLOCK_N] fp32: M Mᵀ (zero beyond N)
    KT,  # [BLOCK_D, BLOCK_N] fp32: Kᵀ, zero-padded, with a column of ones at n = N (gives p·q)
    UNORM,  # [B, 3] fp32, rounded up: ‖p‖₂, ‖p‖₁, κ = max_n ‖p ⊙ K_n‖₂
    INORM,  # [I, 2] fp32, rounded up: ‖q‖₂, ‖q‖₁
    EXCL, stride_xb,  # [B, ⌈I/8⌉] uint8 bitmask of excluded items (HAS_EXCL)
    KEYS,  # [B, KC] int64 out: (bits(lo) << 32) | item, no order; int64 max = empty
    DROP,  # [B] int64 out: the smallest key not kept
    B, U, I, N, d,
    eps, mu, muc, mu1, mu1c, c_z, c_r,
    DISTANCE: tl.constexpr, HAS_EXCL: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KC: tl.constexpr,
):  # fmt: skip
    big: tl.constexpr = 0x7FFFFFFFFFFFFFFF
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_U
    offs_u = tl.arange(0, BLOCK_U)
    rows = row0 + offs_u
    row_ok = rows < B
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < d

    if DISTANCE == 2:
        Mr = _round_operand(_rows(M, offs_n, n_mask, offs_d, d_mask, stride_mn, stride_md, False))
    else:
        Gr = _round_operand(tl.load(G + offs_n[:, None] * BLOCK_N + offs_n[None, :]))

    Kt = tl.load(KT + offs_d[:, None] * BLOCK_N + offs_n[None, :])  # [BLOCK_D, BLOCK_N]
    state = tl.full((BLOCK_U, KC), big, tl.int64)
    drop = tl.full((BLOCK_U,), big, tl.int64)
    n_users = tl.minimum(B - row0, BLOCK_U)
    for i0 in range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        i_mask = offs_i < I
        qs = tl.load(  # the GEMM's A operand (the compiler stages it in shared memory)
            QS + offs_i[:, None] * stride_si + offs_d[None, :] * stride_sd,
            mask=i_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        nq = tl.load(INORM + offs_i * 2, mask=i_mask, other=0.0)
        nq1 = tl.load(INORM + offs_i * 2 + 1, mask=i_mask, other=0.0)
        if DISTANCE != 2:
            mq = tl.load(
                MQ + offs_i[:, None] * BLOCK_N + offs_n[None, :], mask=i_mask[:, None], other=0.0
            )
        lo_tile = tl.full((BLOCK_U, BLOCK_I), float("inf"), tl.float32)
        for j in range(0, n_users):
            row = row0 + j
            u = tl.load(users + row).to(tl.int64)
            u_ok = (u >= 0) & (u < U)
            u = tl.where(u_ok, u, 0)
            p = tl.load(
                P + u * stride_pu + offs_d * stride_pd,
                mask=tl.where(u_ok, d_mask, False),  # (scalar & vector masks trip the interpreter)
                other=0.0,
            ).to(tl.float32)
            np2 = tl.load(UNORM + row * 3)
            np1 = tl.load(UNORM + row * 3 + 1)
            kappa = tl.load(UNORM + row * 3 + 2)
            z = _screen_dot(qs, _round_operand(p[:, None] * Kt))  # [BI, BN]
            zl = tl.where(n_mask[None, :], z, float("-inf"))
            w = tl.exp(zl - tl.max(zl, axis=1)[:, None])  # zero beyond N
            S = tl.sum(w, axis=1)
            # Logit error bound ε (|Δz_n| ≤ ε for every slot) moves a by at most ε in l1.
            rho = c_z * kappa * nq + c_r
            if DISTANCE == 2:
                r = _screen_dot(_round_operand(w / S[:, None]), Mr)  # [BI, BD]
                q = _rows(Q, offs_i, i_mask, offs_d, d_mask, stride_qi, stride_qd, False)
                e = p[None, :] + r - q
                delta = mu1c * rho + c_r * (np1 + nq1 + mu1)
                lo = tl.sum(tl.abs(e), axis=1) - delta
            else:
                mp = tl.load(MP + row * BLOCK_N + offs_n)
                pq = tl.sum(tl.where(offs_n[None, :] == N, z, 0.0), axis=1)
                lin = tl.sum(w * (mp[None, :] - mq), axis=1)
                quad = tl.sum(w * _screen_dot(_round_operand(w), Gr), axis=1)
                x = np2 * np2 + nq * nq - 2.0 * pq + (2.0 * lin + quad / S) / S
                R = np2 + nq + mu
                err = c_r * R * R
                rho = muc * rho
                lo = x - (2.0 * tl.sqrt(tl.maximum(x, 0.0) + err) * rho + rho * rho + err)
                if DISTANCE == 0:
                    lo = tl.sqrt(tl.maximum(lo, 0.0) + eps) * (1.0 - 2.0**-20)
            # at least 0 (+0.0: bit patterns order like the values); NaN (a NaN user or item) as 0,
            # a candidate: so written, not by tl.maximum, whose NaN result differs between the
            # GPU (the other operand) and Triton 3.6's interpreter (NaN, which would keep the
            # item out of both the candidates and the dropped bound, certifying a wrong list)
            lo = tl.where(lo > 0.0, lo, 0.0) + 0.0
            if HAS_EXCL:  # excluded items never become candidates
                byte = tl.load(EXCL + row * stride_xb + (offs_i >> 3), mask=i_mask, other=0)
                lo = tl.where(
                    ((byte.to(tl.int32) >> (offs_i & 7).to(tl.int32)) & 1) != 0, float("nan"), lo
                )
            lo_tile = tl.where(offs_u[:, None] == j, lo[None, :], lo_tile)
        ok = row_ok[:, None] & i_mask[None, :] & (lo_tile == lo_tile)  # NaN: excluded
        keys = (lo_tile.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs_i[None, :]
        state, drop = _merge(state, drop, tl.where(ok, keys, big), KC)
    offs_c = tl.arange(0, KC)
    tl.store(KEYS + rows[:, None] * KC + offs_c[None, :], state, mask=row_ok[:, None])
    tl.store(DROP + rows, drop, mask=row_ok)


@triton.jit
def _direct_distance(p, q, K, M, n_mask, eps, DISTANCE: tl.constexpr):
    """SPEC.md's direct formula for rows of pairs (IEEE dots): ``s``, softmax, ``r``, ``e``, D."""
    z = tl.dot(p * q, tl.trans(K), input_precision="ieee")  # [rows, BLOCK_N]
    z = tl.where(n_mask[None, :], z, float("-inf"))
    ex = tl.exp(z - tl.max(z, axis=1)[:, None])
    a = ex / tl.sum(ex, axis=1)[:, None]
    e = p + tl.dot(a, M, input_precision="ieee") - q
    if DISTANCE == 0:
        dist = tl.sqrt(tl.sum(e * e, axis=1) + eps)
    elif DISTANCE == 1:
        dist = tl.sum(e * e, axis=1)
    else:
        dist = tl.sum(tl.abs(e), axis=1)
    return dist


@triton.jit
def _direct_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [n] users of this chunk
    D_out, stride_ob, stride_oi,  # [n, I] compute dtype: distance of every (user, item)
    n, U, I, N, d,
    eps: tl.float64,  # fp64 for fp64 tables (distance_kernels' docstring, Precision)
    DISTANCE: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The fallback: the direct SPEC distance of every (user, item) of a chunk, IEEE dots."""
    eps = _scalar(eps, IS_FP64)
    pid_u = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    i_mask = offs_i < I
    n_mask = offs_n < N
    d_mask = offs_d < d
    q = _rows(Q, offs_i, i_mask, offs_d, d_mask, stride_qi, stride_qd, IS_FP64)
    Kr = _rows(K, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd, IS_FP64)
    Mr = _rows(M, offs_n, n_mask, offs_d, d_mask, stride_mn, stride_md, IS_FP64)
    for j in range(0, BLOCK_U):
        row = pid_u * BLOCK_U + j
        row_ok = row < n
        u = tl.load(users + row * stride_ub, mask=row_ok, other=0).to(tl.int64)
        u_ok = row_ok & (u >= 0) & (u < U)
        u = tl.where(u_ok, u, 0)
        p = tl.load(
            P + u * stride_pu + offs_d * stride_pd,
            mask=tl.where(u_ok, d_mask, False),  # (scalar & vector masks trip the interpreter)
            other=0.0,
        )
        if IS_FP64:
            p = p.to(tl.float64)[None, :]
        else:
            p = p.to(tl.float32)[None, :]
        tl.store(
            D_out + row * stride_ob + offs_i * stride_oi,
            _direct_distance(p, q, Kr, Mr, n_mask, eps, DISTANCE),
            mask=tl.where(row_ok, i_mask, False),
        )


# ----------------------------------------------------------------------------------------------
# Launch configuration (one function per kernel; benchmarks/kernel_report.py compiles these)
# ----------------------------------------------------------------------------------------------


def candidates_for(k: int) -> int:
    """Candidate-list length ``KC`` for top-k: room for k plus at least 16 near-ties."""
    return max(16, triton.next_power_of_2(max(2 * k, k + 16)))


def screen_config(N: int, d: int, k: int, interpreted: bool) -> dict:
    """Constexprs and launch options of :func:`_screen_kernel` (the launcher's only source).

    ``BLOCK_N = next_pow2(N + 1)`` leaves the spare ones column for ``p·q``. A program owns
    ``BLOCK_U = 16`` users and walks the catalogue in tiles of ``BLOCK_I = 32`` items on 2 warps:
    per (tile, user) the logit GEMM ``[32, BLOCK_D] × [BLOCK_D, BLOCK_N]`` runs as ``mma.sync``
    (HMMA; a warpgroup ``wgmma`` needs 64 rows), the item tile and ``(p ⊙ K)ᵀ`` in shared
    memory; the ``[32, BLOCK_N]`` logits, weights and quadratic-form products, the candidate
    lists ``[16, KC]`` int64 and, for l1, ``r`` and ``e`` ``[32, BLOCK_D]`` in registers, with
    ``maxnreg`` 255 so that ptxas sizes the allocation to the kernel rather than to an occupancy
    it guesses. 2 warps because the GEMMs are chained (logits → softmax → the quadratic form):
    Triton then lays every warp along the 32 item rows, 16 rows a warp, so 4 warps computed
    each MMA tile twice (the report's "MMA ×" column); 2 warps compute each once, with the
    same registers a thread, and twice the programs fit an SM. The shapes come from the static
    report (sm_90, each Triton with the ptxas of its wheel, with and without the exclusion
    mask): at every d ∈ {64, 100, 128}, N ∈ {10, 20}, fp32 and bf16, l2, squared_l2 and l1,
    this compiles with no spills in Triton 3.6 and 3.9 alike (152-254 registers: 4-6 programs
    per SM; on 4 warps 133-230 and 2-3). The 64-item tiles on ``wgmma`` that it replaces took
    204-255 registers and spilled 8-72 B in Triton 3.6 at d = 128 (l2) and in bf16 l1, and no
    user count or warp count cleared every shape; without the register cap, ptxas settled at
    96-168 registers and spilled 8-32 B at a few shapes. The item tile, read once per program
    from L2 (Netflix: 9 MB), serves 16 users (0.27 TB for all users). Under the interpreter, a
    wider item tile means fewer Python steps.
    """
    cfg = {
        "BLOCK_N": max(16, triton.next_power_of_2(N + 1)),
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "KC": candidates_for(k),
    }
    if interpreted:
        return {**cfg, "BLOCK_U": 16, "BLOCK_I": 128}
    return {**cfg, "BLOCK_U": 16, "BLOCK_I": 32, "num_warps": 2, "num_stages": 1, "maxnreg": 255}


def screen_fits(N: int, d: int, distance: str) -> bool:
    """Whether the screen's shared-memory tiles fit an sm_90 SM with room to spare.

    fp32 words of the item tile ``[32, BLOCK_D]``, the GEMM's ``(p ⊙ K)ᵀ`` ``[BLOCK_D, BLOCK_N]``,
    ``MMᵀ`` and, for l1, ``M`` ``[BLOCK_N, BLOCK_D]``; the compiler adds layout-conversion
    scratch, ~20% (l1: d = 100, N = 20: 52 KB by this count, 64 KB measured). The sm_90 limit
    is 227 KB per program; larger shapes take the direct path.
    """
    bd = max(16, triton.next_power_of_2(d))
    bn = max(16, triton.next_power_of_2(N + 1))
    words = 32 * bd + bd * bn + bn * bn + (bn * bd if distance == "l1" else 0)
    return 4 * words <= 176 * 1024


def direct_fits(N: int, d: int, dtype: torch.dtype) -> bool:
    """Whether :func:`_direct_kernel`'s tiles at its GPU configuration fit an sm_90 SM.

    Compute-dtype words (fp32; fp64 for fp64 tables) of the item tile ``[BLOCK_I, BLOCK_D]``,
    K and M ``[BLOCK_N, BLOCK_D]`` and the logits ``[BLOCK_I, BLOCK_N]``: an upper bound
    (compiled for sm_90: d = 100, N = 20 use 66 KB against 74 KB by this count, N = 200 use
    295 KB against 360 KB, over the 227 KB a program may have). Larger shapes take the pair
    forward kernels, which are chunked over d and N.
    """
    cfg = direct_config(1, 1, N, d, interpreted=False)
    bi, bn, bd = cfg["BLOCK_I"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    size = 8 if dtype == torch.float64 else 4
    return size * (bi * bd + 2 * bn * bd + bi * bn) <= 160 * 1024


MAX_GRID_AXIS1 = 65_535  # programs along a CUDA grid's y axis


def direct_config(n: int, I: int, N: int, d: int, interpreted: bool) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, triton.next_power_of_2(N))
    if interpreted:  # few, large programs
        return {
            "BLOCK_U": max(1, min(n, 64)),
            "BLOCK_I": min(1024, max(16, triton.next_power_of_2(I))),
            "BLOCK_N": block_n,
            "BLOCK_D": block_d,
        }
    block_i = max(16, min(128, 8192 // block_d))
    return {
        "BLOCK_U": 16,
        "BLOCK_I": block_i,
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
        "num_warps": 4 if block_i * block_d <= 4096 else 8,
    }


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def bound_constants(N: int, d: int) -> tuple[float, float]:
    """``(c_z, c_r)`` of SPEC.md "Exact top-k from a screen".

    ``g = (d + N + 32)·2⁻²³`` bounds every fp32 sum, product chain and exp of the screen and of the
    re-score relative to the magnitudes involved; ``c_z = 2.25·u + 4g`` bounds a logit's error
    relative to ``Σ_j |p_j K_nj q_j|`` (operands rounded to tf32's u, fp32 accumulation, and the
    re-score's own logits); ``c_r = c_z + 4g`` bounds the rest relative to ``R²`` (or ``R₁``).
    """
    g = (d + N + 32) * 2.0**-23
    c_z = 2.25 * SCREEN_UNIT + 4 * g
    return c_z * BOUND_SCALE, (c_z + 4 * g) * BOUND_SCALE


def round_to_screen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 rounded to tf32 as :func:`_round_operand` does."""
    return ((x.float().view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded up (for norms used as bounds)."""
    return (x * (1 + 2.0**-22)).float()


def _exclusion_bitmask(exclude, start, n, I, dev):
    """``[n, ⌈I/8⌉]`` uint8: bit ``i % 8`` of byte ``i // 8`` of row b set when b excludes i."""
    indptr, indices = exclude
    lo, hi = indptr[start].item(), indptr[start + n].item()
    width = (I + 7) // 8
    mask = torch.zeros(n * width, dtype=torch.int32, device=dev)
    if hi > lo:
        counts = indptr[start + 1 : start + n + 1] - indptr[start : start + n]
        rows = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=hi - lo)
        cols = indices[lo:hi]
        ok = (cols >= 0) & (cols < I)
        pair = torch.unique(rows[ok] * I + cols[ok])  # an index listed twice sets one bit
        item = pair % I
        bit = torch.ones_like(item, dtype=torch.int32) << (item % 8).to(torch.int32)
        mask.scatter_add_(0, (pair // I) * width + item // 8, bit)
    return mask.to(torch.uint8).view(n, width)


def screen_launch(user_emb, item_emb, keys, memory, users, k, excl, distance, eps):
    """Candidates of every user: ``(keys [B, KC] int64, drop [B] int64)`` (see the kernel)."""
    B, I = users.shape[0], item_emb.shape[0]
    N, d = keys.shape
    dev = user_emb.device
    cfg = screen_config(N, d, k, _interpreted(user_emb))
    bn = cfg["BLOCK_N"]
    Pd = user_emb[users.clamp(0, user_emb.shape[0] - 1)].double()
    Qd, Kd, Md = item_emb.double(), keys.double(), memory.double()
    pad = (0, bn - N)
    MP = torch.nn.functional.pad(Pd @ Md.T, pad).float().contiguous()
    MQ = torch.nn.functional.pad(Qd @ Md.T, pad).float().contiguous()
    G = torch.nn.functional.pad(Md @ Md.T, (0, bn - N, 0, bn - N)).float().contiguous()
    KT = torch.zeros(cfg["BLOCK_D"], bn, dtype=torch.float32, device=dev)
    KT[:d, :N] = keys.T.float()
    KT[:, N] = 1.0
    kappa = ((Pd * Pd) @ (Kd * Kd).T).amax(dim=1).sqrt()
    unorm = _up(torch.stack([Pd.norm(dim=1), Pd.abs().sum(1), kappa], dim=1)).contiguous()
    inorm = _up(torch.stack([Qd.norm(dim=1), Qd.abs().sum(1)], dim=1)).contiguous()
    Mc = Md - Md.mean(dim=0)  # Σ Δa = 0: a softmax change moves r by Σ Δa_n (M_n − c), any c
    mu, muc = (float(x.norm(dim=1).max()) * (1 + 2.0**-22) for x in (Md, Mc))
    mu1, mu1c = (float(x.abs().sum(1).max()) * (1 + 2.0**-22) for x in (Md, Mc))
    c_z, c_r = bound_constants(N, d)
    out_keys = torch.empty(B, cfg["KC"], dtype=torch.int64, device=dev)
    out_drop = torch.empty(B, dtype=torch.int64, device=dev)
    ex = excl if excl is not None else out_keys
    QS = round_to_screen(item_emb)
    grid = (triton.cdiv(B, cfg["BLOCK_U"]),)
    with _device_guard(user_emb):
        _screen_kernel[grid](
            *_param_args(user_emb, item_emb, keys, memory),
            QS, QS.stride(0), QS.stride(1),
            users, MP, MQ, G, KT, unorm, inorm,
            ex, ex.stride(0),
            out_keys, out_drop,
            B, user_emb.shape[0], I, N, d,
            float(eps), mu, muc, mu1, mu1c, c_z, c_r,
            DISTANCE=DISTANCE_CODES[distance], HAS_EXCL=excl is not None,
            IS_FP64=user_emb.dtype == torch.float64,
            **cfg,
        )  # fmt: skip
    return out_keys, out_drop


def rescore_launch(user_emb, item_emb, keys, memory, users, ids, distance, eps):
    """The direct SPEC distance of each candidate ``ids [B, KC]`` (compute dtype; an id of -1
    gets some finite value, ignored by :func:`_select`).

    Users × candidates is the pair distances op, so this is the distance kernels' pair forward
    (:func:`lrml_kernels.triton.distance_kernels.forward_launch` with ``exact``: IEEE dots, D in
    the compute dtype), with its spill-free chunked tiles.
    """
    D, _, _ = TD.forward_launch(
        user_emb, item_emb, keys, memory, users, ids, distance=distance, relation="pair",
        eps=eps, exact=True,
    )  # fmt: skip
    return D


def chunk_distances(user_emb, item_emb, keys, memory, users, distance, eps) -> torch.Tensor:
    """Direct distances of ``users`` (a chunk) to every item: ``[n, I]`` in the compute dtype.

    :func:`_direct_kernel` where its tiles fit (:func:`direct_fits`) and its item tiles fit a
    grid's second axis (:data:`MAX_GRID_AXIS1`: a catalogue of over ~4M items at d = 100), else
    the re-score's pair forward on every (user, item) pair (the same exact distances; 1-D grid).
    """
    n, I = users.shape[0], item_emb.shape[0]
    N, d = keys.shape
    cfg = (
        direct_config(n, I, N, d, _interpreted(user_emb))
        if direct_fits(N, d, user_emb.dtype)
        else None
    )
    if cfg is None or triton.cdiv(I, cfg["BLOCK_I"]) > MAX_GRID_AXIS1:
        ids = torch.arange(I, device=users.device).expand(n, I)
        return rescore_launch(user_emb, item_emb, keys, memory, users, ids, distance, eps)
    dtype = user_emb.dtype
    out = torch.empty(n, I, dtype=_compute_dtype(dtype), device=user_emb.device)
    grid = (triton.cdiv(n, cfg["BLOCK_U"]), triton.cdiv(I, cfg["BLOCK_I"]))
    with _device_guard(user_emb):
        _direct_kernel[grid](
            *_param_args(user_emb, item_emb, keys, memory),
            users, users.stride(0),
            out, out.stride(0), out.stride(1),
            n, user_emb.shape[0], I, N, d,
            float(eps),
            DISTANCE=DISTANCE_CODES[distance], IS_FP64=dtype == torch.float64,
            **cfg,
        )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def _rank_values(dist: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values ranked: the returned ones (fp16/bf16 rounded), fp32 or fp64 otherwise."""
    if dtype in (torch.float16, torch.bfloat16):
        return dist.to(dtype).float()
    return dist


def _select(dist, ids, kk):
    """The kk smallest ``(dist, id)`` per row; ``ids`` -1 marks an empty slot (never selected).

    float32: exact order through int64 keys ``bits(D) << 32 | id`` and one ``torch.topk``; float64:
    a sort by id, then a stable sort by distance.
    """
    empty = ids < 0
    if dist.dtype == torch.float32:
        # -0.0 -> +0.0 and every NaN positive (-NaN's bits are a negative int32: it would sort
        # first), so bit patterns order like the values and NaN after +inf
        dist = (dist + 0.0).masked_fill(dist.isnan(), float("nan"))
        key = (dist.view(torch.int32).to(torch.int64) << 32) | ids.clamp(min=0)
        key = torch.topk(key.masked_fill(empty, _MAXKEY), kk, dim=1, largest=False).values
        gone = key == _MAXKEY
        out_i = torch.where(gone, -1, key & 0xFFFFFFFF)
        out_d = (key >> 32).to(torch.int32).view(torch.float32).masked_fill(gone, float("inf"))
        return out_d, out_i
    by_id = torch.argsort(ids.masked_fill(empty, _MAXKEY), dim=1)
    dist, ids, empty = dist.gather(1, by_id), ids.gather(1, by_id), empty.gather(1, by_id)
    dist = dist.masked_fill(empty, float("nan"))  # NaN sorts after +inf
    out_d, order = torch.sort(dist, dim=1, stable=True)
    out_d, out_i, gone = out_d[:, :kk], ids.gather(1, order)[:, :kk], empty.gather(1, order)[:, :kk]
    return out_d.masked_fill(gone, float("inf")), out_i.masked_fill(gone, -1)


def _select_dense(dist, rows, cols, kk):
    """Direct path: the kk smallest of a ``[n, I]`` distance block with exclusions scattered in.

    An excluded index outside ``[0, I)`` (unchecked with ``validate=False``) is ignored, as the
    screen's bitmask ignores it: it marks a spare column ``I``, dropped (no host sync; it was an
    IndexError on the CPU, a device-side assert on CUDA, and -1 excluded item I - 1).
    """
    n, I = dist.shape
    ids = torch.arange(I + 1, device=dist.device, dtype=torch.int64).expand(n, I + 1).clone()
    if rows is not None:
        ids[rows, torch.where((cols >= 0) & (cols < I), cols, I)] = -1
    return _select(dist, ids[:, :I], kk)


def _sub_csr(exclude, rows):
    """The CSR rows ``rows`` of ``exclude`` (same order)."""
    indptr, indices = exclude
    counts = indptr[rows + 1] - indptr[rows]
    sub_ptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int64, device=indptr.device)
    sub_ptr[1:] = counts.cumsum(0)
    total = int(sub_ptr[-1])
    within = torch.arange(total, device=indptr.device) - torch.repeat_interleave(
        sub_ptr[:-1], counts, output_size=total
    )
    src = torch.repeat_interleave(indptr[rows], counts, output_size=total) + within
    return sub_ptr, indices[src]


def _topk_direct(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps):
    """Every distance by the direct formula, then selection (the fallback and the large-k path)."""
    B, I = users.shape[0], item_emb.shape[0]
    dtype, dev = user_emb.dtype, user_emb.device
    kk = min(k, I)
    out_d = torch.full((B, k), float("inf"), dtype=dtype, device=dev)
    out_i = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    if B == 0 or I == 0:
        return out_d, out_i
    chunk = max(1, CHUNK_ELEMENTS // I)
    starts = list(range(0, B, chunk))
    if exclude is not None:
        indptr, indices = exclude
        bounds = indptr[torch.tensor([*starts, B], device=indptr.device)].tolist()  # one sync
    for j, start in enumerate(starts):
        n = min(chunk, B - start)
        dist = chunk_distances(
            user_emb, item_emb, keys, memory, users[start : start + n], distance, eps
        )
        rows = cols = None
        if exclude is not None and bounds[j + 1] > bounds[j]:
            lo, hi = bounds[j], bounds[j + 1]
            counts = indptr[start + 1 : start + n + 1] - indptr[start : start + n]
            rows = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=hi - lo)
            cols = indices[lo:hi]
        dd, ii = _select_dense(_rank_values(dist, dtype), rows, cols, kk)
        out_d[start : start + n, :kk] = dd.to(dtype)
        out_i[start : start + n, :kk] = ii
    return out_d, out_i


def _topk_screened(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps):
    """Screen, re-score, select, certify; uncertified users go through the direct path."""
    B, I = users.shape[0], item_emb.shape[0]
    dtype, dev = user_emb.dtype, user_emb.device
    kk = min(k, I)
    kc = candidates_for(k)
    out_d = torch.full((B, k), float("inf"), dtype=dtype, device=dev)
    out_i = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    # Bitmask (built in int32, kept in uint8), fp64 user rows, candidate keys, ids and distances.
    per_user = 5 * ((I + 7) // 8) + 8 * user_emb.shape[1] + 40 * kc
    chunk = max(1, SCREEN_CHUNK_BYTES // per_user)
    failed = []
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        u = users[start : start + n]
        excl = None if exclude is None else _exclusion_bitmask(exclude, start, n, I, dev)
        cand, drop = screen_launch(user_emb, item_emb, keys, memory, u, k, excl, distance, eps)
        ids = torch.where(cand == _MAXKEY, -1, cand & 0xFFFFFFFF)
        dist = rescore_launch(user_emb, item_emb, keys, memory, u, ids, distance, eps)
        dd, ii = _select(_rank_values(dist, dtype), ids, kk)
        # Certified: nothing dropped, or the k-th exact value is below every dropped lower bound.
        lo = (drop >> 32).to(torch.int32).view(torch.float32)
        lo = _rank_values(lo, dtype).to(dd.dtype)
        good = (drop == _MAXKEY) | ((ii[:, kk - 1] >= 0) & (dd[:, kk - 1] < lo)) | (not CERTIFY)
        out_d[start : start + n, :kk] = dd.to(dtype)
        out_i[start : start + n, :kk] = ii
        failed.append(start + torch.nonzero(~good)[:, 0])
    failed = torch.cat(failed)
    last_stats["screened"] = B - failed.shape[0]
    last_stats["fallback"] = failed.shape[0]
    if failed.shape[0]:
        sub = None if exclude is None else _sub_csr(exclude, failed)
        fd, fi = _topk_direct(
            user_emb, item_emb, keys, memory, users[failed], k, sub, distance, eps
        )
        out_d[failed], out_i[failed] = fd, fi
    return out_d, out_i


@torch.no_grad()
def topk(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps):
    """``(distances [B, k], ids int64 [B, k])``: the k nearest items per user (SPEC.md)."""
    B, I = users.shape[0], item_emb.shape[0]
    N, d = keys.shape
    screen = N * d > 0 and candidates_for(k) <= MAX_CANDIDATES and screen_fits(N, d, distance)
    if B == 0 or I == 0 or not screen:
        last_stats["screened"], last_stats["fallback"] = 0, B
        return _topk_direct(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps)
    return _topk_screened(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps)
