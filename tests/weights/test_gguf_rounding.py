"""GGUFCheckpoint.rounding_variance: step**2 / 12 per value, 0 for the values that set a block's scale."""

import numpy as np
import pytest
import torch
from tests.weights.conftest import make_gguf_file

from modelatlas.weights import open_checkpoint

gguf = pytest.importorskip("gguf")


def make_quantized(path, x, kind):
    """``x`` as tensor "q" quantized to ``kind`` plus the same values plain as "p"."""
    return make_gguf_file(path, {"q": (gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]), kind), "p": x})


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_the_variance_matches_the_real_rounding_error(tmp_path, kind):
    x = (np.random.default_rng(0).standard_t(5, size=(128, 256)) * 0.02).astype(np.float32)  # heavy tails
    with open_checkpoint(make_quantized(tmp_path / "m.gguf", x, kind)) as ck:
        v = ck.rounding_variance("q")
        err = (ck.read("q").numpy() - x) ** 2
        assert v.shape == (128, 256) and v.dtype == torch.float32
        # 32 768 values: the mean square of a uniform error settles within ~1 %; measured 0.99-1.02 of it
        assert float(v.mean()) == pytest.approx(float(err.mean()), rel=0.04)
        assert ck.rounding_variance("p") is None


def test_a_q4_0_block_by_hand(tmp_path):
    # one block of 32: its largest |x| is -8 (signed), so d = 1 and the levels are -8 .. 7 apart by 1
    x = np.concatenate([[-8.0], np.linspace(-7.2, 6.8, 31)]).astype(np.float32)[None, :]  # (1, 32)
    with open_checkpoint(make_quantized(tmp_path / "b.gguf", x, "Q4_0")) as ck:
        v = ck.rounding_variance("q").numpy()[0]
    assert v[0] == 0.0  # the value that set the scale is stored exactly
    assert np.allclose(v[1:], 1 / 12)  # step 1: 1 / 12 each


def test_a_larger_scale_gives_a_larger_variance(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    x[1] *= 10
    with open_checkpoint(make_quantized(tmp_path / "s.gguf", x, "Q8_0")) as ck:
        v = ck.rounding_variance("q").numpy()
    assert np.median(v[1]) == pytest.approx(100 * np.median(v[0]), rel=0.3)


def test_an_iq4_nl_layer_by_hand(tmp_path):
    """Each value's error spread over its cell between the 16 levels d * kvalues its block can take (at an end,
    half the one gap), over the measured gain of llama.cpp's scale search (1.195)."""
    book = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float64)
    raw = np.random.default_rng(0).integers(0, 256, (4, 2, 18), dtype=np.uint8)  # 4 rows of 2 blocks of 32
    raw[:, :, 0:2] = np.full((4, 2), 0.01, np.float16).view(np.uint8).reshape(4, 2, 2)
    raw = raw.reshape(4, -1)
    with open_checkpoint(make_gguf_file(tmp_path / "iq.gguf", {"a": (raw, "IQ4_NL")})) as ck:
        v, x = ck.rounding_variance("a").numpy().astype(np.float64), ck.read("a").numpy()
    d = float(np.float16(0.01))
    k = np.abs(x[..., None] / d - book).argmin(-1)  # (4, 64) each value's code
    gaps = np.diff(book) * d
    a = np.where(k > 0, gaps[np.maximum(k - 1, 0)], 0.0) / 2
    b = np.where(k < 15, gaps[np.minimum(k, 14)], 0.0) / 2
    assert np.allclose(v, (a * a - a * b + b * b) / 3 / 1.195, rtol=1e-5)


def check_one_dequantization(monkeypatch, ck, name, calls_without):
    """``ck.rounding_variance(name, values)`` with the values read: the same variance as without them, and one
    dequantization of the layer's blocks (its grid or its IQ4 scales), where ``calls_without`` were made
    without them."""
    import gguf.quants as Q

    values = ck.read(name)
    calls, real = [], Q.dequantize
    monkeypatch.setattr(Q, "dequantize", lambda *a: calls.append(1) or real(*a))
    alone = ck.rounding_variance(name)
    assert len(calls) == calls_without
    calls.clear()
    given = ck.rounding_variance(name, values.reshape(1, -1))  # (1, P): as lineage.distances passes a row
    assert torch.equal(given, alone) and len(calls) == 1


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_legacy_types_dequantize_once_given_the_values(tmp_path, monkeypatch, kind):
    x = (np.random.default_rng(2).standard_t(5, size=(64, 256)) * 0.02).astype(np.float32)
    with open_checkpoint(make_quantized(tmp_path / "m.gguf", x, kind)) as ck:
        check_one_dequantization(monkeypatch, ck, "q", 2)  # the grid, then the stored values for the exact codes


@pytest.mark.parametrize("kind", ["IQ4_NL", "IQ4_XS"])
def test_iq4_types_dequantize_once_given_the_values(tmp_path, monkeypatch, kind):
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = np.random.default_rng(3).integers(0, 256, (8, 512 // block, size), dtype=np.uint8)
    raw[:, :, 0:2] = np.full(raw.shape[:2], 0.01, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    if kind == "IQ4_XS":  # sub-scales 1 - 32 (random bytes give some of 32 - 32 = 0: those take the 16 levels)
        raw[:, :, 2:4], raw[:, :, 4:8] = 0, 0x11
    with open_checkpoint(make_gguf_file(tmp_path / "iq.gguf", {"a": (raw.reshape(8, -1), kind)})) as ck:
        check_one_dequantization(monkeypatch, ck, "a", 2)  # the scales, then the stored values
