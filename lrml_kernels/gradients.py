"""Gradient helpers shared by every backend's backward (no dependency on the backend registry)."""

from __future__ import annotations

import torch


def table_grad(rows, index, num_rows: int, dtype, sparse: bool) -> torch.Tensor:
    """Gradient rows ``[..., d]`` of ``table[index]`` -> the gradient ``[num_rows, d]`` of table.

    Sparse: an uncoalesced COO tensor (as ``F.embedding(..., sparse=True)`` returns) that shares
    ``rows``. Dense: a scatter-add in fp32 for fp16 / bf16 rows (CUDA's ``index_put_`` sums in the
    tensor's dtype: 2,400 bf16 ones would sum to 256), else in the rows' dtype; then ``dtype``.
    Deterministic: ``index_add_`` on the CPU (``index_put_(accumulate=True)`` is not bitwise
    reproducible there), on CUDA ``index_put_(accumulate=True)`` (deterministic under
    ``torch.use_deterministic_algorithms``).
    The backends' shared last step of a backward; the C++ autograd node of the extension's fused
    hinge loss (csrc/fused_hinge_autograd.cpp) applies the same rule.
    """
    index = index.reshape(1, -1)
    if index.dtype != torch.int64:
        index = index.to(torch.int64)
    rows = rows.reshape(index.shape[1], -1)
    if sparse:
        shape = (num_rows, rows.shape[1])
        if torch.compiler.is_compiling():
            return torch.sparse_coo_tensor(index, rows.to(dtype), shape, check_invariants=False)
        # (torch 2.11 and 2.12 warn "Sparse invariant checks are implicitly disabled ... Memory
        # errors (e.g. SEGFAULT) will occur" at the first call despite check_invariants=False)
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            return torch.sparse_coo_tensor(index, rows.to(dtype), shape, check_invariants=False)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    out = rows.new_zeros(num_rows, rows.shape[1])
    if out.device.type == "cpu":
        out.index_add_(0, index[0], rows)
    else:
        out.index_put_((index[0],), rows, accumulate=True)
    return out.to(dtype)
