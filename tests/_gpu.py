"""The first line of every GPU test that names a backend."""

from __future__ import annotations

import pytest
import torch

from lrml_kernels import backends


def require_gpu_backend(backend: str) -> None:
    """Skip without a CUDA GPU; on one, fail where ``backend`` cannot run on it: a GPU test that
    skipped there would let a broken build (the CUDA extension, Triton) pass the GPU check."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = backends.why_unavailable(backend, "cuda")
    if why is not None:
        pytest.fail(f"the {backend} backend is unavailable on this GPU: {why}")
