"""HR@k / nDCG@k on hand-computed cases, both protocols, ties counted against the held-out item."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lrml_kernels.metrics import PopularityRanker, evaluate, hit_ndcg


class TableRanker:
    """A ranker whose distance for (user, item) is read from a fixed table."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)
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


def test_popularity_ranker():
    split = make_split(
        [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 3)], [(3, 1), (3, 2)], [[0, 3], [0, 3]], 4
    )
    out = evaluate(PopularityRanker(split), split, "sampled", k=1)
    assert out["hr"] == 1.0  # items 1 and 2 are the most popular


def test_bad_protocol():
    split = make_split([(0, 1)], [(0, 2)], None, 4)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(TableRanker([[0, 0, 0, 0]]), split, "loo")
    with pytest.raises(ValueError, match="no sampled negatives"):
        evaluate(TableRanker([[0, 0, 0, 0]]), split, "sampled")
