"""The Triton negative sampler (``sample_negatives(..., use_triton=True)``): through the
interpreter on CPU tensors here, on CUDA tensors in the ``gpu`` test (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

import lrml_kernels.data as D
from lrml_kernels.backends import triton_interpreted

# chi-square 0.999 quantiles by degrees of freedom
CHI2_999 = {4: 18.47, 9: 27.88}


def csr(rows: list[list[int]], num_items: int, dtype=torch.int64):
    """``(indptr, indices)`` of sorted rows (numpy-free: ``D.build_csr`` is tested elsewhere)."""
    lengths = torch.tensor([0] + [len(r) for r in rows])
    indices = torch.tensor([i for r in rows for i in sorted(r)], dtype=dtype)
    assert indices.numel() == 0 or int(indices.max()) < num_items
    return torch.cumsum(lengths, 0).to(dtype), indices


def sample(users, num_items, k, exclude, seed=0, **kw):
    return D.sample_negatives(
        users, num_items, k, generator=torch.Generator(users.device).manual_seed(seed),
        exclude_csr=exclude, use_triton=True, **kw,
    )  # fmt: skip


def chi_square(draws: torch.Tensor, support: list[int], num_items: int) -> float:
    """Pearson's statistic of ``draws`` against uniform on ``support`` (inf if any draw is
    outside it)."""
    counts = torch.bincount(draws.reshape(-1), minlength=num_items).double()
    outside = torch.ones(num_items, dtype=torch.bool)
    outside[support] = False
    if counts[outside].sum() > 0:
        return float("inf")
    expected = draws.numel() / len(support)
    return float(((counts[support] - expected) ** 2 / expected).sum())


@pytest.fixture(autouse=True)
def interpreter():
    if not torch.cuda.is_available() and not triton_interpreted():
        pytest.skip("the Triton sampler needs CUDA or TRITON_INTERPRET=1")


def test_excludes_training_items_and_is_reproducible(one_thread):
    s = D.load("synthetic-small")
    exclude = tuple(torch.from_numpy(a) for a in s.train_csr())
    users = torch.arange(s.num_users).repeat(3)
    neg = sample(users, s.num_items, 8, exclude)
    assert neg.shape == (users.numel(), 8) and neg.dtype == torch.int64
    assert 0 <= int(neg.min()) and int(neg.max()) < s.num_items
    assert not D.csr_membership(*exclude, users, neg).any()
    plain = torch.randint(0, s.num_items, neg.shape, generator=torch.Generator().manual_seed(0))
    assert D.csr_membership(*exclude, users, plain).any()  # there was something to exclude
    assert torch.equal(neg, sample(users, s.num_items, 8, exclude))  # same seed, same draws
    other = sample(users, s.num_items, 8, exclude, seed=1)
    assert (neg != other).float().mean() > 0.9
    # int32 ids and CSR: the same draws (the kernel reads either width)
    narrow = tuple(t.to(torch.int32) for t in exclude)
    assert torch.equal(neg, sample(users.to(torch.int32), s.num_items, 8, narrow))
    # the CPU paths (the C++ op where the extension loads, the torch ops) draw the same numbers
    for use_extension in (None, False):
        cpu = D.sample_negatives(
            users, s.num_items, 8, generator=torch.Generator().manual_seed(0),
            exclude_csr=exclude, use_triton=False, use_extension=use_extension,
        )  # fmt: skip
        assert torch.equal(cpu, neg)


def test_lemire_redraws_match_the_cpu_paths():
    # span 1.5 * 2**30: a quarter of the Philox words are unfair and redrawn (max_tries > 0)
    n = 3 * 2**29
    exclude = csr([[], [5, 2**30]], n)
    users = torch.tensor([0, 1] * 512)
    for tries in (0, 32):
        neg = sample(users, n, 4, exclude, max_tries=tries)
        for use_extension in (None, False):
            cpu = D.sample_negatives(
                users, n, 4, generator=torch.Generator().manual_seed(0), exclude_csr=exclude,
                max_tries=tries, use_triton=False, use_extension=use_extension,
            )  # fmt: skip
            assert torch.equal(cpu, neg)
    assert not ((neg[1::2] == 5) | (neg[1::2] == 2**30)).any()


def test_edge_rows_and_uniformity(one_thread):
    # user 0: every item but 7; user 1: none; user 2: the evens; user 3: 9 of 10 but not 0
    n = 10
    rows = [[i for i in range(n) if i != 7], [], list(range(0, n, 2)), list(range(1, n))]
    exclude = csr(rows, n)
    users = torch.tensor([0] * 20 + [1] * 4000 + [2] * 4000 + [3] * 20)
    neg = sample(users, n, 5, exclude)
    assert (neg[:20] == 7).all() and (neg[-20:] == 0).all()
    full, evens = neg[20:4020], neg[4020:8020]
    assert chi_square(full, list(range(n)), n) < CHI2_999[9]
    assert chi_square(evens, list(range(1, n, 2)), n) < CHI2_999[4]
    # independent entries: neighbours in a row and in a column agree 1 time in 10 (sd 0.005)
    for a, b in ((full[:, :-1], full[:, 1:]), (full[:-1], full[1:])):
        assert abs(float((a == b).float().mean()) - 1 / n) < 0.03
    # the test can fail: a draw that excludes nothing, and a biased modulo map
    g = torch.Generator().manual_seed(0)
    assert chi_square(torch.randint(0, n, evens.shape, generator=g), [1, 3, 5, 7, 9], n) > 1e9
    biased = torch.randint(0, 16, full.shape, generator=g) % n
    assert chi_square(biased, list(range(n)), n) > CHI2_999[9]


def test_most_of_the_catalogue():
    # 180 of 200 items (a plain draw hits with probability 0.9)
    exclude = csr([list(range(180)), [0]], 200)
    neg = sample(torch.tensor([0] * 64 + [1] * 64), 200, 8, exclude)
    assert (neg[:64] >= 180).all() and (neg[64:] != 0).all()
    assert set(neg[:64].unique().tolist()) == set(range(180, 200))


def test_no_positive_is_drawn_even_without_redraws():
    # the kernel draws among the non-items directly: max_tries=0 still never gives a positive
    exclude = csr([[i for i in range(10) if i != 7], list(range(10)), [3]], 10)
    users = torch.tensor([0] * 256 + [1] * 256 + [2] * 256)
    neg = sample(users, 10, 2, exclude, max_tries=0)
    assert (neg[:256] == 7).all() and (neg[512:] != 3).all()
    # a user who owns every item gets items in range (necessarily positives), all of them
    assert set(neg[256:512].unique().tolist()) == set(range(10))


def test_empty_shapes_and_bad_inputs():
    exclude = csr([[1, 2], [0]], 5)
    users = torch.tensor([0, 1, 5, -1])
    neg = sample(users, 5, 3, exclude)
    assert (neg[2:] == -1).all() and (neg[:2] >= 0).all()  # users outside the CSR get -1
    assert sample(users, 5, 0, exclude).shape == (4, 0)
    assert sample(users[:0], 5, 3, exclude).shape == (0, 3)
    with pytest.raises(ValueError, match="indptr must be 1-D int32/int64"):
        sample(users, 5, 3, (exclude[0].double(), exclude[1]))
    with pytest.raises(ValueError, match="users must be"):
        sample(users[:, None], 5, 3, exclude)
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        sample(users, 2**31, 3, exclude)
    with pytest.raises(ValueError, match="max_tries >= 0"):
        sample(users, 5, 3, exclude, max_tries=-1)


@pytest.mark.parametrize("popularity", [False, True])
def test_a_csr_whose_indptr_leaves_its_indices_reads_only_the_indices(popularity):
    """The CSR's values are not checked on the host (that would synchronise): an ``indptr`` that
    points past the end of ``indices`` (or before its start, or backwards) is clamped to
    ``[0, nnz]`` in the kernel, which reads no index outside ``indices``. Before, it read past
    the end: here ``indices`` is the first 3 entries of a buffer of 8, and a row that claimed 6
    members took the buffer's next 3 entries (items 3, 4, 5) for its own and never drew them;
    a decreasing ``indptr`` drew items past the catalogue (up to 12 of 10)."""
    buf = torch.arange(8)
    indices = buf[:3]  # items 0, 1, 2
    users = torch.zeros(1, dtype=torch.int64)
    pop = D.popularity_cdf(torch.ones(10), 1.0) if popularity else None

    def draw(indptr):
        return sample(users, 10, 400, (torch.tensor(indptr), indices), popularity=pop)

    want = draw([0, 3])
    assert set(want.unique().tolist()) == set(range(3, 10))
    assert torch.equal(draw([0, 6]), want)  # clamped to the 3 indices there are
    assert torch.equal(draw([0, 10**12]), want)
    assert torch.equal(draw([-5, 3]), want)
    assert torch.equal(draw([5, 2]), draw([3, 3]))  # backwards: an empty row at nnz
    assert torch.equal(draw([-9, -2]), draw([0, 0]))  # before the start: an empty row at 0


@pytest.mark.gpu
def test_cuda_sampler_has_no_host_sync():
    """CUDA tensors go to the kernel by default (the same draws as ``use_triton=True``, which
    fails loudly where Triton is missing), with no host synchronisation."""
    s = D.load("synthetic-small")
    exclude = tuple(torch.from_numpy(a).cuda() for a in s.train_csr())
    users = torch.arange(s.num_users, device="cuda").repeat(3)
    gen = torch.Generator("cuda")
    forced = sample(users, s.num_items, 8, exclude)  # compiles the kernel, seed 0
    counts = torch.bincount(exclude[1].cpu(), minlength=s.num_items)
    cdf = D.popularity_cdf(counts, 0.5).cuda()
    sample(users, s.num_items, 8, exclude, popularity=cdf)  # compiles its variant
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runs = []
        for _ in range(2):
            gen.manual_seed(0)
            runs.append(D.sample_negatives(users, s.num_items, 8, generator=gen,
                                           exclude_csr=exclude))  # fmt: skip
        again = D.sample_negatives(users, s.num_items, 8, generator=gen, exclude_csr=exclude)
        gen.manual_seed(0)
        popular = D.sample_negatives(users, s.num_items, 8, generator=gen, exclude_csr=exclude,
                                     popularity=cdf)  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")
    neg = runs[0]
    assert neg.device.type == "cuda" and neg.shape == (users.numel(), 8)
    assert 0 <= int(neg.min()) and int(neg.max()) < s.num_items
    assert not D.csr_membership(*exclude, users, neg).any()
    assert torch.equal(runs[0], runs[1]) and not torch.equal(neg, again)
    assert torch.equal(neg, forced)
    # the popularity-aware draw: the CPU paths' numbers for the generator's seed (drawn on CUDA)
    gen.manual_seed(0)
    seed = int(D.sampling.sampler_seed(gen, "cuda"))
    cpu = D.sampling._sample_by_rank(
        users.cpu(), s.num_items, 8, *(t.cpu().long() for t in exclude), torch.tensor([seed]),
        D.sampling.MAX_TRIES, cdf.cpu(),
    )  # fmt: skip
    assert torch.equal(popular.cpu(), cpu)
    assert not D.csr_membership(*exclude, users, popular).any()


def test_popularity_negatives_match_the_cpu_paths(one_thread):
    s = D.load("synthetic-small")
    exclude = tuple(torch.from_numpy(a) for a in s.train_csr())
    counts = torch.bincount(exclude[1], minlength=s.num_items)
    cdf = D.popularity_cdf(counts, 0.5)
    users = torch.arange(s.num_users).repeat(2)
    neg = sample(users, s.num_items, 6, exclude, popularity=cdf)
    assert not D.csr_membership(*exclude, users, neg).any()
    narrow = tuple(t.to(torch.int32) for t in exclude)
    assert torch.equal(neg, sample(users.to(torch.int32), s.num_items, 6, narrow, popularity=cdf))
    for use_extension in (None, False):
        cpu = D.sample_negatives(
            users, s.num_items, 6, generator=torch.Generator().manual_seed(0),
            exclude_csr=exclude, use_triton=False, use_extension=use_extension, popularity=cdf,
        )  # fmt: skip
        assert torch.equal(cpu, neg)
    # popular items are drawn more often than under the uniform draw
    uniform = sample(users, s.num_items, 6, exclude)
    top = counts.argsort(descending=True)[: s.num_items // 10]
    assert torch.isin(neg, top).float().mean() > 1.2 * torch.isin(uniform, top).float().mean()


def test_popularity_cdf_of_any_layout():
    # a strided view of the CDF: the kernel read it with stride 1, drew other items than the
    # CPU paths and items >= num_items
    n = 10
    cdf = D.popularity_cdf(torch.tensor([50, 40, 30, 20, 10, 5, 4, 3, 2, 1]), 1.0)
    strided = torch.stack([cdf, torch.zeros_like(cdf)], 1)[:, 0]
    assert not strided.is_contiguous()
    users = torch.zeros(512, dtype=torch.int64)
    exclude = csr([[]], n)
    neg = sample(users, n, 2, exclude, popularity=strided)
    assert torch.equal(neg, sample(users, n, 2, exclude, popularity=cdf))
    assert int(neg.max()) < n
