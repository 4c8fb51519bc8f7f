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

import importlib.util
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
# The source lists and the stamp helpers, shared with the package (loaded by path: neither the
# package nor torch needs to be importable for this).
_spec = importlib.util.spec_from_file_location("lrml_build", ROOT / "lrml_kernels" / "_build.py")
lrml_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lrml_build)
CPU_SOURCES = [f"csrc/{s}" for s in lrml_build.CPU_SOURCES]
CUDA_SOURCES = [f"csrc/{s}" for s in lrml_build.CUDA_SOURCES]
stamp_path = lrml_build.stamp_path
MARCH = os.environ.get("LRML_KERNELS_MARCH", "native")


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
            info = {
                "sources": lrml_build.sources_hash(CSRC),
                "torch": torch.__version__,
                "march": MARCH,
            }
            if MARCH == "native" and ext.name.endswith("_cpu"):
                info["cpu_flags"] = lrml_build.cpu_flags_hash()
            stamp.write_text(json.dumps(info) + "\n")

        def copy_extensions_to_source(self):
            """Editable installs: each library that was built is copied into the source tree,
            and its stamp with it (without it the package would not trust the library and build
            again). A library whose build failed is left out: the install still succeeds."""
            build_py = self.get_finalized_command("build_py")
            every = self.extensions
            # the build's path: get_ext_fullpath gives the in-place one here (self.inplace)
            self.extensions = [
                e for e in every if os.path.exists(self._get_inplace_equivalent(build_py, e)[1])
            ]
            try:
                super().copy_extensions_to_source()
            finally:
                built, self.extensions = self.extensions, every
            for ext in built:
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
