"""Static GPU facts of the top-k screening kernel, no GPU needed (issue 16).

The screen is compiled for sm_90 exactly as the launcher launches it at the production
configuration (Netflix: d = 100, N = 20, k = 10; :func:`topk_kernels.screen_config`), with and
without the exclusion bitmask, by ``benchmarks/kernel_report.py`` (Triton's own specialisation of
the arguments, in a fresh process without ``TRITON_INTERPRET``). Checked: ptxas reports zero spill
stores, and the SASS holds tensor-core instructions (HGMMA, or HMMA). Run this file as a script to
print the report: ``python tests/test_triton_topk_static.py l2 float32``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _bench import load_benchmark

REPO = Path(__file__).resolve().parents[1]
CASES = [("l2", "float32"), ("l2", "bfloat16"), ("l1", "float32")]


def static_report(distance: str, dtype_name: str, N: int = 20, d: int = 100) -> list[dict]:
    """One row per launch of the screening kernel: registers, spills, shared memory, MMAs."""
    kr = load_benchmark("kernel_report")
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[dtype_name]
    rows = []
    for launch in kr.plan(kr.Case("topk", kr.NETFLIX_U, 0, d, N, dtype, "pair", distance)):
        if launch["job"]["name"] != "_screen_kernel":
            continue
        usage = kr.compile_one(launch["job"])
        rows.append(
            {
                "HAS_EXCL": bool(launch["constexprs"].get("HAS_EXCL")),
                "num_warps": usage["num_warps"],
                "registers": usage["registers"],
                "spill_stores": usage["spill_stores"],
                "shared_bytes": usage["shared_dynamic"],
                "tensor_cores": usage["tensor_cores"],
            }
        )
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(("distance", "dtype"), CASES)
def test_screen_kernel_static_sm90(distance, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, __file__, distance, dtype], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(r["HAS_EXCL"] for r in rows) == [False, True], rows
    for r in rows:
        assert r["spill_stores"] == 0, r
        assert r["registers"] is not None and r["registers"] <= 255, r
        assert {"HGMMA", "HMMA"} & set(r["tensor_cores"]), r


if __name__ == "__main__":
    print(json.dumps(static_report(sys.argv[1], sys.argv[2])))
