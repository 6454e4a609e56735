"""Quantized layers whose stored tensors do not fit together, or whose config contradicts them: each is
refused with one line naming the model and the tensor (a CheckpointError, when opened or when read), never
read into a wrong weight nor into a raw IndexError / ValueError."""

import json

import pytest
import torch
from tests.weights.conftest import make_bnb4, make_bnb8, make_gptq, make_mlx, make_pack_quantized

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.awq import save_folder


def make_weight(out: int = 64, inp: int = 128) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(0))


def make_gptq_with(**changes) -> dict:
    t = make_gptq(make_weight())
    for k, v in changes.items():
        t[f"layer.{k}"] = v(t[f"layer.{k}"])
    return {k: v for k, v in t.items() if v is not None}


def make_packed_with(**changes) -> dict:
    t = make_pack_quantized(make_weight())
    for k, v in changes.items():
        t[f"layer.weight_{k}"] = v(t[f"layer.weight_{k}"])
    return t


def make_fp8(scale: torch.Tensor, **extra) -> dict:
    w = make_weight()
    return {"layer.weight": (w / w.abs().max() * 400).to(torch.float8_e4m3fn), "layer.weight_scale": scale, **extra}


STATE = "layer.weight.quant_state.bitsandbytes__nf4"


def make_json(value) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def make_bnb4_with(nested: bool = False, state=None, **changes) -> dict:
    """A 4-bit layer (64 x 128, 128 blocks of 64) with stored parts changed (``changes``: role -> function of
    the tensor, None drops it) or its JSON state updated by ``state``."""
    t = make_bnb4(make_weight(), nested=nested)
    if state is not None:
        t[STATE] = make_json({**json.loads(bytes(t[STATE].tolist())), **state})
    for k, v in changes.items():
        name = "layer.weight" if k == "weight" else f"layer.weight.{k}"
        t[name] = v(t[name])
    return {k: v for k, v in t.items() if v is not None}


def make_bnb8_with(**changes) -> dict:
    t = {**make_bnb8(make_weight()), "layer.weight_format": torch.tensor(0, dtype=torch.uint8)}
    for k, v in changes.items():
        t[f"layer.{k}"] = v(t[f"layer.{k}"])
    return t


def make_mlx_with(**changes) -> dict:
    """An MLX 4-bit layer (64 x 128 in groups of 32: words (64, 16), scales (64, 4)) with parts changed."""
    t = make_mlx(make_weight(), bits=4, group=32, name="layer")
    for k, v in changes.items():
        t[f"layer.{k}"] = v(t[f"layer.{k}"])
    return t


MLX = {"quant_method": "mlx", "group_size": 32, "bits": 4}  # read from config.json's "quantization_config"


REFUSED_WHEN_OPENED = {
    "gptq without qzeros": (make_gptq_with(qzeros=lambda t: None), None,
                            r"layer.qweight and layer.g_idx make a GPTQ layer, but layer.qzeros is missing"),
    "gptq qzeros of another width": (make_gptq_with(qzeros=lambda t: t[:, :3]), None,
                                     r"layer.qzeros is int32 \(8, 3\), not the \(8, 8\) int32 words"),
    "gptq 3-D qweight": (make_gptq_with(qweight=lambda t: t[:, None]), None, r"layer.qweight int32 \(16, 1, 64\)"),
    "gptq float g_idx": (make_gptq_with(g_idx=lambda t: t.float()), None, "layer.g_idx is float32"),
    "gptq bits against the config": (make_gptq_with(), {"quant_method": "gptq", "bits": 8},
                                     "layer.qweight: its shape holds 4-bit values .* says bits 8"),
    "gptq marlin format": (make_gptq_with(), {"quant_method": "gptq", "checkpoint_format": "marlin"},
                           "quantization_config: checkpoint_format .marlin. is not read here"),
    "gptq autogptq marlin": (make_gptq_with(), {"quant_method": "gptq", "is_marlin_format": True},
                             r"quantization_config: checkpoint_format marlin \(is_marlin_format\) is not read here"),
    "negative weight_shape": (make_packed_with(shape=lambda t: torch.tensor([-64, 128])), None,
                              r"layer.weight_shape says \[-64, 128\], but layer.weight_packed \(64, 16\) holds 64"),
    "huge weight_shape": (make_packed_with(shape=lambda t: torch.tensor([10**12, 128])), None,
                          r"layer.weight_shape says \[1000000000000, 128\]"),
    "weight_shape of other columns": (make_packed_with(shape=lambda t: torch.tensor([64, 120])), None,
                                      "layer.weight_packed holds 16 words per row, which 120 columns of 1 to 8 bits do not fill"),
    "float weight_shape": (make_packed_with(shape=lambda t: t.float() + 0.5), None,
                           r"layer.weight_shape: float32 \(2,\), not the 2 integer sizes"),
    "long weight_shape": (make_packed_with(shape=lambda t: torch.zeros(10**5, dtype=torch.int64)), None,
                          r"layer.weight_shape: int64 \(100000,\)"),
    "scales of other rows": (make_packed_with(scale=lambda t: t[:32]), None,
                             r"layer.weight_scale is float32 \(32, 8\), not float scales of \(64, groups\)"),
    "bits against the config": (make_packed_with(), {"config_groups": {"g": {"weights": {"num_bits": 8}}}},
                                r"layer.weight_packed holds 16 words per row, which 128 columns of the \[8\] bits of the quantization_config do not fill"),
    "g_idx of other columns": (make_packed_with(**{"packed": lambda t: t}) | {
        "layer.weight_g_idx": torch.zeros(100, dtype=torch.int32)}, None, r"layer.weight_g_idx is int32 \(100,\)"),
    "no fp8 scales": (make_fp8(torch.ones(0)), None, r"layer.weight_scale \(0,\) for layer.weight \(64, 128\)"),
    "fp8 scales per row of other rows": (make_fp8(torch.ones(5)), None, r"layer.weight_scale \(5,\) for layer.weight \(64, 128\): 5 scales for 64 rows"),
    "int scales": (make_fp8(torch.ones(64, 1, dtype=torch.int32)), None, "layer.weight_scale is int32, not scales"),
    "zero points of another shape": (make_fp8(torch.ones(64, 1), **{"layer.weight_zero_point": torch.ones(3, 1)}),
                                     None, r"layer.weight_zero_point has shape \(3, 1\)"),
    "bnb4 state of a smaller shape": (make_bnb4_with(state={"shape": [64, 64]}), None,
                                      rf"layer.weight holds 4096 bytes, but {STATE} says shape \[64, 64\]: 2048 bytes"),
    "bnb4 state of a larger shape": (make_bnb4_with(state={"shape": [128, 128]}), None,
                                     rf"layer.weight holds 4096 bytes, but {STATE} says shape \[128, 128\]: 8192"),
    "bnb4 blocksize against absmax": (make_bnb4_with(state={"blocksize": 128}), None,
                                      rf"layer.weight.absmax holds 128 values, but {STATE}'s blocksize 128 makes 64 blocks"),
    "bnb4 absmax of other count": (make_bnb4_with(absmax=lambda t: t[:100]), None,
                                   "layer.weight.absmax holds 100 values, but .* makes 128 blocks"),
    "bnb4 quant_map of 8 values": (make_bnb4_with(quant_map=lambda t: t[:8]), None,
                                   r"layer.weight.quant_map is float32 \(8,\), not the 16 values of 4-bit codes"),
    "bnb4 bytes short of a storage word": (make_bnb4_with(weight=lambda t: t.reshape(-1)[:4090].view(torch.float16)), None,
                                           rf"layer.weight holds 4090 bytes, but {STATE} says shape"),
    "bnb4 bool bytes": (make_bnb4_with(weight=lambda t: t.bool()), None,
                        r"layer.weight is bool \(4096, 1\), not the bytes of 4-bit codes"),
    "bnb4 state no object": (make_bnb4_with(**{STATE.removeprefix("layer.weight."): lambda t: make_json([1, 2])}),
                             None, rf"{STATE}: the JSON quant state is a list, not an object"),
    "bnb4 state of floats": (make_bnb4_with(**{STATE.removeprefix("layer.weight."): lambda t: t.float()}), None,
                             rf"{STATE} is float32 \(\d+,\), not the uint8 bytes of a JSON quant state"),
    "bnb4 without absmax": (make_bnb4_with(absmax=lambda t: None), None,
                            rf"layer.weight and {STATE} make a bitsandbytes 4-bit layer, but layer.weight.absmax is missing"),
    "bnb4 nested absmax without its map": (make_bnb4_with(nested=True, nested_quant_map=lambda t: None), None,
                                           "layer.weight.nested_absmax is stored without layer.weight.nested_quant_map"),
    "bnb4 nested map without its absmax": (make_bnb4_with(nested=True, nested_absmax=lambda t: None), None,
                                           "layer.weight.nested_quant_map is stored without layer.weight.nested_absmax"),
    "bnb4 uint8 absmax not nested": (make_bnb4_with(absmax=lambda t: t.to(torch.uint8)), None,
                                     r"layer.weight.absmax is uint8 \(128,\): 8-bit codes of double quantization, but "
                                     "layer.weight.nested_absmax and layer.weight.nested_quant_map are missing"),
    "bnb4 nested blocksize against nested absmax": (make_bnb4_with(nested=True, state={"nested_blocksize": 64}), None,
                                                    "layer.weight.nested_absmax holds 1 values, but .*nested_blocksize 64 "
                                                    "makes 2 blocks of the 128 absmax codes"),
    "bnb4 NaN nested_offset": (make_bnb4_with(nested=True, state={"nested_offset": float("nan")}), None,
                               rf"{STATE}: 'nested_offset' nan is no finite number"),
    "bnb4 nested map of 300 values": (make_bnb4_with(nested=True, nested_quant_map=lambda t: torch.zeros(300)), None,
                                      r"layer.weight.nested_quant_map is float32 \(300,\), not a book of up to 256 values"),
    "bnb8 SCB of other rows": (make_bnb8_with(SCB=lambda t: t[:32]), None,
                               r"layer.SCB is float32 \(32,\), not one scale for each of the 64 rows of layer.weight"),
    "bnb8 one SCB": (make_bnb8_with(SCB=lambda t: t[:1]), None, r"layer.SCB is float32 \(1,\), not one scale"),
    "bnb8 int SCB": (make_bnb8_with(SCB=lambda t: t.int()), None, r"layer.SCB is int32 \(64,\), not one scale"),
    "bnb8 1-D weight": (make_bnb8_with(weight=lambda t: t.reshape(-1)), None,
                        r"layer.weight is int8 \(8192,\), not the \(rows, columns\) matrix of an LLM.int8 layer"),
    "bnb8 col32 format": (make_bnb8_with(weight_format=lambda t: t + 1), None,
                          r"layer.weight_format is 1 \(col32\): only the row format \(0\) is read"),
    "mlx float bits": (make_mlx_with(), {**MLX, "bits": 4.0}, r"layer.weight: uint32 codes .* \(bits 4.0, group_size 32\)"),
    "mlx per-layer entry without bits": (make_mlx_with(), {**MLX, "layer": {"group_size": 32}},
                                         r"layer.weight: uint32 codes .* but its entry 'layer' in the config.json's "
                                         r"quantization names no bits .* \(bits None, group_size 32\)"),
    "mlx per-layer entry false": (make_mlx_with(), {**MLX, "layer": False},
                                  "layer.weight: uint32 codes .* but its entry 'layer' in the config.json's quantization "
                                  "is false: no settings of a quantized layer"),
    "mlx bits against the words": (make_mlx_with(), {**MLX, "bits": 8},
                                   r"layer.weight \(64, 16\) does not hold 8-bit codes for layer.scales \(64, 4\)"),
    "mlx biases of another shape": (make_mlx_with(biases=lambda t: t[:, :2]), MLX,
                                    r"layer.weight \(64, 16\) does not hold 4-bit codes .* layer.biases \(64, 2\)"),
    "mlx int scales": (make_mlx_with(scales=lambda t: t.int()), MLX, r"layer.scales is int32, not float scales"),
}


@pytest.mark.parametrize("case", list(REFUSED_WHEN_OPENED))
def test_parts_that_do_not_fit_are_refused_when_opened(tmp_path, case):
    tensors, config, message = REFUSED_WHEN_OPENED[case]
    folder = save_folder(tmp_path / "m", tensors, config)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'm'}: quantized layers: {message}"):
        open_checkpoint(folder)


REFUSED_WHEN_READ = {
    "negative g_idx": (make_gptq_with(g_idx=lambda t: t - 5), r"layer.g_idx holds group numbers -5..2, but there are 8"),
    "g_idx past the groups": (make_gptq_with(g_idx=lambda t: t + 100), "layer.g_idx holds group numbers 100..107"),
    "NaN gptq scale": (make_gptq_with(scales=lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
                       "layer.scales holds NaN or infinite scales"),
    "inf packed scale": (make_packed_with(scale=lambda t: t.index_fill(1, torch.tensor([2]), float("inf"))),
                         "layer.weight_scale holds NaN or infinite scales"),
    "NaN fp8 scale": (make_fp8(torch.full((64, 1), float("nan"))), "layer.weight_scale holds NaN"),
    "NaN bnb4 absmax": (make_bnb4_with(absmax=lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
                        "layer.weight.absmax holds NaN or infinite scales"),
    "inf nested absmax": (make_bnb4_with(nested=True, nested_absmax=lambda t: t.fill_(float("inf"))),
                          "layer.weight.nested_absmax holds NaN or infinite scales"),
    "NaN bnb4 quant_map": (make_bnb4_with(quant_map=lambda t: t.index_fill(0, torch.tensor([2]), float("nan"))),
                           "layer.weight.quant_map holds NaN or infinite values"),
    "NaN nested quant_map": (make_bnb4_with(nested=True, nested_quant_map=lambda t: t.fill_(float("nan"))),
                             "layer.weight.nested_quant_map holds NaN or infinite values"),
    "code past the nested map": (make_bnb4_with(nested=True, nested_quant_map=lambda t: t[:16]),
                                 r"layer.weight.absmax holds codes up to \d+, but layer.weight.nested_quant_map has 16 values"),
    "NaN SCB": (make_bnb8_with(SCB=lambda t: t.index_fill(0, torch.tensor([5]), float("nan"))), "layer.SCB holds NaN"),
    "inf mlx scales": (make_mlx_with(scales=lambda t: t.index_fill(1, torch.tensor([1]), float("inf"))),
                       "layer.scales holds NaN or infinite scales"),
    "NaN mlx biases": (make_mlx_with(biases=lambda t: t.index_fill(1, torch.tensor([1]), float("nan"))),
                       "layer.biases holds NaN or infinite"),
}


@pytest.mark.parametrize("case", list(REFUSED_WHEN_READ))
def test_values_that_do_not_fit_are_refused_when_read(tmp_path, case):
    tensors, message = REFUSED_WHEN_READ[case]
    with open_checkpoint(save_folder(tmp_path / "m", tensors, MLX if "mlx" in case else None)) as ck:
        for check in (lambda: ck.read("layer.weight"), lambda: ck.requantized_match("layer.weight", make_weight())):
            with pytest.raises(CheckpointError, match=f"^{tmp_path / 'm'}: cannot dequantize 'layer.weight' "
                                                      rf"\([A-Z0-9-]+\): {message}"):
                check()


def test_a_quantization_config_that_is_no_object_is_named(tmp_path):
    folder = save_folder(tmp_path / "m", make_gptq(make_weight()))
    (folder / "config.json").write_text(json.dumps({"quantization_config": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"m/config.json: quantization_config is a JSON list, not an object"):
        open_checkpoint(folder)


def test_mx_scales_are_powers_of_two(tmp_path):
    w = make_weight()
    exponents = torch.full((64, 4), 120, dtype=torch.uint8)  # E8M0: 2 ** (120 - 127) per 32 columns
    folder = save_folder(tmp_path / "mx", {"layer.weight": w.to(torch.float8_e4m3fn), "layer.weight_scale": exponents})
    with open_checkpoint(folder) as ck:
        assert torch.equal(ck.read("layer.weight"), w.to(torch.float8_e4m3fn).float() / 128)


def test_a_stacked_experts_packing_stays_as_stored(tmp_path):
    t = make_pack_quantized(make_weight())
    t = {"e.weight_packed": t["layer.weight_packed"][None].expand(2, -1, -1),
         "e.weight_scale": t["layer.weight_scale"][None].expand(2, -1, -1), "e.weight_shape": torch.tensor([2, 64, 128])}
    with open_checkpoint(save_folder(tmp_path / "moe", t)) as ck:
        assert "e.weight_packed" in ck.keys()  # not read here: lineage skips the model, saying why


@pytest.mark.parametrize("storage", [torch.int8, torch.bfloat16, torch.float32])
def test_a_4bit_layer_stored_in_another_dtype_reads_its_bytes(tmp_path, storage):
    """bitsandbytes' ``bnb_4bit_quant_storage`` (bfloat16 for FSDP QLoRA) keeps the same bytes viewed as
    another dtype: read as those bytes, not as bfloat16 numbers (which read NaN and got the model skipped)."""
    plain = make_bnb4_with(nested=True)
    viewed = {**plain, "layer.weight": plain["layer.weight"].reshape(-1).view(storage).reshape(-1, 1)}
    with open_checkpoint(save_folder(tmp_path / "u8", plain)) as a, open_checkpoint(save_folder(tmp_path / "v", viewed)) as b:
        assert b.quantization("layer.weight") == "NF4" and [t.name for t in b.tensors()] == ["layer.weight"]
        assert torch.equal(a.read("layer.weight"), b.read("layer.weight"))
        assert b.requantized_match("layer.weight", a.read("layer.weight")) == 1.0


def test_stacked_mlx_experts_read_as_one_weight_per_expert(tmp_path):
    """mlx-lm quantizes a mixture of experts' stacked (experts, out, in) weights (SwitchLinear) along the last
    dim: read as (experts, out, in), expert by expert as a 2-D layer reads; it refused the whole model."""
    w = torch.stack([make_weight(), 2 * make_weight()])  # (2, 64, 128)
    one = [make_mlx(e, bits=4, group=32, name="layer") for e in w]
    stacked = {k: torch.stack([one[0][k], one[1][k]]) for k in one[0]}
    with open_checkpoint(save_folder(tmp_path / "moe", stacked, MLX)) as ck, \
            open_checkpoint(save_folder(tmp_path / "e1", one[1], MLX)) as e1:
        assert [(t.name, t.shape) for t in ck.tensors()] == [("layer.weight", (2, 64, 128))]
        assert torch.equal(ck.read("layer.weight")[1], e1.read("layer.weight"))
        assert ck.requantized_match("layer.weight", w) == 1.0
