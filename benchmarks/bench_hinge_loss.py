"""lrml_hinge_loss: forward, and forward + backward with sparse embedding gradients.

Both relation modes. The forward + backward also runs at the epoch's batch (size
``netflix-epoch``: B = 2^20 rows x 2 on the Netflix tables). The forward runs under
``torch.no_grad()``. The forward + backward asks for
sparse COO gradients of the embedding tables (``sparse_grad=True``, nn.Embedding(sparse=True) in
the eager reference): a dense [U, d] gradient of a Netflix-size table would dominate otherwise.
``compile`` compiles the reference's row math and keeps the sparse gather eager (inductor cannot
produce sparse gradients).
"""

from __future__ import annotations

import functools

import benchlib as bl
import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import reference

PROVIDERS = ("eager", "compile", "cpu", "triton", "cuda")
RELATIONS = ("pair", "shared")


def _loss_fn(provider: str, relation: str, sparse: bool):
    if provider == "eager":
        return functools.partial(reference.lrml_hinge_loss, relation=relation, sparse_grad=sparse)
    if provider == "compile":
        if not sparse:
            return functools.partial(bl.compiled(reference.lrml_hinge_loss), relation=relation)
        rows = bl.compiled(bl.rows_hinge)

        def compiled_sparse(P, Q, K, M, users, items):
            p, q = reference.gather_rows(P, Q, users, items, sparse_grad=True)
            return rows(p, q, K, M, relation)

        return compiled_sparse
    return functools.partial(
        lk.lrml_hinge_loss, relation=relation, backend=provider, sparse_grad=sparse,
        validate=False,
    )  # fmt: skip


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hinge_forward(benchmark, case, provider, relation):
    bl.require(provider, case.device)
    P, Q, K, M = bl.tables(case)
    users, items = bl.batch(case)
    f = _loss_fn(provider, relation, sparse=False)

    def run():
        with torch.no_grad():
            return f(P, Q, K, M, users, items)

    with torch.no_grad():
        expected = reference.lrml_hinge_loss(P, Q, K, M, users, items, relation=relation)
    bl.assert_close(run(), expected, case.dtype, f"{provider} hinge loss")
    B, C = items.shape
    bl.measure(
        benchmark, case, provider, run, workload="hinge fwd", variant=relation, pairs=B * C,
        bytes_moved=bl.gathered_row_bytes(case, B, C) + bl.index_bytes(B, C),
    )  # fmt: skip


# tf32 at the epoch batch: IEEE fp32 dots make the triton kernels FMA-bound there (the roofline
# of lrml_kernels/triton/distance_kernels.py), TF32 dots take the tensor cores.
@pytest.mark.lrml(epoch_batch=True, tf32_sizes=("netflix-epoch", "tiny-epoch"))
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hinge_forward_backward(benchmark, case, provider, relation):
    bl.require(provider, case.device)
    params = bl.tables(case)
    users, items = bl.batch(case)
    f = _loss_fn(provider, relation, sparse=True)

    def run():
        bl.clear_grads(params)  # sparse gradients would otherwise pile up round after round
        loss = f(*params, users, items)
        loss.backward()
        return loss

    with torch.no_grad():  # (its graph would stay alive through the timed runs: GBs at 2^20)
        expected = reference.lrml_hinge_loss(*params, users, items, relation=relation)
    bl.assert_close(run(), expected, case.dtype, f"{provider} hinge loss", case.tf32)
    assert params[0].grad is not None and params[2].grad is not None, "no gradients"
    B, C = items.shape
    # The HBM roofline of the targets: gathered rows read once + their gradients written once.
    bl.measure(
        benchmark, case, provider, run, workload="hinge fwd+bwd", variant=relation,
        pairs=B * C, bytes_moved=2 * bl.gathered_row_bytes(case, B, C),
        extra={"grads": "sparse"},
    )  # fmt: skip
    bl.clear_grads(params)
