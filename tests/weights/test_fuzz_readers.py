"""Seeded mutation fuzzing of every checkpoint reader (the damage: tests/weights/fuzz_damage.py).

The promise (docs/weights.md): bad input -- a missing, truncated or corrupt file, a header that lies about sizes,
JSON of the wrong shape, a folder where a file belongs -- gives a one-line CheckpointError naming the file, never
another exception, a hang, or an allocation of what a lying header claims. Each case damages a fresh valid model
with its own seed (same seed, same damage), opens it, lists and reads every tensor.
"""

import random
from functools import partial

import pytest
from tests.weights.fuzz_damage import (
    check_cases,
    check_survives,
    make_case_seed,
    make_damage,
    make_fresh,
    make_gguf_model,
    make_legacy_torch_model,
    make_onnx_model,
    make_peft_model,
    make_quantized_model,
    make_safetensors_model,
    make_sharded_bin_model,
    make_sharded_model,
    make_torch_model,
)


def make_onnx_external(folder):
    return make_onnx_model(folder, external=True)


def make_peft_bin(folder):
    return make_peft_model(folder, "bin")


QUANTIZED = ("gptq", "awq", "pack-quantized", "fp8", "bnb4", "bnb8", "mlx")
FORMATS = {"safetensors": make_safetensors_model, "sharded": make_sharded_model, "torch": make_torch_model,
           "torch-legacy": make_legacy_torch_model, "sharded-bin": make_sharded_bin_model,
           "peft": make_peft_model, "peft-bin": make_peft_bin, "onnx": make_onnx_model,
           "onnx-external": make_onnx_external, "gguf": make_gguf_model,
           **{scheme: partial(make_quantized_model, scheme=scheme)
              for scheme in QUANTIZED}}
NEEDS = {"onnx": "onnx", "onnx-external": "onnx", "gguf": "gguf"}


def check_fuzzed(tmp_path, fmt: str, cases: range) -> dict:
    """Run ``cases`` seeded damages of ``fmt``'s model; every failure listed at once (seed, damage, what broke)."""
    if fmt in NEEDS:
        pytest.importorskip(NEEDS[fmt])

    def run_case(i: int):
        rng = random.Random(make_case_seed(fmt, i))
        model, files = make_fresh(tmp_path / "case", FORMATS[fmt])
        damaged = rng.choice(sorted(files))
        what = make_damage(rng, damaged, files[damaged])
        return what, lambda: check_survives(model, damaged, names_file=fmt not in QUANTIZED)
    return check_cases(fmt, cases, run_case, "read")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_damaged_models_read_or_are_refused_in_one_line(tmp_path, fmt):
    outcomes = check_fuzzed(tmp_path, fmt, range(25))
    assert outcomes["refused"] > 0  # the damage reached the checks (not all of it lands in tensor values)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_many_damaged_models_read_or_are_refused_in_one_line(tmp_path, fmt):
    check_fuzzed(tmp_path, fmt, range(25, 1025))
