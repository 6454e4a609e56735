"""Every bench script still runs as written in docs/benchmarks.md: its ``--help`` parses in one process, so
its imports of the library resolve and its argument parser builds (a renamed function or flag in the library
broke a script only when the benchmark was next run). One subprocess for all of them: torch loads once."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = {"short_spin.py", "zoo_mix.py"}  # imported by the scripts, no command line of their own

RUN_ALL = """
import json, runpy, sys
sys.path.insert(0, {bench!r})
failed = []
for path in {scripts!r}:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append([path, "exit " + str(e.code)])
    except BaseException as e:
        failed.append([path, repr(e)])
    else:
        failed.append([path, "returned without printing its help"])
sys.stderr.write("FAILED " + json.dumps(failed) + "\\n")
"""


def check_scripts_help(scripts: list[Path]) -> list[list[str]]:
    """[script, why] for each script whose ``--help`` did not exit 0."""
    code = RUN_ALL.format(bench=str(BENCH), scripts=[str(p) for p in scripts])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    line = [x for x in out.stderr.splitlines() if x.startswith("FAILED ")]
    assert line, out.stderr[-2000:]
    return json.loads(line[-1][len("FAILED "):])


def test_every_bench_script_answers_help():
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name not in MODULES)
    assert len(scripts) > 30
    assert check_scripts_help(scripts) == []


def test_a_script_that_fails_to_import_is_reported(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("from modelatlas.lineage import no_such_function\n")
    assert [p for p, _ in check_scripts_help([bad])] == [str(bad)]
