"""Which backends exist here, the ``"auto"`` rules and the ``LRML_KERNELS_BACKEND`` override.

A backend is a module (or object) with five functions taking validated, contiguous inputs on one
device (indices int32 or int64, parameters of one floating dtype):

- ``distances(user_emb, item_emb, keys, memory, users, items, distance, relation, eps,
  sparse_grad) -> D [B, C]`` (differentiable w.r.t. the four parameters);
- ``hinge_loss(user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps,
  reduction, sparse_grad) -> loss`` (scalar, or ``[B]`` for reduction="none");
- ``topk(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps) -> (D [B, k],
  ids int64 [B, k])`` with ``exclude`` None or ``(indptr int64 [B+1], indices int64)``;
- ``hinge_loss_grads(user_emb, item_emb, keys, memory, users, items, margin, distance, relation,
  eps, reduction) -> (loss, g_user_rows [B, d], g_item_rows [B, C, d], g_keys, g_memory)``:
  forward and backward in one call, embedding gradients per gathered row (not scattered), for the
  fused sparse optimizer of :mod:`lrml_kernels.trainer`;
- ``relations(user_emb, item_emb, keys, memory, users, items) -> (a [B, N], r [B, d])``: the
  attention and relation vector of each pair (``users``, ``items``: ``[B]``), forward only;

plus ``devices``: the device types it runs on. Backends:

==========  =============================================  =========================================
name        what                                           needs
==========  =============================================  =========================================
``torch``   :mod:`lrml_kernels.reference` (plain PyTorch)  nothing; any device, any float dtype
``triton``  fused Triton kernels                           triton and a CUDA GPU (or, for tests,
                                                           ``TRITON_INTERPRET=1`` on the CPU)
``cpu``     C++ extension, CPU kernels                     a C++ compiler and ninja (built once)
``cuda``    C++/CUDA extension, CUDA kernels               a CUDA build of torch and nvcc
==========  =============================================  =========================================

``"auto"`` on CUDA tensors: triton, else cuda, else torch. On CPU tensors: cpu, else torch (triton
runs on CPU tensors only when asked for by name with ``TRITON_INTERPRET=1`` set, never by accident).
The environment variable ``LRML_KERNELS_BACKEND`` replaces ``"auto"`` by a name.
"""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import torch

from lrml_kernels import reference
from lrml_kernels.errors import BackendUnavailable, LRMLWarning

BACKENDS = ("torch", "triton", "cpu", "cuda")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def _torch_topk(user_emb, item_emb, keys, memory, users, k, exclude, distance, eps):
    return reference.lrml_topk(
        user_emb, item_emb, keys, memory, users, k, exclude=exclude, distance=distance, eps=eps
    )


def _torch_distances(user_emb, item_emb, keys, memory, users, items, distance, relation, eps, sp):
    return reference.lrml_distances(
        user_emb,
        item_emb,
        keys,
        memory,
        users,
        items,
        distance=distance,
        relation=relation,
        eps=eps,
        sparse_grad=sp,
    )


def _torch_hinge(
    user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps, reduction, sp
):
    D = _torch_distances(
        user_emb, item_emb, keys, memory, users, items, distance, relation, eps, sp
    )
    return reference.hinge_from_distances(D, margin, reduction)


def _torch_hinge_grads(
    user_emb, item_emb, keys, memory, users, items, margin, distance, relation, eps, reduction
):
    """Loss and per-row gradients ``(loss, g_user_rows [B, d], g_item_rows [B, C, d], gK, gM)``."""
    with torch.enable_grad():
        p = user_emb.detach()[users].requires_grad_()
        q = item_emb.detach()[items].requires_grad_()
        k = keys.detach().requires_grad_()
        m = memory.detach().requires_grad_()
        D = reference.distances_from_rows(p, q, k, m, distance=distance, relation=relation, eps=eps)
        loss = reference.hinge_from_distances(D, margin, reduction)
        grads = torch.autograd.grad(loss.sum(), (p, q, k, m))
    return (loss.detach(), *grads)


def _torch_relations(user_emb, item_emb, keys, memory, users, items):
    return reference.lrml_relations(user_emb, item_emb, keys, memory, users, items)


TORCH_BACKEND = SimpleNamespace(
    name="torch",
    devices=None,  # any
    distances=_torch_distances,
    hinge_loss=_torch_hinge,
    topk=_torch_topk,
    hinge_loss_grads=_torch_hinge_grads,
    relations=_torch_relations,
)


def triton_interpreted() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem_of(triton_version: str | None, numpy_version: str) -> str | None:
    """Why the CPU interpreter of Triton ``triton_version`` cannot run these kernels beside
    numpy ``numpy_version``, or None (also when Triton is not installed).

    Triton 3.6's interpreter turns a loop bound into a Python int with ``int()`` of a 1-element
    numpy array, which numpy 2.4 refuses (``TypeError: only 0-dimensional arrays can be
    converted to Python scalars``); Triton 3.7 fixed it. Compiled kernels on a GPU are not
    affected.
    """
    if triton_version is None:
        return None
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"the interpreter of triton {triton_version} fails with numpy {numpy_version} "
            "(fixed in triton 3.7): install numpy<2.4 or triton>=3.7"
        )
    return None


_INTERPRETER_PROBLEM: list = []  # [reason or None], found once per process


def interpreter_problem() -> str | None:
    """:func:`interpreter_problem_of` the installed Triton and numpy (read once)."""
    if not _INTERPRETER_PROBLEM:
        from importlib import metadata

        import numpy as np

        try:
            version = metadata.version("triton")
        except metadata.PackageNotFoundError:
            version = None
        _INTERPRETER_PROBLEM.append(interpreter_problem_of(version, np.__version__))
    return _INTERPRETER_PROBLEM[0]


_LOADED: dict = {}  # name -> backend object (a plain dict: torch.compile traces a hit cheaply)
_FAILED: dict = {}  # name -> the BackendUnavailable it raised (a failed build is not retried)


def _load(name: str):
    """The backend object, or raise :class:`BackendUnavailable` with the reason."""
    backend = _LOADED.get(name)
    if backend is None:
        if name in _FAILED:
            raise _FAILED[name]
        try:
            backend = _LOADED[name] = _import_backend(name)
        except BackendUnavailable as exc:
            _FAILED[name] = exc
            raise
    return backend


def _import_backend(name: str):
    if name == "torch":
        return TORCH_BACKEND
    if name == "triton":
        try:
            from lrml_kernels import triton as triton_backend  # a statement: torch.compile runs it

            return triton_backend
        except ImportError as exc:
            raise BackendUnavailable(f"triton backend: import failed ({exc})") from exc
    if name in ("cpu", "cuda"):
        from lrml_kernels import extension

        return extension.backend(name)  # raises BackendUnavailable with the build error
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


_fell_back: set[str] = set()  # the device types "auto" has warned about (once a process)


def check_name(backend) -> None:
    """``ValueError`` unless ``backend`` is "auto" or one of :data:`BACKENDS`."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def _runs_on(name: str, device_type: str) -> str | None:
    """None if backend `name` can run on `device_type`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreted():
            problem = interpreter_problem()
            return None if problem is None else f"triton backend: {problem}"
        return (
            "triton backend runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), "
            f"not on {device_type}"
        )
    if name != device_type:
        return f"{name} backend runs on {name} tensors, not {device_type}"
    if name == "cuda" and not torch.cuda.is_available():
        return "cuda backend: no CUDA device"
    return None


def why_unavailable(name: str, device_type: str | None = None) -> str | None:
    """None if ``name`` can run (on ``device_type`` if given), else a sentence saying why not."""
    if device_type is not None:
        reason = _runs_on(name, device_type)
        if reason:
            return reason
    try:
        _load(name)
    except BackendUnavailable as exc:
        return str(exc)
    if device_type is None and name == "triton":
        if not (torch.cuda.is_available() or triton_interpreted()):
            return "triton backend: no CUDA device (set TRITON_INTERPRET=1 to run on the CPU)"
        if not torch.cuda.is_available():  # (the interpreter only: it may not run here)
            return _runs_on(name, "cpu")
    if device_type is None and name == "cuda" and not torch.cuda.is_available():
        return "cuda backend: no CUDA device"
    return None


def devices_here() -> list[str]:
    """The devices this process can use, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    other = _other_accelerator()
    if other is not None:
        found += [f"{other}:{i}" for i in range(torch.accelerator.device_count())]
    return found


def check_device(spec) -> torch.device:
    """``spec`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...) as a device that exists here.

    Raises ``ValueError`` saying which devices there are otherwise; it touches no device, so
    options are checked in a moment, before any data is loaded.
    """
    here = ", ".join(devices_here())
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec!r} is not a device name; devices here: {here}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device"
            raise ValueError(
                f"--device {spec!r}: {why} (torch {torch.__version__}); devices here: {here}"
            )
        count = torch.cuda.device_count()
    elif device.type == _other_accelerator():
        count = torch.accelerator.device_count()
    else:
        raise ValueError(f"--device {spec!r}: no such device here; devices here: {here}")
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {spec!r}: there {'is' if count == 1 else 'are'} {count} {device.type} "
            f"device{'' if count == 1 else 's'}; devices here: {here}"
        )
    return device


def _other_accelerator() -> str | None:
    """The accelerator other than CUDA that torch can use here (``"mps"``, ``"xpu"``), if any."""
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return acc.type if acc is not None and acc.type != "cuda" else None


def available_backends() -> list[str]:
    """The backends that can run on this machine, e.g. ``["torch", "cpu"]``."""
    return [name for name in BACKENDS if why_unavailable(name) is None]


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` ("auto" or a name) on ``device``."""
    if backend == "auto":
        backend = os.environ.get("LRML_KERNELS_BACKEND", "auto") or "auto"
        if backend == "auto":
            reasons = []
            for name in _AUTO_ORDER.get(device.type, ("torch",)):
                reason = why_unavailable(name, device.type)
                if reason is None:
                    if name == "torch" and reasons and device.type not in _fell_back:
                        _fell_back.add(device.type)
                        warnings.warn(
                            f"no compiled backend runs on {device.type} here "
                            f"({'; '.join(reasons)}): the torch backend (the reference, several "
                            "times slower) runs instead",
                            LRMLWarning,
                            stacklevel=3,
                        )
                    return name
                lines = [line.strip() for line in reason.splitlines() if line.strip()]
                reasons.append(" ".join(lines[:1] + lines[1:][-1:]))  # (a build's: its last)
            return "torch"
    check_name(backend)
    reason = why_unavailable(backend, device.type)
    if reason:
        raise BackendUnavailable(reason)
    return backend


def get(backend: str, device: torch.device, rows: int | None = None):
    """The backend object that runs ``backend`` ("auto" or a name) on ``device``.

    A batch of ``rows == 0`` gets the torch backend: there is nothing for a kernel to launch, and
    the reference returns the empty results (and zero gradients) every backend must.
    """
    impl = _load(resolve(backend, device))
    return TORCH_BACKEND if rows == 0 else impl
