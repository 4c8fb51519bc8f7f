"""Static GPU report: registers, spills, shared memory and occupancy of every kernel, no GPU needed.

For every Triton kernel that the ``triton`` backend launches at the benchmark sizes, and for every
CUDA kernel in ``csrc/cuda/*.cu``, compile for sm_90 (H100/H200) on the CPU and read what the
compiler says about the machine code: registers per thread, stack frame, spill stores and loads,
shared memory, tensor-core instructions in the SASS, and from those the resident blocks per SM and
how many programs a launch gives each of the 132 SMs.

How the Triton launches are found (no block-size logic is duplicated here):

1. The backend's public functions (``lrml_kernels.triton``: ``distances``, ``hinge_loss`` and its
   registered backward, ``hinge_loss_grads``, ``topk``) run on fake CUDA tensors
   (``FakeTensorMode``: shapes, dtypes, strides and a ``cuda`` device, no memory, no GPU) with
   ``torch.cuda`` answering as an H200 would. ``JITFunction.run`` (and ``Autotuner.run``, one
   launch per config) is replaced by a recorder: each launch leaves its kernel, arguments, grid,
   constexprs and ``num_warps``/``num_stages``, and nothing runs. Custom ops run their Python
   implementation (and their registered backward, for the fwd+bwd workload) instead of their fake
   kernel.
2. Triton's own binder specialises the recorded arguments (pointer dtypes, 16-byte alignment,
   integers equal to 1 or divisible by 16) exactly as a real launch would; ``triton.compile(
   ASTSource(...), target=GPUTarget("cuda", 90, 32))`` builds PTX and a cubin.
3. The wheel's ``ptxas -v`` (``triton/backends/nvidia/bin``) is rerun on the PTX with Triton's
   flags for the stack frame and spills; ``cuobjdump --dump-resource-usage`` on Triton's own cubin
   gives the registers and stack of the binary that would run (both are shown when they differ);
   the compiled metadata gives the dynamic shared memory; ``cuobjdump --dump-sass`` says whether
   HGMMA/HMMA (tensor-core) instructions are present.

CUDA kernels: ``nvcc -arch=sm_90 -Xptxas -v`` on each ``.cu`` (as ``csrc/check_nvcc.sh`` compiles
them), one row per kernel instantiation. Their block size and dynamic shared memory are chosen at
run time from the device, so their occupancy column assumes 8 warps and static shared memory only.

Usage::

    python benchmarks/kernel_report.py                      # full matrix, table on stdout
    python benchmarks/kernel_report.py --subset ci          # the covering subset CI runs
    python benchmarks/kernel_report.py --json r.json --markdown r.md --fail-on-spills

Works with ``TRITON_INTERPRET`` set or not (with it set, the work runs in a child process without
it: interpreted kernels cannot be compiled) and with Triton 3.6-3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# The machine (one sm_90 SM of an H100/H200) and the sizes of the benchmarks

SMS = 132  # H200 (and H100 SXM)
SM_REGS = 65_536  # 32-bit registers per SM
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SM_SMEM = 228 * 1024  # shared memory per SM
BLOCK_SMEM_MAX = 227 * 1024  # the most one block may use (opt-in)
BLOCK_SMEM_RESERVED = 1024  # reserved by the system for every resident block
SM_MAX_BLOCKS = 32
SM_MAX_WARPS = 64
CUDA_ASSUMED_WARPS = 8  # the CUDA kernels pick warps at run time; 8 is configure()'s first choice

NETFLIX_U, NETFLIX_I = 480_189, 17_770
NETFLIX_NNZ = 100_480_507  # ratings: about the training CSR the negatives are checked against
BATCHES = ((4096, 5), (1 << 20, 2))  # (B, C): the train step batch and the epoch batch
DIMS = (64, 100, 128)
SLOTS = (10, 20)
DTYPES = ("fp32", "bf16")
# "tf32": fp32 tables under torch.set_float32_matmul_precision("high"), which lets the training
# kernels' dots use tf32 tensor cores (their own launch shapes: distance_kernels.block_config)
TF32 = "tf32"
RELATIONS = ("pair", "shared")
DISTANCES = ("l2", "squared_l2", "l1")
TOPK_K = 10
# Workloads of the backend: what one call of a benchmark launches.
OPS = {
    "distances": "distances fwd (D [B, C])",
    "hinge": "hinge fwd + autograd bwd (hinge fwd+bwd benchmark)",
    "train": "hinge_loss_grads: fwd + bwd in one call (fused train step)",
    "rowupdate": "the train step's fused Adam row updates: user table (B ids), items (B·C ids)",
    "sort": "the row update's one-program sort of B ids (dtype: the key width)",
    "topk": "all-user top-10 at Netflix size",
    "relations": "lrml_relations: attention and relation vectors of B pairs (C = 1)",
    "negatives": "the train step's negatives: B users × (C - 1), checked in a Netflix-size CSR "
    "(dtype: the draw, uniform or popularity-aware)",
}
NEGATIVE_DRAWS = ("uniform", "popularity")  # a negatives case's dtype: sample_negatives' draw
RELATIONS_BATCHES = (4096, 1 << 20)  # pairs per lrml_relations call
SUBSETS = ("full", "headline", "ci", "smoke")


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a backend function at one configuration."""

    op: str
    B: int
    C: int
    d: int
    N: int
    dtype: str
    relation: str
    distance: str

    def label(self) -> dict:
        return dataclasses.asdict(self)


def cases(subset: str = "full", all_distances: bool = False) -> list[Case]:
    """The configurations of the report.

    - ``full``: B 4096 × 5 and 2^20 × 2; d 64, 100, 128; N 10, 20; fp32 and bf16; both
      relations; the three workloads of a batch (distances fwd, hinge fwd+bwd, the train step's
      fwd+bwd); distance l2, plus squared_l2 and l1 at d = 100, N = 20 (the distance changes only
      the elementwise epilogue; ``all_distances`` takes every distance everywhere); the trainer's
      row updates (Adam, user and item tables) per batch shape, d and dtype; the row update's
      one-program id sort at every shape it compiles up to its ``SORT_MAX``, int32 and int64
      keys (:func:`sort_cases`, also in ``headline``). Top-k of all Netflix users for each d, N,
      dtype (and the same distances). ``lrml_relations`` of 4096 and 2^20 pairs for each d, N
      and dtype. The negatives of each batch shape, uniform and popularity-aware (the sampler
      reads no table: d, N do not apply; the dtype names the draw). The hinge and train
      workloads in ``tf32`` too (fp32 tables under ``torch.set_float32_matmul_precision
      ("high")``: tensor-core dots, other launch shapes), l2, every B, d, N and relation.
    - ``headline``: d = 100, N = 20, l2: every B, dtype, relation and workload, top-k,
      ``lrml_relations`` and the negatives.
    - ``ci``: a covering subset that compiles in a few minutes on 2 cores: hinge fwd+bwd (the
      forward and backward kernels) at B = 4096 × 5, d = 100, N = 20, l2, pair and shared in
      fp32, pair in bf16; the train step's fwd+bwd there in fp32 (its backward takes the
      forward's l2 distances), both relations; the Adam row updates at 4096 × 5 fp32 (their
      sorts: 4,096 ids in one chunk, 20,480 in 3 chunks, int32 keys); the sort's largest
      one-chunk launches of either key width and its largest several-chunk launch of int64 keys;
      top-k fp32; ``lrml_relations`` of 4096 pairs in fp32 and bf16; both negatives draws at
      4096 × 5; and the shapes whose launch options depend on d, N or the Triton release: the
      shared-relation hinge in bf16 at N = 10, top-k fp32 l2 at d = 128 and bf16 l1 at
      d = 100, the pair hinge in tf32 at d = 64, N = 10, and the pair hinge in bf16 at
      B = 2^20 × 2 (tensor-core dots at a batch that fills the SMs with 64-row blocks).
    - ``smoke``: the forward and backward kernels of the first ``ci`` case (the unit test).
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    batch_ops = ("distances", "hinge", "train")
    if subset == "smoke":  # the first case of "ci": CI compiles it once (Triton's cache)
        return [Case("hinge", 4096, 5, 100, 20, "fp32", "pair", "l2")]
    if subset == "ci":
        out = [
            Case("hinge", 4096, 5, 100, 20, dt, rel, "l2")
            for dt, rel in (("fp32", "pair"), ("fp32", "shared"), ("bf16", "pair"))
        ]
        out.append(Case("rowupdate", 4096, 5, 100, 20, "fp32", "pair", "l2"))
        # the train step's backward (the forward's l2 distances, no pass of its own for them)
        out += [Case("train", 4096, 5, 100, 20, "fp32", rel, "l2") for rel in RELATIONS]
        ru = importlib.import_module("lrml_kernels.triton.row_update")
        worst = [(ru.SORT_CHUNK[32], 32), (ru.SORT_CHUNK[64], 64), (ru.SORT_MAX[64], 64)]
        # (the row updates' sorts: 4,096 ids in one chunk, 20,480 in 3, int32 keys)
        out += [Case("sort", n, 0, 100, 20, f"int{bits}", "pair", "l2") for n, bits in worst]
        out += [Case("relations", 4096, 1, 100, 20, dt, "pair", "l2") for dt in DTYPES]
        out.append(Case("topk", NETFLIX_U, 0, 100, 20, "fp32", "pair", "l2"))
        # shapes whose launch options depend on d, N or the Triton release (each spilled once)
        out.append(Case("hinge", 4096, 5, 100, 10, "bf16", "shared", "l2"))
        out.append(Case("hinge", 4096, 5, 64, 10, TF32, "pair", "l2"))
        # tensor-core dots at the epoch batch: the wide launch (64-row blocks, 8 warps)
        out.append(Case("hinge", 1 << 20, 2, 100, 20, "bf16", "pair", "l2"))
        out.append(Case("topk", NETFLIX_U, 0, 128, 20, "fp32", "pair", "l2"))
        out.append(Case("topk", NETFLIX_U, 0, 100, 20, "bf16", "pair", "l1"))
        return out + [
            Case("negatives", 4096, 5, 100, 20, dr, "pair", "l2") for dr in NEGATIVE_DRAWS
        ]
    dims = DIMS if subset == "full" else (100,)
    slots = SLOTS if subset == "full" else (20,)
    out: list[Case] = []
    for d, N in itertools.product(dims, slots):
        dists = DISTANCES if all_distances or (d, N) == (100, 20) else ("l2",)
        if subset == "headline":
            dists = ("l2",)
        for (B, C), dt, rel, dist in itertools.product(BATCHES, DTYPES, RELATIONS, dists):
            out += [Case(op, B, C, d, N, dt, rel, dist) for op in batch_ops]
        if subset == "full":
            for (B, C), rel in itertools.product(BATCHES, RELATIONS):
                out += [Case(op, B, C, d, N, TF32, rel, "l2") for op in ("hinge", "train")]
        if N == slots[-1]:  # the trainer's row update: one per batch shape, d and dtype
            for (B, C), dt in itertools.product(BATCHES, DTYPES):
                out.append(Case("rowupdate", B, C, d, N, dt, "pair", "l2"))
        for dt, dist in itertools.product(DTYPES, dists):
            out.append(Case("topk", NETFLIX_U, 0, d, N, dt, "pair", dist))
        for B, dt in itertools.product(RELATIONS_BATCHES, DTYPES):
            out.append(Case("relations", B, 1, d, N, dt, "pair", "l2"))
    out += [
        Case("negatives", B, C, 100, 20, dr, "pair", "l2")
        for (B, C), dr in itertools.product(BATCHES, NEGATIVE_DRAWS)
    ]
    return out + sort_cases()


def sort_cases() -> list[Case]:
    """The row update's id sort at every compiled shape it launches with, int32 and int64 keys:
    one chunk of each power of two up to ``SORT_CHUNK``, then 2, 3, ... chunks up to
    ``SORT_MAX`` (the launches a ``rowupdate`` case does not reach)."""
    ru = importlib.import_module("lrml_kernels.triton.row_update")
    out = []
    for bits in (32, 64):
        chunk, most = ru.SORT_CHUNK[bits], ru.SORT_MAX[bits]
        sizes = [1 << p for p in range(1, chunk.bit_length())]
        sizes += range(2 * chunk, most + 1, chunk)
        out += [Case("sort", n, 0, 100, 20, f"int{bits}", "pair", "l2") for n in sizes]
    return out


# ----------------------------------------------------------------------------------------------
# Parsing the tools' output


def parse_ptxas(text: str) -> dict[str, dict]:
    """``ptxas -v`` output -> {kernel: {registers, stack, spill_stores, spill_loads, smem}}.

    Reads the lines ptxas prints per entry function::

        ptxas info    : Compiling entry function '_lrml_forward_kernel' for 'sm_90a'
        ptxas info    : Function properties for _lrml_forward_kernel
            5288 bytes stack frame, 12624 bytes spill stores, 23600 bytes spill loads
        ptxas info    : Used 32 registers, used 1 barriers, 5288 bytes cumulative stack size, ...

    (older ptxas: ``Used 32 registers, 384 bytes cmem[0], 8 bytes smem``). Only entry functions
    are kept; the properties of device functions that were not inlined are not.
    """
    out: dict[str, dict] = {}
    current = None
    props_for = None
    entries = set(re.findall(r"Compiling entry function '([^']+)'", text))
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            out.setdefault(current, _empty_usage())
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_for = m.group(1) if m.group(1) in entries else None
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m and props_for is not None:
            u = out.setdefault(props_for, _empty_usage())
            u["stack"], u["spill_stores"], u["spill_loads"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            u = out[current]
            u["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            u["smem"] = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            if b:
                u["barriers"] = int(b.group(1))
    return out


def _empty_usage() -> dict:
    return {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}


def _by_function(text: str, header: str):
    """``(function, line)`` for each line under a header line naming a function (``line`` is
    None for the header itself)."""
    name = None
    for line in text.splitlines():
        m = re.search(header, line)
        if m:
            name = m.group(1)
            yield name, None
        elif name is not None:
            yield name, line


def parse_resource_usage(text: str) -> dict[str, dict]:
    """``cuobjdump --dump-resource-usage`` -> {kernel: {registers, stack, shared, local}}."""
    out: dict[str, dict] = {}
    for name, line in _by_function(text, r"^\s*Function (\S+?):\s*$"):
        if line is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[name] = {
                "registers": int(fields.get("REG", 0)),
                "stack": int(fields.get("STACK", 0)),
                "shared": int(fields.get("SHARED", 0)),
                "local": int(fields.get("LOCAL", 0)),
            }
    return out


TENSOR_CORE_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "DMMA", "UTCMMA")
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_tensor_cores(sass: str) -> dict[str, list[str]]:
    """``cuobjdump --dump-sass`` -> {kernel: sorted tensor-core opcodes found (empty: none)}."""
    out: dict[str, set] = {}
    for name, line in _by_function(sass, r"Function : (\S+)"):
        found = out.setdefault(name, set())
        m = _SASS_OPCODE.search(line or "")
        if m and m.group(1) in TENSOR_CORE_OPS:
            found.add(m.group(1))
    return {k: sorted(v) for k, v in out.items()}


_MMA_LAYOUT = re.compile(
    r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[(\d+), (\d+)\]"
    r".*?instrShape = \[(\d+), (\d+)",
    re.MULTILINE,
)
_DOT_RESULT = re.compile(r"(?:tt\.dot|warp_group_dot)\b.*-> tensor<(\d+)x(\d+)x\w+, (#\w+)>")


def mma_replication(ttgir: str) -> float:
    """How many warps of a program compute each MMA tile, at worst over the kernel's dots (1:
    every warp its own tiles). Triton spreads a dot's warps over its output (``warpsPerCTA``,
    MMA layouts of the TTGIR) and, where the tile is smaller than the warps cover (16 rows a
    warp along M, ``instrShape[1]`` columns along N), warps hold and multiply the same
    fragments: a dot chained to another puts every warp along M, so a 16-row tile on 8 warps
    is computed 8 times."""
    layouts = {
        m.group(1): (int(m.group(3)), int(m.group(4)), int(m.group(6)))
        for m in _MMA_LAYOUT.finditer(ttgir)
    }
    worst = 1.0
    for m in _DOT_RESULT.finditer(ttgir):
        rows, cols, name = int(m.group(1)), int(m.group(2)), m.group(3)
        if name not in layouts:
            continue
        wm, wn, n = layouts[name]
        worst = max(worst, max(1.0, wm * 16 / rows) * max(1.0, wn * n / cols))
    return worst


_LDS = re.compile(r"^LDS(?:\.U)?(?:\.(64|128))?\b")


def sass_fma_and_shared_loads(sass: str) -> dict[str, tuple[int, int]]:
    """``cuobjdump --dump-sass`` -> {kernel: (FFMA instructions, 32-bit values its LDS load a
    thread)}, static counts (each instruction once, loops as written). Triton's IEEE dots are
    FFMA loops whose operands come from shared memory: their ratio says how many values the
    FMA units wait for from shared memory (32 a clock an SM, against 128 FMA lanes)."""
    out: dict[str, list[int]] = {}
    for name, line in _by_function(sass, r"Function : (\S+)"):
        counts = out.setdefault(name, [0, 0])
        m = _SASS_OPCODE.search(line or "")
        if not m:
            continue
        op = line[m.start(1) :].split()[0]
        if op.split(".")[0] == "FFMA":
            counts[0] += 1
        elif lds := _LDS.match(op):
            counts[1] += int(lds.group(1) or 32) // 32
    return {k: (v[0], v[1]) for k, v in out.items()}


def resident_blocks(registers: int, threads: int, smem: int) -> tuple[int, str]:
    """Blocks of ``threads`` threads that fit on one sm_90 SM, and what limits them.

    Registers are allocated per warp in units of 256 (65,536 per SM); shared memory is 228 KB
    per SM, 227 KB at most per block, plus 1 KB reserved per resident block; at most 32 blocks
    and 64 warps per SM.
    """
    warps = max(1, math.ceil(threads / 32))
    limits = {"blocks": SM_MAX_BLOCKS, "warps": SM_MAX_WARPS // warps}
    per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits["regs"] = (SM_REGS // per_warp) // warps
    if smem > BLOCK_SMEM_MAX:
        limits["smem"] = 0
    elif smem > 0:
        limits["smem"] = SM_SMEM // (smem + BLOCK_SMEM_RESERVED)
    limiter = min(limits, key=lambda k: (limits[k], k != "regs"))
    return limits[limiter], limiter


# ----------------------------------------------------------------------------------------------
# Tools


def triton_bin(tool: str) -> str:
    """A tool shipped inside the triton wheel (``triton/backends/nvidia/bin``), else on PATH."""
    import triton

    with contextlib.suppress(Exception):  # Triton's own choice (knobs, TRITON_<TOOL>_PATH)
        from triton import knobs

        return getattr(knobs.nvidia, tool.replace("-", "_")).path
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if path.exists():
        return str(path)
    found = shutil.which(tool)
    if found:
        return found
    raise FileNotFoundError(f"{tool} is neither in the triton wheel nor on PATH")


def triton_ptxas(capability: int = 90) -> str:
    """The ptxas Triton itself runs for ``capability`` (3.9: ``ptxas-blackwell`` for sm_90+)."""
    from triton.backends.nvidia import compiler as nv

    for call in (lambda: nv.get_ptxas(capability), lambda: nv.get_ptxas()):
        with contextlib.suppress(Exception):
            tool = call()
            return getattr(tool, "path", tool)
    return triton_bin("ptxas")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


USAGE_VERSION = "2"  # what _usage reads from a cubin (a new field: cached usages are stale)


def _cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    d = Path(base).parent / "lrml_kernel_report"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = _run([tool], input="\n".join(names) + "\n")
    lines = res.stdout.splitlines()
    if res.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines, strict=True))


# ----------------------------------------------------------------------------------------------
# Recording the Triton launches of the backend on fake CUDA tensors


@dataclasses.dataclass
class TensorArg:
    """A tensor argument as a launch sees it: its dtype and whether its address is 16-aligned."""

    dtype: str
    aligned: bool


def _h200_properties():
    return SimpleNamespace(
        name="NVIDIA H200 (static report)",
        major=9,
        minor=0,
        multi_processor_count=SMS,
        total_memory=141 * 1024**3,
        regs_per_multiprocessor=SM_REGS,
        max_threads_per_multi_processor=2048,
        shared_memory_per_block=48 * 1024,
        shared_memory_per_block_optin=BLOCK_SMEM_MAX,
        shared_memory_per_multiprocessor=SM_SMEM,
        warp_size=32,
        L2_cache_size=60 * 1024**2,
        is_integrated=False,
    )


@contextlib.contextmanager
def _as_h200():
    """``torch.cuda`` answers as one H200 would (device queries only; nothing can run)."""
    from unittest import mock

    import torch

    props = _h200_properties()
    patches = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_properties": lambda *a, **k: props,
        "get_device_capability": lambda *a, **k: (9, 0),
        "get_device_name": lambda *a, **k: props.name,
        "device": lambda *a, **k: contextlib.nullcontext(),
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
    }
    with contextlib.ExitStack() as stack:
        for name, fn in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, fn))
        # A CUDA build of torch opens a CUDA context for the first fake CUDA tensor: none here
        from torch._subclasses import fake_tensor

        if hasattr(fake_tensor, "init_gpu_context"):
            stack.enter_context(mock.patch.object(fake_tensor, "init_gpu_context", lambda d: None))
        yield


def _to_meta(index):
    import torch

    if isinstance(index, torch.Tensor):
        return torch.empty(index.shape, dtype=index.dtype, device="meta")
    if isinstance(index, tuple | list):
        return type(index)(_to_meta(i) for i in index)
    return index


@contextlib.contextmanager
def _fake_cuda_indexing():
    """``t[...]`` and ``t[...] = x`` on fake CUDA tensors in a CPU-only torch.

    Python indexing opens a device guard, which a CPU-only build has none of for CUDA. The index
    is applied to a meta twin; a view becomes ``as_strided`` of the tensor, a gather a fresh
    tensor of the result's shape. Assignments are dropped (values do not matter here).
    """
    from unittest import mock

    import torch

    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def fake_getitem(self, index):
        if self.device.type != "cuda":
            return getitem(self, index)
        twin = torch.empty_strided(self.shape, self.stride(), dtype=self.dtype, device="meta")
        out = getitem(twin, _to_meta(index))
        if out._is_view() and out._base is twin:
            offset = self.storage_offset() + out.storage_offset()
            return self.as_strided(out.shape, out.stride(), offset)
        return torch.empty(out.shape, dtype=out.dtype, device=self.device)

    def fake_setitem(self, index, value):
        if self.device.type != "cuda":
            return setitem(self, index, value)
        return None

    with (
        mock.patch.object(torch.Tensor, "__getitem__", fake_getitem),
        mock.patch.object(torch.Tensor, "__setitem__", fake_setitem),
    ):
        yield


@contextlib.contextmanager
def _fake_floats():
    """``float(t)`` of a fake CUDA tensor reads 1.0 (a launcher's scalar bound: its value does not
    change the kernel's types or constexprs)."""
    from unittest import mock

    import torch

    to_float = torch.Tensor.__float__

    def fake_float(self):
        return 1.0 if self.device.type == "cuda" else to_float(self)

    with mock.patch.object(torch.Tensor, "__float__", fake_float):
        yield


class _Ctx:
    """What a custom op's ``setup_context``/``backward`` use of autograd's ``ctx``."""

    def __init__(self, inputs):
        import torch

        self.needs_input_grad = tuple(
            isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs
        )
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass

    def set_materialize_grads(self, value):
        pass


@contextlib.contextmanager
def _recording(launches: list, backwards: list):
    """Launches are recorded, not run; custom ops run their Python implementation."""
    from unittest import mock

    import torch
    from torch._library.custom_ops import CustomOpDef
    from triton.runtime import autotuner
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup=False, **kwargs):
        names = [p.name for p in self.params]
        bound = dict(zip(names, args, strict=False)) | kwargs
        if callable(grid):
            grid = grid(bound)
        launches.append((self, list(args), dict(kwargs), tuple(int(g) for g in grid)))
        return None

    def autotune_record(self, *args, **kwargs):
        for i, config in enumerate(self.configs):
            merged = {**kwargs, **config.all_kwargs()}
            before = len(launches)
            self.fn.run(*args, **merged)
            for j in range(before, len(launches)):
                launches[j][2]["_autotune"] = f"{i + 1}/{len(self.configs)}"
        return None

    def call_custom_op(self, *args, **kwargs):
        fn = self._backend_fns.get("cuda") or self._init_fn
        out = fn(*args, **kwargs)
        if self._backward_fn is not None:
            backwards.append((self, args, out))
        return out

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", record))
        stack.enter_context(mock.patch.object(autotuner.Autotuner, "run", autotune_record))
        stack.enter_context(mock.patch.object(CustomOpDef, "__call__", call_custom_op))
        stack.enter_context(torch.no_grad())
        yield


def _run_backwards(backwards: list) -> None:
    """Each recorded custom op's registered backward, with gradients of ones (first order: not
    the backward of an op that a backward calls, which raises: no double backward)."""
    import torch

    for op, args, out in list(backwards):
        ctx = _Ctx(args)
        if op._setup_context_fn is not None:
            op._setup_context_fn(ctx, args, out)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) if isinstance(o, torch.Tensor) else None for o in outs]
        op._backward_fn(ctx, *grads)


def _tables(case: Case):
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        case.dtype, torch.float32
    )  # fp32 and tf32; a sort case's dtype is its key width, a negatives case's its draw
    P = torch.empty(NETFLIX_U, case.d, dtype=dt, device="cuda")
    Q = torch.empty(NETFLIX_I, case.d, dtype=dt, device="cuda")
    K = torch.empty(case.N, case.d, dtype=dt, device="cuda")
    M = torch.empty(case.N, case.d, dtype=dt, device="cuda")
    return P, Q, K, M


def record_launches(case: Case) -> list[tuple]:
    """The Triton launches of one backend call: ``[(JITFunction, args, kwargs, grid)]``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lrml_kernels.precision import using_fp32_matmul_precision

    backend = importlib.import_module("lrml_kernels.triton")
    launches: list = []
    backwards: list = []
    eps = 1e-12
    with (
        _as_h200(),
        FakeTensorMode(allow_non_fake_inputs=True),
        _fake_cuda_indexing(),
        _recording(launches, backwards),
        using_fp32_matmul_precision("high" if case.dtype == TF32 else "highest"),
    ):
        P, Q, K, M = _tables(case)
        if case.op == "topk":
            # The screened path's two launchers, for all users at once (backend.topk reads
            # bounds and the uncertified users on the host, which fake tensors cannot).
            tk = importlib.import_module("lrml_kernels.triton.topk_kernels")
            users = torch.empty(case.B, dtype=torch.int64, device="cuda")
            # with and without the exclusion bitmask (full-ranking evaluation / recommend)
            mask = torch.empty(case.B, (NETFLIX_I + 7) // 8, dtype=torch.uint8, device="cuda")
            with _fake_floats():
                for excl in (None, mask):
                    cand, _ = tk.screen_launch(P, Q, K, M, users, TOPK_K, excl, case.distance, eps)
            tk.rescore_launch(P, Q, K, M, users, cand, case.distance, eps)
        elif case.op == "relations":
            pairs = [torch.empty(case.B, dtype=torch.int64, device="cuda") for _ in range(2)]
            backend.relations(P, Q, K, M, *pairs)
        else:
            users = torch.empty(case.B, dtype=torch.int64, device="cuda")
            items = torch.empty(case.B, case.C, dtype=torch.int64, device="cuda")
            common = (P, Q, K, M, users, items)
            if case.op == "distances":
                backend.distances(*common, case.distance, case.relation, eps, True)
            elif case.op == "hinge":
                backend.hinge_loss(*common, 0.5, case.distance, case.relation, eps, "sum", True)
                _run_backwards(backwards)
            elif case.op == "train":
                backend.hinge_loss_grads(*common, 0.5, case.distance, case.relation, eps, "mean")
            elif case.op == "rowupdate":  # the trainer's Adam row updates of both tables
                ru = importlib.import_module("lrml_kernels.triton.row_update")
                f32 = {"dtype": torch.float32, "device": "cuda"}
                hyper = torch.zeros(3, **f32)  # (lr, eps, seed), read by the kernel
                for table, idx in ((P, users), (Q, items)):
                    state = (torch.empty(table.shape, **f32), torch.empty(table.shape, **f32))
                    grad = torch.empty(*idx.shape, case.d, dtype=table.dtype, device="cuda")
                    ru.row_update_(table, idx, grad, "adam", hyper, state, max_norm=1.0)
            elif case.op == "sort":  # int32 keys: the item table's ids; int64: 2^31 rows
                ru = importlib.import_module("lrml_kernels.triton.row_update")
                ids = torch.empty(case.B, dtype=torch.int64, device="cuda")
                ru.sort_ids(ids, NETFLIX_I if case.dtype == "int32" else 1 << 31)
            elif case.op == "negatives":  # sample_negatives' dispatch on CUDA tensors
                sampling = importlib.import_module("lrml_kernels.data.sampling")
                indptr = torch.empty(NETFLIX_U + 1, dtype=torch.int64, device="cuda")
                # int32 item ids, as the split's CSR holds them (data.build_csr)
                indices = torch.empty(NETFLIX_NNZ, dtype=torch.int32, device="cuda")
                cdf = None
                if case.dtype == "popularity":
                    cdf = torch.empty(NETFLIX_I + 1, dtype=torch.int64, device="cuda")
                sampling.sample_negatives(
                    users, NETFLIX_I, case.C - 1, exclude_csr=(indptr, indices), popularity=cdf
                )
            else:
                raise ValueError(f"unknown op {case.op!r}")
        return [(fn, [_describe(a) for a in args], kw, grid) for fn, args, kw, grid in launches]


def _describe(arg):
    import torch

    if isinstance(arg, torch.Tensor):
        offset = arg.storage_offset() * arg.element_size()
        return TensorArg(str(arg.dtype).removeprefix("torch."), offset % 16 == 0)
    return arg


def _materialize(arg):
    """A tiny CPU tensor that specialises like the recorded one (dtype, alignment)."""
    import torch

    if isinstance(arg, TensorArg):
        dt = getattr(torch, arg.dtype)
        t = torch.empty(64, dtype=dt)
        if not arg.aligned:
            t = t[1:] if t.element_size() < 16 else t
        return t
    return arg


# ----------------------------------------------------------------------------------------------
# Compiling one launch for sm_90 (Triton 3.6-3.9)

TARGET = ("cuda", 90, 32)


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*TARGET)


def specialize(fn, args: list, kwargs: dict):
    """``(signature, constexprs, attrs, options)`` of a launch, from Triton's own binder.

    Triton 3.8+ has ``JITFunction._pack_args``; before, ``run`` did the same inline (the
    fallback below is that code).
    """
    from triton.compiler import make_backend
    from triton.runtime import jit as tjit

    backend = make_backend(_target())
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    binder = tjit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*[_materialize(a) for a in args], **kwargs)
    if hasattr(fn, "_pack_args"):
        options, signature, constexprs, attrs = fn._pack_args(
            backend, kwargs, bound_args, specialization, options
        )
        return signature, constexprs, attrs, options
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigkeys = [p.name for p in fn.params]
    sigvals = [x[0] for x in specialization]
    signature = dict(zip(sigkeys, sigvals, strict=True))
    paths = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {p: get_iterable_path(list(bound_args.values()), p) for p in paths}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p)) for p in paths}
    return signature, constexprs, attrs, options


def ast_source(fn, signature, constexprs, attrs):
    """``ASTSource`` across versions: ``constexprs=`` (3.3+) or ``constants=`` (before)."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return ASTSource(fn, signature, constants=constexprs, attrs=attrs)


def _ptxas_flags(options) -> list[str]:
    """The flags Triton passes ptxas (its ``make_cubin``), so the numbers match its cubin."""
    from triton.backends.nvidia.compiler import CUDABackend

    flags = ["-lineinfo", "-v"]
    if not getattr(options, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    with contextlib.suppress(OSError, TypeError):  # 3.9 adds a ptxas 13 work-around
        if "--regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin):
            flags.append("--regAllocOptLevel=2")
    extra = getattr(options, "ptx_options", None)
    if extra:
        flags += extra.split(" ")
    return flags


def compile_one(job: dict) -> dict:
    """Compile one specialised launch and read its resource usage (cached by PTX hash)."""
    import triton

    fn = _jit_function(job["module"], job["name"])
    t0 = time.perf_counter()
    src = ast_source(fn, job["signature"], job["constexprs"], job["attrs"])
    log = io.StringIO()  # Triton's own ptxas -v log, printed when it compiles (not when cached)
    with _env("TRITON_DUMP_PTXAS_LOG", "1"), contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=_target(), options=job["options"])
    compile_s = time.perf_counter() - t0
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    key = hashlib.sha256((USAGE_VERSION + ptx + repr(job["ptxas_flags"])).encode()).hexdigest()
    key = key[:32]
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        usage = json.loads(cached.read_text())
    else:
        usage = _usage(kernel, ptx, md, job["ptxas_flags"], log.getvalue())
        part = cached.with_suffix(f".{os.getpid()}.part")  # (another worker may read it now)
        part.write_text(json.dumps(usage))
        part.replace(cached)
    return {
        **usage,
        "kernel": md.name,
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "shared_dynamic": md.shared,
        "mma_replication": mma_replication(kernel.asm.get("ttgir", "")),
        "compile_s": round(compile_s, 2),
    }


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _usage(kernel, ptx: str, md, flags: list[str], log: str = "") -> dict:
    """Resource usage of a compiled kernel: ptxas -v (Triton's log of this compile, or a rerun
    of its ptxas with its flags), cuobjdump on its cubin (registers, stack, SASS)."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1).split(",")[0]
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.o"), Path(tmp, "k.cubin")
        src.write_text(ptx)
        cubin.write_bytes(kernel.asm["cubin"])
        ptxas = parse_ptxas(log).get(md.name)
        source = "triton's ptxas log"
        if ptxas is None:
            source = "ptxas rerun"
            cmd = [triton_ptxas(), *flags, f"--gpu-name={arch}", str(src), "-o", str(obj)]
            res = _run(cmd)
            if res.returncode != 0:
                raise RuntimeError(f"ptxas failed on {md.name}:\n{res.stderr[-2000:]}")
            ptxas = parse_ptxas(res.stdout + res.stderr).get(md.name, _empty_usage())
        ru = _run([triton_bin("cuobjdump"), "--dump-resource-usage", str(cubin)])
        binary = parse_resource_usage(ru.stdout).get(md.name, {})
        sass = _run([triton_bin("cuobjdump"), "--dump-sass", str(cubin)])
        tc = sass_tensor_cores(sass.stdout).get(md.name, [])
        ffma, lds = sass_fma_and_shared_loads(sass.stdout).get(md.name, (0, 0))
    return {
        "arch": arch,
        "registers": binary.get("registers", ptxas["registers"]),
        "stack": binary.get("stack", ptxas["stack"]),
        "ptxas_registers": ptxas["registers"],
        "spill_stores": ptxas["spill_stores"],
        "spill_loads": ptxas["spill_loads"],
        "smem_static": ptxas["smem"],
        "tensor_cores": tc,
        "ffma": ffma,
        "lds_values": lds,
        "ptxas_source": source,
    }


# ----------------------------------------------------------------------------------------------
# Rows


# Integer constexprs that size a launch without a BLOCK_ name (the row update's sort: its chunks
# of 2^LOG_C keys), shown in the blocks column as well.
SHAPE_CONSTEXPRS = ("LOG_C", "CHUNKS")


def _blocks_and_flags(constexprs: dict) -> tuple[str, str]:
    blocks, flags = [], []
    for name, value in constexprs.items():
        if name.startswith("BLOCK") or name in SHAPE_CONSTEXPRS:
            blocks.append(f"{name.removeprefix('BLOCK_') or name}={value}")
        elif isinstance(value, bool) and value:
            flags.append(name)
    return " ".join(blocks), " ".join(flags)


def _finish(row: dict) -> dict:
    threads = row["num_warps"] * 32
    smem = row["smem_static"] + row.get("shared_dynamic", 0)
    row["shared"] = smem
    row["blocks_per_sm"], row["occupancy_limiter"] = resident_blocks(
        row["registers"], threads, smem
    )
    row["warps_per_sm"] = row["blocks_per_sm"] * row["num_warps"]
    programs = row.get("programs")
    if programs:
        slots = SMS * max(row["blocks_per_sm"], 1)
        row["waves"] = round(programs / slots, 3)
        row["sms_busy"] = min(programs, SMS)
    row["spills"] = row["spill_stores"] > 0 or row["spill_loads"] > 0
    return row


def compile_job(fn, args: list, kwargs: dict) -> tuple[str, dict, dict]:
    """``(key, job, constexprs by name)`` of one launch: the job :func:`compile_one` compiles,
    and a key that is equal for launches Triton would compile once."""
    signature, constexprs, attrs, options = specialize(fn, args, kwargs)
    names = [p.name for p in fn.params]
    named = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    named = {k: v for k, v in named.items() if fn.params[names.index(k)].is_constexpr}
    opts = dict(options.__dict__)
    job = {
        "module": fn.fn.__module__,
        "name": fn.fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "options": opts,
        "ptxas_flags": _ptxas_flags(options),
    }
    key = hashlib.sha256(
        repr((job["module"], job["name"], signature, sorted(constexprs.items()), attrs,
              sorted(opts.items()))).encode()
    ).hexdigest()  # fmt: skip
    return key, job, named


def plan(case: Case) -> list[dict]:
    """The distinct launches of one case: compile job, key, grid, constexprs and how many times
    the call launches it (top-k launches one kernel per user chunk)."""
    out: dict[tuple, dict] = {}
    for fn, args, kwargs, grid in record_launches(case):
        key, job, named = compile_job(fn, args, kwargs)
        entry = out.get((key, grid))
        if entry is None:
            out[(key, grid)] = {
                "case": case,
                "launch": len(out),
                "key": key,
                "job": job,
                "grid": grid,
                "constexprs": named,
                "autotune": kwargs.get("_autotune", ""),
                "launches": 1,
            }
        else:
            entry["launches"] += 1
    return list(out.values())


@contextlib.contextmanager
def _mapper(jobs: int | None):
    """``map`` over ``jobs`` spawned processes (default ≤ 4), or in this one."""
    jobs = jobs or min(4, os.cpu_count() or 1)
    if __name__ not in ("__main__", "__mp_main__", "kernel_report"):
        jobs = 1  # loaded under another name: spawned workers could not import this module
    if jobs == 1:
        yield map
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        yield pool.map


def _compile_all(mapper, todo: dict[str, dict], recorded: int, progress, t0: float) -> dict:
    """Each distinct job of ``todo`` (key -> job) through :func:`compile_one`: key -> result."""
    if progress:
        progress(0, len(todo), time.perf_counter() - t0, f"{recorded} launches recorded")
    compiled = {}
    for n, (key, res) in enumerate(zip(todo, mapper(compile_one, todo.values()), strict=True)):
        compiled[key] = res
        if progress:
            progress(n + 1, len(todo), time.perf_counter() - t0, res["kernel"])
    return compiled


def triton_rows(
    subset: str = "full", jobs: int | None = None, progress=None, all_distances: bool = False
) -> list[dict]:
    """One row per distinct launch of each case, every Triton kernel compiled for sm_90.

    Recording (fake tensors) and compiling both run in ``jobs`` spawned processes.
    """
    if _interpreting():
        raise RuntimeError("set TRITON_INTERPRET=0 (collect() does it in a child process)")
    todo_cases = cases(subset, all_distances)
    t0 = time.perf_counter()
    with _mapper(jobs) as mapper:
        plans = [p for ps in mapper(plan, todo_cases) for p in ps]
        todo = {p["key"]: p["job"] for p in plans}
        compiled = _compile_all(mapper, todo, len(plans), progress, t0)
    rows = []
    for p in plans:
        c = compiled[p["key"]]
        blocks, flags = _blocks_and_flags(p["constexprs"])
        row = {
            "source": "triton",
            **p["case"].label(),
            "launch": p["launch"],
            "kernel": c["kernel"],
            "blocks": blocks,
            "flags": flags,
            "constexprs": {
                k: v for k, v in p["constexprs"].items() if isinstance(v, bool | int | float | str)
            },
            "autotune": p["autotune"],
            "grid": list(p["grid"]),
            "programs": math.prod(p["grid"]),
            "launches": p["launches"],
            **{k: v for k, v in c.items() if k != "kernel"},
            "variant": p["key"][:12],
        }
        rows.append(_finish(row))
    return rows


def _jit_function(module: str, name: str):
    fn = getattr(importlib.import_module(module), name)
    while not hasattr(fn, "params"):  # an autotuner or heuristics wrapper
        fn = fn.fn
    return fn


def _recorded(arg):
    """A recorded launch argument (JSON: :func:`_describe`'s, a :class:`TensorArg` as a dict)
    as :func:`specialize` takes it."""
    return TensorArg(**arg) if isinstance(arg, dict) else arg


def launch_rows(path: str, jobs: int | None = None, progress=None) -> list[dict]:
    """One row per distinct compiled kernel among the launches recorded in ``path`` (JSON
    lines: test, module, name, args, kwargs, grid), each compiled for sm_90: the Triton
    launches the GPU tests make, recorded by the rehearsal (``LRML_REHEARSE_RECORD``)."""
    if _interpreting():
        raise RuntimeError("set TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    lines = Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    plans: dict[str, dict] = {}
    for rec in records:
        fn = _jit_function(rec["module"], rec["name"])
        args = [_recorded(a) for a in rec["args"]]
        kwargs = {k: _recorded(v) for k, v in rec["kwargs"].items()}
        key, job, named = compile_job(fn, args, kwargs)
        entry = plans.setdefault(key, {"job": job, "constexprs": named, "tests": {}, "launches": 0})
        entry["launches"] += 1
        entry["tests"][rec["test"]] = None
    todo = {key: p["job"] for key, p in plans.items()}
    with _mapper(jobs) as mapper:
        compiled = _compile_all(mapper, todo, len(records), progress, time.perf_counter())
    rows = []
    for key, p in plans.items():
        blocks, flags = _blocks_and_flags(p["constexprs"])
        row = {"source": "triton", **compiled[key], "blocks": blocks, "flags": flags,
               "launches": p["launches"], "tests": list(p["tests"])}  # fmt: skip
        rows.append(_finish(row))
    return rows


LAUNCH_COLUMNS = (
    "kernel", "blocks", "flags", "warps", "regs", "stack B", "spill st/ld B", "smem",
    "blocks/SM", "TC", "compile s", "launches", "tests",
)  # fmt: skip


def launches_markdown(rows: list[dict], title: str = "") -> str:
    """The table of :func:`launch_rows`: one row per distinct compiled kernel."""
    lines = [f"## {title}", ""] if title else []
    lines += [*summary(rows), ""]
    lines += ["| " + " | ".join(LAUNCH_COLUMNS) + " |", "|" + "---|" * len(LAUNCH_COLUMNS)]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["blocks"], r["flags"])):
        spills = f"{r['spill_stores']:,} / {r['spill_loads']:,}"
        tests = sorted({t.split("::")[0].removeprefix("tests/") for t in r["tests"]})
        lines.append("| " + " | ".join([
            r["kernel"].removeprefix("_lrml_"), r["blocks"], r["flags"] or "—",
            str(r["num_warps"]), str(r["registers"]), f"{r['stack']:,}",
            f"**{spills}**" if r["spills"] else spills, _kb(r["shared"]),
            str(r["blocks_per_sm"]), ",".join(r["tensor_cores"]) or "no",
            f"{r['compile_s']:.1f}", str(r["launches"]),
            f"{len(r['tests'])} ({', '.join(tests)})",
        ]) + " |")  # fmt: skip
    total = sum(r["compile_s"] for r in rows)
    lines += [
        "",
        f"- {len(rows)} distinct compiled kernels, {sum(r['launches'] for r in rows)} launches; "
        f"{sum(r['spills'] for r in rows)} spill; {total:.0f} s of compiling in all.",
        "- compile s: triton.compile to a cubin (TTIR to ptxas) on this machine, what a fresh "
        "GPU machine pays once per kernel where Triton's cache (TRITON_CACHE_DIR) started "
        "empty; tests: how many tests launch it (their files).",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# CUDA kernels


def cuda_rows(nvcc: str | None = None) -> list[dict]:
    """One row per kernel in ``csrc/cuda/*.cu``: ``nvcc -arch=sm_90 -Xptxas -v``.

    Cached by the sources (``.cu`` and the headers of ``csrc/``), nvcc's version and the flags.
    """
    nvcc = nvcc or os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        return []
    rows = []
    headers = sorted([*(REPO / "csrc").rglob("*.h"), *(REPO / "csrc").rglob("*.cuh")])
    version = _run([nvcc, "--version"]).stdout
    for cu in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        cmd = [nvcc, "-std=c++17", "-O3", f"-I{REPO / 'csrc'}", "-arch=sm_90", "-Xptxas", "-v",
               "-c", str(cu)]  # fmt: skip
        digest = hashlib.sha256(repr((USAGE_VERSION, cmd[1:], version)).encode())
        for f in [cu, *headers]:
            digest.update(f.read_bytes())
        cached = _cache_dir() / f"cuda-{digest.hexdigest()[:32]}.json"
        if cached.exists():
            rows += json.loads(cached.read_text())
            continue
        found = _cuda_file_rows(cu, cmd)
        cached.write_text(json.dumps(found))
        rows += found
    return rows


def _cuda_file_rows(cu: Path, cmd: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp, cu.stem + ".o")
        res = _run([*cmd, "-o", str(obj)])
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu.name}:\n{res.stderr[-3000:]}")
        usage = parse_ptxas(res.stdout + res.stderr)
        sass = _run([triton_bin("cuobjdump"), "--dump-sass", str(obj)])
        tc = sass_tensor_cores(sass.stdout)
        fma = sass_fma_and_shared_loads(sass.stdout)
    names = _demangle(sorted(usage))
    rows = []
    for mangled, u in sorted(usage.items()):
        ffma, lds = fma.get(mangled, (0, 0))
        row = {
            "source": "cuda",
            "op": cu.name,
            "kernel": _short_cuda_name(names[mangled]),
            "variant": mangled,
            "arch": "sm_90",
            "registers": u["registers"],
            "ptxas_registers": u["registers"],
            "stack": u["stack"],
            "spill_stores": u["spill_stores"],
            "spill_loads": u["spill_loads"],
            "smem_static": u["smem"],
            "num_warps": CUDA_ASSUMED_WARPS,
            "num_stages": None,
            "tensor_cores": tc.get(mangled, []),
            "ffma": ffma,
            "lds_values": lds,
            "mma_replication": None,  # (hand-written CUDA: no Triton layouts to read)
        }
        rows.append(_finish(row))
    return rows


_CUDA_TYPES = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16", "double": "fp64"}


def _short_cuda_name(demangled: str) -> str:
    """``void lrml::cuda::(anonymous namespace)::k<__half>(...)`` -> ``k<fp16>``."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = name.split("(", 1)[0].removeprefix("void ").strip()
    head, _, args = name.partition("<")
    head = head.split("::")[-1]
    if args:
        args = ", ".join(_CUDA_TYPES.get(a.strip(), a.strip()) for a in args.rstrip(">").split(","))
        return f"{head}<{args}>"
    return head


# ----------------------------------------------------------------------------------------------
# Entry points


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreted_kernels_loaded() -> bool:
    """True if this process imported the package's Triton kernels as interpreted functions."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("lrml_kernels.triton") and mod is not None:
            for value in vars(mod).values():
                if type(value).__name__ == "InterpretedFunction":
                    return True
    return False


def collect(
    subset: str = "full",
    jobs: int | None = None,
    cuda: bool = True,
    progress=None,
    all_distances: bool = False,
) -> list[dict]:
    """The rows of the report: Triton launches (see :func:`cases`), then the CUDA kernels.

    With ``TRITON_INTERPRET`` set, or the package's kernels already imported interpreted (as in
    the test suite), the work runs in a child process without ``TRITON_INTERPRET``.
    """
    if not (_interpreting() or _interpreted_kernels_loaded()):
        rows = triton_rows(subset, jobs, progress, all_distances)
        return rows + (cuda_rows() if cuda else [])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rows.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--subset", subset,
               "--json", str(out), "--quiet"]  # fmt: skip
        if jobs:
            cmd += ["--jobs", str(jobs)]
        if not cuda:
            cmd.append("--no-cuda")
        if all_distances:
            cmd.append("--all-distances")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"kernel report failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
        return json.loads(out.read_text())["rows"]


def _fmt_int(x) -> str:
    return f"{x:,}" if isinstance(x, int) else ("—" if x is None else str(x))


def _kb(x: int) -> str:
    return "0" if not x else f"{x / 1024:.1f} KB"


COLUMNS = (
    "kernel", "op", "B×C", "d", "N", "dtype", "relation", "distance", "blocks", "flags",
    "warps", "stages", "regs", "stack B", "spill st/ld B", "smem", "blocks/SM", "programs",
    "waves", "TC", "MMA ×", "LDS/FFMA",
)  # fmt: skip


def _cells(r: dict) -> list[str]:
    regs = _fmt_int(r["registers"])
    if r.get("ptxas_registers") and r["ptxas_registers"] != r["registers"]:
        regs += f" (ptxas {r['ptxas_registers']})"
    spills = f"{_fmt_int(r['spill_stores'])} / {_fmt_int(r['spill_loads'])}"
    if r["spills"]:
        spills = f"**{spills}**"
    occ = f"{r['blocks_per_sm']} ({r['warps_per_sm']} warps, {r['occupancy_limiter']})"
    tc = ",".join(r["tensor_cores"]) if r["tensor_cores"] else "no"
    if r["source"] == "cuda":
        return [r["kernel"], r["op"], "—", "—", "—", "—", "—", "—", "—", "—",
                f"{r['num_warps']}*", "—", regs, _fmt_int(r["stack"]), spills,
                _kb(r["shared"]) + " static", occ, "—", "—", tc, "—", _lds_per_ffma(r)]  # fmt: skip
    bc = "all users" if r["op"] == "topk" else f"{_pow2(r['B'])}×{r['C']}"
    if r["op"] == "sort":
        bc = f"{r['B']:,} ids"
    programs = f"{_fmt_int(r['programs'])} ({r['sms_busy']}/{SMS} SMs)"
    if len(r["grid"]) > 1:
        programs = "×".join(map(str, r["grid"])) + " = " + programs
    if r.get("launches", 1) > 1:
        programs += f", {r['launches']} launches"
    model = [str(r["d"]), str(r["N"]), r["dtype"], r["relation"], r["distance"]]
    if r["op"] == "topk":
        model[3] = "—"
    elif r["op"] == "relations":
        model[3:] = ["—", "—"]
    elif r["op"] == "negatives":  # the sampler reads ids and the CSR, no table; dtype: the draw
        model = ["—", "—", r["dtype"], "—", "—"]
    elif r["op"] == "sort":  # ids only; dtype: the key width
        model = ["—", "—", f"{r['dtype']} keys", "—", "—"]
    return [r["kernel"].removeprefix("_lrml_"), r["op"], bc, *model, r["blocks"],
            r["flags"] or "—", str(r["num_warps"]), str(r["num_stages"]), regs,
            _fmt_int(r["stack"]), spills, _kb(r["shared"]), occ, programs,
            f"{r['waves']:.2f}", tc, _replication(r), _lds_per_ffma(r)]  # fmt: skip


def _lds_per_ffma(r: dict) -> str:
    if not r.get("ffma") or r["tensor_cores"]:  # (an MMA kernel's loads feed the MMAs)
        return "—"
    return f"{r['lds_values'] / r['ffma']:.2f}"


def _replication(r: dict) -> str:
    rep = r.get("mma_replication")
    if rep is None or not r["tensor_cores"]:
        return "—"
    return f"**{rep:g}**" if rep > 1 else "1"


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 4096 and n & (n - 1) == 0 else f"{n:,}"


def summary(rows: list[dict]) -> list[str]:
    """One line per kernel (and source file): how many rows spill, the worst of each column."""
    lines = [
        "| kernel | rows | rows that spill | registers | stack B (max) | spill stores B (max) "
        "| blocks/SM (min) | TC | MMA × (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        name = r["kernel"] if r["source"] == "triton" else r["kernel"].split("<")[0]
        groups.setdefault(name, []).append(r)
    for name, rs in groups.items():
        regs = sorted({r["registers"] for r in rs})
        tc = sorted({op for r in rs for op in r["tensor_cores"]})
        reps = [r["mma_replication"] for r in rs if r.get("mma_replication") and r["tensor_cores"]]
        lines.append(
            f"| {name} | {len(rs)} | {sum(r['spills'] for r in rs)} | "
            f"{regs[0]}-{regs[-1]} | {max(r['stack'] for r in rs):,} | "
            f"{max(r['spill_stores'] for r in rs):,} | {min(r['blocks_per_sm'] for r in rs)} | "
            f"{','.join(tc) or 'no'} | {f'{max(reps):g}' if reps else '—'} |"
        )
    return lines


def markdown(rows: list[dict], title: str = "") -> str:
    """The table (one row per launch of each case; CUDA kernels last) and its legend."""
    lines = [f"## {title}", ""] if title else []
    lines += [*summary(rows), ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    spilling = sorted({(r["source"], r["kernel"]) for r in rows if r["spills"]})
    lines += [
        "",
        f"- {len(rows)} rows, {len({r.get('variant', r['kernel']) for r in rows})} distinct "
        f"compiled kernels; {sum(r['spills'] for r in rows)} rows spill"
        + (f" ({', '.join(k for _, k in spilling)})" if spilling else "")
        + ".",
        "- sm_90 (H100/H200, 132 SMs). regs: registers per thread in the cubin (ptxas -v's count "
        "in brackets where it differs); stack, spill stores/loads: bytes per thread (ptxas -v); "
        "smem: static + dynamic shared memory per block.",
        "- blocks/SM: resident blocks per SM (warps, the limit that binds: regs = 65,536 "
        "registers per SM allocated per warp in units of 256; smem = 228 KB per SM with 1 KB "
        "reserved per block; warps = 64 per SM; blocks = 32 per SM). programs: grid size "
        "(SMs given at least one program); waves = programs / (132 × blocks/SM).",
        "- MMA ×: how many warps compute each MMA tile, at worst over the kernel's dots (TTGIR "
        "layouts; 1: each warp its own tiles; 8: eight warps multiply the same fragments).",
        "- LDS/FFMA: 32-bit values loaded from shared memory per FFMA, static SASS counts (each "
        "instruction once), kernels without tensor cores; an SM's shared memory serves 32 values "
        "a clock to its 128 FMA lanes: above 0.25, FFMA-bound code waits for shared memory.",
        "- TC: tensor-core instructions (HGMMA/HMMA/...) in the SASS. flags: true boolean "
        "constexprs. B×C 'all users': top-k of all 480,189 users × 17,770 items, k = 10.",
        "- CUDA rows: block size and dynamic shared memory are chosen at run time from the "
        f"device; warps* assumes {CUDA_ASSUMED_WARPS} warps and static shared memory only.",
    ]
    present = {r["op"] for r in rows}
    lines += [f"- op {op}: {what}." for op, what in OPS.items() if op in present]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=SUBSETS, default="full")
    ap.add_argument(
        "--launches",
        metavar="JSONL",
        help="compile the launches recorded in this file instead of a subset (the GPU tests' "
        "launches: LRML_REHEARSE_RECORD of tests/_gpu_rehearsal.py)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    ap.add_argument("--fail-on-spills", action="store_true", help="exit 1 if any row spills")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default ≤ 4)")
    ap.add_argument(
        "--all-distances", action="store_true", help="every distance at every d, N (slow)"
    )
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels (nvcc)")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    def progress(done, total, secs, what=""):
        if not args.quiet:
            print(f"kernel_report: {secs:5.0f} s compiled {done}/{total} {what}", file=sys.stderr)

    import triton

    if args.launches:
        rows = launch_rows(args.launches, args.jobs, progress)
    else:
        rows = collect(args.subset, args.jobs, not args.no_cuda, progress, args.all_distances)
    info = {
        "subset": None if args.launches else args.subset,
        "launches": args.launches,
        "triton": triton.__version__,
        "target": "cuda sm_90 (GPUTarget('cuda', 90, 32))",
        "nvcc": None if args.launches else _nvcc_version(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    # Without nvcc the CUDA rows are missing: said in the title and on stderr, and the spill gate
    # fails (it would pass on the Triton rows alone) unless --no-cuda asked for no CUDA rows.
    no_cuda_rows = not args.launches and not args.no_cuda and info["nvcc"] is None
    if args.launches:
        title = f"Static GPU report (sm_90, no GPU): the launches of {args.launches}, "
        table = launches_markdown(rows, title + f"triton {info['triton']}")
    else:
        nvcc = info["nvcc"] or (
            "no CUDA rows (--no-cuda)" if args.no_cuda else "no nvcc: the CUDA rows were NOT built"
        )
        title = (
            f"Static GPU report (sm_90, no GPU): subset {args.subset}, triton {info['triton']}, "
            f"{nvcc}"
        )
        table = markdown(rows, title)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if not args.quiet:
        print(table)
        print(f"kernel_report: {len(rows)} rows in {info['seconds']} s", file=sys.stderr)
    if no_cuda_rows:
        print(
            "kernel_report: nvcc not found (PATH, $NVCC): the CUDA kernels' rows were not built; "
            "pass --no-cuda to leave them out on purpose",
            file=sys.stderr,
        )
    if args.fail_on_spills and any(r["spills"] for r in rows):
        bad = sorted({f"{r['source']}:{r['kernel']}" for r in rows if r["spills"]})
        print(f"kernel_report: spills in {', '.join(bad)}", file=sys.stderr)
        return 1
    if args.fail_on_spills and no_cuda_rows:
        print("kernel_report: --fail-on-spills without the CUDA rows: failed", file=sys.stderr)
        return 1
    return 0


def _nvcc_version() -> str | None:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        return None
    m = re.search(r"release (\S+?),", _run([nvcc, "--version"]).stdout)
    return f"nvcc {m.group(1)}" if m else "nvcc"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
