"""Checkpoint files that cannot run code when they are loaded.

A checkpoint is a ``torch.save`` zip archive of one dict holding only plain values: dicts, lists,
tuples, str, int, float, bool, None and tensors (:func:`to_plain` makes it so before every write).
:func:`read` loads it with ``torch.load(weights_only=True)``, whose unpickler builds nothing else,
so a tampered or foreign file can at worst fail to load: it cannot execute code. What it may not
hold is reported by name (the pickle's globals, listed without being imported).

Every checkpoint written by this package so far holds plain values only and loads as it is. One
written with other objects in it (numpy numbers in the options of a run started from Python, a
pickled ``TrainConfig``, numpy RNG state) is refused with the way out: ``lrml convert-checkpoint
OLD NEW`` (:func:`convert`) unpickles it fully, which runs whatever code the file names, so it is
for files one trusts, and rewrites it as plain values.

:class:`BackgroundWriter` writes checkpoints while training goes on: it copies the tensors (a
memcpy; from a GPU, a copy to host memory) and writes the copy in a thread, one write at a time.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePath

import numpy as np
import torch


class CheckpointError(ValueError):
    """The file is not a checkpoint this package can load safely; the message says why."""


# What every checkpoint holds, and what resuming training needs as well: key -> type.
REQUIRED = {"config": dict, "model": dict, "num_users": int, "num_items": int}
REQUIRED_TO_RESUME = {
    "trainer": (dict, list),  # (a list: torch optimizers' states, as written before 2026-12-07)
    "epoch": int,
    "step_in_epoch": int,
    "global_step": int,
    "gen_states": list,
    "loss_sum": torch.Tensor,
    "epoch_seconds": float,
    "history": list,
    "data_fingerprint": str,
}
_SCALARS = (type(None), bool, int, float, str, bytes)


# A temporary file of a process that is gone is deleted once it is this old (seconds): a writer
# on another machine that shares the folder has a pid this one cannot check, but it keeps the
# file's modification time fresh while it writes.
STALE_SECONDS = 60.0


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary file, fsync it, then rename over ``path``.
    If ``write`` raises (or is interrupted), ``path`` is as it was and the temporary file gone.
    The temporaries that killed writers (SIGKILL, power loss) left beside ``path`` are deleted."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = os_error_under(exc)
        if cause is not None:  # torch.save reports a full disk as RuntimeError("unexpected pos")
            raise OSError(cause.errno, f"{cause.strerror} (writing {path})") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def os_error_under(exc: BaseException) -> OSError | None:
    """The OSError (a full disk, a file-size limit) behind an error that is not one itself."""
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def remove_stale_temporaries(path: Path, min_age: float = STALE_SECONDS) -> None:
    """Delete the temporaries of :func:`atomic_write` beside ``path`` (``.NAME.tmpPID``) whose
    process PID is gone and which have not changed for ``min_age`` seconds."""
    path = Path(path)
    prefix = f".{path.name}.tmp"
    try:
        names = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return  # (no folder yet: the write reports it)
    for tmp in names:
        pid = tmp.name[len(prefix) :]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_exists(int(pid)):
            continue
        try:
            if time.time() - tmp.stat().st_mtime >= min_age:
                tmp.unlink()
        except OSError:
            pass  # (gone meanwhile, or not ours to delete: it stays)


def _process_exists(pid: int) -> bool:
    if os.name != "posix":
        return True  # (Windows' os.kill(pid, 0) would send a CTRL_C_EVENT)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # (another user's process; OverflowError: not a pid, leave the file alone)
    return True


def to_plain(obj, where: str = "checkpoint"):
    """``obj`` as plain values that ``torch.load(weights_only=True)`` reads back.

    Tensors, containers and Python scalars stay as they are; numpy numbers become Python numbers,
    numpy arrays tensors, dataclasses dicts, paths strings, RNGs (torch or numpy) their state.
    Anything else raises ``TypeError`` naming where in ``obj`` it is.
    """
    if torch.is_tensor(obj) or type(obj) in _SCALARS:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: a numpy array of Python objects is not a plain value")
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[to_plain(k, f"{where} key")] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):  # a namedtuple becomes a tuple
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj), where)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, np.random.RandomState):
        return to_plain(obj.get_state(legacy=False), where)
    if isinstance(obj, np.random.Generator):
        return to_plain(obj.bit_generator.state, where)
    for base in (bool, int, float, str):  # a subclass (an IntEnum, a str enum): the base type
        if isinstance(obj, base):
            return base(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(f"{where}: a {name} is not a plain value")


def save(state: dict, path: Path) -> None:
    """Write ``state`` as plain values to ``path`` (atomically: see :func:`atomic_write`)."""
    plain = to_plain(state)
    atomic_write(Path(path), lambda f: torch.save(plain, f))


class BackgroundWriter:
    """Writes checkpoints with :func:`save` in a background thread, one write at a time.

    :meth:`save` waits for the write before it (never two at once, and in order), copies every
    tensor of the state to host memory (the caller may change its tensors as soon as it returns),
    then starts the write; :meth:`wait` joins it. A write is atomic (:func:`atomic_write`): a crash
    in the middle leaves the file of the write before. ``then()``, if given, runs in the same
    thread once the write is on disk (not after a failed one): a file that describes the
    checkpoint (``metrics.json``) is then never ahead of it. An error of a write or of ``then`` is
    raised by the next :meth:`save` or :meth:`wait`.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: Path, then: Callable[[], None] | None = None) -> None:
        self.wait()
        snapshot = _host_copy(to_plain(state))
        self._thread = threading.Thread(
            target=self._write, args=(snapshot, Path(path), then), name="lrml-checkpoint"
        )
        self._thread.start()

    def wait(self, *, raise_error: bool = True) -> None:
        """Join the write under way; raise its error (``raise_error=False``: drop it, for a caller
        that is already handling another one)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error

    def _write(self, state: dict, path: Path, then) -> None:
        try:
            save(state, path)
            if then is not None:
                then()
        except BaseException as exc:  # raised in the training thread by wait()
            self._error = exc


def _host_copy(obj):
    """``obj`` (plain values) with every tensor replaced by a copy in host memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _host_copy(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


def read(path, *, resume: bool = False) -> dict:
    """The checkpoint at ``path`` (tensors on the CPU), loaded without running code and checked
    for what it must hold.

    Raises ``FileNotFoundError`` if there is no file, :class:`CheckpointError` if it is not a
    checkpoint of this package, is damaged (every member's CRC-32 is checked first: ``torch.load``
    would read changed bytes without a word) or holds objects other than plain values (the message
    names them and says how to convert a trusted file). ``resume``: it must also hold what
    resuming needs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not _is_zip(path):
        raise CheckpointError(
            f"{path} is not a checkpoint written by lrml train, or is damaged (not a whole "
            "torch.save zip archive)"
        )
    damaged = _bad_crc(path)  # torch.load does not check the archive's CRC-32s
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged ({damaged})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path)
        if not names:  # (none named: a damaged pickle)
            why = _first_line(exc)
            raise CheckpointError(f"{path} is not a readable checkpoint ({why})") from None
        raise CheckpointError(
            f"refusing to load {path}: besides tensors and plain values it holds "
            f"{', '.join(names)}, and loading that could run code. A checkpoint you trust (one "
            "written by an earlier version of lrml_kernels, say) can be converted once with "
            "`lrml convert-checkpoint OLD NEW`, which loads it in full: only for files you trust"
        ) from None
    except Exception as exc:  # whatever unpickling a damaged or foreign file raises
        why = _first_line(exc)
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({why})") from None
    check(ckpt, path, resume=resume)
    return ckpt


def check(ckpt, path, *, resume: bool = False) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` has the keys and types a checkpoint has."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint written by lrml train (it holds a "
            f"{type(ckpt).__name__}, not a dict)"
        )
    need = {**REQUIRED, **(REQUIRED_TO_RESUME if resume else {})}
    missing = [k for k in need if k not in ckpt]
    if missing:
        what = "a checkpoint written by lrml train" if not resume else "a checkpoint to resume from"
        raise CheckpointError(
            f"{path} is not {what}: it lacks {', '.join(map(repr, missing))} "
            f"(written by lrml_kernels {ckpt.get('version', '?')})"
        )
    for k, t in need.items():
        v = ckpt[k]
        allowed = (int, float) if t is float else t  # a float may have been stored as an int
        if isinstance(v, bool) or not isinstance(v, allowed):
            name = " or a ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))
            raise CheckpointError(f"{path}: {k!r} should be a {name}, not a {type(v).__name__}")
    bad = [k for k, v in ckpt["model"].items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: the model's {', '.join(map(repr, bad))} are not tensors")


def convert(old, new) -> list[str]:
    """Rewrite the checkpoint ``old`` as plain values at ``new``; return the globals it held.

    This unpickles ``old`` in full when it holds more than plain values, which runs whatever code
    the file names: use it only on files you trust. ``new`` may be ``old``.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(f"no checkpoint at {old}")
    damaged = _bad_crc(old) if _is_zip(old) else None  # (else: a bare pickle)
    if damaged is not None:  # converted, it would get CRC-32s that hide the damage
        raise CheckpointError(f"{old} is damaged ({damaged})")
    names = _unsafe_globals(old) or []
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=not names)
    except Exception as exc:  # whatever unpickling a foreign file raises
        why = f"{type(exc).__name__}: {_first_line(exc)}"
        raise CheckpointError(f"cannot read {old}: {why}") from None
    try:
        plain = to_plain(ckpt)
    except TypeError as exc:
        raise CheckpointError(f"cannot convert {old}: {exc}") from None
    check(plain, old)
    buf = io.BytesIO()
    torch.save(plain, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # reads back without any global
    atomic_write(new, lambda f: f.write(buf.getvalue()))
    return names


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # (a damaged end-of-archive record raises instead of False)
        return False


def _bad_crc(path: Path) -> str | None:
    """Why the archive at ``path`` is damaged: a member whose bytes do not match the CRC-32
    stored for it (one stored as 0, as ``torch.serialization.set_crc32_options(False)`` writes,
    is not checked), a member flagged as a directory, or a member that cannot be read; None if
    every member checks out."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or info.external_attr & 0x10:  # (MS-DOS "directory" bit)
                    # torch.save writes files only; torch's reader takes a member flagged as a
                    # directory for one and loads uninitialised memory for its tensor
                    return f"member {info.filename} is flagged as a directory"
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:  # raises at the end on a CRC mismatch
                    while member.read(1 << 24):
                        pass
    except Exception as exc:  # zipfile.BadZipFile, a damaged header, ...
        return _first_line(exc)
    return None


def _unsafe_globals(path: Path) -> list[str] | None:
    """The globals the pickle in ``path`` names that weights-only loading refuses (read, not
    imported), or None if the file cannot be parsed as a ``torch.save`` archive."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a damaged or foreign file
        return None


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (for the CLI's one error line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
