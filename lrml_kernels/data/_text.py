"""Fast and strict parsing of numeric text tables (private to the data package).

Speed comes from numpy's C tokenizer (``np.loadtxt``, numpy >= 1.23: about 150 MB/s for integer
columns) on chunks of whole lines; strictness from checking every line of a chunk in Python only
when the fast path fails, to name the first bad line. Either the whole file parses or
:class:`DataFormatError` names the file and the 1-based line: nothing is ever half loaded.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrml_kernels.data.interactions import MISSING_TIMESTAMP, DataFormatError

CHUNK_BYTES = 64 << 20
_SENTINEL_INT = str(MISSING_TIMESTAMP).encode()  # the text an empty int field is replaced with
_SENTINEL_DATE = b"NaT"  # ... and an empty date field (NaT is MISSING_TIMESTAMP as int64)
_INT_RE = re.compile(rb"\s*[+-]?\d+\s*")
PLAIN_INT_RE = re.compile(rb"\s*[+-]?(?:0|[1-9][0-9]*)\s*")  # an integer with no leading zero
_DATE_RE = re.compile(rb"\s*\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*")
_NETFLIX_HEADER_RE = re.compile(rb"\d+:")
_NETFLIX_ROW_RE = re.compile(rb"\d+,\d+,\d{4}-\d{2}-\d{2}")
_DELIMITER_NAMES = {"\t": "tab", ",": "comma", "::": "'::'", " ": "space", ";": "semicolon"}


def delimiter_name(delimiter: str) -> str:
    return _DELIMITER_NAMES.get(delimiter, repr(delimiter))


_INT64 = np.iinfo(np.int64)
_INT32_MAX = int(np.iinfo(np.int32).max)
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which some editors write at the start


def _cr_only(head: bytes) -> bool:
    """Whether a file whose first bytes are ``head`` ends its lines with CR alone (classic Mac OS,
    and some spreadsheet exports): a CR and no LF in its first 64 KiB."""
    head = head[: 1 << 16]
    return b"\r" in head and b"\n" not in head


def iter_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[bytes, int]]:
    """``(chunk, first_line)`` pairs of whole lines (each chunk ends with a newline; CRLF and a
    CR-only file's CR -> LF; a UTF-8 byte-order mark at the start dropped)."""
    with open(path, "rb") as f:
        if f.read(len(BOM)) != BOM:
            f.seek(0)
        rest = b""
        line = 1
        cr_only = None
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            if cr_only is None:
                cr_only = _cr_only(block)
            if cr_only:
                block = block.replace(b"\r", b"\n")
            data = rest + block
            del block
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            chunk, rest = data[: cut + 1], data[cut + 1 :]
            del data  # while the chunk is out, hold only it (and the cut-off rest)
            chunk = _normalize_newlines(chunk)
            yield chunk, line
            line += chunk.count(b"\n")
        if rest:
            yield _normalize_newlines(rest + b"\n"), line


def _normalize_newlines(chunk: bytes) -> bytes:
    return chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk


def read_lines_bytes(path: Path) -> bytes:
    """A whole (small) file's bytes as :func:`iter_chunks` gives them: LF line ends (CRLF and a
    CR-only file's CR -> LF), a UTF-8 byte-order mark at the start dropped."""
    data = Path(path).read_bytes().removeprefix(BOM)
    return data.replace(b"\r", b"\n") if _cr_only(data) else _normalize_newlines(data)


def quotechar(delimiter: str) -> str | None:
    """The quote character of fields separated by ``delimiter``: ``"`` for a one-character
    delimiter other than space (CSV's quoting: ``"a,b"`` is one field, ``""`` inside quotes one
    quote), else none."""
    return '"' if len(delimiter) == 1 and delimiter != " " else None


def split_fields(line: bytes, delimiter: str) -> list[bytes]:
    """The fields of one line, quoted ones unquoted (:func:`quotechar`)."""
    if delimiter == " ":
        return line.split()
    if b'"' not in line or quotechar(delimiter) is None:
        return line.split(delimiter.encode())
    (fields,) = csv.reader([line.decode("latin-1")], delimiter=delimiter, quotechar='"')
    return [f.encode("latin-1") for f in fields]


def head_lines(path: Path, max_lines: int = 50, max_bytes: int = 1 << 16) -> list[bytes]:
    """The first few complete lines of a file (CR and a leading byte-order mark stripped),
    blank lines dropped."""
    with open(path, "rb") as f:
        data = f.read(max_bytes)
        more = bool(f.read(1))
    data = data.removeprefix(BOM)
    lines = data.split(b"\r" if _cr_only(data) else b"\n")
    if more and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut
    return [ln.rstrip(b"\r") for ln in lines if ln.strip()][:max_lines]


def is_number(field: bytes) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def is_date(field: bytes) -> bool:
    return _DATE_RE.fullmatch(field) is not None


@dataclass(frozen=True)
class Field:
    """One column to read: ``kind`` is ``"int"``, ``"plain_int"`` (an integer written without a
    leading zero: ids where ``0312`` would be another id than ``312``), ``"float"``,
    ``"datetime"`` (ISO date/time, read as int64 seconds since the epoch) or ``"str"`` (any
    non-empty text, e.g. an id like ``A1B2C3``, read with surrounding spaces stripped)."""

    name: str
    index: int
    kind: str


_DTYPES = {
    "int": np.int64, "plain_int": np.int64, "float": np.float64, "datetime": "M8[s]", "str": object
}  # fmt: skip
_KIND_TEXT = {
    "int": "an integer",
    "plain_int": "an integer written without a leading zero",
    "float": "a finite number",
    "datetime": "a YYYY-MM-DD date",
}


def _field_ok(text: bytes, kind: str) -> bool:
    if kind == "str":
        return bool(text.strip())
    if kind in ("int", "plain_int"):
        if (_INT_RE if kind == "int" else PLAIN_INT_RE).fullmatch(text) is None:
            return False
        return -(2**63) < int(text) < 2**63
    if kind == "float":
        try:
            return bool(np.isfinite(float(text.strip())))
        except ValueError:
            return False
    if not is_date(text):
        return False
    try:
        np.datetime64(text.strip().decode(), "s")
    except ValueError:
        return False
    return True


def find_bad_line(
    chunk: bytes,
    first_line: int,
    fields: Sequence[Field],
    delimiter: str,
    ncols: int | None,
    missing_ok: frozenset[str],
) -> tuple[int, str] | None:
    """The first line of ``chunk`` that the table format rejects: ``(line number, reason)``."""
    need = max(f.index for f in fields) + 1
    lines = chunk.split(b"\n")
    if chunk.endswith(b"\n"):
        lines.pop()
    for k, raw in enumerate(lines):
        if not raw:
            continue
        line_no = first_line + k
        if b"\r" in raw:
            return line_no, "stray carriage return inside the line"
        if quotechar(delimiter) is not None and _open_quote(raw, delimiter.encode()):
            return line_no, (
                "a quoted field is not closed on its line (a line break inside quotes is not "
                f"supported): {_show(raw)}"
            )
        parts = split_fields(raw, delimiter)
        expected = ncols if ncols is not None else need
        if (ncols is not None and len(parts) != ncols) or len(parts) < need:
            at_least = "" if ncols is not None else "at least "
            hint = " (wrong delimiter?)" if len(parts) == 1 else ""
            return line_no, (
                f"expected {at_least}{expected} {delimiter_name(delimiter)}-separated fields, "
                f"found {len(parts)}{hint}: {_show(raw)}"
            )
        for f in fields:
            text = parts[f.index]
            if not text.strip():
                if f.name in missing_ok:
                    continue
                return line_no, f"empty {f.name} field (column {f.index + 1}): {_show(raw)}"
            if not _field_ok(text, f.kind):
                return line_no, (
                    f"{f.name} field (column {f.index + 1}) {_show(text)} is not "
                    f"{_KIND_TEXT[f.kind]}"
                )
        if ncols is not None:
            used = {f.index for f in fields}
            for j, text in enumerate(parts):
                if j not in used and not is_number(text):
                    return line_no, f"column {j + 1} {_show(text)} is not a number"
    return None


def _zero_padded(
    chunk: bytes, first_line: int, fields: Sequence[Field], delimiter: str
) -> tuple[int, str] | None:
    """The first line of ``chunk`` whose ``fields`` (``plain_int``, parsed as integers) hold an
    integer written with a leading zero (``0007``, ``"0007"``): ``(line number, reason)``. Only
    the lines where a field starts with ``0`` and a digit are split, found by searches with a
    literal prefix (a line break, the delimiter or a quote, then ``0``; about 1 GB/s each). (A
    sign or a space before the zero is not looked for: a date's ``-01`` or `` 03:04`` would make
    every line a candidate.)"""
    before = [b"\n", *([b" ", b"\t"] if delimiter == " " else [delimiter.encode()])]
    if b'"' in chunk and quotechar(delimiter):
        before.append(b'"')
    found = bad = None
    if re.match(rb"0[0-9]", chunk):
        bad = _bad_plain(chunk, 0, fields, delimiter)
        found = 0 if bad else None
    for prefix in before:
        for m in re.finditer(re.escape(prefix) + rb"0[0-9]", chunk):
            start = chunk.rfind(b"\n", 0, m.start() + 1) + 1
            if found is not None and start >= found:
                break
            hit = _bad_plain(chunk, start, fields, delimiter)
            if hit is not None:
                found, bad = start, hit
                break
    if found is None:
        return None
    f, text = bad
    return first_line + chunk.count(b"\n", 0, found), (
        f"{f.name} field (column {f.index + 1}) {_show(text)} is not {_KIND_TEXT[f.kind]}"
    )


def _bad_plain(
    chunk: bytes, start: int, fields: Sequence[Field], delimiter: str
) -> tuple[Field, bytes] | None:
    """The first of ``fields`` whose value on the line of ``chunk`` from ``start`` is not plain,
    with that value, or None."""
    end = chunk.find(b"\n", start)
    parts = split_fields(chunk[start : end if end >= 0 else len(chunk)], delimiter)
    return next(
        ((f, parts[f.index]) for f in fields
         if f.index < len(parts) and not _field_ok(parts[f.index], f.kind)),
        None,
    )  # fmt: skip


def _open_quote(line: bytes, delimiter: bytes) -> bool:
    """Whether ``line`` ends inside a quoted field (CSV's quoting; a quote that does not start
    a field is a plain character)."""
    inside = closed = False
    start = True  # at the start of a field
    for ch in line:
        if inside:
            inside = ch != 34  # 34: '"'
            closed = not inside
        else:
            inside = ch == 34 and (start or closed)  # (a quote after a closing one: "" inside)
            closed = False
            start = ch == delimiter[0]
    return inside


def _nonempty_lines(chunk: bytes) -> int:
    """The number of lines of ``chunk`` (which ends with a newline) that loadtxt reads as rows."""
    return chunk.count(b"\n") - len(re.findall(rb"\n(?=\n)", chunk)) - chunk.startswith(b"\n")


def _show(text: bytes, limit: int = 80) -> str:
    s = text.decode("utf-8", errors="replace")
    return repr(s if len(s) <= limit else s[:limit] + "...")


def line_of_row(chunk: bytes, first_line: int, row: int) -> int:
    """The line number of the ``row``-th non-empty line of ``chunk`` (rows as loadtxt counts)."""
    seen = -1
    for k, raw in enumerate(chunk.split(b"\n")):
        if raw:
            seen += 1
            if seen == row:
                return first_line + k
    return first_line


def _fill_empty_fields(chunk: bytes, delim: bytes, sentinel: bytes) -> bytes:
    """Give every empty field of a single-byte-delimited chunk the text ``sentinel``."""
    if chunk.startswith(delim):
        chunk = sentinel + chunk
    chunk = chunk.replace(b"\n" + delim, b"\n" + sentinel + delim)
    double = delim + delim
    while double in chunk:
        chunk = chunk.replace(double, delim + sentinel + delim)
    return chunk.replace(delim + b"\n", delim + sentinel + b"\n")


@contextlib.contextmanager
def quiet_loadtxt():
    """``np.loadtxt``'s warnings off ("input contained no data" for an all-blank chunk) except
    numpy 1.x's DeprecationWarnings for a float read as an integer ("3.5" -> 3) and for an
    integer beyond its dtype (3000000000 as int32), which numpy 2 refuses: as errors, which
    ``np.loadtxt`` reports as the ValueError that numpy 2 raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", DeprecationWarning)
        yield


def parse_chunk(
    path: Path,
    chunk: bytes,
    first_line: int,
    fields: Sequence[Field],
    *,
    delimiter: str,
    ncols: int | None = None,
    missing_ok: frozenset[str] = frozenset(),
    floats_as_int: list[bool] | None = None,
) -> dict[str, np.ndarray]:
    """Parse one chunk of whole lines into ``{field name: array}`` (empty lines are skipped).

    ``ncols`` given: every line has exactly that many columns, all numeric. Otherwise a line needs
    the columns of ``fields`` and may have more, of any content. Fields named in ``missing_ok`` may
    be empty (-> :data:`MISSING_TIMESTAMP`, for int or datetime fields). ``floats_as_int``: a
    one-element list, ``[True]`` to try "float" columns as integers first; set to ``[False]``
    once a chunk needed real floats (so the next chunks go straight to floats).
    """
    floats_as_int = floats_as_int if floats_as_int is not None else [True]
    original = chunk
    if delimiter == " ":
        loadtxt_delim = None
    elif len(delimiter) == 1:
        loadtxt_delim = delimiter
    else:  # a multi-character delimiter ('::'): map it to a control character
        chunk = chunk.replace(delimiter.encode(), b"\x1f")
        loadtxt_delim = "\x1f"
    if missing_ok and loadtxt_delim is not None:
        missing_kinds = {f.kind for f in fields if f.name in missing_ok}
        sentinel = _SENTINEL_DATE if "datetime" in missing_kinds else _SENTINEL_INT
        chunk = _fill_empty_fields(chunk, loadtxt_delim.encode(), sentinel)
    by_index = {f.index: f for f in fields}
    usecols = list(range(ncols)) if ncols is not None else sorted(by_index)
    names = [by_index[j].name if j in by_index else f"_c{j}" for j in usecols]
    kinds = [by_index[j].kind if j in by_index else "float" for j in usecols]

    def dtype(floats_as_int: bool) -> np.dtype:
        dts = [np.int64 if floats_as_int and k == "float" else _DTYPES[k] for k in kinds]
        return np.dtype(list(zip(names, dts, strict=True)))

    def fail(loadtxt_message: str | None) -> DataFormatError:
        bad = find_bad_line(original, first_line, fields, delimiter, ncols, missing_ok)
        if bad is not None:
            return DataFormatError(path, bad[0], bad[1])
        line = None
        if loadtxt_message is not None:
            m = re.search(r"at row (\d+)", loadtxt_message)
            if m:
                line = line_of_row(original, first_line, int(m.group(1)))
            return DataFormatError(path, line, f"cannot parse: {loadtxt_message}")
        return DataFormatError(path, line, "cannot parse")

    def load(floats_as_int: bool) -> np.ndarray:
        with quiet_loadtxt():
            return np.loadtxt(
                io.BytesIO(chunk),
                dtype=dtype(floats_as_int),
                delimiter=loadtxt_delim,
                comments=None,
                usecols=usecols,
                ndmin=1,
                quotechar=quotechar(delimiter),
            )

    # Integer parsing is twice as fast: "float" columns (ratings) are tried as integers first.
    try_int = floats_as_int[0] and "float" in kinds
    try:
        table = load(True) if try_int else None
    except ValueError:
        table = None
    if table is None:
        try:
            table = load(False)
        except ValueError as e:
            raise fail(str(e)) from None
        floats_as_int[0] = False
    if b'"' in original and quotechar(delimiter) and len(table) != _nonempty_lines(original):
        raise fail(None)  # a quoted field ran over a line break: rows merged
    plain = [f for f in fields if f.kind == "plain_int"]
    bad = _zero_padded(original, first_line, plain, delimiter) if plain else None
    if bad is not None:
        raise DataFormatError(path, bad[0], bad[1])
    out: dict[str, np.ndarray] = {}
    for f in fields:
        col = table[f.name]
        if f.kind == "datetime":
            col = col.astype("M8[s]").view(np.int64)
        elif f.kind in ("int", "plain_int") and f.name not in missing_ok:
            if col.size and int(col.min()) == MISSING_TIMESTAMP:  # an empty field was filled
                raise fail(None)
        elif f.kind == "float" and col.size:
            col = col.astype(np.float64)
            if not np.isfinite(col).all() or col.min() < -1e18:  # -1e18: a filled empty field
                raise fail(None)
        elif f.kind == "str":
            col = np.char.strip(col.astype(str))
            filled = (col == _SENTINEL_INT.decode()) | (col == _SENTINEL_DATE.decode())
            if col.size and (filled.any() or not np.char.str_len(col).all()):  # an empty field
                raise fail(None)
        out[f.name] = np.ascontiguousarray(col)
    return out


def read_table(
    path: Path,
    fields: Sequence[Field],
    *,
    delimiter: str,
    header: bool = False,
    ncols: int | None = None,
    missing_ok: frozenset[str] = frozenset(),
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, np.ndarray]:
    """Read a whole delimited file (see :func:`parse_chunk`); ``header``: skip the first line."""
    parts: dict[str, list[np.ndarray]] = {f.name: [] for f in fields}
    skip_header = header
    floats_as_int = [True]
    for chunk, first_line in iter_chunks(path, chunk_bytes):
        if skip_header:
            cut = chunk.find(b"\n")
            chunk, first_line = chunk[cut + 1 :], first_line + 1
            skip_header = False
        cols = parse_chunk(
            path,
            chunk,
            first_line,
            fields,
            delimiter=delimiter,
            ncols=ncols,
            missing_ok=missing_ok,
            floats_as_int=floats_as_int,
        )
        for name, col in cols.items():
            parts[name].append(col)
    out = {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in parts.items()}
    if not len(out[fields[0].name]):
        raise DataFormatError(path, 1, "no data rows (empty file?)")
    return out


# --- Netflix Prize training set: "MovieID:" lines, then "CustomerID,Rating,YYYY-MM-DD" lines ---


def days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (vectorised; H. Hinnant's algorithm)."""
    y = y.astype(np.int64) - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    mp = (m.astype(np.int64) + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _valid_dates(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    ok = (y >= 1800) & (y <= 2200) & (m >= 1) & (m <= 12) & (d >= 1)
    mm = np.clip(m, 1, 12).astype(np.int64) - 1
    leap = (y % 4 == 0) & ((y % 100 != 0) | (y % 400 == 0))
    return ok & (d <= _MONTH_DAYS[mm] + ((mm == 1) & leap))


_NETFLIX_DASH = bytes.maketrans(b"-", b",")


def _netflix_bad_line(chunk: bytes, first_line: int, movie: int | None) -> tuple[int, str] | None:
    lines = chunk.split(b"\n")
    if chunk.endswith(b"\n"):
        lines.pop()
    for k, raw in enumerate(lines):
        if not raw:
            continue
        line_no = first_line + k
        text = raw.strip()
        if _NETFLIX_HEADER_RE.fullmatch(text):
            movie = int(text[:-1])
            if movie > _INT32_MAX:
                return line_no, f"MovieID {movie} is beyond 2**31 - 1"
            continue
        if _NETFLIX_ROW_RE.fullmatch(text) is None:
            return (
                line_no,
                f"expected 'MovieID:' or 'CustomerID,Rating,YYYY-MM-DD', got {_show(raw)}",
            )
        if movie is None:
            return line_no, "rating line before any 'MovieID:' line"
        customer, rating, date = text.split(b",")
        if int(customer) > _INT32_MAX:
            return line_no, f"CustomerID {int(customer)} is beyond 2**31 - 1"
        if int(rating) > 127:
            return line_no, f"rating {int(rating)} is not in 0..127"
        y, m, d = (int(x) for x in date.split(b"-"))
        if not _valid_dates(np.array([y]), np.array([m]), np.array([d]))[0]:
            return line_no, f"invalid date in {_show(raw)}"
    return None


def parse_netflix_chunk(
    path: Path, chunk: bytes, first_line: int, movie: int | None
) -> tuple[dict[str, np.ndarray], int | None]:
    """Parse Netflix training-set text; ``movie``: the movie whose ratings the chunk continues.

    Returns ``({"users", "items", "ratings", "days"}, movie at the end of the chunk)`` with compact
    dtypes (int32 / int8) to keep a 100M-rating parse near 1.3 GB.
    """
    text = chunk.translate(_NETFLIX_DASH).replace(b":", b",-1,0,0,0")

    def fail(message: str | None = None) -> DataFormatError:
        bad = _netflix_bad_line(chunk, first_line, movie)
        if bad is not None:
            return DataFormatError(path, bad[0], bad[1])
        return DataFormatError(path, None, f"cannot parse: {message or 'unexpected content'}")

    try:
        with quiet_loadtxt():
            t = np.loadtxt(
                io.BytesIO(text), dtype=np.int32, delimiter=",", comments=None, ndmin=2,
                quotechar=None,
            )  # fmt: skip
    except ValueError as e:
        raise fail(str(e)) from None
    empty = np.zeros(0, dtype=np.int32)
    if t.size == 0:
        out = {"users": empty, "items": empty, "ratings": empty.astype(np.int8), "days": empty}
        return out, movie
    if t.shape[1] != 5:
        raise fail(f"{t.shape[1]} columns")
    is_header = t[:, 1] == -1
    row = np.arange(t.shape[0])
    last_header = np.maximum.accumulate(np.where(is_header, row, -1))
    data = ~is_header
    if movie is None and data.any() and last_header[np.argmax(data)] < 0:
        raise fail()
    movie_of_row = np.where(last_header >= 0, t[np.maximum(last_header, 0), 0], movie or 0)
    d = t[data]
    y, m, dd = d[:, 2], d[:, 3], d[:, 4]
    if (d[:, 1] < 0).any() or (d[:, 1] > 127).any() or not _valid_dates(y, m, dd).all():
        raise fail()
    if (t[is_header, 2:] != 0).any():
        raise fail()
    out = {
        "users": np.ascontiguousarray(d[:, 0]),
        "items": movie_of_row[data].astype(np.int32),
        "ratings": d[:, 1].astype(np.int8),
        "days": days_from_civil(y, m, dd).astype(np.int32),
    }
    new_movie = int(movie_of_row[-1]) if is_header.any() or movie is not None else None
    return out, new_movie


# --- CiteULike users.dat: line k = user k: "n item_1 ... item_n" ---


def parse_count_lists(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(users, items)`` of a file whose 0-based line k is ``n item_1 ... item_n`` for user k."""
    data = read_lines_bytes(path)
    data = data.rstrip(b"\n \t") + b"\n"
    if data == b"\n":
        raise DataFormatError(path, 1, "no data rows (empty file?)")

    def bad_line() -> DataFormatError | None:
        for k, raw in enumerate(data[:-1].split(b"\n")):
            parts = raw.split()
            if not parts:
                return DataFormatError(path, k + 1, "empty line (expected 'count item ...')")
            if not all(_INT_RE.fullmatch(p) for p in parts):
                return DataFormatError(path, k + 1, f"non-integer field in {_show(raw)}")
            big = [p for p in parts if not _field_ok(p, "int")]
            if big:
                return DataFormatError(
                    path, k + 1, f"field {_show(big[0])} is out of the int64 range"
                )
            if int(parts[0]) != len(parts) - 1:
                return DataFormatError(
                    path,
                    k + 1,
                    f"count field says {int(parts[0])} items, line has {len(parts) - 1}",
                )
        return None

    def fail() -> DataFormatError:
        return bad_line() or DataFormatError(path, None, "cannot parse")

    arr = np.frombuffer(data, dtype=np.uint8)
    ws = (arr == 32) | (arr == 9) | (arr == 10)
    starts = np.flatnonzero(~ws & np.concatenate(([True], ws[:-1])))
    newlines = np.flatnonzero(arr == 10)
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")
    except ValueError:
        raise fail() from None
    if values.size != starts.size:
        raise fail()
    # np.fromstring saturates a value beyond int64 to the int64 maximum, silently
    if values.size and (values.max() == _INT64.max or values.min() == _INT64.min):
        err = bad_line()
        if err is not None:
            raise err
    per_line = np.bincount(np.searchsorted(newlines, starts), minlength=newlines.size)
    if (per_line == 0).any():
        raise fail()
    offsets = np.concatenate(([0], np.cumsum(per_line)[:-1]))
    counts = values[offsets]
    if (counts != per_line - 1).any():
        raise fail()
    is_item = np.ones(values.size, dtype=bool)
    is_item[offsets] = False
    if not is_item.any():
        raise DataFormatError(path, None, "no items (every line's count is 0)")
    users = np.repeat(np.arange(newlines.size, dtype=np.int64), counts)
    return users, values[is_item]
