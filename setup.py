"""Build script: pure-Python package, plus the C++/CUDA extension ahead of time when possible.

pyproject's build requirements do not include torch, so under pip's build isolation (the
default) nothing is compiled and the extension is built just in time on first use
(lrml_kernels/extension.py).
With torch importable at build time (``pip install --no-build-isolation [-e] .``) the CPU library
``lrml_kernels._C_cpu`` is built, and the CUDA library ``lrml_kernels._C_cuda`` too when torch has
CUDA and nvcc is found. A failed ahead-of-time build only warns: the install still succeeds and the
just-in-time path takes over. ``LRML_KERNELS_NO_EXT=1`` skips the ahead-of-time build.

The CPU library is compiled for the building machine (``-march=native``, as the just-in-time
build): the stamp records that machine's CPU flags and the package ignores the library on a CPU
with other flags (it builds just in time there). For a wheel meant for other machines set
``LRML_KERNELS_MARCH`` (e.g. ``x86-64-v3``: AVX2 + FMA) to build for that baseline instead.

Regular (non-editable) installs also get a copy of csrc/ as package data (lrml_kernels/csrc) so that
the just-in-time build finds its sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu/lrml_cpu.cpp",
    "csrc/cpu/topk_cpu.cpp",
    "csrc/cpu/row_update_cpu.cpp",
]
CUDA_SOURCES = ["csrc/cuda/lrml_cuda.cpp", "csrc/cuda/lrml_kernels.cu"]
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
STAMP = ".stamp.json"  # next to each library: lrml_kernels/_C_cpu.stamp.json
MARCH = os.environ.get("LRML_KERNELS_MARCH", "native")


def stamp_path(library) -> Path:
    """The stamp of a built library: ``_C_cpu.<suffix>.so`` -> ``_C_cpu.stamp.json``."""
    library = Path(library)
    return library.with_name(library.name.split(".")[0] + STAMP)


def cpu_flags_hash() -> str:
    """Same as lrml_kernels.extension.cpu_flags_hash: a -march=native build runs only where the
    CPU has the same flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256(" ".join(sorted(flags.split()[2:])).encode()).hexdigest()[:16]


def sources_hash() -> str:
    """Same as lrml_kernels.extension.sources_hash: the AOT build is used only if it matches."""
    h = hashlib.sha256()
    for f in sorted(p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        h.update(f.relative_to(CSRC).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package (lrml_kernels/csrc) for the just-in-time build."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not CSRC.is_dir():
            return
        dest = Path(self.build_lib) / "lrml_kernels" / "csrc"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(
            CSRC, dest, ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so", "tools")
        )


def extension_setup() -> tuple[list, dict]:
    if os.environ.get("LRML_KERNELS_NO_EXT", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:  # torch is not importable here (build isolation): JIT at first use
        return [], {}

    include = [str(CSRC)]
    exts = [
        cpp_extension.CppExtension(
            "lrml_kernels._C_cpu",
            CPU_SOURCES,
            include_dirs=include,
            extra_compile_args={"cxx": ["-O3", f"-march={MARCH}", "-fno-math-errno", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        exts.append(
            cpp_extension.CUDAExtension(
                "lrml_kernels._C_cuda",
                CUDA_SOURCES,
                include_dirs=include,
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": [
                        "-O3",
                        "-lineinfo",
                        "-gencode=arch=compute_80,code=sm_80",
                        "-gencode=arch=compute_90,code=sm_90",
                        "-gencode=arch=compute_90,code=compute_90",
                    ],
                },
            )
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds each extension if it can; a failure warns and leaves the JIT path in charge."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(
                    f"lrml_kernels: ahead-of-time build of {ext.name} failed ({exc}); "
                    "it will be built just in time on first use",
                    stacklevel=1,
                )
                return
            stamp = stamp_path(self.get_ext_fullpath(ext.name))
            info = {"sources": sources_hash(), "torch": torch.__version__, "march": MARCH}
            if MARCH == "native" and ext.name.endswith("_cpu"):
                info["cpu_flags"] = cpu_flags_hash()
            stamp.write_text(json.dumps(info) + "\n")

        def copy_extensions_to_source(self):
            """Editable installs: each library is copied into the source tree, and its stamp
            with it (without it the package would not trust the library and build again)."""
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace, regular = self._get_inplace_equivalent(build_py, ext)
                if stamp_path(regular).exists():
                    shutil.copyfile(stamp_path(regular), stamp_path(inplace))

        def get_outputs(self):
            outputs = []
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    outputs.append(path)
            return outputs

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_setup()
cmdclass["build_py"] = BuildPyWithSources
if ext_modules:
    print(f"lrml_kernels: building {[e.name for e in ext_modules]} ahead of time", file=sys.stderr)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
