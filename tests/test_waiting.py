"""modelatlas.waiting: OMP_WAIT_POLICY=PASSIVE for the command line, set only where it can still act. Each case
runs in a fresh interpreter: OpenMP reads the setting when torch loads it, and this process has torch."""

import os
import subprocess
import sys

import pytest


def check_policy(code: str, policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


SET = "import os; from modelatlas.waiting import passive_waits; print(passive_waits(), os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize("policy, expected", [(None, "True PASSIVE"), ("ACTIVE", "False ACTIVE")])
def test_passive_unless_the_user_chose(policy, expected):
    assert check_policy(SET, policy) == expected


def test_too_late_once_torch_is_loaded():
    assert check_policy("import torch; " + SET, None) == "False None"


def test_the_command_line_sets_it_before_a_command_runs():
    # 60 DSA iterations on a busy 2-core machine: 62-81 s spinning, 7.7-7.9 s passive (docs/benchmarks.md)
    code = ("import os, sys; from modelatlas.cli.main import main; main(['zoo', 'presets']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "PASSIVE"
