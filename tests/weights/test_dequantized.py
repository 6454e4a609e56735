"""Checkpoints of packed or scaled layers (GPTQ, compressed-tensors, float8 with scales) read as float weights.

The files are written here by small packers that follow each format's layout (lowest bits first; GPTQ
transposed, zeros stored minus one). The reader was also checked value for value against compressed-tensors'
own decompression of real llm-compressor models (docs/benchmarks.md, "Packed and scaled checkpoints").
"""


import pytest
import torch
from tests.weights.conftest import (
    NF4,
    make_bnb4,
    make_bnb8,
    make_byte_counter,
    make_gptq,
    make_mlx,
    make_pack_quantized,
)

from modelatlas.errors import CheckpointError
from modelatlas.weights import bnb as B
from modelatlas.weights import open_checkpoint
from modelatlas.weights.dequantized import DequantizedCheckpoint
from modelatlas.weights.packed_ints import pack, unpack
from modelatlas.zoo import awq as Z
from modelatlas.zoo.awq import save_folder


def make_weight(out: int = 8, inp: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_gptq_layers_read_as_float_weights(tmp_path):
    w = make_weight()
    folder = save_folder(tmp_path / "m", {**make_gptq(w), "norm.weight": torch.ones(8)},
                        {"quant_method": "gptq", "bits": 4})
    with open_checkpoint(folder) as ck:
        assert isinstance(ck, DequantizedCheckpoint) and ck.name == "m"
        assert sorted((t.name, t.shape, t.dtype) for t in ck.tensors()) == [
            ("layer.weight", (8, 32), "float32"), ("norm.weight", (8,), "float32")]  # the parts are hidden
        got = ck.read("layer.weight")
        step = ck.inner.read("layer.scales").float().T.repeat_interleave(16, 1)  # (out, in)
        assert ((got - w).abs() <= step * 0.505).all()  # the nearest point (a float16 scale: 7.5 steps +-0.05 %)
        assert ck.quantization("layer.weight") == "GPTQ-INT4" and ck.quantization("norm.weight") is None
        assert len(ck.stored_tensors()) == 5  # the parameter count is of what is stored


def test_gptq_v2_format_uses_the_zeros_as_stored(tmp_path):
    w = make_weight()
    v1 = save_folder(tmp_path / "v1", make_gptq(w))  # no config: the gptq format
    v2 = save_folder(tmp_path / "v2", make_gptq(w, zero_offset=0), {"quant_method": "gptq", "checkpoint_format": "gptq_v2"})
    assert torch.equal(open_checkpoint(v1).read("layer.weight"), open_checkpoint(v2).read("layer.weight"))


def test_gptq_parts_under_an_awq_config_and_three_bit_layers_stay_as_stored(tmp_path):
    awq = save_folder(tmp_path / "awq", make_gptq(make_weight()), {"quant_method": "awq"})  # a g_idx: not AWQ's
    assert "layer.qweight" in open_checkpoint(awq).keys()
    three = {"layer.qweight": torch.zeros(3, 8, dtype=torch.int32), "layer.qzeros": torch.zeros(1, 1, dtype=torch.int32),
             "layer.scales": torch.ones(1, 8), "layer.g_idx": torch.zeros(32, dtype=torch.int32)}
    assert "layer.qweight" in open_checkpoint(save_folder(tmp_path / "three", three)).keys()


def test_pack_quantized_layers_read_and_requantize(tmp_path):
    w = make_weight(512, 24)  # 24 columns of 4 bits: the third word half padding
    ck = open_checkpoint(save_folder(tmp_path / "m", make_pack_quantized(w, group=8)))
    assert [t.name for t in ck.tensors()] == ["layer.weight"] and ck.quantization("layer.weight") == "INT4"
    got = ck.read("layer.weight")
    assert got.shape == (512, 24) and (got - w).abs().max() < 0.2 * w.abs().max()
    assert ck.requantized_match("layer.weight", w) == 1.0  # its source rounds to every stored code
    # a fine-tune 1 % away: some values cross a rounding boundary in every column of 512 rows
    assert ck.requantized_match("layer.weight", w + 0.01 * make_weight(512, 24, seed=1)) < 0.999
    assert ck.requantized_match("layer.weight", w[:, :8]) is None  # another shape: no test


def test_scaled_float8_with_block_scales_inverse(tmp_path):
    w = make_weight(6, 8)
    scale = torch.tensor([[0.01, 0.02], [0.03, 0.04]])  # blocks of 4 x 4 (the last rows: a 2-row block)
    stored = (w / scale.repeat_interleave(4, 0)[:6].repeat_interleave(4, 1)).to(torch.float8_e4m3fn)
    folder = save_folder(tmp_path / "fp8", {"layer.weight": stored, "layer.weight_scale_inv": scale},
                        {"quant_method": "fp8", "weight_block_size": [4, 4]})
    ck = open_checkpoint(folder)
    assert ck.quantization("layer.weight") == "FP8" and ck.keys() == ["layer.weight"]
    assert torch.equal(ck.read("layer.weight"), stored.float() * scale.repeat_interleave(4, 0)[:6].repeat_interleave(4, 1))
    assert ck.requantized_match("layer.weight", w) == 1.0


def test_a_gptq_copy_is_told_by_its_first_column(tmp_path):
    """GPTQ rounds its first column plainly, then moves the codes of later columns to make up for the error:
    only that column is plain rounding of the source. A fine-tune of the source has no such column."""
    w = make_weight(2048, 32)
    tensors = make_gptq(w, group=32)
    q = unpack(tensors["layer.qweight"], 4, 0)  # (in, out): unpacked, moved, packed again
    moved = torch.rand(q.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    moved[0] = False  # the first column stays plain rounding
    tensors["layer.qweight"] = pack((q + moved.int()).clamp(0, 15), 4, 0)
    ck = open_checkpoint(save_folder(tmp_path / "gptq", tensors))
    assert ck.requantized_match("layer.weight", w) == 1.0
    assert ck.requantized_match("layer.weight", w * (1 + 0.01 * make_weight(2048, 32, seed=4))) < 0.99


def test_a_corrupt_config_is_named(tmp_path):
    folder = save_folder(tmp_path / "m", make_gptq(make_weight()))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read the quantization settings"):
        open_checkpoint(folder)


def test_stored_tensors_that_do_not_fit_raise_naming_the_tensor(tmp_path):
    tensors = make_pack_quantized(make_weight(8, 32))
    tensors["layer.weight_scale"] = torch.ones(3, 2)  # 3 rows of scales for 8 rows of weights
    with pytest.raises(CheckpointError, match=r"quantized layers: layer.weight_scale is float32 \(3, 2\)"):
        open_checkpoint(save_folder(tmp_path / "m", tensors))  # more in tests/weights/test_packed_layers.py


def test_bitsandbytes_4bit_and_int8_layers(tmp_path):
    w = make_weight(64, 32)
    tensors = {**make_bnb4(w, "q"), **make_bnb8(w, "k"), "k.weight_format": torch.tensor(0, dtype=torch.uint8)}
    ck = open_checkpoint(save_folder(tmp_path / "bnb", tensors, {"quant_method": "bitsandbytes"}))
    assert sorted((t.name, t.shape) for t in ck.tensors()) == [("k.weight", (64, 32)), ("q.weight", (64, 32))]
    assert (ck.quantization("q.weight"), ck.quantization("k.weight")) == ("NF4", "LLM-INT8")
    assert (ck.read("q.weight") - w).abs().max() <= w.abs().max() / 15 + 1e-6  # half a step of the 16-value book
    assert (ck.read("k.weight") - w).abs().max() <= w.abs().max() / 254 + 1e-6
    for layer in ("q.weight", "k.weight"):
        assert ck.requantized_match(layer, w) == 1.0
        assert ck.requantized_match(layer, w * (1 + 0.05 * make_weight(64, 32, seed=5))) < 0.99


def test_a_model_refused_for_its_config_is_closed(tmp_path, monkeypatch):
    """A corrupt config.json raised out of dequantized() with the opened checkpoint left open (its file maps
    and handles kept until collected), while a layer refused for its tensors closed it."""
    folder = save_folder(tmp_path / "m", make_gptq(make_weight()))
    reader = type(open_checkpoint(folder).inner)
    closed, close = [], reader.close
    monkeypatch.setattr(reader, "close", lambda self: (closed.append(self.path), close(self))[1])
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read the quantization settings"):
        open_checkpoint(folder)
    assert closed == [folder]


def test_a_plain_model_with_a_scale_parameter_does_not_read_its_config(tmp_path):
    """CLIP's logit_scale ends in '_scale': its model's config.json was read for quantization settings, so a
    config.json that is no JSON object refused a model with no quantized layer."""
    folder = save_folder(tmp_path / "clip", {"logit_scale": torch.ones(()), "proj.weight": torch.ones(4, 4)})
    (folder / "config.json").write_text("[1, 2]")
    assert sorted(open_checkpoint(folder).keys()) == ["logit_scale", "proj.weight"]


def test_a_4bit_layers_json_state_is_parsed_once_when_opened(tmp_path, monkeypatch):
    """Each read, rounding variance, grid position and requantized match parsed the layer's JSON quant state
    twice (once for the absmaxes, once for the work), though its parse when the model was opened had already
    given the layer's shape and the checks of its parts."""
    parse, parsed = B.parse_state, []

    def counted(raw, where):
        parsed.append(where)
        return parse(raw, where)

    monkeypatch.setattr(B, "parse_state", counted)
    w = make_weight(16, 64)
    with open_checkpoint(save_folder(tmp_path / "m", make_bnb4(w, nested=True, book=NF4))) as ck:
        assert parsed == ["layer.weight.quant_state.bitsandbytes__nf4"]
        got = ck.read("layer.weight")
        assert ck.rounding_variance("layer.weight").shape == (16, 64) and ck.grid_position("layer.weight", w) > 0
        assert ck.requantized_match("layer.weight", w) == 1.0 and len(parsed) == 1
        assert (got - w).abs().max() < 0.25 * w.abs().max()


def make_scheme(scheme: str, w: torch.Tensor) -> tuple[dict, dict | None]:
    """(stored tensors of ``layer.weight``, quantization_config) for ``w`` stored as ``scheme``."""
    if scheme == "fp8":
        scale = w.abs().amax(dim=1, keepdim=True) / 448  # (out, 1) a scale per row
        return {"layer.weight": (w / scale).to(torch.float8_e4m3fn), "layer.weight_scale": scale}, None
    made = {"gptq": lambda: (make_gptq(w), None), "pack-quantized": lambda: (make_pack_quantized(w), None),
            "awq": lambda: (Z.awq_layer(w, group=Z.GROUP), Z.CONFIG), "bnb4": lambda: (make_bnb4(w), {"quant_method": "bitsandbytes"}),
            "bnb8": lambda: (make_bnb8(w), {"quant_method": "bitsandbytes"}),
            "mlx": lambda: (make_mlx(w, name="layer"), {"quant_method": "mlx", "group_size": 32, "bits": 4})}
    return made[scheme]()


@pytest.mark.parametrize("scheme", ["gptq", "awq", "pack-quantized", "fp8", "bnb4", "bnb8", "mlx"])
def test_a_read_layer_gives_its_stored_tensors_to_the_next_call_on_it(tmp_path, monkeypatch, scheme):
    """read() keeps a layer's stored tensors for one call on it (lineage's pass asks for the rounding variance
    next, which read them all again); the same results as a fresh checkpoint's; dropped by the next read and
    by close()."""
    w = make_weight(64, 64)
    folder = save_folder(tmp_path / "m", *make_scheme(scheme, w))
    with open_checkpoint(folder) as fresh:
        want = fresh.rounding_variance("layer.weight"), fresh.requantized_match("layer.weight", w)
    with open_checkpoint(folder) as ck:
        got = make_byte_counter(monkeypatch)
        x = ck.read("layer.weight")
        once = got["model.safetensors"]
        assert torch.equal(ck.rounding_variance("layer.weight", x), want[0])
        assert got["model.safetensors"] == once  # from the kept tensors
        assert ck.requantized_match("layer.weight", w) == want[1]  # taken by the variance: read again
        assert got["model.safetensors"] == 2 * once and not ck._kept.has("layer.weight")
        ck.read("layer.weight")
    assert not ck._kept.has("layer.weight")  # close() dropped it
