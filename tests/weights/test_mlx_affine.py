"""MLX affine quantization: bit streams, dequantization, quantizing again (checked against mlx itself by
bench/lineage_mlx.py: docs/benchmarks.md, "Session 29")."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_mlx

from modelatlas.errors import CheckpointError
from modelatlas.weights import mlx_affine as M
from modelatlas.weights import open_checkpoint


def make_stream(codes: list[int], bits: int, words: int) -> torch.Tensor:
    """``codes`` as one little-endian bit stream in ``words`` uint32 words (a row of (1, words))."""
    big = sum(c << (bits * i) for i, c in enumerate(codes))
    return torch.tensor([[(big >> (32 * k)) & 0xFFFFFFFF for k in range(words)]], dtype=torch.int64).to(torch.uint32)


def test_a_three_bit_code_spans_two_words():
    codes = [7] + [0] * 9 + [4]  # code 10 starts at bit 30: its low two bits in word 0, its high bit in word 1
    words = make_stream(codes, 3, 2)
    assert words.to(torch.int64).tolist() == [[7, 1]]  # 4 = 0b100: only the bit that spills into word 1
    assert M.unpack_stream(words, 3, 11).tolist() == [codes]
    assert M.unpack_stream(make_stream([5, 3, 6, 1, 2], 3, 1), 3, 5).tolist() == [[5, 3, 6, 1, 2]]


def test_unpack_reads_the_top_bit_of_a_word():
    words = make_stream([0] * 7 + [15], 4, 1)  # 0xF0000000: negative as int32
    assert M.unpack_stream(words, 4, 8).tolist() == [[0] * 7 + [15]]


def test_dequantize_scale_times_code_plus_bias_per_group():
    words = make_stream([0, 1, 2, 3], 2, 1)
    w = M.dequantize(words, torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]]), bits=2, group_size=2)
    assert w.tolist() == [[1.0, 1.5, 3.0, 5.0]]


def test_quantize_codes_makes_the_larger_edge_a_level():
    # max 3 outweighs min 0: the scale turns negative so that 3 is the bias, level 0
    assert M.quantize_codes(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group_size=4).tolist() == [[3, 2, 1, 0]]
    # min -3 outweighs max 0.5: the bias is -3
    assert M.quantize_codes(torch.tensor([[-3.0, -1.0, 0.0, 0.5]]), bits=2, group_size=4).tolist() == [[0, 2, 3, 3]]


def make_mlx_model(folder, x: torch.Tensor, bits: int = 4, group: int = 32):
    """One layer ``a`` of ``x`` quantized as mx.quantize does, saved as mlx-lm saves a model."""
    folder.mkdir()
    save_file(make_mlx(x, bits, group), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization": {"group_size": group, "bits": bits}}))
    return folder


def test_an_mlx_model_reads_and_requantizes(tmp_path):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    ck = open_checkpoint(make_mlx_model(tmp_path / "m", x))
    assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("a.weight", (16, 64), "float32")]
    assert ck.quantization("a.weight") == "MLX-4BIT"
    step = ck.inner.read("a.scales").abs().repeat_interleave(32, 1)  # (16, 64) each group's own step
    err = (ck.read("a.weight") - x).abs() / step
    assert (err <= 1.0 + 1e-5).all() and (err <= 0.5 + 1e-5).float().mean() > 0.95  # beyond half a step: the
    # far edge, clamped when the near edge's exact level shrank the step (as mx.quantize does)
    assert ck.requantized_match("a.weight", x) == 1.0
    nudged = x + 0.02 * torch.randn(16, 64, generator=torch.Generator().manual_seed(1))  # a fine-tune 2 % away
    assert ck.requantized_match("a.weight", nudged) < 0.99


def test_an_mlx_model_without_its_settings_is_refused_naming_them(tmp_path):
    folder = make_mlx_model(tmp_path / "m", torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"a.weight: uint32 codes with a.scales and a.biases \(MLX\), but the "
                                              r"config.json beside it names no 'quantization' bits"):
        open_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}))
    with pytest.raises(CheckpointError, match=r"names mode mxfp4, which stores no biases"):  # was left as stored
        open_checkpoint(folder)  # (mxfp4 is read since session 36: tests/weights/test_mlx_fp4.py)


def make_reference_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The codes as the reader unpacked them before it worked in chunks of rows: (rows, n) int64."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    start = torch.arange(n) * bits
    return ((w[:, start // 32] | (w[:, start // 32 + 1] << 32)) >> (start % 32)) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", M.BITS)
def test_chunks_of_rows_read_the_same_bits(bits):
    g = torch.Generator().manual_seed(bits)
    rows, groups, group = 37, 3, 32
    words = torch.randint(0, 2**32, (rows, groups * group * bits // 32), dtype=torch.int64, generator=g)
    words = words.to(torch.uint32)
    scales, biases = torch.randn(rows, groups, generator=g).bfloat16(), torch.randn(rows, groups, generator=g).bfloat16()
    codes = make_reference_codes(words, bits, groups * group)
    want = codes.float() * scales.float().repeat_interleave(group, 1) + biases.float().repeat_interleave(group, 1)
    for chunk in (1, 200, 1 << 20):
        assert torch.equal(M.dequantize(words, scales, biases, bits, group, chunk=chunk).view(torch.int32),
                           want.view(torch.int32))
    x = want + 0.3 * torch.randn(rows, groups * group, generator=g) * scales.float().repeat_interleave(group, 1)
    same = int((M.quantize_codes(x, bits, group) == codes).sum())
    assert {M.requantized_share(x, words, bits, group, chunk=c) * x.numel() for c in (1, 200, 1 << 20)} == {same}
