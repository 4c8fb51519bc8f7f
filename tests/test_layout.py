"""The package's import structure: names that resolve to one thing, and no import circles."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import lrml_kernels


def _packages():
    yield lrml_kernels
    for info in pkgutil.walk_packages(lrml_kernels.__path__, "lrml_kernels."):
        if info.ispkg:
            try:
                yield importlib.import_module(info.name)
            except ImportError:  # an optional backend (triton) not installed
                continue


def test_no_module_shares_its_name_with_a_function():
    """``from lrml_kernels.triton import distances`` must not mean a module in one place and a
    function in another (the first GPU run's determinism test imported the function)."""
    clashes = []
    for pkg in _packages():
        for info in pkgutil.iter_modules(pkg.__path__):
            value = getattr(pkg, info.name, None)
            if value is not None and not isinstance(value, type(pkg)):
                clashes.append(f"{pkg.__name__}.{info.name}")
    assert clashes == []


def test_backends_import_their_helpers_without_the_backend_registry():
    """table_grad and BackendUnavailable come from modules that every backend can import without
    importing the registry (no backends <-> extension <-> triton circle). The package's __init__
    re-exports the registry, so it is stubbed out here."""
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('lrml_kernels')\n"
        f"pkg.__path__ = [{lrml_kernels.__path__[0]!r}]\n"
        "sys.modules['lrml_kernels'] = pkg\n"
        "import lrml_kernels.errors, lrml_kernels.gradients, lrml_kernels.extension\n"
        "print('lrml_kernels.backends' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
