"""AutoAWQ GEMM checkpoints (``quant_method: awq``) read as float weights.

A word packs 8 output columns, nibble i holding column (0, 2, 4, 6, 1, 3, 5, 7)[i]: 0x76543210 (nibble i = i)
reads as columns 0, 4, 1, 5, 2, 6, 3, 7. The packer (``modelatlas.zoo.awq.awq_layer``) follows the format
description; the reader was checked value for value against AutoAWQ's own ``dequantize_gemm`` on random words
(bench/lineage_packed.py --autoawq, docs/benchmarks.md session 30).
"""

import pytest
import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights import awq as A
from modelatlas.weights import open_checkpoint
from modelatlas.weights import packed_ints as P
from modelatlas.zoo.awq import awq_layer, save_folder

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm", "zero_point": True}


def make_word(value: int) -> torch.Tensor:
    return torch.tensor([[value - (1 << 32) if value >= 1 << 31 else value]], dtype=torch.int32)  # (1, 1)


def make_model(folder, tensors: dict, config: dict | None = AWQ):
    return save_folder(folder, tensors, config)


def make_weight(out: int = 64, inp: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_words_unpack_in_awq_column_order():
    assert A.unpack_columns(make_word(0x76543210)).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


def test_weight_is_codes_minus_zero_times_scale_transposed():
    qweight = torch.cat([make_word(0x76543210), make_word(0)])  # (in 2, out 8 / 8)
    zeros, scales = make_word(0x22222222), torch.full((1, 8), 0.5).half()  # one group: zero 2, scale 0.5
    w = A.awq_weight(qweight, zeros, scales, group=2)
    assert w.shape == (8, 2)  # (out, in)
    assert w[:, 0].tolist() == [-1.0, 1.0, -0.5, 1.5, 0.0, 2.0, 0.5, 2.5]  # (code - 2) * 0.5, codes 0 4 1 5 2 6 3 7
    assert w[:, 1].tolist() == [-1.0] * 8


def test_an_awq_model_reads_dequantized_and_rounds_back(tmp_path):
    w = make_weight()
    with open_checkpoint(make_model(tmp_path / "m", {**awq_layer(w), "norm.weight": torch.ones(32)})) as ck:
        assert sorted((t.name, t.shape) for t in ck.tensors()) == [("layer.weight", (64, 32)), ("norm.weight", (32,))]
        assert ck.quantization("layer.weight") == ck.quantization("layer.qweight") == "AWQ-INT4"
        assert ck.quantization("layer.scales") is None and ck.layer_of("layer.qzeros") == "layer.weight"
        got, step = ck.read("layer.weight"), ck.inner.read("layer.scales").float().T.repeat_interleave(16, 1)
        assert ((got - w).abs() <= step * 0.505).all()  # the nearest level (a float16 scale: +-0.05 % of 7.5 steps)
        assert ck.requantized_match("layer.weight", w) == ck.grid_match("layer.weight", w) == 1.0
        assert ck.grid_match("layer.weight", w + 0.01 * make_weight(seed=1)) < 0.999  # a fine-tune 1 % away
        assert torch.equal(ck.rounding_variance("layer.weight"), step.square() / 12)
        assert ck.grid_position("layer.weight", got) == 0.0 and 0.4 < ck.grid_position("layer.weight", w) < 0.6


def test_a_clipped_value_sits_at_its_groups_highest_code(tmp_path):
    """AutoAWQ clips a group's range before rounding; the zero rounded (and the float16 scale), the clipped
    top may round to code 14, not 15: grid_match lets each group's extremes take what lies beyond them."""
    w = make_weight(seed=2)
    ck = open_checkpoint(make_model(tmp_path / "m", awq_layer(w, clip=0.7)))
    codes = A.unpack_columns(ck.inner.read("layer.qweight")).T.reshape(64, 2, 16)  # (out, groups, 16 inputs)
    assert bool((codes.amax(-1) == 14).any())  # such groups are there
    assert ck.grid_match("layer.weight", w) == 1.0


def test_on_grid_takes_values_beyond_a_groups_highest_code():
    scaled, zero, code = torch.tensor([8.3]), torch.tensor([7.0]), torch.tensor([14])  # 15.3 stored as 14
    assert not P.on_grid(scaled, zero, code, 4, 0.0).item()  # rounding gives 15
    assert P.on_grid(scaled, zero, code, 4, 0.0, top=torch.tensor([14])).item()  # 14 is its group's top


def test_the_sum_with_the_zero_rounded_in_bfloat16():
    scaled, zero, code = torch.tensor([7.51]), torch.tensor([7.0]), torch.tensor([14])  # 14.51: 14.5 in bfloat16
    assert not P.on_grid(scaled, zero, code, 4, 0.0).item()
    assert P.on_grid(scaled, zero, code, 4, 0.0, tol_sum=2.0**-8).item()  # up to 14.51 * 2^-8 = 0.057 taken


@pytest.mark.parametrize("config, message", [
    ({**AWQ, "version": "gemv"}, r"AWQ version 'gemv' is not read here .*; AutoAWQ's gemm is"),
    ({**AWQ, "backend": "llm-awq"}, r"AWQ version 'gemm', backend 'llm-awq' is not read here"),
    ({**AWQ, "bits": 8}, r"AWQ with bits 8; only AutoAWQ's 4-bit packing is read"),
    ({**AWQ, "group_size": 8}, r"layer.scales holds 2 groups for 32 inputs \(16 each\), but the quantization_config "
                               r"says group_size 8"),
])
def test_what_is_not_read_is_refused_naming_it(tmp_path, config, message):
    with pytest.raises(CheckpointError, match=f"quantized layers: quantization_config: {message}|{message}"):
        open_checkpoint(make_model(tmp_path / "m", awq_layer(make_weight()), config))


@pytest.mark.parametrize("part, change, message", [
    ("layer.qzeros", None, r"layer.qweight is an AWQ layer's words, but layer.qzeros is missing"),
    ("layer.scales", lambda t: t[:, :8], r"layer.scales is float16 \(2, 8\), not the \(groups, 64\) float scales"),
    ("layer.qzeros", lambda t: t[:1], r"layer.qzeros is int32 \(1, 8\), not the \(2, 8\) int32 words"),
    ("layer.scales", lambda t: torch.cat([t, t[:1]]), r"layer.scales holds 3 groups of scales, which do not divide"),
])
def test_parts_that_do_not_fit_are_refused(tmp_path, part, change, message):
    tensors = awq_layer(make_weight())
    if change is None:
        del tensors[part]
    else:
        tensors[part] = change(tensors[part])
    with pytest.raises(CheckpointError, match=f"quantized layers: {message}"):
        open_checkpoint(make_model(tmp_path / "m", tensors))


def test_without_the_awq_config_the_words_stay_as_stored(tmp_path):
    ck = open_checkpoint(make_model(tmp_path / "m", awq_layer(make_weight()), None))
    assert "layer.qweight" in ck.keys() and ck.grid_match("layer.qweight", make_weight()) is None


def test_a_nan_scale_is_refused_when_read(tmp_path):
    tensors = awq_layer(make_weight())
    tensors["layer.scales"][1, 3] = float("nan")
    with open_checkpoint(make_model(tmp_path / "m", tensors)) as ck:
        with pytest.raises(CheckpointError, match=r"cannot dequantize 'layer.weight' \(AWQ-INT4\): layer.scales "
                                                  "holds NaN or infinite scales"):
            ck.read("layer.weight")
