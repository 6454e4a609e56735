"""GGUFCheckpoint.rounding_variance of files quantized with an importance matrix (``quantize.imatrix.*``
metadata: the imatrix gains, no exact scale value but in Q8_0) and of IQ1-IQ3 (a share of each sub-block's
root mean square times its largest |value|)."""

import numpy as np
import pytest
from tests.weights.conftest import make_gguf_file, make_least_squares_q4_0

from modelatlas.weights import open_checkpoint
from modelatlas.weights.gguf_grid import GROUP_IQ, SEARCHED, SEARCHED_IMATRIX, SHARE_IQ

gguf = pytest.importorskip("gguf")


def make_raw(kind, rows=4, width=512, seed=0):
    """Random blocks of ``kind`` with a finite scale: float16 0.01 where a block starts with it, IQ1_M's scale
    (the top nibbles of its last 8 bytes) 0x3333 = 0.225."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, width // block, size), dtype=np.uint8)
    if kind == "IQ1_M":
        raw[:, :, -8:] = 0x30
    else:
        raw[:, :, 0:2] = np.full(raw.shape[:2], 0.01, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def test_the_imatrix_metadata_is_read(tmp_path):
    x = np.ones((2, 32), np.float32)
    with open_checkpoint(make_gguf_file(tmp_path / "i.gguf", {"p": x}, imatrix=True)) as ck:
        assert ck.imatrix and ck.metadata["quantize.imatrix.chunks_count"] == 100
        assert ck.metadata["quantize.imatrix.file"] == "model.imatrix"
    with open_checkpoint(make_gguf_file(tmp_path / "p.gguf", {"p": x})) as ck:
        assert not ck.imatrix


def test_a_q4_0_block_with_an_imatrix_has_no_exact_value(tmp_path):
    # one block of 32, d = 1: without an imatrix the value that set the scale (code 0) is exact; with one the
    # scale is searched (weighted), so every value gets step**2 / 12 over the imatrix gain
    x = np.concatenate([[-8.0], np.linspace(-7.2, 6.8, 31)]).astype(np.float32)[None, :]  # (1, 32)
    q = (gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0), "Q4_0")
    with open_checkpoint(make_gguf_file(tmp_path / "i.gguf", {"q": q}, imatrix=True)) as ck:
        v = ck.rounding_variance("q").numpy()[0]
    assert np.allclose(v, 1 / 12 / SEARCHED_IMATRIX["Q4_0"])
    with open_checkpoint(make_gguf_file(tmp_path / "p.gguf", {"q": q})) as ck:
        assert ck.rounding_variance("q").numpy()[0, 0] == 0.0


def test_q8_0_ignores_the_imatrix(tmp_path):
    # llama.cpp's Q8_0 is the reference rounding with or without one: its largest value stays exact
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    q = (gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), "Q8_0")
    with open_checkpoint(make_gguf_file(tmp_path / "i.gguf", {"q": q}, imatrix=True)) as ck:
        v = ck.rounding_variance("q").numpy()
    assert (v == 0).sum() == 4  # one per block of 32


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"])
def test_searched_types_take_the_imatrix_gain(tmp_path, kind):
    raw = make_raw(kind)
    with open_checkpoint(make_gguf_file(tmp_path / "i.gguf", {"a": (raw, kind)}, imatrix=True)) as ck:
        with_imatrix = ck.rounding_variance("a").double().numpy()
    with open_checkpoint(make_gguf_file(tmp_path / "p.gguf", {"a": (raw, kind)})) as ck:
        plain = ck.rounding_variance("a").double().numpy()
    assert np.all(np.isfinite(plain)) and plain.max() > 0
    assert np.allclose(with_imatrix, plain * SEARCHED[kind] / SEARCHED_IMATRIX[kind], rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(GROUP_IQ))
def test_iq1_to_iq3_share_of_each_sub_block(tmp_path, kind):
    with open_checkpoint(make_gguf_file(tmp_path / "q.gguf", {"a": (make_raw(kind), kind)}, imatrix=True)) as ck:
        v, x = ck.rounding_variance("a"), ck.read("a").double().numpy()
    assert v is not None and tuple(v.shape) == (4, 512)
    g = x.reshape(4, -1, GROUP_IQ[kind])  # (4, m / g, g)
    want = SHARE_IQ[kind] * np.sqrt((g**2).mean(2)) * np.abs(g).max(2)  # (4, m / g)
    each = v.double().numpy().reshape(g.shape)
    assert np.allclose(each, want[:, :, None], rtol=1e-5) and want.min() > 0


def test_least_squares_scales_are_told_from_rounding_to_nearest(tmp_path):
    """A legacy block rounded to nearest holds its largest |value| on code 0 (it sets the scale); a least-squares
    scale leaves it off in many blocks (llama-quantize --imatrix), which the file's type does not say."""
    x = np.random.default_rng(0).standard_t(5, (16, 256)).astype(np.float32)
    rtn = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    fitted = make_least_squares_q4_0(x)
    path = make_gguf_file(tmp_path / "m.gguf", {"rtn": (rtn, "Q4_0"), "ls": (fitted, "Q4_0"), "p": x,
                                                "q8": (gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), "Q8_0")})
    with open_checkpoint(path) as ck:
        assert ck.least_squares("rtn") is False and ck.least_squares("q8") is False
        assert ck.least_squares("ls") is True
        assert ck.least_squares("p") is None
        assert np.abs(ck.read("ls").numpy() - x).mean() < np.abs(ck.read("rtn").numpy() - x).mean()  # a real fit


def test_the_share_of_blocks_on_their_scale_codes_decides():
    """Hand-made Q4_0 rows, scale 1: a block with a code 0 read as rounded to nearest; 3 of 10 blocks without
    one (a share of 0.7 < ROUNDED_SHARE) as least squares; a block of scale 0 does not count."""
    from modelatlas.weights.gguf_grid import ROUNDED_SHARE, least_squares_blocks

    def block(code0: bool, d: float = 1.0) -> np.ndarray:
        codes = np.full(32, 9, np.uint8)
        codes[5] = 0 if code0 else 1
        return np.concatenate([np.array([d], np.float16).view(np.uint8), codes[:16] | (codes[16:] << 4)])

    q4 = gguf.GGMLQuantizationType.Q4_0
    sizes = gguf.GGML_QUANT_SIZES[q4]
    rows = np.stack([np.concatenate([block(i >= 3) for i in range(10)])])  # (1, 10 blocks x 18)
    assert 0.7 < ROUNDED_SHARE and least_squares_blocks("Q4_0", q4, rows, sizes, (0,)) is True
    rows = np.stack([np.concatenate([block(True)] * 9 + [block(False, 0.0)])])
    assert least_squares_blocks("Q4_0", q4, rows, sizes, (0,)) is False
    assert least_squares_blocks("Q4_0", q4, np.stack([block(False, 0.0)]), sizes, (0,)) is None
