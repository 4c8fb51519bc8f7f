"""torch's fp32 matmul precision, read so that it works whichever of torch's two APIs set it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch.set_float32_matmul_precision's values: "highest" IEEE fp32, "high" TF32 (tensor cores on
# CUDA: the triton kernels' fp32 dots and cuBLAS), "medium" bf16 where torch has such a path
# (oneDNN on the CPU; on CUDA, torch 2.11-2.14 has none and "medium" is TF32).
FP32_MATMUL_PRECISIONS = ("highest", "high", "medium")


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
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the APIs were mixed: only the second is meaningful
        legacy = None
    if new == "tf32":
        return legacy if legacy in ("high", "medium") else "high"
    return legacy or "highest"


@contextlib.contextmanager
def using_fp32_matmul_precision(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for the block, then the precision that
    was in force again (None: leave it as it is)."""
    if precision is None:
        yield
        return
    old = fp32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
