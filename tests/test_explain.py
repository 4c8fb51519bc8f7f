"""``lrml explain``: the fused relations against the reference, the MovieLens side information in
the model's ids, probes that find a planted label and nothing where none is planted, and the
command's report and plots."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

import lrml_kernels as lk
from lrml_kernels import cli, explain, reference
from lrml_kernels import data as lkdata
from lrml_kernels.training import TrainConfig, fit, load_checkpoint

pytest.importorskip("sklearn")

GENRE_CYCLE = ("Action", "Comedy|Romance", "Drama", "Horror|Thriller", "Children's|Animation")


def user_id(u: int) -> int:  # original ids with gaps: the model's indices are not the ids
    return 3 * u + 7


def item_id(i: int) -> int:
    return 5 * i + 2


def write_movielens(folder, *, planted: bool, users=300, items=300, clusters=10, seed=0):
    """An ML-1M-format folder (ratings.dat, movies.dat, users.dat). Every user rates 12 items of
    its own taste cluster (``user % clusters``) and 6 items of other clusters. ``planted``: the
    own-cluster items get 5 stars and the others 1, so the rating is a relation between user and
    item that the implicit data carries (the co-occurrence of a cluster's items); else every
    rating is 1 or 5 at random, whatever the pair. Returns ``in_cluster`` per rated (original
    user id, original item id) pair: the planted structure, in the data either way."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cluster = np.arange(items) % clusters
    lines, in_cluster = [], {}
    for u in range(users):
        own = rng.choice(np.flatnonzero(cluster == u % clusters), 12, replace=False)
        other = rng.choice(np.flatnonzero(cluster != u % clusters), 6, replace=False)
        for t, i in enumerate(rng.permutation(np.concatenate((own, other)))):
            mine = bool(cluster[i] == u % clusters)
            stars = (5 if mine else 1) if planted else int(rng.choice([1, 5]))
            lines.append(f"{user_id(u)}::{item_id(i)}::{stars}::{978_300_000 + 3600 * u + 60 * t}")
            in_cluster[(user_id(u), item_id(i))] = mine
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    movies = "".join(
        f"{item_id(i)}::Movie {i} ({1950 + i % 50})::{GENRE_CYCLE[i % len(GENRE_CYCLE)]}\n"
        for i in range(items)
    )
    (folder / "movies.dat").write_text(movies, encoding="latin-1")
    people = "".join(
        f"{user_id(u)}::{'FM'[u % 2]}::{(1, 18, 25, 35)[u % 4]}::{u % 21}::55455\n"
        for u in range(users)
    )
    (folder / "users.dat").write_text(people)
    return in_cluster


@pytest.fixture
def one_thread():
    """The tiny trainings and probes run on one thread (the 2-core CI runs other jobs too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(folder, out, epochs=10):
    # The relation learns at the embeddings' rate (relation_lr_scale=1.0): at the default 0.01 it
    # takes up the planted structure too slowly for 10 epochs (probe AUC 0.56-0.58, not > 0.7),
    # and what is tested here is the probe, not the default training.
    cfg = TrainConfig(
        data=f"movielens:{folder}",
        epochs=epochs,
        dim=16,
        memory_slots=4,
        batch_size=64,
        lr=0.05,
        relation_lr_scale=1.0,
        eval="none",
        progress=False,
    )
    fit(cfg, out)
    return out / "checkpoint.pt"


def probe_auc(model, side, target, seeds=3) -> tuple[float, float]:
    """(mean AUC of r, mean AUC of r on shuffled labels) over ``seeds`` seeds."""
    (result,) = explain.probe_targets(
        model, side, [target], max_pairs=10_000, seeds=seeds, folds=2, progress=False
    )
    return result.mean("r"), result.mean("shuffled")


def load_side(folder):
    split = lkdata.load(f"movielens:{folder}")
    return lkdata.read_movielens_side_info(folder, split), split


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in lk.available_backends()])
def test_relations_match_the_reference(backend):
    torch.manual_seed(0)
    model = lk.LRML(50, 70, dim=37, memory_slots=11, backend=backend)
    with torch.no_grad():
        for t in (model.user_emb, model.item_emb, model.keys):
            t.mul_(4.0)  # peaked attention: the softmax is exercised, not only its average
    users = torch.randint(0, 50, (1000,))
    items = torch.randint(0, 70, (1000,))
    a, r = explain.relations(model, users, items, batch_size=256)  # 4 batches, the last short
    p, q = model.user_emb.detach()[users], model.item_emb.detach()[items]
    want_a = reference.attention(p, q, model.keys.detach())
    want_r = reference.relation_vectors(p, q, model.keys.detach(), model.memory.detach())
    assert a.shape == (1000, 11) and r.shape == (1000, 37)
    assert float(a.max()) > 0.5  # the attention really is peaked somewhere
    torch.testing.assert_close(a, want_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r, want_r, atol=1e-5, rtol=1e-4)
    empty_a, empty_r = explain.relations(model, users[:0], items[:0])
    assert empty_a.shape == (0, 11) and empty_r.shape == (0, 37)


def test_side_info_follows_the_training_ids(tmp_path):
    in_cluster = write_movielens(tmp_path, planted=True, users=40, items=150)
    side, split = load_side(tmp_path)
    lines = (tmp_path / "ratings.dat").read_text().split()
    raw = np.array([line.split("::") for line in lines], dtype=np.int64)
    # every rated pair once, in file order, through the split's own id mapping
    assert len(side) == raw.shape[0] == len(split.train) + split.test_users.size
    np.testing.assert_array_equal(split.train.user_ids[side.users], raw[:, 0])
    np.testing.assert_array_equal(split.train.item_ids[side.items], raw[:, 1])
    np.testing.assert_array_equal(side.ratings, raw[:, 2])
    stars = np.array([5 if in_cluster[(u, i)] else 1 for u, i in raw[:, :2]])
    np.testing.assert_array_equal(side.ratings, stars)
    # the held-out pairs are the split's test pairs, each user's latest
    held = set(zip(split.test_users.tolist(), split.test_items.tolist(), strict=True))
    assert {(int(u), int(i)) for u, i in zip(side.users, side.items, strict=True)} >= held
    assert side.held_out.sum() == len(held)
    assert np.all(side.history_position[side.held_out] == 1.0)
    # items and users: title, year, genres, gender, age group, occupation of the original id
    i = int(np.searchsorted(split.train.item_ids, item_id(8)))
    assert side.titles[i] == "Movie 8 (1958)" and side.release_years[i] == 1958
    genres = [g for g, on in zip(lkdata.side_info.GENRES, side.genres[i], strict=True) if on]
    assert genres == ["Horror", "Thriller"]
    u = int(np.searchsorted(split.train.user_ids, user_id(5)))
    assert (side.genders[u], side.age_groups[u], side.occupations[u]) == (1, 1, 5)


def test_side_info_of_a_model_trained_with_min_rating(tmp_path):
    # 5 stars inside the user's cluster, 1 outside: min_rating 4 keeps the 5-star pairs, and
    # items rated 1 star by every user who rated them are not in the split at all
    write_movielens(tmp_path, planted=True, users=40, items=150)
    with open(tmp_path / "ratings.dat", "a") as f:  # a user and an item with one 1-star rating
        f.write(f"{user_id(0)}::{item_id(999)}::1::978300000\n{user_id(999)}::{item_id(0)}::1::0\n")
    cfg = TrainConfig(data=f"movielens:{tmp_path}", min_rating=4, epochs=1, dim=8,
                      memory_slots=4, eval="none", progress=False)  # fmt: skip
    fit(cfg, tmp_path / "run")
    _, _, split, side = explain._load(tmp_path / "run" / "checkpoint.pt", None, "cpu", None)
    raw = np.array([ln.split("::") for ln in (tmp_path / "ratings.dat").read_text().split()])
    raw = raw.astype(np.int64)
    has = np.isin(raw[:, 0], split.train.user_ids) & np.isin(raw[:, 1], split.train.item_ids)
    assert has.sum() == raw.shape[0] - 2
    # every pair of the split's users and items, in file order, the 1-star ones not trained on
    np.testing.assert_array_equal(split.train.user_ids[side.users], raw[has, 0])
    np.testing.assert_array_equal(split.train.item_ids[side.items], raw[has, 1])
    np.testing.assert_array_equal(side.ratings, raw[has, 2])
    low = side.ratings < 4
    pairs = side.users * split.num_items + side.items
    test = np.isin(pairs, split.test_users.astype(np.int64) * split.num_items + split.test_items)
    assert low.any() and test.sum() == split.test_users.size
    np.testing.assert_array_equal(side.held_out, low | test)
    # read as if every rating were a positive, the same file is not the model's data
    with pytest.raises(ValueError, match="not the data this model was trained on"):
        lkdata.read_movielens_side_info(tmp_path, split)


def test_side_info_errors(tmp_path):
    write_movielens(tmp_path / "a", planted=True, users=20, items=150)
    split = lkdata.load(f"movielens:{tmp_path / 'a'}")
    write_movielens(tmp_path / "b", planted=True, users=25, items=150)
    with pytest.raises(ValueError, match="not the data this model was trained on"):
        lkdata.read_movielens_side_info(tmp_path / "b", split)
    (tmp_path / "a" / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match="movies.dat \\+ users.dat"):
        lkdata.read_movielens_side_info(tmp_path / "a", split)


@pytest.mark.skipif(not (SHARED_DATA / "movielens-100k").is_dir(), reason="no ../shared/data")
def test_side_info_of_movielens_100k():
    side, split = load_side(SHARED_DATA / "movielens-100k")
    assert len(side) == 100_000 and side.release == "ML-100K"
    # u.data's first row: user 196 rated item 242 (Kolya, 1996, Comedy) 3 stars
    assert split.train.user_ids[side.users[0]] == 196
    assert split.train.item_ids[side.items[0]] == 242 and side.ratings[0] == 3
    i = side.items[0]
    assert side.titles[i] == "Kolya (1996)" and side.release_years[i] == 1996
    assert [g for g, on in zip(lkdata.side_info.GENRES, side.genres[i], strict=True) if on] == [
        "Comedy"
    ]
    u = int(np.searchsorted(split.train.user_ids, 1))  # 1|24|M|technician|85711
    assert side.genders[u] == 1 and side.age_groups[u] == 1
    assert side.occupation_names[side.occupations[u]] == "technician"
    assert np.isfinite(side.history_position).all()


def test_planted_rating_is_recovered_from_the_relations(tmp_path, one_thread):
    """The rating is planted as a relation (own taste cluster: 5, elsewhere: 1): the trained
    model's relation vectors give it away. The same probe of the untrained model (the same
    initialisation) stays at chance, so it is the training that put it there."""
    write_movielens(tmp_path, planted=True)
    model, _ = load_checkpoint(train(tmp_path, tmp_path / "run"))
    side, _ = load_side(tmp_path)
    target = explain.targets(side)[0]
    assert target.name == "rating ≥ 4 vs ≤ 2"
    auc, chance = probe_auc(model, side, target)
    assert auc > 0.7, auc
    assert abs(chance - 0.5) < 0.05, chance
    torch.manual_seed(0)
    untrained = lk.LRML(model.num_users, model.num_items, 16, 4)
    assert probe_auc(untrained, side, target)[0] < 0.6


def test_probe_stays_at_chance_without_planted_structure(tmp_path, one_thread):
    """Same interactions, ratings at random: the probe of the rating stays at chance, while on
    the same model it recovers the structure the interactions do carry (own cluster or not), so
    a probe that could find something finds nothing in the rating."""
    in_cluster = write_movielens(tmp_path, planted=False)
    model, _ = load_checkpoint(train(tmp_path, tmp_path / "run"))
    side, split = load_side(tmp_path)
    auc, _ = probe_auc(model, side, explain.targets(side)[0])
    assert abs(auc - 0.5) < 0.04, auc
    raw = zip(split.train.user_ids[side.users], split.train.item_ids[side.items], strict=True)
    labels = np.array([in_cluster[(int(u), int(i))] for u, i in raw], dtype=np.int64)
    structure = explain.Target("own cluster", "rating", labels, ("other", "own"))
    assert probe_auc(model, side, structure)[0] > 0.7


def test_lrml_explain_writes_report_and_plots(tmp_path, capsys, one_thread):
    data = tmp_path / "ml"
    write_movielens(data, planted=True, users=120, items=150)
    movies = (data / "movies.dat").read_text(encoding="latin-1").splitlines(keepends=True)
    movies[0] = movies[0].rsplit("::", 1)[0] + "::Documentary\n"  # a genre of one item
    (data / "movies.dat").write_text("".join(movies), encoding="latin-1")
    ckpt = train(data, tmp_path / "run", epochs=2)
    out = tmp_path / "explain"
    argv = ["explain", str(ckpt), "--out", str(out), "--seeds", "2", "--max-pairs", "1500"]
    assert cli.main([*argv, "--no-progress"]) == 0
    claims = json.loads(capsys.readouterr().out)
    assert set(claims) == set(explain.CLAIMS)
    assert all(v in (*explain.VERDICTS, "not tested") for v in claims.values())
    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Verdicts", "## Probe results", "## Plots", "characteristic items"):
        assert heading in report
    assert "| rating ≥ 4 vs ≤ 2 |" in report and "| genre: Comedy |" in report
    for name in explain.PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
    doc = json.loads((out / "probes.json").read_text(encoding="utf-8"))
    assert len(doc["targets"]["user gender"]["auc"]["r"]) == 2  # one AUC per seed
    # every target is reported: probed, or listed as not probed (too few pairs in a draw)
    side = explain._load(ckpt, None, "cpu", None)[3]
    names = [t.name for t in explain.targets(side)]
    assert sorted([*doc["targets"], *doc["not_probed"]]) == sorted(names)
    assert doc["not_probed"] == ["genre: Documentary"]  # one item cannot fill 2 folds
    assert "Not probed: genre: Documentary (in every seed's draw" in report
    # clear errors, before any work: other data, missing side files, a CML model that is not one
    other = tmp_path / "other"
    write_movielens(other, planted=True, users=100, items=150)
    assert cli.main([*argv, "--data", f"movielens:{other}"]) == 2
    assert "not the data this model was trained on" in capsys.readouterr().err
    assert cli.main([*argv, "--cml", str(ckpt)]) == 2
    assert "a CML model (lrml train --relation none) expected" in capsys.readouterr().err
    assert cli.main([*argv, "--backend", "cuda"]) == 2  # (no CUDA here, or not the data's device)
    assert "cuda" in capsys.readouterr().err
    assert cli.main([*argv, "--max-pairs", "999"]) == 2  # (the error named max_pairs alone)
    assert "max_pairs (--max-pairs) must be an integer >= 1000, got 999" in capsys.readouterr().err
    cfg = TrainConfig(data=f"movielens:{data}", epochs=1, dim=8, relation="none", progress=False)
    fit(cfg, tmp_path / "cml")
    assert cli.main(["explain", str(tmp_path / "cml" / "checkpoint.pt"), "--out", str(out)]) == 2
    assert "is a CML model (relation 'none'): it has no memory to explain" in (
        capsys.readouterr().err
    )
    # a CML control: the same training data, though another seed drew other test negatives
    # (accepted); a CML model of other training data (refused)
    cfg.seed = 1
    fit(cfg, tmp_path / "cml1")
    assert lkdata.load(f"movielens:{data}", seed=1).fingerprint() != (
        explain._load(ckpt, None, "cpu", None)[2].fingerprint()
    )
    assert (
        cli.main([*argv, "--no-progress", "--cml", str(tmp_path / "cml1" / "checkpoint.pt")]) == 0
    )
    assert set(json.loads(capsys.readouterr().out)) == set(explain.CLAIMS)
    assert "`p − q of CML` from the CML model" in (out / "report.md").read_text(encoding="utf-8")
    cfg = TrainConfig(data=f"movielens:{other}", epochs=1, dim=8, relation="none", progress=False)
    fit(cfg, tmp_path / "cml_other")
    assert cli.main([*argv, "--cml", str(tmp_path / "cml_other" / "checkpoint.pt")]) == 2
    assert "trained on other training data than the model" in capsys.readouterr().err
    (data / "movies.dat").unlink()
    assert cli.main(argv) == 2
    assert "no MovieLens side information" in capsys.readouterr().err


def test_verdicts_follow_the_stated_rule():
    noise = np.array([0.004, -0.003, 0.001, -0.002, 0.0])

    def result(model, control, claim="item"):
        scores = {"a": model + noise, "r": model - noise, "shuffled": 0.5 - noise}
        scores |= {"pq": control + noise[::-1], "pmq": control - 0.05 + noise}
        return explain.ProbeResult("t", claim, 100.0, {k: list(v) for k, v in scores.items()})

    assert result(0.70, 0.65).verdict == "holds"  # beats the best control by more than noise
    assert result(0.70, 0.70).verdict == "weak"  # above chance, no better than the control
    assert result(0.60, 0.80).verdict == "weak"
    assert result(0.501, 0.80).verdict == "does not hold"  # within the noise of chance
    mixed = [result(0.70, 0.65), result(0.70, 0.70), result(0.501, 0.8), result(0.5, 0.8)]
    assert explain.claim_verdict(mixed, "item") == "weak"  # half of them at least weak
    assert explain.claim_verdict(mixed[:3], "item") == "weak"
    assert explain.claim_verdict(mixed[:1] + mixed[2:], "item") == "does not hold"
    assert explain.claim_verdict(mixed[:2], "item") == "holds"
    assert explain.claim_verdict(mixed, "time") == "not tested"


def test_the_verdicts_ci_is_the_corrected_resampled_t():
    # Nadeau and Bengio: the seeds' spread times sqrt(1/J + 1/(folds - 1)), not sqrt(1/J)
    r = explain.ProbeResult("t", "rating", 0.0, folds=2)
    r.scores = {"r": [0.60, 0.62, 0.61, 0.63, 0.64], "pq": [0.55, 0.58, 0.56, 0.57, 0.59]}
    d = np.array(r.scores["r"]) - np.array(r.scores["pq"])
    t95 = 2.7764451051977987  # Student t, 4 degrees of freedom
    want = d.mean() - t95 * d.std(ddof=1) * np.sqrt(1 / 5 + 1)
    assert r._diff_low("r", "pq") == pytest.approx(want)
    assert r.half_width("r") == pytest.approx(t95 * np.std(r.scores["r"], ddof=1) * np.sqrt(1.2))
    r3 = explain.ProbeResult("t", "rating", 0.0, folds=3, scores=r.scores)
    assert r3.half_width("r") == pytest.approx(t95 * np.std(r.scores["r"], ddof=1) * np.sqrt(0.7))


def test_a_grouped_class_in_fewer_groups_than_folds_is_left_out():
    # a genre whose positives are one item cannot be split over 2 folds by item: that class is
    # left out of the draw (here the target has then one class left: not probed) instead of
    # failing the whole run in scikit-learn
    rng = np.random.default_rng(0)
    n = 400

    class Side(SimpleNamespace):
        def __len__(self):
            return n

    side = Side(users=rng.integers(0, 40, n), items=rng.integers(0, 30, n))
    labels = (side.items == 7).astype(np.int64)
    target = explain.Target("genre: X", "item", labels, ("no", "yes"), group="item")
    feats = {k: rng.normal(size=(n, 3)) for k in ("a", "r", "pq", "pmq")}
    results = {target.name: explain.ProbeResult(target.name, target.claim, 0.0)}
    pairs = {target.name: []}
    bar = SimpleNamespace(update=lambda: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(explain, "pair_features", lambda *args: feats)
        explain._probe_seed(None, side, [target], 0, n, 2, None, results, pairs, bar)
    assert results[target.name].scores == {} and pairs[target.name] == []


def test_the_shuffled_probe_is_stratified_on_its_own_labels():
    # A class of 5 rows in 5 folds: the real labels' folds hold one each, the permuted labels'
    # rows of that class fall anywhere, so a test fold with none gave AUC NaN ("nan ± nan" in
    # report.md, NaN in probes.json)
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    y = np.zeros(200, dtype=np.int64)
    y[:5] = 1
    X = rng.normal(size=(200, 4))
    for seed in range(5):
        got = explain.probe({"r": X}, y, folds=5, seed=seed)
        assert np.isfinite(got["r"]) and np.isfinite(got["shuffled"]), (seed, got)
