"""Unpacking GPTQ and compressed-tensors packed integers, on hand-packed words.

A word holds its first value in the lowest bits: 0x76543210 is the 4-bit values 0, 1, ..., 7. The same code
was checked value for value against compressed-tensors' own decompression of llm-compressor W4A16 / W8A16
models (docs/benchmarks.md, "Packed and scaled checkpoints").
"""

import pytest
import torch

from modelatlas.weights import packed_ints as P


def make_word(value: int) -> torch.Tensor:
    """A uint32 bit pattern as the int32 a checkpoint stores (values >= 2**31 read as negative)."""
    return torch.tensor([value - (1 << 32) if value >= 1 << 31 else value], dtype=torch.int32)


def test_unpack_reads_lowest_bits_first():
    assert P.unpack(make_word(0x76543210), 4, 0).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert P.unpack(make_word(0x04030201), 8, 0).tolist() == [1, 2, 3, 4]
    assert P.unpack(make_word(0xE4), 2, 0).tolist()[:5] == [0, 1, 2, 3, 0]


def test_unpack_a_word_with_the_sign_bit_set():
    assert P.unpack(make_word(0xF0000000), 4, 0).tolist() == [0] * 7 + [15]  # the shift drags the sign; the mask drops it


def test_unpack_along_columns_and_rows():
    words = torch.cat([make_word(0x10), make_word(0x32)]).reshape(1, 2)  # (1, 2) words
    assert P.unpack(words, 4, 1)[0, [0, 1, 8, 9]].tolist() == [0, 1, 2, 3]  # (1, 16): word 0's values then word 1's
    assert P.unpack(words.T, 4, 0)[[0, 1, 8, 9], 0].tolist() == [0, 1, 2, 3]  # the same packed down the rows


def make_gptq(zero: int = 7):
    """One output column of 8 inputs, 4 bits, one group: codes 0..7, stored zero ``zero``, scale 0.5."""
    qweight = make_word(0x76543210).reshape(1, 1)  # (in * 4 / 32, out)
    qzeros = make_word(zero).reshape(1, 1)  # (groups, out * 4 / 32): only the lowest nibble is this column's
    return qweight, qzeros, torch.tensor([[0.5]]), torch.zeros(8, dtype=torch.int32)


def test_gptq_weight_adds_one_to_the_stored_zero_in_the_gptq_format():
    w = P.gptq_weight(*make_gptq(), bits=4)  # zero 7 + 1 = 8
    assert w.shape == (1, 8)  # (out, in): GPTQ stores the transpose
    assert w.tolist() == [[-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5]]


def test_gptq_v2_uses_the_zero_as_stored():
    assert P.gptq_weight(*make_gptq(), bits=4, zero_offset=0).tolist() == [[-3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0]]


def test_gptq_groups_follow_g_idx():
    qweight, _, _, _ = make_gptq()
    qzeros = make_word(0x77).reshape(1, 1).expand(2, 1)  # two groups, both zero 7
    scales = torch.tensor([[1.0], [10.0]])
    g_idx = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.int32)  # input columns 0 and 7 in group 1
    w = P.gptq_weight(qweight, qzeros, scales, g_idx, bits=4)
    assert w.tolist() == [[-80.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -10.0]]


def test_gptq_quotient_rounds_back_to_the_codes():
    qweight, qzeros, scales, g_idx = make_gptq()
    w = P.gptq_weight(qweight, qzeros, scales, g_idx, bits=4)
    zeros = P.unpack(qzeros, 4, 1)[:, :1]  # (groups, out)
    scaled, zero = P.gptq_quotient(w, scales, zeros, g_idx)  # (in, out) each
    assert (scaled + zero).flatten().tolist() == list(range(8))
    codes = P.unpack(qweight, 4, 0)
    assert P.on_grid(scaled, zero, codes, 4, 0.0).all()
    assert P.on_grid(scaled + 0.45, zero, codes, 4, 0.0).all()  # still nearest
    assert not P.on_grid(scaled + 0.55, zero, codes, 4, 0.0)[1:].any()  # past half a step: another code
    assert P.on_grid(scaled - 0.55, zero, codes, 4, 0.0)[0]  # ... but code 0 takes everything below it


def test_on_grid_widens_half_a_step_by_the_tolerance():
    codes, zero = torch.tensor([12]), torch.tensor([8.0])
    assert not P.on_grid(torch.tensor([4.502]), zero, codes, 4, 0.0)
    assert P.on_grid(torch.tensor([4.502]), zero, codes, 4, 2.0**-10)  # 0.5 + 4.5 / 1024 = 0.5044


def test_gptq_bits_from_the_shapes():
    assert P.gptq_bits(torch.Size([16, 64]), torch.Size([128])) == 4
    assert P.gptq_bits(torch.Size([32, 64]), torch.Size([128])) == 8
    with pytest.raises(ValueError, match="qweight has 5 rows for 7 input columns"):
        P.gptq_bits(torch.Size([5, 64]), torch.Size([7]))


def test_pack_quantized_symmetric_values_are_stored_plus_the_offset():
    packed = make_word(0x76543210).reshape(1, 1)  # (rows, words)
    w = P.pack_quantized_weight(packed, torch.tensor([[0.25]]), (1, 8), None, bits=4)
    assert w.tolist() == [[-2.0, -1.75, -1.5, -1.25, -1.0, -0.75, -0.5, -0.25]]  # 0.25 * (q - 8)


def test_pack_quantized_zero_points_pack_down_the_rows():
    packed = make_word(0x76543210).reshape(1, 1).expand(2, 1)  # two rows of codes 0..7
    zero_point = make_word(0x53).reshape(1, 1)  # rows 0 and 1: zeros 3 and 5, packed along the rows
    w = P.pack_quantized_weight(packed, torch.tensor([[1.0], [1.0]]), (2, 8), zero_point, bits=4)
    assert w[:, 0].tolist() == [-3.0, -5.0] and w[:, 7].tolist() == [4.0, 2.0]


def test_pack_quantized_groups_of_columns_and_padding():
    packed = make_word(0x76543210).reshape(1, 1)
    w = P.pack_quantized_weight(packed, torch.tensor([[1.0, 10.0, 100.0]]), (1, 6), None, bits=4)
    assert w.tolist() == [[-8.0, -7.0, -60.0, -50.0, -400.0, -300.0]]  # 3 groups of 2; the word's last 2 codes padding


def test_pack_quantized_quotient_inverts_the_weight():
    packed = make_word(0x76543210).reshape(1, 1)
    scale = torch.tensor([[0.25]])
    w = P.pack_quantized_weight(packed, scale, (1, 8), None, bits=4)
    scaled, zero = P.pack_quantized_quotient(w, scale, None, 4)
    assert (scaled + zero).tolist() == [[float(v) for v in range(8)]]
    assert P.on_grid(scaled, zero, P.unpack(packed, 4, 1), 4, 0.0).all()


def test_packed_shape_names_the_tensor():
    assert P.packed_shape(torch.tensor([3, 8]), "x") == (3, 8)
    with pytest.raises(ValueError, match=r"layer.weight_shape: weight_shape \[3\] is not the 2 sizes"):
        P.packed_shape(torch.tensor([3]), "layer.weight_shape")
