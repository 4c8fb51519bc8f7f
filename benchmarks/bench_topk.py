"""lrml_topk over the full catalogue: top-10 per user with ~50 excluded items per user.

CPU: 2,048 users (Netflix size) against every item. GPU: every user (480,189 at Netflix size).
``eager`` is what public reimplementations do: chunks of 64 users scored through a [64, I, d]
tensor, then ``torch.topk`` (:func:`benchlib.naive_topk`); ``compile`` compiles its chunk scorer;
``torch`` is the reference's exact [B, I, N] rewrite. On the GPU the three baselines rank the
first 32,768 users and their time is scaled to all users (recorded as ``extrapolated``); the
fused backends always rank every user. Peak extra memory: on the CPU a fresh process per provider
(:func:`benchlib.peak_extra_rss_mb`), on the GPU ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import benchlib as bl
import pytest
import torch

PROVIDERS = ("eager", "compile", "torch", "cpu", "triton", "cuda")
BASELINES = ("eager", "compile", "torch")


def _agree(ids, dist, ref_ids, ref_dist, dtype, provider):
    """Top-k lists agree with the fp32 baseline up to near-ties (low precision: loosely; the
    check is there to catch a provider that computes something else, not to grade rounding)."""
    bl.assert_close(dist, ref_dist, dtype, f"{provider} top-k distances")
    overlap = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean().item()
    need = 0.95 if dtype in (torch.float32, torch.float64) else 0.5
    assert overlap > need, f"{provider} top-k ids overlap the fp32 ones by only {overlap:.1%}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_topk(benchmark, case, provider):
    bl.require(provider, case.device)
    P, Q, K, M = (t.detach() for t in bl.tables(case))
    n_users = case.topk_users
    timed = n_users
    if case.device == "cuda" and provider in BASELINES:
        timed = min(n_users, bl.SETTINGS["gpu_baseline_topk_users"])
    users, exclude = bl.topk_inputs(case, timed)
    run = bl.topk_callable(case, provider, P, Q, K, M, users, exclude)

    # Correctness on the first chunk of users against the baseline computed in fp32.
    w = min(bl.NAIVE_TOPK_CHUNK, timed)
    head = (exclude[0][: w + 1], exclude[1][: int(exclude[0][w])])
    ref_d, ref_i = bl.naive_topk(*(t.float() for t in (P, Q, K, M)), users[:w], bl.TOPK_K, head)
    got_d, got_i = bl.topk_callable(case, provider, P, Q, K, M, users[:w], head)()
    _agree(got_i, got_d, ref_i, ref_d, case.dtype, provider)

    extra = {"k": bl.TOPK_K, "users": n_users, "excluded_per_user": exclude[1].numel() // timed}
    if case.device == "cpu" and not bl.SETTINGS["disabled"]:
        extra["peak_extra_mb"] = round(bl.peak_extra_rss_mb(provider, case.size.name,
                                                            case.dtype_name), 1)  # fmt: skip
        extra["memory_method"] = "fresh process, VmHWM - VmRSS (see benchlib.peak_extra_rss_mb)"
    with torch.no_grad():
        bl.measure(
            benchmark, case, provider, run, workload="topk", variant=f"k={bl.TOPK_K}",
            pairs=n_users * case.size.I, scale=n_users / timed, extra=extra,
        )  # fmt: skip
