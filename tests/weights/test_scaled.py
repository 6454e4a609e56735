"""float8 / int8 weights with scales: scale layouts, dequantization, quantizing again."""

import pytest
import torch

from modelatlas.weights.scaled import block_size, expand_scale, requantized_share, scaled_weight


def test_block_size_infers_or_takes_the_configs():
    assert block_size(256, 2) == 128
    assert block_size(300, 3) == 100  # inferred: equal blocks
    assert block_size(300, 3, given=128) == 128  # a config's 128-row blocks: 128, 128, 44
    assert block_size(300, 3, given=64) == 100  # 64 would need 5 scales: the config's size does not fit
    with pytest.raises(ValueError, match="3 scales cannot cover 4 rows"):
        block_size(4, 3)


def test_expand_scale_per_tensor_row_and_block():
    assert expand_scale(torch.tensor(2.0), (2, 3)).tolist() == [[2.0] * 3] * 2
    assert expand_scale(torch.tensor([[1.0], [2.0]]), (2, 3)).tolist() == [[1.0] * 3, [2.0] * 3]
    assert expand_scale(torch.tensor([1.0, 2.0]), (2, 3)).tolist() == [[1.0] * 3, [2.0] * 3]
    blocks = expand_scale(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (3, 4))  # blocks of 2 x 2, the last row cut
    assert blocks.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4]]
    assert expand_scale(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (3, 4), rows=torch.tensor([2, 0])).tolist() == \
        [[3, 3, 4, 4], [1, 1, 2, 2]]


def test_expand_scale_names_a_misfit():
    with pytest.raises(ValueError, match=r"a scale of shape \(2, 2, 2\) does not fit a weight of shape \(4, 4\)"):
        expand_scale(torch.ones(2, 2, 2), (4, 4))


def test_scaled_float8_weight():
    values = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    w = scaled_weight(values, torch.tensor([[0.5], [2.0]]))
    assert w.tolist() == [[0.5, -1.0], [1.0, 896.0]]


def test_scaled_int8_weight_with_zero_points():
    values = torch.tensor([[10, -10]], dtype=torch.int8)
    assert scaled_weight(values, torch.tensor([[0.1]]), torch.tensor([[2]]))[0].tolist() == pytest.approx([0.8, -1.2])


def test_requantizing_the_source_gives_every_stored_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    scale = x.abs().amax(dim=1, keepdim=True) / 448  # (64, 1): one per row, as an FP8 quantizer picks
    stored = (x / scale).to(torch.float8_e4m3fn)
    assert requantized_share(stored, x, scale) == 1.0
    nudged = x * (1 + 0.02 * torch.randn(64, 32, generator=g))  # a fine-tune 2 % away
    assert requantized_share(stored, nudged, scale) < 0.9
    rows = torch.tensor([0, 5, 63])
    assert requantized_share(stored[rows], x[rows], scale, shape=(64, 32), rows=rows) == 1.0


def test_requantized_int8_clamps_like_the_quantizer():
    x = torch.tensor([[1.0, 300.0, -300.0]])
    stored = torch.tensor([[1, 127, -128]], dtype=torch.int8)
    assert requantized_share(stored, x, torch.tensor([[1.0]])) == 1.0


def test_a_bfloat16_model_quantized_in_bfloat16_is_its_own_copy():
    """compressed-tensors divides in the weight's dtype: a bfloat16 model's int8 copy holds the rounding of the
    bfloat16 quotient, which the float32 quotient misses near a tie (3.495 is 3 in float32, 3.5 -> 4 in
    bfloat16); requantized_share tries both (working_dtypes), so the copy matches on every value."""
    x = (torch.linspace(-100.0, 100.0, 4000).reshape(40, 100) + 0.37).to(torch.bfloat16)
    scale = torch.full((40, 1), 0.9)  # per row
    stored = torch.round(x / scale.to(torch.bfloat16)).clamp(-128, 127).to(torch.int8)  # divided in bfloat16
    in_float32 = torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)
    assert (stored != in_float32).any()  # the two quotients round apart somewhere: the test can tell them apart
    assert requantized_share(stored, x, scale) == 1.0
    assert requantized_share(stored, x.float(), scale) < 1.0  # the float32 source: float32 quotients only
