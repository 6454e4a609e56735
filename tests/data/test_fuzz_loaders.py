"""Seeded mutation fuzzing of every dataset loader (the damage: tests/data/fuzz_loaders_damage.py).

The promise (docs/data.md, "Errors"): a damaged dataset file -- truncated, flipped, empty, a folder in its place,
a header (IDX, gzip, PNG, JPEG, PGM, BMP) or a pickle opcode that lies about sizes -- gives a one-line AtlasError
naming the file, never another exception, a hang, or an allocation of what a lying header claims; a CIFAR batch
never calls a global but NumPy's array rebuilders (and only through checked stand-ins). Each case damages one file
of a fresh valid dataset with its own seed (same seed, same damage) and loads it: the dataset it gives must have
the expected form (shapes, float32 pixels in [0, 1], labels in range).
"""

import random
import shutil
from functools import partial

import pytest
from tests.data.fuzz_loaders_damage import (
    check_loads,
    make_cifar10_data,
    make_cifar100_data,
    make_damage,
    make_idx_data,
    make_image_data,
)
from tests.weights.fuzz_damage import check_cases, make_case_seed

FORMATS = {"idx": make_idx_data, "idx-gz": partial(make_idx_data, gz=True), "cifar10": make_cifar10_data,
           "cifar100": make_cifar100_data, "image-folder": make_image_data,
           "image-folder-gray": partial(make_image_data, channels=1)}


def check_fuzzed(tmp_path, fmt: str, cases: range) -> dict:
    """Run ``cases`` seeded damages of ``fmt``'s dataset; every failure listed at once (seed, damage, what broke)."""
    def run_case(i: int):
        rng = random.Random(make_case_seed(fmt, i))
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        made = FORMATS[fmt](folder)
        damaged = rng.choice(sorted(made.files))
        what = make_damage(rng, damaged, made.files[damaged])
        return what, lambda: check_unsafe_refused(check_loads(made, damaged), what)
    return check_cases(fmt, cases, run_case, "loaded")


def check_unsafe_refused(outcome: str, what: str) -> str:
    """``outcome``, asserting that a pickle calling a global NumPy's pickles never call was refused as unsafe,
    whatever the global names."""
    if " global " in what:
        assert "refused" in outcome, f"a global that is not NumPy's was not refused: {outcome!r}"
    return outcome


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_damaged_datasets_load_or_are_refused_in_one_line(tmp_path, fmt):
    outcomes = check_fuzzed(tmp_path, fmt, range(25))
    assert outcomes["refused"] > 0  # the damage reached the checks


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_many_damaged_datasets_load_or_are_refused_in_one_line(tmp_path, fmt):
    check_fuzzed(tmp_path, fmt, range(25, 1025))
