"""HR@k and nDCG@k under the sampled (NCF) and full-ranking protocols of SPEC.md.

A ranker is anything with ``distances(users [B], items [B, C]) -> D [B, C]`` and
``recommend(users [B], k, exclude=(indptr, indices)) -> (D [B, k], ids [B, k])``, lower distance
is better: :class:`lrml_kernels.LRML` and :class:`PopularityRanker` both are. A ranker scores
every (user, item) pair on its own: ``D[b, c]`` must not depend on the other columns of row b
(LRML ranks per pair whatever relation it was trained with), or the candidate list would tell the
ranker which column holds the held-out item.
"""

from __future__ import annotations

import math
import numbers
import sys
from types import SimpleNamespace

import numpy as np
import torch

from lrml_kernels.ops import check_index_ranges

PROTOCOLS = ("sampled", "full")


def per_user(ranks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each test user's hit (1.0 or 0.0) and nDCG@k (``1/log2(rank + 2)`` for rank < k) from
    0-based ranks ``[T]``: two float64 ``[T]``."""
    ranks = ranks.double()
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    return hit.double(), ndcg


def hit_ndcg(ranks: torch.Tensor, k: int) -> tuple[float, float]:
    """HR@k and nDCG@k of 0-based ranks ``[T]``: the means of :func:`per_user`."""
    if ranks.numel() == 0:
        return 0.0, 0.0
    hit, ndcg = per_user(ranks, k)
    return hit.mean().item(), ndcg.mean().item()


def standard_error(total: float, squares: float, n: int) -> float:
    """The standard error of a mean over ``n`` users from the sum of their values and of their
    squares: the sample standard deviation over sqrt(n); 0.0 below two users."""
    if n < 2:
        return 0.0
    var = max(0.0, (squares - total * total / n) / (n - 1))
    return math.sqrt(var / n)


def sampled_ranks(
    ranker, split, *, batch_size: int = 4096, device=None, progress: bool = False
) -> torch.Tensor:
    """Rank of each held-out item among its sampled negatives (ties count against it).

    Negatives equal to the held-out item itself are ignored. A NaN distance ranks last (as
    +inf): a held-out item at NaN is behind every rival, a rival at NaN beats nothing.
    ``progress``: a progress bar on stderr once the ranking has taken 2 s.
    """
    if split.test_negatives is None:
        raise ValueError("this split has no sampled negatives: use protocol='full'")
    device = torch.device(device) if device is not None else _device_of(ranker)
    users = torch.as_tensor(split.test_users, dtype=torch.int64)
    cand = torch.cat(
        [
            torch.as_tensor(split.test_items, dtype=torch.int64)[:, None],
            torch.as_tensor(split.test_negatives, dtype=torch.int64),
        ],
        dim=1,
    )
    ranks = []
    with torch.no_grad(), _bar(users.shape[0], "sampled ranking", progress) as bar:
        for start in range(0, users.shape[0], batch_size):
            u = users[start : start + batch_size].to(device)
            c = cand[start : start + batch_size].to(device)
            bar.update(u.shape[0])
            D = ranker.distances(u, c)  # compared in its own dtype: no ties made by rounding
            # A negative equal to the held-out item (156 rows of the NCF ml-1m file) is not a
            # competitor: skip it, as NCF's own evaluation does.
            rivals = c[:, 1:] != c[:, :1]
            D = _nan_last(D)
            ranks.append(((D[:, 1:] <= D[:, :1]) & rivals).sum(1).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)


def _bar(total: int, desc: str, progress: bool):
    """A progress bar over ``total`` test users, shown on stderr only after 2 s and cleared at
    the end (an evaluation between training epochs adds no line)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="user", disable=not progress, delay=2.0, leave=False,
        dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip


def _nan_last(D: torch.Tensor) -> torch.Tensor:
    """``D`` with NaN replaced by +inf: a NaN distance ranks last."""
    return D.masked_fill(D.isnan(), float("inf"))


def full_ranks(
    ranker,
    split,
    *,
    k: int = 10,
    batch_size: int | None = None,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """Rank of each held-out item among all items the user did not train on, capped at ``k``.

    ``batch_size`` users per top-k call: by default 1,024 on the CPU and 8,192 on a GPU (at
    16 users a program, 512 programs fill 132 SMs about 4 times over; 1,024 users gave 64).

    Uses top-(k+1) with the training items excluded: the held-out item's rank is the number of
    other returned items at a distance ≤ its own, both from that one call (a kernel's top-k may
    round differently from its ``distances``, which would hide a tie); a held-out item not
    returned has k+1 items ahead: ``k``, "not in the top k". A NaN distance ranks last, as in
    :func:`sampled_ranks`: a held-out item at NaN is a miss. The items excluded are
    ``split.known_csr()``: with a validation split, each user's validation item too (a known
    positive, not a rival of the test item); never the user's test item, even where it is also
    a training pair (files split elsewhere, e.g. NCF's). ``progress``: as in
    :func:`sampled_ranks`.
    """
    device = torch.device(device) if device is not None else _device_of(ranker)
    if batch_size is None:
        batch_size = 8192 if device.type == "cuda" else 1024
    indptr, indices = getattr(split, "known_csr", split.train_csr)()
    indptr = torch.as_tensor(indptr, dtype=torch.int64)
    indices = torch.as_tensor(indices)  # int32 or int64: each batch's rows are widened
    users = torch.as_tensor(split.test_users, dtype=torch.int64)
    tests = torch.as_tensor(split.test_items, dtype=torch.int64)
    # no wider than the catalogue (where the split says it): a k of 10^9 needs no memory
    width = min(k + 1, getattr(split, "num_items", k + 1))
    ranks = []
    with torch.no_grad(), _bar(users.shape[0], "full ranking", progress) as bar:
        for start in range(0, users.shape[0], batch_size):
            u = users[start : start + batch_size]
            bar.update(u.shape[0])
            sub_ptr, sub_idx = batch_csr(indptr, indices, u)
            ud, t = u.to(device), tests[start : start + batch_size].to(device)
            dist, ids = ranker.recommend(
                ud, width, exclude=(sub_ptr.to(device), sub_idx.to(device))
            )
            is_test = ids == t[:, None]
            d_test = torch.where(is_test, dist, float("inf")).min(1, keepdim=True).values
            better = (_nan_last(dist) <= d_test) & ~is_test & (ids >= 0)
            rank = better.sum(1).clamp_max(k).masked_fill(~is_test.any(1), k)
            nan_test = (is_test & dist.isnan()).any(1)
            ranks.append(rank.masked_fill(nan_test, k).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)


def evaluate(ranker, split, protocol: str = "sampled", k: int = 10, *, shard=None, **kw) -> dict:
    """HR@k and nDCG@k of ``ranker`` on the held-out items of ``split``.

    ``shard=(rank, world)`` evaluates every world-th test user from ``rank`` on and sums the
    results over the ranks with ``torch.distributed`` (every rank gets the global numbers).
    ``kw`` goes to :func:`sampled_ranks` / :func:`full_ranks` (``batch_size``, ``device``,
    ``progress``).
    Returns ``{"protocol", "k", "users", "hr", "ndcg", "hr_se", "ndcg_se"}`` (``hr``/``ndcg``
    as SPEC.md defines; ``*_se`` their standard errors over the test users: how far another
    draw of as many users would move them).
    """
    k = _check_protocol(protocol, k)
    if shard is not None:
        rank, world = shard
        if not all(isinstance(v, numbers.Integral) for v in shard) or not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        split = _test_rows(split, slice(rank, None, world))
    hit, ndcg = per_user(_ranks(ranker, split, protocol, k, kw), k)
    sums = [hit.sum().item(), ndcg.sum().item(), float(hit.numel()), (ndcg * ndcg).sum().item()]
    if shard is not None and shard[1] > 1:
        sums = torch.tensor(sums, dtype=torch.float64, device=_device_of(ranker))
        torch.distributed.all_reduce(sums)
        sums = sums.tolist()
    hits, ndcgs, users, squares = sums[0], sums[1], int(sums[2]), sums[3]
    n = max(users, 1)
    return {
        "protocol": protocol,
        "k": k,
        "users": users,
        "hr": hits / n,
        "ndcg": ndcgs / n,
        "hr_se": standard_error(hits, hits, users),  # (a hit squared is itself)
        "ndcg_se": standard_error(ndcgs, squares, users),
    }


def compare(ranker, other, split, protocol: str = "sampled", k: int = 10, **kw) -> dict:
    """A paired comparison of two rankers on the same held-out items of ``split``.

    Returns ``{"protocol", "k", "users", "a", "b", "difference"}``: ``a`` and ``b`` the
    ``hr``/``ndcg`` of ``ranker`` and ``other``; ``difference`` those of ``ranker`` minus
    ``other``, each with ``*_se``, the standard error of the mean per-user difference, and
    ``*_ci95``, the mean ± 1.96 standard errors (normal approximation over the users). The users
    both rank alike add nothing to the differences' spread, so the paired standard error is
    smaller than either model's own when the two agree on most users. ``kw`` as in
    :func:`evaluate`.
    """
    k = _check_protocol(protocol, k)
    a_hit, a_ndcg = per_user(_ranks(ranker, split, protocol, k, kw), k)
    b_hit, b_ndcg = per_user(_ranks(other, split, protocol, k, kw), k)
    users = int(a_hit.numel())
    doc = {"protocol": protocol, "k": k, "users": users, "a": {}, "b": {}, "difference": {}}
    for name, a, b in (("hr", a_hit, b_hit), ("ndcg", a_ndcg, b_ndcg)):
        diff = a - b
        mean = diff.mean().item() if users else 0.0
        se = standard_error(diff.sum().item(), (diff * diff).sum().item(), users)
        doc["a"][name] = a.mean().item() if users else 0.0
        doc["b"][name] = b.mean().item() if users else 0.0
        doc["difference"].update(
            {name: mean, f"{name}_se": se, f"{name}_ci95": [mean - 1.96 * se, mean + 1.96 * se]}
        )
    return doc


def _check_protocol(protocol: str, k) -> int:
    """``k`` as an int (a numpy integer too), or ``ValueError``; the same for ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return check_positive_int("k", k)


def check_positive_int(name: str, value) -> int:
    """``value`` as an int if it is an integer >= 1 (a numpy integer too, not a bool), else
    ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_ranker(ranker, split, kw: dict) -> None:
    """A ranker of another catalogue (or user table) than ``split`` would rank ids the split
    does not have, or miss some: ``ValueError``. So for a ``batch_size`` below 1."""
    for name in ("num_items", "num_users"):
        size, want = getattr(ranker, name, None), getattr(split, name, None)
        if isinstance(size, numbers.Integral) and want is not None and size != want:
            raise ValueError(
                f"the ranker has {name}={size} but the split {want}: it was made for other data"
            )
    if kw.get("batch_size") is not None:
        check_positive_int("batch_size", kw["batch_size"])


def _ranks(ranker, split, protocol: str, k: int, kw: dict) -> torch.Tensor:
    """The held-out items' ranks under ``protocol``, the ranker in eval mode meanwhile."""
    _check_ranker(ranker, split, kw)
    was_training = getattr(ranker, "training", False)
    if was_training:
        ranker.eval()
    try:
        if protocol == "sampled":
            return sampled_ranks(ranker, split, **kw)
        return full_ranks(ranker, split, k=k, **kw)
    finally:
        if was_training:
            ranker.train()


def _test_rows(split, rows: slice):
    """A view of ``split`` holding only the test rows ``rows`` (training data shared)."""
    negatives = split.test_negatives
    return SimpleNamespace(
        train=split.train,
        train_csr=split.train_csr,
        known_csr=getattr(split, "known_csr", split.train_csr),
        num_users=split.num_users,
        num_items=split.num_items,
        test_users=split.test_users[rows],
        test_items=split.test_items[rows],
        test_negatives=None if negatives is None else negatives[rows],
    )


class PopularityRanker:
    """The popularity baseline: an item's distance is minus its number of training interactions."""

    def __init__(self, split, device="cpu"):
        items = np.asarray(split.train.items)
        counts = np.zeros(split.num_items, dtype=np.int64)
        for s in range(0, items.size, 1 << 22):  # (bincount copies int32 input to int64)
            counts += np.bincount(items[s : s + (1 << 22)], minlength=split.num_items)
        self.neg_counts = -torch.as_tensor(counts, dtype=torch.float32, device=device)
        self.device = torch.device(device)
        # Every user's ranking is this one order, (distance, id) ascending, less its exclusions.
        self.order = torch.argsort(self.neg_counts, stable=True)
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(self.order.shape[0], device=self.device)

    def distances(self, users, items):
        return self.neg_counts[items]

    def recommend(self, users, k, exclude=None):
        """``(distances [B, k], ids [B, k])`` as :func:`~lrml_kernels.reference.sort_candidates`
        ranks every item (ids −1 and +inf past the items left): the first k positions of the
        global order that the user does not exclude. With the user's excluded positions sorted,
        ``e_0 < e_1 < ...``, the j-th free position is ``j + #{i : e_i − i ≤ j}``; no
        ``[B, items]`` array is formed."""
        k = check_positive_int("k", k)  # (as LRML.recommend)
        B, n = users.shape[0], self.order.shape[0]
        want = torch.arange(k, device=self.device).expand(B, k)
        pos = want
        if exclude is not None and exclude[1].numel() > 0:
            indptr, indices = (t.to(self.device) for t in exclude)
            rows = torch.repeat_interleave(
                torch.arange(B, device=self.device), indptr[1:] - indptr[:-1]
            )
            keys = torch.unique(rows * n + self.position[indices.long()])  # sorted, no repeats
            rows, e = keys // n, keys % n
            counts = torch.bincount(rows, minlength=B)
            starts = torch.cumsum(counts, 0) - counts
            i = torch.arange(keys.shape[0], device=self.device) - starts[rows]
            shifted = torch.full((B, int(counts.max())), n + k, device=self.device)
            shifted[rows, i] = e - i  # non-decreasing along each row
            pos = want + torch.searchsorted(shifted, want.contiguous(), right=True)
        inside = pos < n
        ids = torch.where(inside, self.order[pos.clamp_max(n - 1)], -1)
        dist = torch.where(inside, self.neg_counts[ids.clamp_min(0)], float("inf"))
        return dist, ids


def batch_csr(indptr, indices, users):
    """The rows ``users`` of the CSR ``(indptr, indices)`` as a CSR of their own: ``(indptr
    [len(users)+1], indices)``, int64 (``indices`` may be int32: only the batch's are widened).
    Tensors or numpy arrays (``split.train_csr()``'s); the result is on ``indptr``'s device."""
    indptr, indices = torch.as_tensor(indptr), torch.as_tensor(indices)
    users = torch.as_tensor(users, device=indptr.device)
    check_index_ranges([("users", users, indptr.shape[0] - 1)])
    lo, hi = indptr[users].long(), indptr[users + 1].long()
    lengths = hi - lo
    sub_ptr = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    total = int(sub_ptr[-1])
    if total == 0:
        return sub_ptr, lengths.new_zeros(0)
    starts = torch.repeat_interleave(lo - sub_ptr[:-1], lengths)
    return sub_ptr, indices[starts + torch.arange(total, device=starts.device)].long()


def _device_of(ranker) -> torch.device:
    if isinstance(ranker, torch.nn.Module):
        p = next(ranker.parameters(), None)  # (a module without parameters: the CPU)
        return p.device if p is not None else torch.device("cpu")
    return getattr(ranker, "device", torch.device("cpu"))


__all__ = [
    "PROTOCOLS",
    "PopularityRanker",
    "batch_csr",
    "compare",
    "evaluate",
    "hit_ndcg",
    "full_ranks",
    "per_user",
    "sampled_ranks",
]
