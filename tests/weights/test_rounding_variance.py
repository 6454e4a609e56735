"""Checkpoint.rounding_variance of dequantized layers: the variance of each value's rounding error, whose sum
over a layer lineage takes off squared distances (a quantized copy standing in for its absent model).

Each format quantizes a 256 x 512 weight (Gaussian, and Laplace for heavier tails) and the mean variance is
held to the mean squared error the reading shows. Measured mean(var) / mean(err**2), Gaussian / Laplace
(/ Student-t, 5 degrees of freedom): GPTQ-INT4 (groups of 128) 0.983 / 1.004 / 0.982, GPTQ-INT8 0.983 / 0.984
/ 0.988, pack-quantized INT4 (128) 1.007 / 1.033 / 1.006, FP8 e4m3 1.005 / 0.999 / 1.006, e5m2 0.998 / 0.994
/ 0.992, INT8 with scales 1.005 / 1.003 / 1.000, NF4 1.002 / 1.009 / 0.996 (double quantized 1.002 / 1.008 /
0.994), FP4 1.008 / 1.000 / 0.986, LLM.int8 1.005 / 1.003 / 1.000, MLX 4-bit (64) 0.987 / 1.008 / 0.997: the
tolerance is 5 %. What is left on evenly spaced levels is mostly each group's extreme value, which a quantizer
puts at a known place where step**2 / 12 takes it as anywhere within a step: half a step off the largest level
on GPTQ's symmetric grid (its square 3 times the mean: the sum some 2 / group low, 6 % for groups of 32), right
on a level for this pack-quantized packer's (scale absmax / 7: 1 / group high, 3 % for 32) and MLX's. With
Student-t tails of 3 degrees of freedom (no finite kurtosis: one value can set a group's scale, the others
sit within a step of 0) the 4-bit formats read 5-27 % high, FP8 and 8-bit under 2.5 %.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import (
    FP4,
    NF4,
    make_bnb4,
    make_bnb8,
    make_gptq,
    make_mlx,
    make_pack_quantized,
)

from modelatlas.weights import bnb as B
from modelatlas.weights import mlx_affine as M
from modelatlas.weights import open_checkpoint
from modelatlas.weights import packed_ints as P
from modelatlas.weights.scaled import scaled_variance

TOLERANCE = 0.05  # the worst measured: 3.3 % (module docstring)


def make_model(folder, tensors: dict, config: dict | None = None):
    """A folder of ``model.safetensors`` holding ``tensors``, and ``config`` as its config.json."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def scaled(x: torch.Tensor, dtype: torch.dtype) -> dict:
    """float8 / int8 ``layer.weight`` with one scale per row, its largest |value| on the type's largest."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else 127
    scale = x.abs().amax(1, keepdim=True) / top  # (rows, 1)
    q = x / scale
    return {"layer.weight": q.to(dtype) if dtype.is_floating_point else torch.round(q).to(dtype),
            "layer.weight_scale": scale}


FORMATS = {  # name -> (x -> (tensors of layer.weight, config.json))
    "gptq4": lambda x: (make_gptq(x, group=128), {"quantization_config": {"quant_method": "gptq", "bits": 4}}),
    "gptq8": lambda x: (make_gptq(x, bits=8, group=128), {"quantization_config": {"quant_method": "gptq", "bits": 8}}),
    "int4": lambda x: (make_pack_quantized(x, group=128), None),
    "fp8-e4m3": lambda x: (scaled(x, torch.float8_e4m3fn), None),
    "fp8-e5m2": lambda x: (scaled(x, torch.float8_e5m2), None),
    "int8": lambda x: (scaled(x, torch.int8), None),
    "nf4": lambda x: (make_bnb4(x, book=NF4), None),
    "nf4-nested": lambda x: (make_bnb4(x, book=NF4, nested=True), None),
    "fp4": lambda x: (make_bnb4(x, book=FP4, quant_type="fp4"), None),
    "llm-int8": lambda x: (make_bnb8(x), None),
    "mlx4": lambda x: (make_mlx(x, group=64, name="layer"), {"quantization": {"group_size": 64, "bits": 4}}),
}


def sources() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    e = torch.empty(2, 256, 512).exponential_(generator=g)
    return {"gauss": torch.randn(256, 512, generator=g), "laplace": e[0] - e[1]}  # Laplace: kurtosis 6


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_variance_sums_to_the_rounding_error(tmp_path, fmt):
    for kind, x in sources().items():
        tensors, config = FORMATS[fmt](x)
        tensors["norm.weight"] = torch.ones(512)
        with open_checkpoint(make_model(tmp_path / kind, tensors, config)) as ck:
            var = ck.rounding_variance("layer.weight")
            assert var.shape == x.shape and var.dtype == torch.float32
            err = (ck.read("layer.weight") - x).square().mean()
            assert abs(float(var.mean() / err) - 1) < TOLERANCE, (kind, float(var.mean() / err))
            assert ck.rounding_variance("norm.weight") is None  # not quantized
            assert ck.rounding_variance("nope") is None
            hidden = [t.name for t in ck.stored_tensors() if t.name not in ("layer.weight", "norm.weight")]
            assert all(ck.rounding_variance(h) is None for h in hidden)  # scales, zeros: no layer of their own


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_larger_scale_gives_a_larger_variance(tmp_path, fmt):
    x = sources()["gauss"]
    x[128:] *= 4  # the second half of the rows: 4 times the scale, 16 times the variance
    tensors, config = FORMATS[fmt](x)
    var = open_checkpoint(make_model(tmp_path / "m", tensors, config)).rounding_variance("layer.weight")
    ratio = float(var[128:].mean() / var[:128].mean())
    assert 15 < ratio < 17, ratio


def test_a_hand_checked_group(tmp_path):
    """One row of 4 values, 4-bit codes with the scale 0.5: levels 0.5 apart, 0.5**2 / 12 everywhere."""
    layer = {"layer.weight_packed": P.pack(torch.tensor([[0, 3, 9, 15]]), 4, 1),
             "layer.weight_scale": torch.tensor([[0.5]]), "layer.weight_shape": torch.tensor([1, 4])}
    four_bits = {"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 4}}}}}
    ck = open_checkpoint(make_model(tmp_path / "m", layer, four_bits))
    assert ck.read("layer.weight").tolist() == [[-4.0, -2.5, 0.5, 3.5]]  # 0.5 * (code - 8)
    assert ck.rounding_variance("layer.weight")[0].tolist() == pytest.approx([0.5**2 / 12] * 4)
    gptq = P.gptq_variance(torch.tensor([[0.5, 2.0], [1.0, 1.0]]), torch.tensor([0, 0, 1]))  # (out 2, in 3)
    assert gptq.flatten().tolist() == pytest.approx([0.25 / 12, 0.25 / 12, 1 / 12, 4 / 12, 4 / 12, 1 / 12])
    int8 = B.rounding_variance_int8(torch.tensor([127.0, 254.0]), (2, 3))  # SCB / 127: steps of 1 and 2
    assert int8.flatten().tolist() == pytest.approx([1 / 12] * 3 + [4 / 12] * 3)
    assert M.rounding_variance(torch.full((2, 1, 3), 0.5), 2).shape == (2, 1, 6)  # stacked experts too


def test_each_blocks_absmax_is_exact():
    # blocks of 2: [end, inner], [end, end], [end + a padded value]: k = 1, 2, 1 values on an end level
    at_end = torch.tensor([True, False, True, True, True])
    assert B._inexact_share(at_end, 2).tolist() == [0.0, 1.0, 0.5, 0.5, 0.0]


def test_chunks_give_the_same_variance(tmp_path):
    x = sources()["laplace"][:64, :128]
    tensors, config = FORMATS["nf4"](x)
    ck = open_checkpoint(make_model(tmp_path / "b", tensors, config))
    parts, state = ck._parts(ck.layers["layer.weight"]), ck.layers["layer.weight"].state  # parsed on opening
    whole = B.rounding_variance_4bit(parts["weight"], parts["absmax"], parts["quant_map"], state)
    assert torch.equal(B.rounding_variance_4bit(parts["weight"], parts["absmax"], parts["quant_map"], state, chunk=256),
                       whole)
    counts, seen = B._code_counts(parts["weight"], x.numel(), 16)
    assert seen == x.numel() and int(counts.sum()) == x.numel()  # a small layer: every code counted
    some, seen = B._code_counts(parts["weight"], x.numel(), 16, sample=2048)  # every 4th byte: 2048 codes
    assert seen == 2048 and (some / seen - counts / x.numel()).abs().max() < 0.03
    stored = scaled(x, torch.float8_e4m3fn)
    one_go = scaled_variance(stored["layer.weight"], stored["layer.weight_scale"])
    assert torch.equal(scaled_variance(stored["layer.weight"], stored["layer.weight_scale"], chunk=300), one_go)
    scales, g_idx = torch.rand(4, 64), torch.arange(128) // 32
    assert torch.equal(P.gptq_variance(scales, g_idx, chunk=7), P.gptq_variance(scales, g_idx))


def test_float8_levels_are_finer_below_a_power_of_two():
    """A float8 value 1.0 (e4m3: 0.125 apart above it, 0.0625 below) with an even density around (values in
    proportion to the cells' widths, 0.0625, 0.09375, 0.125): its cell reaches 0.0625 up and 0.03125 down,
    (a**2 - a*b + b**2) / 3 of the half gaps, not (0.125)**2 / 12."""
    values = torch.tensor([[0.9375] * 8 + [1.0] * 12 + [1.125] * 16]).to(torch.float8_e4m3fn)
    var = scaled_variance(values, torch.tensor([[2.0]]))
    a, b = 0.03125, 0.0625
    assert float(var[0, 8]) == pytest.approx(4 * (a * a - a * b + b * b) / 3)  # scale 2: times 4
    assert float(var[0, 0]) == pytest.approx(4 * 0.0625**2 / 12)  # 0.9375: 0.0625 either side
