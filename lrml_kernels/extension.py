"""The C++/CPU and CUDA extension backends (csrc/): built once with ninja, loaded once per process."""

from __future__ import annotations

from lrml_kernels.backends import BackendUnavailable


def backend(name: str):
    """The extension backend ``name`` ("cpu" or "cuda"), or raise :class:`BackendUnavailable`."""
    raise BackendUnavailable(f"{name} backend: the C++ extension is not part of this build yet")
