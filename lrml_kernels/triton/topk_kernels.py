"""Exact full-catalogue top-k (SPEC.md "Ranking all items"), relation="pair".

Kernel: one program owns a tile of ``BLOCK_I`` items (loaded once, with K and M) and ``BLOCK_U``
users of the current user chunk; for each user it forms ``s = p ⊙ Q_tile``, the logits
``s Kᵀ`` (``tl.dot``), the softmax, ``r = a M`` (``tl.dot``), ``e`` and the distance, all on chip
with the direct formula (exact for every distance kind, so no cancellation and no re-scoring;
at most ``[BLOCK_I, N]`` and ``[BLOCK_I, d]`` per step, never ``[users, items, d]``). It writes
the distances of the chunk, ``[users_chunk, I]``, with users_chunk × I bounded by
``CHUNK_ELEMENTS``.

Selection (torch, on device): distances in float32 are made exact sort keys
``bits(D) << 32 | item_id`` (non-negative floats order like their bit patterns), so one
``torch.topk`` over int64 keys gives the k smallest with ties to the smaller id; excluded items get
the largest key and come back as -1 / +inf. float64 distances use a stable sort (ties keep the
ascending id order). Exclusions are scattered into the chunk's keys from the CSR lists, never a
dense ``[B, I]`` mask.
"""

from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl

_dist = importlib.import_module("lrml_kernels.triton.distance_kernels")
_attention = _dist._attention
_distance = _dist._distance
_load_rows = _dist._load_rows
_upcast = _dist._upcast

# Elements of the per-chunk distance buffer (users_chunk × I); its keys take 8 bytes each.
CHUNK_ELEMENTS = 1 << 24
_EXCLUDED = torch.iinfo(torch.int64).max


@triton.jit
def _lrml_topk_kernel(
    P, stride_pu, stride_pd,  # [U, d] user_emb
    Q, stride_qi, stride_qd,  # [I, d] item_emb
    K, stride_kn, stride_kd,  # [N, d] keys
    M, stride_mn, stride_md,  # [N, d] memory
    users, stride_ub,  # [n] users of this chunk
    D_out, stride_ob, stride_oi,  # [n, I] compute dtype: distance of every (user, item)
    n, U, I, N, d,
    eps,
    DISTANCE: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_u = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    i_mask = offs_i < I
    n_mask = offs_n < N
    d_mask = offs_d < d

    q = _load_rows(Q, offs_i, i_mask, offs_d, d_mask, stride_qi, stride_qd, IS_FP64)
    Kt = _load_rows(K, offs_n, n_mask, offs_d, d_mask, stride_kn, stride_kd, IS_FP64)
    Mt = _load_rows(M, offs_n, n_mask, offs_d, d_mask, stride_mn, stride_md, IS_FP64)
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
        p = _upcast(p, IS_FP64)[None, :]  # [1, BLOCK_D]
        a, r = _attention(p * q, Kt, Mt, n_mask, DOT_PREC)
        dist = _distance(p + r - q, eps, DISTANCE)
        tl.store(
            D_out + row * stride_ob + offs_i * stride_oi,
            dist,
            mask=tl.where(row_ok, i_mask, False),
        )


def _block_config(n: int, I: int, N: int, d: int, t: torch.Tensor) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, triton.next_power_of_2(N))
    if t.device.type != "cuda":  # interpreter: few, large programs
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


def chunk_distances(user_emb, item_emb, keys, memory, users, distance, eps) -> torch.Tensor:
    """Distances of ``users`` (a chunk) to every item: ``[n, I]`` in the compute dtype."""
    n, I = users.shape[0], item_emb.shape[0]
    N, d = keys.shape
    dtype = user_emb.dtype
    ct = _dist._compute_dtype(dtype)
    out = torch.empty(n, I, dtype=ct, device=user_emb.device)
    cfg = _block_config(n, I, N, d, user_emb)
    grid = (triton.cdiv(n, cfg["BLOCK_U"]), triton.cdiv(I, cfg["BLOCK_I"]))
    with _dist._device_guard(user_emb):
        _lrml_topk_kernel[grid](
            *_dist._param_args(user_emb, item_emb, keys, memory),
            users, users.stride(0),
            out, out.stride(0), out.stride(1),
            n, user_emb.shape[0], I, N, d,
            float(eps),
            DISTANCE=_dist.DISTANCE_CODES[distance], IS_FP64=dtype == torch.float64,
            DOT_PREC=_dist._dot_precision(dtype),
            **cfg,
        )  # fmt: skip
    return out


def _select_keys(dist, rows, cols, kk):
    """float32 path: exact (distance, id) order through int64 keys and one torch.topk."""
    I = dist.shape[1]
    dist = dist + 0.0  # -0.0 -> +0.0, so bit patterns order like the values
    ids = torch.arange(I, device=dist.device, dtype=torch.int64)
    key = (dist.view(torch.int32).to(torch.int64) << 32) | ids
    if rows is not None:
        key[rows, cols] = _EXCLUDED
    key = torch.topk(key, kk, dim=1, largest=False, sorted=True).values
    excluded = key == _EXCLUDED
    out_i = torch.where(excluded, -1, key & 0xFFFFFFFF)
    out_d = (key >> 32).to(torch.int32).view(torch.float32)
    out_d = out_d.masked_fill(excluded, float("inf"))
    return out_d, out_i


def _select_sort(dist, rows, cols, kk):
    """float64 path: a stable sort keeps ties in ascending id order."""
    excluded = None
    if rows is not None:
        excluded = torch.zeros(dist.shape, dtype=torch.bool, device=dist.device)
        excluded[rows, cols] = True
        dist = dist.masked_fill(excluded, float("nan"))  # NaN sorts after +inf
    out_d, order = torch.sort(dist, dim=1, stable=True)
    out_d, order = out_d[:, :kk], order[:, :kk]
    if excluded is None:
        return out_d, order
    ex = excluded.gather(1, order)
    back = torch.argsort(ex.to(torch.int8), dim=1, stable=True)  # excluded last, order kept
    ex, out_d, order = ex.gather(1, back), out_d.gather(1, back), order.gather(1, back)
    return out_d.masked_fill(ex, float("inf")), order.masked_fill(ex, -1)


@torch.no_grad()
def topk(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps):
    """``(distances [B, k], ids int64 [B, k])``: the k nearest items per user (SPEC.md)."""
    _dist._check_dtype(user_emb)
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
        if dtype in (torch.float16, torch.bfloat16):
            dist = dist.to(dtype).float()  # rank the values that are returned (ties by id)
        rows = cols = None
        if exclude is not None and bounds[j + 1] > bounds[j]:
            lo, hi = bounds[j], bounds[j + 1]
            counts = indptr[start + 1 : start + n + 1] - indptr[start : start + n]
            rows = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=hi - lo)
            cols = indices[lo:hi]
        select = _select_sort if dist.dtype == torch.float64 else _select_keys
        dd, ii = select(dist, rows, cols, kk)
        out_d[start : start + n, :kk] = dd.to(dtype)
        out_i[start : start + n, :kk] = ii
    return out_d, out_i
