"""SPEC.md in plain PyTorch: the oracle every backend is tested against.

Every function here works for any floating dtype (float64 included) and any device. Half-precision
parameters are computed in float32 (as the fused kernels do) and the results are cast back to the
parameter dtype. Inputs are assumed valid: the public ops in :mod:`lrml_kernels.ops` validate them.

Shapes: ``user_emb`` P ``[U, d]``, ``item_emb`` Q ``[I, d]``, ``keys`` K ``[N, d]``, ``memory`` M
``[N, d]``, ``users`` ``[B]``, ``items`` ``[B, C]`` (column 0 the positive, 1.. the negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCES = ("l2", "squared_l2", "l1")
RELATIONS = ("pair", "shared")
REDUCTIONS = ("sum", "mean", "none")

# Users per chunk in `lrml_topk`: bounds the [chunk, I, N] (or [chunk, I, d] for l1) working set.
TOPK_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(p: torch.Tensor, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Memory-key attention ``a = softmax(K s)`` of ``s = p ⊙ q``.

    p, q: ``[..., d]`` (broadcastable); keys: ``[N, d]``. Returns ``a [..., N]``.
    """
    return torch.softmax((p * q) @ keys.T, dim=-1)


def relation_vectors(p: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor):
    """Memory-key attention: ``s = p ⊙ q``, ``a = softmax(K s)``, ``r = Mᵀ a``.

    p, q: ``[..., d]`` (broadcastable); keys, memory: ``[N, d]``. Returns ``r [..., d]``.
    """
    return attention(p, q, keys) @ memory


def distance_from_residual(e: torch.Tensor, distance: str, eps: float) -> torch.Tensor:
    """``D`` of a translation residual ``e [..., d]`` -> ``[...]``."""
    if distance == "l2":
        return torch.sqrt((e * e).sum(-1) + eps)
    if distance == "squared_l2":
        return (e * e).sum(-1)
    if distance == "l1":
        return e.abs().sum(-1)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def distances_from_rows(
    p: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    *,
    distance: str = "l2",
    relation: str = "pair",
    eps: float = 1e-3,
) -> torch.Tensor:
    """Distances of gathered rows: p ``[B, d]``, q ``[B, C, d]`` -> D ``[B, C]`` (dtype of p)."""
    out_dtype = p.dtype
    ct = compute_dtype(out_dtype)
    p, q, keys, memory = (t.to(ct) for t in (p, q, keys, memory))
    p = p.unsqueeze(1)  # [B, 1, d]
    if relation == "pair":
        r = relation_vectors(p, q, keys, memory)  # [B, C, d]
    elif relation == "shared":
        r = relation_vectors(p, q[:, :1], keys, memory)  # [B, 1, d], reused for every column
    else:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return distance_from_residual(p + r - q, distance, eps).to(out_dtype)


def hinge_from_distances(D: torch.Tensor, margin: float = 0.5, reduction: str = "sum"):
    """Pairwise hinge of SPEC.md: ``L_b = Σ_c max(0, margin + D[b,0] − D[b,c])`` for c ≥ 1."""
    L = torch.relu(margin + D[:, :1] - D[:, 1:]).sum(1)
    if reduction == "none":
        return L
    if reduction == "sum":
        return L.sum()
    if reduction == "mean":
        return L.mean() if L.numel() else L.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def gather_rows(user_emb, item_emb, users, items, *, sparse_grad: bool = False):
    """``P[users] [B, d]`` and ``Q[items] [B, C, d]``; sparse COO gradients when asked."""
    return F.embedding(users, user_emb, sparse=sparse_grad), F.embedding(
        items, item_emb, sparse=sparse_grad
    )


def lrml_distances(
    user_emb,
    item_emb,
    keys,
    memory,
    users,
    items,
    *,
    distance: str = "l2",
    relation: str = "pair",
    eps: float = 1e-3,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """``D [B, C]`` for every (users[b], items[b, c]) pair."""
    p, q = gather_rows(user_emb, item_emb, users, items, sparse_grad=sparse_grad)
    return distances_from_rows(p, q, keys, memory, distance=distance, relation=relation, eps=eps)


@torch.no_grad()
def lrml_relations(user_emb, item_emb, keys, memory, users, items):
    """Attention ``a [B, N]`` and relation ``r = Mᵀ a [B, d]`` of each (users[b], items[b]) pair.

    users, items: ``[B]``. Computed in :func:`compute_dtype`, returned in the parameter dtype.
    """
    out_dtype = user_emb.dtype
    ct = compute_dtype(out_dtype)
    p, q = user_emb[users].to(ct), item_emb[items].to(ct)
    a = attention(p, q, keys.to(ct))
    return a.to(out_dtype), (a @ memory.to(ct)).to(out_dtype)


def lrml_hinge_loss(
    user_emb,
    item_emb,
    keys,
    memory,
    users,
    items,
    *,
    margin: float = 0.5,
    distance: str = "l2",
    relation: str = "pair",
    eps: float = 1e-3,
    reduction: str = "sum",
    sparse_grad: bool = False,
) -> torch.Tensor:
    """The hinge loss of SPEC.md over ``D [B, C]``; a scalar, or ``[B]`` with reduction="none"."""
    D = lrml_distances(
        user_emb,
        item_emb,
        keys,
        memory,
        users,
        items,
        distance=distance,
        relation=relation,
        eps=eps,
        sparse_grad=sparse_grad,
    )
    return hinge_from_distances(D, margin, reduction)


def all_item_distances(p, item_emb, keys, memory, *, distance="l2", eps=1e-3, rewrite=True):
    """Distances of users p ``[B, d]`` to every item -> ``[B, I]`` in the compute dtype.

    With ``rewrite=True`` ("l2"/"squared_l2") only ``[B, I, N]`` is formed (SPEC.md's rewrite):
    ``‖e‖² = ‖p‖² + ‖q‖² − 2p·q + 2a·(Mp) − 2a·(Mq) + aᵀ(MMᵀ)a``. "l1" and ``rewrite=False``
    use the direct formula and form ``[B, I, d]``.
    """
    ct = compute_dtype(p.dtype)
    p, Q, K, M = (t.to(ct) for t in (p, item_emb, keys, memory))
    if distance == "l1" or not rewrite:
        return distance_from_residual(
            p[:, None] + relation_vectors(p[:, None], Q[None], K, M) - Q[None], distance, eps
        )
    z = torch.einsum("id,bnd->bin", Q, p[:, None, :] * K[None])  # Q (p ⊙ K)ᵀ per user
    a = torch.softmax(z, dim=-1)  # [B, I, N]
    Mp = p @ M.T  # [B, N]
    MQ = Q @ M.T  # [I, N]
    MMt = M @ M.T  # [N, N]
    sq = (
        (p * p).sum(-1)[:, None]
        + (Q * Q).sum(-1)[None, :]
        - 2 * p @ Q.T
        + 2 * (a * Mp[:, None, :]).sum(-1)
        - 2 * (a * MQ[None]).sum(-1)
        + ((a @ MMt) * a).sum(-1)
    ).clamp_min(0)
    return torch.sqrt(sq + eps) if distance == "l2" else sq


def sort_candidates(dist: torch.Tensor, ids: torch.Tensor, k: int):
    """Sort candidate rows by (distance, item id), keep k; NaN distances sort after every
    number, ids −1 (empty slots) after those (returned with distance +inf)."""
    big = torch.iinfo(torch.int64).max
    order = torch.argsort(ids.masked_fill(ids < 0, big), dim=1, stable=True)
    dist, ids = dist.gather(1, order), ids.gather(1, order)
    # an empty slot as NaN: after the numbers (torch sorts NaN last), and after the NaN items by
    # its id (the stable sort keeps the id order)
    order = torch.argsort(dist.masked_fill(ids < 0, float("nan")), dim=1, stable=True)
    dist, ids = dist.gather(1, order)[:, :k], ids.gather(1, order)[:, :k]
    dist = dist.masked_fill(ids < 0, float("inf"))
    if dist.shape[1] < k:
        pad = k - dist.shape[1]
        dist = F.pad(dist, (0, pad), value=float("inf"))
        ids = F.pad(ids, (0, pad), value=-1)
    return dist, ids


def screen_tolerance(p, keys, memory, catalogue: dict, *, distance="l2") -> torch.Tensor:
    """Per user ``[B, 1]``: twice a bound ``δ`` on ``|screen − direct|`` (compute dtype).

    The screen is :func:`all_item_distances` (the rewrite's ``‖e‖²`` for "l2"/"squared_l2", the
    direct ``Σ|e|`` for "l1"), the direct value is :func:`distances_from_rows` of the same pair;
    they differ by rounding only, cancellation in the rewrite included. The bound is the one
    ``csrc/cpu/topk_cpu.cpp`` uses: ``γ = 4 (d + N + 16) ε`` of the compute dtype times the
    magnitudes summed (``‖p‖², max ‖q‖², the M terms``), plus the logits' error ``γ max_n
    ‖p ⊙ K_n‖ max ‖q‖`` carried through the softmax into the M terms. ``catalogue``: the
    items' and memory's terms, :func:`catalogue_magnitudes` (the same for every user).
    """
    ct = compute_dtype(p.dtype)
    p, K, M = (t.to(ct) for t in (p, keys, memory))
    em = torch.finfo(ct).eps
    gamma = 4 * (K.shape[1] + K.shape[0] + 16) * em
    q_max = catalogue["q_max"]
    zb = (p[:, None, :] * K[None]).norm(dim=-1).amax(1, keepdim=True) * q_max  # |z| bound
    if distance == "l1":
        msum = catalogue["msum"]
        p1 = p.abs().sum(1, keepdim=True)
        delta = gamma * (p1 + catalogue["q1"] + msum + 2 * zb * msum) + 8 * em * msum
    else:
        V = 2 * (p @ M.T).abs().amax(1, keepdim=True) + catalogue["mqm"]
        pp = (p * p).sum(1, keepdim=True)
        mag = pp + q_max**2 + 2 * pp.sqrt() * q_max + V
        delta = gamma * (mag + 2 * zb * V) + 8 * em * V
    return 2 * delta


def catalogue_magnitudes(item_emb, memory, dtype, *, distance="l2") -> dict:
    """The user-independent terms of :func:`screen_tolerance` in the compute dtype of ``dtype``:
    ``q_max = max ‖q‖`` and, for "l1", ``q1 = max ‖q‖₁`` and ``msum = Σ_j max_n |M_nj|``, else
    ``mqm = 2 max |q · M_n| + 2 max |M_n · M_m|``."""
    ct = compute_dtype(dtype)
    Q, M = item_emb.to(ct), memory.to(ct)
    out = {"q_max": _item_max(Q.norm(dim=1))}
    if distance == "l1":
        out.update(q1=_item_max(Q.abs().sum(1)), msum=M.abs().amax(0).sum())
    else:
        mq = _item_max((Q @ M.T).abs().amax(1) if M.shape[0] else Q.new_zeros(Q.shape[0]))
        out["mqm"] = 2 * mq + 2 * (M @ M.T).abs().max()
    return out


def _item_max(per_item: torch.Tensor) -> torch.Tensor:
    """The largest of the items' magnitudes ``[I]``, 0 for none; an item at NaN is left out (it
    ranks last on its own: a NaN bound would keep no other item for the exact re-score)."""
    return (
        per_item.masked_fill(per_item.isnan(), 0).amax()
        if per_item.numel()
        else per_item.new_zeros(())
    )


@torch.no_grad()
def lrml_topk(
    user_emb,
    item_emb,
    keys,
    memory,
    users,
    k: int,
    *,
    exclude=None,
    distance: str = "l2",
    eps: float = 1e-3,
):
    """The k nearest items per user: ``(distances [B, k], item_ids int64 [B, k])``.

    Sorted ascending, ties broken by the smaller item id; items in ``exclude = (indptr [B+1],
    indices)`` never appear; missing slots are ``-1`` / ``+inf``; NaN distances rank last. Users
    are processed in chunks; the screen is :func:`all_item_distances` (the rewrite for
    "l2"/"squared_l2", in squared units), which may be off by the rounding bound of
    :func:`screen_tolerance` (cancellation: SPEC.md). Every item whose screen value is within
    that tolerance of the k-th smallest is re-scored with the direct formula, and the answer is
    the k best ``(D, id)`` of those: exactly the k smallest direct distances, whatever the screen
    rounded.
    """
    B, I = users.shape[0], item_emb.shape[0]
    N, d = keys.shape
    width = d if distance == "l1" else max(N, 1)
    chunk = max(1, TOPK_CHUNK_ELEMENTS // max(1, I * width))
    kk = min(k, I)
    screen_distance = "l1" if distance == "l1" else "squared_l2"
    # D̂ ranks as rounded to the parameter dtype: items apart by less than its rounding may tie.
    rel = 4 * torch.finfo(user_emb.dtype).eps
    catalogue = catalogue_magnitudes(item_emb, memory, user_emb.dtype, distance=distance)
    out_d, out_i = [], []
    for start in range(0, B, chunk):
        u = users[start : start + chunk]
        p = user_emb[u]
        dist = all_item_distances(p, item_emb, keys, memory, distance=screen_distance, eps=eps)
        excluded = torch.zeros_like(dist, dtype=torch.bool)
        if exclude is not None:
            indptr, indices = exclude
            lo, hi = indptr[start : start + u.shape[0]], indptr[start + 1 : start + 1 + u.shape[0]]
            rows = torch.repeat_interleave(torch.arange(u.shape[0], device=u.device), hi - lo)
            cols = indices[lo[0] : hi[-1]] if u.shape[0] else indices[:0]
            excluded[rows, cols] = True
        nan = dist.isnan() & ~excluded
        # Candidates: within the tolerance of the kk-th smallest screen value; NaN ranks last, so
        # only the first kk NaN items by id can be needed.
        screen = dist.masked_fill(excluded | nan, float("inf"))
        kth = screen.kthvalue(kk, dim=1, keepdim=True).values if kk else screen[:, :0]
        tol = screen_tolerance(p, keys, memory, catalogue, distance=distance)
        limit = kth + tol + rel * (kth.abs() + eps)
        keep = (screen <= limit) & ~excluded & ~nan
        keep |= nan & (nan.cumsum(1) <= kk)
        width_c = max(int(keep.sum(1).max()), 1) if keep.numel() else 1
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width_c]
        cand = order.masked_fill(~keep.gather(1, order), -1)
        # re-scored in pieces of the chunk's size: near-ties (duplicate items) may keep many
        step = max(1, TOPK_CHUNK_ELEMENTS // max(1, u.shape[0] * max(d, N)))
        exact = torch.cat(
            [
                distances_from_rows(
                    p, item_emb[c.clamp_min(0)], keys, memory, distance=distance, eps=eps
                )
                for c in cand.split(step, dim=1)
            ],
            dim=1,
        ).to(dist.dtype)
        dd, ii = sort_candidates(exact, cand, k)
        out_d.append(dd.to(user_emb.dtype))
        out_i.append(ii)
    if not out_d:
        return user_emb.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=users.device)
    return torch.cat(out_d), torch.cat(out_i)
