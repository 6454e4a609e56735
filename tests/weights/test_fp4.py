"""FP4 layers (compressed-tensors NVFP4 / MXFP4, gpt-oss's MXFP4 experts) read as float32 weights.

The files are written by hand (two E2M1 codes a byte, the even column in the low nibble); the reader was also
checked against compressed-tensors' own decompression and transformers' ``convert_moe_packed_tensors``
(bench/fp4_check.py, docs/benchmarks.md "Session 32: FP4 checkpoints").
"""

import pytest
import torch
from tests.weights.conftest import make_gpt_oss, make_mxfp4, make_nvfp4

from modelatlas.errors import CheckpointError
from modelatlas.weights import fp4 as F
from modelatlas.weights import open_checkpoint
from modelatlas.weights.dequantized import DequantizedCheckpoint
from modelatlas.zoo.awq import save_folder as make_model

ROW = torch.tensor([[0x21, 0xF8, 0x73, 0x00, 0x90, 0x54, 0x06, 0xAC]], dtype=torch.uint8)  # 16 codes
# low nibble first: 1, 2 | 8, F | 3, 7 | 0, 0 | 0, 9 | 4, 5 | 6, 0 | C, A
CODES = [0.5, 1.0, -0.0, -6.0, 1.5, 6.0, 0.0, 0.0, 0.0, -0.5, 2.0, 3.0, 4.0, 0.0, -2.0, -1.0]


def make_row_nvfp4(scale=2.0, glob=4.0):
    return {"a.weight_packed": ROW, "a.weight_scale": torch.tensor([[scale]]).to(torch.float8_e4m3fn),
            "a.weight_global_scale": torch.tensor([glob])}


def check_read(folder, name, shape, label):
    ck = open_checkpoint(folder)
    assert isinstance(ck, DequantizedCheckpoint)
    assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [(name, shape, "float32")]
    assert ck.quantization(name) == label
    return ck


def test_nvfp4_codes_read_as_code_times_scale_over_global_scale(tmp_path):
    folder = make_model(tmp_path / "m", make_row_nvfp4(), {"quant_method": "compressed-tensors"})
    with check_read(folder, "a.weight", (1, 16), "NVFP4") as ck:
        assert ck.read("a.weight").tolist() == [[v * 0.5 for v in CODES]]  # 2 / 4: the global scale divides
        var = ck.rounding_variance("a.weight")[0]
        assert bool((var[[0, 1, 2, 3, 4, 5]] > 0).all())  # +6 and -6 alike: k = 2 in the block, one of them exact
    tensors = {**make_row_nvfp4(), "a.weight_packed": torch.cat([ROW, ROW], 1),
               "a.weight_scale": torch.tensor([[2.0, 2.0]]).to(torch.float8_e4m3fn)}
    tensors["a.weight_packed"][0, 9] = 0x08  # the second block's -6 now -0: its +6 alone at 6, its largest
    with open_checkpoint(make_model(tmp_path / "two", tensors)) as ck:
        var = ck.rounding_variance("a.weight")[0]
        assert var[16 + 5] == 0 and var[5] > 0


def test_mxfp4_exponents_are_powers_of_two(tmp_path):
    tensors = {"a.weight_packed": torch.cat([ROW, ROW], 1), "a.weight_scale": torch.tensor([[126]], dtype=torch.uint8)}
    folder = make_model(tmp_path / "m", tensors, {"quant_method": "compressed-tensors"})
    with check_read(folder, "a.weight", (1, 32), "MXFP4") as ck:
        assert ck.read("a.weight").tolist() == [[v * 0.5 for v in CODES * 2]]
        var = ck.rounding_variance("a.weight")[0]
        assert var[5] == var[3] == pytest.approx(1 / 3 * 0.25)  # 6's cell [5, 7] (clipped), at scale 0.5
        assert var[0] == var[16] and bool((var[[0, 1, 2, 4]] > 0).all())


def test_gpt_oss_experts_read_transposed_as_transformers_gives_them(tmp_path):
    blocks = torch.cat([ROW, ROW, ROW.flip(1), ROW.flip(1)], 1).reshape(1, 2, 1, 16)  # expert 0, out rows 0 and 1
    scales = torch.tensor([[[127], [128]]], dtype=torch.uint8)  # 1 and 2
    folder = make_model(tmp_path / "m", {"mlp.experts.down_proj_blocks": blocks, "mlp.experts.down_proj_scales": scales,
                                         "mlp.experts.down_proj_bias": torch.zeros(1, 2)})
    ck = open_checkpoint(folder)
    assert sorted(t.name for t in ck.tensors()) == ["mlp.experts.down_proj", "mlp.experts.down_proj_bias"]
    w = ck.read("mlp.experts.down_proj")
    assert w.shape == (1, 32, 2) and ck.quantization("mlp.experts.down_proj") == "MXFP4"  # (experts, in, out)
    assert w[0, :16, 0].tolist() == CODES and w[0, 16:, 0].tolist() == CODES
    flipped = [v for pair in zip(CODES[-2::-2], CODES[-1::-2], strict=True) for v in pair]  # bytes reversed
    assert w[0, :16, 1].tolist() == [2 * v for v in flipped]
    ck.close()


def test_chunks_that_split_an_experts_rows_read_the_same(tmp_path, monkeypatch):
    w = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(2))  # (experts, in, out)
    with open_checkpoint(make_model(tmp_path / "m", make_gpt_oss(w))) as ck:
        whole, var, share = ck.read("experts.gate_up_proj"), ck.rounding_variance("experts.gate_up_proj"), \
            ck.requantized_match("experts.gate_up_proj", w)
        monkeypatch.setattr(F, "CHUNK", 96)  # 3 rows of 32 a chunk: 64 rows an expert
        assert torch.equal(ck.read("experts.gate_up_proj"), whole) and share == 1.0
        assert torch.equal(ck.rounding_variance("experts.gate_up_proj"), var)
        assert ck.requantized_match("experts.gate_up_proj", w) == 1.0


def test_ties_round_to_the_even_mantissa_as_compressed_tensors_does():
    q = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -0.1, 0.0])
    assert F.round_e2m1(q).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 9, 8, 0]


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4", "gpt-oss"])
def test_a_copy_requantizes_to_its_codes_and_a_fine_tune_does_not(tmp_path, kind):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 64, 32, generator=gen) if kind == "gpt-oss" else torch.randn(32, 64, generator=gen)
    name = "experts.gate_up_proj" if kind == "gpt-oss" else "layer.weight"
    write = {"nvfp4": make_nvfp4, "mxfp4": make_mxfp4, "gpt-oss": make_gpt_oss}[kind]
    folder = make_model(tmp_path / "m", write(w) if kind == "gpt-oss" else write(w, "layer"))
    with open_checkpoint(folder) as ck:
        back = ck.read(name)
        assert back.shape == w.shape and float((back - w).abs().max()) < 0.5 * float(w.abs().max())
        assert ck.requantized_match(name, w) == 1.0 and ck.requantized_match(name, back) == 1.0
        assert ck.requantized_match(name, w + 0.05 * torch.randn(w.shape, generator=gen)) < 0.99
        var = ck.rounding_variance(name)
        assert var.shape == w.shape and 0.8 < float((back - w).square().mean() / var.mean()) < 1.25
        assert 0.45 < ck.grid_position(name, w) < 0.55 and ck.grid_position(name, back) == 0.0  # None before
        near = back + 1e-3 * w.std() * torch.randn(w.shape, generator=gen)  # a merge of its dequantized values
        assert ck.grid_position(name, near.bfloat16()) < 0.02
        assert ck.grid_position(name, w[:1]) is None  # another shape: no test


@pytest.mark.parametrize("change, error", [
    (lambda t: t.pop("a.weight_global_scale"), r"a\.weight_global_scale is missing: NVFP4"),
    (lambda t: t.update({"a.weight_scale": torch.ones(1, 2).to(torch.float8_e4m3fn)}),
     r"a\.weight_scale has shape \(1, 2\), but a\.weight_packed's NVFP4 codes need one scale per 16 values: \(1, 1\)"),
    (lambda t: t.pop("a.weight_scale"), r"a\.weight_packed is uint8 FP4 codes, but a\.weight_scale is missing"),
    (lambda t: t.update({"a.weight_scale": torch.ones(1, 1, dtype=torch.int16)}),
     r"a\.weight_scale is int16, not NVFP4's float8 scales"),
])
def test_parts_that_do_not_fit_refuse_the_model_naming_them(tmp_path, change, error):
    tensors = make_row_nvfp4()
    change(tensors)
    with pytest.raises(CheckpointError, match=error):
        open_checkpoint(make_model(tmp_path / "m", tensors))


def test_gpt_oss_scales_of_another_shape_are_named(tmp_path):
    tensors = {"e.down_proj_blocks": torch.zeros(1, 2, 1, 16, dtype=torch.uint8),
               "e.down_proj_scales": torch.zeros(1, 2, 2, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match=r"e\.down_proj_scales has shape \(1, 2, 2\), but e\.down_proj_blocks's "
                                              r"MXFP4 codes need one scale per 32 values: \(1, 2, 1\)"):
        open_checkpoint(make_model(tmp_path / "m", tensors))


def test_other_blocks_and_scales_pairs_read_as_stored(tmp_path):
    """Only uint8 ``_blocks`` beside uint8 ``_scales`` are gpt-oss's codes: a float pair is a model's own."""
    tensors = {"e.pos_blocks": torch.ones(2, 3), "e.pos_scales": torch.ones(2), "f.x_blocks": torch.ones(2, 16, dtype=torch.uint8),
               "f.x_scales": torch.ones(2)}
    with open_checkpoint(make_model(tmp_path / "m", tensors)) as ck:
        assert sorted(t.name for t in ck.tensors()) == sorted(tensors) and ck.read("e.pos_blocks").sum() == 6


def test_uint8_blocks_of_another_shape_are_named(tmp_path):
    tensors = {"e.down_proj_blocks": torch.zeros(2, 16, dtype=torch.uint8), "e.down_proj_scales": torch.zeros(2, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match=r"e\.down_proj_blocks is uint8 \(2, 16\) beside uint8 e\.down_proj_scales, "
                                              r"not gpt-oss's MXFP4 blocks"):
        open_checkpoint(make_model(tmp_path / "m", tensors))


def test_nan_scales_are_named_when_the_layer_is_read(tmp_path):
    tensors = {"a.weight_packed": torch.cat([ROW, ROW], 1), "a.weight_scale": torch.tensor([[255]], dtype=torch.uint8)}
    with open_checkpoint(make_model(tmp_path / "m", tensors)) as ck, pytest.raises(
            CheckpointError, match=r"cannot dequantize 'a\.weight' \(MXFP4\): a\.weight_scale holds NaN"):
        ck.read("a.weight")


@pytest.mark.parametrize("kind", ["nvfp4", "gpt-oss"])
def test_requantized_match_rounds_256_evenly_spaced_rows(tmp_path, monkeypatch, kind):
    """As the other formats' tests, FP4's rounds x on up to 256 evenly spaced rows (before: every value, 600 or
    960 rows here), gpt-oss's rows of its (experts * in, out) view as read: a copy still 1.0, a fine-tune
    below; a change to one unsampled row only is not seen, one to a sampled row is."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 320, 64, generator=gen) if kind == "gpt-oss" else torch.randn(600, 64, generator=gen)
    name = "experts.gate_up_proj" if kind == "gpt-oss" else "layer.weight"
    folder = make_model(tmp_path / "m", make_gpt_oss(w) if kind == "gpt-oss" else make_nvfp4(w, "layer"))
    rounded, round_e2m1 = [], F.round_e2m1
    monkeypatch.setattr(F, "round_e2m1", lambda q: rounded.append(q.numel()) or round_e2m1(q))
    rows = w.view(-1, 64)  # (rows as read_rows counts them, 64): a view
    with open_checkpoint(folder) as ck:
        assert ck.requantized_match(name, w) == 1.0 and sum(rounded) == 256 * 64
        assert ck.requantized_match(name, w + 0.05 * torch.randn(w.shape, generator=gen)) < 0.99
        sampled = ck.compared_rows(name)
        assert sampled[1] == (4 if kind == "gpt-oss" else 2)  # row 1 is not sampled
        rows[1] += 1.0
        assert ck.requantized_match(name, w) == 1.0
        rows[sampled[1]] += 1.0
        assert ck.requantized_match(name, w) < 1.0


@pytest.mark.parametrize("kind", ["nvfp4", "gpt-oss"])
def test_an_fp4_layer_compares_256_rows_a_source_reads_alone(tmp_path, kind):
    """compared_rows: the 256 rows requantized_match rounds, of 600 stored rows or of gpt-oss's 960 (experts *
    in) rows as read (None before: a source was read whole); given only those rows of x, requantized_match and
    grid_position give what they give of the whole x, and a (255, m) slice is refused."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 320, 64, generator=gen) if kind == "gpt-oss" else torch.randn(600, 64, generator=gen)
    name = "experts.gate_up_proj" if kind == "gpt-oss" else "layer.weight"
    with open_checkpoint(make_model(tmp_path / "m", make_gpt_oss(w) if kind == "gpt-oss" else make_nvfp4(w, "layer"))) as ck:
        rows, n = ck.compared_rows(name), 960 if kind == "gpt-oss" else 600
        assert rows.tolist() == torch.linspace(0, n - 1, 256).round().long().tolist()
        fine = w + 0.05 * torch.randn(w.shape, generator=gen)
        for x in (w, fine, ck.read(name)):
            part = x.reshape(-1, 64)[rows]  # (n, 64) -> (256, 64): what read_rows gives
            assert ck.requantized_match(name, part, rows=rows) == ck.requantized_match(name, x)
            assert ck.grid_position(name, part, rows=rows) == pytest.approx(ck.grid_position(name, x), abs=1e-6)
        assert ck.requantized_match(name, part[:255], rows=rows[:255]) is None
        assert ck.grid_position(name, part[:255], rows=rows[:255]) is None
        # another model's whole (256, m) tensor is not this layer's sample (it was taken for it by shape)
        assert ck.requantized_match(name, part) is None and ck.grid_position(name, part) is None


def test_gpt_oss_rows_as_read_gather_each_inputs_codes_and_scale():
    """A sampled row e * in + i of gpt-oss's (experts, in, out) view: input i of every output of expert e, its
    code the high nibble of stored byte i // 2 for an odd i, its scale that of block i // 32. Hand-checked: 1
    expert, 2 outputs, 64 inputs; output 0 codes 1 (0.5) everywhere but input 33, 7 (6.0); output 1 codes 2
    (1.0); scales 2 ** 0 and 2 ** 1 (blocks 0 and 1) of output 0, 2 ** -1 of output 1."""
    codes = torch.ones(2, 64, dtype=torch.long)
    codes[1] = 2
    codes[0, 33] = 7
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).reshape(1, 2, 2, 16)  # (e, out, blocks, 16)
    scales = torch.tensor([[[127, 128], [126, 126]]], dtype=torch.uint8)  # (e, out, blocks)
    layer = type("L", (), {"shape": (1, 64, 2), "label": "MXFP4", "group_size": 32, "state": {"experts": True}})
    x = torch.zeros(1, 64, 2)
    x[0, 33] = torch.tensor([12.0, 0.5])  # input 33: 6.0 * 2 of output 0, 1.0 * 0.5 of output 1
    x[0, 2] = torch.tensor([0.5, 0.5])  # input 2: 0.5 * 1, 1.0 * 0.5
    rows = torch.tensor([2, 33])
    [(xs, c, s)] = F._sample(x, {"packed": packed, "scale": scales}, layer, rows, "t")
    assert c.tolist() == [[1, 2], [7, 2]] and s.tolist() == [[1.0, 0.5], [2.0, 0.5]]
    assert xs.tolist() == [[0.5, 0.5], [12.0, 0.5]]

def test_a_block_of_scale_zero_matches_a_copy_whose_values_there_are_zero(tmp_path):
    # a block of scale 0 stores 0 whatever its codes: a copy's zeros there (0 / 0: NaN, rounded to the code of 6)
    # read as misses: a copy with an all-zero block matched none of its values
    tensors = {**make_row_nvfp4(scale=0.0), "a.weight_packed": torch.zeros(1, 8, dtype=torch.uint8)}
    with open_checkpoint(make_model(tmp_path / "m", tensors)) as ck:
        back = ck.read("a.weight")
        assert back.tolist() == [[0.0] * 16]
        assert ck.requantized_match("a.weight", back) == 1.0
