"""benchmarks/<name>.py as a module, for the tests of the benchmark tools (benchmarks/ is not a
package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` afresh, as the module ``lrml_bench_<name>``."""
    key = f"lrml_bench_{name}"
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # dataclasses look their module up while it runs
    spec.loader.exec_module(mod)
    return mod
