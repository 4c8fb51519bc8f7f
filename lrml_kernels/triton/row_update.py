"""The fused sparse row update on the GPU: de-duplicate, sum, optimize, project, write once.

One step of :class:`~lrml_kernels.trainer.LRMLTrainer` on an embedding table, FBGEMM-style, with no
host synchronisation and static sizes:

1. ``torch.sort(idx, stable=True)``: the touched row ids in order, equal ids in batch order (a sort
   is a few device kernels and never asks the host how many distinct rows there are, unlike
   ``torch.unique``);
2. one Triton kernel with one program per sorted slot. A slot whose id differs from the previous
   slot's starts a segment; its program owns that row, sums the segment's gradient rows (read
   ``BLOCK_S`` sorted slots at a time, in a fixed order, so the result is deterministic and does
   not depend on the launch or the run), then applies the optimizer and
   the projection into the ``max_norm`` ball and writes the row and its optimizer state once. The
   other programs return at once.

:func:`dense_update_` is the same kernel with every row owned by its own program and no sort: the
trainer's keys and memory, one launch each.

The math and the state layout are those of the trainer's other paths (and of the CPU's
``row_adam_``): lazy Adam as ``torch.optim.SparseAdam`` (``lr`` is then the bias-corrected step
size), Adagrad as sparse ``torch.optim.Adagrad``, row-wise Adagrad with one accumulator per row
(the mean of g² over the row), SGD. fp16/bf16 tables are computed in fp32, fp64 in fp64; the state
is in the compute dtype.

The per-step scalars (the learning rate, which a schedule changes, Adam's bias-corrected step size
and, for keys and memory, its epsilon, which change every step) are not launch arguments: the
kernel reads them from a small device tensor ``hyper = (lr, eps)`` in the compute dtype (the
trainer fills all of a step's with one non-blocking host-to-device copy). A launch captured in a
CUDA graph therefore replays with the current values; eager launches take the same path. The
constant ones (betas, max_norm) stay arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrml_kernels.triton.distance_kernels import _device_guard

OPTIMIZER_CODES = {"adam": 0, "adagrad": 1, "rowwise_adagrad": 2, "sgd": 3}
STATE_TENSORS = {"adam": 2, "adagrad": 1, "rowwise_adagrad": 1, "sgd": 0}


@triton.jit
def _row_update_kernel(
    table_ptr, stride_tr, stride_td,  # [R, d], updated in place
    s1_ptr, s2_ptr, stride_sr,  # optimizer state: [R, d] or [R] (row-wise), in the compute dtype
    sorted_ptr,  # [n] row ids, sorted (unused if DENSE)
    perm_ptr,  # [n] int64: slot -> position in grad (unused if DENSE)
    grad_ptr, stride_gr,  # [n, d] gradient rows, in batch order ([R, d] if DENSE)
    n, d,
    hyper_ptr,  # [2] (lr, eps), compute dtype: read on the device, so a graph replay sees new ones
    beta1, beta2, max_norm,
    OPT: tl.constexpr, DENSE: tl.constexpr, HAS_MAX_NORM: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    if DENSE:  # every row once, in order: program r owns row r, whose gradient is grad[r]
        row = pid
        prev = pid - 1
    else:
        row = tl.load(sorted_ptr + pid).to(tl.int64)
        prev = tl.load(sorted_ptr + pid - 1, mask=pid > 0, other=-1).to(tl.int64)
    if (pid == 0) | (row != prev):  # this program owns the segment that starts here
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
            m = m + (1.0 - beta1) * (g - m)
            v = v + (g * g - v) * (1.0 - beta2)
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
            scale = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)) / max_norm, 1.0)
            x = x / scale
        tl.store(x_ptrs, x.to(table_ptr.dtype.element_ty), mask=cmask)


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
        table: ``[R, d]``, contiguous rows. idx: row ids (int32 or int64, any shape, in range).
        grad_rows: ``idx.shape + (d,)``, one gradient row per id (repeated ids are summed).
        optimizer: a key of ``OPTIMIZER_CODES``.
        hyper: ``[2]`` = ``(lr, eps)`` on the table's device, in the compute dtype (fp64 for
            fp64 tables, else fp32), read by the kernel: the learning rate (for "adam" the
            bias-corrected step size ``lr·sqrt(1 - β2^t) / (1 - β1^t)``) and Adam's or
            Adagrad's epsilon. A captured CUDA graph replays with whatever it holds then.
        state: ``(exp_avg, exp_avg_sq)`` for adam, ``(sum,)`` for adagrad (``[R, d]``) and
            rowwise_adagrad (``[R]``), ``()`` for sgd; contiguous, updated in place.
        betas: Adam's. max_norm: the projection radius, or None.

    No host synchronisation: a sort and one kernel launch, whatever the number of distinct rows.
    """
    _check(table, optimizer, hyper, state)
    d = table.shape[1]
    ids = idx.reshape(-1)
    n = ids.shape[0]
    if n == 0:
        return
    sorted_ids, perm = torch.sort(ids, stable=True)
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

    The same update as :func:`row_update_`, ``hyper`` = ``(lr, eps)`` as there
    (``torch.optim.Adam``'s is SparseAdam's with ``eps·sqrt(1 - β2^t)``; the caller passes
    that), no projection.
    """
    _check(param, optimizer, hyper, state)
    if param.shape[0] == 0:
        return
    _launch(param, state, grad, grad, grad, param.shape[0], optimizer, hyper, betas, None, True)


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
    for s in state:
        if not s.is_contiguous() or s.shape[0] != table.shape[0]:
            raise ValueError("optimizer state must be contiguous with one row per table row")
    want = hyper_dtype(table.dtype)
    if not isinstance(hyper, torch.Tensor) or hyper.shape != (2,) or not hyper.is_contiguous():
        raise ValueError("hyper must be a contiguous [2] tensor (lr, eps)")
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
            programs, d,
            hyper, float(betas[0]), float(betas[1]),
            float(max_norm) if max_norm is not None else 1.0,
            OPT=OPTIMIZER_CODES[optimizer], DENSE=dense, HAS_MAX_NORM=max_norm is not None,
            IS_FP64=table.dtype == torch.float64,
            BLOCK_S=max(1, min(16, 1024 // block_d)), BLOCK_D=block_d,
            num_warps=1 if block_d <= 256 else min(8, block_d // 256),
        )  # fmt: skip
