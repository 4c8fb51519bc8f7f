"""``lrml explain``: what the memory slots of a trained LRML model learn, tested with probes.

The paper (Tay et al., WWW 2018) trains on implicit feedback only, yet says its relation vectors
encode explicit sentiment (the rating), temporal information and item attributes. On a model
trained by ``lrml train --data movielens:PATH`` this module tests that:

1. every rated pair of the data, training and held-out pairs alike, gets its attention
   ``a [N]`` and relation ``r = Mᵀa [d]`` from the model's fused backend (:func:`relations`) and
   MovieLens's side information (:func:`lrml_kernels.data.read_movielens_side_info`);
2. linear probes (:func:`probe`: standardised features, scikit-learn logistic regression,
   stratified k-fold, over seeds) predict each target (:func:`targets`) from ``a`` and from
   ``r``, and from the controls: the same labels shuffled (chance), ``p ⊙ q`` (what the
   attention reads), ``p − q`` of the same model, and ``p − q`` of a CML model when one is given;
3. plots: mean attention per slot by rating level, genre and time; a PCA map of ``r``; and each
   slot's most characteristic items;
4. ``report.md``: the tables and a verdict per claim by the rule in :data:`RULE`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrml_kernels import data as lkdata
from lrml_kernels.checkpoints import atomic_write
from lrml_kernels.data.side_info import AGE_GROUPS, GENRES, MovieLensSideInfo
from lrml_kernels.errors import MissingExtra

__all__ = [
    "CLAIMS",
    "FEATURES",
    "PLOTS",
    "RULE",
    "VERDICTS",
    "ProbeResult",
    "Target",
    "claim_verdict",
    "pair_features",
    "plots",
    "probe",
    "probe_targets",
    "relations",
    "run",
    "targets",
]

#: Feature sets of the probes: the model's two, then the controls (``cml`` only with a CML model).
FEATURES = {
    "a": "attention a",
    "r": "relation r",
    "shuffled": "r, labels shuffled",
    "pq": "p ⊙ q",
    "pmq": "p − q",
    "cml": "p − q of CML",
}
MODEL_FEATURES = ("a", "r")
CONTROLS = ("pq", "pmq", "cml")  # the controls a claim must beat (shuffled: chance)
RULE = (
    "For each target, the better of `a` and `r` (by mean AUC) is compared, seed by seed on the "
    "same pairs and folds, with the best control (the highest mean AUC of `p ⊙ q`, `p − q` and, "
    "when given, CML's `p − q`) and with shuffled labels. **holds**: the 95% CI of the paired "
    "difference to the best control (Nadeau and Bengio's corrected resampled t over the seeds, "
    "whose draws overlap) lies above 0. **weak**: it does not, but the 95% CI of the "
    "paired difference to shuffled labels lies above 0 (above chance, no better than the "
    "embeddings). **does not hold**: not even above chance. A claim with several targets (the "
    "rating: two; item attributes: every genre and the release year) takes the verdict that at "
    "least half of its targets reach."
)
VERDICTS = ("holds", "weak", "does not hold")
CLAIMS = {
    "rating": "explicit sentiment (the rating)",
    "time": "temporal information",
    "item": "item attributes",
    "user": "user attributes (not a claim of the paper)",
}
MIN_CLASS = 10  # a class with fewer pairs in a draw is left out of that draw's probe
TOP_ITEMS = 3  # characteristic items listed per slot
MIN_ITEM_PAIRS = 20  # ... among the items with at least this many rated pairs
PLOTS = {
    "rating": "attention-by-rating.png",
    "genre": "attention-by-genre.png",
    "time": "attention-by-time.png",
    "map": "relation-map.png",
}


def relations(model, users, items, *, batch_size: int = 1 << 16):
    """Attention ``a [B, N]`` and relation ``r [B, d]`` of each pair ``(users[b], items[b])``
    from the model's fused backend (:meth:`lrml_kernels.LRML.relations`), ``batch_size`` pairs
    at a time; returned on the CPU. users, items: ``[B]`` integer tensors or arrays."""
    users, items = torch.as_tensor(users), torch.as_tensor(items)
    if users.shape != items.shape or users.dim() != 1:
        raise ValueError(f"users {tuple(users.shape)} and items {tuple(items.shape)}: two [B]")
    device = model.user_emb.device
    a_parts, r_parts = [], []
    for s in range(0, users.shape[0], batch_size):
        a, r = model.relations(
            users[s : s + batch_size].to(device), items[s : s + batch_size].to(device)
        )
        a_parts.append(a.cpu())
        r_parts.append(r.cpu())
    if not a_parts:
        n, d = model.keys.shape
        return torch.zeros(0, n, dtype=model.keys.dtype), torch.zeros(0, d, dtype=model.keys.dtype)
    return torch.cat(a_parts), torch.cat(r_parts)


@torch.no_grad()
def pair_features(model, users, items, cml=None) -> dict[str, np.ndarray]:
    """The probes' features of the pairs (float32 ``[B, f]`` each, keys of :data:`FEATURES`
    except "shuffled"): ``a``, ``r``, ``p ⊙ q``, ``p − q``, and CML's ``p − q`` when ``cml``
    (a model with the same users and items) is given."""
    a, r = relations(model, users, items)
    users, items = torch.as_tensor(users), torch.as_tensor(items)
    p, q = model.user_emb.detach().cpu()[users], model.item_emb.detach().cpu()[items]
    out = {"a": a, "r": r, "pq": p * q, "pmq": p - q}
    if cml is not None:
        out["cml"] = cml.user_emb.detach().cpu()[users] - cml.item_emb.detach().cpu()[items]
    return {k: v.float().numpy() for k, v in out.items()}


@dataclass
class Target:
    """What a probe predicts: ``labels [pairs]`` (int, -1 where the target is undefined) with
    class names ``classes``; ``group``: "user" or "item" keeps each one's pairs in one fold."""

    name: str
    claim: str
    labels: np.ndarray
    classes: tuple[str, ...]
    group: str | None = None


def targets(side: MovieLensSideInfo) -> list[Target]:
    """The probes' targets on MovieLens pairs: the rating (>= 4 against <= 2; all 5 levels),
    early against late in the user's history (liked pairs only, see below), each genre and the
    release year (folds grouped by item), the user's gender, age group and occupation (grouped by
    user)."""
    r = side.ratings.astype(np.int64)
    undefined = np.full(len(side), -1, dtype=np.int64)
    out = [
        Target(
            "rating ≥ 4 vs ≤ 2",
            "rating",
            np.where(r >= 4, 1, np.where(r <= 2, 0, -1)),
            ("≤ 2", "≥ 4"),
        ),
        Target("rating, 5 levels", "rating", r - 1, ("1", "2", "3", "4", "5")),
    ]
    # Early against late in the user's history, among the liked pairs (>= 4) only: in the ML-1M
    # rebuild the ratings <= 3 of the earliest 80% have no timestamp, so that over all ratings the
    # rating would stand in for the time.
    pos = side.history_position
    liked = (r >= 4) & np.isfinite(pos)
    with np.errstate(invalid="ignore"):
        time_labels = np.where(liked & (pos <= 1 / 3), 0, np.where(liked & (pos >= 2 / 3), 1, -1))
    out.append(
        Target(
            "early vs late in history (first vs last third, rating ≥ 4)",
            "time",
            time_labels,
            ("early", "late"),
        )
    )
    item_genres = side.genres[side.items]
    for g, name in enumerate(GENRES):
        if side.genres[:, g].any():
            out.append(
                Target(
                    f"genre: {name}",
                    "item",
                    item_genres[:, g].astype(np.int64),
                    ("other", name),
                    "item",
                )
            )
    years = side.release_years[side.items]
    known = years >= 0
    if known.any():
        cut = int(np.median(years[known]))
        labels = np.where(known, (years >= cut).astype(np.int64), undefined)
        out.append(
            Target(
                f"released in or after {cut}",
                "item",
                labels,
                (f"before {cut}", f"{cut} on"),
                "item",
            )
        )
    users = side.users
    out.append(
        Target("user gender", "user", side.genders[users].astype(np.int64), ("F", "M"), "user")
    )
    out.append(
        Target(
            "user age group", "user", side.age_groups[users].astype(np.int64), AGE_GROUPS, "user"
        )
    )
    out.append(
        Target(
            "user occupation",
            "user",
            side.occupations[users].astype(np.int64),
            side.occupation_names,
            "user",
        )
    )
    return out


def _auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """ROC AUC: of the positive class for two classes; else macro one-vs-rest over the classes
    with both positives and negatives among ``y``."""
    from sklearn.metrics import roc_auc_score

    if classes.size == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    aucs = [
        roc_auc_score(y == c, proba[:, k])
        for k, c in enumerate(classes)
        if 0 < np.count_nonzero(y == c) < y.size
    ]
    return float(np.mean(aucs))


def probe(
    features: dict[str, np.ndarray], y: np.ndarray, *, folds: int, seed: int, groups=None
) -> dict[str, float]:
    """Cross-validated AUC of a logistic-regression probe from each feature set to ``y`` (one
    seed): standardised features, the same stratified ``folds``-fold split for every feature set
    (grouped by ``groups`` when given: a group's rows stay in one fold), the AUC of each held-out
    fold (:func:`_auc`) averaged. "shuffled" (with "r" in ``features``): the probe of ``r`` on
    the labels permuted (seeded), i.e. chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def splits_of(labels: np.ndarray) -> list:
        if groups is None:
            return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, labels))
        cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        return list(cv.split(y, labels, groups))

    rng = np.random.default_rng(seed)
    sets = dict(features)
    labels = dict.fromkeys(sets, y)
    if "r" in sets:
        sets["shuffled"], labels["shuffled"] = sets["r"], rng.permutation(y)
    # folds stratified on the labels probed: the real labels' folds could leave a fold of the
    # permuted ones with one class, whose AUC is NaN (it was shown as "nan ± nan")
    splits = {False: splits_of(y)}
    if "shuffled" in sets:
        splits[True] = splits_of(labels["shuffled"])
    out = {}
    for name, X in sets.items():
        yy = labels[name]
        scores = []
        for train, test in splits[name == "shuffled"]:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            clf.fit(X[train], yy[train])
            scores.append(_auc(yy[test], clf.predict_proba(X[test]), clf.classes_))
        out[name] = float(np.mean(scores))
    return out


def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


@dataclass
class ProbeResult:
    """One target's probes: ``scores[feature]`` holds one AUC per seed (same pairs and folds for
    every feature set of a seed); ``pairs``: the pairs probed per seed (mean); ``folds``: the
    cross-validation's folds.

    The CIs are Nadeau and Bengio's corrected resampled t (Machine Learning 52, 2003): the
    seeds draw their pairs from the same data and train on half of them or more, so their
    scores are correlated and their spread understates the variance; the standard error of the
    mean over J seeds is the spread times ``sqrt(1/J + n_test/n_train)``, ``n_test/n_train =
    1/(folds − 1)``, instead of ``sqrt(1/J)``."""

    target: str
    claim: str
    pairs: float
    scores: dict[str, list[float]] = field(default_factory=dict)
    folds: int = 2

    def mean(self, f: str) -> float:
        return float(np.mean(self.scores[f]))

    def _half_width(self, s: np.ndarray) -> float:
        """Half the 95% CI of the mean of the seeds' scores ``s`` (corrected, as above)."""
        correction = math.sqrt(1 / s.size + 1 / (self.folds - 1))
        return _t95(s.size) * float(s.std(ddof=1)) * correction

    def half_width(self, f: str) -> float:
        """Half the 95% CI of the mean AUC of feature set ``f``."""
        return self._half_width(np.asarray(self.scores[f]))

    def _diff_low(self, f: str, g: str) -> float:
        """Lower end of the 95% CI of the mean paired difference ``f − g`` over the seeds."""
        d = np.asarray(self.scores[f]) - np.asarray(self.scores[g])
        return float(d.mean() - self._half_width(d))

    @property
    def best_model_feature(self) -> str:
        return max(MODEL_FEATURES, key=self.mean)

    @property
    def best_control(self) -> str:
        return max((c for c in CONTROLS if c in self.scores), key=self.mean)

    @property
    def verdict(self) -> str:
        """:data:`RULE` for this target."""
        f = self.best_model_feature
        if self._diff_low(f, self.best_control) > 0:
            return "holds"
        return "weak" if self._diff_low(f, "shuffled") > 0 else "does not hold"


def claim_verdict(results: list[ProbeResult], claim: str) -> str:
    """The verdict at least half of the claim's targets reach (:data:`RULE`)."""
    mine = [r for r in results if r.claim == claim]
    if not mine:
        return "not tested"
    for v in VERDICTS[:-1]:
        reached = sum(VERDICTS.index(r.verdict) <= VERDICTS.index(v) for r in mine)
        if 2 * reached >= len(mine):
            return v
    return VERDICTS[-1]


def _probe_seed(model, side, target_list, seed, max_pairs, folds, cml, results, pairs, bar):
    """One seed of :func:`probe_targets`: its draw, features and probes (into ``results``)."""
    rng = np.random.default_rng(seed)
    pool = np.sort(rng.choice(len(side), size=min(max_pairs, len(side)), replace=False))
    feats = pair_features(model, side.users[pool], side.items[pool], cml)
    owners = {"user": side.users, "item": side.items}
    for t in target_list:
        bar.update()
        y = t.labels[pool]
        counts = np.bincount(y[y >= 0], minlength=len(t.classes))
        if np.count_nonzero(counts >= MIN_CLASS) < 2:
            continue
        rows = np.flatnonzero((y >= 0) & (counts[np.maximum(y, 0)] >= MIN_CLASS))
        groups = None if t.group is None else owners[t.group][pool[rows]]
        if groups is not None:  # a class in fewer groups than folds would miss from a fold
            yr = y[rows]
            spread = [c for c in np.unique(yr) if np.unique(groups[yr == c]).size >= folds]
            if len(spread) < 2:
                continue
            keep = np.isin(yr, spread)
            rows, groups = rows[keep], groups[keep]
        sets = {k: v[rows] for k, v in feats.items()}
        scores = probe(sets, y[rows], folds=folds, seed=seed, groups=groups)
        for k, v in scores.items():
            results[t.name].scores.setdefault(k, []).append(v)
        pairs[t.name].append(rows.size)


def probe_targets(
    model,
    side: MovieLensSideInfo,
    target_list: list[Target],
    *,
    max_pairs: int,
    seeds: int,
    folds: int,
    cml=None,
    progress: bool = True,
) -> list[ProbeResult]:
    """Every target's probes over ``seeds`` seeds. Seed ``s`` draws ``max_pairs`` pairs at
    random (all when fewer), computes their features once, and probes each target on the drawn
    pairs where it is defined (classes with fewer than :data:`MIN_CLASS` of them left out).
    Returns the results of the targets probed at every seed (:func:`not_probed`: the others)."""
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    results = {t.name: ProbeResult(t.name, t.claim, 0.0, folds=folds) for t in target_list}
    pairs = {t.name: [] for t in target_list}
    bar = tqdm(total=seeds * len(target_list), desc="probes", disable=not progress, unit="probe")
    # one BLAS thread: the many small fits lose far more to oversubscription than threads win
    with threadpool_limits(limits=1):
        for seed in range(seeds):
            _probe_seed(model, side, target_list, seed, max_pairs, folds, cml, results, pairs, bar)
    bar.close()
    out = []
    for t in target_list:
        r = results[t.name]
        if len(pairs[t.name]) == seeds:  # probed on every seed
            r.pairs = float(np.mean(pairs[t.name]))
            out.append(r)
    return out


# --- plots ----------------------------------------------------------------------------------------


def _lift(sums: np.ndarray, counts: np.ndarray, overall: np.ndarray) -> np.ndarray:
    """Mean attention per group and slot over the mean over all pairs (NaN for empty groups)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None] / overall[None, :]


def _group_attention(a: np.ndarray, groups: np.ndarray, num_groups: int):
    """``(sums [G, N], counts [G])`` of the attention rows per group id (-1: no group)."""
    ok = groups >= 0
    g = groups[ok]
    sums = np.stack(
        [np.bincount(g, weights=a[ok, n], minlength=num_groups) for n in range(a.shape[1])], axis=1
    )
    return sums, np.bincount(g, minlength=num_groups).astype(np.float64)


def _plot_lift(lift: np.ndarray, rows: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = np.log2(lift)
    span = max(float(np.nanmax(np.abs(log))) if np.isfinite(log).any() else 1.0, 0.05)
    fig, ax = plt.subplots(figsize=(0.32 * lift.shape[1] + 2.8, 0.3 * len(rows) + 1.6))
    im = ax.imshow(log, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
    ax.set_xticks(range(lift.shape[1]))
    ax.set_xticklabels([str(n) for n in range(lift.shape[1])], fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_xlabel("memory slot")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log2 lift of mean attention", shrink=0.8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def _plot_relation_map(model, side: MovieLensSideInfo, path: Path, per_level: int = 1000) -> float:
    """PCA of ``r`` of up to ``per_level`` pairs of each rating, coloured by rating; returns the
    share of the variance the two components explain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    rows = np.concatenate(
        [
            rng.permutation(np.flatnonzero(side.ratings == level))[:per_level]
            for level in range(1, 6)
        ]
    )
    _, r = relations(model, side.users[rows], side.items[rows])
    pca = PCA(2, random_state=0)
    xy = pca.fit_transform(r.float().numpy())
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    cmap = plt.get_cmap("RdYlGn", 5)
    order = rng.permutation(rows.size)  # no rating drawn on top of all the others
    sc = ax.scatter(
        xy[order, 0],
        xy[order, 1],
        c=side.ratings[rows][order],
        cmap=cmap,
        vmin=0.5,
        vmax=5.5,
        s=5,
        alpha=0.6,
        linewidths=0,
    )
    fig.colorbar(sc, ax=ax, ticks=range(1, 6), label="rating")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    share = float(pca.explained_variance_ratio_.sum())
    ax.set_title(
        f"relation vectors r, PCA ({share:.0%} of variance), {per_level} pairs per rating",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return share


def _attention_all(model, side: MovieLensSideInfo) -> np.ndarray:
    """``a [pairs, N]`` (float32) of every rated pair."""
    return relations(model, side.users, side.items)[0].float().numpy()


def plots(model, side: MovieLensSideInfo, out: Path) -> dict:
    """The attention heatmaps, the relation map and each slot's characteristic items; returns
    what the report needs (slot table, PCA variance share)."""
    a = _attention_all(model, side)
    overall = a.mean(axis=0)
    N = a.shape[1]
    sums, counts = _group_attention(a, side.ratings.astype(np.int64) - 1, 5)
    _plot_lift(
        _lift(sums, counts, overall),
        [f"rating {k}" for k in range(1, 6)],
        "mean attention per slot by rating, over its mean over all pairs",
        out / PLOTS["rating"],
    )
    item_sums, item_counts = _group_attention(a, side.items, side.genres.shape[0])
    genre_sums = side.genres.T.astype(np.float64) @ item_sums
    genre_counts = side.genres.T.astype(np.float64) @ item_counts
    present = genre_counts > 0
    _plot_lift(
        _lift(genre_sums[present], genre_counts[present], overall),
        [g for g, p in zip(GENRES, present, strict=True) if p],
        "mean attention per slot by genre, over its mean over all pairs",
        out / PLOTS["genre"],
    )
    pos = side.history_position
    liked = (side.ratings >= 4) & np.isfinite(pos)
    bucket = np.where(liked, np.minimum((np.nan_to_num(pos) * 5).astype(np.int64), 4), -1)
    sums, counts = _group_attention(a, bucket, 5)
    _plot_lift(  # over the liked pairs' own mean: the rating's effect is not the time's
        _lift(sums, counts, a[liked].mean(axis=0)),
        [f"history {20 * k}-{20 * k + 20}%" for k in range(5)],
        "mean attention per slot by position in the user's history, over its mean over the "
        "pairs rated ≥ 4",
        out / PLOTS["time"],
    )
    share = _plot_relation_map(model, side, out / PLOTS["map"])

    # each slot: attention-weighted mean rating, its most lifted genre and items
    slot_rating = (a * side.ratings[:, None]).sum(axis=0) / a.sum(axis=0)
    genre_lift = _lift(genre_sums, genre_counts, overall)
    item_lift = _lift(item_sums, item_counts, overall)
    eligible = item_counts >= MIN_ITEM_PAIRS
    slots = []
    for n in range(N):
        g = int(np.nanargmax(np.where(present, genre_lift[:, n], -np.inf)))
        items = np.flatnonzero(eligible)
        top = items[np.argsort(-item_lift[items, n], kind="stable")[:TOP_ITEMS]]
        slots.append(
            {
                "slot": n,
                "mean_attention": float(overall[n]),
                "mean_rating": float(slot_rating[n]),
                "top_genre": f"{GENRES[g]} ({genre_lift[g, n]:.2f}×)",
                "items": [f"{side.titles[i]} ({item_lift[i, n]:.1f}×)" for i in top],
            }
        )
    entropy = -(a * np.log(np.maximum(a, np.finfo(np.float32).tiny))).sum(axis=1)
    return {
        "slots": slots,
        "pca_variance": share,
        "mean_rating": float(side.ratings.mean()),
        "attention_entropy": float(entropy.mean()),
        "attention_max": float(a.max(axis=1).mean()),
        "slots_n": N,
    }


# --- the run and its report -----------------------------------------------------------------------


def _load(checkpoint, data_spec, device, backend):
    """(model, checkpoint, split, side info), every mismatch a clear error before any work."""
    from lrml_kernels.training import load_checkpoint_data, open_checkpoint

    model, ckpt = open_checkpoint(checkpoint, device, backend)
    if model.relation == "none":
        raise ValueError(
            f"{checkpoint} is a CML model (relation 'none'): it has no memory to explain; give it "
            "as the control --cml of an LRML model"
        )
    spec = data_spec or ckpt["config"].get("data")
    if not isinstance(spec, str) or not spec.startswith("movielens:"):
        raise ValueError(
            f"lrml explain reads MovieLens side information: --data must be movielens:PATH "
            f"(the data the checkpoint was trained on), got {spec!r}"
        )
    spec, split = load_checkpoint_data(ckpt, spec)
    if (split.num_users, split.num_items) != (model.num_users, model.num_items):
        raise ValueError(
            f"{checkpoint} has {model.num_users:,} users x {model.num_items:,} items, {spec} "
            f"{split.num_users:,} x {split.num_items:,}: not the data this model was trained on"
        )
    if ckpt.get("data_fingerprint") not in (None, split.fingerprint()):
        raise ValueError(
            f"{spec!r} is not the data {checkpoint} was trained on (fingerprints differ)"
        )
    side = lkdata.read_movielens_side_info(
        Path(spec.partition(":")[2]).expanduser(), split, ckpt["config"].get("min_rating")
    )
    return model, ckpt, split, side


def _load_cml(path, ckpt, spec, split, device):
    """The CML model of checkpoint ``path``, trained on the training data of ``split`` (data
    set ``spec``, as the model ``ckpt`` split it). Its evaluation split may differ: another
    ``--seed`` or ``--eval-negatives`` draws other negatives from the same training data."""
    from lrml_kernels.training import load_checkpoint, load_checkpoint_data

    cml, cml_ckpt = load_checkpoint(path, device)
    if cml.relation != "none":
        raise ValueError(
            f"--cml {path}: a CML model (lrml train --relation none) expected, got relation "
            f"{cml.relation!r}"
        )
    if cml_ckpt.get("data_fingerprint") == ckpt.get("data_fingerprint"):
        return cml
    try:  # its split rebuilt as trained, checked against its own fingerprint
        cml_split = load_checkpoint_data(cml_ckpt, spec)[1]
        same = cml_split.fingerprint() == cml_ckpt.get("data_fingerprint") and (
            cml_split.train.fingerprint() == split.train.fingerprint()
        )
    except ValueError:
        same = False
    if not same:
        raise ValueError(
            f"--cml {path} was trained on other training data than the model (e.g. another "
            "data set, --min-rating or --select-on)"
        )
    return cml


def _date_range(timestamps: np.ndarray) -> str:
    """``"rated 2000-04-25 to 2003-02-28, 66% with a time"`` (UTC dates)."""
    known = timestamps[timestamps != lkdata.MISSING_TIMESTAMP]
    if not known.size:
        return "no rating has a time"
    first, last = (np.datetime64(int(t), "s").astype("M8[D]") for t in (known.min(), known.max()))
    return f"rated {first} to {last}, {known.size / timestamps.size:.0%} with a time"


def _fmt(r: ProbeResult, f: str) -> str:
    return f"{r.mean(f):.3f} ± {r.half_width(f):.3f}" if f in r.scores else "–"


def not_probed(target_list: list[Target], results: list[ProbeResult]) -> list[Target]:
    """The targets :func:`probe_targets` left out: too few pairs in some seed's draw."""
    probed = {r.target for r in results}
    return [t for t in target_list if t.name not in probed]


#: Why a target is not probed (:func:`not_probed`), for the report.
NOT_PROBED_RULE = (
    f"in every seed's draw a target needs at least {MIN_CLASS} pairs in each of two or more "
    "classes (for a target grouped by item or user, pairs of at least as many items or users as "
    "there are folds); more pairs (`--max-pairs`) or a larger data set may reach it"
)


def _report(
    info: dict, results: list[ProbeResult], skipped: list[Target], figures: dict, out: Path
) -> str:
    feats = [
        f for f in ("a", "r", "shuffled", "pq", "pmq", "cml") if any(f in r.scores for r in results)
    ]
    lines = [
        "# What the memory slots learn",
        "",
        f"Model `{info['checkpoint']}` ({info['model']}), data `{info['data']}` "
        f"({info['release']}: "
        f"{info['pairs']:,} rated pairs, {info['held_out']:,} of them not trained on; "
        f"{info['dates']}). "
        f"Probes: {info['seeds']} seeds x {info['folds']}-fold stratified cross-validation, up to "
        f"{info['max_pairs']:,} pairs drawn per seed. Time: {info['seconds']['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in info['seconds'].items() if k != 'total')}).",
        "",
        "## Verdicts",
        "",
        "| claim of the paper | verdict | evidence |",
        "|---|---|---|",
    ]
    for claim, what in CLAIMS.items():
        mine = [r for r in results if r.claim == claim]
        left = sum(t.claim == claim for t in skipped)
        if not mine and not left:
            continue
        counts = {v: sum(r.verdict == v for r in mine) for v in VERDICTS}
        evidence = (
            ", ".join(f"{n} {v}" for v, n in counts.items() if n) + f" of {len(mine)} target(s)"
        )
        if 0 < len(mine) <= 2:
            evidence = "; ".join(
                f"{r.target}: {FEATURES[r.best_model_feature]} {_fmt(r, r.best_model_feature)} vs "
                f"{FEATURES[r.best_control]} {_fmt(r, r.best_control)}"
                for r in mine
            )
        if left:
            skip = f"{left} target(s) not probed: too few pairs"
            evidence = f"{evidence} ({skip})" if mine else skip
        lines.append(f"| {what} | **{claim_verdict(results, claim)}** | {evidence} |")
    lines += [
        "",
        f"Rule: {RULE}",
        "",
        "## Probe results",
        "",
        "ROC AUC (chance 0.5; macro one-vs-rest over the classes for multi-class targets), mean ± "
        "95% CI half-width over the seeds. Features are standardised; the probe is scikit-learn's "
        "`LogisticRegression` (L2, C = 1). Folds of user targets keep each user's pairs together, "
        "folds of item targets each item's, so a probe cannot pass by recognising a user or item "
        f"it was fitted on. `p − q` comes from {info['pmq_source']}.",
        "",
        "| target | pairs / seed | " + " | ".join(FEATURES[f] for f in feats) + " | verdict |",
        "|---|---:|" + "---:|" * len(feats) + "---|",
    ]
    for r in results:
        cells = " | ".join(_fmt(r, f) for f in feats)
        lines.append(f"| {r.target} | {r.pairs:,.0f} | {cells} | {r.verdict} |")
    if skipped:
        lines += [
            "",
            f"Not probed: {', '.join(t.name for t in skipped)} ({NOT_PROBED_RULE}).",
        ]
    lines += [
        "",
        "Notes:",
        "- `r = Mᵀa` is a linear map of `a`; with d ≥ N it loses nothing a linear probe could use, "
        "so the probes of `a` and `r` differ by the standardisation and the regularisation only.",
        "- `a = softmax(K (p ⊙ q))` reads only `p ⊙ q`: a linear probe of `p ⊙ q` sees everything "
        "the attention sees (d dimensions against N).",
        "- Early vs late: the rating's position among the user's timestamped ratings; only ratings "
        "≥ 4 are probed, because in the ML-1M rebuild the ratings ≤ 3 of the earliest 80% have no "
        "timestamp, so that over all ratings lateness would stand in for a low rating.",
        "",
        "## Plots",
        "",
        f"![attention by rating]({PLOTS['rating']})",
        "",
        f"![attention by genre]({PLOTS['genre']})",
        "",
        f"![attention by time]({PLOTS['time']})",
        "",
        f"![relation map]({PLOTS['map']})",
        "",
        "Heatmaps: mean attention of the slot over the pairs of the row, divided by its mean over "
        "all pairs (log2 scale; red: the slot attends more to these pairs). Map: the first two "
        f"principal components of `r` ({figures['pca_variance']:.0%} of its variance).",
        "",
        f"How peaked the attention is: mean entropy {figures['attention_entropy']:.3f} nats "
        f"(uniform over the {figures['slots_n']} slots: {math.log(figures['slots_n']):.3f}); "
        f"mean largest weight {figures['attention_max']:.3f} (uniform: "
        f"{1 / figures['slots_n']:.3f}).",
        "",
        "## The slots and their most characteristic items",
        "",
        f"Items: the {TOP_ITEMS} with the highest lift of the slot's mean attention among items "
        f"with at least {MIN_ITEM_PAIRS} rated pairs. Mean rating: attention-weighted (all pairs: "
        f"{figures['mean_rating']:.2f}).",
        "",
        "| slot | mean a | mean rating | top genre (lift) | characteristic items (lift) |",
        "|---:|---:|---:|---|---|",
    ]
    for s in figures["slots"]:
        items = "; ".join(s["items"]) or f"(no item with ≥ {MIN_ITEM_PAIRS} pairs)"
        lines.append(
            f"| {s['slot']} | {s['mean_attention']:.3f} | {s['mean_rating']:.2f} | "
            f"{s['top_genre']} | {items} |"
        )
    lines += ["", f"Reproduce: `{info['command']}`", ""]
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda f: f.write(text.encode("utf-8")))
    return text


def _finite_or_null(x):
    """``x`` with every NaN/inf float None (null: JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


def run(
    checkpoint,
    out,
    *,
    data: str | None = None,
    max_pairs: int = 50_000,
    seeds: int = 5,
    folds: int = 2,
    cml=None,
    device: str = "cpu",
    backend: str | None = None,
    progress: bool = True,
) -> dict:
    """``lrml explain``: probes, plots and ``report.md`` (plus ``probes.json``) in ``out``.

    Args:
        checkpoint: a ``checkpoint.pt`` of ``lrml train --data movielens:PATH``.
        data: ``movielens:PATH`` (default: the checkpoint's); must be the data it trained on.
        max_pairs: pairs drawn per seed for the probes (all pairs go into the plots).
        seeds: seeds of the draws and folds (at least 2: the CIs come from them).
        folds: folds of the cross-validation (at least 2).
        cml: a checkpoint of ``lrml train --relation none`` on the same data: its ``p − q`` is a
            control too.
    Returns a summary (verdicts per claim and per target, the AUCs, the targets not probed,
    times).
    """
    try:
        import matplotlib  # noqa: F401  (the plots, drawn after the probes)
        import sklearn  # noqa: F401
    except ImportError as exc:
        missing = "scikit-learn" if exc.name == "sklearn" else exc.name
        raise MissingExtra(
            f"lrml explain needs scikit-learn and matplotlib ({missing} is not installed): "
            "pip install 'lrml_kernels[explain]'"
        ) from None
    for name, value, low in (
        ("max_pairs", max_pairs, 1000),  # a class needs MIN_CLASS pairs in every draw
        ("seeds", seeds, 2),
        ("folds", folds, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            flag = "--" + name.replace("_", "-")  # (the command line's name beside the API's)
            raise ValueError(f"{name} ({flag}) must be an integer >= {low}, got {value!r}")
    seconds = {}
    start = time.perf_counter()
    model, ckpt, split, side = _load(checkpoint, data, device, backend)
    spec = data or ckpt["config"]["data"]
    cml_model = None if cml is None else _load_cml(cml, ckpt, spec, split, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds["load"] = time.perf_counter() - start
    t = time.perf_counter()
    target_list = targets(side)
    results = probe_targets(
        model,
        side,
        target_list,
        max_pairs=max_pairs,
        seeds=seeds,
        folds=folds,
        cml=cml_model,
        progress=progress,
    )
    seconds["probes"] = time.perf_counter() - t
    t = time.perf_counter()
    figures = plots(model, side, out)
    seconds["plots"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    command = (
        f"lrml explain {checkpoint} --data {spec} --out {out} --max-pairs {max_pairs} "
        f"--seeds {seeds} --folds {folds}"
    )
    info = {
        "checkpoint": str(checkpoint),
        "model": f"{model.relation} relation, d = {model.keys.shape[1]}, N = {model.keys.shape[0]}",
        "data": spec,
        "release": side.release,
        "pairs": len(side),
        "held_out": int(side.held_out.sum()),
        "dates": _date_range(side.timestamps),
        "seeds": seeds,
        "folds": folds,
        "max_pairs": max_pairs,
        "seconds": seconds,
        "pmq_source": "the same model"
        + (
            "; `p − q of CML` from the CML model `" + str(cml) + "` (lrml train --relation none)"
            if cml
            else " (no CML model given: `--cml CHECKPOINT` adds one)"
        ),
        "command": command + (f" --cml {cml}" if cml else ""),
    }
    skipped = not_probed(target_list, results)
    _report(info, results, skipped, figures, out)
    summary = {
        "claims": {c: claim_verdict(results, c) for c in CLAIMS},
        "targets": {
            r.target: {"claim": r.claim, "verdict": r.verdict, "pairs": r.pairs, "auc": r.scores}
            for r in results
        },
        "not_probed": [t.name for t in skipped],
        "attention": {
            "mean_entropy": figures["attention_entropy"],
            "uniform_entropy": math.log(figures["slots_n"]),
            "mean_max": figures["attention_max"],
        },
        "seconds": seconds,
    }
    text = json.dumps(_finite_or_null(summary), indent=2, ensure_ascii=False, allow_nan=False)
    text = text.encode("utf-8")
    atomic_write(out / "probes.json", lambda f: f.write(text))
    return summary
