"""The two containers of the data layer: :class:`Interactions` (a log) and :class:`Split`.

Both hold plain numpy arrays (indices re-indexed ``0..n-1``), so the rest of the library never
sees file formats or original ids. User and item indices are int32 or int64 as given (the readers
give int32: 100M rows take 400 MB per column instead of 800 MB); any other integer dtype becomes
int64. Code that needs int64 (torch indices, ``user * num_items + item`` keys) widens them itself,
a batch or a chunk at a time. Timestamps are always int64 seconds since the Unix epoch; a
timestamp the source does not know is :data:`MISSING_TIMESTAMP` (the int64 minimum, which is also
numpy's ``NaT``), so that it sorts before every real time.

Fingerprints hash index arrays as int64 values whatever their dtype: equal data, equal
fingerprint, int32 or int64 (and the same fingerprints as when every array was int64).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MISSING_TIMESTAMP", "DataFormatError", "Interactions", "Split"]

#: The timestamp of an interaction whose time is unknown: earlier than every real time.
MISSING_TIMESTAMP: int = int(np.iinfo(np.int64).min)


class DataFormatError(ValueError):
    """A data file that cannot be read as its format says. The message names the file and line."""

    def __init__(self, path, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.path, self.line, self.reason))


_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_HASH_CHUNK = 1 << 22  # elements widened to int64 at a time while hashing


def _as_index_array(name: str, a, *, compact: bool = True) -> np.ndarray:
    """``a`` as a 1-D integer array: int32 or int64 kept as they are (``compact``), any other
    integer dtype (and int32 when not ``compact``) converted to int64."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.dtype != np.int64 and not (compact and a.dtype == np.int32):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
    return a


def index_of(ids: np.ndarray, wanted) -> np.ndarray:
    """int64: the index in ``ids`` (ascending, as the readers re-index: an
    :class:`Interactions`' ``user_ids`` / ``item_ids``) of each original id of ``wanted``, -1
    where ``ids`` does not hold it."""
    wanted = np.asarray(wanted)
    if ids.size == 0:
        return np.full(wanted.shape, -1, dtype=np.int64)
    idx = np.searchsorted(ids, wanted).clip(max=ids.size - 1)
    return np.where(ids[idx] == wanted, idx, -1).astype(np.int64)


def _check_range(name: str, a: np.ndarray, n: int) -> None:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got [{int(a.min())}, {int(a.max())}]")


def _hash_arrays(h, *arrays, as_int64: bool = False) -> None:
    """Hash dtype, shape and bytes of each array; ``as_int64``: integer arrays are hashed as their
    int64 values (widened a chunk at a time), so int32 and int64 copies of data hash alike."""
    for a in arrays:
        if a is None:
            h.update(b"<none>")
            continue
        a = np.ascontiguousarray(a)
        if as_int64 and a.dtype != np.int64 and np.issubdtype(a.dtype, np.integer):
            h.update(f"{np.dtype(np.int64).str}{a.shape}".encode())
            flat = a.reshape(-1)
            for s in range(0, flat.size, _HASH_CHUNK):
                h.update(memoryview(flat[s : s + _HASH_CHUNK].astype(np.int64).view(np.uint8)))
            continue
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))


@dataclass(eq=False)
class Interactions:
    """A log of (user, item, time) interactions, every row an implicit positive.

    Attributes:
        users, items: int32 or int64 ``[n]`` (kept as given; other integer dtypes become int64;
            the readers give int32), re-indexed to ``0..num_users-1`` / ``0..num_items-1``.
        timestamps: int64 ``[n]`` (always int64) seconds since the epoch
            (:data:`MISSING_TIMESTAMP` where unknown), or ``None`` when the source has no times
            at all. Rows keep the source's order.
        num_users, num_items: the index ranges (an index may have no row, e.g. a synthetic item).
        user_ids, item_ids: ``[num_users]`` / ``[num_items]``: index -> original id in the source.
        name: where the data came from (e.g. ``"movielens:/path/u.data"``).
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None
    num_users: int
    num_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    name: str = ""
    _pending_fingerprint: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.users = _as_index_array("users", self.users)
        self.items = _as_index_array("items", self.items)
        if self.users.shape != self.items.shape:
            raise ValueError(f"users {self.users.shape} and items {self.items.shape} differ")
        if self.timestamps is not None:
            self.timestamps = _as_index_array("timestamps", self.timestamps, compact=False)
            if self.timestamps.shape != self.users.shape:
                raise ValueError(f"timestamps {self.timestamps.shape} and users differ")
        self.num_users = int(self.num_users)
        self.num_items = int(self.num_items)
        _check_range("users", self.users, self.num_users)
        _check_range("items", self.items, self.num_items)
        self.user_ids = np.asarray(self.user_ids)
        self.item_ids = np.asarray(self.item_ids)
        if self.user_ids.shape != (self.num_users,) or self.item_ids.shape != (self.num_items,):
            raise ValueError(
                f"user_ids {self.user_ids.shape} / item_ids {self.item_ids.shape} must have "
                f"shapes ({self.num_users},) / ({self.num_items},)"
            )

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def fingerprint(self) -> str:
        """sha256 (hex) of the arrays and sizes (not the name): equal data, equal fingerprint
        (``users`` / ``items`` hashed as int64 values, whether they are held as int32 or int64).
        After :meth:`fingerprint_in_background`, the first call waits for that result."""
        pending, self._pending_fingerprint = self._pending_fingerprint, None
        if pending is not None:
            thread, result = pending
            if thread is not None:  # (None: a copy, the result came with it)
                thread.join()
            if result:  # (else the thread failed: hashing again raises the error here)
                return result[0]
        return self._hash()

    def fingerprint_in_background(self) -> None:
        """Start hashing :meth:`fingerprint` on another thread (hashlib and numpy's casts release
        the GIL, so other set-up work runs meanwhile); the next :meth:`fingerprint` returns its
        result. Only for a log whose arrays nothing changes until then
        (:func:`lrml_kernels.data.load` does it for the training data of the split it builds:
        100M rows take over a second to hash)."""
        result: list[str] = []
        thread = threading.Thread(
            target=lambda: result.append(self._hash()), name="lrml-fingerprint", daemon=True
        )
        thread.start()
        self._pending_fingerprint = (thread, result)

    def __getstate__(self) -> dict:
        """Pickled (or deep-copied) without the background hash's thread: it is waited for and
        its result kept, so the copy's :meth:`fingerprint` needs no second hash."""
        pending = self._pending_fingerprint
        state = dict(self.__dict__, _pending_fingerprint=None)
        if pending is not None:
            thread, result = pending
            thread.join()
            if result:
                state["_pending_fingerprint"] = (None, result)
        return state

    def _hash(self) -> str:
        h = hashlib.sha256(b"lrml-interactions-v1")
        h.update(f"{self.num_users},{self.num_items}".encode())
        _hash_arrays(h, self.users, self.items, self.timestamps, as_int64=True)
        _hash_arrays(h, self.user_ids, self.item_ids)
        return h.hexdigest()

    def __repr__(self) -> str:
        ts = "no timestamps" if self.timestamps is None else "timestamps"
        return (
            f"Interactions({self.name!r}: {self.num_users:,} users, {self.num_items:,} items, "
            f"{len(self):,} rows, {ts})"
        )


@dataclass(eq=False)
class Split:
    """Training interactions plus held-out test items (leave-one-out), ready for train/evaluate.

    Attributes:
        train: the training interactions.
        test_users, test_items: int32 or int64 ``[T]`` (``leave_one_out`` gives int64):
            user ``test_users[t]`` held out ``test_items[t]`` (at most one row per user, users
            ascending).
        test_negatives: int64 ``[T, n_neg]`` candidates of the sampled protocol, or ``None``.
        num_users, num_items, name: as in ``train``.
        valid_users, valid_items, valid_negatives: the validation split carved out of the
            training data by the same rule (:func:`lrml_kernels.data.carve_validation`), or
            ``None``. ``train`` then excludes the validation pairs; :meth:`validation` is the
            split to select on, :meth:`known_csr` what the full protocol of the test excludes.
    """

    train: Interactions
    test_users: np.ndarray
    test_items: np.ndarray
    test_negatives: np.ndarray | None
    num_users: int
    num_items: int
    name: str = ""
    _csr: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    valid_users: np.ndarray | None = None
    valid_items: np.ndarray | None = None
    valid_negatives: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.num_users = int(self.num_users)
        self.num_items = int(self.num_items)
        if (self.train.num_users, self.train.num_items) != (self.num_users, self.num_items):
            raise ValueError("train's num_users/num_items differ from the split's")
        self.test_users, self.test_items, self.test_negatives = self._held_out(
            "test", self.test_users, self.test_items, self.test_negatives
        )
        if (self.valid_users is None) != (self.valid_items is None):
            raise ValueError("valid_users and valid_items go together")
        if self.valid_users is not None:
            self.valid_users, self.valid_items, self.valid_negatives = self._held_out(
                "valid", self.valid_users, self.valid_items, self.valid_negatives
            )
        elif self.valid_negatives is not None:
            raise ValueError("valid_negatives without valid_users")

    def _held_out(self, kind: str, users, items, negatives):
        """Checked (users, items, negatives) of the test or validation rows."""
        users = _as_index_array(f"{kind}_users", users)
        items = _as_index_array(f"{kind}_items", items)
        if users.shape != items.shape:
            raise ValueError(f"{kind}_users and {kind}_items differ in length")
        _check_range(f"{kind}_users", users, self.num_users)
        _check_range(f"{kind}_items", items, self.num_items)
        if negatives is not None:
            neg = np.asarray(negatives)
            if neg.size and not np.issubdtype(neg.dtype, np.integer):  # (1.7 was item 1)
                raise ValueError(f"{kind}_negatives must hold integer item ids, got {neg.dtype}")
            if neg.dtype != np.int64:
                neg = neg.astype(np.int64)
            if neg.ndim != 2 or neg.shape[0] != users.shape[0]:
                raise ValueError(
                    f"{kind}_negatives must have shape [{users.shape[0]}, n_neg], got {neg.shape}"
                )
            _check_range(f"{kind}_negatives", neg, self.num_items)
            negatives = neg
        return users, items, negatives

    @property
    def has_validation(self) -> bool:
        return self.valid_users is not None

    def validation(self) -> Split:
        """The validation split as a :class:`Split` whose held-out rows are the validation rows
        (same training data and CSR): what ``evaluate`` reads to select epochs and
        configurations. Built without touching this split's test arrays."""
        if not self.has_validation:
            raise ValueError(
                f"{self.name or 'this split'} has no validation split: load it with "
                "validation=True or use lrml_kernels.data.carve_validation"
            )
        return Split(
            train=self.train,
            test_users=self.valid_users,
            test_items=self.valid_items,
            test_negatives=self.valid_negatives,
            num_users=self.num_users,
            num_items=self.num_items,
            name=f"{self.name} (validation)",
            _csr=self.train_csr(),
        )

    def known_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, indices)`` like :meth:`train_csr`, plus each user's validation item, less
        the user's test item: every item the user is known to like except the test item (what
        the full-ranking protocol of the test split leaves out). A test pair can also be a
        training pair in files split elsewhere (NCF's); excluded, it could never be ranked."""
        from lrml_kernels.data.split import csr_contains, csr_insert, csr_remove

        csr = self.train_csr()
        if self.has_validation and self.valid_users.size:
            new = ~csr_contains(*csr, self.valid_users, self.valid_items)
            csr = csr_insert(*csr, self.valid_users[new], self.valid_items[new], self.num_items)
        held = csr_contains(*csr, self.test_users, self.test_items)
        if held.any():
            csr = csr_remove(*csr, self.test_users[held], self.test_items[held])
        return csr

    @property
    def num_negatives(self) -> int:
        return 0 if self.test_negatives is None else int(self.test_negatives.shape[1])

    def train_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr [num_users+1] int64, indices int32, int64 beyond 2**31 items)``: each user's
        training items, ascending and de-duplicated. Computed once and cached on the split."""
        if self._csr is None:
            from lrml_kernels.data.split import build_csr

            self._csr = build_csr(
                self.train.users, self.train.items, self.num_users, self.num_items
            )
        return self._csr

    def fingerprint(self) -> str:
        """sha256 (hex) of the training data, the test items and the negatives (index arrays
        hashed as int64 values: the dtype they are held in does not change it)."""
        h = hashlib.sha256(b"lrml-split-v1")
        h.update(self.train.fingerprint().encode())
        h.update(f"{self.num_users},{self.num_items}".encode())
        _hash_arrays(h, self.test_users, self.test_items, self.test_negatives, as_int64=True)
        if self.has_validation:  # (splits without one keep the fingerprints they always had)
            h.update(b"valid")
            _hash_arrays(h, self.valid_users, self.valid_items, self.valid_negatives, as_int64=True)
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"Split({self.name!r}: {self.num_users:,} users, {self.num_items:,} items, "
            f"{len(self.train):,} train rows, {len(self.test_users):,} test users, "
            f"{self.num_negatives} negatives each"
            + ("" if not self.has_validation else f", {len(self.valid_users):,} valid users")
            + ")"
        )
