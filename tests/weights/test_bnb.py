"""bitsandbytes 4-bit and LLM.int8 layers, on hand-packed bytes."""

import json

import pytest
import torch

from modelatlas.weights import bnb as B

MAP = torch.linspace(-1, 1, 16)  # a sorted 16-value code book (NF4's is too)


def make_state(shape, blocksize=2, **more) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"shape": shape, "blocksize": blocksize, **more}).encode()), dtype=torch.uint8)


def test_nibbles_high_first():
    assert B.nibbles(torch.tensor([[0x12], [0xF0]], dtype=torch.uint8), 4).tolist() == [1, 2, 15, 0]
    assert B.nibbles(torch.tensor([0x12, 0x34], dtype=torch.uint8), 3).tolist() == [1, 2, 3]  # padding cut


def test_dequantize_4bit_blocks_over_the_flattened_matrix():
    packed = torch.tensor([[0x0F], [0xF0]], dtype=torch.uint8)  # codes 0, 15, 15, 0
    state = B.parse_state(make_state([2, 2]), "s")
    w = B.dequantize_4bit(packed, torch.tensor([2.0, 0.5]), MAP, state)
    assert w.tolist() == [[-2.0, 2.0], [0.5, -0.5]]  # block 0 = row 0 (absmax 2), block 1 = row 1 (0.5)


def test_double_quantized_absmax():
    state = {"nested_blocksize": 256, "nested_offset": 0.25}
    nested_map = torch.tensor([0.5, 1.0])
    names = {r: r for r in ("absmax", "nested_absmax", "nested_quant_map")}
    parts = {"absmax": torch.tensor([0, 1], dtype=torch.uint8), "nested_absmax": torch.tensor([4.0]),
             "nested_quant_map": nested_map}
    assert B.block_absmax(parts, names, state).tolist() == [2.25, 4.25]  # map[code] * 4 + 0.25
    assert B.block_absmax({"absmax": torch.tensor([3.0])}, names, state).tolist() == [3.0]  # stored as they are


def test_requantize_4bit_takes_each_blocks_absmax_from_x():
    x = torch.tensor([[-2.0, 2.0 * MAP[9]], [0.5 * MAP[3], 0.5]])  # blocks of 2: absmax 2 and 0.5
    assert B.requantize_4bit(x, MAP, 2).tolist() == [0, 9, 3, 15]
    assert B.requantize_4bit(x * 1.3, MAP, 2).tolist() == [0, 9, 3, 15]  # the scale follows x


def test_requantize_4bit_maps_back_through_an_unsorted_code_book():
    book = MAP.flip(0)  # FP4's book is not sorted: codes index the book as stored
    x = torch.tensor([1.0, book[4].item()])
    assert B.requantize_4bit(x, book, 2).tolist() == [0, 4]


def test_int8_rows():
    w = torch.tensor([[127, -64]], dtype=torch.int8)
    assert B.dequantize_int8(w, torch.tensor([2.0]))[0].tolist() == pytest.approx([2.0, -128 / 127])
    x = torch.tensor([[1.0, -0.5, 0.25]])
    assert B.requantize_int8(x).tolist() == [[127, -64, 32]]  # -63.5 rounds to even; 31.75 up
    assert B.requantize_int8(torch.zeros(1, 3)).tolist() == [[0, 0, 0]]  # not 0 * inf = NaN cast to int8


def test_parse_state_names_what_is_wrong():
    with pytest.raises(ValueError, match="w.quant_state: not the JSON"):
        B.parse_state(torch.tensor([1, 2, 3], dtype=torch.uint8), "w.quant_state")
    with pytest.raises(ValueError, match=r"'shape' \[0, 4\] is no list of positive sizes"):
        B.parse_state(make_state([0, 4]), "s")
    with pytest.raises(ValueError, match="'blocksize' 'x' is no positive integer"):
        B.parse_state(make_state([2, 2], blocksize="x"), "s")
    # JSON true is a Python bool, an int: read as blocksize 1 / a size of 1 while nested_blocksize refused it
    with pytest.raises(ValueError, match="'blocksize' True is no positive integer"):
        B.parse_state(make_state([2, 2], blocksize=True), "s")
    with pytest.raises(ValueError, match=r"'shape' \[True, 4\] is no list of positive sizes"):
        B.parse_state(make_state([True, 4]), "s")


def make_reference_4bit(packed: torch.Tensor, absmax: torch.Tensor, book: torch.Tensor, shape, block: int):
    """The weight as the reader computed it before it decoded in chunks: int64 codes and block numbers of
    the whole matrix."""
    n = shape[0] * shape[1]
    b = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]
    return (book[codes] * absmax[torch.arange(n) // block]).reshape(shape)


@pytest.mark.parametrize(("shape", "block"), [((37, 96), 64), ((5, 7), 3), ((64, 64), 64)])
def test_chunks_read_the_same_bits(shape, block):
    """Decoding and quantizing in chunks (whole blocks, an even count of values) gives bit for bit what the
    whole matrix at once does, for a last block cut short and an odd block size too."""
    g = torch.Generator().manual_seed(0)
    n = shape[0] * shape[1]
    packed = torch.randint(0, 256, (-(-n // 2), 1), dtype=torch.uint8, generator=g)
    absmax, book = torch.rand(-(-n // block), generator=g), torch.randn(16, generator=g)
    state = {"shape": list(shape), "blocksize": block}
    want = make_reference_4bit(packed, absmax, book, shape, block)
    for chunk in (1, 10, 200, 1 << 20):
        assert torch.equal(B.dequantize_4bit(packed, absmax, book, state, chunk=chunk).view(torch.int32),
                           want.view(torch.int32))
    x = torch.randn(shape, generator=g)
    same = int((B.requantize_4bit(x, book, block) == B.nibbles(packed, n)).sum())
    assert {B.requantized_share_4bit(x, packed, book, block, chunk=c) * n for c in (1, 10, 1 << 20)} == {same}
    assert B.requantized_share_4bit(want, packed, book.sort().values, block, chunk=10) < 1.0


def test_int8_in_place_and_in_chunks_is_the_same():
    g = torch.Generator().manual_seed(1)
    w, scb = torch.randint(-127, 128, (33, 17), dtype=torch.int8, generator=g), torch.rand(33, generator=g)
    want = w.float() * scb.reshape(-1, 1) * (1.0 / 127)  # the formula as written before
    assert torch.equal(B.dequantize_int8(w, scb).view(torch.int32), want.view(torch.int32))
    x = torch.randn(33, 17, generator=g)
    same = int((B.requantize_int8(x) == B.requantize_int8(x * 1.001)).sum())
    assert B.requantized_share_int8(x * 1.001, B.requantize_int8(x), chunk=40) * x.numel() == same
