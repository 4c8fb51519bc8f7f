"""Training negatives on the device of the batch: torch ops (or one Triton kernel on CUDA
tensors), no Python loop per row."""

from __future__ import annotations

import torch

from lrml_kernels.data._compiled import data_op

__all__ = ["csr_membership", "sample_negatives"]


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
    max_tries: int = 32,
    use_extension: bool | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``[B, k]`` int64 items drawn uniformly from ``0..num_items-1`` for each of ``users [B]``,
    on the device of ``users`` (with replacement within a row).

    Args:
        generator: a ``torch.Generator`` on that device (``None``: the global one).
        exclude_csr: ``(indptr [num_users+1], indices)`` int64 on the same device, each row sorted
            (``Split.train_csr()``): entries that hit the user's own items are redrawn, checked by
            a binary search inside the user's slice (:func:`csr_membership`).
        max_tries: redraw rounds at most. A user with a fraction f of the catalogue keeps a
            positive with probability about ``f ** (max_tries + 1)`` per entry (1e-10 at f = 0.5);
            rounds stop early once nothing is left to redraw (one device sync per round).
        use_extension: test membership with the C++ extension's ``csr_members`` (CPU tensors
            only): a binary search per entry in parallel threads, re-checking only the redrawn
            entries. ``None`` (default): where it is available. The draws are the same torch
            ``randint`` calls on ``generator`` either way (one ``[B, k]`` draw per round, the bad
            entries taking theirs), so the result is bit-identical with and without it.
        use_triton: draw in one Triton kernel launch
            (:mod:`lrml_kernels.triton.sampling_kernels`; with ``exclude_csr`` only): each entry
            is drawn directly among the items its user has not trained on (a uniform rank, then
            one binary search in the row), so no positive is ever drawn or redrawn and
            ``max_tries`` only bounds the rare redraws that keep the rank exactly uniform. The
            rows must then be strictly ascending (``Split.train_csr()`` is); with repeated
            entries a training item can be drawn. ``None`` (default): on CUDA tensors where
            Triton imports; ``True`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests). No host
            synchronisation: the kernel's Philox seed is a one-element tensor drawn from
            ``generator`` on the device. The same distribution as the torch path (exactly, where
            that keeps a positive with probability ``f ** (max_tries + 1)``), reproducible for a
            given generator state, but not the same numbers: the draws come from Philox counters,
            not from ``torch.randint``. A user id outside the CSR's rows gets -1 (not checked on
            CUDA tensors: the check would synchronise).
    """
    if k < 0 or num_items < 1:
        raise ValueError(f"need k >= 0 and num_items >= 1, got k={k}, num_items={num_items}")
    if max_tries < 0:
        raise ValueError(f"need max_tries >= 0, got {max_tries}")
    device = users.device
    shape = (users.shape[0], k)
    if exclude_csr is not None:
        launch = _triton_sampler(device, use_triton)
        if launch is not None:
            indptr, indices = _check_csr(users, exclude_csr, num_items)
            seed = torch.randint(0, 2**62, (1,), generator=generator, device=device)
            return launch(users, num_items, k, indptr, indices, seed, max_tries)
    neg = torch.randint(0, num_items, shape, generator=generator, device=device)
    if exclude_csr is None or neg.numel() == 0:
        return neg
    indptr, indices = exclude_csr
    users = users.to(torch.int64)
    members = None
    if use_extension is not False and device.type == "cpu" and indptr.device.type == "cpu":
        members = data_op("csr_members")
        if members is None and use_extension:
            raise RuntimeError("use_extension=True but the C++ extension is unavailable")
    if members is not None:
        return _sample_rejecting(
            members, users, neg, num_items, generator, indptr, indices, max_tries
        )
    # A row (de-duplicated) holds at most num_items entries: that bounds the search, no sync.
    bad = csr_membership(indptr, indices, users, neg, max_row_length=num_items)
    for _ in range(max_tries):
        if not bool(bad.any()):
            break
        redraw = torch.randint(0, num_items, shape, generator=generator, device=device)
        neg = torch.where(bad, redraw, neg)
        bad &= csr_membership(indptr, indices, users, neg, max_row_length=num_items)
    return neg


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
        raise ValueError(f"the Triton sampler draws items below 2**31, got num_items={num_items}")
    return indptr, indices


def _sample_rejecting(members, users, neg, num_items, generator, indptr, indices, max_tries):
    """The rejection rounds of :func:`sample_negatives` with the extension: the same draws, but
    only the positions still bad (a short list) are written and re-checked each round."""
    indptr, indices = indptr.to(torch.int64), indices.to(torch.int64)
    bad = members(indptr, indices, users, neg, None)
    flat = neg.view(-1)
    for _ in range(max_tries):
        if bad.numel() == 0:
            break
        redraw = torch.randint(0, num_items, neg.shape, generator=generator)
        flat[bad] = redraw.view(-1)[bad]
        bad = members(indptr, indices, users, neg, bad)
    return neg
