"""The public ops: validation once, backend choice, then the backend's fused implementation.

Every op checks its inputs before any kernel runs and raises an exception naming the argument:
``TypeError`` for wrong types/dtypes, ``ValueError`` for wrong shapes, options and devices,
``IndexError`` for out-of-range indices. The index range check is one min/max reduction and one
host synchronisation per call; ``validate=False`` skips it (and the other value checks) for
benchmarks and for training loops whose data was checked once. Kernels additionally mask their
loads, so even unchecked indices never make them read out of bounds.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
import torch

from lrml_kernels import backends, reference
from lrml_kernels.reference import DISTANCES, REDUCTIONS, RELATIONS

PARAM_NAMES = ("user_emb", "item_emb", "keys", "memory")
INDEX_DTYPES = (torch.int32, torch.int64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_number(
    name: str, value, *, low: float | None = None, above: bool = False, optional: bool = False
):
    """``value`` as a float: a finite real number (not a bool), ``>= low`` (``> low`` with
    ``above``) where ``low`` is given, or None where ``optional``; otherwise ``ValueError``
    naming ``name``."""
    if optional and value is None:
        return None
    ok = (  # (numpy's numbers too: np.float32 is no float subclass)
        isinstance(value, numbers.Real)
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )
    if ok and low is not None:
        ok = value > low if above else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if above else '>='} {low:g}"
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be a finite number{bound}{none}, got {value!r}")
    return float(value)


def _no_autocast(device: torch.device):
    """The ops compute in their parameters' dtype (fp32 accumulation for half, SPEC.md) and top-k
    is exact, whatever ``torch.autocast`` region they are called in: it is switched off inside
    (the extension's kernels would get mixed dtypes, the torch backend would round to half)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def check_params(user_emb, item_emb, keys, memory, *, check_finite: bool = False):
    """Validate the four parameter tensors; return them contiguous."""
    params = (user_emb, item_emb, keys, memory)
    for name, t in zip(PARAM_NAMES, params, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    dtypes = {t.dtype for t in params}
    if len(dtypes) != 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(PARAM_NAMES, params, strict=True))
        raise TypeError(f"user_emb, item_emb, keys and memory must share one dtype, got {got}")
    devices = {t.device for t in params}
    if len(devices) != 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in zip(PARAM_NAMES, params, strict=True))
        raise ValueError(f"all tensors must be on one device, got {got}")
    d = user_emb.shape[1]
    for name, t in zip(PARAM_NAMES[1:], params[1:], strict=True):
        if t.shape[1] != d:
            raise ValueError(
                f"{name} has dimension {t.shape[1]} but user_emb has {d}: all tables share d"
            )
    if keys.shape[0] != memory.shape[0]:
        raise ValueError(
            f"keys has {keys.shape[0]} memory slots but memory has {memory.shape[0]}: "
            "they must match"
        )
    if keys.shape[0] < 1:
        raise ValueError("keys and memory must have at least one memory slot (N >= 1)")
    if d < 1:
        raise ValueError("the embedding dimension d must be at least 1")
    if check_finite and not _compiling():
        for name, t in zip(PARAM_NAMES, params, strict=True):
            if not _host_values(torch.isfinite(t).all(), "check_finite=True"):
                raise ValueError(f"{name} contains NaN or Inf")
    return tuple(t.contiguous() for t in params)


def check_index_tensor(name: str, idx, rank: int, device: torch.device) -> torch.Tensor:
    """Validate dtype, rank and device of an index tensor; return it contiguous, int32 or int64."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of integer indices, got {type(idx).__name__}"
        )
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got dtype {idx.dtype}")
    if idx.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the parameters are on {device}")
    if idx.dtype not in INDEX_DTYPES:
        idx = idx.to(torch.int64)
    return idx.contiguous()


def _host_values(t: torch.Tensor, option: str):
    """``t.tolist()``: the values a check reads on the host, which a ``torch.func`` transform
    (``vmap``) does not hand out: then an error that names the option to turn off."""
    try:
        return t.tolist()
    except RuntimeError as e:
        if "storage" not in str(e) and "vmap" not in str(e):
            raise
        raise RuntimeError(
            f"lrml_kernels: {option} reads values on the host, which torch.func.vmap does not "
            f"allow; under vmap pass {option.replace('True', 'False')}"
        ) from e


def check_tables_have_rows(checks) -> None:
    """``checks`` as :func:`check_index_ranges`'s; shapes only, so it runs with validate=False
    too: the kernels clamp an index into ``[0, size - 1]``, which reads before a table of 0 rows."""
    for name, idx, size in checks:
        if size == 0 and idx.numel() > 0:
            raise IndexError(f"{name} indexes a table with no rows")


def check_index_ranges(checks) -> None:
    """``checks``: (name, index tensor, size) triples. One host sync for all of them together.
    Meta tensors (shapes, no values: a model's dry run) have nothing to check."""
    checks = [c for c in checks if c[1].numel() > 0 and c[1].device.type != "meta"]
    if not checks or _compiling():
        return
    bounds = _host_values(
        torch.stack([torch.stack([t.min(), t.max()]).to(torch.int64) for _, t, _ in checks]),
        "validate=True",
    )
    for (name, _, size), (lo, hi) in zip(checks, bounds, strict=True):
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"{name} holds index {bad}, out of range for a table of {size} rows "
                f"(valid: 0..{size - 1})"
            )


def prepare(
    user_emb, item_emb, keys, memory, users, items, distance, relation, eps, validate, check_finite
):
    _check_option("distance", distance, DISTANCES)
    _check_option("relation", relation, RELATIONS)
    check_number("eps", eps, low=0)
    params = check_params(user_emb, item_emb, keys, memory, check_finite=check_finite)
    device = params[0].device
    users = check_index_tensor("users", users, 1, device)
    items = check_index_tensor("items", items, 2, device)
    if items.shape[0] != users.shape[0]:
        raise ValueError(
            f"items has {items.shape[0]} rows but users has {users.shape[0]}: items is [B, C]"
        )
    if items.shape[1] < 1:
        raise ValueError("items must have at least one column (column 0 is the positive item)")
    checks = [("users", users, params[0].shape[0]), ("items", items, params[1].shape[0])]
    check_tables_have_rows(checks)
    if validate:
        check_index_ranges(checks)
    return params, users, items


def lrml_distances(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    *,
    distance: str = "l2",
    relation: str = "pair",
    eps: float = 1e-3,
    backend: str = "auto",
    sparse_grad: bool = False,
    validate: bool = True,
    check_finite: bool = False,
) -> torch.Tensor:
    """LRML distances ``D [B, C]`` of every (users[b], items[b, c]) pair (SPEC.md).

    Args:
        user_emb: P ``[U, d]``; item_emb: Q ``[I, d]``; keys: K ``[N, d]``; memory: M ``[N, d]``
            (one floating dtype, one device).
        users: ``[B]`` integer user indices; items: ``[B, C]`` integer item indices, column 0 the
            positive, columns 1.. the sampled negatives.
        distance: "l2" (default), "squared_l2" or "l1". relation: "pair" (default) or "shared".
        eps: added under the square root of "l2".
        backend: "auto", "torch", "triton", "cpu" or "cuda" (see :mod:`lrml_kernels.backends`).
        sparse_grad: return sparse COO gradients for user_emb and item_emb.
        validate: check index ranges (one host sync). check_finite: reject NaN/Inf parameters.

    Returns:
        ``D [B, C]`` in the parameter dtype; differentiable w.r.t. the four parameters.
    """
    params, users, items = prepare(
        user_emb,
        item_emb,
        keys,
        memory,
        users,
        items,
        distance,
        relation,
        eps,
        validate,
        check_finite,
    )
    impl = backends.get(backend, params[0].device, users.shape[0])
    with _no_autocast(params[0].device):
        return impl.distances(*params, users, items, distance, relation, float(eps), sparse_grad)


def lrml_hinge_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    *,
    margin: float = 0.5,
    distance: str = "l2",
    relation: str = "pair",
    eps: float = 1e-3,
    reduction: str = "sum",
    backend: str = "auto",
    sparse_grad: bool = False,
    validate: bool = True,
    check_finite: bool = False,
) -> torch.Tensor:
    """Pairwise hinge loss ``Σ_c max(0, margin + D[b,0] − D[b,c])`` (SPEC.md), fused.

    Arguments as :func:`lrml_distances`, plus ``margin`` and ``reduction`` ("sum" as the authors'
    code, "mean" over rows, or "none" for the per-row losses ``[B]``).

    Returns:
        the loss in the parameter dtype: a scalar (``"sum"``, ``"mean"``) or ``[B]`` (``"none"``);
        differentiable w.r.t. the four parameters.
    """
    _check_option("reduction", reduction, REDUCTIONS)
    check_number("margin", margin)
    params, users, items = prepare(
        user_emb,
        item_emb,
        keys,
        memory,
        users,
        items,
        distance,
        relation,
        eps,
        validate,
        check_finite,
    )
    impl = backends.get(backend, params[0].device, users.shape[0])
    with _no_autocast(params[0].device):
        return impl.hinge_loss(
            *params,
            users,
            items,
            float(margin),
            distance,
            relation,
            float(eps),
            reduction,
            sparse_grad,
        )


def lrml_relations(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the memory says about each pair: ``s = p ⊙ q``, ``a = softmax(K s)``, ``r = Mᵀ a``
    (SPEC.md) for the pairs ``(users[b], items[b])``.

    Args:
        user_emb: P ``[U, d]``; item_emb: Q ``[I, d]``; keys: K ``[N, d]``; memory: M ``[N, d]``
            (one floating dtype, one device).
        users, items: ``[B]`` integer indices (int32 or int64 run as they are).
        backend: "auto", "torch", "triton", "cpu" or "cuda" (see :mod:`lrml_kernels.backends`).
        validate: check index ranges (one host sync). check_finite: reject NaN/Inf parameters.

    Returns:
        ``(attention a [B, N], relation r [B, d])`` in the parameter dtype; each row of ``a``
        sums to 1. Forward only: the outputs carry no autograd graph.
    """
    params = check_params(user_emb, item_emb, keys, memory, check_finite=check_finite)
    device = params[0].device
    users = check_index_tensor("users", users, 1, device)
    items = check_index_tensor("items", items, 1, device)
    if items.shape[0] != users.shape[0]:
        raise ValueError(
            f"items has {items.shape[0]} entries but users has {users.shape[0]}: one item per user"
        )
    checks = [("users", users, params[0].shape[0]), ("items", items, params[1].shape[0])]
    check_tables_have_rows(checks)
    if validate:
        check_index_ranges(checks)
    impl = backends.get(backend, device, users.shape[0])
    with torch.no_grad(), _no_autocast(device):
        return impl.relations(*(t.detach() for t in params), users, items)


def check_exclude(exclude, num_rows: int, num_items: int, device: torch.device, validate: bool):
    """Validate a CSR ``(indptr [B+1], indices)`` exclusion list; return it as int64 tensors."""
    if exclude is None:
        return None
    if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
        raise TypeError("exclude must be None or a CSR pair (indptr [B+1], indices)")
    indptr = check_index_tensor("exclude indptr", exclude[0], 1, device).to(torch.int64)
    indices = check_index_tensor("exclude indices", exclude[1], 1, device).to(torch.int64)
    if indptr.shape[0] != num_rows + 1:
        raise ValueError(
            f"exclude indptr has {indptr.shape[0]} entries but users has {num_rows} rows: "
            f"it must have B + 1 = {num_rows + 1}"
        )
    if validate and not _compiling():
        first, last = indptr[0].item(), indptr[-1].item()
        if first != 0 or last != indices.shape[0]:
            raise ValueError(
                f"exclude indptr must start at 0 and end at len(indices) = {indices.shape[0]}, "
                f"got {first} .. {last}"
            )
        if bool((indptr[1:] < indptr[:-1]).any()):
            raise ValueError("exclude indptr must be non-decreasing")
        check_index_ranges([("exclude indices", indices, num_items)])
        if indices.numel() > 1:
            step = indices[1:] < indices[:-1]
            row_start = torch.zeros(indices.shape[0], dtype=torch.bool, device=device)
            starts = indptr[1:-1]
            row_start[starts[starts < indices.shape[0]]] = True
            if bool((step & ~row_start[1:]).any()):
                raise ValueError("exclude indices must be sorted ascending within each row")
    return indptr, indices


def lrml_topk(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    keys: torch.Tensor,
    memory: torch.Tensor,
    users: torch.Tensor,
    k: int,
    *,
    exclude=None,
    distance: str = "l2",
    eps: float = 1e-3,
    backend: str = "auto",
    validate: bool = True,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items nearest to each user over the whole catalogue (relation="pair").

    Args:
        user_emb, item_emb, keys, memory: P ``[U, d]``, Q ``[I, d]``, K ``[N, d]``, M ``[N, d]``,
            as for :func:`lrml_distances`; distance, eps, backend, validate, check_finite
            likewise.
        users: ``[B]`` integer user indices; k: 1 .. any (slots beyond the catalogue are padded).
        exclude: None or CSR ``(indptr [B+1], indices)``: items never returned for row b are
            ``indices[indptr[b]:indptr[b+1]]`` (sorted ascending), e.g. the user's training items.

    Returns:
        ``(distances [B, k], item_ids int64 [B, k])`` sorted ascending, ties broken by the smaller
        item id; where fewer than k items remain the ids are -1 and the distances +inf.
    """
    _check_option("distance", distance, DISTANCES)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    check_number("eps", eps, low=0)
    params = check_params(user_emb, item_emb, keys, memory, check_finite=check_finite)
    device = params[0].device
    users = check_index_tensor("users", users, 1, device)
    checks = [("users", users, params[0].shape[0])]
    check_tables_have_rows(checks)
    if validate:
        check_index_ranges(checks)
    exclude = check_exclude(exclude, users.shape[0], params[1].shape[0], device, validate)
    impl = backends.get(backend, device, users.shape[0])
    with torch.no_grad(), _no_autocast(device):
        return impl.topk(*params, users, k, exclude, distance, float(eps))


__all__ = ["lrml_distances", "lrml_hinge_loss", "lrml_relations", "lrml_topk", "reference"]
