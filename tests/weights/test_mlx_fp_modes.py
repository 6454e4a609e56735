"""MLX's ``mxfp4`` and ``mxfp8`` modes (mlx-lm's ``convert(..., q_mode="mxfp4")``, mlx-community's gpt-oss):
uint32 words of E2M1 codes (float8 E4M3 values) with uint8 E8M0 ``scales`` and no ``biases``, read as float weights
through :mod:`modelatlas.weights.fp4` (:mod:`modelatlas.weights.scaled`). Before session 36 such a layer read as
stored: a (rows, cols / 8) uint32 "weight" beside uint8 scales."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_mlx, make_mlx_mxfp4, make_mlx_mxfp8

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint

MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}  # as mlx-lm writes config.json's "quantization"


def make_model(folder, tensors: dict, quantization: dict):
    """An mlx-lm model folder: ``tensors`` in model.safetensors, ``quantization`` in config.json."""
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": quantization}))
    return folder


def make_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return 0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def check_rounding_bound(x: torch.Tensor, got: torch.Tensor, scales: torch.Tensor) -> None:
    """Each value within half the gap of the E2M1 cell its ``x / scale`` falls in (0.25 up to 2, 0.5 up to 4,
    1 up to 6) times its block's scale; beyond 6 (a scale rounded down in log2) clipped to 6."""
    s = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)  # (.., rows, cols)
    q = (x / s).abs()
    half_gap = torch.where(q <= 2, 0.25, torch.where(q <= 4, 0.5, torch.where(q <= 6, 1.0, q - 6)))
    assert ((got - x).abs() <= half_gap * s * (1 + 1e-6)).all()


def test_a_handcrafted_group_reads_code_by_code():
    """One word's eight codes, low nibble first: 7 (+6), 13 (-3), 2 (+1), 4 (+2), 0, 9 (-0.5), 7, 4; exponent
    byte 126: a scale of 0.5."""
    x = torch.zeros(1, 32)
    x[0, :8] = torch.tensor([3.0, -1.5, 0.375, 1.0, 0.1, -0.2, 2.6, 1.25])  # x / 0.5: 6, -3, 0.75 (a tie: 1),
    t = make_mlx_mxfp4(x)  # 2, 0.2, -0.4, 5.2, 2.5 (a tie: 2)
    assert t["a.scales"].tolist() == [[126]]  # max 3: log2(3 / 6) = -1
    assert t["a.weight"].to(torch.int64).tolist() == [[0x479042D7, 0, 0, 0]]
    assert make_mlx_mxfp4(x, ties="lower")["a.weight"].to(torch.int64).tolist() == [[0x479041D7, 0, 0, 0]]


def test_a_handcrafted_word_reads_as_its_levels_times_the_scale(tmp_path):
    words = torch.tensor([[0x479042D7, 0xF0000000, 0, 0]], dtype=torch.int64).to(torch.uint32)  # 0xF: -6, the top
    folder = make_model(tmp_path / "m", {"a.weight": words, "a.scales": torch.tensor([[126]], dtype=torch.uint8)},
                        MXFP4)  # nibble of word 1: column 15
    with open_checkpoint(folder) as ck:
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("a.weight", (1, 32), "float32")]
        assert ck.quantization("a.weight") == "MXFP4"
        want = [3.0, -1.5, 0.5, 1.0, 0.0, -0.25, 3.0, 1.0] + [0.0] * 7 + [-3.0] + [0.0] * 16
        assert ck.read("a.weight").tolist() == [want]


def test_a_quantized_matrix_reads_back_within_half_a_level(tmp_path):
    x = make_matrix(16, 128)
    t = make_mlx_mxfp4(x)
    with open_checkpoint(make_model(tmp_path / "m", t, MXFP4)) as ck:
        got = ck.read("a.weight")
        check_rounding_bound(x, got, t["a.scales"])
        assert 0.05 < float((got - x).norm() / x.norm()) < 0.2  # 4-bit floats: ~10 % of the norm
        assert ck.requantized_match("a.weight", x) == 1.0
        nudged = x + 0.002 * torch.randn(16, 128, generator=torch.Generator().manual_seed(1))  # a fine-tune 10 %
        assert ck.requantized_match("a.weight", nudged) < 0.9  # away moves about half the codes
        assert ck.rounding_variance("a.weight").shape == (16, 128)
        assert 0.4 < ck.grid_position("a.weight", x) < 0.6  # its source: anywhere between the levels
        assert ck.grid_position("a.weight", got) < 0.01  # made from the dequantized values: on them


def test_ties_sent_either_way_are_a_copy(tmp_path):
    """Values half way between two levels: MLX's Metal kernel rounds them to the even level, its CPU quantizer
    to the lower magnitude (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3). Both are copies of the source; the strict
    even rule read the CPU copy at 0.32."""
    gen = torch.Generator().manual_seed(2)
    q = torch.tensor([0.75, 1.75, 3.5, -0.75, 1.0, 0.3])[torch.randint(0, 6, (8, 64), generator=gen)]
    q[:, ::32] = 6.0  # each block's largest value 6: a scale of 1
    even, lower = make_mlx_mxfp4(q), make_mlx_mxfp4(q, ties="lower")
    assert (even["a.weight"] != lower["a.weight"]).float().mean() > 0.9  # nearly every word holds a tie
    for ties, tensors in (("even", even), ("lower", lower)):
        with open_checkpoint(make_model(tmp_path / ties, tensors, MXFP4)) as ck:
            assert ck.requantized_match("a.weight", q) == 1.0


def test_stacked_experts_read_as_one_matrix_per_expert(tmp_path):
    """mlx-lm's SwitchLinear stores a mixture of experts' (experts, out, in) weight in one tensor."""
    x = torch.stack([make_matrix(8, 64, seed=e) for e in range(3)])  # (3, 8, 64)
    t = make_mlx_mxfp4(x)
    assert tuple(t["a.weight"].shape) == (3, 8, 8) and tuple(t["a.scales"].shape) == (3, 8, 2)
    with open_checkpoint(make_model(tmp_path / "m", t, MXFP4)) as ck:
        assert ck.info("a.weight").shape == (3, 8, 64)
        got = ck.read("a.weight")
        for e in range(3):  # each expert as the same expert quantized alone
            one = make_mlx_mxfp4(x[e])
            with open_checkpoint(make_model(tmp_path / f"e{e}", one, MXFP4)) as alone:
                assert torch.equal(got[e], alone.read("a.weight"))
        check_rounding_bound(x, got, t["a.scales"])
        assert ck.requantized_match("a.weight", x) == 1.0
        rows = ck.compared_rows("a.weight")
        assert rows.tolist() == list(range(24))  # rows of the last dimension: experts x outputs
        assert ck.requantized_match("a.weight", x.reshape(24, 64)[rows], rows=rows) == 1.0


def test_a_mixed_model_reads_each_layer_in_its_own_mode(tmp_path):
    """mlx-lm's per-layer entries: a layer's own settings, its mode affine unless named (mlx-lm passes the
    entry to ``to_quantized``, whose mode defaults to affine)."""
    a, b, c = make_matrix(8, 64, 1), make_matrix(8, 128, 2), make_matrix(4, 64, 3)
    tensors = {**make_mlx_mxfp4(a, name="a"), **make_mlx(b, bits=8, group=64, name="b"),
               **make_mlx_mxfp4(c, name="c"), "norm.weight": torch.ones(64)}
    for quantization in ({**MXFP4, "b": {"group_size": 64, "bits": 8}},
                         {"group_size": 64, "bits": 8, "a": MXFP4, "c": MXFP4},
                         {**MXFP4, "a": True, "b": {"group_size": 64, "bits": 8, "mode": "affine"}, "c": MXFP4}):
        folder = make_model(tmp_path / f"m{len(list(tmp_path.iterdir()))}", tensors, quantization)
        with open_checkpoint(folder) as ck:
            assert {t.name: (t.shape, ck.quantization(t.name)) for t in ck.tensors()} == {
                "a.weight": ((8, 64), "MXFP4"), "b.weight": ((8, 128), "MLX-8BIT"), "c.weight": ((4, 64), "MXFP4"),
                "norm.weight": ((64,), None)}
            for name, x in (("a", a), ("b", b), ("c", c)):
                assert ck.requantized_match(f"{name}.weight", x) == 1.0
            assert (ck.read("b.weight") - b).abs().max() < 0.01 * b.abs().max()  # 8 bits: far finer


def make_layer(**changes) -> dict:
    """One mxfp4 layer ``a`` of an (8, 64) matrix, ``changes`` (tensor name -> new value, None: dropped)."""
    t = {**make_mlx_mxfp4(make_matrix(8, 64)), **changes}
    return {k: v for k, v in t.items() if v is not None}


REFUSED = {
    "scales of another width": (make_layer(**{"a.scales": torch.full((8, 3), 120, dtype=torch.uint8)}), MXFP4,
                                r"a.weight \(8, 8\) does not hold 4-bit values for a.scales \(8, 3\) in groups of 32"),
    "float scales": (make_layer(**{"a.scales": torch.ones(8, 2, dtype=torch.float16)}), MXFP4,
                     r"a.scales is float16, not MXFP4's uint8 exponents"),
    "biases under mxfp4": (make_layer(**{"a.biases": torch.zeros(8, 2)}), MXFP4,
                           r"a.weight: uint32 codes with a.scales and a.biases \(MLX\), but the config.json beside "
                           r"it names mode mxfp4, which stores no biases"),
    "8-bit mxfp4": (make_layer(), {**MXFP4, "bits": 8}, r"names mxfp4 with bits 8 and group_size 32: the mode is 4 "
                                                        r"bits in groups of 32"),
    "nvfp4": (make_layer(), {"group_size": 16, "bits": 4, "mode": "nvfp4"},
              r"a.weight: uint32 codes with a.scales \(MLX\), but the config.json beside it names mode \"nvfp4\", "
              r"which is not read here \(affine, mxfp4 and mxfp8 are\)"),
    "4-bit mxfp8": (make_layer(), {"group_size": 32, "bits": 4, "mode": "mxfp8"},
                    r"names mxfp8 with bits 4 and group_size 32: the mode is 8 bits in groups of 32"),
    "affine entry without biases": (make_layer(), {**MXFP4, "a": {"group_size": 32, "bits": 4}},
                                    r"a.weight: uint32 codes with a.scales \(MLX\), but its entry 'a' in the "
                                    r"config.json's quantization names mode affine, whose a.biases is missing"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_parts_that_do_not_fit_are_refused_naming_file_and_tensor(tmp_path, case):
    tensors, quantization, message = REFUSED[case]
    folder = make_model(tmp_path / "m", tensors, quantization)
    with pytest.raises(CheckpointError, match=message) as e:
        open_checkpoint(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_an_exponent_byte_of_255_is_refused_when_read(tmp_path):
    """E8M0's 255 is NaN (MLX's own decoding: infinity): a corrupt checkpoint, not a weight."""
    scales = make_mlx_mxfp4(make_matrix(8, 64))["a.scales"].index_fill(1, torch.tensor([1]), 255)
    with open_checkpoint(make_model(tmp_path / "m", make_layer(**{"a.scales": scales}), MXFP4)) as ck:
        with pytest.raises(CheckpointError, match=r"cannot dequantize 'a.weight' \(MXFP4\): a.scales holds NaN or "
                                                  r"infinite scales"):
            ck.read("a.weight")


def test_a_uint32_weight_with_scales_under_no_mlx_config_stays_as_stored(tmp_path):
    """Neither biases nor a mode: nothing says it is MLX's, so it is left as it is (as before)."""
    folder = make_model(tmp_path / "m", make_layer(), {})
    with open_checkpoint(folder) as ck:
        assert {(t.name, t.dtype) for t in ck.tensors()} == {("a.scales", "uint8"), ("a.weight", "uint32")}


MXFP8 = {"group_size": 32, "bits": 8, "mode": "mxfp8"}


def test_a_handcrafted_mxfp8_word_reads_byte_by_byte(tmp_path):
    """Bytes low first: 0x38 (1.0), 0xB8 (-1.0), 0x7E (448, E4M3's largest), 0x01 (2**-9, its smallest); scale
    byte 126: 0.5."""
    words = torch.tensor([[0x017EB838] + [0] * 7], dtype=torch.int64).to(torch.uint32)
    folder = make_model(tmp_path / "m", {"a.weight": words, "a.scales": torch.tensor([[126]], dtype=torch.uint8)},
                        MXFP8)
    with open_checkpoint(folder) as ck:
        assert [(t.name, t.shape, ck.quantization(t.name)) for t in ck.tensors()] == [("a.weight", (1, 32), "MXFP8")]
        assert ck.read("a.weight").tolist() == [[0.5, -0.5, 224.0, 2.0**-10] + [0.0] * 28]


def test_an_mxfp8_matrix_and_its_experts_read_back_within_half_a_float8_step(tmp_path):
    x = torch.stack([make_matrix(8, 64, seed=e) for e in range(2)])  # (2, 8, 64): stacked experts
    t = make_mlx_mxfp8(x)
    assert tuple(t["a.weight"].shape) == (2, 8, 16) and tuple(t["a.scales"].shape) == (2, 8, 2)
    with open_checkpoint(make_model(tmp_path / "m", t, MXFP8)) as ck:
        got = ck.read("a.weight")
        s = torch.exp2(t["a.scales"].float() - 127).repeat_interleave(32, -1)  # (2, 8, 64)
        assert ((got - x).abs() <= torch.maximum(x.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)).all()  # 3
        assert ck.requantized_match("a.weight", x) == 1.0  # mantissa bits: half a step is 1/16 of the value
        nudged = x + 0.002 * torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
        assert ck.requantized_match("a.weight", nudged) < 0.5
        assert ck.rounding_variance("a.weight").shape == (2, 8, 64)
