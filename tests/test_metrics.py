"""HR@k / nDCG@k on hand-computed cases, both protocols, ties counted against the held-out item."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lrml_kernels.data import read_ncf
from lrml_kernels.metrics import PopularityRanker, compare, evaluate, hit_ndcg


class TableRanker:
    """A ranker whose distance for (user, item) is read from a fixed table."""

    def __init__(self, table, dtype=torch.float32):
        self.table = torch.as_tensor(table, dtype=dtype)
        self.device = torch.device("cpu")

    def distances(self, users, items):
        return self.table[users[:, None], items]

    def recommend(self, users, k, exclude=None):
        from lrml_kernels.reference import sort_candidates

        D = self.table[users].clone()
        ids = torch.arange(D.shape[1]).expand_as(D).clone()
        if exclude is not None:
            indptr, indices = exclude
            rows = torch.repeat_interleave(torch.arange(len(users)), indptr[1:] - indptr[:-1])
            ids[rows, indices] = -1
        return sort_candidates(D, ids, k)


def make_split(train, tests, negatives, num_items):
    users = np.array([u for u, _ in train])
    items = np.array([i for _, i in train])
    num_users = 1 + max(max(users), max(u for u, _ in tests))
    order = np.lexsort((items, users))
    indptr = np.searchsorted(users[order], np.arange(num_users + 1))
    return SimpleNamespace(
        train=SimpleNamespace(users=users, items=items),
        test_users=np.array([u for u, _ in tests]),
        test_items=np.array([i for _, i in tests]),
        test_negatives=None if negatives is None else np.array(negatives),
        num_users=num_users,
        num_items=num_items,
        train_csr=lambda: (indptr, items[order]),
    )


def test_hit_ndcg_hand_computed():
    hr, ndcg = hit_ndcg(torch.tensor([0, 1, 9, 10, 50]), 10)
    assert hr == pytest.approx(3 / 5)
    assert ndcg == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)


def test_sampled_protocol_hand_computed():
    # user 0: held-out item 0 at distance 0.5, negatives 1 (0.1), 2 (0.9) -> rank 1
    # user 1: held-out item 3 at distance 0.2, negatives beat it none -> rank 0
    table = [[0.5, 0.1, 0.9, 1.0], [0.7, 0.8, 0.9, 0.2]]
    split = make_split([(0, 3), (1, 0)], [(0, 0), (1, 3)], [[1, 2], [1, 2]], 4)
    out = evaluate(TableRanker(table), split, "sampled", k=1)
    assert out["hr"] == pytest.approx(0.5) and out["ndcg"] == pytest.approx(0.5)
    out = evaluate(TableRanker(table), split, "sampled", k=2)
    assert out["hr"] == 1.0 and out["ndcg"] == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_a_negative_equal_to_the_held_out_item_is_ignored():
    table = [[0.5, 0.1, 0.9, 1.0]]
    split = make_split([(0, 3)], [(0, 0)], [[0, 2, 0]], 4)  # item 0 listed among its negatives
    out = evaluate(TableRanker(table), split, "sampled", k=1)
    assert out["hr"] == 1.0


def test_constant_model_scores_zero():
    table = np.zeros((2, 5))
    split = make_split([(0, 4), (1, 4)], [(0, 0), (1, 1)], [[1, 2, 3], [0, 2, 3]], 5)
    assert evaluate(TableRanker(table), split, "sampled", k=3)["hr"] == 0.0
    assert evaluate(TableRanker(table), split, "full", k=3)["hr"] == 0.0


@pytest.mark.parametrize("protocol", ["sampled", "full"])
def test_nan_distances_count_against_the_held_out_item(protocol):
    nan = float("nan")
    split = make_split([(0, 4), (1, 4)], [(0, 0), (1, 1)], [[1, 2, 3], [0, 2, 3]], 5)
    # every distance NaN (a diverged model): a miss for every user, not a hit
    assert evaluate(TableRanker(np.full((2, 5), nan)), split, protocol, k=3)["hr"] == 0.0
    # user 0's held-out item at NaN: last, a miss; user 1's rival item 3 at NaN: last, so the
    # held-out item 1 ranks 1 (behind item 2)
    table = [[nan, 0.5, 0.6, 0.7, 0.8], [0.9, 0.6, 0.5, nan, 0.8]]
    out = evaluate(TableRanker(table), split, protocol, k=2)
    assert out["hr"] == 0.5 and out["ndcg"] == pytest.approx(0.5 / math.log2(3))


@pytest.mark.parametrize("protocol", ["sampled", "full"])
def test_distances_are_compared_in_the_ranker_dtype(protocol):
    # the held-out item 1e-12 nearer than its rivals: a hit in float64, not a float32 tie
    table = np.full((1, 4), 0.5)
    table[0, 0] -= 1e-12
    split = make_split([(0, 3)], [(0, 0)], [[1, 2]], 4)
    assert evaluate(TableRanker(table, torch.float64), split, protocol, k=1)["hr"] == 1.0


def test_full_protocol_compares_the_distances_of_its_top_k_call():
    # distances() rounds the held-out item 1e-6 nearer than the top-k does; in the top-k it ties
    # item 1, and a tie counts against it
    class Rounding(TableRanker):
        def distances(self, users, items):
            return super().distances(users, items) - 1e-6

    split = make_split([(0, 3)], [(0, 0)], None, 4)
    assert evaluate(Rounding([[0.5, 0.5, 0.9, 1.0]]), split, "full", k=1)["hr"] == 0.0


def test_full_protocol_excludes_training_items():
    # user 0 trained on item 1 (the nearest): excluded, so held-out item 2 ranks 0.
    table = [[0.9, 0.0, 0.1, 0.5]]
    split = make_split([(0, 1)], [(0, 2)], None, 4)
    out = evaluate(TableRanker(table), split, "full", k=1)
    assert out["hr"] == 1.0 and out["ndcg"] == 1.0
    table = [[0.05, 0.0, 0.1, 0.5]]  # item 0 now beats it -> rank 1
    out = evaluate(TableRanker(table), split, "full", k=2)
    assert out["hr"] == 1.0 and out["ndcg"] == pytest.approx(1 / math.log2(3))
    assert evaluate(TableRanker(table), split, "full", k=1)["hr"] == 0.0


def test_full_protocol_ranks_a_test_pair_that_is_also_a_training_pair(tmp_path):
    # NCF-format files are split elsewhere: here user 0's test item 2 is also in its training
    # file. Excluded as a training item it could never be ranked (a miss whatever the model).
    (tmp_path / "toy.train.rating").write_text("0\t1\t5\n0\t2\t5\n1\t3\t4\n")
    (tmp_path / "toy.test.rating").write_text("0\t2\t5\n1\t0\t4\n")
    (tmp_path / "toy.test.negative").write_text("(0,2)\t3\t4\n(1,0)\t4\t1\n")
    split = read_ncf(tmp_path / "toy", cache=False)
    table = [[0.9, 0.0, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.0, 0.8]]
    out = evaluate(TableRanker(table), split, "full", k=1)  # item 1 (trained) is excluded
    assert out["hr"] == 1.0 and out["ndcg"] == 1.0
    assert evaluate(TableRanker(table), split, "sampled", k=1)["hr"] == 1.0
    indptr, indices = split.known_csr()
    assert indices[indptr[0] : indptr[1]].tolist() == [1]  # the training row 0-2 stays
    assert split.train_csr()[1][:2].tolist() == [1, 2]


def test_full_and_sampled_agree_when_negatives_are_everything_else():
    rng = np.random.default_rng(0)
    table = rng.random((6, 9))
    train = [(u, u) for u in range(6)]
    tests = [(u, (u + 3) % 9) for u in range(6)]
    negs = [[i for i in range(9) if i not in (u, (u + 3) % 9)] for u in range(6)]
    split = make_split(train, tests, negs, 9)
    for k in (1, 3, 5):
        a = evaluate(TableRanker(table), split, "full", k=k)
        b = evaluate(TableRanker(table), split, "sampled", k=k)
        assert a["hr"] == pytest.approx(b["hr"]) and a["ndcg"] == pytest.approx(b["ndcg"])


def test_a_k_beyond_the_catalogue_ranks_what_the_catalogue_holds():
    # (the full protocol asked the ranker for k + 1 items however few the catalogue had: a k of
    # 10^9 allocated [users, 10^9] and ran out of memory)
    rng = np.random.default_rng(1)
    table = rng.random((6, 9))
    split = make_split([(u, u) for u in range(6)], [(u, (u + 3) % 9) for u in range(6)], None, 9)
    asked = []

    class Recording(TableRanker):
        def recommend(self, users, k, exclude=None):
            asked.append(k)
            return super().recommend(users, k, exclude)

    huge = evaluate(Recording(table), split, "full", k=10**9)
    assert asked == [9] and huge["hr"] == 1.0
    assert huge["ndcg"] == evaluate(TableRanker(table), split, "full", k=20)["ndcg"]


def test_popularity_ranker():
    split = make_split(
        [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 3)], [(3, 1), (3, 2)], [[0, 3], [0, 3]], 4
    )
    out = evaluate(PopularityRanker(split), split, "sampled", k=1)
    assert out["hr"] == 1.0  # items 1 and 2 are the most popular


@pytest.mark.parametrize("k", [1, 7, 40, 45])
def test_popularity_top_k_is_every_item_sorted(k):
    # Against sort_candidates over every item (the definition): ties by id, excluded items
    # (repeats among them) left out, -1 / +inf past the items left (user 2 excludes all but 3,
    # user 3 everything), k beyond the catalogue.
    from lrml_kernels.reference import sort_candidates

    g = torch.Generator().manual_seed(0)
    I, B = 41, 6
    train = [(0, int(i)) for i in torch.randint(0, 12, (200,), generator=g)]  # many ties
    ranker = PopularityRanker(make_split(train, [(0, 0)], None, I))
    excl = [torch.randint(0, I, (n,), generator=g) for n in (0, 5, 60, 0, 20, 9)]
    excl[2] = torch.arange(3, I).repeat(2)
    excl[3] = torch.arange(I)
    indptr = torch.tensor([0] + [len(e) for e in excl]).cumsum(0)
    indices = torch.cat(excl)
    users = torch.arange(B)
    got = ranker.recommend(users, k, exclude=(indptr, indices))
    D = ranker.neg_counts.expand(B, I).clone()
    ids = torch.arange(I).expand(B, I).clone()
    for u, e in enumerate(excl):
        ids[u, e] = -1
    want = sort_candidates(D, ids, k)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert (got[1][3] == -1).all() and (got[1][2, 3:] == -1).all()
    assert torch.equal(
        ranker.recommend(users, k)[1], sort_candidates(D, torch.arange(I).expand(B, I), k)[1]
    )


def test_bad_protocol():
    split = make_split([(0, 1)], [(0, 2)], None, 4)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(TableRanker([[0, 0, 0, 0]]), split, "loo")
    with pytest.raises(ValueError, match="no sampled negatives"):
        evaluate(TableRanker([[0, 0, 0, 0]]), split, "sampled")


def shared_model_and_split(backend="torch", users=48, items=70, negatives=30, seed=0):
    """A ``relation="shared"`` model whose relations matter (memory scaled up) and a split."""
    from lrml_kernels import LRML

    torch.manual_seed(seed)
    model = LRML(users, items, dim=8, memory_slots=5, relation="shared", backend=backend)
    with torch.no_grad():
        model.memory.mul_(4.0)
    rng = np.random.default_rng(seed)
    split = make_split(
        [(u, 0) for u in range(users)],
        [(u, int(rng.integers(1, items))) for u in range(users)],
        rng.integers(1, items, (users, negatives)).tolist(),
        items,
    )
    return model, split


def ranks_of(D, cand, col):
    """Rank of ``cand[b, col[b]]`` among the other candidates of row b (ties against it)."""
    rows = torch.arange(D.shape[0])
    d_held, held = D[rows, col][:, None], cand[rows, col][:, None]
    return ((D <= d_held) & (cand != held)).sum(1)


def test_shared_model_is_scored_per_pair():
    """The reported sampled ranks of a shared-trained model are those of an independent per-pair
    scoring (each candidate alone), not those of the training loss's shared relation."""
    from lrml_kernels import reference
    from lrml_kernels.metrics import sampled_ranks

    model, split = shared_model_and_split()
    users = torch.as_tensor(split.test_users)
    cand = torch.cat(
        [torch.as_tensor(split.test_items)[:, None], torch.as_tensor(split.test_negatives)], 1
    )
    params = [p.detach() for p in (model.user_emb, model.item_emb, model.keys, model.memory)]
    alone = torch.cat(
        [
            reference.lrml_distances(*params, users, cand[:, c : c + 1])
            for c in range(cand.shape[1])
        ],
        1,
    )
    col0 = torch.zeros(len(users), dtype=torch.int64)
    want = ranks_of(alone, cand, col0)
    assert torch.equal(sampled_ranks(model, split), want)
    leak = ranks_of(reference.lrml_distances(*params, users, cand, relation="shared"), cand, col0)
    assert not torch.equal(leak, want)  # the shared relation would change the ranks
    hr, ndcg = hit_ndcg(want, 10)
    result = evaluate(model, split)
    assert (result["hr"], result["ndcg"]) == (hr, ndcg)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_no_ranker_sees_the_position_of_the_held_out_item(backend):
    """Permuting each row's candidates leaves every rank unchanged."""
    from lrml_kernels import available_backends
    from lrml_kernels.metrics import sampled_ranks

    if backend not in available_backends():
        pytest.skip(f"{backend} backend not available")
    model, split = shared_model_and_split(backend)
    users = torch.as_tensor(split.test_users)
    cand = torch.cat(
        [torch.as_tensor(split.test_items)[:, None], torch.as_tensor(split.test_negatives)], 1
    )
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(cand.shape[1], generator=g) for _ in range(len(users))])
    shuffled = cand.gather(1, perm)
    held_at = (perm == 0).int().argmax(1)
    assert (held_at != 0).any()
    with torch.no_grad():
        D = model.distances(users, shuffled)
    assert torch.equal(ranks_of(D, shuffled, held_at), sampled_ranks(model, split))


@pytest.mark.parametrize("protocol", ["sampled", "full"])
@pytest.mark.parametrize("k", [0, 2.0, True])
def test_k_must_be_a_positive_integer_in_both_protocols(protocol, k):
    split = make_split([(0, 3)], [(0, 0)], [[1, 2]], 4)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        evaluate(TableRanker([[0.5, 0.1, 0.9, 1.0]]), split, protocol, k=k)


@pytest.mark.parametrize("protocol", ["sampled", "full"])
def test_a_long_evaluation_shows_a_progress_bar_that_a_short_one_does_not(
    protocol, monkeypatch, capsys
):
    import time

    class SlowRanker(TableRanker):  # 0.7 s a batch of one user: the bar's 2 s delay is passed
        def distances(self, users, items):
            time.sleep(0.7)
            return super().distances(users, items)

        def recommend(self, users, k, exclude=None):
            time.sleep(0.7)
            return super().recommend(users, k, exclude)

    tests = [(u, 0) for u in range(4)]
    split = make_split([(u, 4) for u in range(4)], tests, [[1, 2, 3]] * 4, 5)
    table = np.tile(np.arange(5.0), (4, 1))
    quick = evaluate(TableRanker(table), split, protocol, k=2, batch_size=1, progress=True)
    assert capsys.readouterr().err == ""
    slow = evaluate(SlowRanker(table), split, protocol, k=2, batch_size=1, progress=True)
    assert f"{protocol} ranking" in capsys.readouterr().err
    assert slow == quick and quick["hr"] == 1.0
    evaluate(SlowRanker(table), split, protocol, k=2, batch_size=1)  # progress off by default
    assert capsys.readouterr().err == ""


def test_standard_errors_are_those_of_the_per_user_values():
    # ranks 0, 5 and 20 at k = 10: hits 1, 1, 0 (sample variance 1/3: se 1/3); nDCG 1, 1/log2(7), 0
    ranks = [0, 5, 20]
    table = [[r - 0.5, *range(21)] for r in ranks]  # negative i at distance i - 1
    negs = [list(range(1, 22))] * 3
    split = make_split([(0, 1)], [(u, 0) for u in range(3)], negs, 22)
    got = evaluate(TableRanker(table), split, "sampled", k=10)
    ndcg = np.array([1.0, 1 / math.log2(7), 0.0])
    assert got["hr"] == pytest.approx(2 / 3) and got["hr_se"] == pytest.approx(1 / 3)
    assert got["ndcg"] == pytest.approx(ndcg.mean())
    assert got["ndcg_se"] == pytest.approx(ndcg.std(ddof=1) / math.sqrt(3))
    one = evaluate(TableRanker(table[:1]), make_split([(0, 1)], [(0, 0)], [[1, 2]], 22), k=1)
    assert one["users"] == 1 and one["hr_se"] == one["ndcg_se"] == 0.0


def test_compare_gives_the_paired_differences_per_user():
    from lrml_kernels.metrics import compare

    rng = np.random.default_rng(3)
    a, b = rng.random((40, 30)), rng.random((40, 30))
    b[:20] = a[:20]  # the two models agree on half of the users
    tests = [(u, u % 30) for u in range(40)]
    negs = [[i for i in range(30) if i != u % 30] for u in range(40)]
    split = make_split([(u, (u + 1) % 30) for u in range(40)], tests, negs, 30)
    for protocol in ("sampled", "full"):
        got = compare(TableRanker(a), TableRanker(b), split, protocol, k=5)
        ea, eb = (evaluate(TableRanker(t), split, protocol, k=5) for t in (a, b))
        assert got["users"] == 40 and got["a"]["hr"] == ea["hr"] and got["b"]["ndcg"] == eb["ndcg"]
        for name in ("hr", "ndcg"):
            per = []
            for t in (a, b):  # each user's value from an evaluation of that user alone
                one = [
                    evaluate(TableRanker(t[u : u + 1]), _one_user(split, u), protocol, k=5)[name]
                    for u in range(40)
                ]
                per.append(np.array(one))
            diff = per[0] - per[1]
            assert diff[:20].tolist() == [0.0] * 20 and diff.any()
            d = got["difference"]
            assert d[name] == pytest.approx(diff.mean())
            assert d[f"{name}_se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(40))
            lo, hi = d[f"{name}_ci95"]
            assert lo == pytest.approx(diff.mean() - 1.96 * d[f"{name}_se"]) and hi > lo


def _one_user(split, u):
    """``split`` with only test user ``u``, renumbered 0 (its training row kept)."""
    indptr, indices = split.train_csr()
    row = indices[indptr[u] : indptr[u + 1]]
    return SimpleNamespace(
        train=split.train,
        test_users=np.array([0]),
        test_items=split.test_items[u : u + 1],
        test_negatives=split.test_negatives[u : u + 1],
        num_users=1,
        num_items=split.num_items,
        train_csr=lambda: (np.array([0, row.size]), row),
    )


def test_lrml_evaluate_against_compares_two_checkpoints_of_one_split(tmp_path, capsys):
    from lrml_kernels.cli import main
    from lrml_kernels.training import TrainConfig, fit

    opts = dict(data="synthetic-small", epochs=1, dim=8, memory_slots=4, batch_size=256)
    opts.update(eval="none", progress=False, backend="torch")
    fit(TrainConfig(**opts), tmp_path / "lrml")
    fit(TrainConfig(**opts, relation="none"), tmp_path / "cml")
    fit(TrainConfig(**opts, seed=1), tmp_path / "other")
    a, b = (str(tmp_path / n / "checkpoint.pt") for n in ("lrml", "cml"))
    assert main(["evaluate", a, "--eval", "sampled", "--no-progress"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["hr_se"] > 0 and alone["ndcg_se"] > 0
    assert main(["evaluate", a, "--against", b, "--eval", "sampled", "full", "--no-progress"]) == 0
    sampled, full = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (sampled["protocol"], full["protocol"]) == ("sampled", "full")
    assert sampled["a"]["hr"] == alone["hr"] and sampled["a"]["ndcg"] == alone["ndcg"]
    d = sampled["difference"]
    assert d["hr"] == pytest.approx(sampled["a"]["hr"] - sampled["b"]["hr"])
    assert d["hr_ci95"][0] < d["hr"] < d["hr_ci95"][1]
    other = str(tmp_path / "other" / "checkpoint.pt")
    assert main(["evaluate", a, "--against", other, "--no-progress"]) == 2
    assert "was not trained on the split" in capsys.readouterr().err


def test_evaluate_checks_shard_batch_size_and_the_rankers_catalogue():
    import lrml_kernels as lk
    from lrml_kernels import data

    s = data.load("synthetic-small")
    pop = PopularityRanker(s)
    # shard (1, 1) evaluated 299 of 300 users and (-1, 1) one, without an error
    for bad in [(1, 1), (-1, 1), (0, 0), (0, -1), (0.5, 2)]:
        with pytest.raises(ValueError, match="shard must be"):
            evaluate(pop, s, shard=bad)
    # a batch size below 1 evaluated nobody ({'users': 0, 'hr': 0.0})
    for protocol in ("sampled", "full"):
        for bad in (0, -1):
            with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
                evaluate(pop, s, protocol, batch_size=bad)
    # a model of another catalogue ranked item ids the split does not have
    other = lk.LRML(s.num_users, s.num_items + 1000, dim=8, memory_slots=4)
    for protocol in ("sampled", "full"):
        with pytest.raises(ValueError, match=r"num_items=1200 but the split 200"):
            evaluate(other, s, protocol)
    # numpy integers are integers; the result's k is a plain int (it goes to JSON)
    got = evaluate(pop, s, "full", k=np.int64(5))
    assert type(got["k"]) is int and got == evaluate(pop, s, "full", k=5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        pop.recommend(torch.tensor([0]), 0)  # (was an empty list; -1 a torch.arange error)


def test_a_ranker_module_without_parameters_runs_on_the_cpu():
    class Constant(torch.nn.Module):  # (next(parameters()) raised a bare StopIteration)
        def distances(self, users, items):
            return torch.zeros(items.shape)

        def recommend(self, users, k, exclude=None):
            return torch.zeros(users.shape[0], k), torch.arange(k).expand(users.shape[0], k)

    split = make_split([(0, 0), (1, 1)], [(0, 2), (1, 3)], [[4], [5]], 6)
    assert evaluate(Constant(), split, "sampled")["users"] == 2


def test_batch_csr_checks_its_users():
    from lrml_kernels.metrics import batch_csr

    indptr, indices = torch.tensor([0, 2, 3, 3, 5]), torch.tensor([1, 4, 2, 0, 3])
    ptr, idx = batch_csr(indptr, indices, torch.tensor([3, 0]))
    assert ptr.tolist() == [0, 2, 4] and idx.tolist() == [0, 3, 1, 4]
    for bad in (-2, -1, 4):  # (-2 gave user 3's row)
        with pytest.raises(
            IndexError, match=f"users holds index {bad}, out of range for a table of 4 rows"
        ):
            batch_csr(indptr, indices, torch.tensor([bad]))


def test_batch_csr_takes_the_numpy_csr_of_a_split():
    from lrml_kernels.data import load
    from lrml_kernels.metrics import batch_csr

    indptr, indices = load("synthetic-small").train_csr()
    assert isinstance(indptr, np.ndarray)
    users = torch.tensor([3, 0])
    ptr, idx = batch_csr(indptr, indices, users)
    rows = [indices[indptr[u] : indptr[u + 1]] for u in users.tolist()]
    assert ptr.tolist() == [0, len(rows[0]), len(rows[0]) + len(rows[1])]
    assert idx.tolist() == np.concatenate(rows).tolist()
    assert ptr.dtype == idx.dtype == torch.int64


# metrics.full_ranks: the padding ids -1 (+inf) of a short catalogue are not rivals
def test_full_protocol_ignores_the_empty_slots_of_a_short_catalogue():
    inf = float("inf")
    # user 0 trained on item 3: 3 items left to rank, the top-(k+1)=4 call pads one slot (-1,
    # +inf). The held-out item 0 at +inf ranks 2 (behind items 1 and 2), not 3.
    table = [[inf, 0.1, 0.2, 0.0]]
    split = make_split([(0, 3)], [(0, 0)], [[1, 2]], 4)
    full = evaluate(TableRanker(table), split, "full", k=3)
    sampled = evaluate(TableRanker(table), split, "sampled", k=3)
    assert full["hr"] == sampled["hr"] == 1.0
    assert full["ndcg"] == pytest.approx(1 / math.log2(4)) == sampled["ndcg"]


# metrics._ranks: a ranker in training mode is ranked in eval mode, then put back
@pytest.mark.parametrize("protocol", ["sampled", "full"])
def test_evaluation_restores_the_training_mode_of_a_module(protocol):
    class Module(torch.nn.Module):
        def __init__(self, table):
            super().__init__()
            self.inner, self.modes = TableRanker(table), []

        def distances(self, users, items):
            self.modes.append(self.training)
            return self.inner.distances(users, items)

        def recommend(self, users, k, exclude=None):
            self.modes.append(self.training)
            return self.inner.recommend(users, k, exclude)

    split = make_split([(0, 3), (1, 0)], [(0, 0), (1, 3)], [[1, 2], [1, 2]], 4)
    table = [[0.5, 0.1, 0.9, 1.0], [0.7, 0.8, 0.9, 0.2]]
    a, b = Module(table), Module(table)
    a.train()
    evaluate(a, split, protocol, k=1)
    assert a.training and a.modes and not any(a.modes)
    b.eval()
    compare(a, b, split, protocol, k=1)
    assert a.training and not b.training and not any(a.modes + b.modes)
