"""Training negatives on the device of the batch, each drawn directly among the items its user has
not trained on: one C++ op on CPU tensors, one Triton kernel on CUDA tensors, torch ops where
neither is available; the same numbers from each. No Python loop per row."""

from __future__ import annotations

import math

import torch

from lrml_kernels.data._compiled import data_op

__all__ = ["csr_membership", "popularity_cdf", "sample_negatives"]

MAX_TRIES = 32  # Lemire redraws at most (sample_negatives' default)
# The popularity draw's Philox key: the seed with bit 62 set (seeds are below 2**62), so its words
# are a stream of their own beside the uniform draw's.
POPULARITY_KEY_BIT = 1 << 62


def csr_membership(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    *,
    max_row_length: int | None = None,
) -> torch.Tensor:
    """``out[b, j]``: whether ``values[b, j]`` is in row ``rows[b]`` of a CSR whose rows are
    sorted (``indices[indptr[r]:indptr[r + 1]]`` ascending).

    A binary search of every element at once, confined to its row's slice: a fixed number of
    steps, ``bit_length(max_row_length)`` (default: nnz), each a gather, a compare and two
    ``where``; no sync with the device, no ``[rows, items]`` mask and nothing of size nnz is built.
    """
    lo = indptr[rows].unsqueeze(1).expand_as(values).contiguous()
    end = indptr[rows + 1].unsqueeze(1).expand_as(values)
    hi = end.clone()
    nnz = indices.numel()
    if nnz == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    longest = nnz if max_row_length is None else min(nnz, int(max_row_length))
    steps = max(1, longest.bit_length())
    last = nnz - 1
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) >> 1
        right = indices[mid.clamp(max=last)] < values
        lo = torch.where(active & right, mid + 1, lo)
        hi = torch.where(active & ~right, mid, hi)
    return (lo < end) & (indices[lo.clamp(max=last)] == values)


def sample_negatives(
    users: torch.Tensor,
    num_items: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    exclude_csr: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_tries: int = MAX_TRIES,
    use_extension: bool | None = None,
    use_triton: bool | None = None,
    popularity: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, k]`` int64 items drawn uniformly for each of ``users [B]``, on the device of
    ``users`` (with replacement within a row).

    Without ``exclude_csr``: ``torch.randint(0, num_items)`` on ``generator``. With it, each entry
    is drawn directly among the items its user has not trained on, one binary search per entry
    and no positive ever drawn:

    1. a rank ``j`` uniform in ``[0, num_items - c)`` (``c``: the user's row length), from the
       32-bit Philox-4x32-10 word of the entry's counter (Triton's ``tl.randint``) by Lemire's
       multiply-shift, the rare words that would bias it redrawn (at most ``max_tries`` times);
    2. the ``j``-th item not in the user's row (a binary search in its CSR slice).

    With ``popularity`` (a :func:`popularity_cdf`), each entry first draws an item ``i`` with
    probability ``(popularity[i + 1] - popularity[i]) / 2**32``: the number of ``popularity[p]``,
    ``p >= 1``, at most the 32-bit Philox word of the entry's counter under the seed with bit 62
    set (a binary search). A training item drawn so is replaced by the entry's uniform draw
    above, so no positive is drawn either way.

    The seed is one ``torch.randint(0, 2**62)`` draw from ``generator`` on the device (the
    Triton kernel loads it: no host synchronisation on a GPU), so the negatives depend on the
    generator's state and the shapes only: the C++ op, the Triton kernel and the torch ops below
    give the same numbers, bit for bit (:mod:`lrml_kernels.triton.sampling_kernels` has the
    arithmetic).

    Args:
        generator: a ``torch.Generator`` on that device (``None``: the global one).
        exclude_csr: ``(indptr [num_users + 1], indices)``, int32/int64 on the same device, each
            row strictly ascending (``Split.train_csr()``; with repeated entries a training item
            can be drawn). A user who owns every item gets a uniform item.
        max_tries: Lemire redraws at most (each needed with probability below
            ``num_items / 2**32``); after them the last draw is kept, still not a training item.
        use_extension: on CPU tensors, draw with the C++ extension's ``sample_negatives`` (a
            parallel loop, searches interleaved). ``None`` (default): where it is available;
            ``False``: the torch ops (the same numbers, slower).
        use_triton: draw in one Triton launch. ``None`` (default): on CUDA tensors where Triton
            imports; ``True`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests).
        popularity: ``[num_items + 1]`` int64 on the device of ``users``, from
            :func:`popularity_cdf` (needs ``exclude_csr``); ``None``: uniform negatives.

    On CPU tensors a user id outside the CSR's rows raises an ``IndexError``; on CUDA tensors it
    gets -1 in every column (the check would synchronise).
    """
    if k < 0 or num_items < 1:
        raise ValueError(f"need k >= 0 and num_items >= 1, got k={k}, num_items={num_items}")
    if max_tries < 0:
        raise ValueError(f"need max_tries >= 0, got {max_tries}")
    device = users.device
    if exclude_csr is None:
        if popularity is not None:
            raise ValueError("popularity negatives replace training items: they need exclude_csr")
        return torch.randint(0, num_items, (users.shape[0], k), generator=generator, device=device)
    indptr, indices = _check_csr(users, exclude_csr, num_items)
    if popularity is not None:
        _check_popularity(popularity, num_items, device)
    seed = sampler_seed(generator, device)
    launch = _triton_sampler(device, use_triton)
    if launch is not None:
        return launch(users, num_items, k, indptr, indices, seed, max_tries, popularity)
    # (the indices keep their width: a copy of them would cost as much as the whole CSR)
    users, indptr = users.long(), indptr.long()
    on_cpu = device.type == "cpu"
    op = data_op("sample_negatives") if on_cpu and use_extension is not False else None
    if op is None and use_extension:
        raise RuntimeError("use_extension=True but the C++ extension is unavailable")
    if op is not None:  # checks the users itself
        return op(indptr, indices, popularity, users, num_items, k, int(seed), max_tries)
    if on_cpu and users.numel() > 0:
        low, high = int(users.min()), int(users.max())
        if low < 0 or high >= indptr.shape[0] - 1:
            bad = low if low < 0 else high
            raise IndexError(f"user {bad} is outside the CSR's {indptr.shape[0] - 1} rows")
    return _sample_by_rank(users, num_items, k, indptr, indices, seed, max_tries, popularity)


def popularity_cdf(item_counts, alpha: float) -> torch.Tensor:
    """The integer CDF of popularity-aware negatives: ``[n + 1]`` int64 (CPU), ``cdf[0] = 0``,
    ``cdf[n] = 2**32``, item ``i`` owning the ``cdf[i + 1] - cdf[i] >= 1`` words
    ``[cdf[i], cdf[i + 1])`` of a 32-bit draw: ``cdf[i] = i + floor(W_i / W_n · (2**32 - n))``,
    ``W_i`` the sum of the weights ``(count + 1) ** alpha`` of the items before ``i``.

    Args:
        item_counts: ``[n]`` training interactions per item (any integer array; ``n < 2**31``).
        alpha: the exponent, ``>= 0`` and finite (0: every item alike, which with the
            replacement of training items is the uniform draw again).
    """
    counts = torch.as_tensor(item_counts).to(torch.float64).reshape(-1)
    n = counts.numel()
    if not 1 <= n < 2**31:
        raise ValueError(f"need 1 <= num_items < 2**31, got {n}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"popularity alpha must be a finite number >= 0, got {alpha!r}")
    if bool((counts < 0).any()):
        raise ValueError("item counts must be non-negative")
    weights = (counts + 1.0) ** alpha
    cum = torch.cat([weights.new_zeros(1), weights.cumsum(0)])
    if not math.isfinite(float(cum[-1])):
        raise ValueError(f"popularity alpha {alpha} overflows the weights (count + 1) ** alpha")
    spare = float((1 << 32) - n)
    return torch.arange(n + 1, dtype=torch.int64) + torch.floor(cum / cum[-1] * spare).long()


def _check_popularity(popularity, num_items, device) -> None:
    """A ValueError unless ``popularity`` has the form of :func:`popularity_cdf`'s result for
    ``num_items`` items on ``device`` (its shape, dtype and device: the values stay there)."""
    if popularity.dtype != torch.int64 or tuple(popularity.shape) != (num_items + 1,):
        raise ValueError(
            f"popularity must be int64 [num_items + 1] = [{num_items + 1}] "
            f"(popularity_cdf), got {popularity.dtype} {tuple(popularity.shape)}"
        )
    if popularity.device != device:
        raise ValueError(f"popularity is on {popularity.device}, users on {device}")


def sampler_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    """The ``[1]`` int64 seed of one :func:`sample_negatives` call, drawn from ``generator`` on
    ``device`` (every path draws it so, and a caller that draws for itself must too)."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device)


def _triton_sampler(device: torch.device, use_triton: bool | None):
    """The Triton sampler's launcher where ``use_triton`` asks for it (``None``: on CUDA
    tensors, if Triton imports), else None."""
    if use_triton is False or (use_triton is None and device.type != "cuda"):
        return None
    from lrml_kernels.backends import triton_interpreted

    if device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"use_triton=True on {device.type} tensors needs TRITON_INTERPRET=1 (or CUDA tensors)"
        )
    try:
        from lrml_kernels.triton.sampling_kernels import sample_negatives_launch
    except ImportError as exc:
        if use_triton:
            raise RuntimeError(f"use_triton=True but Triton cannot be imported ({exc})") from exc
        return None
    return sample_negatives_launch


def _check_csr(users, exclude_csr, num_items):
    """``exclude_csr`` for the kernel, or a ValueError (shapes, dtypes and devices only: the
    values stay on the device)."""
    indptr, indices = exclude_csr
    if users.dim() != 1 or users.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"users must be 1-D int32/int64, got {users.dtype} {tuple(users.shape)}")
    for name, t in (("indptr", indptr), ("indices", indices)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be 1-D int32/int64, got {t.dtype} {tuple(t.shape)}")
        if t.device != users.device:
            raise ValueError(f"{name} is on {t.device}, users on {users.device}")
    if indptr.shape[0] < 1:
        raise ValueError("indptr needs num_users + 1 >= 1 entries")
    if num_items >= 2**31:
        raise ValueError(f"the samplers draw items below 2**31, got num_items={num_items}")
    return indptr, indices


_MASK32 = (1 << 32) - 1
# Philox-4x32's multipliers and key increments (as in triton.language.random)
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of ``const · x`` for 32-bit ``const`` and ``x`` (int64 in
    ``[0, 2**32)``), in 16-bit halves of ``const`` so that no product leaves int64."""
    high, low = x * (const >> 16), x * (const & 0xFFFF)
    return (high + (low >> 16)) >> 16, (((high & 0xFFFF) << 16) + low) & _MASK32


def _philox_word(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, counter)`` as int64 in ``[0, 2**32)``: the first word of
    Philox-4x32-10 at counter ``(low, high word of counter, 0, 0)`` with key ``(low, high word
    of seed)``; ``seed [1]``, ``counter [E]`` non-negative int64."""
    c0, c1 = counter & _MASK32, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        high_b, low_b = _mul32(_PHILOX_ROUND_B, c2)
        high_a, low_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def _sample_by_rank(users, num_items, k, indptr, indices, seed, max_tries, popularity=None):
    """:func:`sample_negatives` in torch ops (int64 users and indptr, int32 or int64 indices; any
    device): the Triton kernel's numbers. A user outside the CSR's rows gets -1."""
    B, nnz = users.shape[0], indices.shape[0]
    total = B * k
    valid = (users >= 0) & (users < indptr.shape[0] - 1)
    row = torch.where(valid, users, 0)
    start, count = indptr[row], indptr[row + 1] - indptr[row]
    count = torch.where(count < num_items, count, 0).repeat_interleave(k)
    start = start.repeat_interleave(k)
    span = num_items - count
    threshold = torch.full_like(span, 1 << 32) % span
    entry = torch.arange(total, device=users.device)
    m = _philox_word(seed, entry) * span  # below 2**63: span < 2**31
    rank, todo = m >> 32, (m & _MASK32) < threshold
    for t in range(1, max_tries + 1):
        redo = todo.nonzero().squeeze(1)
        if redo.numel() == 0:
            break
        m = _philox_word(seed, redo + t * total) * span[redo]
        rank[redo] = m >> 32
        todo[redo] = (m & _MASK32) < threshold[redo]
    # the number of members p with indices[start + p] - p <= rank (non-decreasing in p)
    lo, hi = torch.zeros_like(count), count
    for _ in range(int(num_items).bit_length() if nnz else 0):
        active = lo < hi
        mid = (lo + hi) >> 1
        below = indices[(start + mid).clamp(max=nnz - 1)] - mid <= rank
        lo = torch.where(active & below, mid + 1, lo)
        hi = torch.where(active & ~below, mid, hi)
    items = (rank + lo).view(B, k)
    if popularity is not None and total > 0:
        word = _philox_word(seed | POPULARITY_KEY_BIT, entry)
        drawn = torch.searchsorted(popularity[1:], word, right=True).view(B, k)
        owned = csr_membership(indptr, indices, row, drawn)
        items = torch.where(owned, items, drawn)
    return torch.where(valid[:, None], items, -1)
