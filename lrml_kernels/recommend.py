"""Top-k recommendations for the users of a data set, from a trained model (``lrml recommend``).

Each user gets the k items nearest by the model's distance over the whole catalogue (the fused
top-k of SPEC.md: every pair scored with its own relation, ties to the smaller item index), leaving
out the items the user is known to have, and the result is written as CSV with the data set's
original ids::

    user,rank,item,distance
    196,1,302,0.8137

Rows are written batch by batch to a temporary file that replaces the output only when complete,
so an interrupted run leaves no partial file behind. Ids holding a comma or a quote are quoted
(the ``csv`` module's rules).
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lrml_kernels.checkpoints import atomic_write
from lrml_kernels.data.interactions import index_of
from lrml_kernels.metrics import _device_of, batch_csr, check_positive_int
from lrml_kernels.ops import check_index_ranges

EXCLUDE = ("known", "train", "none")
HEADER = ("user", "rank", "item", "distance")


def exclusion_csr(
    split, exclude: str = "known", rated=None
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(indptr [num_users+1], indices)`` of the items left out of each user's list, or None.

    ``known``: every item the data holds for the user (training, validation and test items,
    and the pairs ``rated``: ``(users, items)`` int64 in the split's indices, e.g. from
    :func:`rated_pairs`); ``train``: the training items only (what the model was fitted on);
    ``none``: nothing.
    """
    if exclude not in EXCLUDE:
        raise ValueError(f"exclude must be one of {EXCLUDE}, got {exclude!r}")
    if exclude == "none":
        return None
    if exclude == "train":
        return split.train_csr()
    from lrml_kernels.data.split import csr_contains, csr_insert

    indptr, indices = split.known_csr()
    users = np.asarray(split.test_users, dtype=np.int64)
    items = np.asarray(split.test_items, dtype=np.int64)
    for more_users, more_items in [(users, items)] + ([rated] if rated is not None else []):
        # (a test item may repeat a training row; rated pairs repeat every known one)
        new = ~csr_contains(indptr, indices, more_users, more_items)
        indptr, indices = csr_insert(
            indptr, indices, more_users[new], more_items[new], split.num_items
        )
    return indptr, indices


def rated_pairs(split, log) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``log`` (an :class:`~lrml_kernels.data.Interactions` of the same source,
    e.g. every rating where ``split`` kept those ``>= min_rating``) whose user and item the split
    has, as int64 ``(users, items)`` in the split's indices (matched by original id)."""
    users = index_of(split.train.user_ids, log.user_ids)[np.asarray(log.users, dtype=np.int64)]
    items = index_of(split.train.item_ids, log.item_ids)[np.asarray(log.items, dtype=np.int64)]
    both = (users >= 0) & (items >= 0)
    return users[both], items[both]


def user_indices(split, ids: list[str] | None) -> np.ndarray:
    """int64 indices of the users whose original ids (as written in the source) are ``ids``,
    in that order (an id may be given as a number too: ``196`` is ``"196"``); every user,
    ascending, for None. An unknown id raises ``ValueError``."""
    if ids is None:
        return np.arange(split.num_users, dtype=np.int64)
    if isinstance(ids, (str, bytes)):  # (would be split into its characters)
        raise TypeError(f"ids must be a list of ids, not one {type(ids).__name__}: [{ids!r}]")
    ids = [str(u) for u in ids]
    index = {str(u): i for i, u in enumerate(split.train.user_ids.tolist())}
    missing = [u for u in ids if u not in index]
    if missing:
        shown = ", ".join(repr(u) for u in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"unknown user id {shown}{more} (not in {split.name or 'the data'})")
    return np.array([index[u] for u in ids], dtype=np.int64)


def recommend_users(
    ranker, users: np.ndarray, k: int, exclude=None, *, batch_size: int | None = None, device=None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(users [b], distances [b, k], items [b, k])`` per batch of ``users`` (indices): each
    user's top-k by ``ranker.recommend``, ``exclude`` a CSR over all users (or None). A slot with
    no item (fewer than k candidates) holds item -1. ``batch_size`` users per top-k call: 1,024
    on the CPU and 8,192 on a GPU by default."""
    device = torch.device(device) if device is not None else _device_of(ranker)
    if batch_size is None:
        batch_size = 8192 if device.type == "cuda" else 1024
    batch_size = check_positive_int("batch_size", batch_size)
    users = torch.as_tensor(users)
    if users.dtype.is_floating_point or users.dtype.is_complex or users.dtype == torch.bool:
        raise TypeError(f"users must hold integer indices, got {users.dtype}")
    num_users = getattr(ranker, "num_users", None)
    if exclude is not None:
        indptr = torch.as_tensor(exclude[0], dtype=torch.int64)
        indices = torch.as_tensor(exclude[1])
        num_users = indptr.shape[0] - 1
    check_index_ranges([("users", users, num_users if num_users is not None else 2**63 - 1)])
    users = users.to(torch.int64)
    with torch.no_grad():
        for start in range(0, users.shape[0], batch_size):
            u = users[start : start + batch_size]
            sub = None
            if exclude is not None:
                sub = tuple(t.to(device) for t in batch_csr(indptr, indices, u))
            dist, ids = ranker.recommend(u.to(device), k, exclude=sub)
            yield u.numpy(), dist.float().cpu().numpy(), ids.cpu().numpy()


def write_csv(out, split, batches, *, total: int, progress: bool = True) -> int:
    """Write ``batches`` (as :func:`recommend_users` yields them) as CSV ``user,rank,item,
    distance`` with the original ids of ``split.train``; ``out`` a path (written in full or not
    at all: :func:`~lrml_kernels.checkpoints.atomic_write`) or ``"-"`` (standard output).
    Returns the rows written (missing slots are skipped)."""
    from tqdm.auto import tqdm

    user_ids = np.asarray(split.train.user_ids).astype(str).tolist()
    item_ids = np.asarray(split.train.item_ids).astype(str).tolist()
    rows = 0

    def write(f) -> None:
        nonlocal rows
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        bar = tqdm(
            total=total, desc="recommend", unit="user", disable=not progress, file=sys.stderr
        )
        with bar:
            for users, dist, ids in batches:
                lines = [
                    (user_ids[u], rank + 1, item_ids[i], f"{d:.7g}")
                    for u, d_row, i_row in zip(
                        users.tolist(), dist.tolist(), ids.tolist(), strict=True
                    )
                    for rank, (d, i) in enumerate(zip(d_row, i_row, strict=True))
                    if i >= 0  # (a missing slot, and every one after it)
                ]
                writer.writerows(lines)
                rows += len(lines)
                bar.update(users.shape[0])

    if str(out) == "-":
        write(sys.stdout)
        sys.stdout.flush()
    else:

        def write_bytes(f) -> None:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            write(text)
            text.flush()
            text.detach()  # (atomic_write closes the file)

        atomic_write(Path(out), write_bytes)
    return rows


__all__ = ["EXCLUDE", "exclusion_csr", "recommend_users", "user_indices", "write_csv"]
