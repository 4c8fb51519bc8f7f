"""Readers of the public recommendation data formats, each returning :class:`Interactions`.

Every reader is vectorised (numpy's C tokenizer on 64 MB chunks), strict (a bad line raises
:class:`DataFormatError` naming the file and 1-based line; nothing is half loaded) and cached: the
parsed arrays go to an ``.npz`` next to the source (or, where that is not writable, under
``$LRML_KERNELS_CACHE_DIR`` or ``~/.cache/lrml_kernels``), keyed by path, size, mtime and the
reader's options, and written atomically.

Common rules: ids are re-indexed ``0..n-1`` in ascending order of the original id (``user_ids`` /
``item_ids`` map back; the indices are int32, the ids int64, or str for a ``csv:`` file's text
ids); a (user, item) pair that occurs
more than once keeps its row with the latest timestamp (ties: the later row), *before*
``min_rating`` is applied, so a re-rating decides; ``min_rating`` keeps the ratings
``>= min_rating`` (each kept row is an implicit positive); timestamps are int64 seconds since the
epoch, :data:`MISSING_TIMESTAMP` where a field is empty.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lrml_kernels.data import _text
from lrml_kernels.data._text import Field
from lrml_kernels.data.interactions import DataFormatError, Interactions, Split

__all__ = [
    "cache_dir",
    "read_citeulike",
    "read_csv",
    "read_mat",
    "read_movielens",
    "read_movielens_ratings",
    "read_ncf",
    "read_netflix",
    "read_netflix_mat",
]

CACHE_VERSION = 2  # 2: text ids decoded as UTF-8
_INT32 = np.iinfo(np.int32)
_INT64_MAX = int(np.iinfo(np.int64).max)
_CHUNK = 1 << 22  # elements per step of the full-size loops (temporaries of 16-32 MB, not GBs)
_COMPACT = ("users", "items", "test_users", "test_items")  # arrays that may stay int32


# --- cache ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where caches go when the source's folder is not writable (``$LRML_KERNELS_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/lrml_kernels``, else ``~/.cache/lrml_kernels``)."""
    env = os.environ.get("LRML_KERNELS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lrml_kernels"


def _cache_key(kind: str, sources: list[Path], options: dict) -> str:
    files = []
    for p in sources:
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"version": CACHE_VERSION, "kind": kind, "files": files, "options": options},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_candidates(kind: str, anchor: Path, key: str) -> list[Path]:
    """Where a cache may live, in order of preference (``LRML_KERNELS_CACHE_DIR`` wins)."""
    tag = f"{kind}-{key[:20]}"
    user = cache_dir() / f"{anchor.name}.{tag}.npz"
    if os.environ.get("LRML_KERNELS_CACHE_DIR"):
        return [user]
    near = anchor / f".lrml-cache.{tag}.npz" if anchor.is_dir() else None
    if near is None:
        near = anchor.parent / f".{anchor.name}.lrml-cache.{tag}.npz"
    return [near, user]


def _fits_int32(a: np.ndarray) -> bool:
    return not a.size or (int(a.min()) >= _INT32.min and int(a.max()) <= _INT32.max)


def _write_npy(out, a: np.ndarray) -> None:
    """``np.save`` of ``a``, int64 stored as int32 where the values fit (halves the file), the
    narrowing done a chunk at a time (no second full-size array)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)  # (not for 0-d arrays: it would make them 1-d)
    if a.dtype != np.int64 or a.ndim != 1 or not _fits_int32(a):
        np.lib.format.write_array(out, a, allow_pickle=False)
        return
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32))}
    header.update(fortran_order=False, shape=a.shape)
    np.lib.format.write_array_header_1_0(out, header)
    for s in range(0, a.size, _CHUNK):
        out.write(a[s : s + _CHUNK].astype(np.int32).tobytes())


def _save_npz(f, arrays: dict) -> None:
    """``np.savez`` one array at a time (each written in chunks, so that a 100M-row cache never
    holds a second copy of anything)."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            if a is None:
                continue
            with zf.open(name + ".npy", mode="w", force_zip64=True) as out:
                _write_npy(out, np.asarray(a))


def _read_npy(f, name: str) -> np.ndarray:
    """One array of a cache. Integer arrays come back int64, except :data:`_COMPACT` ones stored
    as int32, which stay int32; the widening is done while reading, a chunk at a time."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unexpected .npy version {version}")
    if not np.issubdtype(dtype, np.integer) or fortran or len(shape) > 2:
        return np.lib.format.read_array(f, allow_pickle=False, version=version)
    keep = name in _COMPACT and dtype == np.int32
    out = np.empty(shape, dtype=dtype if keep else np.int64)
    flat = out.reshape(-1)
    step = max(1, _CHUNK * 4 // dtype.itemsize)
    for s in range(0, flat.size, step):
        e = min(s + step, flat.size)
        data = f.read((e - s) * dtype.itemsize)
        if len(data) != (e - s) * dtype.itemsize:
            raise ValueError(f"truncated array {name!r}")
        flat[s:e] = np.frombuffer(data, dtype=dtype)
    return out


def _load_npz(place: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of the cache at ``place`` if its key is ``key``, else ``None``."""
    with zipfile.ZipFile(place) as zf:
        names = [n.removesuffix(".npy") for n in zf.namelist()]
        with zf.open("_key.npy") as f:
            if str(np.lib.format.read_array(f, allow_pickle=False)) != key:
                return None
        arrays = {}
        for name in names:
            if name != "_key":
                with zf.open(name + ".npy") as f:
                    arrays[name] = _read_npy(f, name)
        return arrays


def _cached(
    kind: str,
    sources: list[Path],
    anchor: Path,
    options: dict,
    build: Callable[[], dict],
    cache: bool,
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from the cache when it is current (and writing it when not)."""
    if not cache:
        return build()
    key = _cache_key(kind, sources, options)
    places = _cache_candidates(kind, anchor, key)
    for place in places:
        if place.is_file():
            try:
                arrays = _load_npz(place, key)
            except Exception:  # a damaged or foreign file: rebuild and overwrite it
                arrays = None
            if arrays is not None:
                return arrays
    arrays = build()
    for place in places:
        tmp = None
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                dir=place.parent, prefix=place.name + ".", suffix=".tmp", delete=False
            ) as f:
                tmp = f.name
                _save_npz(f, {**arrays, "_key": np.array(key)})
            os.chmod(tmp, 0o644)  # NamedTemporaryFile makes it 0600
            os.replace(tmp, place)
            break
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    else:
        warnings.warn(f"could not write a cache for {anchor} (tried {places})", stacklevel=3)
    return arrays


# --- raw columns -> Interactions ------------------------------------------------------------------


def _index_dtype(n: int) -> type:
    return np.int32 if n <= _INT32.max + 1 else np.int64


def _utf8(ids: np.ndarray) -> np.ndarray:
    """Text ids as parsed (each byte one character, Latin-1) decoded as UTF-8 where every one of
    them is valid UTF-8, else as they are (a Latin-1 file). The order stays ascending: UTF-8's
    byte order is its code points' order."""
    try:
        return np.array([s.encode("latin-1").decode("utf-8") for s in ids.tolist()], dtype=str)
    except UnicodeError:
        return ids


def _reindex(raw: np.ndarray, *, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, uniques)``: codes in ``0..len(uniques)-1`` (int32 unless there are more than
    2**31 uniques), uniques ascending (int64; str for text ids). ``inplace``: ``raw`` is the
    caller's to spend, and when it has the codes' dtype the codes overwrite it (no second
    full-size array)."""
    if raw.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    if raw.dtype.kind == "U":  # text ids: sorted as text
        uniques, codes = np.unique(raw, return_inverse=True)
        return codes.reshape(-1).astype(_index_dtype(uniques.size)), _utf8(uniques)
    lo, hi = int(raw.min()), int(raw.max())
    if hi - lo < max(4 * raw.size, 1 << 22):  # dense ids: a lookup table, O(n)
        present = np.zeros(hi - lo + 1, dtype=bool)
        for s in range(0, raw.size, _CHUNK):
            present[raw[s : s + _CHUNK] - lo] = True
        uniques = np.flatnonzero(present).astype(np.int64) + lo
        lut = np.cumsum(present, dtype=np.int64) - 1
        del present
        lut = lut.astype(_index_dtype(uniques.size))

        def codes_of(chunk):
            return lut[chunk - lo]
    else:  # sparse ids: sort the uniques, then binary searches
        uniques = np.unique(raw).astype(np.int64)
        dtype = _index_dtype(uniques.size)

        def codes_of(chunk):
            return np.searchsorted(uniques, chunk).astype(dtype)

    codes_dtype = _index_dtype(uniques.size)
    codes = raw if inplace and raw.dtype == codes_dtype else np.empty(raw.size, codes_dtype)
    for s in range(0, raw.size, _CHUNK):
        codes[s : s + _CHUNK] = codes_of(raw[s : s + _CHUNK])
    return codes, uniques


def _rows_of_users(users: np.ndarray, a: int, b: int, dtype) -> np.ndarray:
    """The rows (ascending, as ``dtype``) whose user lies in ``[a, b)``, a chunk at a time."""
    rows = []
    for s in range(0, users.size, _CHUNK):
        u = users[s : s + _CHUNK] - users.dtype.type(a)  # in [0, b - a) as unsigned: one compare
        hit = np.flatnonzero(u.view(u.dtype.str.replace("i", "u")) < b - a)
        hit += s
        rows.append(hit.astype(dtype))
    return np.concatenate(rows)


def _dedup_keep(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray | None,
    num_users: int,
    num_items: int,
    *,
    rows_per_block: int = 1 << 23,
) -> np.ndarray | None:
    """Mask keeping one row per (user, item): the latest timestamp, ties the later row. ``None``
    when there are no duplicates (the common case costs one sort of the keys).

    The keys ``user * num_items + item`` of 100M rows would take 800 MB as int64: the users are
    taken in ranges of about ``rows_per_block`` rows (a (user, item) pair never spans two), one
    block of keys at a time, relative to the range's first user (int32 when they fit)."""
    n = users.size
    if n < 2:
        return None
    if n <= rows_per_block:
        bounds = [0, num_users]
    else:
        counts = np.zeros(num_users, dtype=np.int64)
        for s in range(0, n, _CHUNK):  # (bincount would copy all of users to int64)
            counts += np.bincount(users[s : s + _CHUNK], minlength=num_users)
        cum = np.cumsum(counts)
        cuts = np.searchsorted(cum, np.arange(rows_per_block, n, rows_per_block), side="right")
        bounds = np.unique(np.concatenate(([0], cuts, [num_users]))).tolist()
    row_dtype = np.int32 if n <= _INT32.max else np.int64
    keep = None
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        whole = (a, b) == (0, num_users)
        rows = None if whole else _rows_of_users(users, a, b, row_dtype)
        key_dtype = np.int32 if (b - a) * num_items <= _INT32.max + 1 else np.int64
        key = (users if whole else users[rows]).astype(key_dtype)
        if a:
            key -= a
        key *= num_items
        key += items if whole else items[rows]
        s = np.sort(key)
        dup = s[1:] == s[:-1]
        if not dup.any():
            continue
        dup_keys = np.unique(s[1:][dup])
        del s, dup
        pos = np.minimum(np.searchsorted(dup_keys, key), dup_keys.size - 1)
        in_dup = np.flatnonzero(dup_keys[pos] == key)
        del pos
        k = key[in_dup]
        r = in_dup if whole else rows[in_dup]
        ts = timestamps[r] if timestamps is not None else np.zeros(r.size, np.int64)
        order = np.lexsort((r, ts, k))  # by key, then time, then row: the last one wins
        k_sorted = k[order]
        last = np.concatenate((k_sorted[1:] != k_sorted[:-1], [True]))
        if keep is None:
            keep = np.ones(n, dtype=bool)
        keep[r[order][~last]] = False
    return keep


def _compact(arrays: dict, name: str, keep: np.ndarray) -> None:
    """``arrays[name] = arrays[name][keep]``, the array being the caller's to spend: the kept
    rows are written over its front a chunk at a time (they only move forward), then it is shrunk
    in place (:func:`_resize`)."""
    a = arrays[name]
    w = 0
    for s in range(0, a.size, _CHUNK):
        part = a[s : s + _CHUNK][keep[s : s + _CHUNK]]
        a[w : w + part.size] = part
        w += part.size
    del a
    _resize(arrays, name, w)


def _resize(arrays: dict, name: str, size: int) -> None:
    """Resize the 1-d ``arrays[name]`` in place (``realloc``: a shrunk tail goes back to the
    system, no copy). numpy refuses while another reference to the array exists: then a copy."""
    a = arrays.pop(name)
    try:
        a.resize(size, refcheck=True)
    except ValueError:  # a view, or referenced elsewhere
        b = np.zeros(size, dtype=a.dtype)
        b[: min(size, a.size)] = a[: min(size, a.size)]
        a = b
    arrays[name] = a


def _finalize(
    path: Path, cols: dict[str, np.ndarray], min_rating: float | None
) -> dict[str, np.ndarray | None]:
    """Raw columns (``users``, ``items``, optional int64 ``timestamps`` and ``ratings``; taken out
    of ``cols`` and spent: re-indexed and filtered in place where their dtypes allow) -> the
    re-indexed (int32), de-duplicated, rating-filtered arrays of an :class:`Interactions`. No
    full-size int64 temporary is made (100M Netflix rows stay within their final 1.6 GB)."""
    ratings = cols.pop("ratings", None)
    if min_rating is not None and ratings is None:
        raise ValueError(f"{path} has no ratings: min_rating does not apply to it")
    out: dict[str, np.ndarray | None] = {}
    out["users"], out["user_ids"] = _reindex(cols.pop("users"), inplace=True)
    out["items"], out["item_ids"] = _reindex(cols.pop("items"), inplace=True)
    out["timestamps"] = cols.pop("timestamps", None)
    keep = _dedup_keep(
        out["users"], out["items"], out["timestamps"], out["user_ids"].size, out["item_ids"].size
    )
    if min_rating is not None:
        good = ratings >= min_rating
        keep = good if keep is None else keep & good
    del ratings
    if keep is not None and not keep.all():
        if not keep.any():
            raise ValueError(f"{path}: no interactions left with min_rating={min_rating}")
        for name in ("users", "items", "timestamps"):
            if out[name] is not None:
                _compact(out, name, keep)
        del keep
        for name in ("users", "items"):  # ids left without a row are dropped
            codes, kept = _reindex(out.pop(name), inplace=True)
            out[name] = codes
            out[name[:-1] + "_ids"] = out[name[:-1] + "_ids"][kept]
    return out


def _to_interactions(arrays: dict, name: str) -> Interactions:
    return Interactions(
        users=arrays["users"],
        items=arrays["items"],
        timestamps=arrays.get("timestamps"),
        num_users=arrays["user_ids"].size,
        num_items=arrays["item_ids"].size,
        user_ids=arrays["user_ids"],
        item_ids=arrays["item_ids"],
        name=name,
    )


# The magic numbers of compressed files: the readers take plain text (and MAT files) only.
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def _require_file(path: Path) -> Path:
    """``path`` if it is a file, not a compressed one (a clear error, not a parse error of
    its bytes)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise DataFormatError(
                path, None, f"a {kind}-compressed file: decompress it first (plain text is read)"
            )
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):  # (Excel's "Unicode text")
        raise DataFormatError(path, None, "a UTF-16 text file: save it as UTF-8 (or ASCII) first")
    return path


# --- delimited rating tables (MovieLens, generic CSV) ---------------------------------------------

_NAME_ROLES = {
    "user": {"user", "userid", "users", "uid", "customer", "customerid", "reviewerid", "visitorid"},
    "item": {
        "item",
        "itemid",
        "items",
        "iid",
        "movie",
        "movieid",
        "product",
        "productid",
        "asin",
        "song",
        "songid",
        "track",
        "trackid",
        "artist",
        "artistid",
        "business",
        "businessid",
        "article",
        "articleid",
        "book",
        "bookid",
        "isbn",
        "doc",
        "docid",
    },
    "rating": {"rating", "ratings", "score", "stars", "value", "preference", "bookrating"},
    "timestamp": {"timestamp", "time", "date", "datetime", "ts", "unixtime", "unixreviewtime"},
}
_DELIMITERS = ("::", "\t", ",", ";", " ")


def _norm(name: bytes) -> str:
    return re.sub(r"[^a-z0-9]", "", name.decode("utf-8", errors="replace").lower())


def _sniff_delimiter(path: Path, lines: list[bytes]) -> str:
    """The delimiter that splits every head line into the same number (at least 2) of fields,
    the most fields among those (``1;10;4,5`` is three ';'-separated fields, not two
    ','-separated ones), ties in :data:`_DELIMITERS` order; where none splits them alike, the
    first that splits line 1."""
    counts = {d: {len(_text.split_fields(ln, d)) for ln in lines} for d in _DELIMITERS}
    alike = [d for d in _DELIMITERS if len(counts[d]) == 1 and min(counts[d]) >= 2]
    if alike:
        return max(alike, key=lambda d: min(counts[d]))  # (max keeps the first of a tie)
    for d in _DELIMITERS:
        if len(_text.split_fields(lines[0], d)) >= 2:
            return d
    raise DataFormatError(
        path, 1, f"no delimiter found (tried '::', tab, ',', ';', space) in {lines[0][:80]!r}"
    )


def _looks_like_header(first: list[bytes], rows: list[list[bytes]]) -> bool:
    """Whether line 1 (its fields ``first``) is a header, given the next lines of the file's head
    (``rows``): it names both a user and an item column (``user,item``: a file of text ids), or a
    field of it is text (neither a number nor a date) where every next line holding that column
    has a number or a date. A column of text in every row (a title, a comment) does not make a
    header, nor does one of ids that are text in some rows (``alice`` over ``42`` and ``bob``)."""

    def value(f: bytes) -> bool:
        return _text.is_number(f) or _text.is_date(f)

    names = {_norm(f) for f in first}
    if names & _NAME_ROLES["user"] and names & _NAME_ROLES["item"]:
        return True
    text = [j for j, f in enumerate(first) if f.strip() and not value(f)]
    if not rows:
        return bool(text)
    below = [[r[j] for r in rows if j < len(r) and r[j].strip()] for j in text]
    return any(col and all(value(f) for f in col) for col in below)


def _id_kind(rows: list[list[bytes]], col: int) -> str:
    """``"plain_int"`` where every head row holds a plainly written integer id in column ``col``,
    else ``"str"``: ids read as text, verbatim (``A1B2C3``; ``0312``, which as an integer would be
    user 312), and re-indexed. A later row that is not plain (``0312``, ``bob``) makes the whole
    column text (:func:`_read_rating_table`)."""
    plain = all(_text.PLAIN_INT_RE.fullmatch(r[col]) for r in rows if col < len(r))
    return "plain_int" if plain else "str"


def _read_rating_table(
    path: Path,
    *,
    source: str,
    delimiter: str | None,
    header: bool | None,
    columns: dict[str, int | str | None],
    ncols: int | None,
    min_rating: float | None,
    cache: bool,
    text_ids: bool = False,
) -> Interactions:
    """A delimited table with user, item, optional rating and optional timestamp columns.
    ``text_ids``: an id column that is not all plain integers is read as text (``_id_kind``).

    ``columns`` maps role -> column index, header name, or ``None`` (auto: by header name, else by
    position user 0, item 1, rating 2, timestamp 3 where the file has them). An empty timestamp
    field is :data:`MISSING_TIMESTAMP`.
    """
    path = _require_file(path)
    lines = _text.head_lines(path)
    if not lines:
        raise DataFormatError(path, 1, "empty file (no data rows)")
    delim = delimiter or _sniff_delimiter(path, lines)
    first, *rows = [[f.strip() for f in _text.split_fields(ln, delim)] for ln in lines]
    has_header = _looks_like_header(first, rows) if header is None else header
    names = [_norm(f) for f in first] if has_header else []
    width = len(first)
    roles = ("user", "item", "rating", "timestamp")
    cols: dict[str, int] = {}
    for role in roles:
        want = columns.get(role)
        if isinstance(want, str):
            if _norm(want.encode()) not in names:
                raise ValueError(f"{path}: no column named {want!r} in the header {first}")
            cols[role] = names.index(_norm(want.encode()))
        elif want is not None:
            cols[role] = int(want)
    auto = [r for r in roles if columns.get(r) is None]
    by_name = {
        r: next(j for j, n in enumerate(names) if n in _NAME_ROLES[r])
        for r in auto
        if any(n in _NAME_ROLES[r] for n in names)
    }
    cols.update(by_name)
    # Without header names, roles take their usual positions (user 0, item 1, rating 2,
    # timestamp 3); with them, only a missing user or item column falls back to its position.
    for j, role in enumerate(roles):
        if role in auto and role not in cols and j < width and j not in cols.values():
            if not by_name or role in ("user", "item"):
                cols[role] = j
    if "user" not in cols or "item" not in cols:
        raise DataFormatError(path, 1, f"need at least a user and an item column, got {first}")
    # the timestamps' kind from the first data line of the file's head that has one
    data_rows = rows if has_header else [first, *rows]
    stamps = (
        r[cols["timestamp"]]
        for r in data_rows
        if "timestamp" in cols and cols["timestamp"] < len(r) and r[cols["timestamp"]]
    )
    ts_kind = "datetime" if _text.is_date(next(stamps, b"")) else "int"
    kinds = {r: _id_kind(data_rows, cols[r]) if text_ids else "int" for r in ("user", "item")}
    kinds.update(rating="float", timestamp=ts_kind)
    if min_rating is None and ncols is None:
        cols.pop("rating", None)  # not used: do not require it to be numeric
    fields = [Field(role, j, kinds[role]) for role, j in cols.items()]
    options = {
        "delimiter": delim,
        "header": has_header,
        "fields": [[f.name, f.index, f.kind] for f in fields],
        "ncols": ncols,
        "min_rating": min_rating,
    }

    def read(fields: list[Field]) -> dict[str, np.ndarray]:
        return _text.read_table(
            path,
            fields,
            delimiter=delim,
            header=has_header,
            ncols=ncols,
            missing_ok=frozenset({"timestamp"}),
        )

    def build() -> dict:
        try:
            t = read(fields)
        except DataFormatError as strict:
            if not any(f.kind == "plain_int" for f in fields):
                raise
            # an id beyond the head that is not a plain integer (bob, 0007): its column is text
            plain = [f.name for f in fields if f.kind == "plain_int"]
            t = read([Field(f.name, f.index, "str") if f.name in plain else f for f in fields])
            for name in plain:
                ids = np.unique(t[name]).tolist()
                if any(_norm(i.encode("latin-1")) in _NAME_ROLES[name] for i in ids):
                    raise strict from None  # a header line further down (files concatenated)
                if all(_text.PLAIN_INT_RE.fullmatch(i.encode("latin-1")) for i in ids):
                    t[name] = t[name].astype(np.int64)  # the other id column stays integer
        names = {"user": "users", "item": "items", "rating": "ratings", "timestamp": "timestamps"}
        return _finalize(path, {names[k]: v for k, v in t.items()}, min_rating)

    arrays = _cached(source, [path], path, options, build, cache)
    return _to_interactions(arrays, f"{source}:{path}")


_MOVIELENS_FILES = ("ratings.dat", "ratings.csv", "u.data", "ratings_reconstructed.tsv")


def _movielens_file(path) -> tuple[Path, str, bool | None]:
    """The ratings file of a MovieLens folder (or the file itself), its delimiter and whether it
    has a header (``None``: detect it)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in _MOVIELENS_FILES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no MovieLens ratings file ({', '.join(_MOVIELENS_FILES)}) in {path}"
            )
        path = found[0]
    path = _require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".dat":
        return path, "::", False
    if suffix == ".csv":
        return path, ",", None
    if suffix == ".tsv":
        return path, "\t", None
    return path, "\t", False  # u.data, u1.base, ua.test, ...


def read_movielens(path, *, min_rating: float | None = None, cache: bool = True) -> Interactions:
    """MovieLens ratings: a folder holding one of ``ratings.dat`` (1M/10M, ``::``),
    ``ratings.csv`` (20M/25M/latest, with header), ``u.data`` (100K, tab) or
    ``ratings_reconstructed.tsv`` (this project's ML-1M rebuild, header, empty timestamps), or one
    such file (``u1.base`` etc. too). Columns: user, item, rating, timestamp (seconds)."""
    path, delim, header = _movielens_file(path)
    return _read_rating_table(
        path,
        source="movielens",
        delimiter=delim,
        header=header,
        columns={"user": 0, "item": 1, "rating": 2, "timestamp": 3},
        ncols=4,
        min_rating=min_rating,
        cache=cache,
    )


def read_movielens_ratings(path) -> tuple[Path, dict[str, np.ndarray]]:
    """Every row of the MovieLens ratings file that :func:`read_movielens` reads, as it stands:
    ``user_id``, ``item_id`` (original ids, int64), ``rating`` (float64) and ``timestamp`` (int64,
    :data:`MISSING_TIMESTAMP` where empty), in file order; no re-indexing, de-duplication or
    cache. Returns ``(the file read, columns)``."""
    path, delim, header = _movielens_file(path)
    if header is None:
        lines = _text.head_lines(path)
        if not lines:
            raise DataFormatError(path, 1, "empty file (no data rows)")
        first, *rows = [[f.strip() for f in _text.split_fields(ln, delim)] for ln in lines]
        header = _looks_like_header(first, rows)
    fields = [
        Field("user_id", 0, "int"),
        Field("item_id", 1, "int"),
        Field("rating", 2, "float"),
        Field("timestamp", 3, "int"),
    ]
    columns = _text.read_table(
        path, fields, delimiter=delim, header=header, ncols=4, missing_ok=frozenset({"timestamp"})
    )
    return path, columns


def read_csv(
    path,
    *,
    delimiter: str | None = None,
    header: bool | None = None,
    user_col: int | str | None = None,
    item_col: int | str | None = None,
    rating_col: int | str | None = None,
    timestamp_col: int | str | None = None,
    min_rating: float | None = None,
    cache: bool = True,
) -> Interactions:
    """A generic delimited file: user and item ids are integers, or text (``A1B2C3``, ``0312``):
    a column whose ids are not all integers written without a leading zero is read as text,
    verbatim (``0007`` and ``7`` are two ids), and decoded as UTF-8 (Latin-1 where the column is
    not valid UTF-8). A header line further down (files concatenated) is an error. With a
    one-character delimiter other than space, fields may be quoted as in CSV (``"a,b"`` is one
    field, ``""`` inside quotes one quote); a line break inside quotes is an error.

    Args:
        delimiter: ``","``, ``"\\t"``, ``"::"``, ``";"`` or ``" "`` (runs of whitespace); ``None``
            detects it from the first lines: the one that splits each of them into the same
            number (>= 2) of fields, the most fields among those, ties in that order.
        header: whether the first line is a header; ``None``: yes if it names a user and an
            item column, or a field of it is text where each of the next lines (up to 49) has a
            number or a date (a UTF-8 byte-order mark is ignored).
        user_col, item_col, rating_col, timestamp_col: 0-based column index or header name;
            ``None``: found by header name (``userId``, ``MovieID``, ``CustomerID``, ``rating``,
            ``timestamp``, ``Date`` ...), else by position 0, 1, 2, 3 where the file has them.
            Timestamps are integers (seconds) or ISO dates (``YYYY-MM-DD[ HH:MM:SS]``); an empty
            timestamp field is missing. Columns not used may hold anything.
    """
    return _read_rating_table(
        Path(path),
        source="csv",
        delimiter=delimiter,
        header=header,
        columns={
            "user": user_col,
            "item": item_col,
            "rating": rating_col,
            "timestamp": timestamp_col,
        },
        ncols=None,
        min_rating=min_rating,
        cache=cache,
        text_ids=True,
    )


# --- Netflix Prize ---


def _netflix_files(path: Path) -> list[Path]:
    if path.is_file():
        return [_require_file(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    for pattern in ("combined_data_*.txt", "training_set/mv_*.txt", "mv_*.txt"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"no Netflix Prize files in {path} (expected combined_data_*.txt, training_set/mv_*.txt "
        "or mv_*.txt)"
    )


def _netflix_chunks(
    files: list[Path], chunk_bytes: int
) -> Iterator[tuple[bytes, list[tuple[int, Path, int]], int]]:
    """``(chunk, segments, bytes read)``; segments ``(first chunk line, file, its line)``: small
    files (``mv_*.txt``) are batched, each checked to open with its ``MovieID:`` line."""
    batch: list[bytes] = []
    segs: list[tuple[int, Path, int]] = []
    size = lines = 0
    for p in files:
        n = p.stat().st_size
        if n > chunk_bytes // 4:
            if batch:
                yield b"".join(batch), segs, size
                batch, segs, size, lines = [], [], 0, 0
            for chunk, first in _text.iter_chunks(p, chunk_bytes):
                yield chunk, [(1, p, first)], len(chunk)
            continue
        data = _text.read_lines_bytes(p)
        if not data.strip():
            raise DataFormatError(p, 1, "empty file")
        if not data.endswith(b"\n"):
            data += b"\n"
        skipped = len(data) - len(data.lstrip(b"\n"))
        head = data[skipped:].split(b"\n", 1)[0].strip()
        if not re.fullmatch(rb"\d+:", head):
            raise DataFormatError(p, skipped + 1, f"expected a 'MovieID:' line, got {head[:80]!r}")
        batch.append(data)
        segs.append((lines + 1, p, 1))
        lines += data.count(b"\n")
        size += n
        if size >= chunk_bytes:
            yield b"".join(batch), segs, size
            batch, segs, size, lines = [], [], 0, 0
    if batch:
        yield b"".join(batch), segs, size


def read_netflix(
    path,
    *,
    min_rating: float | None = None,
    cache: bool = True,
    progress: bool = False,
    chunk_bytes: int = 16 << 20,
) -> Interactions:
    """The Netflix Prize training set: a folder with ``combined_data_*.txt`` (Kaggle layout) or
    ``training_set/mv_*.txt`` (the original), or one such file: ``MovieID:`` lines followed by
    ``CustomerID,Rating,YYYY-MM-DD`` lines. Dates become seconds since the epoch (midnight UTC).
    A ``.csv`` file is read by :func:`read_csv` (e.g. ``MovieID,UserID,Rating,Date`` subsets).

    100M ratings take about 1.6 GB in all, while parsing and once parsed: int32 users and
    items, int64 timestamps (plus int8 ratings while parsing, with ``min_rating``); the ``.npz``
    cache loads them back in seconds at the same size. ``chunk_bytes``: text parsed per step
    (16 MB: the parse's temporaries stay near 100 MB)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        x = read_csv(path, min_rating=min_rating, cache=cache)
        x.name = f"netflix:{path}"
        return x
    files = _netflix_files(path)

    def build() -> dict:
        from tqdm.auto import tqdm

        total = sum(p.stat().st_size for p in files)
        dtypes = {"users": np.int32, "items": np.int32, "timestamps": np.int64}
        if min_rating is not None:
            dtypes["ratings"] = np.int8
        # Each chunk is parsed straight into columns sized for the most rows the files can hold
        # (a rating line has at least 13 bytes): pages never written are never allocated, and
        # no list of parts is concatenated (their freed memory would stay with the process).
        cap = total // 13 + 1
        cols = {k: np.empty(cap, dtype) for k, dtype in dtypes.items()}
        n = 0
        movie = None
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
            for chunk, segs, nbytes in _netflix_chunks(files, chunk_bytes):
                if segs[0][2] == 1:
                    movie = None  # a new file must start with its own MovieID line
                try:
                    out, movie = _text.parse_netflix_chunk(segs[0][1], chunk, 1, movie)
                except DataFormatError as e:
                    if e.line is None:
                        raise DataFormatError(segs[0][1], None, e.reason) from None
                    start, p, first = max(s for s in segs if s[0] <= e.line)
                    raise DataFormatError(p, first + e.line - start, e.reason) from None
                m = out["users"].size
                if n + m > cap:  # not for well-formed files
                    cap = max(n + m, 2 * cap)
                    for k in dtypes:
                        _resize(cols, k, cap)
                for k in dtypes:
                    if k == "timestamps":
                        np.multiply(out["days"], np.int64(86400), out=cols[k][n : n + m])
                    else:
                        cols[k][n : n + m] = out[k]
                n += m
                del out
                bar.update(nbytes)
        if n == 0:
            raise DataFormatError(files[0], 1, "no ratings")
        for k in dtypes:
            _resize(cols, k, n)
        return _finalize(path, cols, min_rating)

    options = {"min_rating": min_rating}
    arrays = _cached("netflix", files, path, options, build, cache)
    return _to_interactions(arrays, f"netflix:{path}")


# --- MATLAB v5 files (the Netflix 5K x 5K subset) ---

# MAT v5 data types -> numpy (the format's "miINT8" ... "miUINT64" numbering)
_MAT_TYPES = {
    1: "i1",
    2: "u1",
    3: "i2",
    4: "u2",
    5: "i4",
    6: "u4",
    7: "f4",
    9: "f8",
    12: "i8",
    13: "u8",
}
_MAT_MATRIX, _MAT_COMPRESSED = 14, 15
_MAT_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS ... mxUINT64_CLASS
_MAT_COMPLEX = 0x0800


def _mat_elements(path: Path, buf: bytes, order: str) -> Iterator[tuple[int, bytes]]:
    """``(type, payload)`` of each data element in ``buf`` (8-byte tags; "small" elements pack
    a payload of up to 4 bytes into the tag; others are padded to 8 bytes)."""
    pos = 0
    while pos + 8 <= len(buf):
        kind, size = np.frombuffer(buf, order + "u4", 2, pos).tolist()
        if kind >> 16:  # small element: size in the upper half, payload in the tag's 2nd word
            kind, size = kind & 0xFFFF, kind >> 16
            yield kind, buf[pos + 4 : pos + 4 + size]
            pos += 8
            continue
        if pos + 8 + size > len(buf):
            raise DataFormatError(path, None, f"MAT element at byte {pos} runs past the end")
        yield kind, buf[pos + 8 : pos + 8 + size]
        pos += 8 + size if kind == _MAT_COMPRESSED else 8 + (size + 7) // 8 * 8


def _mat_matrix(path: Path, payload: bytes, order: str) -> tuple[str, np.ndarray]:
    """``(name, array)`` of a dense real numeric miMATRIX element (MATLAB's column-major
    order kept: the array has the matrix's shape)."""
    parts = list(_mat_elements(path, payload, order))
    if len(parts) < 4:
        raise DataFormatError(path, None, "MAT matrix with fewer than 4 sub-elements")
    flags = int(np.frombuffer(parts[0][1], order + "u4")[0])
    dims = tuple(np.frombuffer(parts[1][1], order + "i4").tolist())
    name = parts[2][1].decode("ascii")
    mx_class = flags & 0xFF
    if mx_class not in _MAT_NUMERIC_CLASSES or flags & _MAT_COMPLEX:
        raise DataFormatError(
            path, None, f"MAT variable {name!r}: only dense real numeric matrices are read "
            f"(class {mx_class}{', complex' if flags & _MAT_COMPLEX else ''})",
        )  # fmt: skip
    kind, data = parts[3]
    if kind not in _MAT_TYPES:
        raise DataFormatError(path, None, f"MAT variable {name!r}: data type {kind} not read")
    values = np.frombuffer(data, order + _MAT_TYPES[kind])
    if values.size != math.prod(dims):
        raise DataFormatError(path, None, f"MAT variable {name!r}: {values.size} values for {dims}")
    return name, values.reshape(dims, order="F")


def read_mat(path) -> dict[str, np.ndarray]:
    """The dense real numeric matrices of a MATLAB v5 ``.mat`` file (compressed or not), by
    variable name, with their shapes (``m x n``) and stored dtypes. Other variable classes
    (sparse, cell, struct, char, complex) and v7.3 (HDF5) files are a :class:`DataFormatError`."""
    path = _require_file(Path(path))
    raw = path.read_bytes()
    if raw[:8] == b"\x89HDF\r\n\x1a\n" or raw[512:520] == b"\x89HDF\r\n\x1a\n":
        raise DataFormatError(path, None, "a MAT v7.3 (HDF5) file: only MAT v5 is read")
    if (
        len(raw) < 128
        or not raw.startswith(b"MATLAB 5.0 MAT-file")
        or raw[126:128]
        not in (
            b"IM",
            b"MI",
        )
    ):
        raise DataFormatError(path, None, "not a MATLAB 5.0 MAT-file (no v5 header)")
    order = "<" if raw[126:128] == b"IM" else ">"
    out = {}
    for kind, payload in _mat_elements(path, raw[128:], order):
        if kind == _MAT_COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as e:
                raise DataFormatError(path, None, f"damaged compressed MAT element: {e}") from None
            inner = list(_mat_elements(path, payload, order))
            if len(inner) != 1:
                raise DataFormatError(path, None, "a compressed MAT element must hold one element")
            ((kind, payload),) = inner
        if kind != _MAT_MATRIX:
            raise DataFormatError(path, None, f"unexpected top-level MAT element type {kind}")
        name, values = _mat_matrix(path, payload, order)
        out[name] = values
    return out


def _netflix_mat_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    files = sorted(path.glob("*.mat"), key=lambda p: ("test" in p.name, p.name))
    if not files:
        raise FileNotFoundError(f"no .mat files in {path}")
    return files


def _mat_ids(x: np.ndarray, path: Path, what: str) -> np.ndarray:
    """A MAT file's id column (often float64) as int64; ids that are not integers in int64's
    range (``1.5``, NaN, ``1e20``) are a format error, not truncated or wrapped."""
    if x.dtype.kind in "iu":
        if x.dtype == np.uint64 and x.size and int(x.max()) > _INT64_MAX:
            raise DataFormatError(path, None, f"{what}: id {int(x.max())} beyond int64")
        return x.astype(np.int64)
    f = x.astype(np.float64)
    bad = ~(np.isfinite(f) & (f == np.round(f)) & (np.abs(f) < 2.0**63))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            path, None, f"{what}: id {x[j].item()!r} (row {j + 1}) is not an integer"
        )
    return f.astype(np.int64)


def read_netflix_mat(path, *, min_rating: float | None = None, cache: bool = True) -> Interactions:
    """The Netflix 5K x 5K subset's MATLAB v5 files (``training_data5K5K.mat``,
    ``test_data5K5K.mat``): each holds ``<name>_X`` (``n x 2``: user, item) and ``<name>_Y``
    (``n x 1``: rating). ``path`` is one such file or a folder: then the union of its ``.mat``
    files, test files last, each in file order (no timestamps: leave-one-out then holds out each
    user's last row, a rating of the test file where the user has one). The ids are the files'
    (items ``5001..10000`` in the subset); ``item_ids`` map back to them."""
    path = Path(path)
    files = _netflix_mat_files(path)

    def build() -> dict:
        users, items, ratings = [], [], []
        for f in files:
            mats = read_mat(f)
            pairs = sorted(k for k in mats if k.endswith("_X"))
            if not pairs:
                raise DataFormatError(f, None, f"no <name>_X variable (has {sorted(mats)})")
            for k in pairs:
                x, y = mats[k], mats.get(k[:-2] + "_Y")
                if x.ndim != 2 or x.shape[1] != 2 or y is None or y.size != x.shape[0]:
                    shape = None if y is None else y.shape
                    raise DataFormatError(
                        f, None, f"expected {k} (n x 2) and {k[:-2]}_Y (n x 1), got {x.shape} "
                        f"and {shape}",
                    )  # fmt: skip
                users.append(_mat_ids(x[:, 0], f, f"{k}'s users (column 1)"))
                items.append(_mat_ids(x[:, 1], f, f"{k}'s items (column 2)"))
                ratings.append(y.reshape(-1).astype(np.float64))
        cols = {"users": np.concatenate(users), "items": np.concatenate(items)}
        cols["ratings"] = np.concatenate(ratings)
        if not cols["users"].size:
            raise DataFormatError(files[0], None, "no ratings")
        return _finalize(path, cols, min_rating)

    arrays = _cached("netflix-mat", files, path, {"min_rating": min_rating}, build, cache)
    return _to_interactions(arrays, f"netflix-mat:{path}")


# --- CiteULike ------------------------------------------------------------------------------------


def read_citeulike(path, *, cache: bool = True) -> Interactions:
    """CiteULike ``users.dat`` (CTR/CDL data): line k (0-based) is user k, ``n item_1 ... item_n``.
    No ratings and no timestamps (leave-one-out then holds out each user's last listed item)."""
    path = _require_file(Path(path))

    def build() -> dict:
        users, items = _text.parse_count_lists(path)
        return _finalize(path, {"users": users, "items": items}, None)

    # ("ids": caches from before ids beyond int64 were an error may hold them clamped)
    arrays = _cached("citeulike", [path], path, {"ids": "int64-checked"}, build, cache)
    return _to_interactions(arrays, f"citeulike:{path}")


# --- NCF leave-one-out files ----------------------------------------------------------------------


def _read_ncf_ratings(path: Path) -> dict[str, np.ndarray]:
    lines = _text.head_lines(path, max_lines=1)
    if not lines:
        raise DataFormatError(path, 1, "empty file")
    width = len(_text.split_fields(lines[0], "\t"))
    if width not in (3, 4):
        raise DataFormatError(
            path, 1, f"expected 'user\\titem\\trating[\\ttimestamp]', got {lines[0][:80]!r}"
        )
    fields = [Field("user", 0, "int"), Field("item", 1, "int")]
    if width == 4:
        fields.append(Field("timestamp", 3, "int"))
    return _text.read_table(path, fields, delimiter="\t", ncols=width)


_NCF_NEG_RE = re.compile(rb"\((\d+),(\d+)\)(\t\d+)+")


def _read_ncf_negatives(path: Path) -> np.ndarray:
    parts = []
    for chunk, first in _text.iter_chunks(path):
        text = chunk.replace(b"(", b"").replace(b")", b"").replace(b",", b"\t")
        try:
            with _text.quiet_loadtxt():
                t = np.loadtxt(
                    io.BytesIO(text), dtype=np.int64, delimiter="\t",
                    comments=None, ndmin=2, quotechar=None,
                )  # fmt: skip
        except ValueError as e:
            width = None
            for k, raw in enumerate(chunk.split(b"\n")[:-1]):
                if not raw:
                    continue
                m = _NCF_NEG_RE.fullmatch(raw)
                n = raw.count(b"\t")
                if m is None or (width is not None and n != width):
                    raise DataFormatError(
                        path, first + k, f"expected '(user,item)\\tneg_1\\t...', got {raw[:80]!r}"
                    ) from None
                width = n
            raise DataFormatError(path, None, f"cannot parse: {e}") from None
        parts.append(t)
    if not parts or sum(p.shape[0] for p in parts) == 0:
        raise DataFormatError(path, 1, "empty file")
    widths = {p.shape[1] for p in parts if p.size}
    if len(widths) != 1:
        raise DataFormatError(path, None, "rows have different numbers of negatives")
    return np.concatenate([p for p in parts if p.size])


def read_ncf(prefix, *, cache: bool = True) -> Split:
    """The NCF leave-one-out files (He et al., WWW 2017): ``<prefix>.train.rating``,
    ``<prefix>.test.rating`` (``user\\titem\\trating[\\ttimestamp]``, 0-based ids, kept as they
    are) and ``<prefix>.test.negative`` (``(user,item)\\tneg_1\\t...``, 99 negatives).

    ``num_users`` / ``num_items`` are the largest id in the three files plus one. The negatives
    are kept exactly as published: in the upstream ML-1M file 156 rows list the user's own test
    item among their negatives (the sampled protocol skips it, as NCF's evaluation does)."""
    prefix = Path(prefix)
    files = [
        prefix.with_name(prefix.name + s)
        for s in (".train.rating", ".test.rating", ".test.negative")
    ]
    for f in files:
        _require_file(f)

    def build() -> dict:
        train = _read_ncf_ratings(files[0])
        test = _read_ncf_ratings(files[1])
        neg = _read_ncf_negatives(files[2])
        if neg.shape[0] != test["user"].size or neg.shape[1] < 3:
            raise DataFormatError(
                files[2], None, f"{neg.shape[0]} rows for {test['user'].size} test ratings"
            )
        mismatch = (neg[:, 0] != test["user"]) | (neg[:, 1] != test["item"])
        if mismatch.any():
            r = int(np.argmax(mismatch))
            raise DataFormatError(
                files[2], r + 1, f"({neg[r, 0]},{neg[r, 1]}) does not match line {r + 1} of "
                f"{files[1].name} ({test['user'][r]}\\t{test['item'][r]})",
            )  # fmt: skip
        ids = [train["user"], test["user"], neg[:, 0]]
        if min(int(a.min()) for a in ids) < 0 or int(neg.min()) < 0 or int(train["item"].min()) < 0:
            raise DataFormatError(files[0], None, "negative ids")
        num_users = max(int(a.max()) for a in ids) + 1
        num_items = max(int(train["item"].max()), int(neg[:, 1:].max())) + 1
        order = np.argsort(test["user"], kind="stable")
        narrow = _index_dtype(max(num_users, num_items))
        return {
            "users": train["user"].astype(narrow),
            "items": train["item"].astype(narrow),
            "timestamps": train.get("timestamp"),
            "test_users": test["user"][order].astype(narrow),
            "test_items": test["item"][order].astype(narrow),
            "test_negatives": np.ascontiguousarray(neg[order, 2:]),
            "num_users": np.int64(num_users),
            "num_items": np.int64(num_items),
        }

    a = _cached("ncf", files, prefix.parent / prefix.name, {}, build, cache)
    U, I = int(a["num_users"]), int(a["num_items"])
    name = f"ncf:{prefix}"
    train = Interactions(
        users=a["users"],
        items=a["items"],
        timestamps=a.get("timestamps"),
        num_users=U,
        num_items=I,
        user_ids=np.arange(U, dtype=np.int64),
        item_ids=np.arange(I, dtype=np.int64),
        name=name,
    )
    return Split(
        train=train,
        test_users=a["test_users"],
        test_items=a["test_items"],
        test_negatives=a["test_negatives"],
        num_users=U,
        num_items=I,
        name=name,
    )
