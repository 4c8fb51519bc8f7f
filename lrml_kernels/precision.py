"""torch's fp32 matmul precision, read so that it works whichever of torch's two APIs set it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch.set_float32_matmul_precision's values: "highest" IEEE fp32, "high" TF32 (tensor cores on
# CUDA: the triton kernels' fp32 dots and cuBLAS), "medium" bf16 where torch has such a path
# (oneDNN on the CPU; on CUDA, torch 2.11-2.14 has none and "medium" is TF32).
FP32_MATMUL_PRECISIONS = ("highest", "high", "medium")


def _first_api_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``, or None where it raises (the APIs were mixed)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def fp32_matmul_precision() -> str:
    """The precision torch would multiply fp32 matrices in: "highest" (IEEE), "high" (TF32) or
    "medium".

    torch 2.9+ has a second API, ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32").
    Setting it does not update ``torch.get_float32_matmul_precision()``, which then raises (a mix
    of the APIs) or returns a stale value; setting the first updates the second. So the second
    decides where it is set, the first says "high" or "medium" for "tf32".
    """
    new = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    new = getattr(new, "fp32_precision", "none")
    if new == "ieee":  # (also what the first API's "highest", the default, sets)
        return "highest"
    legacy = _first_api_precision()  # None: the APIs were mixed, only the second is meaningful
    if new == "tf32":
        return legacy if legacy in ("high", "medium") else "high"
    return legacy or "highest"


# The backends whose fp32 matmul precision torch.set_float32_matmul_precision sets (torch 2.9+).
_MATMUL_BACKENDS = ("cuda", "mkldnn")


@contextlib.contextmanager
def using_fp32_matmul_precision(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for the block, then torch's settings as
    they were (None: leave them as they are).

    Restored exactly, whichever API set them: the first API's value (where it can be read) and
    each backend's ``torch.backends.<cuda|mkldnn>.matmul.fp32_precision``, so that a oneDNN
    "bf16" or a CUDA "tf32" set through the second API alone survives the block.
    """
    if precision is None:
        yield
        return
    # Mixed APIs: the backends' values below are the state, and the first API's default under
    # them keeps it mixed (unreadable), as it was.
    legacy = _first_api_precision() or "highest"
    backends = {b: getattr(torch.backends, b).matmul.fp32_precision for b in _MATMUL_BACKENDS}
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for b, value in backends.items():
            getattr(torch.backends, b).matmul.fp32_precision = value
