"""The fused sparse row update on the GPU: de-duplicate, sum, optimize, project, write once.

One step of :class:`~lrml_kernels.trainer.LRMLTrainer` on an embedding table, FBGEMM-style, with no
host synchronisation and static sizes:

1. :func:`sort_ids`, what ``torch.sort(idx, stable=True)`` returns: the touched row ids in order,
   equal ids in batch order (a sort never asks the host how many distinct rows there are, unlike
   ``torch.unique``). Up to ``SORT_MAX`` ids it is one Triton launch of one program,
   ``_sort_ids_kernel``: each id and its position are packed into one integer key (the position
   in the low bits makes the sort stable and deterministic), chunks of up to ``SORT_CHUNK`` keys
   are sorted in registers (a bitonic network) and several chunks merged by binary searches.
   Above ``SORT_MAX``, ``torch.sort`` of int32 ids: on CUDA a CUB radix sort of several kernels
   (4 passes of 8 bits on 32-bit keys, not the 8 of int64 ids; torch sorts at most 4,096 in one
   kernel). A Netflix step's sorts (4,096 users, 4,096 × 5 items) are one launch each;
2. one Triton kernel with one program per sorted slot. A slot whose id differs from the previous
   slot's starts a segment; its program owns that row, sums the segment's gradient rows (read
   ``BLOCK_S`` sorted slots at a time, in a fixed order, so the result is deterministic and does
   not depend on the launch or the run), then applies the optimizer and
   the projection into the ``max_norm`` ball and writes the row and its optimizer state once. The
   other programs return at once.

:func:`dense_update_` is the same kernel with every row owned by its own program and no sort: the
trainer's keys and memory, one launch each.

The math and the state layout are those of the trainer's other paths (and of the CPU's
``row_update_``): lazy Adam as ``torch.optim.SparseAdam`` (``lr`` is then the bias-corrected step
size), Adagrad as sparse ``torch.optim.Adagrad``, row-wise Adagrad with one accumulator per row
(the mean of g² over the row), SGD. fp16/bf16 tables are computed in fp32, fp64 in fp64; the state
is in the compute dtype.

bf16 tables are rounded stochastically when the updated row is written (each value up or down with
the probabilities that make the expected value the fp32 result; the trainer's other path,
``lrml_kernels.trainer.stochastic_round_bf16``, draws the same distribution from other bits): an
update much smaller than a bf16 step, as a late step of a decayed learning rate is, would vanish
under rounding to nearest. The random bits are Philox's, keyed by the step's ``seed`` and the
element's position in the table, so a step's rounding is the same whenever it runs.

The per-step scalars (the learning rate, which a schedule changes, Adam's bias-corrected step size
and, for keys and memory, its epsilon, which change every step, and the rounding seed) are not
launch arguments: the kernel reads them from a small device tensor ``hyper = (lr, eps, seed)`` in
the compute dtype (the trainer fills all of a step's with one non-blocking host-to-device copy).
A launch captured in a CUDA graph therefore replays with the current values; eager launches take
the same path. The constant ones (betas, max_norm) stay arguments, typed fp64: a compiled launch
types a Python float fp32 unless the kernel annotates it (the interpreter keeps the double), which
made an fp64 table's betas and radius fp32 and every table's ``1 - beta2`` ``1 - fp32(0.999) =
9.99987e-4``. Now ``1 - beta`` is formed in fp64, as the torch path's ``1 - beta`` in Python, and
cast to the compute dtype (an fp64 scalar would promote the fp32 row to fp64), as the radius.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrml_kernels.triton.distance_kernels import _device_guard

OPTIMIZER_CODES = {"adam": 0, "adagrad": 1, "rowwise_adagrad": 2, "sgd": 3}
STATE_TENSORS = {"adam": 2, "adagrad": 1, "rowwise_adagrad": 1, "sgd": 0}
# The one-program sort, per key width in bits (int32 keys where bits(rows - 1) + bits(n - 1) <= 31).
# Measured for sm_90 without a GPU (registers per thread, spill bytes, dynamic shared memory;
# every shape the launcher makes, 2 to SORT_MAX ids), with the Triton 3.6 the GPU machine runs
# and the newest one (3.9), each with the ptxas of its wheel:
#     python benchmarks/kernel_report.py --subset headline   (the rows of op "sort")
# One chunk in registers (32 warps: at most 64 registers a thread): 8,192 int32 keys (8 a thread)
# take 63 registers; 16,384 (16 a thread) 64 with no spill but no margin (tl.sort's own network
# spilled 32 B there); 4,096 int64 keys 64 registers, 8,192 spilled 8 B. So a chunk is 8 int32
# keys a thread (4 int64) on up to 32 warps (4,096 int32 keys: 16 warps, 64 registers; 2,048:
# 8 warps, 48; 256 or fewer: 1 warp, 14-42). Several chunks run on SORT_MERGE_WARPS = 8 warps,
# placing SORT_MERGE_KEYS_PER_THREAD keys a thread at once in the merge: 8 int32 keys (2,048 a
# step, as 32 warps × 2 did), 4 int64 keys (1,024): 104-128 registers, no spill, at 2, 3 and 4
# chunks of either width, in Triton 3.6 to 3.9. (8 int64 keys a thread at 4 chunks: no spill in
# 3.6, 3.8 and 3.9, but the ptxas of Triton 3.7 held it to 80 registers and spilled 16 B. On 32
# warps with 2 keys a thread Triton 3.9 needed 64 registers, no spill, but the ptxas of Triton
# 3.6 held its PTX to 32 registers, two programs' worth per SM, and spilled 20-36 B.) SORT_MAX
# is 4 chunks (each key's slot: one binary search of log2(chunk) + 1 dependent loads in each
# chunk); above, torch.sort.
SORT_MAX = {32: 32768, 64: 16384}
SORT_CHUNK = {32: 8192, 64: 4096}
SORT_KEYS_PER_THREAD = {32: 8, 64: 4}
SORT_MERGE_WARPS = 8
SORT_MERGE_KEYS_PER_THREAD = {32: 8, 64: 4}


@triton.jit
def _row_update_kernel(
    table_ptr, stride_tr, stride_td,  # [R, d], updated in place
    s1_ptr, s2_ptr, stride_sr,  # optimizer state: [R, d] or [R] (row-wise), in the compute dtype
    sorted_ptr,  # [n] row ids, sorted (unused if DENSE)
    perm_ptr,  # [n] int64: slot -> position in grad (unused if DENSE)
    grad_ptr, stride_gr,  # [n, d] gradient rows, in batch order ([R, d] if DENSE)
    n, d, R,
    hyper_ptr,  # [3] (lr, eps, seed), compute dtype: read on the device, so a replay sees new ones
    beta1: tl.float64, beta2: tl.float64, max_norm: tl.float64,  # (module docstring)
    OPT: tl.constexpr, DENSE: tl.constexpr, HAS_MAX_NORM: tl.constexpr, IS_FP64: tl.constexpr,
    STOCHASTIC: tl.constexpr,  # bf16 table: round the written row stochastically
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    if DENSE:  # every row once, in order: program r owns row r, whose gradient is grad[r]
        row = pid
        prev = pid - 1
    else:
        row = tl.load(sorted_ptr + pid).to(tl.int64)
        prev = tl.load(sorted_ptr + pid - 1, mask=pid > 0, other=-1).to(tl.int64)
    # This program owns the segment that starts here. An id outside [0, R) (-1: a user with no
    # negatives to draw) updates nothing: no write outside the table, no endless segment of -1s.
    if ((pid == 0) | (row != prev)) & (row >= 0) & (row < R):
        ACC = tl.float64 if IS_FP64 else tl.float32
        cols = tl.arange(0, BLOCK_D).to(tl.int64)
        cmask = cols < d
        if DENSE:
            g = tl.load(grad_ptr + row * stride_gr + cols, mask=cmask, other=0.0).to(ACC)
        else:
            # the segment's gradient rows, BLOCK_S slots at a time (a popular row repeated
            # thousands of times costs thousands / BLOCK_S dependent steps), in a fixed order
            offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
            g = tl.zeros([BLOCK_D], dtype=ACC)
            j = pid
            nxt = row
            while nxt == row:
                slot = j + offs_s
                same = tl.load(sorted_ptr + slot, mask=slot < n, other=-1).to(tl.int64) == row
                src = tl.load(perm_ptr + slot, mask=same, other=0).to(tl.int64)
                ptrs = grad_ptr + src[:, None] * stride_gr + cols[None, :]
                tile = tl.load(ptrs, mask=same[:, None] & cmask[None, :], other=0.0)
                g += tl.sum(tile.to(ACC), axis=0)
                j += BLOCK_S
                nxt = tl.load(sorted_ptr + j, mask=j < n, other=-1).to(tl.int64)
        x_ptrs = table_ptr + row * stride_tr + cols * stride_td
        x = tl.load(x_ptrs, mask=cmask, other=0.0).to(ACC)
        lr = tl.load(hyper_ptr).to(ACC)
        eps = tl.load(hyper_ptr + 1).to(ACC)
        if OPT == 0:  # lazy Adam (torch.optim.SparseAdam); lr is the bias-corrected step size
            m_ptrs = s1_ptr + row * stride_sr + cols
            v_ptrs = s2_ptr + row * stride_sr + cols
            m = tl.load(m_ptrs, mask=cmask, other=0.0).to(ACC)
            v = tl.load(v_ptrs, mask=cmask, other=0.0).to(ACC)
            w1 = tl.full((), 1.0 - beta1, ACC)  # 1 - beta in fp64, then the compute dtype
            w2 = tl.full((), 1.0 - beta2, ACC)
            m = m + w1 * (g - m)
            v = v + (g * g - v) * w2
            tl.store(m_ptrs, m.to(s1_ptr.dtype.element_ty), mask=cmask)
            tl.store(v_ptrs, v.to(s2_ptr.dtype.element_ty), mask=cmask)
            x = x - lr * (m / (tl.sqrt(v) + eps))
        elif OPT == 1:  # Adagrad: one accumulator per element
            a_ptrs = s1_ptr + row * stride_sr + cols
            acc = tl.load(a_ptrs, mask=cmask, other=0.0).to(ACC) + g * g
            tl.store(a_ptrs, acc.to(s1_ptr.dtype.element_ty), mask=cmask)
            x = x - lr * g / (tl.sqrt(acc) + eps)
        elif OPT == 2:  # row-wise Adagrad: one accumulator per row, the mean of g² over the row
            acc = tl.load(s1_ptr + row * stride_sr).to(ACC) + tl.sum(g * g, axis=0) / d
            tl.store(s1_ptr + row * stride_sr, acc.to(s1_ptr.dtype.element_ty))
            x = x - lr * g / (tl.sqrt(acc) + eps)
        else:  # SGD
            x = x - lr * g
        if HAS_MAX_NORM:  # x / max(1, |x| / max_norm), as LRML.project_()
            x = tl.where(cmask, x, 0.0)
            radius = tl.full((), max_norm, ACC)  # (an fp64 scalar would promote x to fp64)
            scale = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)) / radius, 1.0)
            x = x / scale
        if STOCHASTIC:  # 16 random low bits added to the fp32 pattern, then truncated to bf16
            seed = tl.load(hyper_ptr + 2).to(tl.int32)
            bits = (tl.randint(seed, (row * d + cols).to(tl.uint32)) & 0xFFFF).to(tl.int32)
            up = ((x.to(tl.int32, bitcast=True) + bits) & -65536).to(tl.float32, bitcast=True)
            x = tl.where(tl.abs(x) < float("inf"), up, x)  # NaN, ±inf: to nearest
        tl.store(x_ptrs, x.to(table_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _compare_and_swap(h, flip, N_DIMS: tl.constexpr, I: tl.constexpr):
    """One step of the bitonic network on the hypercube ``h`` ([2] * N_DIMS): each pair along
    dimension ``N_DIMS - 1 - I`` in order, ascending where ``flip`` is 0 and descending where 1.
    The partner is the pair's sum minus the element (exact: integers wrap), a builtin reduction."""
    partner = tl.sum(h, axis=N_DIMS - 1 - I, keep_dims=True) - h
    is_right = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - I) + [2] + [1] * I)
    return tl.where((h > partner) != (flip ^ is_right).to(tl.int1), partner, h)


@triton.jit
def _bitonic_sort(x, LOG_N: tl.constexpr):
    """``x`` [2^LOG_N] (LOG_N >= 1) of integers ascending: ``tl.sort``'s bitonic network, with the
    partner of a compare-and-swap as a ``tl.sum`` (one reduction, as tl.sort's ``xor_sum``) and
    not a custom combine, which the interpreter runs in Python element by element (tl.sort of
    4,096 ids there: 7 s; this: well under 1 s)."""
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:  # alternating runs of 2^stage
            flip = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - 1 - stage) + [2] + [1] * stage)
        else:
            flip = 0
        for i in tl.static_range(stage):
            h = _compare_and_swap(h, flip, LOG_N, stage - 1 - i)
    return tl.reshape(h, x.shape)


@triton.jit
def _lower_bound(keys_ptr, key, LOG_C: tl.constexpr):
    """How many of the 2^LOG_C ascending keys at ``keys_ptr`` are below each of ``key``."""
    i = tl.zeros(key.shape, tl.int32)
    for b in tl.static_range(LOG_C):
        step = 1 << (LOG_C - 1 - b)
        i += tl.where(tl.load(keys_ptr + i + (step - 1)) < key, step, 0)
    return i + (tl.load(keys_ptr + i) < key).to(tl.int32)


@triton.jit
def _id_keys(ids_ptr, pos, n, rows, POS_BITS: tl.constexpr, KEY: tl.constexpr):
    """(id << POS_BITS) | position of the ids at ``pos``, an id outside ``[0, rows)`` as -1 (it
    needs more than the key's id bits: shifted or cast to an int32 key it could wrap onto a
    row's); beyond n the largest key."""
    inside = pos < n
    ids = tl.load(ids_ptr + pos, mask=inside, other=0)
    ids = tl.where((ids >= 0) & (ids < rows), ids, -1).to(KEY)
    pad = tl.full(pos.shape, 0x7FFFFFFFFFFFFFFF if KEY == tl.int64 else 0x7FFFFFFF, KEY)
    return tl.where(inside, (ids << POS_BITS) | pos.to(KEY), pad)


@triton.jit
def _store_sorted(sorted_ptr, perm_ptr, keys, slot, n, POS_BITS: tl.constexpr):
    """Sorted slot ``slot`` gets the id and the position packed in ``keys`` (slots >= n: none)."""
    done = slot < n
    tl.store(sorted_ptr + slot, (keys >> POS_BITS).to(sorted_ptr.dtype.element_ty), mask=done)
    tl.store(perm_ptr + slot, (keys & ((1 << POS_BITS) - 1)).to(tl.int64), mask=done)


@triton.jit
def _sort_ids_kernel(
    ids_ptr,  # [n] row ids below 2^(key bits - 1 - POS_BITS), int32 or int64
    sorted_ptr,  # [n] out: the ids ascending (int32 or int64)
    perm_ptr,  # [n] out, int64: each sorted slot's position in ids (equal ids in batch order)
    keys_ptr,  # [CHUNKS << LOG_C] scratch in the key dtype: the sorted chunks (if CHUNKS > 1)
    n, rows,  # ids, table rows (an id outside [0, rows) is sorted as -1)
    POS_BITS: tl.constexpr,  # bits of a position < n (at least 1)
    KEY64: tl.constexpr,  # int64 keys, else int32
    LOG_C: tl.constexpr,  # log2 of a chunk: the keys sorted in registers at once
    CHUNKS: tl.constexpr,  # ceil(n / chunk)
    BLOCK_S: tl.constexpr,  # keys placed at once in the merge (divides the chunk)
):  # fmt: skip
    """One program: key = (id << POS_BITS) | position, unique, padded with the largest key (so
    the n smallest are the ids'). One chunk: one sort in registers. Several: each chunk sorted in
    registers into the scratch, then each key's sorted slot is the number of keys below it in
    every chunk (its rank in its own), a binary search in each: a merge with no host sync."""
    KEY: tl.constexpr = tl.int64 if KEY64 else tl.int32
    CHUNK: tl.constexpr = 1 << LOG_C
    rank = tl.arange(0, CHUNK)
    if CHUNKS == 1:
        keys = _bitonic_sort(_id_keys(ids_ptr, rank, n, rows, POS_BITS, KEY), LOG_C)
        _store_sorted(sorted_ptr, perm_ptr, keys, rank, n, POS_BITS)
    else:
        for start in range(0, CHUNKS * CHUNK, CHUNK):
            keys = _bitonic_sort(_id_keys(ids_ptr, start + rank, n, rows, POS_BITS, KEY), LOG_C)
            tl.store(keys_ptr + start + rank, keys)
        tl.debug_barrier()  # every chunk in the scratch before any thread reads one
        for s in range(0, n, BLOCK_S):
            keys = tl.load(keys_ptr + s + tl.arange(0, BLOCK_S))
            slot = tl.zeros([BLOCK_S], tl.int32)
            for other in tl.static_range(CHUNKS):
                slot += _lower_bound(keys_ptr + other * CHUNK, keys, LOG_C)
            _store_sorted(sorted_ptr, perm_ptr, keys, slot, n, POS_BITS)


def row_update_(
    table: torch.Tensor,
    idx: torch.Tensor,
    grad_rows: torch.Tensor,
    optimizer: str,
    hyper: torch.Tensor,
    state: tuple[torch.Tensor, ...] = (),
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    max_norm: float | None = None,
) -> None:
    """Update the rows ``idx`` of ``table`` in place with their summed gradients ``grad_rows``.

    Args:
        table: ``[R, d]``, contiguous rows. idx: row ids (int32 or int64, any shape); an id
            outside ``[0, R)`` (the sampler's -1) is skipped, unchecked (a check would sync).
        grad_rows: ``idx.shape + (d,)``, one gradient row per id (repeated ids are summed).
        optimizer: a key of ``OPTIMIZER_CODES``.
        hyper: ``[3]`` = ``(lr, eps, seed)`` on the table's device, in the compute dtype (fp64
            for fp64 tables, else fp32), read by the kernel: the learning rate (for "adam" the
            bias-corrected step size ``lr·sqrt(1 - β2^t) / (1 - β1^t)``), Adam's or Adagrad's
            epsilon, and the seed of a bf16 table's stochastic rounding (an integer below
            ``lrml_kernels.trainer.ROUND_SEEDS``, exact in fp32; other dtypes round to nearest
            and do not read it). A captured CUDA graph replays with whatever it holds then.
        state: ``(exp_avg, exp_avg_sq)`` for adam, ``(sum,)`` for adagrad (``[R, d]``) and
            rowwise_adagrad (``[R]``), ``()`` for sgd; contiguous, updated in place.
        betas: Adam's. max_norm: the projection radius, or None.

    No host synchronisation: a sort (one launch up to ``SORT_MAX`` ids, see :func:`sort_ids`)
    and one kernel launch, whatever the number of distinct rows.
    """
    _check(table, optimizer, hyper, state)
    d = table.shape[1]
    ids = idx.reshape(-1)
    n = ids.shape[0]
    if grad_rows.dim() < 1 or grad_rows.shape[-1] != d or grad_rows.numel() != n * d:
        raise ValueError(
            f"grad_rows must hold one row of d = {d} values per id ({n} ids: idx.shape + (d,)), "
            f"got shape {tuple(grad_rows.shape)}"
        )
    if n == 0:
        return
    sorted_ids, perm = sort_ids(ids, table.shape[0])
    grad = grad_rows.reshape(n, d)
    _launch(table, state, sorted_ids, perm, grad, n, optimizer, hyper, betas, max_norm, False)


def dense_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    optimizer: str,
    hyper: torch.Tensor,
    state: tuple[torch.Tensor, ...] = (),
    *,
    betas: tuple[float, float] = (0.9, 0.999),
) -> None:
    """Every row of ``param`` ``[R, d]`` updated in place with ``grad`` ``[R, d]``: one launch.

    The same update as :func:`row_update_`, ``hyper`` = ``(lr, eps, seed)`` as there
    (``torch.optim.Adam``'s is SparseAdam's with ``eps·sqrt(1 - β2^t)``; the caller passes
    that), no projection.
    """
    _check(param, optimizer, hyper, state)
    if grad.shape != param.shape:  # the kernel reads grad[r, :d] for every row r of param
        raise ValueError(
            f"grad must have the shape of param {tuple(param.shape)}, got {tuple(grad.shape)}"
        )
    if param.shape[0] == 0:
        return
    _launch(param, state, grad, grad, grad, param.shape[0], optimizer, hyper, betas, None, True)


def sort_ids(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(ids, stable=True)`` of 1-D row ids in ``[0, rows)``: the ids ascending and,
    int64, the position in ``ids`` of each (equal ids in batch order), with no host sync. An id
    outside ``[0, rows)`` stays outside it (the one-program sort makes it -1), never another
    row's id: packed into a key, or cast to int32, it would wrap (2^30 + 5 with 2 position bits
    in an int32 key, 2^32 + 5 cast to int32: 5), and the update would write row 5.

    The sorted ids are int32 where ``rows <= 2^31``, else int64. The keys ``(id << bits(n - 1))
    | position`` are int32 where bits(rows - 1) + bits(n - 1) <= 31, else int64. Up to
    ``SORT_MAX[key bits]`` ids: one launch of ``_sort_ids_kernel`` (one program); above,
    ``torch.sort`` of the ids cast to int32 where ``rows <= 2^31`` (on CUDA a cast, then a radix
    sort of 4 passes instead of the 8 of int64 keys).
    """
    ids = ids.contiguous()
    n = ids.shape[0]
    id_bits = max(rows - 1, 0).bit_length()
    pos_bits = max(1, (n - 1).bit_length())
    key_bits = 32 if id_bits + pos_bits <= 31 else 64
    narrow = torch.int32 if rows <= 2**31 else torch.int64
    if n > SORT_MAX[key_bits] or id_bits + pos_bits > 63:
        if ids.dtype != narrow:  # out-of-range ids stay out of range in the narrow dtype
            ids = ids.clamp(-1, rows)  # (rows = 2^31 wraps to -2^31: out of range too)
        return torch.sort(ids.to(narrow), stable=True)
    key_dtype = torch.int64 if key_bits == 64 else torch.int32
    chunk = min(SORT_CHUNK[key_bits], max(2, triton.next_power_of_2(n)))
    chunks = triton.cdiv(n, chunk)
    if chunks > 1:
        warps = SORT_MERGE_WARPS
    else:
        warps = max(1, min(32, chunk // (32 * SORT_KEYS_PER_THREAD[key_bits])))
    sorted_ids = torch.empty(n, dtype=narrow, device=ids.device)
    perm = torch.empty(n, dtype=torch.int64, device=ids.device)
    # the sorted chunks (one chunk: none; perm stands in, never read)
    scratch = (
        torch.empty(chunks * chunk, dtype=key_dtype, device=ids.device) if chunks > 1 else perm
    )
    with _device_guard(ids):
        _sort_ids_kernel[(1,)](
            ids, sorted_ids, perm, scratch, n, rows,
            POS_BITS=pos_bits, KEY64=key_bits == 64, LOG_C=chunk.bit_length() - 1,
            CHUNKS=chunks, BLOCK_S=min(chunk, 32 * warps * SORT_MERGE_KEYS_PER_THREAD[key_bits]),
            num_warps=warps,
        )  # fmt: skip
    return sorted_ids, perm


def hyper_dtype(table_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``hyper`` for a table of ``table_dtype``: the kernel's compute dtype."""
    return torch.float64 if table_dtype == torch.float64 else torch.float32


def _check(table, optimizer, hyper, state):
    if optimizer not in OPTIMIZER_CODES:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZER_CODES)}, got {optimizer!r}")
    if len(state) != STATE_TENSORS[optimizer]:
        raise ValueError(f"{optimizer} takes {STATE_TENSORS[optimizer]} state tensors")
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D, got shape {tuple(table.shape)}")
    # the kernel indexes the state as [R, d] (row-wise: [R]), contiguous, without bounds
    shape = table.shape[:1] if optimizer == "rowwise_adagrad" else table.shape
    for s in state:
        if not s.is_contiguous() or s.shape != shape or s.device != table.device:
            raise ValueError(
                f"{optimizer} state must be contiguous {tuple(shape)} tensors on {table.device} "
                f"(the table is {tuple(table.shape)}), got {tuple(s.shape)} on {s.device}"
            )
    want = hyper_dtype(table.dtype)
    if not isinstance(hyper, torch.Tensor) or hyper.shape != (3,) or not hyper.is_contiguous():
        raise ValueError("hyper must be a contiguous [3] tensor (lr, eps, seed)")
    if hyper.dtype != want or hyper.device != table.device:
        raise ValueError(
            f"hyper must be {want} on {table.device} (the table's compute dtype and device), "
            f"got {hyper.dtype} on {hyper.device}"
        )


def _launch(table, state, sorted_ids, perm, grad, programs, optimizer, hyper, betas, max_norm,
            dense):  # fmt: skip
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    d = table.shape[1]
    s1 = state[0] if state else table
    s2 = state[1] if len(state) > 1 else s1
    block_d = triton.next_power_of_2(d)
    with _device_guard(table):
        _row_update_kernel[(programs,)](
            table, table.stride(0), table.stride(1),
            s1, s2, s1.stride(0),
            sorted_ids, perm,
            grad, grad.stride(0),
            programs, d, table.shape[0],
            hyper, float(betas[0]), float(betas[1]),
            float(max_norm) if max_norm is not None else 1.0,
            OPT=OPTIMIZER_CODES[optimizer], DENSE=dense, HAS_MAX_NORM=max_norm is not None,
            IS_FP64=table.dtype == torch.float64, STOCHASTIC=table.dtype == torch.bfloat16,
            BLOCK_S=max(1, min(16, 1024 // block_d)), BLOCK_D=block_d,
            num_warps=1 if block_d <= 256 else min(8, block_d // 256),
        )  # fmt: skip
