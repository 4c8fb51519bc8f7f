"""What a build of the C++ extension is made of and stamped with: shared by ``setup.py`` (which
loads this file by path, before the package or torch can be imported) and
:mod:`lrml_kernels.extension`. Standard library only.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

CPU_SOURCES = (
    "bindings.cpp",
    "fused_hinge_autograd.cpp",
    "topk_screened.cpp",
    "cpu/lrml_cpu.cpp",
    "cpu/topk_cpu.cpp",
    "cpu/relations_cpu.cpp",
    "cpu/row_update_cpu.cpp",
    "cpu/sampling_cpu.cpp",
    "cpu/split_cpu.cpp",
    "cpu/synthetic_cpu.cpp",
)
CUDA_SOURCES = (
    "cuda/lrml_cuda.cpp",
    "cuda/lrml_kernels.cu",
    "cuda/relations_kernels.cu",
)  # relative to csrc/, as above
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
STAMP = ".stamp.json"  # next to each library: lrml_kernels/_C_cpu.stamp.json


def sources_hash(src: Path) -> str:
    """sha256 over every source and header under csrc/ (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        h.update(f.relative_to(src).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cpu_flags() -> str:
    """The CPU's feature flags (a -march=native build runs only on a CPU that has them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags_hash() -> str:
    """A short hash of :func:`cpu_flags`, as the stamp of a -march=native build records it."""
    return hashlib.sha256(" ".join(sorted(cpu_flags().split()[2:])).encode()).hexdigest()[:16]


def stamp_path(library) -> Path:
    """The stamp next to a built library: ``_C_cpu.<suffix>.so`` -> ``_C_cpu.stamp.json`` (the
    sources, torch and CPU it was built for)."""
    library = Path(library)
    return library.with_name(library.name.split(".")[0] + STAMP)
