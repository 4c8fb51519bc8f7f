"""What MovieLens says about each rated pair, indexed like the model that trained on it.

``lrml train --data movielens:PATH`` trains on every row of the ratings file as an implicit
positive, users and items re-indexed ``0..n-1`` in ascending order of the original ids
(:func:`lrml_kernels.data.read_movielens`). :func:`read_movielens_side_info` reads the same file
again with its ratings, maps the original ids through the split's own ``user_ids`` /
``item_ids`` (the mapping the model was trained with, not a new one) and joins the side files:

* ML-1M (``movies.dat``, ``users.dat``; ``::``, latin-1): genres, the release year from the
  title, gender, age group and occupation code (the GroupLens README's tables);
* ML-100K (``u.item``, ``u.user``; ``|``, latin-1): the same, ages put into ML-1M's age groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrml_kernels.data.interactions import MISSING_TIMESTAMP, DataFormatError, Split, index_of
from lrml_kernels.data.readers import _dedup_keep, read_movielens_ratings

__all__ = ["AGE_GROUPS", "GENRES", "MovieLensSideInfo", "read_movielens_side_info"]

#: The genres of both releases, in ML-100K's column order (less its "unknown").
GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
#: ML-1M's age codes (the first age of each group) and names; ML-100K ages fall into them.
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
AGE_GROUPS = ("under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
#: ML-1M's occupation codes 0..20 (its README).
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_SIDE_FILES = {"ML-1M": ("movies.dat", "users.dat"), "ML-100K": ("u.item", "u.user")}


@dataclass(eq=False)
class MovieLensSideInfo:
    """Every rated pair of a MovieLens ratings file, in model indices, with its side information.

    Pairs (``[n]``, one per distinct rated (user, item), file order):
        users, items: int64 indices of the model's tables.
        ratings: int8, 1..5.
        timestamps: int64 seconds, :data:`MISSING_TIMESTAMP` where the file has none.
        history_position: float64 in [0, 1]: the rating's rank among the user's timestamped
            ratings (by time, ties by file order) over their count less one; NaN where the
            rating has no timestamp or the user fewer than two timestamped ratings.
        held_out: bool: a pair not seen in training: the split's test (or validation) pair,
            or rated below the ``min_rating`` the split was made with.
    Items (``[num_items]``): titles, release_years (int64, -1 unknown), genres (bool
    ``[num_items, len(GENRES)]``). Users (``[num_users]``): genders (int8, 0 F, 1 M),
    age_groups (int8 index into :data:`AGE_GROUPS`), occupations (int16 index into
    ``occupation_names``).
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    history_position: np.ndarray
    held_out: np.ndarray
    titles: list[str]
    release_years: np.ndarray
    genres: np.ndarray
    genders: np.ndarray
    age_groups: np.ndarray
    occupations: np.ndarray
    occupation_names: tuple[str, ...]
    release: str

    def __len__(self) -> int:
        return int(self.users.shape[0])


def _lines(path: Path):
    """``(1-based line number, text)`` of the non-blank lines of a latin-1 side file."""
    with open(path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line


def _split(path: Path, n: int, line: str, sep: str, width: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != width:
        raise DataFormatError(path, n, f"{width} {sep!r}-separated fields expected, got {line!r}")
    return fields


def _int(path: Path, n: int, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(path, n, f"{what} must be an integer, got {text!r}") from None


def _year(title: str) -> int:
    m = _YEAR.search(title)
    return int(m.group(1)) if m else -1


def _ml1m_items(path: Path) -> dict[int, tuple[str, int, list[int]]]:
    """``movies.dat``: MovieID -> (title, release year, genre indices)."""
    out = {}
    for n, line in _lines(path):
        movie, title, genres = _split(path, n, line, "::", 3)
        codes = []
        for g in genres.split("|"):
            if g not in GENRES:
                raise DataFormatError(path, n, f"unknown genre {g!r}")
            codes.append(GENRES.index(g))
        out[_int(path, n, movie, "MovieID")] = (title, _year(title), codes)
    return out


def _ml1m_users(path: Path) -> dict[int, tuple[int, int, int]]:
    """``users.dat``: UserID -> (gender, age group, occupation)."""
    out = {}
    for n, line in _lines(path):
        user, gender, age, occupation, _zip = _split(path, n, line, "::", 5)
        if gender not in ("F", "M"):
            raise DataFormatError(path, n, f"gender must be F or M, got {gender!r}")
        age = _int(path, n, age, "Age")
        if age not in AGE_CODES:
            raise DataFormatError(path, n, f"age code must be one of {AGE_CODES}, got {age}")
        occupation = _int(path, n, occupation, "Occupation")
        if not 0 <= occupation < len(ML1M_OCCUPATIONS):
            raise DataFormatError(path, n, f"occupation code must be 0..20, got {occupation}")
        out[_int(path, n, user, "UserID")] = (
            ("F", "M").index(gender),
            AGE_CODES.index(age),
            occupation,
        )
    return out


def _ml100k_items(path: Path) -> dict[int, tuple[str, int, list[int]]]:
    """``u.item``: movie id | title | release date | video date | URL | 19 genre flags (the
    first, "unknown", dropped)."""
    out = {}
    for n, line in _lines(path):
        fields = _split(path, n, line, "|", 5 + 1 + len(GENRES))
        flags = fields[6:]
        if any(f not in ("0", "1") for f in flags):
            raise DataFormatError(path, n, "genre flags must be 0 or 1")
        year = _year(fields[1])
        if year < 0 and re.fullmatch(r"\d{2}-\w{3}-\d{4}", fields[2]):
            year = int(fields[2][-4:])
        codes = [g for g, f in enumerate(flags) if f == "1"]
        out[_int(path, n, fields[0], "movie id")] = (fields[1], year, codes)
    return out


def _ml100k_users(path: Path) -> tuple[dict[int, tuple[int, int, int]], tuple[str, ...]]:
    """``u.user``: user id | age | gender | occupation | zip -> ((gender, age group, occupation
    index), occupation names in ascending order)."""
    rows = []
    for n, line in _lines(path):
        user, age, gender, occupation, _zip = _split(path, n, line, "|", 5)
        if gender not in ("F", "M"):
            raise DataFormatError(path, n, f"gender must be F or M, got {gender!r}")
        age = _int(path, n, age, "age")
        group = int(np.searchsorted(AGE_CODES, age, side="right")) - 1
        rows.append((_int(path, n, user, "user id"), ("F", "M").index(gender), group, occupation))
    names = tuple(sorted({r[3] for r in rows}))
    return {u: (g, a, names.index(o)) for u, g, a, o in rows}, names


def _side_files(folder: Path) -> tuple[str, Path, Path]:
    """``(release, items file, users file)`` of a MovieLens folder; a clear error if absent."""
    for release, names in _SIDE_FILES.items():
        if all((folder / f).is_file() for f in names):
            return release, folder / names[0], folder / names[1]
    wanted = " or ".join(" + ".join(names) for names in _SIDE_FILES.values())
    raise FileNotFoundError(
        f"no MovieLens side information in {folder}: lrml explain needs {wanted} next to the "
        "ratings file (the GroupLens ML-1M or ML-100K release)"
    )


def _lookup(table: dict, ids: np.ndarray, what: str, path: Path) -> list:
    missing = [int(i) for i in ids if int(i) not in table]
    if missing:
        raise ValueError(
            f"{path} has no entry for {len(missing)} {what} of the data (e.g. {missing[0]}): "
            "the side files do not belong to these ratings"
        )
    return [table[int(i)] for i in ids]


def _history_position(users: np.ndarray, timestamps: np.ndarray, num_users: int) -> np.ndarray:
    """Each timestamped row's rank in its user's timestamped rows over their count less one."""
    pos = np.full(users.size, np.nan)
    known = np.flatnonzero(timestamps != MISSING_TIMESTAMP)
    order = known[np.lexsort((known, timestamps[known], users[known]))]
    counts = np.bincount(users[order], minlength=num_users)
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(order.size) - start[users[order]]
    span = counts[users[order]] - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        pos[order] = np.where(span > 0, rank / np.maximum(span, 1), np.nan)
    return pos


def read_movielens_side_info(
    path, split: Split, min_rating: float | None = None
) -> MovieLensSideInfo:
    """The rated pairs and side information of the MovieLens data at ``path`` (a folder, or its
    ratings file with the side files next to it), in the indices of ``split``: the split
    ``lrml_kernels.data.load(f"movielens:{path}", min_rating=min_rating)`` makes, which the
    model trained on. With ``min_rating``, the pairs rated below it are kept (as not trained on)
    where the split has their user and item.

    Raises FileNotFoundError when the side files are missing and ValueError when the ratings or
    side files do not match the split (an id it does not know, a size that differs).
    """
    ratings_file, cols = read_movielens_ratings(path)
    release, items_file, users_file = _side_files(ratings_file.parent)
    U, I = split.num_users, split.num_items
    user_ids, item_ids = split.train.user_ids, split.train.item_ids
    users = index_of(user_ids, cols["user_id"])
    items = index_of(item_ids, cols["item_id"])
    known = (users >= 0) & (items >= 0)
    if not known.all():
        if min_rating is None:
            r = int(np.flatnonzero(~known)[0])
            what = "user" if users[r] < 0 else "item"
            raise ValueError(
                f"{ratings_file} rates {what} id {int(cols[what + '_id'][r])}, which the model's "
                "data does not have: not the data this model was trained on"
            )
        # users or items whose every rating is below min_rating are not in the split (a pair's
        # rows go together: the de-duplication below sees the same pairs either way)
        users, items = users[known], items[known]
        cols = {k: v[known] for k, v in cols.items()}
    timestamps = cols["timestamp"]
    keep = _dedup_keep(users, items, timestamps, U, I)  # the reader's rule: the latest rating
    ratings = cols["rating"]
    if keep is not None:
        users, items, timestamps, ratings = (
            users[keep],
            items[keep],
            timestamps[keep],
            ratings[keep],
        )
    if ratings.size and (ratings.min() < 1 or ratings.max() > 5 or (ratings % 1).any()):
        raise ValueError(f"{ratings_file}: ratings must be whole stars 1..5")
    below = np.zeros(ratings.shape, dtype=bool) if min_rating is None else ratings < min_rating
    n_split = len(split.train) + split.test_users.size
    n_split += 0 if split.valid_users is None else split.valid_users.size
    if users.size - int(below.sum()) != n_split:
        kept = "" if min_rating is None else f" rated >= {min_rating:g}"
        raise ValueError(
            f"{ratings_file} has {users.size - int(below.sum()):,} distinct rated pairs{kept}, "
            f"the model's data {n_split:,}: not the data this model was trained on"
        )
    key = users * I + items
    held = [split.test_users.astype(np.int64) * I + split.test_items]
    if split.valid_users is not None:
        held.append(split.valid_users.astype(np.int64) * I + split.valid_items)
    held_out = np.isin(key, np.concatenate(held)) | below

    if release == "ML-1M":
        item_table, user_table = _ml1m_items(items_file), _ml1m_users(users_file)
        occupation_names = ML1M_OCCUPATIONS
    else:
        item_table = _ml100k_items(items_file)
        user_table, occupation_names = _ml100k_users(users_file)
    item_rows = _lookup(item_table, item_ids, "items", items_file)
    user_rows = _lookup(user_table, user_ids, "users", users_file)
    genres = np.zeros((I, len(GENRES)), dtype=bool)
    for i, row in enumerate(item_rows):
        genres[i, row[2]] = True
    user_cols = np.array(user_rows, dtype=np.int64).reshape(U, 3)
    return MovieLensSideInfo(
        users=users,
        items=items,
        ratings=ratings.astype(np.int8),
        timestamps=timestamps,
        history_position=_history_position(users, timestamps, U),
        held_out=held_out,
        titles=[t for t, _, _ in item_rows],
        release_years=np.array([y for _, y, _ in item_rows], dtype=np.int64),
        genres=genres,
        genders=user_cols[:, 0].astype(np.int8),
        age_groups=user_cols[:, 1].astype(np.int8),
        occupations=user_cols[:, 2].astype(np.int16),
        occupation_names=tuple(occupation_names),
        release=release,
    )
