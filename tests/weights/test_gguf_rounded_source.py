"""A GGUF quantization of a model's own float32 values, tested against that model's float16 conversion.

llama.cpp's converter quantizes what the model stores (``--outtype q8_0`` from float32 or bfloat16), and its
float16 conversion rounds the same values: quantizing the float16 values again misses about a quarter of a
Q8_0 copy's codes, so the two conversions of one model were drawn as parent and fine-tune. Within float16's
rounding, every code is the level nearest to the float16 value.
"""

import numpy as np
import pytest
import torch
from tests.lineage.test_quantized import make_gguf

from modelatlas.lineage import recover_lineage
from modelatlas.weights import open_checkpoint
from modelatlas.weights.gguf_grid import grid_test

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def make_weights(seed, base=None, step=0.0):
    rng = np.random.default_rng(seed)
    out = {}
    for k in ("a.weight", "b.weight", "c.weight"):
        noise = rng.standard_normal((128, 128)).astype(np.float32)
        out[k] = noise if base is None else base[k] + step * noise
    return out


def make_conversion(path, weights, kind=None):
    """``weights`` as a float16 GGUF (``kind`` None) or quantized from float32 to ``kind``."""
    tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
    return make_gguf(path, tensors, kind or Q.Q8_0, plain=tuple(weights) if kind is None else ())


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q5_1])
def test_the_float16_conversion_of_the_source_matches_within_its_rounding(tmp_path, kind):
    p = make_weights(0)
    ck = open_checkpoint(make_conversion(tmp_path / "p-q.gguf", p, kind))
    half = torch.from_numpy(p["a.weight"]).half()
    assert ck.requantized_match("a.weight", half) == 1.0
    nudged = torch.from_numpy(make_weights(0, p, step=0.02)["a.weight"]).half()  # a fine-tune 2 % away
    assert ck.requantized_match("a.weight", nudged) < 0.99


def test_quantizing_the_float16_values_again_misses_many(tmp_path):
    """Why the rounding is allowed for: the exact test alone (what quantizing x again gives)."""
    p = make_weights(0)
    make_conversion(tmp_path / "p-q8.gguf", p, Q.Q8_0)
    again = gguf.quants.quantize(p["a.weight"].astype(np.float16).astype(np.float32), Q.Q8_0)
    stored = gguf.quants.quantize(p["a.weight"], Q.Q8_0)
    values = [gguf.quants.dequantize(q, Q.Q8_0) for q in (again, stored)]
    assert (values[0] != values[1]).mean() > 0.2  # a block whose float16 largest value rounded: all its values


def test_a_conversion_from_float32_hangs_below_the_float16_one(tmp_path):
    p = make_weights(0)
    kids = {f"ft{i}": make_weights(10 + i, p, step=0.05) for i in range(2)}
    for name, w in {"p": p, **kids}.items():
        make_conversion(tmp_path / f"{name}-f16.gguf", w)
    make_conversion(tmp_path / "p-q8.gguf", p, Q.Q8_0)
    make_conversion(tmp_path / "ft0-q4.gguf", kids["ft0"], Q.Q4_0)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    copies = {(e.parent, e.child) for e in forest.edges if e.kind == "precision"}
    assert copies == {("p-f16", "p-q8"), ("ft0-f16", "ft0-q4")}


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0])
def test_grid_position_tells_a_source_from_a_model_made_from_the_quantized_file(tmp_path, kind):
    p = make_weights(0)
    ck = open_checkpoint(make_conversion(tmp_path / "p-q.gguf", p, kind))
    assert 0.4 < ck.grid_position("a.weight", torch.from_numpy(p["a.weight"])) < 0.6
    merged = ck.read("a.weight") * (1 + 1e-4 * torch.randn(128, 128, generator=torch.Generator().manual_seed(1)))
    assert ck.grid_position("a.weight", merged) < 0.05  # llama-export-lora: a LoRA merged into the quantized base


def test_a_lora_merged_into_a_quantized_gguf_base_hangs_below_it(tmp_path):
    """The merge (the base's dequantized values plus a small update, written as F16) quantized back to the
    Q8_0 base's values, so the base was drawn as 'q8_0 copy of' the merge."""
    p = make_weights(0)
    base = open_checkpoint(make_conversion(tmp_path / "base-q8.gguf", p, Q.Q8_0))
    gen = np.random.default_rng(1)
    for i in range(2):
        merged = {k: base.read(k).numpy() + 1e-4 * gen.standard_normal((128, 128)).astype(np.float32) for k in p}
        make_conversion(tmp_path / f"merged{i}-f16.gguf", merged)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert not [e for e in forest.edges if e.kind == "precision"]
    assert forest.roots() == ["base-q8"]


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q5_1])
def test_the_stored_rows_are_dequantized_once_for_both_tests(tmp_path, kind, monkeypatch):
    """A float16 candidate missing some values is tested again within float16's rounding: the sampled stored
    rows were dequantized for each of the two tests. The share is the two tests' best, computed here apart."""
    p = make_weights(0)
    ck = open_checkpoint(make_conversion(tmp_path / "p-q.gguf", p, kind))
    raw = gguf.quants.quantize(p["a.weight"], kind)  # the stored rows: 128 of them, all sampled
    have, dequantize, stored = gguf.quants.dequantize(raw, kind), gguf.quants.dequantize, []

    def counted(rows, ggml_type):
        stored.append(np.array_equal(rows, raw))
        return dequantize(rows, ggml_type)

    monkeypatch.setattr(gguf.quants, "dequantize", counted)
    x = torch.from_numpy(make_weights(0, p, step=0.001)["a.weight"]).half()  # a fine-tune 0.1 % away
    share = ck.requantized_match("a.weight", x)
    assert sum(stored) == 1
    x32 = x.float()
    again = [np.mean(dequantize(gguf.quants.quantize(y.numpy(), kind), kind) == have)
             for y in (x32, x.to(torch.bfloat16).float())]
    grid = grid_test(kind.name, kind, raw, gguf.GGML_QUANT_SIZES[kind][1], have, rel_tol=2.0**-11, abs_tol=2.0**-25)
    assert share == max(*again, grid(x32.numpy())) < 1.0
