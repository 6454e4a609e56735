"""Seeded mutation fuzzing of the files modelatlas writes and reads back (the artifacts and their damage:
tests/cli/fuzz_outputs.py, the byte and JSON damage of tests/weights/fuzz_damage.py).

The promise (README, docs/probex.md, docs/atlas.md, docs/distill.md, docs/lineage.md): an experts folder, an
atlas, a distillation result or checkpoint, a zoo manifest or forest JSON, an interrupted attribution damaged on
disk, by a killed run or by a hand edit is read with success or refused with one error line naming the damaged file (exit code 1), the
folder left as it was; a damaged checkpoint is never resumed into another result than the run never stopped.
Each case damages one file of a fresh copy with its own seed (same seed, same damage) and runs a command that
reads it through ``atlas``'s entry point.
"""

import random

import pytest
from tests.cli.fuzz_outputs import (
    ARTIFACTS,
    check_reads_back,
    check_resumed,
    make_built,
    make_case,
    make_readers,
)
from tests.weights.fuzz_damage import check_cases, make_case_seed, make_damage

FEW = {"attribution": 10}  # a resume retrains up to 17 clusters: ~0.7 s a case
MANY = {"attribution": 50}  # under -m slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tmp_path_factory.mktemp("built")  # each artifact's pieces are built on first use (make_built)


def check_fuzzed(built, case, artifact: str, cases: range) -> dict:
    """Run ``cases`` seeded damages of ``artifact``; every failure listed at once (seed, damage, what broke)."""
    make_built(built, artifact)

    def run_case(i: int):
        rng = random.Random(make_case_seed(artifact, i))
        copy, files = make_case(built, case, artifact)
        damaged = rng.choice(sorted(files))
        what = make_damage(rng, damaged, files[damaged])
        argv = rng.choice(make_readers(artifact, built, copy))
        return f"{what}) (atlas {' '.join(argv[:2])}", lambda: check_read_back(artifact, argv, copy, damaged, built)
    return check_cases(artifact, cases, run_case, "ok")


def check_read_back(artifact: str, argv: list, copy, damaged, built) -> str:
    """The command's outcome on the damaged copy; a resume that went on must equal a run never stopped."""
    outcome = check_reads_back(argv, copy, damaged)
    if artifact in ("resume", "attribution") and outcome == "ok":
        check_resumed(artifact, copy, built)
    return outcome


@pytest.mark.parametrize("artifact", sorted(ARTIFACTS))
def test_damaged_outputs_are_read_or_refused_in_one_line(built, tmp_path, artifact):
    outcomes = check_fuzzed(built, tmp_path / "case", artifact, range(FEW.get(artifact, 25)))
    assert outcomes["refused"] > 0  # the damage reached the checks


@pytest.mark.slow
@pytest.mark.parametrize("artifact", sorted(ARTIFACTS))
def test_many_damaged_outputs_are_read_or_refused_in_one_line(built, tmp_path, artifact):
    # 100 more a artifact (50 resumed attributions): a few minutes in CI; session 40 ran ~26,700 by script
    check_fuzzed(built, tmp_path / "case", artifact, range(25, 25 + MANY.get(artifact, 100)))
