"""The C++/CPU and CUDA extension backends (csrc/): built once with ninja, loaded once per process.

Two shared libraries register the ``lrml_ext`` ops with the dispatcher (``torch.ops.lrml_ext``):

- the CPU library (``csrc/bindings.cpp``, ``csrc/cpu/*.cpp``): the op schema and the CPU kernels;
- the CUDA library (``csrc/cuda/*``): the CUDA kernels, registered under the CUDA key. It needs the
  CPU library (the schema) and a CUDA build of torch with a matching nvcc.

Each is taken, in order, from the ahead-of-time build of ``setup.py`` (``lrml_kernels._C_cpu`` /
``_C_cuda``, used only if built from the same sources for the same torch), else built just in time
with ``torch.utils.cpp_extension.load`` (ninja) into ``$LRML_KERNELS_CACHE`` (default
``~/.cache/lrml_kernels``)/``ext-<hash of sources, their folder, torch, python, cpu flags>``;
later processes load the cached library without compiling. Builders of one folder take turns under
an advisory lock that dies with its process, so a build killed midway (``kill -9``, a timeout)
leaves no lock behind for the next one to wait on forever. A failed build is remembered for the
rest of the process and reported as :class:`~lrml_kernels.errors.BackendUnavailable` with the
compiler's last lines; ``LRML_KERNELS_NO_JIT=1`` disables just-in-time builds (loading a cached
one too), ``LRML_KERNELS_NO_JIT=cuda`` (a comma list of ``cpu``, ``cuda``) those of the libraries
named (the GPU check sets it for the libraries whose build failed).

Autograd (``register_autograd``) and fake kernels (``register_fake``, for ``torch.compile`` and
meta tensors) are registered here, once, after the CPU library is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from lrml_kernels._build import (
    CPU_SOURCES,
    CUDA_SOURCES,
    cpu_flags,
    cpu_flags_hash,
    sources_hash,
    stamp_path,
)
from lrml_kernels.errors import BackendUnavailable, LRMLWarning
from lrml_kernels.gradients import table_grad
from lrml_kernels.reference import sort_candidates

NAMESPACE = "lrml_ext"
# -fno-math-errno: sqrt in vectorised loops (errno is never read)
CPU_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]

_PKG = Path(__file__).resolve().parent
_lock = threading.RLock()
_loaded: dict[str, object] = {}  # "cpu"/"cuda" -> True or the BackendUnavailable to re-raise
_origin: dict[str, str] = {}  # "cpu"/"cuda" -> which build was loaded (lrml info prints it)
_registered = False


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: packaged (regular install) or the repository's csrc/ (editable)."""
    for cand in (_PKG / "csrc", _PKG.parent / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    return None


def cache_root() -> Path:
    env = os.environ.get("LRML_KERNELS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lrml_kernels"


def build_dir(src: Path) -> Path:
    """The just-in-time build directory of the sources ``src``: one per source content, source
    directory, torch, CUDA, Python, machine and flags. The directory is in the key because the
    build files name the sources by path: two checkouts of the same sources sharing one
    directory would each find the other's build out of date and rebuild it (20-40 s)."""
    key = "|".join(
        [
            sources_hash(src),
            str(src.resolve()),
            torch.__version__,
            str(torch.version.cuda),
            sys.version.split()[0],
            platform.machine(),
            cpu_flags(),
            " ".join(CPU_CFLAGS),
        ]
    )
    return cache_root() / ("ext-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def _first(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(str(text).strip().splitlines()[-lines:])


def _aot_library(name: str) -> str | None:
    """Path of the setup.py-built library ``lrml_kernels._C_<name>`` if it matches the sources."""
    try:
        spec = importlib.util.find_spec(f"lrml_kernels._C_{name}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    src = csrc_dir()
    try:
        stamp = json.loads(stamp_path(spec.origin).read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp is None or stamp.get("torch") != torch.__version__:
        return None
    if "cpu_flags" in stamp and stamp["cpu_flags"] != cpu_flags_hash():
        return None  # built with -march=native on another kind of CPU: build for this one
    if src is not None and stamp.get("sources") != sources_hash(src):
        return None  # stale in-place build: rebuild just in time
    return spec.origin


@contextlib.contextmanager
def _build_lock(out: Path):
    """Held while building in ``out``: an exclusive ``flock`` on ``out/.lrml-build.lock``, which
    the kernel releases when its process dies. ``cpp_extension.load`` has a lock of its own, the
    file ``out/lock``, which it creates and removes; a build killed midway leaves that file, and
    every later build waits for it to go, forever. Found while this lock is held, it is such a
    leftover (every builder of ``out`` holds this lock), and is removed. (No ``flock`` on
    Windows: only torch's lock there.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out / ".lrml-build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (out / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" warning
    (logged on import where nvcc is installed and no GPU is seen: on stderr of every command
    that loads the cached library, and beside the point for the CPU library; the CUDA library
    says itself why it cannot be built)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _jit_disabled(name: str) -> bool:
    """Whether ``LRML_KERNELS_NO_JIT`` rules out a just-in-time build of library ``name``: any
    value but "" and "0" does, unless it is a comma list of library names without ``name``."""
    value = os.environ.get("LRML_KERNELS_NO_JIT", "0").strip()
    if value in ("", "0"):
        return False
    names = {n.strip() for n in value.split(",") if n.strip()}
    return name in names or not names <= {"cpu", "cuda"}


def _jit_build(name: str) -> None:
    if _jit_disabled(name):
        value = os.environ.get("LRML_KERNELS_NO_JIT")
        raise BackendUnavailable(
            f"{name} backend: no ahead-of-time build and LRML_KERNELS_NO_JIT={value} is set"
        )
    src = csrc_dir()
    if src is None:
        raise BackendUnavailable(f"{name} backend: the csrc/ sources are not installed")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:  # (torch would say the compiler is "not compatible")
        raise BackendUnavailable(
            f"{name} backend: no C++ compiler ({cxx}) on the PATH to build it: install one "
            "(e.g. g++) or set CXX"
        )
    cpp_extension = _cpp_extension()
    if name == "cpu":
        sources = [str(src / s) for s in CPU_SOURCES]
        kwargs = dict(
            extra_cflags=CPU_CFLAGS,
            extra_ldflags=["-fopenmp"],
            with_cuda=False,
        )
    else:
        if torch.version.cuda is None:
            raise BackendUnavailable("cuda backend: this torch build has no CUDA support")
        if cpp_extension.CUDA_HOME is None:
            raise BackendUnavailable("cuda backend: nvcc / CUDA_HOME not found")
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch takes the architectures from the devices (an IndexError without one)
            raise BackendUnavailable(
                "cuda backend: no CUDA device to build for (set TORCH_CUDA_ARCH_LIST, "
                "e.g. '8.0;9.0', to build without one)"
            )
        sources = [str(src / s) for s in CUDA_SOURCES]
        kwargs = dict(
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            with_cuda=True,
        )
    out = build_dir(src) / name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only home
        raise BackendUnavailable(
            f"{name} backend: cannot create the build folder {out} ({exc}); set "
            "LRML_KERNELS_CACHE to a writable folder"
        ) from exc
    if not (out / f"lrml_ext_{name}.so").exists():  # a first build: minutes, say so
        warnings.warn(
            f"building the C++ {name} extension once into {out} (a few minutes; "
            "LRML_KERNELS_VERBOSE_BUILD=1 shows the compiler)",
            LRMLWarning,
            stacklevel=2,
        )
    try:
        with _build_lock(out):
            cpp_extension.load(
                name=f"lrml_ext_{name}",
                sources=sources,
                extra_include_paths=[str(src)],
                build_directory=str(out),
                is_python_module=False,
                verbose=os.environ.get("LRML_KERNELS_VERBOSE_BUILD", "0") not in ("", "0"),
                **kwargs,
            )
    except Exception as exc:  # compiler errors, missing ninja, loader errors
        raise BackendUnavailable(f"{name} backend: build failed:\n{_tail(exc)}") from exc


def prebuild(names: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, str | None]:
    """Build the just-in-time libraries ``names`` at the same time, one child process each.

    A cold build takes as long as its slowest source when ninja has the cores
    (``fused_hinge_autograd.cpp``, ``cuda/lrml_cuda.cpp``: ~21 and ~19 s on one core here), so
    building both at once takes the longer, not the sum.
    Nothing is loaded into this process (:func:`backend` then loads the cached libraries). A
    library with a usable ahead-of-time build is skipped. Returns name -> None (built, or nothing
    to build) or the failure's last lines.
    """
    import subprocess

    children = {}
    for name in names:
        if name not in ("cpu", "cuda"):
            raise ValueError(f"the extension has the 'cpu' and 'cuda' libraries, not {name!r}")
        if _aot_library(name) is None:
            code = f"from lrml_kernels import extension as e; e._jit_build({name!r})"
            children[name] = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
    result = dict.fromkeys(names)
    for name, child in children.items():
        out, _ = child.communicate()
        if child.returncode != 0:
            result[name] = _tail(out)
    return result


def _load_library(name: str) -> None:
    """Load the library ``name`` once per process; remember a failure."""
    with _lock:
        state = _loaded.get(name)
        if state is True:
            return
        if isinstance(state, BackendUnavailable):
            raise state
        try:
            if name == "cuda":
                if torch.version.cuda is None:  # (before the CPU library's own failure)
                    raise BackendUnavailable("cuda backend: this torch build has no CUDA support")
                _load_library("cpu")  # the schema lives in the CPU library
            path = _aot_library(name)
            aot_error = None
            if path is not None:
                try:
                    torch.ops.load_library(path)
                    _origin[name] = f"ahead-of-time build {path}"
                except Exception as exc:  # ABI mismatch etc.: fall back to the JIT build
                    aot_error = f"the ahead-of-time build {path} did not load ({_first(exc)})"
            if name not in _origin:
                try:
                    _jit_build(name)
                except BackendUnavailable as exc:
                    if aot_error is None:
                        raise
                    raise BackendUnavailable(f"{exc}; {aot_error}") from exc
                _origin[name] = f"just-in-time build in {build_dir(csrc_dir()) / name}"
            if name == "cpu":
                _register_python_side()
        except BackendUnavailable as exc:
            _loaded[name] = exc
            raise
        except Exception as exc:
            err = BackendUnavailable(f"{name} backend: loading failed: {_tail(exc)}")
            _loaded[name] = err
            raise err from exc
        _loaded[name] = True


# ----------------------------------------------------------------------------------------------
# Python side of the ops: fake kernels and autograd.


def library_origin(name: str) -> str | None:
    """Which build of the ``name`` library this process loaded (None if not loaded)."""
    return _origin.get(name)


def _ops():
    return getattr(torch.ops, NAMESPACE)


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    lib = f"{NAMESPACE}::"

    @torch.library.register_fake(lib + "distances")
    def _(user_emb, item_emb, keys, memory, users, items, distance, relation, eps, sparse_grad):
        return user_emb.new_empty(items.shape)

    def _grads_fake(user_emb, keys, memory, items):
        B, C = items.shape
        d = user_emb.shape[1]
        return (
            user_emb.new_empty(B, d),
            user_emb.new_empty(B, C, d),
            keys.new_empty(keys.shape),
            memory.new_empty(memory.shape),
        )

    @torch.library.register_fake(lib + "distances_backward")
    def _(grad, user_emb, item_emb, keys, memory, users, items, distance, relation, eps):
        return _grads_fake(user_emb, keys, memory, items)

    def _loss_fake(user_emb, items, reduction):
        return user_emb.new_empty(items.shape[0]) if reduction == "none" else user_emb.new_empty(())

    @torch.library.register_fake(lib + "hinge_loss")
    def _(P, Q, K, M, users, items, margin, distance, relation, eps, reduction, sparse_grad):
        return _loss_fake(P, items, reduction)

    @torch.library.register_fake(lib + "hinge_loss_backward")
    def _(grad, P, Q, K, M, users, items, margin, distance, relation, eps, reduction):
        return _grads_fake(P, K, M, items)

    @torch.library.register_fake(lib + "hinge_loss_grads")
    def _(P, Q, K, M, users, items, margin, distance, relation, eps, reduction):
        return (_loss_fake(P, items, reduction), *_grads_fake(P, K, M, items))

    @torch.library.register_fake(lib + "topk")
    def _(P, Q, K, M, users, k, exclude_indptr, exclude_indices, distance, eps):
        B = users.shape[0]
        return P.new_empty(B, k), users.new_empty(B, k, dtype=torch.int64)

    @torch.library.register_fake(lib + "topk_screened")
    def _(P, Q, K, M, users, k, exclude_indptr, exclude_indices, distance, eps, candidates):
        B = users.shape[0]
        return (
            P.new_empty(B, k),
            users.new_empty(B, k, dtype=torch.int64),
            users.new_empty(B, dtype=torch.bool),
        )

    @torch.library.register_fake(lib + "relations")
    def _(P, Q, K, M, users, items):
        return P.new_empty(users.shape[0], K.shape[0]), P.new_empty(users.shape[0], P.shape[1])

    @torch.library.register_fake(lib + "sample_negatives")
    def _(indptr, indices, popularity, users, num_items, k, seed, max_tries):
        return users.new_empty(users.shape[0], k)

    @torch.library.register_fake(lib + "epoch_order")
    def _(round_keys, start, count, n, world, rank, a, b):
        return round_keys.new_empty(count)

    @torch.library.register_fake(lib + "training_batch")
    def _(
        rows,
        train_users,
        train_items,
        indptr,
        indices,
        popularity,
        num_items,
        k,
        seed,
        tries,
        parallel,
    ):
        return rows.new_empty(rows.shape[0]), rows.new_empty(rows.shape[0], 1 + k)

    @torch.library.register_fake(lib + "synthetic_items")
    def _(r, y, users, cum, segments, zipf_top, sizes, seg_offsets, table):
        return users.new_empty(users.shape)

    @torch.library.register_fake(lib + "keep_distinct_")
    def _(buffer, got, offsets, quota, who, draws, items, num_items):
        return None

    @torch.library.register_fake(lib + "synthetic_rows_")
    def _(users, items, timestamps, buffer, offsets, got, first_user, exponential, mean_gap, start):
        return None

    @torch.library.register_fake(lib + "sorted_unique_keys")
    def _(users, items, num_users, num_items):
        n = torch.library.get_ctx().new_dynamic_size()
        return users.new_empty(n, dtype=torch.int64), users.new_empty(
            num_users + 1, dtype=torch.int64
        )

    @torch.library.register_fake(lib + "latest_rows")
    def _(users, timestamps, num_users):
        return users.new_empty(num_users, dtype=torch.int64)

    @torch.library.register_fake(lib + "eval_negatives_bad")
    def _(negatives, users, keys, indptr, num_items):
        return users.new_empty(torch.library.get_ctx().new_dynamic_size())

    @torch.library.register_fake(lib + "drop_held_out_")
    def _(users, items, timestamps, held_out_item):
        return torch.library.get_ctx().new_dynamic_size()

    def _setup(ctx, inputs, output):
        P, Q, K, M, users, items, *opts = inputs
        ctx.save_for_backward(P, Q, K, M, users, items)
        ctx.opts = opts

    def _finish(ctx, gp, gq, gK, gM, sparse):
        P, Q, K, M, users, items = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (
            table_grad(gp, users, P.shape[0], P.dtype, sparse) if need[0] else None,
            table_grad(gq, items, Q.shape[0], Q.dtype, sparse) if need[1] else None,
            gK if need[2] else None,
            gM if need[3] else None,
        )

    @_differentiable_once
    def _distances_backward(ctx, grad):
        P, Q, K, M, users, items = ctx.saved_tensors
        distance, relation, eps, sparse = ctx.opts
        n_extra = 6
        if not any(ctx.needs_input_grad[:4]):
            return (None,) * (4 + n_extra)
        gp, gq, gK, gM = _ops().distances_backward(
            grad.contiguous(), P, Q, K, M, users, items, distance, relation, eps
        )
        return (*_finish(ctx, gp, gq, gK, gM, sparse), *(None,) * n_extra)

    @_differentiable_once
    def _hinge_backward(ctx, grad):
        P, Q, K, M, users, items = ctx.saved_tensors
        margin, distance, relation, eps, reduction, sparse = ctx.opts
        n_extra = 8
        if not any(ctx.needs_input_grad[:4]):
            return (None,) * (4 + n_extra)
        gp, gq, gK, gM = _ops().hinge_loss_backward(
            grad.contiguous(), P, Q, K, M, users, items, margin, distance, relation, eps, reduction
        )
        return (*_finish(ctx, gp, gq, gK, gM, sparse), *(None,) * n_extra)

    torch.library.register_autograd(lib + "distances", _distances_backward, setup_context=_setup)
    torch.library.register_autograd(lib + "hinge_loss", _hinge_backward, setup_context=_setup)
    _registered = True


# ----------------------------------------------------------------------------------------------
# Autograd of a scalar hinge loss in one fused pass: lrml_ext::hinge_loss_fused, whose C++ autograd
# node (csrc/fused_hinge_autograd.cpp) saves the gradients hinge_loss_grads computes in the forward
# and only scales them in backward. Used outside torch.compile (which traces the registered
# autograd of lrml_ext::hinge_loss) for fp32/fp64 parameters; reduction="none" and lrml_distances
# keep the op's recomputing backward.


def _differentiable_once(backward):
    """The backward ops have no autograd of their own, so a double backward through them must
    fail loudly, not silently miss terms. torch's ``once_differentiable`` does that only where
    the upstream gradient requires grad; under ``create_graph`` with a constant upstream gradient
    (``torch.autograd.grad(loss, K, create_graph=True)``) it hands back gradients with no graph,
    and a loss built on them loses its second-order terms. Here every gradient computed under
    ``create_graph`` raises when it is differentiated (fused_hinge_autograd.cpp does the same).
    The error node takes the op's tables as inputs too: it lies on the path from each gradient
    back to them, so ``torch.autograd.grad(f(gK), K)``, which runs only the nodes on a path to
    ``K``, raises as ``backward()`` does."""

    @functools.wraps(backward)
    def wrapper(ctx, grad):
        with torch.no_grad():
            outputs = backward(ctx, grad)
        if not torch.is_grad_enabled() or not any(ctx.needs_input_grad):
            return outputs
        tables = [t for t in ctx.saved_tensors[:4] if t.requires_grad]
        error = torch._C._functions.DelayedError(
            b"lrml_kernels: the cpu and cuda backends are differentiable once (no double "
            b'backward); use backend="torch" for higher-order gradients',
            len(outputs) + len(tables),
        )
        grads = [None if g is None else g.detach().requires_grad_() for g in outputs]
        return error(*grads, *tables)[: len(outputs)]

    return wrapper


def _fused_autograd_applies(params, reduction: str) -> bool:
    return (
        reduction != "none"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in params)
        and params[0].dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )


# ----------------------------------------------------------------------------------------------
# The backend objects of lrml_kernels.backends.


_HALF = (torch.float16, torch.bfloat16)


def _float_rows(name, table, idx):
    """``(table[idx] in float32, 0..n-1)`` for the CPU kernels that take fp32 / fp64 only
    (relations, top-k) and a half-precision ``table``: the rows the call reads, not the whole
    table upcast (48M values of a Netflix-size user table). The indices are range-checked first,
    with the kernels' message; indices that are not a 1-D integer tensor are left to the
    kernel's checks (the table upcast whole)."""
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        return table.float(), idx
    from lrml_kernels.ops import check_index_ranges

    check_index_ranges([(name, idx, table.shape[0])])
    rows = table.index_select(0, idx.to(torch.int64)).float()
    return rows, torch.arange(idx.shape[0], device=idx.device)


class ExtensionBackend:
    """The ``cpu`` or ``cuda`` backend: the interface of :mod:`lrml_kernels.backends`."""

    def __init__(self, name: str):
        self.name = name
        self.devices = (name,)

    def __repr__(self) -> str:
        return f"<lrml_kernels extension backend {self.name!r}>"

    def distances(self, user_emb, item_emb, keys, memory, users, items, distance, relation, eps,
                  sparse_grad):  # fmt: skip
        return _ops().distances(
            user_emb, item_emb, keys, memory, users, items, distance, relation, float(eps),
            bool(sparse_grad),
        )  # fmt: skip

    def hinge_loss(self, user_emb, item_emb, keys, memory, users, items, margin, distance,
                   relation, eps, reduction, sparse_grad):  # fmt: skip
        params = (user_emb, item_emb, keys, memory)
        if _fused_autograd_applies(params, reduction):
            return _ops().hinge_loss_fused(
                *params, users, items, float(margin), distance, relation, float(eps), reduction,
                bool(sparse_grad),
            )  # fmt: skip
        return _ops().hinge_loss(
            *params, users, items, float(margin), distance, relation, float(eps), reduction,
            bool(sparse_grad),
        )  # fmt: skip

    def hinge_loss_grads(self, user_emb, item_emb, keys, memory, users, items, margin, distance,
                         relation, eps, reduction):  # fmt: skip
        """Forward and backward in one call, no autograd: ``(loss, grad_user_rows [B, d],
        grad_item_rows [B, C, d], grad_keys [N, d], grad_memory [N, d])`` for ``∂loss = 1``
        (per-row losses each with gradient 1 for reduction="none")."""
        params = tuple(t.detach() for t in (user_emb, item_emb, keys, memory))
        return _ops().hinge_loss_grads(
            *params, users, items, float(margin), distance, relation, float(eps), reduction
        )

    def relations(self, user_emb, item_emb, keys, memory, users, items):
        """``(a [B, N], r [B, d])`` of the pairs (users[b], items[b]); forward only."""
        dtype = user_emb.dtype
        if self.name != "cpu" or dtype not in _HALF:
            return _ops().relations(user_emb, item_emb, keys, memory, users, items)
        P, users = _float_rows("users", user_emb, users)
        Q, items = _float_rows("items", item_emb, items)
        a, r = _ops().relations(P, Q, keys.float(), memory.float(), users, items)
        return a.to(dtype), r.to(dtype)

    def row_update_(self, table, states, idx, grad, optimizer, lr, eps, betas, max_norm, seed):
        """The fused trainer's row update + projection, in place: the rows ``idx [n]`` of
        ``table`` (repeats allowed: their gradient rows ``grad [n, d]`` are summed in order) and
        of the optimizer's ``states`` (``LRMLTrainer``'s, in the order of its ``_STATE_KEYS``).
        A bf16 table is updated in fp32 and written back stochastically rounded with the bits
        that the Triton row update draws for ``seed``.

        CPU tables only (fp32/fp64, state of the same dtype; bf16, state in fp32, ``grad`` fp32 or
        bf16, read as it is; contiguous); returns False where it does not apply, so the caller
        falls back to torch ops.
        """
        compute = torch.float32 if table.dtype == torch.bfloat16 else table.dtype
        ok = (
            self.name == "cpu"
            and compute in (torch.float32, torch.float64)
            and table.is_contiguous()
            and all(t.is_contiguous() and t.dtype == compute for t in states)
        )
        if not ok:
            return False
        grad = grad.reshape(-1, table.shape[1])
        if grad.dtype != table.dtype:
            grad = grad.to(compute)
        _ops().row_update_(
            table, list(states), idx.reshape(-1).to(torch.int64).contiguous(),
            grad.contiguous(), optimizer,
            float(lr), float(eps), float(betas[0]), float(betas[1]),
            0.0 if max_norm is None else float(max_norm), int(seed),
        )  # fmt: skip
        return True

    def topk(self, user_emb, item_emb, keys, memory, users, k, exclude, distance, eps):
        # Detached: the kernel's worker threads do not inherit the caller's no_grad mode, and
        # its GEMMs into preallocated outputs refuse inputs that require grad.
        params = tuple(t.detach() for t in (user_emb, item_emb, keys, memory))
        dtype = params[0].dtype
        half = self.name == "cpu" and dtype in _HALF
        if half:  # the users' rows only (the exclusions are per row of the call)
            P, users = _float_rows("users", params[0], users)
            params = (P, *(t.float() for t in params[1:]))
        indptr, indices = (None, None) if exclude is None else exclude
        if not half:
            return _ops().topk(*params, users, int(k), indptr, indices, distance, float(eps))
        # SPEC.md: fp16/bf16 parameters rank the distances rounded to their dtype, ties by the
        # smaller id. The kernel ranks in fp32: take its top kk, kk doubled until every item that
        # rounds to the k-th value is among them, then rank (rounded, id).
        # (twice k to start: a second full pass over the catalogue is rarely needed)
        n_items, k = params[1].shape[0], int(k)
        kk = min(max(2 * k, k + 16), max(k, n_items))
        while True:
            D, ids = _ops().topk(*params, users, kk, indptr, indices, distance, float(eps))
            D = D.to(dtype)
            if kk >= n_items or not k or not users.numel():
                break
            last, kth = D[:, -1], D[:, k - 1]
            if bool(((last > kth) | last.isnan() | (ids[:, -1] < 0)).all()):
                break
            kk = min(2 * kk, n_items)
        return sort_candidates(D, ids, k)


def backend(name: str):
    """The extension backend ``name`` ("cpu" or "cuda"), or raise :class:`BackendUnavailable`."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"the extension provides the 'cpu' and 'cuda' backends, not {name!r}")
    _load_library(name)
    return ExtensionBackend(name)


__all__ = ["BackendUnavailable", "ExtensionBackend", "backend", "csrc_dir", "prebuild"]
