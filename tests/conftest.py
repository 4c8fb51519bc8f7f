"""Test set-up: Triton runs through its CPU interpreter where there is no GPU.

TRITON_INTERPRET must be set before any module defining Triton kernels is imported, hence here.
"""

import importlib
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


def pytest_collection_finish(session):
    # after -k / -m deselection: the GPU tests of this session
    session.config._lrml_gpu_items = [i.nodeid for i in session.items if "gpu" in i.keywords]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Which GPU subset ran (the GPU check's log says it), and the reference comparisons."""
    gpu = getattr(config, "_lrml_gpu_items", [])
    if gpu:
        if config.option.collectonly:
            where = "collected only"
        elif torch.cuda.is_available():
            where = "ran on " + torch.cuda.get_device_name()
        else:
            where = "skipped: no CUDA GPU"
        per_file: dict = {}
        for nodeid in gpu:
            path, _, name = nodeid.partition("::")
            per_file.setdefault(path, []).append(name)
        terminalreporter.section(f"GPU subset: {len(gpu)} tests ({where})")
        for path, names in per_file.items():
            terminalreporter.write_line(f"{path} ({len(names)}): {' '.join(names)}")
    from _tolerance import STATS

    if STATS["comparisons"]:
        terminalreporter.write_line(
            f"reference comparisons (tests/_tolerance.py): {STATS['comparisons']} "
            f"({STATS['seconds']:.1f} s), kink terms excluded from the gradient comparison: "
            f"{STATS['excluded']}"
        )


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


@pytest.fixture
def no_data(monkeypatch):
    """Loading a data set fails the test: a refusal must come before the data is loaded."""
    from lrml_kernels import data

    def load(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(data, "load", load)


@pytest.fixture
def error_line(capsys):
    """``error_line(command)``: what the CLI printed on stderr since the last read, which must
    be the one line ``lrml COMMAND: error: ...`` (no traceback); returns that line."""

    def read(command: str) -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"lrml {command}: error: "), err
        return lines[0]

    return read


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


@pytest.fixture
def triton_launches(monkeypatch):
    """The interpreted Triton launches, each ``(kernel name, arguments)``: what a CUDA graph
    would freeze of it (a tensor as ``("tensor", address)``, everything else by value)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    run = InterpretedFunction.run

    def recorded(self, *args, **kwargs):
        frozen = [("tensor", a.data_ptr()) if torch.is_tensor(a) else a for a in args]
        frozen += [(k, v) for k, v in sorted(kwargs.items()) if not torch.is_tensor(v)]
        seen.append((self.fn.__name__, frozen))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    return seen


@pytest.fixture
def gpu_scalar_args(monkeypatch):
    """Float kernel arguments typed as a compiled launch types them: fp32, unless the kernel
    annotates the parameter (``eps: tl.float64``). The interpreter otherwise keeps a Python float
    (a double), so an fp64 kernel sees the exact value that the GPU would round to fp32."""
    if torch.cuda.is_available():
        pytest.skip("interpreter only (the GPU types its arguments itself)")
    import inspect

    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction, TensorHandle
    from triton.runtime.jit import _normalize_ty

    run = InterpretedFunction.run

    def typed(fn, name, value):
        if not isinstance(value, float):
            return value
        note = inspect.get_annotations(fn).get(name)
        fp64 = note is not None and _normalize_ty(note) == "fp64"
        ty, np_ty = (tl.float64, np.float64) if fp64 else (tl.float32, np.float32)
        return tl.tensor(TensorHandle(np.array([value], dtype=np_ty), ty), ty)

    def as_on_gpu(self, *args, **kwargs):
        args = [typed(self.fn, n, a) for n, a in zip(self.arg_names, args, strict=False)]
        kwargs = {k: typed(self.fn, k, v) for k, v in kwargs.items()}
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", as_on_gpu)


@pytest.fixture
def tensor_core_tf32(monkeypatch):
    """The interpreter's ``tl.dot`` with tf32 operands truncated as the tensor cores truncate them
    (the low 13 mantissa bits of each fp32 operand dropped; the interpreter otherwise computes
    every dot exactly), at torch's fp32 matmul precision "high" (restored after). Yields the
    count of such dots."""
    if torch.cuda.is_available():
        pytest.skip("interpreter only (the GPU runs tf32 itself: tests/test_gpu_matrix.py)")
    import numpy as np
    from triton._C.libtriton import ir

    from lrml_kernels.precision import using_fp32_matmul_precision

    interp = importlib.import_module("triton.runtime.interpreter")
    create_dot = interp.InterpreterBuilder.create_dot
    count = {"tf32 dots": 0}

    def truncated(h):
        bits = np.ascontiguousarray(h.data).view(np.uint32) & np.uint32(0xFFFFE000)
        return interp.TensorHandle(bits.view(np.float32), h.dtype)

    def tf32_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == np.float32:
            count["tf32 dots"] += 1
            a, b = truncated(a), truncated(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", tf32_dot)
    with using_fp32_matmul_precision("high"):  # (fp32 dots: tf32 where this is not "highest")
        yield count


@pytest.fixture
def catchable():
    """``catchable(signum)``: the signal acts as it does in an interactive shell for the test
    (SIGINT raises KeyboardInterrupt, others their default), even where the suite runs as a
    background job, which starts with SIGINT ignored (an ignored signal stays ignored: the CLI
    and training respect that)."""
    import signal

    saved = {}

    def make(signum):
        saved.setdefault(signum, signal.getsignal(signum))
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)

    yield make
    for signum, handler in saved.items():
        signal.signal(signum, handler)
