"""Synthetic implicit-feedback logs with a long tail and latent structure, up to Netflix size.

The generating model (vectorised, in chunks of users; never a ``[users, items]`` array):

* items fall into ``C = min(dim, num_items // 50)`` latent taste clusters (at least 1; evenly, at
  random) and have a Zipf-like popularity: weight ``(r + 1) ** -0.9`` for popularity rank r;
* user activity is lognormal (sigma 1.1), at least ``min(5, mean / 4)`` interactions per user
  (and at least 1), at most half the catalogue;
* each user likes 3 clusters (at random, Dirichlet(1, 1, 1) weights) and draws each interaction
  from one of them with probability 0.9 in total (less for heavy users: down to 0.1 for a user of
  half the catalogue), else from the whole catalogue; within a cluster
  (or the catalogue) an item is drawn by popularity (inverse CDF of the continuous Zipf law, O(1)
  per draw). So a user's items are likely under popularity x affinity, and a model that learns the
  clusters beats a popularity ranker;
* timestamps (seconds, from 2000-01-01) strictly increase along each user's rows, which come user
  by user in draw order: leave-one-out holds out the last draw.

A (user, item) pair drawn twice keeps its first draw; users short of their count draw again (up to
8 rounds). The total is exact unless a user exhausts what it can reach in those rounds (the
heaviest users): then it falls slightly short of ``num_interactions`` (about 0.5% at Netflix size).
Items no user drew stay in the catalogue (``num_items`` is as requested).

The random numbers are numpy's (``default_rng(seed)``, in the same calls either way); where the
C++ extension loads, its ops (``csrc/cpu/synthetic_cpu.cpp``) turn them into items, distinct
items and rows in one pass each instead of numpy's array-wide steps: the same log, bit for bit
(Netflix size: about 6 s of CPU instead of 17).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrml_kernels.data._compiled import data_op, populate_in_background, tensor
from lrml_kernels.data.interactions import MISSING_TIMESTAMP, Interactions

__all__ = ["synthetic", "write_netflix_format"]

_ZIPF = 0.9  # popularity exponent (draw() hard-codes 1 / (1 - _ZIPF) = 10)
_NOISE = 0.1  # share of draws from the whole catalogue
_TASTES = 3  # clusters per user
_SIGMA = 1.1  # lognormal activity
_ITEMS_PER_CLUSTER = 50  # at least, on average
_ROUNDS = 8
_T0 = 946684800  # 2000-01-01
_YEAR = 365 * 86400


@dataclass
class _Model:
    table: np.ndarray  # [C * ... + I] item ids: each cluster's items by popularity, then all items
    offsets: np.ndarray  # [C + 1] start of each segment (segment C: the whole catalogue)
    sizes: np.ndarray  # [C + 1]
    zipf_top: np.ndarray  # [C + 1] (size + 1) ** (1 - a) - 1: the continuous Zipf inverse CDF
    segments: np.ndarray  # [U * 4] each user's 3 liked clusters, then C (the catalogue)
    cum: list[np.ndarray]  # 3 x [U] float32 cumulative probability of drawing from each of them
    compiled: _Compiled | None = None  # the C++ ops where the extension loads

    def draw(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        """One item for each entry of ``users`` (global user indices, int64)."""
        r = rng.random(users.size, dtype=np.float32)  # which of the user's segments
        y = rng.random(users.size)  # the popularity rank inside it
        if self.compiled is not None:
            return self.compiled.items(r, y, users)
        # The first liked cluster whose threshold r is under (the catalogue if none): the
        # thresholds ascend, so its position is how many of them r is not under.
        k = users * (_TASTES + 1)
        for threshold in self.cum:
            k += r >= threshold[users]
        seg = self.segments[k]
        # x = (1 + u * top) ** (1 / (1 - a)), and 1 / (1 - a) = 10: four products, not a pow
        y *= self.zipf_top[seg]
        y += 1.0
        x = y * y
        x *= x
        x *= y
        x *= x
        rank = np.minimum(x.astype(np.int64), self.sizes[seg])  # np.clip is slow here
        rank -= 1
        np.maximum(rank, 0, out=rank)
        return self.table[self.offsets[seg] + rank]


class _Compiled:
    """The C++ extension's ops for the generator (``csrc/cpu/synthetic_cpu.cpp``): the same
    arithmetic on the same random numbers as the numpy code, in one pass each."""

    def __init__(self, model: _Model):
        self.model_tensors = tuple(
            tensor(a)
            for a in (
                np.stack(model.cum),
                model.segments,
                model.zipf_top,
                model.sizes,
                model.offsets,
                model.table,
            )
        )
        self._items = data_op("synthetic_items")
        self.keep_distinct_ = data_op("keep_distinct_")
        self.rows_ = data_op("synthetic_rows_")

    def items(self, r: np.ndarray, y: np.ndarray, users: np.ndarray) -> np.ndarray:
        return self._items(tensor(r), tensor(y), tensor(users), *self.model_tensors).numpy()


def _activity(rng, num_users: int, num_items: int, total: int) -> np.ndarray:
    """Interactions per user: lognormal shares of ``total`` with a floor and a cap."""
    floor = max(1, min(5, total // max(1, num_users) // 4))
    cap = max(floor, num_items // 2)
    if total < floor * num_users:
        raise ValueError(
            f"num_interactions={total} is below {floor} per user for {num_users} users"
        )
    w = rng.lognormal(0.0, _SIGMA, num_users)
    n = floor + rng.multinomial(total - floor * num_users, w / w.sum())
    return np.minimum(n, cap).astype(np.int64)


def synthetic(
    num_users: int,
    num_items: int,
    num_interactions: int,
    *,
    dim: int = 16,
    seed: int = 0,
    name: str | None = None,
) -> Interactions:
    """A synthetic log (see the module docstring for the model).

    Args:
        num_users, num_items: sizes; every user gets at least one interaction.
        num_interactions: the target number of distinct (user, item) rows (see the module
            docstring for when the result falls slightly short).
        dim: number of latent taste clusters (capped at ``num_items // 50``).
        seed: the same arguments give the same log, bit for bit.
    """
    U, I, N = int(num_users), int(num_items), int(num_interactions)
    if U < 1 or I < 1 or N < 1 or dim < 1:
        raise ValueError("num_users, num_items, num_interactions and dim must be positive")
    C = max(1, min(int(dim), I // _ITEMS_PER_CLUSTER))
    rng = np.random.default_rng(seed)

    rank = rng.permutation(I)
    cluster = rng.permutation(np.arange(I) % C)
    by_rank = np.argsort(rank)
    in_cluster = by_rank[np.argsort(cluster[by_rank], kind="stable")]
    sizes = np.concatenate((np.bincount(cluster, minlength=C), [I])).astype(np.int64)
    n_u = _activity(rng, U, I, N)
    # Heavy users range wider: the catalogue-wide share grows to 0.9 for a user of I / 2 items.
    noise = np.clip(2.0 * n_u / I, _NOISE, 0.9)
    taste = rng.dirichlet(np.ones(_TASTES), size=U)
    model = _Model(
        table=np.concatenate((in_cluster, by_rank)).astype(np.int64),
        offsets=np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64),
        sizes=sizes,
        zipf_top=(sizes + 1.0) ** (1.0 - _ZIPF) - 1.0,
        segments=np.concatenate(
            (rng.integers(0, C, size=(_TASTES, U), dtype=np.int64), np.full((1, U), C)), axis=0
        ).T.ravel(),
        cum=list(np.cumsum(taste * (1.0 - noise)[:, None], axis=1).T.astype(np.float32)),
    )
    if data_op("synthetic_items") is not None:
        model.compiled = _Compiled(model)
    span = rng.uniform(30 * 86400, 5 * _YEAR, U)
    start = (_T0 + rng.uniform(0, 6 * _YEAR - span)).astype(np.int64)
    mean_gap = span / n_u

    index = np.int32 if max(U, I) <= np.iinfo(np.int32).max else np.int64
    out_u = np.empty(int(n_u.sum()), dtype=index)  # int32 indices: 0.8 GB less at Netflix size
    out_i = np.empty_like(out_u)
    out_t = np.empty(out_u.size, dtype=np.int64)
    populate_in_background(out_u, out_i, out_t)  # (the draws below keep one core busy)
    filled = 0
    rows_per_chunk = 1 << 19  # small chunks: fewer page faults, caches stay warm
    cum_n = np.cumsum(n_u)
    a = 0
    while a < U:
        done = int(cum_n[a - 1]) if a else 0
        b = int(np.searchsorted(cum_n, done + rows_per_chunk, side="right"))
        b = min(max(b, a + 1), U)
        if model.compiled is not None:
            filled += _chunk_compiled(
                rng, model, a, n_u[a:b], I, (out_u, out_i, out_t), filled, mean_gap, start
            )
            a = b
            continue
        users, items = _draw_distinct(rng, model, a, n_u[a:b], I)
        # Strictly increasing times along each user's rows (integer gaps of at least a second).
        t = _timestamps(rng.exponential(1.0, users.size), users, a, b, mean_gap, start)
        n = users.size
        out_u[filled : filled + n] = users
        out_i[filled : filled + n] = items
        out_t[filled : filled + n] = t
        filled += n
        a = b
    return Interactions(
        users=out_u[:filled],
        items=out_i[:filled],
        timestamps=out_t[:filled],
        num_users=U,
        num_items=I,
        user_ids=np.arange(U, dtype=np.int64),
        item_ids=np.arange(I, dtype=np.int64),
        name=name or f"synthetic({U},{I},{N},dim={dim},seed={seed})",
    )


def _timestamps(exponential, users, a, b, mean_gap, start) -> np.ndarray:
    """int64 times of rows of users ``a .. b - 1`` (``users`` ascending): per user, its start
    plus the running sum of the gaps ``1 + int64(exponential * mean_gap[user])``."""
    gaps = 1 + (exponential * mean_gap[users]).astype(np.int64)
    t = np.cumsum(gaps)
    counts = np.bincount(users - a, minlength=b - a)
    has = counts > 0
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))[has]
    t -= np.repeat(t[first] - gaps[first], counts[has])
    t += start[users]
    return t


def _first_of_each_pair(
    local: np.ndarray, items: np.ndarray, num_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first occurrence of each (local user, item) pair, by one sort of int64 keys that
    carry the position: ``(mask over the draws, sorted unique pair keys, their positions)``."""
    R = local.size
    key = local * num_items
    key += items
    key *= R
    key += np.arange(R, dtype=np.int64)
    key.sort()
    pair = key // R
    first = np.empty(R, dtype=bool)
    first[:1] = True
    np.not_equal(pair[1:], pair[:-1], out=first[1:])
    pos = key[first] % R
    keep = np.zeros(R, dtype=bool)
    keep[pos] = True
    return keep, pair[first], pos


def _first_per_user(local: np.ndarray, keep: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """``keep`` limited to each user's first ``quota[user]`` kept rows (``local`` ascending)."""
    seen = np.cumsum(keep)
    starts = np.searchsorted(local, np.arange(quota.size))
    before = np.concatenate(([0], seen))[starts]
    return keep & (seen - before[local] <= quota[local])


def _round_draws(need: np.ndarray, rnd: int) -> tuple[np.ndarray, np.ndarray]:
    """The users still short (local indices) and how many draws each gets in round ``rnd``."""
    who = np.flatnonzero(need > 0)
    factor = 1.1 if rnd == 0 else 3.0
    return who, np.ceil(need[who] * factor).astype(np.int64) + 1


def _draw_distinct(rng, model: _Model, a: int, n_u: np.ndarray, num_items: int):
    """Users ``a .. a + len(n_u) - 1``: ``n_u`` distinct items each where they can be reached,
    in draw order; returns ``(users, items)`` sorted by user (stable). Rounds of draws: a
    (user, item) pair drawn again (in the round or an earlier one) is dropped, and a user keeps
    its first draws up to its count."""
    nloc = n_u.size
    need = n_u.copy()
    got_local: list[np.ndarray] = []
    got_items: list[np.ndarray] = []
    taken = np.zeros(0, dtype=np.int64)  # sorted keys local * num_items + item already kept
    for rnd in range(_ROUNDS):
        who, draws = _round_draws(need, rnd)
        if who.size == 0:
            break
        local = np.repeat(who, draws)
        items = model.draw(rng, local + a)
        # (local * I + item) * R must fit in int64: split huge rounds (not at the sizes we use).
        keep, pairs, pos = _first_of_each_pair(local, items, num_items)
        if taken.size:  # drop the first draws of pairs kept in earlier rounds: one look-up per
            # distinct pair, in ascending order (a fraction of the draws, and cache-friendly)
            at = np.searchsorted(taken, pairs)
            np.minimum(at, taken.size - 1, out=at)
            keep[pos[taken[at] == pairs]] = False
        keep = _first_per_user(local, keep, need)
        got_local.append(local[keep])
        got_items.append(items[keep])
        need -= np.bincount(local[keep], minlength=nloc)
        if rnd + 1 < _ROUNDS and (need > 0).any():  # merge two sorted runs (timsort: linear)
            taken = np.sort(np.concatenate((taken, pairs[keep[pos]])), kind="stable")
    local = np.concatenate(got_local)
    items = np.concatenate(got_items)
    if len(got_local) > 1:  # merge the rounds: each is sorted by user (timsort merges the runs)
        order = np.argsort(local, kind="stable")
        local, items = local[order], items[order]
    return local + a, items


def _chunk_compiled(rng, model: _Model, a, n_u, num_items, out, filled, mean_gap, start) -> int:
    """The rows of users ``a .. a + len(n_u) - 1`` with the extension, written into the log's
    arrays ``out = (users, items, timestamps)`` from row ``filled`` on; returns how many. The
    same draws and rows as :func:`_draw_distinct` and :func:`_timestamps`: each user's distinct
    items are appended to its own slice of one buffer (a bitmap of the catalogue marks them)."""
    nloc = n_u.size
    offsets = np.zeros(nloc, dtype=np.int64)
    np.cumsum(n_u[:-1], out=offsets[1:])
    buffer = np.empty(int(n_u.sum()), dtype=np.int64)
    got = np.zeros(nloc, dtype=np.int64)
    state = [tensor(x) for x in (buffer, got, offsets, n_u)]
    for rnd in range(_ROUNDS):
        who, draws = _round_draws(n_u - got, rnd)
        if who.size == 0:
            break
        items = model.draw(rng, np.repeat(who + a, draws))
        model.compiled.keep_distinct_(*state, tensor(who), tensor(draws), tensor(items), num_items)
    n = int(got.sum())
    rows = [tensor(o[filled : filled + n]) for o in out]  # views: written in place
    exponential = rng.exponential(1.0, n)
    buffer_t, got_t, offsets_t = state[:3]
    model.compiled.rows_(
        *rows, buffer_t, offsets_t, got_t, a, tensor(exponential), tensor(mean_gap), tensor(start)
    )
    return n


# --- writing the Netflix Prize text format (benchmarks and tests of read_netflix) ---------------


def _civil_from_days(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = z + 719468
    era = np.floor_divide(z, 146097)
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = np.where(mp < 10, mp + 3, mp - 9)
    return y + (m <= 2), m, d


def _digits(v: np.ndarray, width: int, zero_pad: bool = False) -> np.ndarray:
    """``[n, width]`` ASCII right-aligned digits of non-negative ints; the unused leading
    positions are ``'0'`` with ``zero_pad``, else byte 0 (dropped by :func:`_format_lines`)."""
    out = np.zeros((v.size, width), dtype=np.uint8)
    v = v.astype(np.int64)
    for j in range(width - 1, -1, -1):
        digit = (48 + v % 10).astype(np.uint8)
        out[:, j] = digit if zero_pad or j == width - 1 else np.where(v > 0, digit, 0)
        v = v // 10
    return out


def _format_lines(cols: list[np.ndarray], seps: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``col0 sep0 col1 sep1 ...`` as one byte buffer plus each row's start offset."""
    parts = []
    for c, s in zip(cols, seps, strict=True):
        if c.dtype == np.uint8 and c.ndim == 2:
            parts.append(c)
        else:
            width = max(1, len(str(int(c.max())))) if c.size else 1
            parts.append(_digits(c, width))
        parts.append(np.broadcast_to(np.frombuffer(s, np.uint8), (cols[0].shape[0], len(s))))
    mat = np.concatenate(parts, axis=1)
    mask = mat != 0
    lengths = mask.sum(axis=1)
    starts = np.concatenate(([0], np.cumsum(lengths)))
    return mat[mask], starts


def write_netflix_format(
    interactions: Interactions,
    folder,
    *,
    num_files: int = 4,
    ratings: np.ndarray | None = None,
    layout: str = "combined",
    rows_per_chunk: int = 1 << 22,
) -> list[Path]:
    """Write a log in the Netflix Prize text format, for benchmarks and tests of ``read_netflix``.

    ``layout="combined"``: ``combined_data_{1..num_files}.txt`` (Kaggle); ``"training_set"``:
    ``training_set/mv_{movie:07d}.txt``, one file per item (small logs only). Lines are
    ``MovieID:`` then ``CustomerID,Rating,YYYY-MM-DD``; ids are the original ids (``user_ids``,
    ``item_ids``), ratings default to 5, dates come from the timestamps (2000-01-01 if none).
    """
    x = interactions
    folder = Path(folder)
    if ratings is None:
        ratings = np.full(len(x), 5, dtype=np.int64)
    order = np.argsort(x.items, kind="stable")
    movies = x.item_ids[x.items[order]]
    users = x.user_ids[x.users[order]]
    if x.timestamps is None:
        days = np.full(len(x), 10957, dtype=np.int64)
    else:
        ts = x.timestamps[order]
        days = np.where(ts == MISSING_TIMESTAMP, 10957 * 86400, ts) // 86400
    rates = np.asarray(ratings)[order]
    bounds = np.flatnonzero(np.concatenate(([True], movies[1:] != movies[:-1], [True])))
    paths: list[Path] = []
    if layout == "training_set":
        (folder / "training_set").mkdir(parents=True, exist_ok=True)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            p = folder / "training_set" / f"mv_{int(movies[s]):07d}.txt"
            _write_movie_rows(p, movies[s:e], users[s:e], rates[s:e], days[s:e], rows_per_chunk)
            paths.append(p)
        return paths
    if layout != "combined":
        raise ValueError(f"layout must be 'combined' or 'training_set', got {layout!r}")
    folder.mkdir(parents=True, exist_ok=True)
    cuts = np.searchsorted(bounds, np.linspace(0, len(x), num_files + 1)[1:-1].astype(np.int64))
    edges = np.concatenate(([0], bounds[cuts], [len(x)])).astype(np.int64)
    for f in range(num_files):
        s, e = int(edges[f]), int(edges[f + 1])
        p = folder / f"combined_data_{f + 1}.txt"
        _write_movie_rows(p, movies[s:e], users[s:e], rates[s:e], days[s:e], rows_per_chunk)
        paths.append(p)
    return paths


def _write_movie_rows(path, movies, users, rates, days, rows_per_chunk) -> None:
    with open(path, "wb") as f:
        current = None
        for s in range(0, movies.size, rows_per_chunk):
            e = min(s + rows_per_chunk, movies.size)
            y, m, d = _civil_from_days(days[s:e])
            dash = np.full((e - s, 1), 45, np.uint8)
            date = np.concatenate(
                (_digits(y, 4, True), dash, _digits(m, 2, True), dash, _digits(d, 2, True)), axis=1
            )
            buf, starts = _format_lines([users[s:e], rates[s:e], date], [b",", b",", b"\n"])
            mv = movies[s:e]
            change = np.flatnonzero(np.concatenate(([mv[0] != current], mv[1:] != mv[:-1])))
            pieces = []
            prev = 0
            for c in change:
                pieces.append(buf[starts[prev] : starts[c]].tobytes())
                pieces.append(f"{int(mv[c])}:\n".encode())
                prev = c
            pieces.append(buf[starts[prev] : starts[-1]].tobytes())
            f.write(b"".join(pieces))
            current = mv[-1]
