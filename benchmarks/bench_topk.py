"""lrml_topk over the full catalogue: top-10 per user with ~50 excluded items per user.

CPU: 2,048 users (Netflix size) against every item. GPU: every user (480,189 at Netflix size).
``eager`` is what public reimplementations do: chunks of 64 users scored through a [64, I, d]
tensor, then ``torch.topk`` (:func:`benchlib.naive_topk`); ``compile`` compiles its chunk scorer;
``torch`` is the reference's exact [B, I, N] rewrite. On the GPU the three baselines rank the
first 32,768 users and their time is scaled to all users (recorded as ``extrapolated``); the
fused backends rank every user. Under ``--lrml-cap`` every provider ranks only as many users as
one call of a quarter of the cap allows (sized by a probe on 4,096 users), scaled and marked the
same way. Peak extra memory: on the CPU a fresh process per provider
(:func:`benchlib.peak_extra_rss_mb`; not under ``--lrml-cap``), on the GPU
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import benchlib as bl
import pytest
import torch

PROVIDERS = ("eager", "compile", "torch", "cpu", "triton", "cuda")
BASELINES = ("eager", "compile", "torch")
PROBE_USERS = 4_096  # --lrml-cap: the users of the probe call that sizes the timed subset


def _agree(ids, dist, ref_ids, ref_dist, dtype, provider):
    """Top-k lists agree with the fp32 baseline up to near-ties (low precision: loosely; the
    check is there to catch a provider that computes something else, not to grade rounding)."""
    bl.assert_close(dist, ref_dist, dtype, f"{provider} top-k distances")
    overlap = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).float().mean().item()
    need = 0.95 if dtype in (torch.float32, torch.float64) else 0.5
    assert overlap > need, f"{provider} top-k ids overlap the fp32 ones by only {overlap:.1%}"


def _users_within_cap(case, provider, params, users: int) -> int:
    """How many of ``users`` one call ranks in a quarter of ``--lrml-cap`` (measure() makes three
    calls, the probe two small ones), from a warm-up and a timed call on ``PROBE_USERS``."""
    n = min(users, PROBE_USERS)
    probe = bl.topk_callable(case, provider, *params, *bl.topk_inputs(case, n))
    with torch.no_grad():
        probe()  # warm-up: compilation, autotuning
        t0 = bl.synchronized_clock(case.device)
        probe()
        took = bl.synchronized_clock(case.device) - t0
    fit = bl.capped_units(users, n, took, bl.SETTINGS["cap_s"] / 4)
    # whole chunks of the baselines' 64 users: a partial last chunk would compile anew
    return fit if fit == users else max(n, fit - fit % bl.NAIVE_TOPK_CHUNK)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_topk(benchmark, case, provider):
    bl.require(provider, case.device)
    P, Q, K, M = (t.detach() for t in bl.tables(case))
    n_users = case.topk_users
    timed = n_users
    if case.device == "cuda" and provider in BASELINES:
        timed = min(n_users, bl.SETTINGS["gpu_baseline_topk_users"])
    if bl.SETTINGS["cap_s"] and not bl.SETTINGS["disabled"]:
        timed = _users_within_cap(case, provider, (P, Q, K, M), timed)
    elif bl.SETTINGS["disabled"] and case.device == "cuda":
        # An untimed run (the GPU check's prewarm, beside the GPU tests) compiles what the timed
        # one will, which a few chunks of users do as well as all of them.
        timed = min(timed, 16 * bl.NAIVE_TOPK_CHUNK)
    users, exclude = bl.topk_inputs(case, timed)
    run = bl.topk_callable(case, provider, P, Q, K, M, users, exclude)

    # Correctness on the first chunk of users against the baseline computed in fp32.
    w = min(bl.NAIVE_TOPK_CHUNK, timed)
    head = (exclude[0][: w + 1], exclude[1][: int(exclude[0][w])])
    ref_d, ref_i = bl.naive_topk(*(t.float() for t in (P, Q, K, M)), users[:w], bl.TOPK_K, head)
    got_d, got_i = bl.topk_callable(case, provider, P, Q, K, M, users[:w], head)()
    _agree(got_i, got_d, ref_i, ref_d, case.dtype, provider)

    extra = {"k": bl.TOPK_K, "users": n_users, "excluded_per_user": exclude[1].numel() // timed}
    # The CPU's memory probe starts a process per provider: not in a run under --lrml-cap.
    if case.device == "cpu" and not bl.SETTINGS["disabled"] and not bl.SETTINGS["cap_s"]:
        extra["peak_extra_mb"] = round(bl.peak_extra_rss_mb(provider, case.size.name,
                                                            case.dtype_name), 1)  # fmt: skip
        extra["memory_method"] = "fresh process, VmHWM - VmRSS (see benchlib.peak_extra_rss_mb)"
    with torch.no_grad():
        bl.measure(
            benchmark, case, provider, run, workload="topk", variant=f"k={bl.TOPK_K}",
            pairs=n_users * case.size.I, scale=n_users / timed, extra=extra,
        )  # fmt: skip
