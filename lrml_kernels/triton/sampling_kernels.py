"""Training negatives on the GPU: one Triton launch draws every entry among its user's non-items.

``_sample_negatives_kernel``: program ``pid`` owns ``BLOCK_E`` consecutive entries of the
``[B, k]`` output (entry ``e`` belongs to row ``e // k``). Each entry draws directly from the
complement of its user's training items, with no rejection of positives:

1. ``j`` uniform in ``[0, n - c)`` (``n`` items, ``c`` the user's row length): a 32-bit Philox
   word ``r`` (``tl.randint(seed, counter)``) mapped by Lemire's multiply-shift,
   ``j = (r · (n - c)) >> 32``, the words whose low half falls below ``2³² mod (n - c)`` redrawn
   (probability below ``(n - c) / 2³²``; at most ``max_tries`` redraws), so every ``j`` is
   exactly equally likely: no modulo bias;
2. the ``j``-th item not in the row, by one binary search in the user's ascending CSR slice
   (``indices[p] - p`` non-members lie below its p-th item): ``log2(c)`` dependent reads, all the
   lanes of a program in lockstep.

Redrawing positives instead (rejection sampling) would cost ``1 / (1 - c/n)`` searches per
entry: Netflix has users who rated nearly all of its 17,770 films, and with per-user counts
log-normal at Netflix's median (96) and mean (209), a batch of 4,096 users drawn by ratings holds
~160 of its 16,384 entries from users with over half the catalogue. Their rejection chains (tens
to hundreds of searches, each ~12 dependent reads) would set the kernel's time; here every entry
costs one.

The rows must be strictly ascending (de-duplicated, as ``Split.train_csr()``): with repeats the
count of non-members is off and an entry can land on a training item. A user who owns every item
gets a uniform item (necessarily a positive).

With a popularity CDF (``lrml_kernels.data.popularity_cdf``, ``POPULARITY``), each entry first
draws an item ``i``: the number of CDF entries ``cdf[p]``, ``p >= 1``, at most the Philox word of
its counter under the seed with bit 62 set (a binary search of the ``num_items + 1`` CDF, which
stays in L2: 142 KB for Netflix). A member of the user's row (a second search) takes the uniform
draw above instead; the other lanes skip it.

The counter of entry ``e`` in round ``t`` is ``e + t · B·k``: every (entry, round) has its own
Philox stream, so the result depends on the seed and the shapes only, not on the block size, the
launch or the device (the interpreter gives the GPU's bits). The CPU's C++ op
(``csrc/cpu/sampling_cpu.cpp``) and the torch ops of :mod:`lrml_kernels.data.sampling` compute
the same arithmetic, so a seed gives the same negatives on every path. The seed is a one-element
int64 tensor on the device, drawn from the caller's ``torch.Generator`` by the caller and loaded
by the kernel: no host synchronisation anywhere.

Cost (Netflix: 100 M training pairs, 480 K users, 17,770 items; B = 4096, k = 4): 16,384 lanes
in 512 one-warp programs, all resident at once (52 registers, no spills on sm_90); a warp's
time is its chain of dependent random reads: users, indptr, then the search, as many steps as
the longest row among its lanes has bits (in that model, rows drawn by ratings: 9.3 bits on
average, 12 for the longest of a warp's 8 users, 15 at most): at most ~18 reads of ~0.5-1 µs
(HBM or L2 latency), about 10-20 µs per call with the launch, against the ≤ 470 µs train step
of issue 15 (estimated, not measured: no GPU yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrml_kernels.triton.distance_kernels import _device_guard, _interpreted

# Entries per program on a GPU: one warp, so each warp leaves the redraw and search loops as soon
# as its own 32 lanes are done (the loops' conditions are warp-local reductions).
GPU_BLOCK = 32
# Under the interpreter: large blocks, fewer and bigger numpy operations.
INTERPRETER_BLOCK = 4096


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _uniform_below(seed, counter, span):
    """``(j, fair)``: ``j`` in ``[0, span)`` (per lane) from the Philox word at ``counter`` by
    Lemire's multiply-shift, and whether the draw is kept: its low word is ``>= 2³² mod span``,
    so each value keeps exactly ``⌊2³²/span⌋`` of the 2³² words."""
    r = tl.randint(seed, counter).to(tl.uint32, bitcast=True).to(tl.int64)
    m = r * span
    return m >> 32, (m & 0xFFFFFFFF) >= (4294967296 % span)


@triton.jit
def _skip_members(indices_ptr, start, count, j):
    """The ``j``-th (0-based) item not in the strictly ascending row
    ``indices[start:start + count]``: ``j + m``, ``m`` the number of members ``p`` with
    ``indices[start + p] - p <= j`` (``indices[start + p] - p`` non-members lie below the p-th
    member, non-decreasing in p): a binary search, every lane in lockstep until the longest
    search among them ends."""
    lo = tl.zeros_like(count)
    hi = count
    while tl.max(hi - lo, axis=0) > 0:
        active = lo < hi
        mid = (lo + hi) >> 1
        member = tl.load(indices_ptr + start + mid, mask=active, other=0).to(tl.int64)
        below = member - mid <= j
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return j + lo


@triton.jit
def _count_less(ptr, start, count, value):
    """The number of entries of the ascending ``ptr[start:start + count]`` below ``value`` (per
    lane): a binary search, every lane in lockstep until the longest search among them ends."""
    lo = tl.zeros_like(value)
    hi = count.to(tl.int64)
    while tl.max(hi - lo, axis=0) > 0:
        active = lo < hi
        mid = (lo + hi) >> 1
        less = tl.load(ptr + start + mid, mask=active, other=0).to(tl.int64) < value
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & ~less, mid, hi)
    return lo


@triton.jit
def _popular_unless_owned(cdf_ptr, indices_ptr, seed, offs, start, count, num_items, valid):
    """``(item, owned)``: the popularity draw of entries ``offs`` (the number of ``cdf[p]``,
    ``1 <= p <= num_items``, at most the Philox word under the seed with bit 62 set), and whether
    it is in the user's ascending row ``indices[start:start + count]``."""
    word = tl.randint(seed | 4611686018427387904, offs).to(tl.uint32, bitcast=True).to(tl.int64)
    item = _count_less(cdf_ptr + 1, 0, tl.where(valid, num_items, 0), word + 1)
    at = _count_less(indices_ptr, start, count, item)
    inside = at < count
    member = tl.load(indices_ptr + start + at, mask=inside, other=-1).to(tl.int64)
    return item, inside & (member == item)


@triton.jit
def _sample_negatives_kernel(
    out_ptr,  # [B * k] int64
    users_ptr,  # [B] int32 or int64
    indptr_ptr, indices_ptr,  # the CSR: [num_users + 1], [nnz]; int32 or int64, rows ascending
    seed_ptr,  # [1] int64
    cdf_ptr,  # [num_items + 1] int64, the popularity CDF (read only with POPULARITY)
    total, k, num_users, nnz, num_items, max_tries,
    BLOCK_E: tl.constexpr,
    POPULARITY: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_range = offs < total
    user = tl.load(users_ptr + offs // k, mask=in_range, other=0).to(tl.int64)
    valid = in_range & (user >= 0) & (user < num_users)
    # the row, clamped into [0, nnz] (indptr's values are not checked on the host): no search
    # reads outside indices, whatever indptr holds
    start = tl.load(indptr_ptr + user, mask=valid, other=0).to(tl.int64)
    end = tl.load(indptr_ptr + user + 1, mask=valid, other=0).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), nnz)
    count = tl.minimum(tl.maximum(end, start), nnz) - start
    # a user who owns every item (or a row longer than the catalogue): any item, a positive
    leaves_some = valid & (count < num_items)
    span = tl.where(leaves_some, num_items - count, num_items)
    seed = tl.load(seed_ptr)
    uniform = valid
    if POPULARITY:
        popular, owned = _popular_unless_owned(
            cdf_ptr, indices_ptr, seed, offs, start, count, num_items, valid
        )
        uniform = valid & owned
    j = tl.zeros([BLOCK_E], tl.int64)
    todo = uniform
    counter = offs
    tries = 0
    while (tries <= max_tries) & (tl.max(todo.to(tl.int32), axis=0) > 0):
        draw, fair = _uniform_below(seed, counter, span)
        j = tl.where(todo, draw, j)
        todo = todo & ~fair
        counter += total
        tries += 1
    item = _skip_members(indices_ptr, start, tl.where(leaves_some & uniform, count, 0), j)
    if POPULARITY:
        item = tl.where(uniform, item, popular)
    tl.store(out_ptr + offs, tl.where(valid, item, -1), mask=in_range)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def sample_negatives_launch(
    users: torch.Tensor,
    num_items: int,
    k: int,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    seed: torch.Tensor,
    max_tries: int,
    popularity: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, k]`` int64 negatives for ``users [B]`` in one launch (module docstring).

    Args:
        users: ``[B]`` int32/int64 user ids; a user outside ``[0, num_users)`` reads nothing and
            gets -1 in every column (not checked on the host: that would synchronise).
        indptr, indices: ``[num_users + 1]`` and ``[nnz]`` int32/int64, each row strictly
            ascending, on the device of ``users``; the kernel clamps each row's bounds into
            ``[0, nnz]`` (an indptr past the end of indices reads nothing outside it).
            seed: ``[1]`` int64 on that device.
        max_tries: Lemire redraws at most (each has probability below ``num_items / 2³²``);
            whatever the draw, the entry is none of the user's items (if any are left).
        popularity: ``[num_items + 1]`` int64 popularity CDF on that device, or None (uniform).
    Inputs are checked by :func:`lrml_kernels.data.sample_negatives`; contiguous here.
    """
    B = users.shape[0]
    out = torch.empty((B, k), dtype=torch.int64, device=users.device)
    total = B * k
    if total == 0:
        return out
    block = (
        min(INTERPRETER_BLOCK, triton.next_power_of_2(total)) if _interpreted(users) else GPU_BLOCK
    )
    users, indptr, indices = (t.contiguous() for t in (users, indptr, indices))
    cdf = seed if popularity is None else popularity.contiguous()  # (read with stride 1)
    with _device_guard(users):
        _sample_negatives_kernel[(triton.cdiv(total, block),)](
            out, users, indptr, indices, seed, cdf,
            total, k, indptr.shape[0] - 1, indices.shape[0], num_items, max_tries,
            BLOCK_E=block, POPULARITY=popularity is not None, num_warps=1,
        )  # fmt: skip
    return out
