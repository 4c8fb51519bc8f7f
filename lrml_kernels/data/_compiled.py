"""The C++ extension's data ops, where the extension loads: each caller keeps its numpy code as
the fallback, and the two give the same results bit for bit (tests compare them). Also how the
set-up's large fresh arrays get their memory (plain pages, populated on a second thread)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import threading

import numpy as np
import torch

__all__ = ["data_op", "plain_pages", "populate_in_background", "tensor"]


def data_op(name: str):
    """``torch.ops.lrml_ext.<name>`` (a CPU op of ``csrc/cpu``), or None where the C++
    extension cannot be loaded (its numpy fallback then runs)."""
    from lrml_kernels.errors import BackendUnavailable
    from lrml_kernels.extension import backend

    try:
        backend("cpu")
    except BackendUnavailable:
        return None
    return getattr(torch.ops.lrml_ext, name)


def tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` as a CPU tensor sharing its memory (made contiguous first if it is not)."""
    return torch.from_numpy(np.ascontiguousarray(a))


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in, writable, contents unchanged


def populate_in_background(*arrays: np.ndarray) -> threading.Thread | None:
    """Fault in the pages of freshly allocated (untouched) arrays on another thread, so that the
    thread that fills them finds them mapped: on a VM a first touch costs about a second per GB
    of system time, which the idle second core pays instead. ``madvise(MADV_POPULATE_WRITE)``
    leaves the contents as they are, so the arrays may be written meanwhile. Returns the thread
    (join it to wait), or None where the call does not exist (not Linux): the pages then fault
    in on first touch, as without this."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    ranges = []
    for a in arrays:
        start = a.ctypes.data
        end = start + a.nbytes
        start = -(-start // page) * page  # whole pages inside the array only
        end = end // page * page
        if end > start:
            ranges.append((start, end - start))

    def populate():
        for start, length in ranges:  # (ctypes releases the GIL during the call)
            if madvise(start, length, _MADV_POPULATE_WRITE) != 0:
                return  # an older kernel (EINVAL): first touches fault the pages in

    thread = threading.Thread(target=populate, name="lrml-populate", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def plain_pages():
    """numpy asks the kernel for transparent huge pages for every array of 4 MB or more
    (``madvise(MADV_HUGEPAGE)``). In a VM whose memory the host backs lazily (as here: a
    Firecracker guest) a fresh huge page can cost ten times the time of the plain pages a
    process has just freed, erratically (384 MB of evaluation negatives: 0.1 to 1 s; plain
    pages: 0.22 s every time). The set-up writes each array once, in order, so inside this
    block numpy allocates plain pages; the setting is restored after (it is process-wide)."""
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        from numpy._core import multiarray
    else:  # (numpy 1's numpy._core is a stub for unpickling: torch's import may load it)
        from numpy.core import multiarray
    set_hugepage = getattr(multiarray, "_set_madvise_hugepage", None)
    if set_hugepage is None:
        yield
        return
    before = set_hugepage(False)
    try:
        yield
    finally:
        set_hugepage(before)
