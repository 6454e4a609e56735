"""Unpacking GPTQ and compressed-tensors packed integers, on hand-packed words.

A word holds its first value in the lowest bits: 0x76543210 is the 4-bit values 0, 1, ..., 7. The same code
was checked value for value against compressed-tensors' own decompression of llm-compressor W4A16 / W8A16
models (docs/benchmarks.md, "Packed and scaled checkpoints").
"""

import pytest
import torch

from modelatlas.weights import packed_ints as P
from modelatlas.weights.base import TensorInfo


def make_word(value: int) -> torch.Tensor:
    """A uint32 bit pattern as the int32 a checkpoint stores (values >= 2**31 read as negative)."""
    return torch.tensor([value - (1 << 32) if value >= 1 << 31 else value], dtype=torch.int32)


def test_unpack_reads_lowest_bits_first():
    assert P.unpack(make_word(0x76543210), 4, 0).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert P.unpack(make_word(0x04030201), 8, 0).tolist() == [1, 2, 3, 4]
    assert P.unpack(make_word(0xE4), 2, 0).tolist()[:5] == [0, 1, 2, 3, 0]


def test_pack_writes_lowest_bits_first_and_unpack_reads_it_back():
    assert P.pack(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), 4, 0).tolist() == make_word(0x76543210).tolist()
    assert P.pack(torch.tensor([[15] * 8]), 4, 1).tolist() == [make_word(0xFFFFFFFF).tolist()]  # the sign bit
    assert P.pack(torch.tensor([1, 2, 3]), 8, 0).tolist() == make_word(0x030201).tolist()  # padded with zeros
    codes = torch.randint(0, 4, (6, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(P.unpack(P.pack(codes, 2, 1), 2, 1), codes)


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


def make_info(name, shape, dtype="int32"):
    return TensorInfo(name, tuple(shape), dtype)


def make_gptq_infos(rows=16, out=64, n_in=128, groups=8, zero_words=8):
    return (make_info("l.qweight", (rows, out)), make_info("l.qzeros", (groups, zero_words)),
            make_info("l.scales", (groups, out), "float16"), make_info("l.g_idx", (n_in,)))


def test_gptq_layout_bits_from_the_shapes():
    assert P.gptq_layout(*make_gptq_infos()) == 4
    assert P.gptq_layout(*make_gptq_infos(rows=32, zero_words=16)) == 8
    assert P.gptq_layout(*make_gptq_infos(rows=12, zero_words=6)) is None  # 3 bits: not unpacked
    with pytest.raises(ValueError, match="l.qweight holds 5 rows of words for the 128 inputs of l.g_idx"):
        P.gptq_layout(*make_gptq_infos(rows=5))


def test_gptq_layout_names_the_part_that_does_not_fit():
    with pytest.raises(ValueError, match=r"l.qzeros is int32 \(8, 3\), not the \(8, 8\) int32 words"):
        P.gptq_layout(*make_gptq_infos(zero_words=3))
    qweight, qzeros, _, g_idx = make_gptq_infos()
    with pytest.raises(ValueError, match=r"l.scales is int32 \(8, 64\), not the \(groups, 64\) float scales"):
        P.gptq_layout(qweight, qzeros, make_info("l.scales", (8, 64)), g_idx)
    with pytest.raises(ValueError, match="l.g_idx is float32, not integer group numbers"):
        P.gptq_layout(qweight, qzeros, make_gptq_infos()[2], make_info("l.g_idx", (128,), "float32"))


def test_group_numbers_out_of_range_are_refused():
    P.check_groups(torch.tensor([0, 3, 1]), 4, "l.g_idx")
    with pytest.raises(ValueError, match=r"l.g_idx holds group numbers -1..3, but there are 4 groups"):
        P.check_groups(torch.tensor([-1, 3]), 4, "l.g_idx")  # -1 would read the last group's scale


def test_gptq_weight_in_chunks_equals_all_at_once():
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (16, 24), generator=g, dtype=torch.int32)  # 128 inputs, 4 bits
    qzeros = torch.randint(-2**31, 2**31 - 1, (4, 3), generator=g, dtype=torch.int32)
    scales, g_idx = torch.rand(4, 24, generator=g), torch.randperm(128, generator=g) % 4  # act-order groups
    whole = P.gptq_weight(qweight, qzeros, scales, g_idx, 4)
    assert torch.equal(P.gptq_weight(qweight, qzeros, scales, g_idx, 4, chunk=8), whole)  # 1 word per chunk


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


def test_pack_quantized_grid_inverts_the_weight():
    packed = make_word(0x76543210).reshape(1, 1)
    scale = torch.tensor([[0.25]])
    w = P.pack_quantized_weight(packed, scale, (1, 8), None, bits=4)
    [(cols, codes, scaled, zero)] = P.pack_quantized_grid(w, packed, scale, None, 4, None, None, torch.float32)
    assert cols == slice(0, 8) and codes.tolist() == [[v] for v in range(8)]  # (chunk, rows)
    assert (scaled + zero).tolist() == [[float(v)] for v in range(8)]
    assert P.on_grid(scaled, zero, codes, 4, 0.0).all()


def test_packed_shape_names_the_tensor():
    packed = make_info("l.weight_packed", (3, 1))
    assert P.packed_shape(torch.tensor([3, 8]), "l.weight_shape", packed) == (3, 8)
    with pytest.raises(ValueError, match=r"l.weight_shape says \[-3, 8\], but l.weight_packed \(3, 1\) holds 3 rows"):
        P.packed_shape(torch.tensor([-3, 8]), "l.weight_shape", packed)


def test_packed_bits_follow_the_config_and_refuse_a_misfit():
    packed = make_info("l.weight_packed", (4, 16))  # 16 words per row
    assert P.packed_bits(128, packed, set()) == 4 and P.packed_bits(128, packed, {4, 8}) == 4
    assert P.packed_bits(64, packed, set()) == 8
    assert P.packed_bits(170, packed, {3}) is None  # 3 bits: values span words, left as stored
    with pytest.raises(ValueError, match=r"16 words per row, which 128 columns of the \[8\] bits"):
        P.packed_bits(128, packed, {8})
    with pytest.raises(ValueError, match="which 120 columns of 1 to 8 bits do not fill"):
        P.packed_bits(120, packed, set())


def test_pack_quantized_groups_follow_the_configs_group_size():
    packed = make_word(0x76543210).reshape(1, 1).expand(1, 2)  # 16 codes 0..7, 0..7
    scale = torch.tensor([[1.0, 10.0]])  # 10 columns in groups of 8: 8 + 2 (not 5 + 5)
    assert P.pack_quantized_layout((1, 10), 4, {"scale": make_info("s", (1, 2), "float32")}, 8) == 8
    w = P.pack_quantized_weight(packed, scale, (1, 10), None, 4, group_size=8)
    assert w[0, 7:].tolist() == [-1.0, -80.0, -70.0]


def test_pack_quantized_one_scale_for_the_whole_tensor():
    w = P.pack_quantized_weight(make_word(0x76543210).reshape(1, 1).expand(2, 1), torch.tensor([0.5]), (2, 8),
                                None, 4)
    assert w[1].tolist() == [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5]
