"""``load(spec)``: one string names a data set; the result is a leave-one-out :class:`Split`."""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

from lrml_kernels.data._compiled import plain_pages
from lrml_kernels.data.interactions import Split
from lrml_kernels.data.readers import (
    read_citeulike,
    read_csv,
    read_movielens,
    read_ncf,
    read_netflix,
    read_netflix_mat,
)
from lrml_kernels.data.split import _leave_one_out, carve_validation, check_seed_and_negatives
from lrml_kernels.data.synthetic_data import synthetic

__all__ = ["SYNTHETIC", "check_min_rating", "load", "read_source"]

#: The built-in synthetic data sets: name -> (users, items, interactions).
SYNTHETIC: dict[str, tuple[int, int, int]] = {
    # the default: LRML d=64 trains a few epochs on it in about a minute on 2 CPU cores
    "synthetic": (3_000, 2_000, 150_000),
    "synthetic-small": (300, 200, 6_000),  # tests
    "synthetic-netflix": (480_189, 17_770, 100_000_000),  # the Netflix Prize's size
}

FORMS = (
    "ncf:PATH_PREFIX (NCF leave-one-out files PREFIX.train.rating/.test.rating/.test.negative)",
    "movielens:PATH (folder or file: u.data, ratings.dat, ratings.csv, ratings_reconstructed.tsv)",
    "netflix:PATH (folder with combined_data_*.txt or training_set/mv_*.txt, one such file, "
    "or a .csv subset)",
    "netflix-mat:PATH (MATLAB v5 <name>_X/<name>_Y files, e.g. the Netflix 5K x 5K subset: "
    "one .mat file, or a folder: the union of its .mat files)",
    "csv:FILE (delimited user,item[,rating[,timestamp]]; delimiter and header detected)",
    "citeulike:FILE (CiteULike users.dat)",
    *(
        f"{name} ({u:,} users x {i:,} items, {n:,} interactions)"
        for name, (u, i, n) in SYNTHETIC.items()
    ),
)

_READERS = {
    "movielens": read_movielens,
    "netflix": read_netflix,
    "netflix-mat": read_netflix_mat,
    "csv": read_csv,
    "citeulike": read_citeulike,
}


# The kinds whose files hold no ratings (the synthetic sets hold none either).
_NO_RATINGS = {
    "ncf": "ncf: files are implicit feedback already",
    "citeulike": "citeulike has no ratings",
}


def check_min_rating(spec: str, min_rating) -> float | None:
    """``min_rating`` as a float (None: keep every rating), refused where ``spec`` names a
    source without ratings; the files themselves are not read (a ``csv:`` file without a rating
    column is found out when it is)."""
    if min_rating is None:
        return None
    number = isinstance(min_rating, Real) and not isinstance(min_rating, bool)
    if not (number and math.isfinite(min_rating)):
        raise ValueError(f"min_rating must be a finite number or None, got {min_rating!r}")
    if isinstance(spec, str):  # (another spec is refused by load with the accepted forms)
        if spec in SYNTHETIC:
            raise ValueError(f"{spec!r} has no ratings: min_rating does not apply")
        kind = spec.partition(":")[0]
        if kind in _NO_RATINGS:
            raise ValueError(f"{_NO_RATINGS[kind]}: min_rating does not apply")
    return float(min_rating)


def _usage(problem: str) -> ValueError:
    return ValueError(f"{problem}; accepted data sets:\n  " + "\n  ".join(FORMS))


def load(
    spec: str,
    *,
    min_rating: float | None = None,
    num_negatives: int | None = 100,
    seed: int = 0,
    cache: bool = True,
    validation: bool = False,
) -> Split:
    """Load the data set named by ``spec`` (forms in :data:`FORMS`) as a leave-one-out split.

    Args:
        min_rating: keep only ratings ``>= min_rating`` (sources with ratings only).
        num_negatives: sampled-protocol negatives per test user (0/None: none). ``ncf:`` keeps
            the 99 of its ``.test.negative`` file whatever this says.
        seed: seeds the negatives (the synthetic sets use seed 0 for the data itself, so that
            every seed sees the same data and only the negatives change).
        cache: read and write the parsed-file cache (see :mod:`lrml_kernels.data.readers`).
        validation: also carve a validation split out of the training data
            (:func:`lrml_kernels.data.carve_validation`, seeded by ``seed``): the training data
            then excludes the validation pairs. The test split is the same either way.
    """
    check_seed_and_negatives(seed, num_negatives)
    min_rating = check_min_rating(spec, min_rating)
    # (without a validation split the split is final as built: its training data is hashed
    # for the fingerprint on another thread meanwhile)
    with plain_pages():
        split = _load(spec, min_rating, num_negatives, seed, cache, hash_ahead=not validation)
        if validation:
            # the split is ours alone: its training arrays may be compacted in place
            split = carve_validation(split, seed=seed, consume=not spec.startswith("ncf:"))
    return split


def read_source(spec: str, *, min_rating: float | None = None, cache: bool = True):
    """The log that :func:`load` splits, as read: an :class:`Interactions` of every row (or of
    the ratings ``>= min_rating``) of a file source (``movielens:``, ``netflix:``,
    ``netflix-mat:``, ``csv:``, ``citeulike:``)."""
    min_rating = check_min_rating(spec, min_rating)
    kind, sep, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not path or kind not in _READERS:
        raise _usage(f"{spec!r} is not a file source with one log")
    with plain_pages():
        return _read(kind, Path(path).expanduser(), spec, min_rating, cache)


def _read(kind: str, p: Path, spec: str, min_rating, cache):
    if not p.exists():
        raise _usage(f"{spec!r}: no such file or folder {p}")
    reader = _READERS[kind]
    if kind == "citeulike":
        x = reader(p, cache=cache)
    else:
        x = reader(p, min_rating=min_rating, cache=cache)
    x.name = spec if min_rating is None else f"{spec} (rating >= {min_rating:g})"
    return x


def _load(spec, min_rating, num_negatives, seed, cache, hash_ahead: bool) -> Split:
    if not isinstance(spec, str) or not spec:
        raise _usage(f"data set must be a non-empty string, got {spec!r}")
    if spec in SYNTHETIC:
        u, i, n = SYNTHETIC[spec]
        x = synthetic(u, i, n, seed=0, name=spec)
        # ``x`` is ours alone: the split compacts the training rows inside its arrays
        return _leave_one_out(x, num_negatives, seed, consume=True, hash_ahead=hash_ahead)
    kind, sep, path = spec.partition(":")
    if not sep or not path or (kind not in _READERS and kind != "ncf"):
        raise _usage(f"unknown data set {spec!r}")
    p = Path(path).expanduser()
    if kind == "ncf":
        missing = [
            str(f)
            for f in (
                p.with_name(p.name + s) for s in (".train.rating", ".test.rating", ".test.negative")
            )
            if not f.is_file()
        ]
        if missing:
            raise _usage(f"{spec!r}: missing file(s) {', '.join(missing)}")
        return read_ncf(p, cache=cache)
    x = _read(kind, p, spec, min_rating, cache)
    # ``x`` is ours alone (the readers build fresh arrays, also from a cache): the split compacts
    # the training rows inside its arrays instead of copying the log (100M rows: 1.6 GB less)
    return _leave_one_out(x, num_negatives, seed, consume=True, hash_ahead=hash_ahead)
