"""A pytest plugin that runs the GPU tests on the CPU, before a GPU does: a rehearsal.

    PYTHONPATH=tests .venv/bin/python -m pytest -p _gpu_rehearsal tests -m gpu -k "not netflix"

Most GPU tests have never run on a GPU when they are written, and a GPU is lent for minutes. The
rehearsal runs them here so that what fails on the GPU is the GPU's doing, not the test's:

- ``torch.cuda`` answers as one H200 would (available, 132 SMs, events and
  ``triton.testing.do_bench`` timed on the host; synchronisation and the sync debug mode do
  nothing);
- every ``"cuda"`` device (``device=``, ``.cuda()``, ``.to("cuda")``, a CUDA generator) is the
  CPU, and Triton runs through its interpreter;
- with ``LRML_REHEARSE_CUDA_AS_CPU=1`` the cuda backend is the C++ CPU library (the same ops);
- each storage remembers which device it would be on. An op that mixes a would-be CUDA tensor
  with a CPU tensor of one element or more raises as CUDA would (``assert_close`` of the two and
  ``.numpy()`` of a CUDA tensor too), so a reference built on the CPU and compared with a GPU
  result (the first H200 run's ``test_triton_bf16_large_norms_gpu``) fails here.

With ``LRML_REHEARSE_RECORD=FILE`` the Triton launchers take the GPU's launch shapes instead of
the interpreter's, and every launch is recorded in ``FILE`` for
``benchmarks/kernel_report.py --launches FILE``, which compiles each distinct kernel for sm_90
(:func:`_record_launches`; its largest launches are recorded, not run).

What cannot rehearse and fails for that reason alone: the interpreter's block shapes
(``block_config``), ``device.type == "cuda"`` asserts, CUDA graphs, and the cuda backend's
unchecked-index clamping (the CPU library checks). Everything else must pass (bf16 included:
the interpreter runs the kernels' bf16 loads, conversions and stores). Numerics, speed and the
compiled kernels are the GPU's to check.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import types
import weakref

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

T = torch.Tensor
# Ops that take tensors of two devices, or move between them.
MIXED_OK = {
    T.to, T.copy_, T.__getitem__, T.__setitem__, T.cpu, T.cuda, T.__repr__, T.__format__,
    T.tolist, T.item, T.size, T.dim, T.numel, T.__len__, T.__iter__, T.__bool__, T.data_ptr,
    T.is_contiguous, T.stride, T.element_size, T.__reduce_ex__, T.__deepcopy__,
    T.untyped_storage, T.new_tensor, T.index_put_, T.index_put, T.set_, T.data.__set__,
    T.data.__get__, torch._has_compatible_shallow_copy_type,
}  # fmt: skip
FACTORY_METHODS = {T.to, T.new_empty, T.new_zeros, T.new_ones, T.new_full, T.new_tensor}


class Devices:
    """Which device each storage would be on: "cuda", "cpu", or "any" (not known: made on
    ``x.device``, which reads cpu here whatever ``x`` is, or outside the mode)."""

    def __init__(self):
        self.where: dict[int, str] = {}
        self.seen: dict[int, list] = {}  # data_ptr -> weak references to its live tensors

    @staticmethod
    def key(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr() or None
        except (RuntimeError, NotImplementedError):
            return None

    def of(self, t: torch.Tensor) -> str:
        k = self.key(t)
        if k is None or k not in self.where:
            return "any"
        alive = [r for r in self.seen.get(k, []) if r() is not None]
        self.seen[k] = alive
        if not alive and not isinstance(t, torch.nn.Parameter):
            return "any"  # the tensors seen on this address are gone: memory reused
        return self.where[k]  # (a Parameter's .data swapped by Module.to: its new storage's)

    def mark(self, t: torch.Tensor, where: str) -> None:
        k = self.key(t)
        if k is not None:
            self.where[k] = where
            self.seen[k] = [r for r in self.seen.get(k, []) if r() is not None] + [weakref.ref(t)]


DEVICES = Devices()


def _tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _is_cuda(dev) -> bool:
    return (isinstance(dev, str) and dev.startswith("cuda")) or (
        isinstance(dev, torch.device) and dev.type == "cuda"
    )


def _on_cpu(dev):
    return torch.device("cpu") if isinstance(dev, torch.device) else "cpu"


class CudaOnTheCpu(TorchFunctionMode):
    """Maps "cuda" to the CPU and checks that no op mixes the two devices."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        made_on_cuda = func is T.cuda
        explicit = kwargs.get("device") is not None
        if _is_cuda(kwargs.get("device")):
            made_on_cuda, kwargs["device"] = True, _on_cpu(kwargs["device"])
        to_cpu = func is T.cpu or (func is T.to and kwargs.get("device") == "cpu")
        if func in FACTORY_METHODS:
            made_on_cuda = made_on_cuda or any(_is_cuda(a) for a in args[1:])
            to_cpu = to_cpu or (func is T.to and "cpu" in args[1:])
            args = tuple(_on_cpu(a) if _is_cuda(a) else a for a in args)
        self._check(func, args, kwargs)
        if func is T.to and not (made_on_cuda or to_cpu):
            # .to(x.device) / .to(other): other's device, or not known
            target = [a for a in args[1:] if isinstance(a, torch.Tensor)]
            if target and DEVICES.of(target[0]) == "cuda":
                made_on_cuda = True
            elif DEVICES.of(args[0]) == "cpu" and (
                target
                or any(isinstance(a, torch.device) for a in (*args[1:], kwargs.get("device")))
            ):
                return self._copy(func(*args, **kwargs), "any")
        if made_on_cuda and func in (T.cuda, T.to) and DEVICES.of(args[0]) != "cuda":
            out = args[0] if func is T.cuda else func(*args, **kwargs)
            return self._copy(out, "cuda")  # a device copy has its own storage
        if to_cpu and DEVICES.of(args[0]) == "cuda":
            return self._copy(func(*args, **kwargs), "cpu")
        if func is T.cuda or func is T.pin_memory:
            return args[0]
        ins = _tensors((args, kwargs))
        states = {DEVICES.of(t) for t in ins}
        out = func(*args, **kwargs)
        in_keys = {Devices.key(t) for t in ins}
        for t in _tensors(out):
            k = Devices.key(t)
            if k in in_keys:  # in place, or a view: the storage keeps its device
                DEVICES.mark(t, DEVICES.where.get(k, "any"))
            elif made_on_cuda or ("cuda" in states and func not in (T.cpu, T.tolist, T.item)):
                DEVICES.mark(t, "cuda")
            elif explicit or "any" in states:
                DEVICES.mark(t, "any")
            else:
                DEVICES.mark(t, "cpu")
        return out

    @staticmethod
    def _copy(t: torch.Tensor, where: str) -> torch.Tensor:
        t = t.clone()
        DEVICES.mark(t, where)
        return t

    @staticmethod
    def _check(func, args, kwargs) -> None:
        ins = _tensors((args, kwargs))
        on_cuda = any(DEVICES.of(t) == "cuda" for t in ins)
        on_cpu = [t for t in ins if DEVICES.of(t) == "cpu" and t.dim() > 0]
        if on_cuda and on_cpu and func not in MIXED_OK:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
            shapes = [tuple(t.shape) for t in on_cpu][:3]
            raise RuntimeError(f"rehearsal: {name} mixes CUDA tensors and CPU tensors {shapes}")
        if func is T.numpy and on_cuda:
            raise TypeError("rehearsal: can't convert a CUDA tensor to numpy (.cpu() first)")


class _Event:
    def __init__(self, enable_timing=False, **_):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _Stream:
    def __init__(self, *_, **__):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def wait_event(self, event):
        pass


_generator = torch.Generator


class _IsAGenerator(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, _generator)  # isinstance(g, torch.Generator) as before


class _Generator(metaclass=_IsAGenerator):
    """``torch.Generator(device)`` on the CPU for a CUDA device; still a ``torch.Generator`` to
    ``isinstance`` (the checkpoints' state dicts test for it)."""

    def __new__(cls, device="cpu"):
        return _generator(device=_on_cpu(device) if _is_cuda(device) else device)


_assert_close = torch.testing.assert_close


def _device_checked_assert_close(actual, expected, *args, **kwargs):
    if kwargs.get("check_device", True) and all(
        isinstance(t, torch.Tensor) for t in (actual, expected)
    ):
        pair = {DEVICES.of(actual), DEVICES.of(expected)}
        if pair == {"cuda", "cpu"}:
            raise AssertionError("rehearsal: assert_close of a CUDA and a CPU tensor")
    return _assert_close(actual, expected, *args, **kwargs)


H200 = types.SimpleNamespace(
    name="CPU rehearsal", multi_processor_count=132, total_memory=141 * 2**30, major=9, minor=0
)
FAKE_CUDA = {
    "is_available": lambda: True,
    "device_count": lambda: 1,
    "current_device": lambda: 0,
    "set_device": lambda device: None,
    "get_device_name": lambda device=None: "CPU rehearsal",
    "get_device_properties": lambda device=None: H200,
    "get_device_capability": lambda device=None: (9, 0),
    "synchronize": lambda device=None: None,
    "set_sync_debug_mode": lambda mode: None,
    "get_sync_debug_mode": lambda: 0,
    "empty_cache": lambda: None,
    "max_memory_allocated": lambda device=None: 0,
    "memory_allocated": lambda device=None: 0,
    "reset_peak_memory_stats": lambda device=None: None,
    "Event": _Event,
    "Stream": _Stream,
    "current_stream": lambda device=None: _Stream(),
    "stream": lambda stream=None: contextlib.nullcontext(),
    "manual_seed": lambda seed: None,
    "manual_seed_all": lambda seed: None,
    "is_bf16_supported": lambda *_, **__: True,
}


def _do_bench_on_the_host(fn, warmup=25, rep=100, return_mode="mean", **_):
    """``triton.testing.do_bench`` (CUDA events through the driver) timed on the host instead."""
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def _cuda_backend_as_cpu():
    from lrml_kernels import backends, extension

    backend, runs_on = extension.backend, backends._runs_on
    extension.backend = lambda name: backend("cpu" if name == "cuda" else name)
    backends._runs_on = lambda name, dev: (
        runs_on("cpu", "cpu") if name == "cuda" else runs_on(name, dev)
    )


RECORD_RUN_MAX_PROGRAMS, RECORD_RUN_MAX_ROWS = 1024, 8192


def _record_launches(path: str) -> None:
    """Every Triton launch on tensors not known to be on the CPU takes the GPU's launch shapes
    (block sizes, warps, register caps: the launchers' ``_interpreted`` answers as on the GPU;
    a tensor made inside a custom op is not known), runs through the interpreter, and is
    appended to ``path`` as one JSON line: the test, the kernel, its arguments (tensors by
    dtype and alignment, as ``kernel_report._describe``), its launch options and grid.
    ``benchmarks/kernel_report.py --launches path`` compiles each distinct one for sm_90. A
    launch of more than ``RECORD_RUN_MAX_PROGRAMS`` programs, or over a batch of more than
    ``RECORD_RUN_MAX_ROWS`` rows (its argument ``B``), is recorded and not run (the GPU's 16-row
    blocks make thousands of interpreted programs), so the test may fail after it: the record
    is the point."""
    import dataclasses
    import json

    from _bench import load_benchmark
    from triton.runtime.interpreter import InterpretedFunction

    from lrml_kernels.triton import distance_kernels, sampling_kernels, topk_kernels

    report = load_benchmark("kernel_report")

    def describe(arg):  # kernel_report's description of a launch argument, as JSON
        arg = report._describe(arg)
        return dataclasses.asdict(arg) if isinstance(arg, report.TensorArg) else arg

    def interpreted(t: torch.Tensor) -> bool:
        return DEVICES.of(t) == "cpu"

    for module in (distance_kernels, sampling_kernels, topk_kernels):
        module._interpreted = interpreted
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args, strict=False)) | kwargs
        shape = grid(bound) if callable(grid) else grid
        record = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
            "module": self.fn.__module__,
            "name": self.fn.__name__,
            "args": [describe(a) for a in args],
            "kwargs": {k: describe(v) for k, v in kwargs.items()},
            "grid": [int(g) for g in shape],
        }
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if (
            math.prod(record["grid"]) > RECORD_RUN_MAX_PROGRAMS
            or bound.get("B", 0) > RECORD_RUN_MAX_ROWS
        ):
            return None  # recorded, not run: the test's later checks may fail
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def pytest_configure(config):
    for name, fake in FAKE_CUDA.items():
        setattr(torch.cuda, name, fake)
    torch.Generator = _Generator
    torch.testing.assert_close = _device_checked_assert_close
    with contextlib.suppress(ImportError):
        import triton.testing

        triton.testing.do_bench = _do_bench_on_the_host
    if os.environ.get("LRML_REHEARSE_CUDA_AS_CPU"):
        _cuda_backend_as_cpu()
    if os.environ.get("LRML_REHEARSE_RECORD"):
        _record_launches(os.environ["LRML_REHEARSE_RECORD"])
    CudaOnTheCpu().__enter__()  # for the whole session
