"""Static GPU facts of the top-k screening kernel, no GPU needed (issue 16).

The screen is compiled for sm_90 at the launcher's production configuration (Netflix: d = 100,
N = 20, k = 10; :func:`topk_kernels.screen_config`) in a fresh process without
``TRITON_INTERPRET``. Checked: ``ptxas -v`` reports zero spill stores, and the SASS
(``cuobjdump --dump-sass``) holds tensor-core instructions (HGMMA, or HMMA). Run this file as a
script to print the report: ``python tests/test_triton_topk_static.py l2 float32``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CASES = [("l2", "float32"), ("l2", "bfloat16"), ("l1", "float32")]


def static_report(distance: str, dtype_name: str, N: int = 20, d: int = 100, k: int = 10) -> dict:
    """Compile the screening kernel for sm_90; registers, spills, shared memory, MMA counts."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lrml_kernels.triton import topk_kernels as TK

    dtype = getattr(torch, dtype_name)
    cfg = TK.screen_config(N, d, k, distance, dtype, torch.device("cuda"))
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    ptr = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float64": "*fp64"}
    fn = TK._screen_kernel
    consts = dict(cfg, DISTANCE=TK.DISTANCE_CODES[distance], HAS_EXCL=True, IS_FP64=False)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("P", "Q", "K", "M"):
            sig[name] = ptr[dtype_name]
        elif name == "QS":
            sig[name] = "*bf16" if cfg["CAST_BF16"] else "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in ("users", "KEYS", "DROP"):
            sig[name] = "*i64"
        elif name == "EXCL":
            sig[name] = "*u8"
        elif name in ("B", "U", "I", "N", "d"):
            sig[name] = "i32"
        elif name[0].isupper():
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32"
    kernel = triton.compile(
        ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options
    )
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        info = ""
        for ptxas in ("ptxas", "ptxas-blackwell"):  # the one that knows this PTX version
            run = subprocess.run(
                [str(bin_dir / ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", str(Path(tmp) / "o")],
                capture_output=True,
                text=True,
            )
            if run.returncode == 0:
                info = run.stderr
                break
        sass = subprocess.run(
            [str(bin_dir / "cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True
        ).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return {
        "config": {**cfg, **options},
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "shared_bytes": kernel.metadata.shared,
        "HGMMA": len(re.findall(r"\bHGMMA\.", sass)),
        "HMMA": len(re.findall(r"\bHMMA\.", sass)),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("distance", "dtype"), CASES)
def test_screen_kernel_static_sm90(distance, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, __file__, distance, dtype], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["spill_stores"] == 0, report
    assert report["registers"] is not None and report["registers"] <= 255, report
    assert report["HGMMA"] + report["HMMA"] > 0, report


if __name__ == "__main__":
    print(json.dumps(static_report(sys.argv[1], sys.argv[2])))
