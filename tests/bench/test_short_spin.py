"""bench/short_spin.py: every bench script takes the ``atlas`` command line's OpenMP policy (GOMP_SPINCOUNT=1000,
modelatlas.waiting) before torch loads, so that its timings are those of ``atlas``. The variable is read once,
when torch loads libgomp: the import must come first."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "short_spin.py")


def check_first_import(path: Path) -> str:
    """The module name of the script's first import other than ``__future__``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            return node.names[0].name
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            return node.module
    return ""


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_imports_short_spin_first(path):
    assert check_first_import(path) == "short_spin"


def test_a_bench_script_sets_the_spin_count_before_torch_loads():
    # short_spin() leaves the variable unset once torch is loaded: "1000" means it ran before
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (f"import sys, os; sys.path.insert(0, {str(BENCH)!r}); import lineage_chain; "
            "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "1000"]
