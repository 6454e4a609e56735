"""Where a model's values sit on a quantized layer's levels: anywhere between them for the model it was
quantized from, on them for a model made from its dequantized values (a QLoRA merge)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_bnb4, make_bnb8, make_mlx

from modelatlas.weights import grid_position as G
from modelatlas.weights import open_checkpoint


def test_uniform_position_in_halves_of_a_step():
    assert G.uniform_position(torch.tensor([1.0, 2.0, -3.0])) == 0.0  # on the levels
    assert G.uniform_position(torch.tensor([1.5, 0.25])) == 0.75  # (1.0 + 0.5) / 2
    assert abs(G.uniform_position(torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 9) - 0.5) < 0.01


def test_book_position_uses_the_gap_around_each_value():
    book = torch.tensor([1.0, -1.0, 0.0, 0.5])  # sorted: -1, 0, 0.5, 1 (a book need not be stored sorted)
    assert G.book_position(torch.tensor([0.0, 0.5]), book) == 0.0
    assert G.book_position(torch.tensor([-0.5, 0.25]), book) == 1.0  # midway in gaps of 1 and 0.5
    assert G.book_position(torch.tensor([-0.25, 0.125]), book) == 0.5
    assert G.book_position(torch.tensor([2.0, -1.0]), book) == 0.5  # beyond the ends: nothing inside


def make_folder(folder, tensors, config):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def check_position(ck, name, source):
    """The source reads ~0.5; the copy's own dequantized values nudged by far less than a step read ~0
    (returned)."""
    made = ck.read(name) * (1 + 1e-4 * torch.randn(source.shape, generator=torch.Generator().manual_seed(1)))
    assert 0.4 < ck.grid_position(name, source) < 0.6
    assert ck.grid_position(name, made) < 0.05
    return made


def test_bitsandbytes_and_mlx_layers_tell_a_source_from_a_model_made_from_them(tmp_path):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    ck = open_checkpoint(make_folder(tmp_path / "q", {**make_bnb4(x, "n"), **make_bnb8(x, "i"), **make_mlx(x, name="m")},
                                     {"quantization": {"group_size": 32, "bits": 4}}))
    for name in ("n.weight", "i.weight", "m.weight"):
        made = check_position(ck, name, x)
        if name != "m.weight":  # MLX recomputes a group's scale from its range: the made model rounds otherwise
            assert ck.requantized_match(name, made) > 0.99  # rounding alone cannot tell them apart
    assert ck.grid_position("n.weight", x[:, :64]) is None  # another shape: no test


def test_gptq_pack_quantized_and_int8_layers_too(tmp_path):
    from tests.weights.conftest import make_gptq, make_pack_quantized

    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    scale = x.abs().amax(1, keepdim=True) / 127  # (64, 1) one per row
    int8 = {"s.weight": torch.round(x / scale).to(torch.int8), "s.weight_scale": scale}
    ck = open_checkpoint(make_folder(tmp_path / "q", {**make_gptq(x, name="g", group=32),
                                                        **make_pack_quantized(x, name="p", group=32), **int8}, {}))
    for name in ("g.weight", "p.weight", "s.weight"):
        check_position(ck, name, x)
    fp8 = {"f.weight": (x / (scale * 127 / 448)).to(torch.float8_e4m3fn), "f.weight_scale": scale * 127 / 448}
    check_position(open_checkpoint(make_folder(tmp_path / "f", fp8, {})), "f.weight", x)


def test_float8_position_in_halves_of_the_local_spacing():
    e4 = torch.float8_e4m3fn
    assert G.float8_position(torch.tensor([1.0, 1.125, 0.0, 448.0]), e4) == 0.0  # float8 values
    assert G.float8_position(torch.tensor([1.0625]), e4) == 1.0  # midway between 1 and 1.125 (spacing 1/8)
    assert G.float8_position(torch.tensor([8.25]), e4) == 0.5  # a quarter of the way: spacing 1 at 8


def test_level_variance_of_an_even_density_is_the_gap_squared_over_12():
    book = torch.tensor([0.5, -1.0, 0.0, 1.0, -0.5])  # sorted: -1, -0.5, 0, 0.5, 1; stored in any order
    even = torch.tensor([1.0, 0.5, 1.0, 0.5, 1.0])  # values per cell, as wide as the cells (ends: half)
    got = G.level_variance(book, even * 1000)
    assert got.tolist() == pytest.approx([0.5**2 / 12] * 5)  # the ends too: half a cell of the one gap
    assert G.level_variance(book, torch.zeros(5)).tolist() == pytest.approx([0.5**2 / 12] * 5)  # none counted
    falling = G.level_variance(book, torch.tensor([2.0, 0.5, 4.0, 0.5, 2.0]))  # fewer values outward
    assert falling[0] == pytest.approx(0.5**2 / 12)  # a cell even about its level: a slope changes nothing
    assert falling[1] > 0.5**2 / 12 and falling[3] > 0.5**2 / 12  # an end's half cell: values far from it
    with_nan = G.level_variance(torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([5, 0, 5]))
    assert with_nan[1] == 0 and with_nan[0] > 0


def test_cell_variance_of_arrays_is_that_of_tensors():
    """IQ4 rounding variances are computed on numpy arrays (no torch thread pool to wait on): the same values."""
    import numpy as np

    from modelatlas.weights.grid_position import cell_variance

    rng = np.random.default_rng(0)
    below, above = rng.random(1000) * rng.choice([0.0, 1.0, 1e-3], 1000), rng.random(1000)
    got = cell_variance(below, above)
    assert isinstance(got, np.ndarray) and got[below == 0].tolist() == pytest.approx((above[below == 0] / 2) ** 2 / 3)
    assert np.array_equal(got, cell_variance(torch.from_numpy(below), torch.from_numpy(above)).numpy())
