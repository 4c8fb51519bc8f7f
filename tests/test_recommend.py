"""``lrml recommend``: each user's nearest items that the data does not already hold for the user,
written as CSV with the source's ids, in full or not at all."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import data, recommend
from lrml_kernels.cli import main
from lrml_kernels.reference import all_item_distances
from lrml_kernels.training import load_checkpoint, load_checkpoint_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split():
    return data.load("synthetic-small", validation=True)


def held(split, user: int, exclude: str) -> set[int]:
    """What ``exclude`` leaves out for ``user``, from the split's arrays (not its CSR code)."""
    if exclude == "none":
        return set()
    t = split.train
    items = set(np.asarray(t.items)[np.asarray(t.users) == user].tolist())
    if exclude == "known":
        for users, its in [
            (split.valid_users, split.valid_items),
            (split.test_users, split.test_items),
        ]:
            items |= set(np.asarray(its)[np.asarray(users) == user].tolist())
    return items


@pytest.mark.parametrize("exclude", recommend.EXCLUDE)
def test_each_users_list_is_its_nearest_items_left_in(split, exclude):
    torch.manual_seed(0)
    model = lk.LRML(split.num_users, split.num_items, dim=12, memory_slots=5)
    users = np.array([0, 7, 299, 7, 150])  # any order, repeats allowed
    csr = recommend.exclusion_csr(split, exclude)
    got = list(recommend.recommend_users(model, users, 10, csr, batch_size=2))
    assert [b[0].size for b in got] == [2, 2, 1]
    u, dist, ids = (np.concatenate(x) for x in zip(*got, strict=True))
    assert u.tolist() == users.tolist()
    with torch.no_grad():
        params = (model.user_emb, model.item_emb, model.keys, model.memory)
        P = model.user_emb[torch.as_tensor(users)]
        want = all_item_distances(P, *params[1:], distance=model.distance, eps=model.eps)
    for row, user in enumerate(users.tolist()):
        left_out = held(split, user, exclude)
        assert left_out or exclude == "none"
        order = [i for i in torch.argsort(want[row], stable=True).tolist() if i not in left_out]
        assert ids[row].tolist() == order[:10]
        torch.testing.assert_close(
            torch.as_tensor(dist[row]), want[row, order[:10]], rtol=1e-5, atol=1e-5
        )


def test_known_items_are_training_validation_and_test_items(split):
    indptr, indices = recommend.exclusion_csr(split, "known")
    for user in range(split.num_users):
        row = indices[indptr[user] : indptr[user + 1]].tolist()
        assert row == sorted(held(split, user, "known")), user
    assert recommend.exclusion_csr(split, "train") is split.train_csr()
    assert recommend.exclusion_csr(split, "none") is None
    with pytest.raises(ValueError, match="exclude must be one of"):
        recommend.exclusion_csr(split, "seen")


def test_missing_slots_are_skipped_and_rows_counted(split):
    model = lk.LRML(split.num_users, split.num_items, dim=4, memory_slots=2)
    users = np.array([3, 4])
    csr = recommend.exclusion_csr(split, "known")
    out = io.StringIO()
    batches = recommend.recommend_users(model, users, split.num_items + 5, csr)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        rows = recommend.write_csv("-", split, batches, total=2, progress=False)
    left = sum(split.num_items - len(held(split, u, "known")) for u in users.tolist())
    assert rows == left == len(out.getvalue().splitlines()) - 1


def test_an_interrupted_write_leaves_the_old_file_and_no_other(split, tmp_path):
    out = tmp_path / "recs.csv"
    out.write_text("the previous list\n")
    model = lk.LRML(split.num_users, split.num_items, dim=4, memory_slots=2)

    def batches():
        yield from recommend.recommend_users(model, np.arange(4), 3, None, batch_size=2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recommend.write_csv(out, split, batches(), total=4, progress=False)
    assert out.read_text() == "the previous list\n"
    assert [p.name for p in tmp_path.iterdir()] == ["recs.csv"]


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A model trained by the CLI on a CSV file whose ids are not 0..n-1."""
    root = tmp_path_factory.mktemp("csv")
    rng = np.random.default_rng(0)
    lines = ["user,item,rating,timestamp"]
    for u in range(40):
        for t, i in enumerate(rng.choice(200, size=8, replace=False)):
            lines.append(f"{1000 + 7 * u},{50000 + 3 * int(i)},4,{t}")
    (root / "log.csv").write_text("\n".join(lines) + "\n")
    run = root / "run"
    argv = ["train", "--data", f"csv:{root / 'log.csv'}", "--epochs", "1", "--dim", "8"]
    argv += ["--select-on", "valid", "--out", str(run), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    return root


def test_cli_writes_the_lists_with_the_sources_ids(csv_run, capsys):
    out = csv_run / "recs.csv"
    argv = ["recommend", str(csv_run / "run" / "best.pt"), "-k", "4", "--out", str(out)]
    assert main(argv + ["--users", "1007, 1000", "--no-progress"]) == 0
    assert "wrote 8 recommendations for 2 users" in capsys.readouterr().err
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(r["user"], r["rank"]) for r in rows] == [
        (u, str(k)) for u in ("1007", "1000") for k in range(1, 5)
    ]
    log = list(csv.DictReader((csv_run / "log.csv").read_text().splitlines()))
    for user in ("1007", "1000"):
        mine = [r for r in rows if r["user"] == user]
        owned = {r["item"] for r in log if r["user"] == user}
        assert not owned & {r["item"] for r in mine}  # known items are left out
        assert all(int(r["item"]) >= 50000 and (int(r["item"]) - 50000) % 3 == 0 for r in mine)
        dist = [float(r["distance"]) for r in mine]
        assert dist == sorted(dist)
    # the same users from a file (one or more ids a line, a BOM and blank lines allowed)
    (csv_run / "ids.txt").write_text("\ufeff1007\n\n 1000 ,\n", encoding="utf-8")
    argv[-1] = str(csv_run / "recs2.csv")
    assert main(argv + ["--users", f"@{csv_run / 'ids.txt'}", "--no-progress"]) == 0
    assert (csv_run / "recs2.csv").read_text() == out.read_text()
    capsys.readouterr()
    assert main(argv + ["--users", "1007", "--no-progress"]) == 0
    assert "wrote 4 recommendations for 1 user to" in capsys.readouterr().err
    # the same lists through the library, by index
    model, ckpt = load_checkpoint(csv_run / "run" / "best.pt")
    split = load_checkpoint_data(ckpt)[1]
    users = recommend.user_indices(split, ["1007", "1000"])
    ((_, _, ids),) = recommend.recommend_users(
        model, users, 4, recommend.exclusion_csr(split, "known")
    )
    assert [r["item"] for r in rows] == [str(split.train.item_ids[i]) for i in ids.reshape(-1)]
    # a k beyond the catalogue lists the whole catalogue (it asked the top-k for [users, k]:
    # out of memory at a k of 10^9)
    out_all = csv_run / "all.csv"
    argv = ["recommend", str(csv_run / "run" / "best.pt"), "-k", str(10**9), "--exclude", "none"]
    assert main(argv + ["--users", "1007", "--out", str(out_all), "--no-progress"]) == 0
    items = [r["item"] for r in csv.DictReader(out_all.read_text().splitlines())]
    assert sorted(items) == sorted({r["item"] for r in log}) == sorted(set(items))


def test_cli_warns_in_one_line_of_data_of_the_same_size_but_other_rows(csv_run, capsys):
    # the first user's timestamps reversed: the same users and items, another held-out item
    lines = (csv_run / "log.csv").read_text().splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("1000,")]
    for i, j in zip(first, reversed(first), strict=True):
        lines[i] = lines[i].rsplit(",", 1)[0] + "," + lines[j].rsplit(",", 1)[1]
    (csv_run / "other.csv").write_text("\n".join(lines) + "\n")
    argv = ["recommend", str(csv_run / "run" / "best.pt"), "--users", "1000", "--no-progress"]
    assert main(argv + ["--data", f"csv:{csv_run / 'other.csv'}"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("lrml recommend: warning: ") and "is not the data" in err[0], err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--users", "1000,99"], "unknown user id '99'"),
        (["--users", " , "], "--users names no user id"),
        (["--users", "@no/such/ids.txt"], "no/such/ids.txt"),
        (["--k", "0"], "--k must be a positive integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--out", "no/such/folder/recs.csv"], "its folder does not exist"),
        (["--data", "synthetic-small"], "'synthetic-small' is not the data this checkpoint"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(csv_run, error_line, extra, words):
    assert main(["recommend", str(csv_run / "run" / "best.pt"), *extra]) == 2
    assert words in error_line("recommend")


def test_a_reader_that_stops_early_ends_the_run_quietly(csv_run):
    # `lrml recommend CHECKPOINT | head`: the pipe closes after the first lines
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = ["recommend", str(csv_run / "run" / "best.pt"), "--k", "200", "--exclude", "none"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrml_kernels", *argv, "--batch-size", "1", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout.readline() == b"user,rank,item,distance\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == "", err


def test_known_leaves_out_what_a_user_rated_below_min_rating(tmp_path, capsys):
    # min_rating drops the low ratings from the data, but the user has seen those items: their
    # ids are read back from the source (the users' ids 100.., the items' 500.., every third)
    rng = np.random.default_rng(1)
    lines = ["user,item,rating,timestamp"]
    low = {}
    for u in range(30):
        items = rng.choice(60, size=15, replace=False)
        low[100 + u] = {str(500 + 3 * int(i)) for i in items[:5]}
        for t, i in enumerate(items):
            lines.append(f"{100 + u},{500 + 3 * int(i)},{2 if t < 5 else 5},{t}")
    path = tmp_path / "ratings.csv"
    path.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    argv = ["train", "--data", f"csv:{path}", "--min-rating", "4", "--epochs", "1", "--dim", "8"]
    assert main(argv + ["--eval-negatives", "20", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    kept = data.load(f"csv:{path}", min_rating=4, num_negatives=0)
    out = {}
    for exclude in ("known", "train"):
        out[exclude] = tmp_path / f"{exclude}.csv"
        argv = ["recommend", str(run / "checkpoint.pt"), "--k", "100", "--exclude", exclude]
        assert main(argv + ["--out", str(out[exclude]), "--no-progress"]) == 0
    rows = {e: list(csv.DictReader(f.read_text().splitlines())) for e, f in out.items()}
    item_id = kept.train.item_ids.astype(str)
    test = {
        str(kept.train.user_ids[u]): item_id[i]
        for u, i in zip(kept.test_users.tolist(), kept.test_items.tolist(), strict=True)
    }
    for user, seen in low.items():
        listed = {e: {r["item"] for r in rows[e] if r["user"] == str(user)} for e in rows}
        assert seen & set(item_id) <= listed["train"] and seen & set(item_id)  # rankable
        assert listed["known"] == listed["train"] - seen - {test[str(user)]}


def test_user_indices_and_recommend_users_check_their_users():
    split = data.load("synthetic-small")
    ids = split.train.user_ids
    # one string was split into its characters ("196": users '1', '9', '6')
    with pytest.raises(TypeError, match="ids must be a list of ids, not one str"):
        recommend.user_indices(split, str(ids[5]))
    # numbers name the ids they are written as
    assert recommend.user_indices(split, [int(ids[5]), str(ids[7])]).tolist() == [5, 7]
    model = lk.LRML(split.num_users, split.num_items, dim=8, memory_slots=2)
    exclude = recommend.exclusion_csr(split, "known")
    for users, error, words in [
        (np.array([1.9]), TypeError, "users must hold integer indices, got torch.float64"),
        (np.array([-1]), IndexError, "users holds index -1, out of range for a table of 300 rows"),
        (
            np.array([300]),
            IndexError,
            "users holds index 300, out of range for a table of 300 rows",
        ),
    ]:  # (1.9 was user 1; -1 and 300 internal torch errors, or user -1 written as user 299)
        for ex in (exclude, None):
            with pytest.raises(error, match=words):
                next(recommend.recommend_users(model, users, 3, ex))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got -1"):
        next(recommend.recommend_users(model, np.arange(3), 3, None, batch_size=-1))


def test_exclusion_csr_known_holds_each_item_once():
    # a test pair that repeats a training pair, and rated pairs that repeat known ones
    split = SimpleNamespace(
        known_csr=lambda: (np.array([0, 2, 3]), np.array([1, 3, 0])),
        test_users=np.array([0]),
        test_items=np.array([3]),
        num_items=5,
    )
    rated = (np.array([0, 0, 1]), np.array([1, 2, 0]))
    indptr, indices = recommend.exclusion_csr(split, "known", rated)
    assert indptr.tolist() == [0, 3, 4]
    assert indices.tolist() == [1, 2, 3, 0]


def test_rated_pairs_drops_pairs_with_an_unknown_user_or_item():
    split = SimpleNamespace(
        train=SimpleNamespace(user_ids=np.array(["a", "b"]), item_ids=np.array(["x", "y"]))
    )
    log = SimpleNamespace(
        user_ids=np.array(["a", "c"]),
        item_ids=np.array(["x", "z"]),
        users=np.array([0, 1, 0, 1]),
        items=np.array([0, 0, 1, 1]),
    )
    users, items = recommend.rated_pairs(split, log)
    assert users.tolist() == [0] and items.tolist() == [0]


def test_user_indices_counts_the_unknown_ids_beyond_five():
    split = SimpleNamespace(train=SimpleNamespace(user_ids=np.array(["a"])), name="toy")
    with pytest.raises(ValueError, match="and 2 more"):
        recommend.user_indices(split, ["q", "r", "s", "t", "u", "v", "w"])
