"""The C++ extension's data ops, where the extension loads: each caller keeps its numpy code as
the fallback, and the two give the same results bit for bit (tests compare them)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["data_op", "tensor"]


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
