"""benchmarks/kernel_report.py: the static GPU report (sm_90 resource usage without a GPU).

The parsers and the occupancy arithmetic run on known tool output; the ``ci`` subset and the CUDA
kernels are compiled for real, and none of them may spill (issue 15's gate; ``.ci/run`` then
prints the same report, from the caches, with ``--fail-on-spills``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from _bench import load_benchmark

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


kr = load_benchmark("kernel_report")

PTXAS_13 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_lrml_forward_kernel' for 'sm_90a'
ptxas info    : Function properties for _lrml_forward_kernel
    5496 bytes stack frame, 11684 bytes spill stores, 22284 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 5496 bytes cumulative stack size, \
400 bytes cmem[0]
"""
# nvcc -Xptxas -v (CUDA 11/12 style): a device function's properties come before the kernel's,
# and smem is on the registers line.
PTXAS_NVCC = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z7kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z7kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, 384 bytes cmem[0], 4096 bytes smem
ptxas info    : Compiling entry function '_Z8kernel2Pf' for 'sm_90'
ptxas info    : Function properties for _Z8kernel2Pf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 8 bytes cumulative stack size
"""


def test_parse_ptxas_reads_registers_stack_and_spills():
    u = kr.parse_ptxas(PTXAS_13)["_lrml_forward_kernel"]
    assert u == {
        "registers": 32,
        "stack": 5496,
        "spill_stores": 11684,
        "spill_loads": 22284,
        "smem": 0,
        "barriers": 1,
    }


def test_parse_ptxas_keeps_entry_functions_only_and_reads_smem():
    out = kr.parse_ptxas(PTXAS_NVCC)
    assert set(out) == {"_Z7kernelPf", "_Z8kernel2Pf"}
    assert out["_Z7kernelPf"]["registers"] == 56
    assert out["_Z7kernelPf"]["smem"] == 4096
    assert out["_Z8kernel2Pf"]["spill_stores"] == 4
    assert out["_Z8kernel2Pf"]["spill_loads"] == 12
    assert out["_Z8kernel2Pf"]["stack"] == 8


def test_mma_replication_reads_the_ttgir_layouts():
    # (lines as Triton 3.9 prints them) 8 warps along M of a 16-row tile: each computes it;
    # [2, 4] on 32 x 32 (2 m16 x 4 n8 tiles) and a warpgroup pair on 64 x 32: each its own;
    # [4, 1] on 32 rows: two warps a tile. The worst dot of the kernel counts.
    head = (
        "#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [8, 1], "
        "instrShape = [16, 8]}>\n"
        "#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 4], "
        "instrShape = [16, 8]}>\n"
        "#mma2 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], "
        "instrShape = [16, 16, 8]}>\n"
        "#mma3 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], "
        "instrShape = [16, 8]}>\n"
    )

    def dot(shape, layout, op="tt.dot"):
        return (
            f"    %9 = {op} %1, %2, %3, inputPrecision = tf32 : tensor<{shape[0]}x32xf32> * "
            f"tensor<32x{shape[1]}xf32> -> tensor<{shape[0]}x{shape[1]}xf32, {layout}> loc(#loc)\n"
        )

    assert kr.mma_replication(head + dot((32, 32), "#mma1")) == 1
    assert kr.mma_replication(head + dot((64, 32), "#mma2", "ttng.warp_group_dot")) == 1
    assert kr.mma_replication(head + dot((32, 32), "#mma3")) == 2
    assert kr.mma_replication(head + dot((32, 32), "#mma1") + dot((16, 16), "#mma")) == 8
    assert kr.mma_replication("") == 1  # no MMA dot (IEEE dots are FMA loops)


def test_parse_resource_usage_and_sass():
    ru = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _lrml_topk_kernel:
  REG:189 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert kr.parse_resource_usage(ru)["_lrml_topk_kernel"] == {
        "registers": 189,
        "stack": 0,
        "shared": 0,
        "local": 0,
    }
    sass = """
        Function : screen
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        Function : plain
        /*0000*/                   FFMA R1, R2, R3, R4 ;
"""
    assert kr.sass_tensor_cores(sass) == {"screen": ["HGMMA", "HMMA"], "plain": []}
    sass = """
        Function : fma
        /*0000*/                   LDS.128 R4, [R2] ;
        /*0010*/                   LDS R8, [R2+0x10] ;
        /*0020*/              @!P0 LDS.U.64 R10, [R3] ;
        /*0030*/                   FFMA R1, R4, R8, R1 ;
        /*0040*/                   FFMA.FTZ R1, R5, R9, R1 ;
        /*0050*/                   LDSM.16.M88.4 R12, [R3] ;
        Function : none
        /*0000*/                   FADD R1, R2, R3 ;
"""
    # 4 + 1 + 2 values loaded (LDSM is a tensor-core fragment load, not counted), 2 FFMA
    assert kr.sass_fma_and_shared_loads(sass) == {"fma": (2, 7), "none": (0, 0)}


def test_occupancy_arithmetic_of_an_sm90_sm():
    # 32 regs × 256 threads: registers allow 8 blocks, the 64-warp limit too.
    assert kr.resident_blocks(32, 256, 0) == (8, "regs")
    # 255 regs -> 8,192 per warp (units of 256): 8 warps per SM, one 8-warp block.
    assert kr.resident_blocks(255, 256, 0) == (1, "regs")
    # 80.5 KB of shared memory (+1 KB reserved) in 228 KB: 2 blocks.
    assert kr.resident_blocks(32, 256, 82_432) == (2, "smem")
    assert kr.resident_blocks(16, 32, 0) == (32, "blocks")
    assert kr.resident_blocks(32, 256, 300 * 1024)[0] == 0  # does not fit at all


def test_full_matrix_covers_the_benchmark_sizes():
    cs = kr.cases("full")
    sorts = [c for c in cs if c.op == "sort"]
    draws = {(c.B, c.C, c.dtype) for c in cs if c.op == "negatives"}  # dtype: the draw
    assert draws == {(B, C, dr) for B, C in kr.BATCHES for dr in ("uniform", "popularity")}
    cs = [c for c in cs if c.op not in ("sort", "negatives")]
    batch = [c for c in cs if c.op not in ("topk", "relations")]
    assert {(c.B, c.C) for c in batch} == {(4096, 5), (1 << 20, 2)}
    assert {c.d for c in cs} == {64, 100, 128} and {c.N for c in cs} == {10, 20}
    assert {c.dtype for c in cs} == {"fp32", "bf16", "tf32"}
    tf32 = {(c.op, c.B, c.d, c.N, c.relation) for c in cs if c.dtype == "tf32"}
    assert {op for op, *_ in tf32} == {"hinge", "train"} and len(tf32) == 2 * 2 * 3 * 2 * 2
    assert {c.relation for c in batch} == {"pair", "shared"}
    ops = {"distances", "hinge", "train", "rowupdate", "topk", "relations"}
    assert {c.op for c in cs} == ops
    assert {(c.B, c.C) for c in cs if c.op == "relations"} == {(4096, 1), (1 << 20, 1)}
    assert {c.distance for c in cs} == {"l2", "squared_l2", "l1"}
    assert all(c.B == 480_189 for c in cs if c.op == "topk")
    # the row update's sort: every shape it compiles, int32 and int64 keys, up to SORT_MAX
    from lrml_kernels.triton.row_update import SORT_CHUNK, SORT_MAX

    for bits in (32, 64):
        sizes = {c.B for c in sorts if c.dtype == f"int{bits}"}
        assert {2, SORT_CHUNK[bits], 2 * SORT_CHUNK[bits], SORT_MAX[bits]} <= sizes
        assert max(sizes) == SORT_MAX[bits]
    assert sorts == [c for c in kr.cases("headline") if c.op == "sort"]
    ci = kr.cases("ci")
    assert kr.cases("smoke")[0] == ci[0]  # the unit test warms CI's cache
    tables = [c for c in ci if c.op not in ("sort", "negatives")]  # their dtype: keys, draw
    assert {c.relation for c in ci} == {"pair", "shared"}
    assert {c.dtype for c in tables} == {"fp32", "bf16", "tf32"}
    assert {c.dtype for c in ci if c.op == "sort"} == {"int32", "int64"}
    assert any(c.op == "topk" for c in ci)
    assert {c.dtype for c in ci if c.op == "negatives"} == {"uniform", "popularity"}
    assert {c.dtype for c in ci if c.op == "relations"} == {"fp32", "bf16"}


def test_fail_on_spills_and_outputs(tmp_path, monkeypatch, capsys):
    row = {
        "source": "triton", "op": "hinge", "B": 4096, "C": 5, "d": 100, "N": 20,
        "dtype": "fp32", "relation": "pair", "distance": "l2", "kernel": "_lrml_forward_kernel",
        "blocks": "B=64", "flags": "HINGE", "num_warps": 8, "num_stages": 3, "registers": 32,
        "ptxas_registers": 32, "stack": 5496, "spill_stores": 11684, "spill_loads": 22284,
        "smem_static": 0, "shared_dynamic": 82432, "grid": [64], "programs": 64,
        "tensor_cores": [],
    }  # fmt: skip
    rows = [kr._finish(dict(row))]
    monkeypatch.setattr(kr, "collect", lambda *a, **k: rows)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--subset", "smoke", "--json", str(js), "--markdown", str(md), "--fail-on-spills"]
    assert kr.main(argv) == 1
    assert "spills in triton:_lrml_forward_kernel" in capsys.readouterr().err
    assert json.loads(js.read_text())["rows"][0]["blocks_per_sm"] == 2
    assert "**11,684 / 22,284**" in md.read_text()
    assert "| _lrml_forward_kernel | 1 | 1 | 32-32 | 5,496 | 11,684 | 2 | no |" in md.read_text()
    rows[0] = kr._finish({**row, "spill_stores": 0, "spill_loads": 0, "stack": 0})
    assert kr.main(argv) == 0


@pytest.fixture(scope="module")
def ci_rows():
    """The ``ci`` subset compiled once (its Triton kernels, and the CUDA ones where nvcc is):
    cached by Triton and the report, so ``.ci/run``'s report line that follows only records.
    Under the interpreter (conftest sets TRITON_INTERPRET), collect() compiles in a child."""
    pytest.importorskip("triton")
    try:
        kr.triton_ptxas()
        kr.triton_bin("cuobjdump")
    except FileNotFoundError:
        pytest.skip("no ptxas/cuobjdump in the triton wheel")
    return kr.collect("ci", jobs=2, cuda=NVCC is not None)


def test_ci_triton_cases_compile_for_sm90_without_a_gpu(ci_rows):
    rows = [r for r in ci_rows if r["source"] == "triton"]
    assert {(r["op"], r["relation"], r["dtype"]) for r in rows} == {
        (c.op, c.relation, c.dtype) for c in kr.cases("ci")
    }
    for r in rows:
        assert r["arch"].startswith("sm_90")
        assert 0 < r["registers"] <= 255
        assert r["ptxas_registers"] == r["registers"], "ptxas rerun disagrees with the cubin"
        assert r["num_warps"] >= 1 and r["programs"] >= 1
        assert r["stack"] >= 0 and r["spill_stores"] >= 0 and r["spill_loads"] >= 0
        assert r["shared"] >= r["shared_dynamic"] >= 0
        assert 0 <= r["blocks_per_sm"] <= 32
        assert r["blocks"] and "BLOCK" not in r["blocks"]
        if r["op"] == "relations":
            assert (r["B"], r["C"], r["d"], r["N"]) == (4096, 1, 100, 20)
        elif r["op"] == "sort":
            assert r["kernel"] == "_sort_ids_kernel" and r["programs"] == 1
        elif r["op"] != "topk":
            assert (r["B"], r["C"]) in ((4096, 5), (1 << 20, 2)), r
            assert r["d"] in (64, 100) and r["N"] in (10, 20), r


def test_ci_subset_has_no_spills(ci_rows):
    """Issue 15's gate: no spill stores or loads in any Triton or CUDA kernel of the ``ci`` subset
    (the forward and backward kernels, both relations, fp32 and bf16, the Adam row updates and
    their one-program sort, the
    top-k screen and re-score, lrml_relations, the negative sampler; every ``csrc/cuda``
    kernel)."""
    kernels = {r["kernel"] for r in ci_rows}
    want = {"_screen_kernel", "_lrml_pair_forward_kernel", "_lrml_backward_kernel"}
    want |= {"_lrml_relations_kernel", "_sample_negatives_kernel"}
    assert want | {"_row_update_kernel", "_sort_ids_kernel"} <= kernels
    # the row updates' sorts (4,096 users in one chunk, 20,480 items in 3) and the sort's
    # largest one-chunk and several-chunk shapes of either key width
    sorts = {
        (r["dtype"], r["constexprs"]["CHUNKS"])
        for r in ci_rows
        if r["kernel"] == "_sort_ids_kernel"
    }
    assert {("fp32", 1), ("fp32", 3), ("int32", 1), ("int64", 1), ("int64", 4)} <= sorts
    assert NVCC is None or any(r["source"] == "cuda" for r in ci_rows)
    spilling = [
        f"{r['source']}:{r['kernel']} {r.get('op')} {r.get('dtype', '')} {r.get('relation', '')}: "
        f"{r['spill_stores']} / {r['spill_loads']} B"
        for r in ci_rows
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilling, spilling


def test_ci_training_kernels_give_every_sm_a_program(ci_rows):
    """Issue 15: at B = 4096 × 5 every Triton launch of the hinge fwd+bwd (forward, hinge,
    backward) gives each of the 132 SMs at least one program."""
    rows = [r for r in ci_rows if r["source"] == "triton" and r["op"] == "hinge"]
    kernels = {r["kernel"] for r in rows}
    assert {"_lrml_pair_forward_kernel", "_hinge_kernel", "_lrml_backward_kernel"} <= kernels
    idle = [f"{r['kernel']} {r['relation']} {r['dtype']}: {r['programs']}" for r in rows]
    assert all(r["sms_busy"] == kr.SMS for r in rows), idle


def test_ci_bf16_training_kernels_dot_on_tensor_cores(ci_rows):
    """bf16 parameters' dots are tf32 (SPEC.md, "Precision"): the bf16 forward, backward and
    relations kernels hold tensor-core instructions in their SASS; the fp32 ones at matmul
    precision "highest" hold none (IEEE dots run on the FMA units). (Top-k's exact re-score
    is IEEE in every dtype.)"""
    kernels = {"_lrml_pair_forward_kernel", "_lrml_shared_forward_kernel"}
    kernels |= {"_lrml_backward_kernel", "_lrml_relations_kernel"}
    rows = [
        r
        for r in ci_rows
        if r["kernel"] in kernels and r["dtype"] in ("bf16", "fp32") and r["op"] != "topk"
    ]
    assert {r["kernel"] for r in rows if r["dtype"] == "bf16"} == kernels
    for r in rows:
        tc = {"HGMMA", "HMMA"} & set(r["tensor_cores"])
        assert bool(tc) == (r["dtype"] == "bf16"), (r["kernel"], r["dtype"], r["tensor_cores"])


def test_ci_wide_tensor_core_blocks_fill_the_sms(ci_rows):
    """Tensor-core dots at the epoch batch (bf16, B = 2^20 × 2) take 64-row blocks on 8 warps,
    with warpgroup MMA (HGMMA: M = 64 a warpgroup), and still keep every SM busy; at
    B = 4096 × 5 they keep 16-row blocks (64-row ones would leave SMs idle)."""
    kernels = {"_lrml_pair_forward_kernel", "_lrml_backward_kernel"}
    rows = [r for r in ci_rows if r["kernel"] in kernels and r["dtype"] == "bf16"]
    rows = [r for r in rows if r["op"] == "hinge" and r["relation"] == "pair"]
    assert {(r["kernel"], r["B"]) for r in rows} == {
        (k, B) for k in kernels for B in (4096, 1 << 20)
    }
    for r in rows:
        wide = r["B"] == 1 << 20
        assert r["constexprs"]["BLOCK_B"] == (64 if wide else 16), r
        assert r["num_warps"] == 8 or not wide, r
        assert ("HGMMA" in r["tensor_cores"]) == wide, r
        assert r["sms_busy"] == 132, r
        if wide and r["kernel"] == "_lrml_pair_forward_kernel":
            assert r["mma_replication"] == 1, r  # (8 warps on 64 rows: each its own tiles)


def test_ci_topk_screen_computes_each_mma_tile_once(ci_rows):
    """The screen's chained GEMMs put every warp along the 32 item rows of a tile, 16 rows a
    warp: on 2 warps each tile is computed once (on 4, twice)."""
    rows = [r for r in ci_rows if r["kernel"] == "_screen_kernel"]
    assert rows and all(r["tensor_cores"] for r in rows)
    for r in rows:
        assert r["num_warps"] == 2 and r["mma_replication"] == 1, r


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cuda_kernel_gets_a_row():
    try:
        kr.triton_bin("cuobjdump")
    except FileNotFoundError:
        pytest.skip("no cuobjdump")
    rows = kr.cuda_rows(NVCC)
    src = "\n".join(p.read_text() for p in (REPO / "csrc" / "cuda").glob("*.cu"))
    kernels = set(re.findall(r"__global__\s+void\s+(\w+)", src))
    assert kernels and kernels <= {r["kernel"].split("<")[0] for r in rows}
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["blocks_per_sm"] >= 1
