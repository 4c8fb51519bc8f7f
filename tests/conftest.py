"""Test set-up: Triton runs through its CPU interpreter where there is no GPU.

TRITON_INTERPRET must be set before any module defining Triton kernels is imported, hence here.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LRML_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Small torch ops: one intra-op thread (on a shared, busy machine OpenMP threads that wait for
    a descheduled sibling make tiny ops 10-50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    """The real data sets of ../shared/data (never copied into the repo); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA


class ReadTestItems(AssertionError):
    """A test array was read where nothing may read it."""


class _Poisoned:
    """Stands in for a test array: any use of it raises :class:`ReadTestItems`."""

    def __getattr__(self, name):
        raise ReadTestItems(f"the test items were read ({name})")

    def __array__(self, *a, **k):
        raise ReadTestItems("the test items were read (__array__)")

    def __getitem__(self, key):
        raise ReadTestItems("the test items were read ([])")

    def __len__(self):
        raise ReadTestItems("the test items were read (len)")


@pytest.fixture
def poison_test_items():
    """``poison(split)`` replaces ``split``'s test arrays by stand-ins that raise on any use and
    returns a function that puts them back. ``strict=False``: the fingerprint (a hash of the
    whole split for checkpoints, which chooses nothing) is taken first and answered from then on;
    strict, hashing the split raises as well."""

    def poison(split, *, strict: bool = False):
        if not strict:
            fp = split.fingerprint()
            split.fingerprint = lambda: fp
        saved = (split.test_users, split.test_items, split.test_negatives)
        split.test_users = split.test_items = split.test_negatives = _Poisoned()

        def restore():
            split.test_users, split.test_items, split.test_negatives = saved

        return restore

    return poison
