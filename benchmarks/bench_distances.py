"""lrml_distances forward: D [B, C] of every (user, item) pair of a batch, no autograd."""

from __future__ import annotations

import benchlib as bl
import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import reference

PROVIDERS = ("eager", "compile", "cpu", "triton", "cuda")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_distances_forward(benchmark, case, provider):
    bl.require(provider, case.device)
    P, Q, K, M = bl.tables(case)
    users, items = bl.batch(case)
    if provider == "eager":
        f = reference.lrml_distances
    elif provider == "compile":
        f = bl.compiled(reference.lrml_distances)
    else:

        def f(*args):
            return lk.lrml_distances(*args, backend=provider, validate=False)

    def run():
        with torch.no_grad():
            return f(P, Q, K, M, users, items)

    with torch.no_grad():
        expected = reference.lrml_distances(P, Q, K, M, users, items)
    bl.assert_close(run(), expected, case.dtype, f"{provider} distances")
    B, C = items.shape
    moved = bl.gathered_row_bytes(case, B, C) + bl.index_bytes(B, C) + B * C * P.element_size()
    bl.measure(
        benchmark, case, provider, run, workload="distances fwd", variant="pair", pairs=B * C,
        bytes_moved=moved,
    )  # fmt: skip
