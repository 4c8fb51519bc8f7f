"""Readers of the public recommendation data formats, each returning :class:`Interactions`.

Every reader is vectorised (numpy's C tokenizer on 64 MB chunks), strict (a bad line raises
:class:`DataFormatError` naming the file and 1-based line; nothing is half loaded) and cached: the
parsed arrays go to an ``.npz`` next to the source (or, where that is not writable, under
``$LRML_KERNELS_CACHE_DIR`` or ``~/.cache/lrml_kernels``), keyed by path, size, mtime and the
reader's options, and written atomically.

Common rules: ids are re-indexed ``0..n-1`` in ascending order of the original id (``user_ids`` /
``item_ids`` map back); a (user, item) pair that occurs more than once keeps its row with the
latest timestamp (ties: the later row), *before* ``min_rating`` is applied, so a re-rating
decides; ``min_rating`` keeps the ratings ``>= min_rating`` (each kept row is an implicit
positive); timestamps are seconds since the epoch, :data:`MISSING_TIMESTAMP` where a field is empty.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
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
    "read_movielens",
    "read_ncf",
    "read_netflix",
]

CACHE_VERSION = 1
_INT32 = np.iinfo(np.int32)


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


def _pack(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.int64 and a.size and a.min() >= _INT32.min and a.max() <= _INT32.max:
        a = a.astype(np.int32)  # halves the file; restored to int64 on load
    return a


def _save_npz(f, arrays: dict) -> None:
    """``np.savez`` one array at a time (each packed just before it is written, so that a
    100M-row cache never holds a second copy of everything)."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            if a is None:
                continue
            with zf.open(name + ".npy", mode="w", force_zip64=True) as out:
                np.lib.format.write_array(out, _pack(a), allow_pickle=False)


def _unpack(npz) -> dict[str, np.ndarray]:
    out = {}
    for name in npz.files:
        a = npz[name]
        out[name] = a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a
    return out


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
                with np.load(place, allow_pickle=False) as npz:
                    if str(npz["_key"]) == key:
                        arrays = _unpack(npz)
                        del arrays["_key"]
                        return arrays
            except Exception:  # a damaged or foreign file: rebuild and overwrite it
                pass
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


def _reindex(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, uniques)``: codes in ``0..len(uniques)-1``, uniques ascending (int64)."""
    if raw.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(raw.min()), int(raw.max())
    if hi - lo < max(4 * raw.size, 1 << 22):  # dense ids: a lookup table, O(n)
        present = np.zeros(hi - lo + 1, dtype=bool)
        shifted = raw - np.asarray(lo, dtype=raw.dtype) if lo else raw
        present[shifted] = True
        lut = np.cumsum(present, dtype=np.int64) - 1
        return lut[shifted], np.flatnonzero(present).astype(np.int64) + lo
    uniques, codes = np.unique(raw, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), uniques.astype(np.int64)


def _dedup_keep(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, num_items: int
) -> np.ndarray | None:
    """Mask keeping one row per (user, item): the latest timestamp, ties the later row. ``None``
    when there are no duplicates (the common case costs one in-place sort of the keys)."""
    s = users * np.int64(num_items)
    s += items
    s.sort()
    dup = s[1:] == s[:-1]
    if not dup.any():
        return None
    dup_keys = np.unique(s[1:][dup])
    del s, dup
    key = users * np.int64(num_items)
    key += items
    pos = np.minimum(np.searchsorted(dup_keys, key), dup_keys.size - 1)
    in_dup = dup_keys[pos] == key
    rows = np.flatnonzero(in_dup)
    ts = timestamps[rows] if timestamps is not None else np.zeros(rows.size, np.int64)
    order = np.lexsort((rows, ts, key[rows]))  # by key, then time, then row: the last one wins
    k_sorted = key[rows][order]
    last = np.concatenate((k_sorted[1:] != k_sorted[:-1], [True]))
    keep = ~in_dup
    keep[rows[order][last]] = True
    return keep


def _finalize(
    path: Path, cols: dict[str, np.ndarray], min_rating: float | None
) -> dict[str, np.ndarray | None]:
    """Raw columns (``users``, ``items``, optional ``timestamps`` and ``ratings``; taken out of
    ``cols`` one by one, so that each raw array is freed as soon as it is converted) -> the
    re-indexed, de-duplicated, rating-filtered arrays of an :class:`Interactions`."""
    ratings = cols.pop("ratings", None)
    if min_rating is not None and ratings is None:
        raise ValueError(f"{path} has no ratings: min_rating does not apply to it")
    users, user_ids = _reindex(cols.pop("users"))
    items, item_ids = _reindex(cols.pop("items"))
    timestamps = cols.pop("timestamps", None)
    keep = _dedup_keep(users, items, timestamps, item_ids.size)
    if min_rating is not None:
        good = ratings >= min_rating
        keep = good if keep is None else keep & good
    del ratings
    if keep is not None and not keep.all():
        users, items = users[keep], items[keep]
        timestamps = None if timestamps is None else timestamps[keep]
        if users.size == 0:
            raise ValueError(f"{path}: no interactions left with min_rating={min_rating}")
        users, kept = _reindex(users)
        user_ids = user_ids[kept]
        items, kept = _reindex(items)
        item_ids = item_ids[kept]
    return {
        "users": users,
        "items": items,
        "timestamps": timestamps,
        "user_ids": user_ids,
        "item_ids": item_ids,
    }


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


def _require_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"not a file: {path}")
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


def _sniff_delimiter(path: Path, line: bytes) -> str:
    for d in _DELIMITERS:
        if len(_text.split_fields(line, d)) >= 2:
            return d
    raise DataFormatError(
        path, 1, f"no delimiter found (tried '::', tab, ',', ';', space) in {line[:80]!r}"
    )


def _looks_like_header(fields: list[bytes]) -> bool:
    return any(not (_text.is_number(f) or _text.is_date(f)) for f in fields if f.strip())


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
) -> Interactions:
    """A delimited table with user, item, optional rating and optional timestamp columns.

    ``columns`` maps role -> column index, header name, or ``None`` (auto: by header name, else by
    position user 0, item 1, rating 2, timestamp 3 where the file has them). An empty timestamp
    field is :data:`MISSING_TIMESTAMP`.
    """
    path = _require_file(path)
    lines = _text.head_lines(path, max_lines=2)
    if not lines:
        raise DataFormatError(path, 1, "empty file (no data rows)")
    delim = delimiter or _sniff_delimiter(path, lines[0])
    first = [f.strip() for f in _text.split_fields(lines[0], delim)]
    has_header = _looks_like_header(first) if header is None else header
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
    data_line = lines[1] if has_header and len(lines) > 1 else (None if has_header else lines[0])
    ts_kind = "int"
    if "timestamp" in cols and data_line is not None:
        parts = _text.split_fields(data_line, delim)
        if cols["timestamp"] < len(parts) and _text.is_date(parts[cols["timestamp"]]):
            ts_kind = "datetime"
    kinds = {"user": "int", "item": "int", "rating": "float", "timestamp": ts_kind}
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

    def build() -> dict:
        t = _text.read_table(
            path,
            fields,
            delimiter=delim,
            header=has_header,
            ncols=ncols,
            missing_ok=frozenset({"timestamp"}),
        )
        names = {"user": "users", "item": "items", "rating": "ratings", "timestamp": "timestamps"}
        return _finalize(path, {names[k]: v for k, v in t.items()}, min_rating)

    arrays = _cached(source, [path], path, options, build, cache)
    return _to_interactions(arrays, f"{source}:{path}")


_MOVIELENS_FILES = ("ratings.dat", "ratings.csv", "u.data", "ratings_reconstructed.tsv")


def read_movielens(path, *, min_rating: float | None = None, cache: bool = True) -> Interactions:
    """MovieLens ratings: a folder holding one of ``ratings.dat`` (1M/10M, ``::``),
    ``ratings.csv`` (20M/25M/latest, with header), ``u.data`` (100K, tab) or
    ``ratings_reconstructed.tsv`` (this project's ML-1M rebuild, header, empty timestamps), or one
    such file (``u1.base`` etc. too). Columns: user, item, rating, timestamp (seconds)."""
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
        delim, header = "::", False
    elif suffix == ".csv":
        delim, header = ",", None
    elif suffix == ".tsv":
        delim, header = "\t", None
    else:  # u.data, u1.base, ua.test, ...
        delim, header = "\t", False
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
    """A generic delimited file of numeric ids.

    Args:
        delimiter: ``","``, ``"\\t"``, ``"::"``, ``";"`` or ``" "`` (runs of whitespace); ``None``
            detects it from the first line (tried in that order, ``"::"`` first).
        header: whether the first line is a header; ``None``: yes if it has a non-numeric field.
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
    )


# --- Netflix Prize ---


def _netflix_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
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
        data = _text._normalize_newlines(p.read_bytes())
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
    chunk_bytes: int = _text.CHUNK_BYTES,
) -> Interactions:
    """The Netflix Prize training set: a folder with ``combined_data_*.txt`` (Kaggle layout) or
    ``training_set/mv_*.txt`` (the original), or one such file: ``MovieID:`` lines followed by
    ``CustomerID,Rating,YYYY-MM-DD`` lines. Dates become seconds since the epoch (midnight UTC).
    A ``.csv`` file is read by :func:`read_csv` (e.g. ``MovieID,UserID,Rating,Date`` subsets).

    100M ratings parse in int32/int8 (about 1.3 GB) and finish as int64 arrays (2.4 GB)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        x = read_csv(path, min_rating=min_rating, cache=cache)
        x.name = f"netflix:{path}"
        return x
    files = _netflix_files(path)

    def build() -> dict:
        from tqdm.auto import tqdm

        total = sum(p.stat().st_size for p in files)
        parts: dict[str, list[np.ndarray]] = {"users": [], "items": [], "ratings": [], "days": []}
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
                for k, v in out.items():
                    parts[k].append(v)
                bar.update(nbytes)
        cols = {k: np.concatenate(parts.pop(k)) for k in list(parts)}  # one column at a time
        if cols["users"].size == 0:
            raise DataFormatError(files[0], 1, "no ratings")
        ts = cols.pop("days").astype(np.int64)
        ts *= 86400
        cols["timestamps"] = ts
        del ts
        return _finalize(path, cols, min_rating)

    options = {"min_rating": min_rating}
    arrays = _cached("netflix", files, path, options, build, cache)
    return _to_interactions(arrays, f"netflix:{path}")


# --- CiteULike ------------------------------------------------------------------------------------


def read_citeulike(path, *, cache: bool = True) -> Interactions:
    """CiteULike ``users.dat`` (CTR/CDL data): line k (0-based) is user k, ``n item_1 ... item_n``.
    No ratings and no timestamps (leave-one-out then holds out each user's last listed item)."""
    path = _require_file(Path(path))

    def build() -> dict:
        users, items = _text.parse_count_lists(path)
        return _finalize(path, {"users": users, "items": items}, None)

    arrays = _cached("citeulike", [path], path, {}, build, cache)
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
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
    are kept exactly as published: in the upstream ML-1M file one row (user 4509) lists the user's
    own test item among its negatives (NCF's evaluation collapses that duplicate)."""
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
        return {
            "users": train["user"],
            "items": train["item"],
            "timestamps": train.get("timestamp"),
            "test_users": test["user"][order],
            "test_items": test["item"][order],
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
