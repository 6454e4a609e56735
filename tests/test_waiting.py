"""modelatlas.waiting: GOMP_SPINCOUNT=1000 for the command line, set only where it can still act and the user
has not chosen. Each case runs in a fresh interpreter: OpenMP reads the setting when torch loads it, and this
process has torch."""

import os
import subprocess
import sys

import pytest


def check_env(code: str, **env_set: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_set)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


SET = "import os; from modelatlas.waiting import short_spin; print(short_spin(), os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize("env, expected", [({}, "True 1000"), ({"GOMP_SPINCOUNT": "300000"}, "False 300000"),
                                           ({"OMP_WAIT_POLICY": "ACTIVE"}, "False None")])
def test_a_short_spin_unless_the_user_chose(env, expected):
    assert check_env(SET, **env) == expected


def test_too_late_once_torch_is_loaded():
    assert check_env("import torch; " + SET) == "False None"


def test_the_command_line_sets_it_before_a_command_runs():
    # 30 DSA iterations, two jobs on 2 cores: 9.8-13.6 s each with libgomp's default spin, 5.5-6.0 s with 1000
    code = ("import os, sys; from modelatlas.cli.main import main; main(['zoo', 'presets']); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    assert check_env(code).splitlines()[-1] == "1000"
