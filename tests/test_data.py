"""Tests of lrml_kernels.data: readers, cache, leave-one-out, negatives, synthetic data.

Small files in every format are written here (tmp_path); the real data sets are read from
../shared/data (or $LRML_SHARED_DATA) and those tests skip where it is absent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lrml_kernels import data as D
from lrml_kernels.data import _text
from lrml_kernels.data.interactions import MISSING_TIMESTAMP, DataFormatError

SHARED = Path(
    os.environ.get(
        "LRML_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p}")
    return p


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Caches of the tests go to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("LRML_KERNELS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def pairs(x: D.Interactions) -> list[tuple[int, int]]:
    return list(zip(x.user_ids[x.users].tolist(), x.item_ids[x.items].tolist(), strict=True))


def netflix_text(movies: dict[int, list[tuple[int, int, str]]]) -> str:
    """Netflix training-set text: ``{movie: [(customer, rating, date), ...]}``."""
    lines = []
    for movie, rows in movies.items():
        lines.append(f"{movie}:")
        lines += [f"{c},{r},{d}" for c, r, d in rows]
    return "\n".join(lines) + "\n"


def expect_error(call, path: Path, line: int | None):
    with pytest.raises(DataFormatError) as info:
        call()
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    if line is not None:
        assert err.line == line and f"line {line}:" in str(err), str(err)
    return err


# --- readers on small files ---


def test_movielens_u_data_reindexes_and_maps_back(tmp_path):
    f = write(tmp_path / "u.data", "10\t7\t5\t100\n30\t7\t3\t50\n10\t99\t4\t200\n20\t8\t1\t10\n")
    x = D.read_movielens(tmp_path)  # a folder: finds u.data
    assert (x.num_users, x.num_items, len(x)) == (3, 3, 4)
    assert x.user_ids.tolist() == [10, 20, 30] and x.item_ids.tolist() == [7, 8, 99]
    assert pairs(x) == [(10, 7), (30, 7), (10, 99), (20, 8)]  # file order kept
    assert x.timestamps.tolist() == [100, 50, 200, 10]
    assert x.users.dtype == x.items.dtype == np.int32 and x.timestamps.dtype == np.int64
    assert x.user_ids.dtype == x.item_ids.dtype == np.int64
    assert x.name == f"movielens:{f}"
    assert D.read_movielens(f).fingerprint() == x.fingerprint()


def test_movielens_dat_csv_and_reconstructed_tsv(tmp_path):
    dat = D.read_movielens(
        write(tmp_path / "a" / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    )
    assert pairs(dat) == [(1, 1193), (2, 661)] and dat.timestamps.tolist() == [978300760, 978302109]
    csv = write(
        tmp_path / "b" / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,3.5,964981247\n2,3,0.5,1\n",
    )
    x = D.read_movielens(csv.parent, min_rating=3.5)
    assert pairs(x) == [(1, 1), (1, 3)]
    tsv = write(
        tmp_path / "c" / "ratings_reconstructed.tsv",
        "user_id\tmovie_id\trating\ttimestamp\n1\t1\t5\t978824268\n1\t48\t3\t\n2\t1\t4\t\n",
    )
    x = D.read_movielens(tsv.parent)
    assert x.timestamps.tolist() == [978824268, MISSING_TIMESTAMP, MISSING_TIMESTAMP]
    assert D.read_movielens(tsv, min_rating=4).timestamps.tolist() == [978824268, MISSING_TIMESTAMP]


def test_min_rating_and_duplicates(tmp_path):
    f = write(
        tmp_path / "u.data",
        "1\t1\t5\t10\n1\t2\t2\t10\n1\t1\t2\t30\n2\t3\t5\t5\n2\t3\t4\t5\n2\t4\t1\t1\n",
    )
    x = D.read_movielens(f)
    # (1, 1) twice: the later timestamp (30) stays; (2, 3) twice at the same time: the later row
    assert pairs(x) == [(1, 2), (1, 1), (2, 3), (2, 4)]
    assert x.timestamps.tolist() == [10, 30, 5, 1]
    # the latest rating of a pair decides: (1, 1) was re-rated 2, so min_rating=4 drops it
    y = D.read_movielens(f, min_rating=4)
    assert pairs(y) == [(2, 3)] and (y.num_users, y.num_items) == (1, 1)
    with pytest.raises(ValueError, match="no interactions left"):
        D.read_movielens(f, min_rating=6)


@pytest.mark.parametrize(
    "spec, name", [("csv", "r.csv.gz"), ("movielens", "u.data"), ("netflix", "combined_data_1.txt")]
)
def test_compressed_files_are_named_as_such(tmp_path, spec, name):
    import gzip

    # (not "no data rows (empty file?)" or a parse error of the compressed bytes)
    f = write(tmp_path / name, gzip.compress(b"1\t2\t3\t4\n1\t3\t3\t5\n"))
    err = expect_error(lambda: D.load(f"{spec}:{f}", cache=False), f, None)
    assert "gzip-compressed" in str(err)
    # Excel's "Unicode text": UTF-16 (was "stray carriage return inside the line")
    g = write(tmp_path / "utf16" / name, "user\titem\r\n1\t2\r\n".encode("utf-16"))
    err = expect_error(lambda: D.load(f"{spec}:{g}", cache=False), g, None)
    assert "a UTF-16 text file: save it as UTF-8" in str(err)


@pytest.mark.parametrize(
    "name, text, line, reason",
    [
        ("u.data", "1\t2\t3\t4\n1\t2\tx\t4\n", 2, "rating"),
        ("u.data", "1\t2\t3\t4\n\n1\t2\t3\n", 3, "expected 4"),
        ("u.data", "1,2,3,4\n", 1, "wrong delimiter"),
        ("u.data", "1\t2\t3\t4\n1\t2.5\t3\t4\n", 2, "item"),
        ("u.data", "1\t2\t3\t4\n1\t\t3\t4\n", 2, "empty item"),
        ("u.data", "1\t2\t3\t4\n1\t2\tnan\t4\n", 2, "rating"),
        ("u.data", "", 1, "empty"),
        ("u.data", "\n\n", 1, "empty"),
        ("ratings.dat", "1::2::3::4\n1::2::3:4\n", 2, "expected 4"),
        ("ratings.dat", "1::2::3::4\n1\t2\t3\t4\n", 2, "expected 4"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", 1, "no data rows"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0,4\n1,b,3,4\n", 3, "item"),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\r\n1,2,3.0,4\r\n1,2,3,4x\r\n",
            3,
            "timestamp",
        ),
    ],
)
def test_malformed_movielens_files_name_file_and_line(tmp_path, name, text, line, reason):
    f = write(tmp_path / name, text)
    err = expect_error(lambda: D.read_movielens(f), f, line)
    assert reason in str(err)


def test_errors_in_later_chunks_have_global_line_numbers(tmp_path):
    rows = "".join(f"{u}\t{u % 7}\t3\t{u}\n" for u in range(1, 200))
    f = write(tmp_path / "big.tsv", rows + "5\t6\toops\t7\n" + rows)
    fields = [_text.Field("user", 0, "int"), _text.Field("rating", 2, "float")]
    with pytest.raises(DataFormatError) as info:
        _text.read_table(f, fields, delimiter="\t", ncols=4, chunk_bytes=100)
    assert info.value.line == 200
    t = _text.read_table(
        write(tmp_path / "ok.tsv", rows * 2), fields, delimiter="\t", chunk_bytes=64
    )
    assert t["user"].tolist() == list(range(1, 200)) * 2


@pytest.mark.parametrize("delim", [",", "\t", "::", ";", " "])
def test_csv_detects_delimiter(tmp_path, delim):
    f = write(
        tmp_path / "x.txt",
        delim.join(["5", "6", "1", "100"]) + "\n" + delim.join(["7", "6", "4", "200"]) + "\n",
    )
    x = D.read_csv(f, min_rating=2)
    assert pairs(x) == [(7, 6)] and x.timestamps.tolist() == [200]


def test_csv_delimiter_is_the_one_that_splits_every_line_alike(tmp_path):
    # Decimal commas in a ';' file: ',' splits line 1 too, but into 2 fields where ';' gives 4
    f = write(tmp_path / "eu.csv", "5;6;1,5;100\n7;6;4,0;200\n8;9;3;300\n")
    x = D.read_csv(f)
    assert pairs(x) == [(5, 6), (7, 6), (8, 9)] and x.timestamps.tolist() == [100, 200, 300]
    # ... while ',' stays ',' beside text with a varying number of spaces or ';' in it
    f = write(tmp_path / "t.csv", "5,6,Toy Story;Kids,100\n7,6,Heat,200\n")
    assert D.read_csv(f, user_col=0, item_col=1, timestamp_col=3).timestamps.tolist() == [100, 200]


def test_csv_header_names_dates_and_explicit_columns(tmp_path):
    f = write(
        tmp_path / "n.csv",
        "MovieID,UserID,Rating,Date\n8764,1287529,4,2005-10-04\n16856,702643,5,2001-06-26\n",
    )
    x = D.read_csv(f)
    assert pairs(x) == [(1287529, 8764), (702643, 16856)]  # columns found by name
    assert x.timestamps.tolist() == [1128384000, 993513600]  # dates -> seconds since the epoch
    g = write(tmp_path / "g.csv", "a;b;title;when\n1;2;hello world;\n3;4;x;17\n")
    y = D.read_csv(g, user_col="b", item_col=0, timestamp_col=3)
    assert pairs(y) == [(2, 1), (4, 3)] and y.timestamps.tolist() == [MISSING_TIMESTAMP, 17]
    z = D.read_csv(write(tmp_path / "h.csv", "1,2\n3,4\n"))
    assert pairs(z) == [(1, 2), (3, 4)] and z.timestamps is None
    expect_error(lambda: D.read_csv(write(tmp_path / "one.csv", "123\n")), tmp_path / "one.csv", 1)
    with pytest.raises(ValueError, match="no ratings"):
        D.read_csv(tmp_path / "h.csv", min_rating=1)


def test_csv_header_is_told_from_the_second_line(tmp_path):
    # a text column in every row (a title) is not a header: no row is lost
    f = write(tmp_path / "t.csv", "1,10,5,100,Toy Story\n1,11,4,101,Heat\n2,10,3,102,Up\n")
    assert pairs(D.read_csv(f)) == [(1, 10), (1, 11), (2, 10)]
    # a header whose line 2 has an empty field in the text column is still a header
    g = write(tmp_path / "h.csv", "user,item,rating,title\n1,10,5,\n2,11,4,Heat\n")
    assert pairs(D.read_csv(g)) == [(1, 10), (2, 11)]


@pytest.mark.parametrize("header", ["", "user,item,rating,date\n"])
def test_csv_with_a_byte_order_mark(tmp_path, header):
    f = tmp_path / "bom.csv"
    f.write_bytes(b"\xef\xbb\xbf" + (header + "1,10,5,2005-01-02\n2,11,4,2005-01-03\n").encode())
    x = D.read_csv(f)
    assert pairs(x) == [(1, 10), (2, 11)] and x.timestamps.tolist() == [1104624000, 1104710400]


def test_csv_quoted_fields(tmp_path):
    # Book-Crossing's BX-Book-Ratings.csv: every field quoted, ';'-separated, text ISBNs
    f = write(
        tmp_path / "bx.csv",
        '"User-ID";"ISBN";"Book-Rating"\n"276725";"034545104X";"0"\n'
        '"276726";"0155061224";"5"\n"276725";"0155061224";"3"\n',
    )
    x = D.read_csv(f, min_rating=1)
    assert pairs(x) == [(276726, "0155061224"), (276725, "0155061224")]
    # a quoted field may hold the delimiter and "" (one quote); a quote inside a field is text;
    # a quoted empty timestamp is missing, as an empty one
    g = write(
        tmp_path / "t.csv",
        'user,item,title,date\n"1","10","Toy Story, ""the"" film",""\n'
        '2,11,5\'6" tall,"2005-01-02"\n',
    )
    y = D.read_csv(g, timestamp_col="date")
    assert pairs(y) == [(1, 10), (2, 11)]
    assert y.timestamps.tolist() == [MISSING_TIMESTAMP, 1104624000]


@pytest.mark.parametrize("rows", ['1,"10\n2",11\n3,4\n', '1,"abc\n2,11\n3,4\n'])
def test_csv_a_line_break_inside_quotes_is_an_error_not_merged_rows(tmp_path, rows):
    # (numpy's parser would read it as one field spanning two lines: a row lost in silence)
    f = write(tmp_path / "q.csv", "user,item\n" + rows)
    err = expect_error(lambda: D.read_csv(f, cache=False), f, 2)
    assert "quoted field is not closed" in str(err)


@pytest.mark.parametrize("reader", ["csv", "movielens", "netflix", "citeulike"])
def test_cr_only_line_ends(tmp_path, reader):
    # classic Mac OS and some spreadsheet exports end lines with CR alone
    if reader == "netflix":  # (a small file is read whole, a large one in chunks)
        text = "1:\r5,3,2005-01-02\r6,4,2005-01-03\r"
        for name in ("mv_0000001.txt", "combined_data_1.txt"):
            f = write(tmp_path / name, text.ljust(1 << 20, "\r") if "combined" in name else text)
            assert pairs(D.read_netflix(f, cache=False, chunk_bytes=1 << 20)) == [(5, 1), (6, 1)]
        return
    if reader == "citeulike":
        f = write(tmp_path / "users.dat", "2 5 9\r1 9\r")
        assert pairs(D.read_citeulike(f, cache=False)) == [(0, 5), (0, 9), (1, 9)]
        return
    name = "r.csv" if reader == "csv" else "ratings.csv"
    f = write(tmp_path / name, "userId,movieId,rating,timestamp\r1,2,3.0,4\r5,6,4,7\r")
    read = D.read_csv if reader == "csv" else D.read_movielens
    x = read(f, cache=False)
    assert pairs(x) == [(1, 2), (5, 6)] and x.timestamps.tolist() == [4, 7]
    bad = write(tmp_path / "bad" / name, "userId,movieId,rating,timestamp\r1,2,3,4\r1\r")
    assert "expected" in str(expect_error(lambda: read(bad, cache=False), bad, 3))


def test_csv_timestamp_kind_from_the_first_row_that_has_one(tmp_path):
    f = write(tmp_path / "d.csv", "user,item,rating,date\n1,10,5,\n1,11,4,2005-01-02\n")
    x = D.read_csv(f)
    assert x.timestamps.tolist() == [MISSING_TIMESTAMP, 1104624000]


def test_csv_text_ids_are_read_as_text_and_cached(tmp_path):
    # Amazon-style ids: letters, and leading zeros that an integer would lose
    f = write(
        tmp_path / "amz.csv",
        "reviewerID,asin,overall,unixReviewTime\n"
        "A2SUAM,0000013714,5,1382140800\nA18C9S,0000013714,4,1383523200\n"
        "A2SUAM,B00004Y2UT,3,1383523200\nA3GNN3, 013714,5,1383523300\n",
    )
    x = D.read_csv(f)
    assert pairs(x) == [
        ("A2SUAM", "0000013714"),
        ("A18C9S", "0000013714"),
        ("A2SUAM", "B00004Y2UT"),
        ("A3GNN3", "013714"),  # spaces stripped, zeros kept: another item
    ]
    assert x.user_ids.tolist() == ["A18C9S", "A2SUAM", "A3GNN3"]  # re-indexed in text order
    y = D.read_csv(f)  # from the cache
    assert y.fingerprint() == x.fingerprint() and y.item_ids.tolist() == x.item_ids.tolist()
    assert D.read_csv(f, cache=False).fingerprint() == x.fingerprint()
    expect_error(lambda: D.read_csv(write(tmp_path / "e.csv", "a,1\n,2\n")), tmp_path / "e.csv", 2)
    # all digits, but with leading zeros: text too, so 0312 is not user 312
    z = D.read_csv(write(tmp_path / "z.csv", "0312,7\n312,7\n0045,8\n"))
    assert pairs(z) == [("0312", 7), ("312", 7), ("0045", 8)]


def test_csv_a_header_further_down_is_an_error(tmp_path):
    # files concatenated: a header line past the head is an error, not a user called "user"
    rows = "".join(f"{u},{u % 7},3\n" for u in range(1, 80)) + "user,item,rating\n"
    f = write(tmp_path / "i.csv", rows)
    expect_error(lambda: D.read_csv(f), f, 80)


@pytest.mark.parametrize("late", ["bob", "0007"])
def test_csv_id_kind_is_the_whole_files_not_the_heads(tmp_path, late):
    # 60 integer user ids (past the 50 head lines), then "bob" (was an error) or "0007" (was
    # merged into user 7): the user column is text, as where the id is in the head; the item
    # column, plain integers all through, stays integer
    rows = "".join(f"{u},{10 + u},5\n" for u in range(1, 61))
    for where in ("late", "early"):
        text = f"{late},99,4\n" + rows if where == "early" else rows + f"{late},99,4\n"
        x = D.read_csv(write(tmp_path / f"{where}.csv", "user,item,rating\n" + text))
        assert x.num_users == 61 and late in x.user_ids.tolist(), where
        assert x.item_ids.dtype == np.int64 and x.item_ids.tolist() == list(range(11, 71)) + [99]
        assert sorted(pairs(x)) == sorted([(str(u), 10 + u) for u in range(1, 61)] + [(late, 99)])


def test_csv_text_ids_are_utf8(tmp_path):
    # (were read as Latin-1: "josé" became "josÃ©", and recommend --users josé found no one)
    f = write(tmp_path / "u.csv", "user,item\njosé,10\nzoë,20\njosé,30\n".encode())
    assert D.read_csv(f).user_ids.tolist() == ["josé", "zoë"]
    # a Latin-1 file is not valid UTF-8: its bytes stay Latin-1 characters
    g = write(tmp_path / "l.csv", "user,item\njosé,10\nzoë,20\n".encode("latin-1"))
    assert D.read_csv(g).user_ids.tolist() == ["josé", "zoë"]


@pytest.mark.parametrize(
    "text, users",
    [
        ("user,item\nalice,x1\nbob,x2\nalice,x2\n", ["alice", "bob"]),  # names: a header
        ("userId,itemId,label\nalice,x1,1\nbob,x2,1\n", ["alice", "bob"]),
        ("alice,x1,5\n42,x2,4\nbob,x1,3\n", ["42", "alice", "bob"]),  # ids text in some rows
    ],
)
def test_csv_header_of_a_file_of_text_ids(tmp_path, text, users):
    # (the first was read as a row of user "user", the last lost alice's row as a header)
    assert D.read_csv(write(tmp_path / "t.csv", text)).user_ids.tolist() == users


def test_netflix_combined_and_training_set_layouts(tmp_path):
    movies = {
        1: [(1488844, 3, "2005-09-06"), (822109, 5, "2005-05-13")],
        2: [(885013, 4, "2004-10-19"), (1488844, 1, "2000-01-01")],
        17770: [(822109, 2, "2004-02-29")],
    }
    combined = write(tmp_path / "k" / "combined_data_1.txt", netflix_text(movies))
    write(tmp_path / "k" / "combined_data_2.txt", netflix_text({3: [(7, 4, "1999-12-31")]}))
    x = D.read_netflix(tmp_path / "k")
    assert pairs(x) == [
        (1488844, 1),
        (822109, 1),
        (885013, 2),
        (1488844, 2),
        (822109, 17770),
        (7, 3),
    ]
    assert x.timestamps[0] == 1125964800 and x.timestamps[-2] == 1078012800
    assert len(D.read_netflix(combined, min_rating=3)) == 3
    for m, rows in movies.items():
        write(tmp_path / "o" / "training_set" / f"mv_{m:07d}.txt", netflix_text({m: rows}))
    y = D.read_netflix(tmp_path / "o")
    assert y.fingerprint() == D.read_netflix(combined).fingerprint()


def test_netflix_writer_round_trip(tmp_path):
    x = D.synthetic(200, 120, 3000, seed=3)
    ratings = np.random.default_rng(0).integers(1, 6, len(x))
    D.write_netflix_format(x, tmp_path / "c", num_files=3, ratings=ratings)
    D.write_netflix_format(x, tmp_path / "t", layout="training_set")
    days = x.timestamps // 86400
    want = sorted(zip(x.users.tolist(), x.items.tolist(), days.tolist(), strict=True))
    for folder in ("c", "t"):
        y = D.read_netflix(tmp_path / folder)
        got = sorted(
            zip(
                y.user_ids[y.users].tolist(),
                y.item_ids[y.items].tolist(),
                (y.timestamps // 86400).tolist(),
                strict=True,
            )
        )
        assert got == want
    assert len(D.read_netflix(tmp_path / "c", min_rating=4)) == int((ratings >= 4).sum())
    # tiny chunks: movies continue across chunk boundaries
    small = D.read_netflix(tmp_path / "c", cache=False, chunk_bytes=1000)
    assert small.fingerprint() == D.read_netflix(tmp_path / "c").fingerprint()
    s = D.load(f"netflix:{tmp_path / 'c'}", num_negatives=20)
    assert s.name == f"netflix:{tmp_path / 'c'}" and s.test_negatives.shape[1] == 20


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("1:\n5,3,2005-09-06\n5,3,2005-13-06\n", 3, "date"),
        ("1:\n5,3,2005-02-30\n", 2, "date"),
        ("5,3,2005-09-06\n", 1, "MovieID"),
        ("1:\n5,3\n", 2, "expected"),
        ("1:\n5;3;2005-09-06\n", 2, "expected"),
        ("1:\n5,x,2005-09-06\n", 2, "expected"),
        ("1:\n2:x\n", 2, "expected"),
        ("1:\n5,3,2005-09-06\n5,300,2005-09-06\n", 3, "rating 300"),  # (int8 ratings)
        ("1:\n5,3,2005-09-06\n3000000000,3,2005-09-06\n", 3, "CustomerID"),  # (int32 ids)
        ("1:\n5,3,2005-09-06\n3000000000:\n", 3, "MovieID"),
    ],
)
def test_malformed_netflix(tmp_path, text, line, reason):
    f = write(tmp_path / "combined_data_1.txt", text)
    err = expect_error(lambda: D.read_netflix(f), f, line)
    assert reason in str(err)


def test_netflix_byte_order_mark_whatever_the_file_size(tmp_path):
    text = (
        b"\xef\xbb\xbf" + netflix_text({1: [(5, 3, "2005-09-06"), (6, 4, "2005-09-07")]}).encode()
    )
    f = write(tmp_path / "mv_0000001.txt", text)
    small = D.read_netflix(f, cache=False)  # read whole, with the other small files
    large = D.read_netflix(f, cache=False, chunk_bytes=8)  # read in chunks
    assert pairs(small) == pairs(large) == [(5, 1), (6, 1)]


def test_malformed_netflix_names_the_movie_file(tmp_path):
    write(tmp_path / "training_set" / "mv_0000001.txt", "1:\n5,3,2005-09-06\n")
    bad = write(tmp_path / "training_set" / "mv_0000002.txt", "2:\n5,3,2005-09-06\n6,4,2005-09\n")
    expect_error(lambda: D.read_netflix(tmp_path), bad, 3)
    write(bad, "5,3,2005-09-06\n")  # no MovieID line: the ratings must not go to movie 1
    expect_error(lambda: D.read_netflix(tmp_path), bad, 1)
    write(bad, "")
    expect_error(lambda: D.read_netflix(tmp_path), bad, 1)


def _ncf_files(tmp_path, train: str, negative: str | None = None) -> Path:
    prefix = tmp_path / "toy"
    write(tmp_path / "toy.train.rating", train)
    write(tmp_path / "toy.test.rating", "0\t2\t5\t300\n1\t0\t4\t200\n")
    write(tmp_path / "toy.test.negative", negative or "(0,2)\t3\t4\t5\n(1,0)\t4\t5\t6\n")
    return prefix


@pytest.mark.parametrize("timestamps", [False, True])
def test_ncf_reader(tmp_path, timestamps):
    train = "0\t0\t5\t1\n0\t1\t3\t2\n1\t1\t4\t3\n" if timestamps else "0\t0\t5\n0\t1\t3\n1\t1\t4\n"
    s = D.read_ncf(_ncf_files(tmp_path, train))
    assert (s.num_users, s.num_items) == (2, 7)  # max id + 1 over the three files
    assert s.train.users.tolist() == [0, 0, 1] and s.train.items.tolist() == [0, 1, 1]
    assert (s.train.timestamps is not None) == timestamps
    assert s.test_users.tolist() == [0, 1] and s.test_items.tolist() == [2, 0]
    assert s.test_negatives.tolist() == [[3, 4, 5], [4, 5, 6]]
    assert s.train_csr()[0].tolist() == [0, 2, 3]
    assert D.load(f"ncf:{tmp_path / 'toy'}").fingerprint() == s.fingerprint()


def test_ncf_malformed(tmp_path):
    prefix = _ncf_files(tmp_path, "0\t0\t5\n0\t1\n")
    expect_error(lambda: D.read_ncf(prefix), tmp_path / "toy.train.rating", 2)
    prefix = _ncf_files(tmp_path, "0\t0\t5\n", "(0,2)\t3\t4\t5\n(1,1)\t4\t5\t6\n")
    expect_error(lambda: D.read_ncf(prefix), tmp_path / "toy.test.negative", 2)
    prefix = _ncf_files(tmp_path, "0\t0\t5\n", "(0,2)\t3\t4\t5\n(1,0)\t4\t5\n")
    expect_error(lambda: D.read_ncf(prefix), tmp_path / "toy.test.negative", 2)
    with pytest.raises(ValueError, match="missing file"):
        D.load(f"ncf:{tmp_path / 'nothere'}")


def test_citeulike(tmp_path):
    f = write(tmp_path / "users.dat", "2 5 9\n1 9\n3 0 5 7\n")
    x = D.read_citeulike(f)
    assert pairs(x) == [(0, 5), (0, 9), (1, 9), (2, 0), (2, 5), (2, 7)]
    assert x.timestamps is None and x.item_ids.tolist() == [0, 5, 7, 9]
    bad = write(tmp_path / "bad.dat", "2 5 9\n2 9\n")
    assert "count field" in str(expect_error(lambda: D.read_citeulike(bad), bad, 2))
    bad = write(tmp_path / "bad2.dat", "2 5 9\n1 x\n")
    expect_error(lambda: D.read_citeulike(bad), bad, 2)


@pytest.mark.parametrize("big", ["99999999999999999999", "-99999999999999999999"])
def test_citeulike_ids_beyond_int64_are_an_error_not_clamped(tmp_path, big):
    # np.fromstring saturates them to the int64 maximum: two ids would become one item
    bad = write(tmp_path / "users.dat", f"1 5\n2 9223372036854775807 {big}\n")
    assert "int64 range" in str(expect_error(lambda: D.read_citeulike(bad), bad, 2))
    ok = write(tmp_path / "ok.dat", "1 9223372036854775807\n")  # the largest id itself reads
    assert D.read_citeulike(ok).item_ids.tolist() == [2**63 - 1]


def test_citeulike_cache_from_before_the_int64_check_is_not_used(tmp_path):
    from lrml_kernels.data import readers

    bad = write(tmp_path / "users.dat", "2 5 99999999999999999999\n")

    def clamped() -> dict:  # what that version read
        cols = {"users": np.zeros(2, np.int64), "items": np.array([5, 2**63 - 1])}
        return readers._finalize(bad, cols, None)

    readers._cached("citeulike", [bad], bad, {}, clamped, True)  # under that version's key
    expect_error(lambda: D.read_citeulike(bad), bad, 1)


def test_citeulike_byte_order_mark_and_no_items(tmp_path):
    f = write(tmp_path / "users.dat", b"\xef\xbb\xbf2 5 9\r\n1 9\r\n")  # as the other readers
    assert pairs(D.read_citeulike(f)) == [(0, 5), (0, 9), (1, 9)]
    empty = write(tmp_path / "empty.dat", "0\n0\n")  # a DataFormatError, not a failure deep inside
    assert "no items" in str(expect_error(lambda: D.load(f"citeulike:{empty}"), empty, None))


@pytest.mark.parametrize("compress", [False, True])
def test_netflix_mat(tmp_path, compress):
    sio = pytest.importorskip("scipy.io")
    x = np.array([[1, 5001], [2, 5001], [1, 5003], [3, 5002]], dtype=np.uint16)
    y = np.array([[4], [1], [5], [3]], dtype=np.uint8)
    sio.savemat(tmp_path / "train.mat", {"train_X": x, "train_Y": y}, do_compression=compress)
    sio.savemat(
        tmp_path / "test.mat",
        {"test_X": np.array([[2, 5003.0], [1, 5002.0]]), "test_Y": np.array([[2.0], [4.0]])},
        do_compression=compress,
    )
    got = D.readers.read_mat(tmp_path / "train.mat")
    assert got["train_X"].shape == (4, 2) and got["train_X"].dtype == np.uint16
    assert np.array_equal(got["train_X"], x) and np.array_equal(got["train_Y"], y)
    only = D.read_netflix_mat(tmp_path / "train.mat")
    assert pairs(only) == [(1, 5001), (2, 5001), (1, 5003), (3, 5002)]
    both = D.read_netflix_mat(tmp_path)  # the union, the test file last
    assert pairs(both)[4:] == [(2, 5003), (1, 5002)]
    assert both.timestamps is None and both.item_ids.tolist() == [5001, 5002, 5003]
    assert len(D.read_netflix_mat(tmp_path, min_rating=4)) == 3
    s = D.load(f"netflix-mat:{tmp_path}", num_negatives=0)
    # no times: each user's last row is held out, here a rating of the test file
    held = dict(zip(s.test_users.tolist(), s.test_items.tolist(), strict=True))
    assert {u: s.train.item_ids[i] for u, i in held.items()} == {0: 5002, 1: 5003}


def test_mat_rejects_what_it_does_not_read(tmp_path):
    sio = pytest.importorskip("scipy.io")
    hdf5 = write(tmp_path / "v73.mat", b"MATLAB 7.3 MAT-file".ljust(512) + b"\x89HDF\r\n\x1a\n")
    assert "v7.3" in str(expect_error(lambda: D.readers.read_mat(hdf5), hdf5, None))
    text = write(tmp_path / "text.mat", "user,item\n1,2\n")
    expect_error(lambda: D.readers.read_mat(text), text, None)
    sio.savemat(tmp_path / "cell.mat", {"c": np.array([[1, "a"]], dtype=object)})
    cell = tmp_path / "cell.mat"
    assert "dense real numeric" in str(expect_error(lambda: D.readers.read_mat(cell), cell, None))
    sio.savemat(tmp_path / "nox.mat", {"ratings": np.ones((3, 1))})
    nox = tmp_path / "nox.mat"
    expect_error(lambda: D.read_netflix_mat(nox), nox, None)
    sio.savemat(tmp_path / "noy.mat", {"a_X": np.ones((3, 2))})
    noy = tmp_path / "noy.mat"
    assert "a_Y" in str(expect_error(lambda: D.read_netflix_mat(noy), noy, None))
    # ids stored as floats must be integers: 1.5 was user 1, 12.7 item 12, NaN and 1e20 user -2^63
    for bad, words in [(1.5, "users (column 1): id 1.5"), (12.7, "items (column 2): id 12.7"),
                       (np.nan, "id nan"), (1e20, "id 1e+20")]:  # fmt: skip
        x = np.array([[1.0, 10.0], [2.0, 11.0], [2.0, 12.0]])
        x[2, 1 if bad == 12.7 else 0] = bad
        sio.savemat(tmp_path / "ids.mat", {"a_X": x, "a_Y": np.ones((3, 1))})
        f = tmp_path / "ids.mat"
        err = expect_error(lambda f=f: D.read_netflix_mat(f, cache=False), f, None)
        assert words in str(err) and "(row 3) is not an integer" in str(err)


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.delenv("LRML_KERNELS_CACHE_DIR")
    f = write(
        tmp_path / "u.data", "".join(f"{u}\t{u % 13}\t{u % 5 + 1}\t{u}\n" for u in range(500))
    )
    x = D.read_movielens(f)
    caches = list(tmp_path.glob(".u.data.lrml-cache.*.npz"))
    assert len(caches) == 1  # next to the file (the folder is writable)
    assert not list(tmp_path.glob("*.tmp"))

    def no_parsing(*a, **k):
        raise AssertionError("parsed again despite the cache")

    monkeypatch.setattr(_text, "read_table", no_parsing)
    y = D.read_movielens(f)
    assert y.fingerprint() == x.fingerprint() and y.name == x.name
    for name in ("users", "items", "timestamps", "user_ids", "item_ids"):  # as parsed
        assert getattr(y, name).dtype == getattr(x, name).dtype, name
    assert y.users.dtype == np.int32 and y.timestamps.dtype == np.int64
    monkeypatch.undo()  # other options: another cache entry, parsed anew
    monkeypatch.setenv("LRML_KERNELS_CACHE_DIR", str(tmp_path / "elsewhere"))
    z = D.read_movielens(f, min_rating=3)
    assert len(list((tmp_path / "elsewhere").glob("*.npz"))) == 1
    assert len(z) < len(x)
    # a changed file (size and mtime) invalidates the cache
    write(f, "1\t2\t3\t4\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert len(D.read_movielens(f)) == 1
    # a damaged cache file is rebuilt, not trusted
    for c in (tmp_path / "elsewhere").glob("*.npz"):
        c.write_bytes(b"garbage")
    assert len(D.read_movielens(f, min_rating=3)) == 1


def test_netflix_int32_ids_split_trains_and_evaluates(tmp_path):
    from lrml_kernels.metrics import evaluate
    from lrml_kernels.training import TrainConfig, fit

    src = D.synthetic(80, 60, 1500, seed=4)
    ratings = np.random.default_rng(1).integers(1, 6, len(src))
    D.write_netflix_format(src, tmp_path / "nf", num_files=2, ratings=ratings)
    x = D.read_netflix(tmp_path / "nf")  # parsed (and the cache written)
    y = D.read_netflix(tmp_path / "nf")  # from the cache
    for z in (x, y):
        assert z.users.dtype == z.items.dtype == np.int32
        assert z.timestamps.dtype == z.user_ids.dtype == z.item_ids.dtype == np.int64
    assert y.fingerprint() == x.fingerprint()
    # the same data held as int64: the same fingerprint (checkpoints of either resume)
    wide = D.Interactions(
        x.users.astype(np.int64), x.items.astype(np.int64), x.timestamps, x.num_users,
        x.num_items, x.user_ids, x.item_ids, x.name,
    )  # fmt: skip
    assert wide.users.dtype == np.int64 and wide.fingerprint() == x.fingerprint()
    s = D.leave_one_out(y, num_negatives=20)
    s_wide = D.leave_one_out(wide, num_negatives=20)
    assert s.train.users.dtype == s.train.items.dtype == s.test_items.dtype == np.int32
    assert s_wide.train.users.dtype == np.int64 and s_wide.fingerprint() == s.fingerprint()
    assert [a.dtype for a in s.train_csr()] == [np.int64, np.int32]
    assert all((a == b).all() for a, b in zip(s.train_csr(), s_wide.train_csr(), strict=True))

    cfg = TrainConfig(
        data="netflix", epochs=2, dim=8, memory_slots=4, negatives=2, batch_size=64,
        progress=False, backend="torch",
    )  # fmt: skip
    result = fit(cfg, tmp_path / "run", split=s)
    final = result["final"]
    assert np.isfinite(final["loss"]) and 0 <= final["hr"] <= 1 and 0 <= final["ndcg"] <= 1
    full = evaluate(result["model"], s, "full", 10)
    assert full["users"] == len(s.test_users) and 0 <= full["hr"] <= 1
    # int32 and int64 indices train alike, bit for bit, and a run resumes on either
    same = fit(cfg, None, split=s_wide)["final"]
    assert (same["loss"], same["hr"], same["ndcg"]) == (final["loss"], final["hr"], final["ndcg"])
    cfg.epochs = 3
    assert len(fit(cfg, tmp_path / "run", resume=True, split=s_wide)["epochs"]) == 3


def test_reindex_dedup_and_cache_in_small_chunks(tmp_path, monkeypatch):
    """The full-size loops (re-indexing, de-duplication by user ranges, compaction, cache
    read/write, fingerprints) give what one big step gives, with chunks of a few rows."""
    from lrml_kernels.data import interactions, readers

    rng = np.random.default_rng(0)
    n, U, I = 3000, 200, 30
    users = rng.integers(0, U, n).astype(np.int32)
    items = rng.integers(0, I, n).astype(np.int32)
    ts = rng.integers(0, 4, n).astype(np.int64)
    best: dict[tuple[int, int], int] = {}  # the latest time per pair, ties the later row
    for r in range(n):
        k = (int(users[r]), int(items[r]))
        if k not in best or ts[r] >= ts[best[k]]:
            best[k] = r
    want = np.zeros(n, dtype=bool)
    want[list(best.values())] = True
    assert readers._dedup_keep(users, items, ts, U, I).tolist() == want.tolist()
    u, i = np.divmod(rng.permutation(U * I)[:2000], I)
    u, i = u.astype(np.int32), i.astype(np.int32)

    src = D.synthetic(150, 90, 2500, seed=2)
    ratings = np.random.default_rng(3).integers(1, 6, len(src))
    D.write_netflix_format(src, tmp_path / "nf", num_files=2, ratings=ratings)
    big = [D.read_netflix(tmp_path / "nf", cache=False, min_rating=m) for m in (None, 3)]

    monkeypatch.setattr(readers, "_CHUNK", 7)
    monkeypatch.setattr(interactions, "_HASH_CHUNK", 5)
    for rows_per_block in (1, 13, 97):
        got = readers._dedup_keep(users, items, ts, U, I, rows_per_block=rows_per_block)
        assert got.tolist() == want.tolist()
        assert readers._dedup_keep(u, i, None, U, I, rows_per_block=rows_per_block) is None
    codes, uniques = readers._reindex(np.array([9, 2, 9, 5, 2], np.int32), inplace=True)
    assert codes.tolist() == [2, 0, 2, 1, 0] and uniques.tolist() == [2, 5, 9]
    codes, uniques = readers._reindex(np.array([7, 3, 7, 10**12, 3], np.int64))  # sparse ids
    assert codes.dtype == np.int32 and codes.tolist() == [1, 0, 1, 2, 0]
    assert uniques.tolist() == [3, 7, 10**12]
    for m, want_x in zip((None, 3), big, strict=True):
        x = D.read_netflix(tmp_path / "nf", min_rating=m, chunk_bytes=300)  # parse, write cache
        y = D.read_netflix(tmp_path / "nf", min_rating=m)  # read the cache
        assert x.fingerprint() == y.fingerprint() == want_x.fingerprint()
        assert (y.timestamps == want_x.timestamps).all() and y.users.dtype == np.int32


# --- splits and negatives ---


def interactions(users, items, timestamps=None, num_items=None) -> D.Interactions:
    users, items = np.asarray(users), np.asarray(items)
    U, I = int(users.max()) + 1, num_items or int(items.max()) + 1
    return D.Interactions(
        users, items, None if timestamps is None else np.asarray(timestamps), U, I,
        np.arange(U), np.arange(I), "toy",
    )  # fmt: skip


def test_leave_one_out_rules():
    M = MISSING_TIMESTAMP
    x = interactions(
        users=[0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 0],
        items=[1, 2, 3, 4, 5, 6, 7, 1, 2, 1, 8, 9, 2],
        timestamps=[5, 9, 7, 3, 3, 1, 4, M, 2, M, M, M, 9],
        num_items=12,
    )
    s = D.leave_one_out(x, num_negatives=0)
    # user 0: time 9 twice (rows 1 and 12, both item 2): the later row; user 1: tie at 3 -> row 4
    # user 2: one interaction -> no test row; user 3: the only known time wins over missing ones;
    # user 4: all missing -> the last row
    assert s.test_users.tolist() == [0, 1, 3, 4]
    assert s.test_items.tolist() == [2, 5, 2, 9]
    assert s.test_negatives is None
    train = sorted(zip(s.train.users.tolist(), s.train.items.tolist(), strict=True))
    assert train == [(0, 1), (0, 3), (1, 4), (1, 6), (2, 7), (3, 1), (3, 1), (4, 8)]
    indptr, indices = s.train_csr()
    assert indptr.tolist() == [0, 2, 4, 5, 6, 7] and indices.tolist() == [1, 3, 4, 6, 7, 1, 8]
    assert s.train_csr() is s.train_csr()
    s._csr = None  # the CSR derived by leave_one_out equals the one built from scratch
    assert [a.tolist() for a in s.train_csr()] == [indptr.tolist(), indices.tolist()]
    # without timestamps: the last row of each user
    s = D.leave_one_out(interactions([0, 0, 1, 1, 0], [3, 1, 2, 0, 2]), num_negatives=0)
    assert s.test_items.tolist() == [2, 0]


def keyset(users, items, num_items) -> set[int]:
    return set((np.asarray(users, dtype=np.int64) * num_items + np.asarray(items)).tolist())


def test_validation_split_rules():
    """The validation split is the test split's rule applied to the training data: the latest
    training item (timestamps; ties and missing times as for the test), users with two or more
    distinct training items only, negatives never interacted with (not even the test item)."""
    M = MISSING_TIMESTAMP
    x = interactions(
        users=[0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3],
        items=[1, 2, 3, 4, 4, 5, 6, 7, 8, 1, 2, 3, 1],
        timestamps=[5, 9, 7, 1, 3, 3, 1, 4, 5, M, 2, M, 8],
        num_items=12,
    )
    s = D.carve_validation(D.leave_one_out(x, num_negatives=4), seed=3)
    # test: 0 -> 2 (t 9), 1 -> 5 (tie at 3: later row), 2 -> 8, 3 -> 1 (t 8, row 12; row 9 too)
    assert s.test_items.tolist() == [2, 5, 8, 1]
    # validation, from what is left: 0 -> 3 (t 7), 1 -> 4 (t 3), 2 has one item left: none,
    # 3 -> 2 (the only known time)
    assert s.valid_users.tolist() == [0, 1, 3] and s.valid_items.tolist() == [3, 4, 2]
    train = sorted(zip(s.train.users.tolist(), s.train.items.tolist(), strict=True))
    assert train == [(0, 1), (0, 4), (1, 6), (2, 7), (3, 3)]
    assert s.valid_negatives.shape == (3, 4)
    seen = keyset(x.users, x.items, 12)
    for u, row in zip(s.valid_users, s.valid_negatives, strict=True):
        assert not seen & keyset([u] * 4, row, 12) and len(set(row.tolist())) == 4
    # the CSR of training and the "known" CSR (training + validation) of the full protocol
    assert [a.tolist() for a in s.train_csr()] == [[0, 2, 3, 4, 5], [1, 4, 6, 7, 3]]
    assert [a.tolist() for a in s.known_csr()] == [[0, 3, 5, 6, 8], [1, 3, 4, 4, 6, 7, 2, 3]]
    v = s.validation()
    assert v.test_items.tolist() == [3, 4, 2] and not v.has_validation
    assert v.train is s.train and v.known_csr() is v.train_csr()
    # seeded, on a stream of its own
    again = D.carve_validation(D.leave_one_out(x, num_negatives=4), seed=3)
    assert np.array_equal(again.valid_negatives, s.valid_negatives)
    # without timestamps file order is not time: a seeded random training row per user
    plain = D.leave_one_out(interactions([0, 0, 0, 0, 1], [3, 1, 2, 4, 0]), num_negatives=0)
    assert plain.test_items.tolist() == [4]
    picks = {D.carve_validation(plain, seed=k).valid_items[0] for k in range(12)}
    assert picks == {1, 2, 3}
    assert (
        D.carve_validation(plain, seed=5).valid_items
        == D.carve_validation(plain, seed=5).valid_items
    )
    assert D.carve_validation(plain).valid_negatives is None
    with pytest.raises(ValueError, match="already has a validation"):
        D.carve_validation(s)


@pytest.mark.parametrize("timestamps", [False, True])
def test_validation_item_is_never_the_test_item_of_files_split_elsewhere(tmp_path, timestamps):
    """A train file that holds its test pairs too: the test item is the latest training row (with
    timestamps) or any row (without), and still never the validation item."""
    rows = [(0, 0, 1), (0, 1, 2), (0, 2, 300), (1, 3, 5), (1, 0, 200), (2, 5, 7), (2, 6, 8)]
    body = "".join(f"{u}\t{i}\t5" + (f"\t{t}" if timestamps else "") + "\n" for u, i, t in rows)
    prefix = _ncf_files(tmp_path, body)  # test: 0 -> 2 (t 300), 1 -> 0 (t 200), both trained on
    for seed in range(8):
        s = D.load(f"ncf:{prefix}", validation=True, seed=seed)
        assert s.test_users.tolist() == [0, 1] and s.test_items.tolist() == [2, 0]
        valid = dict(zip(s.valid_users.tolist(), s.valid_items.tolist(), strict=True))
        assert valid.keys() == {0, 1, 2}
        assert valid[0] in {0, 1} and valid[1] == 3
        if timestamps:  # the latest of the other rows
            assert valid == {0: 1, 1: 3, 2: 6}
        train = set(zip(s.train.users.tolist(), s.train.items.tolist(), strict=True))
        assert (0, 2) in train and (1, 0) in train  # the test pairs stay training rows
        assert not train & set(valid.items())


def test_validation_is_disjoint_from_training_and_test():
    plain = D.load("synthetic-small", seed=5)
    s = D.load("synthetic-small", seed=5, validation=True)
    I = s.num_items
    train = keyset(s.train.users, s.train.items, I)
    valid = keyset(s.valid_users, s.valid_items, I)
    test = keyset(s.test_users, s.test_items, I)
    assert len(valid) == len(s.valid_users) > 250
    assert not train & valid and not valid & test and not train & test
    # nothing lost, the test split unchanged, and the validation negatives are unseen items
    assert train | valid == keyset(plain.train.users, plain.train.items, I)
    assert np.array_equal(s.test_items, plain.test_items)
    assert np.array_equal(s.test_negatives, plain.test_negatives)
    assert s.valid_negatives.shape == (len(s.valid_users), plain.num_negatives)
    rows = np.repeat(s.valid_users.astype(np.int64), s.valid_negatives.shape[1])
    assert not keyset(rows, s.valid_negatives.ravel(), I) & (train | valid | test)
    assert not np.array_equal(s.valid_negatives, plain.test_negatives[: len(s.valid_users)])
    assert s.fingerprint() != plain.fingerprint()
    assert [a.tolist() for a in s.known_csr()] == [a.tolist() for a in plain.train_csr()]


def test_evaluation_negatives():
    rng = np.random.default_rng(1)
    n, U, I = 20_000, 400, 300
    x = interactions(rng.integers(0, U, n), rng.integers(0, I, n), rng.integers(0, 10**6, n), I)
    s = D.leave_one_out(x, num_negatives=100, seed=7)
    neg = s.test_negatives
    assert neg.shape == (len(s.test_users), 100) and neg.dtype == np.int64
    assert (np.diff(neg, axis=1) > 0).all()  # sorted, no repeats
    seen = set(zip(x.users.tolist(), x.items.tolist(), strict=True))
    assert not any(
        (u, i) in seen
        for u, row in zip(s.test_users.tolist(), neg.tolist(), strict=True)
        for i in row
    )
    assert not (neg == s.test_items[:, None]).any()
    again = D.leave_one_out(x, num_negatives=100, seed=7)
    assert np.array_equal(again.test_negatives, neg) and again.fingerprint() == s.fingerprint()
    other = D.leave_one_out(x, num_negatives=100, seed=8)
    assert not np.array_equal(other.test_negatives, neg) and other.fingerprint() != s.fingerprint()
    # uniform: every never-interacted item shows up about equally often
    counts = np.bincount(neg.ravel(), minlength=I)
    assert counts.min() > 0.5 * counts.mean()


def test_evaluation_negatives_dense_users_and_too_few_items():
    # user 0 interacted with 45 of 50 items: only 5 candidates are left
    users = [0] * 45 + [1, 1]
    items = list(range(45)) + [0, 1]
    s = D.leave_one_out(interactions(users, items, num_items=50), num_negatives=5, seed=0)
    assert s.test_negatives[0].tolist() == [45, 46, 47, 48, 49]
    assert not np.isin(s.test_negatives[1], [0, 1]).any()
    with pytest.raises(ValueError, match="fewer than num_negatives=6"):
        D.leave_one_out(interactions(users, items, num_items=50), num_negatives=6)


def test_too_few_negatives_names_the_users_own_id(tmp_path):
    # (named the re-indexed user: "user 1" for "bob", an id the file does not hold)
    rows = ["alice,a", "alice,b", "bob,a", "bob,b", "bob,c", "carol,c", "carol,a"]
    f = write(tmp_path / "l.csv", "user,item\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"\(e\.g\. user bob: 0 of 3\)"):
        D.load(f"csv:{f}", num_negatives=1, cache=False)


@pytest.mark.parametrize("timestamps", ["known", "some missing", "none"])
def test_leave_one_out_in_place_and_in_small_chunks(monkeypatch, timestamps):
    """``load`` lets the split compact the training rows inside the log's own arrays (and the
    keys are de-duplicated and thinned in place): the same split as copying, chunk after chunk,
    and ``leave_one_out`` leaves the log it is given unchanged."""
    from lrml_kernels.data import split as S

    rng = np.random.default_rng(3)
    n, U, I = 6_000, 120, 200
    ts = None
    if timestamps != "none":
        ts = rng.integers(0, 20, n) * 86_400  # many ties
        if timestamps == "some missing":
            ts[rng.random(n) < 0.3] = MISSING_TIMESTAMP
    users, items = rng.integers(0, U, n).astype(np.int32), rng.integers(0, I, n).astype(np.int32)

    def log():
        return interactions(users.copy(), items.copy(), None if ts is None else ts.copy(), I)

    ref = D.leave_one_out(log(), num_negatives=30, seed=5)  # one chunk: the plain path
    monkeypatch.setattr(S, "_CHUNK", 97)  # redraws in smaller groups, from the same stream
    monkeypatch.setattr(S, "_CHECK", 40)  # and key look-ups of one row at a time
    for consume in (False, True):
        x = log()
        fp = x.fingerprint()
        s = S._leave_one_out(x, 30, 5, consume=consume)
        if not consume:
            assert x.fingerprint() == fp
        assert s.fingerprint() == ref.fingerprint()
        for a, b in [
            (s.train.users, ref.train.users),
            (s.train.items, ref.train.items),
            (s.train.timestamps, ref.train.timestamps),
            (s.test_users, ref.test_users),
            (s.test_items, ref.test_items),
            (s.test_negatives, ref.test_negatives),
            *zip(s.train_csr(), ref.train_csr(), strict=True),
        ]:
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
        built = D.build_csr(s.train.users, s.train.items, U, I)
        assert all(np.array_equal(a, b) for a, b in zip(built, s.train_csr(), strict=True))


def test_data_format_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(DataFormatError("/x/u.data", 7, "bad")))
    assert (err.path, err.line, err.reason, str(err)) == (
        "/x/u.data",
        7,
        "bad",
        "/x/u.data, line 7: bad",
    )


def test_split_and_interactions_validation():
    with pytest.raises(ValueError, match="items must lie"):
        D.Interactions(np.array([0]), np.array([3]), None, 1, 3, np.arange(1), np.arange(3))
    with pytest.raises(ValueError, match="differ"):
        D.Interactions(np.array([0, 0]), np.array([1]), None, 1, 3, np.arange(1), np.arange(3))
    x = interactions([0, 1], [1, 2])
    y = interactions([0, 1], [1, 0])
    assert x.fingerprint() != y.fingerprint() and len(x) == 2


# --- training negatives (torch) ---


def test_csr_membership_matches_numpy(one_thread):
    rng = np.random.default_rng(0)
    x = interactions(rng.integers(0, 50, 3000), rng.integers(0, 80, 3000), num_items=80)
    indptr, indices = D.build_csr(x.users, x.items, x.num_users, x.num_items)
    rows = rng.integers(0, x.num_users, 500)
    vals = rng.integers(0, 80, (500, 7))
    truth = np.array(
        [
            [v in set(indices[indptr[r] : indptr[r + 1]].tolist()) for v in vr]
            for r, vr in zip(rows, vals, strict=True)
        ]
    )
    got = D.csr_membership(*(torch.from_numpy(a) for a in (indptr, indices, rows, vals)))
    assert np.array_equal(got.numpy(), truth)
    assert np.array_equal(D.split.csr_contains(indptr, indices, rows[:, None], vals), truth)


def test_csr_remove_matches_a_rebuild(one_thread):
    rng = np.random.default_rng(1)
    x = interactions(rng.integers(0, 50, 3000), rng.integers(0, 80, 3000), num_items=80)
    indptr, indices = D.build_csr(x.users, x.items, x.num_users, x.num_items)
    rows = rng.integers(0, x.num_users, 400)
    vals = rng.integers(0, 80, 400)  # some present, some absent, some pairs twice
    gone = set(zip(rows.tolist(), vals.tolist(), strict=True))
    keep = [
        (u, i)
        for u, i in zip(x.users.tolist(), x.items.tolist(), strict=True)
        if (u, i) not in gone
    ]
    want = D.build_csr(*np.array(keep).T, x.num_users, x.num_items)
    got = D.split.csr_remove(indptr, indices, rows, vals)
    assert [a.tolist() for a in got] == [a.tolist() for a in want]
    assert got[1].dtype == indices.dtype
    assert [a.tolist() for a in D.split.csr_remove(*want, rows, vals)] == [a.tolist() for a in want]


def test_sample_negatives_rejects_positives(one_thread):
    s = D.load("synthetic-small")
    indptr, indices = (torch.from_numpy(a) for a in s.train_csr())
    users = torch.arange(s.num_users).repeat(4)
    g = torch.Generator().manual_seed(0)
    neg = D.sample_negatives(users, s.num_items, 16, generator=g, exclude_csr=(indptr, indices))
    assert neg.shape == (users.numel(), 16) and neg.dtype == torch.int64
    assert 0 <= int(neg.min()) and int(neg.max()) < s.num_items
    assert not D.csr_membership(indptr, indices, users, neg).any()
    again = D.sample_negatives(
        users,
        s.num_items,
        16,
        generator=torch.Generator().manual_seed(0),
        exclude_csr=(indptr, indices),
    )
    assert torch.equal(neg, again)
    plain = D.sample_negatives(users, s.num_items, 16, generator=torch.Generator().manual_seed(0))
    assert D.csr_membership(indptr, indices, users, plain).any()  # there was something to exclude
    # a user who owns 90% of the catalogue still gets only items outside it
    heavy = interactions([0] * 180 + [1], list(range(180)) + [0], num_items=200)
    ip, ix = (torch.from_numpy(a) for a in D.build_csr(heavy.users, heavy.items, 2, 200))
    neg = D.sample_negatives(
        torch.zeros(64, dtype=torch.int64), 200, 8, exclude_csr=(ip, ix), max_tries=300
    )
    assert (neg >= 180).all()


# --- synthetic data ---


def test_synthetic_shapes_determinism_long_tail():
    x = D.synthetic(3000, 2000, 150_000, seed=0)
    assert (x.num_users, x.num_items) == (3000, 2000)
    assert 0.97 * 150_000 <= len(x) <= 150_000
    assert len(np.unique(x.users * 2000 + x.items)) == len(x)  # no duplicate pairs
    assert np.all(np.diff(x.users) >= 0)
    same_user = x.users[1:] == x.users[:-1]
    assert np.all(np.diff(x.timestamps)[same_user] > 0)  # strictly increasing per user
    assert np.bincount(x.users, minlength=3000).min() >= 5
    counts = np.sort(np.bincount(x.items, minlength=2000))[::-1]
    assert counts[:200].sum() > 0.3 * len(x)  # top 10% of items: over 30% of the interactions
    activity = np.sort(np.bincount(x.users))[::-1]
    assert activity[:300].sum() > 0.3 * len(x)
    assert D.synthetic(3000, 2000, 150_000, seed=0).fingerprint() == x.fingerprint()
    assert D.synthetic(3000, 2000, 150_000, seed=1).fingerprint() != x.fingerprint()


def test_synthetic_data_and_split_are_the_same_as_when_first_pinned():
    """Speed-ups of the generator, the split and the negatives keep every bit: the built-in
    synthetic set and its split (with 100 negatives) hash as they did (December 2026). A change
    of these fingerprints changes the data every recorded result was measured on: say so."""
    x = D.synthetic(3000, 2000, 150_000, seed=0)
    assert x.fingerprint().startswith("0709e113229ef548cf8ec518")
    assert D.load("synthetic").fingerprint().startswith("87a27f6578c7838193d74fb4")
    assert D.load("synthetic-small", seed=3).fingerprint().startswith("e17a3d6b5c0b8945c47545d4")


def test_evaluation_negatives_for_users_in_any_order():
    rng = np.random.default_rng(2)
    n, U, I = 5_000, 100, 120
    users, items = rng.integers(0, U, n), rng.integers(0, I, n)
    keys = np.unique(users * I + items)
    indptr = np.searchsorted(keys, np.arange(U + 1) * I)
    who = rng.permutation(U)[:60]  # not ascending
    neg = D.sample_eval_negatives(keys, indptr, who, I, 20, np.random.default_rng(0))
    assert (np.diff(neg, axis=1) > 0).all()
    assert not np.isin(who[:, None] * I + neg, keys).any()


def test_synthetic_structure_beats_popularity():
    """The latent clusters are learnable: item-kNN beats popularity on the sampled protocol."""
    s = D.load("synthetic", num_negatives=100, seed=0)
    U, I = s.num_users, s.num_items
    R = np.zeros((U, I), dtype=np.float32)
    R[s.train.users, s.train.items] = 1.0
    sim = R.T @ R
    np.fill_diagonal(sim, 0.0)
    sim /= np.sqrt(np.outer(R.sum(0), R.sum(0))) + 1e-9
    cand = np.concatenate([s.test_items[:, None], s.test_negatives], axis=1)

    def hr10(score):  # ties count against the held-out item
        return float(((score[:, 1:] >= score[:, :1]).sum(1) < 10).mean())

    pop = R.sum(0)[cand]
    knn = np.take_along_axis(R[s.test_users] @ sim, cand, axis=1)
    assert hr10(knn) > hr10(pop) + 0.1, (hr10(knn), hr10(pop))


def test_load_forms_and_errors(tmp_path):
    s = D.load("synthetic-small", num_negatives=10, seed=3)
    assert (s.num_users, s.num_items, s.num_negatives) == (
        300,
        200,
        10,
    ) and s.name == "synthetic-small"
    assert D.load("synthetic-small", num_negatives=None).test_negatives is None
    for bad in ("nonsense", "movielens:", "mnist:/x"):
        with pytest.raises(ValueError, match="accepted data sets") as info:
            D.load(bad)
        assert "ncf:PATH_PREFIX" in str(info.value) and "synthetic-netflix" in str(info.value)
    with pytest.raises(ValueError, match="no such file"):
        D.load(f"movielens:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="min_rating"):
        D.load("synthetic-small", min_rating=4)
    write(tmp_path / "r.csv", "1,1,5,1\n1,2,5,2\n2,1,3,1\n2,3,5,9\n")
    s = D.load(f"csv:{tmp_path / 'r.csv'}", min_rating=4, num_negatives=0)
    assert s.test_users.tolist() == [0] and s.train.user_ids.tolist() == [1, 2]


# --- the real data sets in ../shared/data ---


def test_real_movielens_100k():
    x = D.read_movielens(shared("movielens-100k"))
    assert (x.num_users, x.num_items, len(x)) == (943, 1682, 100_000)
    assert x.user_ids.tolist() == list(range(1, 944)) and x.item_ids[-1] == 1682
    assert len(D.read_movielens(shared("movielens-100k", "u.data"), min_rating=4)) == 55_375
    s = D.load(f"movielens:{shared('movielens-100k')}")
    assert len(s.test_users) == 943 and len(s.train) == 100_000 - 943


def test_real_movielens_1m_reconstructed():
    x = D.read_movielens(shared("movielens-1m"))
    assert (x.num_users, x.num_items, len(x)) == (6040, 3706, 1_000_205)
    assert int((x.timestamps == MISSING_TIMESTAMP).sum()) == 1_000_205 - 663_062
    assert len(D.read_movielens(shared("movielens-1m"), min_rating=4)) == 575_281


def test_real_ncf_ml_1m():
    s = D.read_ncf(shared("ncf-ml-1m") / "ml-1m")
    assert (s.num_users, s.num_items, len(s.train)) == (6040, 3706, 994_165)
    assert s.test_users.tolist() == list(range(6040)) and s.test_negatives.shape == (6040, 99)
    assert s.train.timestamps is None
    # Upstream drew negatives among items absent from the user's *train* set: 156 rows list the
    # user's own test item (the README names user 4509); kept as published.
    own = np.flatnonzero((s.test_negatives == s.test_items[:, None]).any(1))
    assert len(own) == 156 and 4509 in own
    indptr, indices = s.train_csr()
    in_train = D.split.csr_contains(indptr, indices, s.test_users[:, None], s.test_negatives)
    assert not in_train.any()  # no negative is a training item of its user
    assert not D.split.csr_contains(indptr, indices, s.test_users, s.test_items).any()


def test_real_leave_one_out_agrees_with_ncf():
    """ML-1M held out by our rule vs NCF's official test ratings: wherever the rebuilt file knows
    the time of NCF's test rating, our held-out rating has that same (latest) time."""
    x = D.read_movielens(shared("movielens-1m"))
    s = D.leave_one_out(x, num_negatives=0)
    key = x.users * x.num_items + x.items
    order = np.argsort(key)

    def time_of(users, items):
        return x.timestamps[order[np.searchsorted(key[order], users * x.num_items + items)]]

    ncf = np.loadtxt(shared("ncf-ml-1m", "ml-1m.test.rating"), dtype=np.int64)
    movies = np.loadtxt(
        shared("ncf-ml-1m", "ncf_item_to_movielens_movie_id.tsv"), dtype=np.int64, skiprows=1
    )
    movie_of = dict(movies.tolist())
    users = np.searchsorted(x.user_ids, ncf[:, 0] + 1)  # NCF user = MovieLens UserID - 1
    items = np.searchsorted(x.item_ids, [movie_of[i] for i in ncf[:, 1].tolist()])
    assert s.test_users.tolist() == users.tolist()
    known = time_of(users, items) != MISSING_TIMESTAMP
    assert known.sum() == 4343  # as the data README counts
    ours = time_of(s.test_users, s.test_items)
    assert np.array_equal(ours[known], ncf[known, 3])


@pytest.mark.parametrize(
    "spec, counts",
    [
        ("movielens:movielens-latest-small", (610, 9724, 100_836)),
        ("csv:netflix-prize-subsets/netflix_subset.csv", (2949, 2429, 102_650)),
        ("netflix:netflix-prize-subsets/netflix-user-ratings-10k.csv", (9687, 3451, 10_000)),
        ("citeulike:citeulike-a/users.dat", (5551, 16_980, 204_986)),
        ("netflix-mat:netflix-prize-subsets", (4953, 4591, 305_725)),
    ],
)
def test_real_other_sets(spec, counts):
    kind, _, rel = spec.partition(":")
    reader = {
        "movielens": D.read_movielens,
        "csv": D.read_csv,
        "netflix": D.read_netflix,
        "citeulike": D.read_citeulike,
        "netflix-mat": D.read_netflix_mat,
    }[kind]
    x = reader(shared(*rel.split("/")))
    assert (x.num_users, x.num_items, len(x)) == counts
    s = D.load(f"{kind}:{shared(*rel.split('/'))}", num_negatives=50)
    assert s.test_negatives.shape == (len(s.test_users), 50)


# --- Netflix scale (not in the default suite) ---


@pytest.mark.slow
def test_synthetic_netflix_size(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("Netflix size (about a minute, 2 GB): run with -m slow")
    t = time.perf_counter()
    x = D.synthetic(480_189, 17_770, 100_000_000)
    elapsed = time.perf_counter() - t
    assert (x.num_users, x.num_items) == (480_189, 17_770)
    assert len(x) > 0.97 * 100_000_000
    assert elapsed < 120, elapsed


# --- negative sampling with the C++ extension ---


@pytest.fixture
def sample_op():
    from lrml_kernels.data._compiled import data_op

    op = data_op("sample_negatives")
    if op is None:
        pytest.skip("the C++ extension is unavailable")
    return op


def draws_on_every_path(users, num_items, k, csr, **kw):
    """The negatives of seed 3 from the extension on 1 and 2 threads, from the torch ops, and from
    the extension with the CSR's indices in the other width (int32 / int64): the draws depend on
    neither the path, the number of threads nor the width."""
    threads = torch.get_num_threads()
    other = (csr[0], csr[1].to(torch.int64 if csr[1].dtype == torch.int32 else torch.int32))
    runs = []
    try:
        for ext, n, rows in ((True, 1, csr), (True, 2, csr), (False, 1, csr), (True, 1, other)):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(3)
            runs.append(
                D.sample_negatives(
                    users, num_items, k, generator=gen, exclude_csr=rows, use_extension=ext, **kw
                )
            )
    finally:
        torch.set_num_threads(threads)
    return runs


def test_sample_negatives_extension_matches_fallback(sample_op):
    s = D.load("synthetic-small")
    csr = tuple(torch.from_numpy(a) for a in s.train_csr())
    users = torch.arange(s.num_users).repeat(4)
    for k in (0, 1, 16):
        runs = draws_on_every_path(users, s.num_items, k, csr)
        assert all(torch.equal(runs[0], other) for other in runs[1:])
        assert not D.csr_membership(*csr, users, runs[0]).any()
    empty = D.sample_negatives(users[:0], s.num_items, 4, exclude_csr=csr, use_extension=True)
    assert empty.shape == (0, 4)
    torch.library.opcheck(
        torch.ops.lrml_ext.sample_negatives.default,
        (*csr, None, users[:8], s.num_items, 3, 12345, 32),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_sample_negatives_redraws_alike(sample_op):
    # span 1.5 * 2**30: 2**32 mod span = 2**30, so a quarter of the Philox words are unfair and
    # redrawn; both paths must redraw the same entries with the same counters
    n = 3 * 2**29
    csr = (torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    users = torch.tensor([0, 1] * 2048)
    draws = {}
    for ext in (True, False):
        for tries in (0, 32):
            g = torch.Generator().manual_seed(5)
            draws[ext, tries] = D.sample_negatives(
                users, n, 4, generator=g, exclude_csr=csr, max_tries=tries, use_extension=ext
            )
    assert torch.equal(draws[True, 0], draws[False, 0])
    assert torch.equal(draws[True, 32], draws[False, 32])
    redrawn = (draws[True, 0] != draws[True, 32]).float().mean()
    assert 0.2 < float(redrawn) < 0.3  # about a quarter of the entries took a second word
    assert int(draws[True, 32].min()) >= 0 and int(draws[True, 32].max()) < n


def test_sample_negatives_checks_its_inputs(sample_op):
    ip, ix = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 0])
    for ext in (True, False):
        with pytest.raises(IndexError, match="out"):
            D.sample_negatives(
                torch.tensor([0, 2, 0]), 5, 2, exclude_csr=(ip, ix), use_extension=ext
            )
    with pytest.raises(ValueError, match="decreasing"):
        sample_op(torch.tensor([0, 2, 1]), ix, None, torch.tensor([1]), 5, 2, 0, 32)
    with pytest.raises(ValueError, match="indices.numel"):
        sample_op(torch.tensor([0, 2, 9]), ix, None, torch.tensor([1]), 5, 2, 0, 32)
    with pytest.raises(TypeError, match="int64"):
        sample_op(ip.int(), ix, None, torch.tensor([1]), 5, 2, 0, 32)
    with pytest.raises(ValueError, match="num_items"):
        sample_op(ip, ix, None, torch.tensor([1]), 2**31, 2, 0, 32)


def test_training_batch_is_the_gathers_and_the_negatives(sample_op):
    s = D.load("synthetic-small")
    csr = tuple(torch.from_numpy(a) for a in s.train_csr())
    rows = torch.randint(0, len(s.train), (300,), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.int32, torch.int64):
        train_u = torch.as_tensor(s.train.users).to(dtype)
        train_i = torch.as_tensor(s.train.items).to(dtype)
        users, items = torch.ops.lrml_ext.training_batch(
            rows, train_u, train_i, *csr, None, s.num_items, 4, 99, 32, dtype == torch.int32
        )
        want_u = train_u[rows].long()
        assert torch.equal(users, want_u) and items.shape == (300, 5)
        assert torch.equal(items[:, 0], train_i[rows].long())
        assert torch.equal(items[:, 1:], sample_op(*csr, None, want_u, s.num_items, 4, 99, 32))
    with pytest.raises(IndexError, match="rows"):
        torch.ops.lrml_ext.training_batch(
            torch.tensor([len(s.train)]), train_u, train_i, *csr, None, s.num_items, 4, 0, 32, True
        )
    with pytest.raises(TypeError, match="both int32 or both int64"):
        torch.ops.lrml_ext.training_batch(
            rows, train_u, train_i.int(), *csr, None, s.num_items, 4, 0, 32, True
        )
    torch.library.opcheck(
        torch.ops.lrml_ext.training_batch.default,
        (rows[:8], train_u, train_i, *csr, None, s.num_items, 3, 12345, 32, True),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("use_extension", [True, False])
def test_sample_negatives_edge_cases_and_uniformity(one_thread, sample_op, use_extension):
    # user 0 has trained on all items but 7: every draw is 7; user 1 on none, user 2 on the
    # evens, user 3 on all of them (any item)
    n = 10
    heavy = interactions(
        [0] * (n - 1) + [2] * (n // 2) + [3] * n,
        [i for i in range(n) if i != 7] + list(range(0, n, 2)) + list(range(n)),
        num_items=n,
    )
    csr = tuple(torch.from_numpy(a) for a in D.build_csr(heavy.users, heavy.items, 4, n))
    users = torch.tensor([0] * 50 + [1] * 4000 + [2] * 4000 + [3] * 400)
    neg = D.sample_negatives(
        users, n, 5, generator=torch.Generator().manual_seed(1), exclude_csr=csr,
        use_extension=use_extension,
    )  # fmt: skip
    assert (neg[:50] == 7).all()
    assert (neg[4050:8050] % 2 == 1).all()
    assert set(neg[8050:].unique().tolist()) == set(range(n))
    # chi-square against uniform (df = 9 and 4; 0.999 quantiles 27.9 and 18.5)
    for part, support in ((neg[50:4050], range(n)), (neg[4050:8050], range(1, n, 2))):
        counts = torch.bincount(part.reshape(-1), minlength=n)[list(support)].double()
        expected = part.numel() / len(support)
        assert float(((counts - expected) ** 2 / expected).sum()) < (
            27.9 if len(support) == n else 18.5
        )


# --- popularity-aware negatives ---


def test_popularity_cdf_gives_each_item_its_share():
    counts = torch.tensor([0, 3, 8, 0, 99])
    for alpha in (0.0, 0.5, 1.0):
        cdf = D.popularity_cdf(counts, alpha)
        assert cdf.dtype == torch.int64 and cdf.shape == (6,)
        assert int(cdf[0]) == 0 and int(cdf[-1]) == 2**32
        share = cdf.diff().double() / 2**32
        want = (counts.double() + 1.0) ** alpha
        assert torch.allclose(share, want / want.sum(), atol=1e-8)
        assert (cdf.diff() >= 1).all()
    # every item keeps at least one word, however rare
    tiny = D.popularity_cdf(torch.tensor([0, 10**9]), 1.0)
    assert tiny.diff().tolist()[0] >= 1
    for bad, match in ((-0.5, "alpha"), (float("nan"), "alpha"), (float("inf"), "alpha")):
        with pytest.raises(ValueError, match=match):
            D.popularity_cdf(counts, bad)
    with pytest.raises(ValueError, match="non-negative"):
        D.popularity_cdf(torch.tensor([1, -1]), 0.5)
    with pytest.raises(ValueError, match="overflows"):
        D.popularity_cdf(torch.tensor([10**9, 1]), 40.0)
    with pytest.raises(ValueError, match="num_items"):
        D.popularity_cdf(torch.tensor([], dtype=torch.int64), 0.5)


def popularity_case(seed=0, num_users=300, num_items=97):
    """Random ascending rows of every length from 0 to num_items, and their items' CDF."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_users):
        c = int(torch.randint(0, num_items + 1, (1,), generator=g))
        rows.append(torch.randperm(num_items, generator=g)[:c].sort().values)
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    indices = torch.cat(rows)
    cdf = D.popularity_cdf(torch.bincount(indices, minlength=num_items), 0.5)
    return (indptr, indices), cdf


def test_popularity_negatives_every_path_alike(sample_op):
    csr, cdf = popularity_case()
    n = cdf.numel() - 1
    users = torch.randint(0, 300, (1023,), generator=torch.Generator().manual_seed(1))
    for k in (0, 1, 13):
        runs = draws_on_every_path(users, n, k, csr, popularity=cdf)
        assert all(torch.equal(runs[0], other) for other in runs[1:])
        full = (csr[0][users + 1] - csr[0][users]) >= n
        assert not D.csr_membership(*csr, users, runs[0])[~full].any()
    uniform = D.sample_negatives(
        users, n, 13, generator=torch.Generator().manual_seed(3), exclude_csr=csr
    )
    same = (uniform == runs[0]).float().mean()
    assert 0.2 < float(same) < 0.9  # the owned draws fell back to the uniform ones, not all
    torch.library.opcheck(
        torch.ops.lrml_ext.sample_negatives.default,
        (*csr, cdf, users[:8], n, 3, 12345, 32),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("use_extension", [True, False])
def test_popularity_negatives_follow_the_weights(one_thread, sample_op, use_extension):
    # user 0 owns nothing: item i with probability share[i]; user 1 owns items 0-2, whose share
    # is spread evenly over the other 7
    n = 10
    counts = torch.tensor([50, 40, 30, 20, 10, 5, 4, 3, 2, 1])
    cdf = D.popularity_cdf(counts, 0.75)
    share = cdf.diff().double() / 2**32
    csr = (torch.tensor([0, 0, 3]), torch.tensor([0, 1, 2]))
    users = torch.tensor([0] * 4000 + [1] * 4000)
    neg = D.sample_negatives(
        users, n, 5, generator=torch.Generator().manual_seed(2), exclude_csr=csr,
        use_extension=use_extension, popularity=cdf,
    )  # fmt: skip
    owned = share[:3].sum()
    spread = torch.cat([torch.zeros(3, dtype=torch.float64), share[3:] + owned / 7])
    # chi-square (df = 9 and 6; 0.999 quantiles 27.9 and 22.5)
    for part, p, limit in ((neg[:4000], share, 27.9), (neg[4000:], spread, 22.5)):
        counts_seen = torch.bincount(part.reshape(-1), minlength=n).double()
        expected = p * part.numel()
        keep = expected > 0
        assert counts_seen[~keep].sum() == 0
        stat = ((counts_seen[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert float(stat) < limit


def test_popularity_negatives_check_their_inputs(sample_op):
    csr, cdf = popularity_case(num_users=5, num_items=7)
    users = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="need exclude_csr"):
        D.sample_negatives(users, 7, 2, popularity=cdf)
    for bad in (cdf[:-1], cdf.int(), cdf.double()):
        for ext in (True, False):
            with pytest.raises(ValueError, match="popularity must be int64"):
                D.sample_negatives(users, 7, 2, exclude_csr=csr, popularity=bad, use_extension=ext)
    shifted = cdf.clone()
    shifted[-1] -= 1
    with pytest.raises(ValueError, match="from 0 to 2"):
        sample_op(*csr, shifted, users, 7, 2, 0, 32)
    with pytest.raises(ValueError, match="num_items \\+ 1"):
        sample_op(*csr, cdf, users, 6, 2, 0, 32)


# --- the extension's set-up ops (synthetic data, split, evaluation negatives) ---


@pytest.fixture
def numpy_only(monkeypatch):
    """Runs the code under test on its numpy fallback, as where the extension cannot load."""
    from lrml_kernels.data import _compiled
    from lrml_kernels.data import split as S
    from lrml_kernels.data import synthetic_data as SD

    if _compiled.data_op("latest_rows") is None:
        pytest.skip("the C++ extension is unavailable: nothing to compare the fallback with")

    def fallback():
        for module in (S, SD):
            monkeypatch.setattr(module, "data_op", lambda name: None)

    return fallback


def same_arrays(a, b) -> bool:
    return (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))


@pytest.mark.parametrize(
    "sizes",
    [
        (300, 200, 6_000),
        (50, 60, 2_000),  # heavy users run out of reachable items: fewer rows than asked
        (2_000, 40, 30_000),  # one cluster
        (4_000, 3_000, 400_000),  # several chunks of users
    ],
)
def test_synthetic_extension_matches_fallback(numpy_only, sizes):
    compiled = D.synthetic(*sizes, seed=4)
    numpy_only()
    plain = D.synthetic(*sizes, seed=4)
    for a, b in [
        (compiled.users, plain.users),
        (compiled.items, plain.items),
        (compiled.timestamps, plain.timestamps),
    ]:
        assert same_arrays(a, b)
    assert compiled.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize("timestamps", ["known", "some missing", "none"])
@pytest.mark.parametrize("index", [np.int32, np.int64])
def test_split_extension_matches_fallback(numpy_only, timestamps, index):
    rng = np.random.default_rng(11)
    n, U, I = 20_000, 300, 400
    users = rng.integers(0, U, n)
    users[:5] = np.arange(U, U + 5)  # users of one row: no test row
    items = rng.integers(0, I, n)
    ts = None
    if timestamps != "none":
        ts = rng.integers(0, 50, n) * 86_400  # many ties
        if timestamps == "some missing":
            ts[rng.random(n) < 0.3] = MISSING_TIMESTAMP

    def log():
        return interactions(
            users.astype(index), items.astype(index), None if ts is None else ts.copy(), I
        )

    def run():
        s = D.leave_one_out(log(), num_negatives=40, seed=2)
        return (
            s,
            D.carve_validation(s, seed=2),
            D.build_csr(users, items, U + 5, 10**7),
        )  # sorts, no bitmap

    compiled = run()
    numpy_only()
    plain = run()
    for c, p in zip(compiled[:2], plain[:2], strict=True):
        assert c.fingerprint() == p.fingerprint()
        for a, b in [
            (c.train.users, p.train.users),
            (c.test_items, p.test_items),
            (c.test_negatives, p.test_negatives),
            (c.valid_negatives, p.valid_negatives),
            *zip(c.train_csr(), p.train_csr(), strict=True),
        ]:
            assert same_arrays(a, b)
    assert all(same_arrays(a, b) for a, b in zip(compiled[2], plain[2], strict=True))


def test_setup_ops_check_their_inputs():
    from lrml_kernels.data._compiled import data_op

    if data_op("latest_rows") is None:
        pytest.skip("the C++ extension is unavailable")
    ops = torch.ops.lrml_ext
    u, i = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1], dtype=torch.int32)
    keys, indptr = ops.sorted_unique_keys(u, i, 3, 2)
    assert keys.tolist() == [1, 3, 4] and indptr.tolist() == [0, 1, 2, 3]
    with pytest.raises(IndexError, match="users"):
        ops.sorted_unique_keys(u, i, 2, 2)
    with pytest.raises(IndexError, match="items"):
        ops.sorted_unique_keys(u, i, 3, 1)
    with pytest.raises(TypeError, match="users"):
        ops.latest_rows(u.float(), None, 3)
    assert ops.latest_rows(u, torch.tensor([5, 5, 5]), 4).tolist() == [0, 2, 1, -1]
    neg = torch.tensor([[1, 1, 3], [0, 1, 4]])  # user 0 has item 1, user 1 key 3 = item 1
    assert ops.eval_negatives_bad(neg, torch.tensor([0, 1]), keys, indptr, 2).tolist() == [0, 1, 4]
    with pytest.raises(IndexError, match="users"):
        ops.eval_negatives_bad(neg, torch.tensor([0, 3]), keys, indptr, 2)
    cols = [torch.tensor([0, 1, 1, 0], dtype=torch.int32), torch.tensor([3, 1, 2, 4])]
    assert ops.drop_held_out_(*cols, torch.tensor([7, 8, 9, 6]), torch.tensor([4, 2])) == 2
    assert [c[:2].tolist() for c in cols] == [[0, 1], [3, 1]]
    buf, got = torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1])
    ops.keep_distinct_(
        buf, got, torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([0, 1]),
        torch.tensor([3, 2]), torch.tensor([5, 5, 7, 0, 9]), 10,
    )  # fmt: skip
    assert buf.tolist() == [5, 7, 0, 9] and got.tolist() == [2, 2]
    with pytest.raises(IndexError, match="items"):
        ops.keep_distinct_(
            buf, got, torch.tensor([0, 2]), torch.tensor([3, 2]), torch.tensor([0]),
            torch.tensor([1]), torch.tensor([10]), 10,
        )  # fmt: skip
    r, y = torch.rand(2), torch.rand(2, dtype=torch.float64)
    model = (
        torch.rand(3, 2),
        torch.tensor([0, 0, 0, 1] * 2),
        torch.ones(2, dtype=torch.float64),
        torch.tensor([2, 3]),
        torch.tensor([0, 2]),
        torch.tensor([4, 1, 0, 2, 3]),
    )
    assert set(ops.synthetic_items(r, y, torch.tensor([0, 1]), *model).tolist()) <= {0, 1, 2, 3, 4}
    with pytest.raises(IndexError, match="users"):
        ops.synthetic_items(r, y, torch.tensor([0, 2]), *model)
    with pytest.raises(ValueError, match="sum\\(got\\)"):
        ops.synthetic_rows_(
            torch.empty(3, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
            torch.empty(3, dtype=torch.int64), buf, torch.tensor([0, 2]), got, 0,
            torch.rand(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int64),
        )  # fmt: skip
    for op, args in [
        (ops.sorted_unique_keys.default, (u, i, 3, 2)),
        (ops.latest_rows.default, (u, None, 3)),
        (ops.eval_negatives_bad.default, (neg, torch.tensor([0, 1]), keys, indptr, 2)),
        (ops.synthetic_items.default, (r, y, torch.tensor([0, 1]), *model)),
    ]:  # fmt: skip
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_fingerprint_in_background_and_page_population():
    from lrml_kernels.data._compiled import populate_in_background

    x = D.synthetic(300, 200, 6_000, seed=1)
    want = x.fingerprint()
    x.fingerprint_in_background()
    assert x.fingerprint() == want and x._pending_fingerprint is None
    # load hashes its training data ahead (no validation split): the same fingerprint
    s = D.load("synthetic-small", seed=3)
    assert s.train._pending_fingerprint is not None
    assert s.fingerprint() == D.leave_one_out(D.synthetic(300, 200, 6_000), seed=3).fingerprint()
    assert D.load("synthetic-small", validation=True).train._pending_fingerprint is None
    # populating pages leaves the contents alone, also while they are written
    a = np.arange(3 << 20, dtype=np.int64)
    thread = populate_in_background(a, np.empty(0), a[5:7])
    a[: 1 << 20] += 1
    if thread is not None:
        thread.join()
    assert np.array_equal(a[: 1 << 20], np.arange(1 << 20) + 1)
    assert np.array_equal(a[1 << 20 :], np.arange(1 << 20, 3 << 20))


def test_a_split_pickles_before_its_fingerprint_is_read():
    # load() hashes the training data on a thread: the split held that thread and could not be
    # pickled or deep-copied (DataLoader workers, multiprocessing) until fingerprint() was read
    import copy
    import pickle

    s = D.load("synthetic-small")
    for twin in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert twin.fingerprint() == s.fingerprint()
        assert np.array_equal(twin.train.users, s.train.users)


def test_split_helpers_check_their_arguments_as_load_does():
    x = D.load("synthetic-small").train
    for bad in (-1, None, 1.5):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            D.leave_one_out(x, seed=bad)
    for bad in (-1, 1.5):  # (1.5 was 1 negative; -1 a numpy error)
        with pytest.raises(ValueError, match="num_negatives must be a non-negative integer"):
            D.leave_one_out(x, num_negatives=bad)
    s = D.leave_one_out(x, num_negatives=5)
    for bad in (None, np.random.default_rng(0)):  # (were a TypeError deep inside numpy)
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            D.carve_validation(s, seed=bad)
    # float negatives were truncated (1.7 became item 1); float users and items were refused
    with pytest.raises(ValueError, match="test_negatives must hold integer item ids"):
        D.Split(x, test_users=[0], test_items=[0], test_negatives=[[1.7]], num_users=x.num_users,
                num_items=x.num_items)  # fmt: skip


def test_numpy_numbers_are_numbers(tmp_path):
    # (min_rating=np.int64(3) was "must be a finite number, got np.int64(3)")
    f = write(tmp_path / "r.csv", "user,item,rating\n1,1,5\n1,2,2\n2,1,4\n2,2,5\n1,3,4\n")
    got = D.load(f"csv:{f}", min_rating=np.int64(4), num_negatives=0, seed=np.int64(3))
    want = D.load(f"csv:{f}", min_rating=4, num_negatives=0, seed=3)
    assert got.fingerprint() == want.fingerprint()


# data.split._latest_rows, numpy fallback: chunk offsets and users with no known timestamp
@pytest.mark.parametrize("chunk", [3, 1 << 22])
def test_leave_one_out_fallback_in_small_chunks_hand_computed(monkeypatch, chunk):
    from lrml_kernels.data import split as S

    monkeypatch.setattr(S, "data_op", lambda name: None)  # the numpy path
    monkeypatch.setattr(S, "_CHUNK", chunk)
    M = MISSING_TIMESTAMP
    users = np.array([0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 0])
    items = np.array([1, 2, 3, 4, 5, 6, 7, 1, 2, 1, 8, 9, 2])
    ts = np.array([5, 9, 7, 3, 3, 1, 4, M, 2, M, M, M, 9])
    x = D.Interactions(users, items, ts, 5, 12, np.arange(5), np.arange(12), "toy")
    s = D.leave_one_out(x, num_negatives=0)
    assert s.test_users.tolist() == [0, 1, 3, 4]
    assert s.test_items.tolist() == [2, 5, 2, 9]  # user 4: all times missing -> its last row
    x = D.Interactions(users, items, None, 5, 12, np.arange(5), np.arange(12), "toy")
    assert D.leave_one_out(x, num_negatives=0).test_items.tolist() == [2, 6, 1, 9]
