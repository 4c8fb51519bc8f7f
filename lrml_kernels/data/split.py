"""Leave-one-out splits, evaluation negatives and CSR adjacency, vectorised for 100M rows.

The leave-one-out rule (SPEC.md "Evaluation protocols"), per user:

* the held-out interaction is the one with the latest timestamp; among equal timestamps the row
  that comes last in the log (file order) wins. Unknown timestamps (:data:`MISSING_TIMESTAMP`) are
  earlier than every known one; a log without timestamps holds out each user's last row;
* a user with fewer than two distinct items keeps them in training and gets no test row;
* any other row of the held-out (user, item) pair is dropped from training as well.

Sampled-protocol negatives: ``num_negatives`` items per test user, drawn uniformly without
replacement from the items the user never interacted with (train or test), seeded by ``seed``,
each row sorted ascending. A user with fewer than ``num_negatives`` such items is an error
(``ValueError``): padding would make the candidate lists ragged and the metrics ambiguous.

Where the C++ extension loads, the passes over the whole log (the sorted unique keys, the latest
rows, the look-ups of the negatives, the compaction of the training rows) run as its ops
(``csrc/cpu/split_cpu.cpp``), with the same results bit for bit; the random draws stay numpy's.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np

from lrml_kernels.data._compiled import data_op, tensor
from lrml_kernels.data.interactions import MISSING_TIMESTAMP, Interactions, Split

__all__ = [
    "build_csr",
    "carve_validation",
    "csr_contains",
    "csr_insert",
    "csr_remove",
    "leave_one_out",
    "sample_eval_negatives",
]

_CHUNK = 1 << 22  # rows per vectorised step where temporaries would otherwise reach GBs
_CHECK = 1 << 19  # negatives checked against the keys at a time (draws do not depend on it)


def _compress_inplace(arrays: tuple[np.ndarray, ...], keep_chunk) -> int:
    """Move the rows of ``arrays`` (equal lengths) that ``keep_chunk(s, e)`` keeps (a bool mask
    of rows ``s:e``) to the front of each array, in order, a chunk at a time; returns how many
    were kept. Nothing of the arrays' size is allocated: writes land at or before the chunk being
    read, so ``keep_chunk`` sees rows ``s:e`` as they were (earlier rows may be overwritten)."""
    n = arrays[0].size
    w = 0
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        keep = keep_chunk(s, e)
        if w == s and keep.all():
            w = e
            continue
        m = 0
        for a in arrays:
            kept = a[s:e][keep]
            a[w : w + kept.size] = kept
            m = kept.size
        w += m
    return w


def _sorted_unique_keys(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, indptr)``: ``users * num_items + items`` (int64 whatever the inputs' integer
    dtypes), sorted, duplicates removed, and each user's offsets into them (int64
    ``[num_users + 1]``). The extension's counting sort (``csrc/cpu/split_cpu.cpp``) where it
    loads, else one sort of the whole log, de-duplicated in place (the keys may then be a leading
    view of a longer buffer)."""
    op = data_op("sorted_unique_keys")
    if op is not None:
        keys, indptr = op(tensor(users), tensor(items), num_users, num_items)
        return keys.numpy(), indptr.numpy()
    keys = users.astype(np.int64)
    keys *= num_items
    keys += items
    keys.sort()
    if keys.size > 1:
        prev = [None]

        def first_of_run(s: int, e: int) -> np.ndarray:
            chunk = keys[s:e]
            new = np.empty(chunk.size, dtype=bool)
            new[0] = s == 0 or chunk[0] != prev[0]
            np.not_equal(chunk[1:], chunk[:-1], out=new[1:])
            prev[0] = chunk[-1]
            return new

        n = _compress_inplace((keys,), first_of_run)
        if n < keys.size:
            keys = keys[:n]
    return keys, _user_offsets(keys, num_users, num_items)


def _user_offsets(keys: np.ndarray, num_users: int, num_items: int) -> np.ndarray:
    """int64 ``[num_users + 1]``: where each user's keys start in the sorted ``keys``."""
    return np.searchsorted(keys, np.arange(num_users + 1, dtype=np.int64) * num_items).astype(
        np.int64
    )


def _csr_from_keys(keys: np.ndarray, indptr: np.ndarray, num_items: int, *, inplace: bool = False):
    """``(indptr, keys % num_items)``, the items int32 where their ids fit (half the memory of
    int64, and half the cache lines of each row the samplers search), in one pass; ``inplace``:
    the caller gives ``keys`` away (int64 ids: computed in it)."""
    if num_items <= 2**31:
        indices = np.empty(keys.shape, dtype=np.int32)
        np.remainder(keys, num_items, out=indices, casting="unsafe")
        return indptr, indices
    indices = keys if inplace else keys.copy()
    np.remainder(indices, num_items, out=indices)
    return indptr, indices


def build_csr(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr [num_users+1], indices)``: each user's items ascending, de-duplicated; indptr
    int64, indices int32 (int64 beyond 2**31 items). ``users`` / ``items`` may be int32 (widened
    only inside the int64 keys)."""
    users, items = np.asarray(users), np.asarray(items)
    if users.dtype not in (np.int32, np.int64):
        users = users.astype(np.int64)
    if items.dtype not in (np.int32, np.int64):
        items = items.astype(np.int64)
    keys, indptr = _sorted_unique_keys(users, items, num_users, num_items)
    return _csr_from_keys(keys, indptr, num_items, inplace=True)


def _csr_search(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(at, found)``: where ``values[j]`` is or would go in row ``rows[j]``'s sorted slice of
    ``indices``, and whether it is there, for every j: a binary search of every element at once
    (``rows`` broadcasts)."""
    rows, values = np.broadcast_arrays(np.asarray(rows), np.asarray(values))
    lo = indptr[rows]
    hi = indptr[rows + 1]
    end = hi.copy()
    if indices.size == 0:
        return lo, np.zeros(values.shape, dtype=bool)
    steps = int(np.max(end - lo, initial=0)).bit_length()
    last = indices.size - 1
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) >> 1
        right = indices[np.minimum(mid, last)] < values
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo, (lo < end) & (indices[np.minimum(lo, last)] == values)


def csr_contains(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Whether ``values[j]`` is among ``indices[indptr[rows[j]]:indptr[rows[j] + 1]]`` (sorted
    slices), for every j (``rows`` broadcasts)."""
    return _csr_search(indptr, indices, rows, values)[1]


def csr_remove(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A new CSR without ``values[j]`` in row ``rows[j]``, where it is there (absent pairs are
    skipped; a pair given twice is removed once)."""
    at, found = _csr_search(indptr, indices, rows, values)
    at = np.unique(at[found])
    removed = np.bincount(np.searchsorted(indptr, at, side="right") - 1, minlength=indptr.size - 1)
    out_indptr = indptr - np.concatenate([[0], np.cumsum(removed)]).astype(np.int64)
    return out_indptr, np.delete(indices, at)


def csr_insert(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, values: np.ndarray, num_cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """A new CSR with ``values[j]`` added to row ``rows[j]`` (each row's slice stays ascending).
    The pairs must be absent from the CSR and distinct."""
    rows = np.asarray(rows, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    num_rows = indptr.size - 1
    new_keys = rows * np.int64(num_cols) + values
    order = np.argsort(new_keys, kind="stable")
    new_keys, values = new_keys[order], values[order]
    row_of = np.repeat(np.arange(num_rows, dtype=np.int64), np.diff(indptr))
    keys = row_of * np.int64(num_cols) + indices
    del row_of
    at = np.searchsorted(keys, new_keys)
    del keys
    out_indices = np.insert(indices, at, values.astype(indices.dtype))
    added = np.bincount(rows, minlength=num_rows)
    out_indptr = indptr + np.concatenate([[0], np.cumsum(added)]).astype(np.int64)
    return out_indptr, out_indices


def _latest_rows(users: np.ndarray, timestamps: np.ndarray | None, num_users: int) -> np.ndarray:
    """Per user, the row index of its latest interaction (ties: the later row); -1 if none."""
    op = data_op("latest_rows")
    if op is not None:
        return op(
            tensor(users), None if timestamps is None else tensor(timestamps), num_users
        ).numpy()
    held = np.full(num_users, -1, dtype=np.int64)
    if timestamps is None:
        for s in range(0, users.size, _CHUNK):
            e = min(s + _CHUNK, users.size)
            np.maximum.at(held, users[s:e], np.arange(s, e, dtype=np.int64))
        return held
    latest = np.full(num_users, MISSING_TIMESTAMP, dtype=np.int64)
    for s in range(0, users.size, _CHUNK):
        e = min(s + _CHUNK, users.size)
        np.maximum.at(latest, users[s:e], timestamps[s:e])
    for s in range(0, users.size, _CHUNK):
        e = min(s + _CHUNK, users.size)
        u = users[s:e]
        cand = np.flatnonzero(timestamps[s:e] == latest[u])
        np.maximum.at(held, u[cand], cand + np.int64(s))
    return held


def sample_eval_negatives(
    keys: np.ndarray,
    indptr: np.ndarray,
    users: np.ndarray,
    num_items: int,
    k: int,
    rng: np.random.Generator,
    *,
    max_rounds: int = 64,
    user_ids: np.ndarray | None = None,
) -> np.ndarray:
    """``[len(users), k]`` items each user never interacted with, uniform, without replacement
    within a row, rows sorted ascending. ``user_ids``: the data's own ids of the users (for the
    error message).

    ``keys``: the sorted, unique ``user * num_items + item`` of every interaction (train and
    test); ``indptr``: its per-user offsets. Rejection sampling in numpy (duplicates and
    interacted items are redrawn, whole rows re-checked) for at most ``max_rounds`` rounds; users
    who interacted with more than half the catalogue, and rows still unfinished, are drawn
    exactly from their complement.
    """
    users = np.asarray(users, dtype=np.int64)
    deg = indptr[users + 1] - indptr[users]
    avail = num_items - deg
    if (avail < k).any():
        bad = int(np.argmax(avail < k))
        who = users[bad] if user_ids is None else user_ids[users[bad]]
        raise ValueError(
            f"{int((avail < k).sum())} test users have fewer than num_negatives={k} items they "
            f"never interacted with (e.g. user {who}: {int(avail[bad])} of {num_items}); "
            "sample fewer (lrml: --eval-negatives N, or 0 with --eval full)"
        )
    T = users.size
    neg = rng.integers(0, num_items, size=(T, k), dtype=np.int64)
    if T == 0 or k == 0:
        return neg
    dense = deg * 2 > num_items
    todo = np.flatnonzero(~dense)
    block = max(1, _CHUNK // k)
    check = max(1, _CHECK // k)
    op = data_op("eval_negatives_bad")
    if op is not None:
        key_tensors = (tensor(keys), tensor(indptr))
    for _ in range(max_rounds):
        if todo.size == 0:
            break
        unfinished = []
        for s in range(0, todo.size, block):
            rows = todo[s : s + block]  # ascending
            in_place = rows[-1] - rows[0] + 1 == rows.size  # a slice: a view, not a copy
            sub = neg[rows[0] : rows[-1] + 1] if in_place else neg[rows]
            sub.sort(axis=1)
            if op is not None:  # the same entries as the look-ups below, found in C++
                found = op(tensor(sub), tensor(users[rows]), *key_tensors, num_items).numpy()
            else:
                bad = np.zeros(sub.shape, dtype=bool)
                bad[:, 1:] = sub[:, 1:] == sub[:, :-1]
                # the key look-ups a few rows at a time: their temporaries stay small, and each
                # search spans only the keys of those rows' users (a few MB, not the whole log)
                for c in range(0, rows.size, check):
                    d = min(c + check, rows.size)
                    u = users[rows[c:d]]
                    span = keys[indptr[u.min()] : indptr[u.max() + 1]]
                    if span.size == 0:
                        continue
                    q = (u * np.int64(num_items))[:, None] + sub[c:d]
                    pos = np.searchsorted(span, q.ravel()).reshape(q.shape)
                    np.minimum(pos, span.size - 1, out=pos)
                    bad[c:d] |= span[pos] == q
                found = np.flatnonzero(bad)
            if found.size:  # redrawn in row-major order
                at, col = np.divmod(found, k)
                sub[at, col] = rng.integers(0, num_items, size=found.size, dtype=np.int64)
                unfinished.append(rows[np.unique(at)])
            if not in_place:
                neg[rows] = sub
        todo = np.concatenate(unfinished) if unfinished else todo[:0]
    exact = np.union1d(np.flatnonzero(dense), todo)
    all_items = np.arange(num_items, dtype=np.int64)
    for r in exact:
        u = users[r]
        seen = keys[indptr[u] : indptr[u + 1]] - u * np.int64(num_items)
        free = np.setdiff1d(all_items, seen, assume_unique=True)
        neg[r] = np.sort(rng.choice(free, size=k, replace=False))
    return neg


def check_seed_and_negatives(seed, num_negatives) -> None:
    """``ValueError`` unless ``seed`` is an integer >= 0 and ``num_negatives`` one or None."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_negatives is not None and (
        isinstance(num_negatives, bool)
        or not isinstance(num_negatives, Integral)
        or num_negatives < 0
    ):
        raise ValueError(
            f"num_negatives must be a non-negative integer or None, got {num_negatives!r}"
        )


def leave_one_out(
    interactions: Interactions, *, num_negatives: int | None = 100, seed: int = 0
) -> Split:
    """Hold out each user's latest interaction (rules in the module docstring).

    Args:
        interactions: the log to split (left unchanged).
        num_negatives: sampled-protocol candidates per test user (0 or None: no negatives).
        seed: seeds the negatives (numpy ``default_rng``); the split itself is deterministic.
    """
    check_seed_and_negatives(seed, num_negatives)
    return _leave_one_out(interactions, num_negatives, seed, consume=False)


def _leave_one_out(
    x: Interactions,
    num_negatives: int | None,
    seed: int,
    *,
    consume: bool,
    order: np.ndarray | None = None,
    hash_ahead: bool = False,
) -> Split:
    """:func:`leave_one_out`. ``consume``: the caller gives ``x`` away (nothing else holds its
    arrays, and it is not used afterwards): the training rows are then compacted inside ``x``'s own
    arrays (the split's training arrays are leading views of them) instead of copied, which
    saves a copy of the whole log at the peak (100M rows: 1.6 GB). Same split either way.
    ``order``: int64 ``[n]`` keys that pick each user's held-out row in place of the timestamps
    (the largest wins). ``hash_ahead``: the training data's fingerprint is hashed on another
    thread from the moment it is final (:meth:`Interactions.fingerprint_in_background`), while
    the negatives are drawn, the training CSR is built and the caller goes on: for a split
    nobody changes afterwards."""
    U, I = x.num_users, x.num_items
    # The sorted, unique keys of every (user, item) pair: their per-user offsets give the degrees
    # and the negatives' exclusions, and, less the test pairs, they become the training CSR.
    keys, indptr = _sorted_unique_keys(x.users, x.items, U, I)
    deg = np.diff(indptr)
    held = _latest_rows(x.users, x.timestamps if order is None else order, U)
    test_users = np.flatnonzero(deg >= 2).astype(np.int64)
    test_items = x.items[held[test_users]]
    del held, deg

    test_item_of = np.full(U, -1, dtype=np.int64)
    test_item_of[test_users] = test_items
    columns = (x.users, x.items) + (() if x.timestamps is None else (x.timestamps,))

    def not_held_out(s: int, e: int) -> np.ndarray:
        return np.not_equal(x.items[s:e], test_item_of[x.users[s:e]])

    drop = None
    if consume and all(c.flags.c_contiguous and c.flags.writeable for c in columns):
        drop = data_op("drop_held_out_")  # the same compaction, one pass in C++
    if consume:
        if drop is not None:
            shared = [tensor(c) for c in columns]  # (contiguous: the arrays' own memory)
            n = drop(
                shared[0], shared[1], shared[2] if len(shared) > 2 else None, tensor(test_item_of)
            )
        else:
            n = _compress_inplace(columns, not_held_out)
        train_columns = [c[:n] if n < c.size else c for c in columns]
    else:
        keep = np.empty(len(x), dtype=bool)
        for s in range(0, len(x), _CHUNK):
            e = min(s + _CHUNK, len(x))
            keep[s:e] = not_held_out(s, e)
        train_columns = [c[keep] for c in columns]
        del keep
    del columns
    train = Interactions(
        users=train_columns[0],
        items=train_columns[1],
        timestamps=None if x.timestamps is None else train_columns[2],
        num_users=U,
        num_items=I,
        user_ids=x.user_ids,
        item_ids=x.item_ids,
        name=x.name,
    )
    del train_columns
    if hash_ahead:
        train.fingerprint_in_background()

    # The negatives (they depend on the keys of every pair, the test users and the seed only)
    # while the training data is being hashed.
    negatives = None
    if num_negatives:
        rng = np.random.default_rng(seed)
        negatives = sample_eval_negatives(
            keys, indptr, test_users, I, int(num_negatives), rng, user_ids=x.user_ids
        )
    del indptr

    # The training CSR is the full one minus each test pair: no second sort of the log, and no
    # second key array (the test pairs are removed from ``keys`` in place).
    drop = np.searchsorted(keys, test_users * np.int64(I) + test_items)  # ascending, distinct

    def not_dropped(s: int, e: int) -> np.ndarray:
        keep = np.ones(e - s, dtype=bool)
        keep[drop[np.searchsorted(drop, s) : np.searchsorted(drop, e)] - s] = False
        return keep

    n = _compress_inplace((keys,), not_dropped)
    train_keys = keys[:n] if n < keys.size else keys
    del keys
    split = Split(
        train=train,
        test_users=test_users,
        test_items=test_items,
        test_negatives=negatives,
        num_users=U,
        num_items=I,
        name=x.name,
    )
    split._csr = _csr_from_keys(train_keys, _user_offsets(train_keys, U, I), I, inplace=True)
    return split


def carve_validation(
    split: Split, *, num_negatives: int | None = None, seed: int = 0, consume: bool = False
) -> Split:
    """``split`` with a validation split carved out of its training data by the test split's own
    leave-one-out rule (module docstring): per user the latest training interaction (by
    timestamp; without timestamps the last row in file order), for users with at least two
    distinct training items. A log without timestamps has no "latest": its validation item is
    drawn uniformly among the user's training rows (seeded), since file order need not be time
    order (the NCF training file is sorted by user and item id; its last row per user is the
    largest item id). Those pairs leave the training data; each validation user gets
    ``num_negatives`` sampled items (default: as many as the test split has, none if it has none)
    that the user never interacted with in the whole log (training, validation or test), seeded
    by ``seed`` on a stream of its own (not the test negatives' stream). The test rows are kept as
    they are; only the sampling reads them, to exclude the test items from the negatives, and,
    where a test pair is a training row too (files split elsewhere), to keep the user's test item
    from being its validation item.

    ``consume``: the caller gives ``split`` away (its training arrays may be compacted in place).
    """
    check_seed_and_negatives(seed, num_negatives)
    if split.has_validation:
        raise ValueError(f"{split.name or 'this split'} already has a validation split")
    U, I = split.num_users, split.num_items
    if num_negatives is None:
        num_negatives = split.num_negatives
    # Every pair of the log, training and test: what the validation negatives must avoid.
    indptr, indices = split.train_csr()
    test_users = np.asarray(split.test_users, dtype=np.int64)
    test_items = np.asarray(split.test_items, dtype=np.int64)
    all_ptr, all_idx = indptr, indices
    test_item_of = None  # where test pairs are training rows too (files split elsewhere)
    if test_users.size:
        known = csr_contains(indptr, indices, test_users, test_items)
        all_ptr, all_idx = csr_insert(indptr, indices, test_users[~known], test_items[~known], I)
        if known.any():
            test_item_of = np.full(U, -1, dtype=np.int64)
            test_item_of[test_users[known]] = test_items[known]
    row_of = np.repeat(np.arange(U, dtype=np.int64), np.diff(all_ptr))
    all_keys = row_of * np.int64(I) + all_idx
    del row_of, all_idx

    x, order = split.train, None
    if x.timestamps is None:  # a random row per user (see above), seeded
        rng = np.random.default_rng([seed, 0x7A11D, 1])
        order = rng.integers(0, 1 << 62, size=len(x), dtype=np.int64)
    if test_item_of is not None:
        # A user's test item is never its validation item (the test split is read once, after
        # selection): its rows rank below every other row of the user, which has another item.
        if order is None:  # the timestamps' ranks, ties ranked by row as _latest_rows breaks them
            order = np.empty(len(x), dtype=np.int64)
            order[np.argsort(x.timestamps, kind="stable")] = np.arange(1, len(x) + 1)
        for s in range(0, len(x), _CHUNK):
            e = min(s + _CHUNK, len(x))
            part = order[s:e]
            part[x.items[s:e] == test_item_of[x.users[s:e]]] = -1
        del test_item_of
    inner = _leave_one_out(x, None, seed, consume=consume, order=order)
    del order
    negatives = None
    if num_negatives:
        rng = np.random.default_rng([seed, 0x7A11D])  # the validation stream: not the test's
        negatives = sample_eval_negatives(
            all_keys, all_ptr, inner.test_users, I, int(num_negatives), rng,
            user_ids=split.train.user_ids,
        )  # fmt: skip
    del all_keys, all_ptr
    return Split(
        train=inner.train,
        test_users=split.test_users,
        test_items=split.test_items,
        test_negatives=split.test_negatives,
        num_users=U,
        num_items=I,
        name=split.name,
        _csr=inner._csr,
        valid_users=inner.test_users,
        valid_items=inner.test_items,
        valid_negatives=negatives,
    )
