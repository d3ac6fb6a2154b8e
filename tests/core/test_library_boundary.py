"""The library stands alone: importing every seapig_core module never imports Prefect."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import seapig_core


def test_no_seapig_core_module_imports_prefect():
    modules = sorted(m.name for m in pkgutil.walk_packages(seapig_core.__path__, "seapig_core."))
    assert "seapig_core.scores.logits" in modules and "seapig_core.examples.digits" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(len(leaked), leaked[:3])\n"
        "raise SystemExit(1 if leaked else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
