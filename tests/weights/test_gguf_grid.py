import numpy as np
import pytest

from modelatlas.weights.gguf_grid import GRIDS, LEGACY, grid, grid_match

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
# where each K-quant block keeps its float16 super-scales (d, then dmin where there is one)
SUPER = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make_k_rows(kind, rows=3, blocks=2, seed=0):
    """(raw rows (rows, bytes), dequantized (rows, 256 blocks)) of random K-quant blocks: random codes and
    sub-block scales, float16 super-scales 0.01 / 0.004 (random bytes there could be NaN)."""
    t = T[kind]
    _, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for at, value in zip(SUPER[kind], (0.01, 0.004)):
        raw[:, :, at:at + 2] = np.full((rows, blocks), value, np.float16).view(np.uint8).reshape(rows, blocks, 2)
    raw = raw.reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, t)


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_stored_values_sit_on_the_grid_read_from_the_blocks(kind):
    """The code bytes' places and fills are right: every value is lowest level + an integer step count in the
    type's code range (a wrong region or fill leaves fractions or codes out of range)."""
    raw, values = make_k_rows(kind)
    lo, step = grid(kind, T[kind], raw, gguf.GGML_QUANT_SIZES[T[kind]][1])
    live = step != 0
    codes = (values - lo)[live] / step[live]
    assert live.mean() > 0.5 and np.allclose(codes, np.rint(codes), atol=1e-4)
    assert codes.min() > -1e-4 and codes.max() < GRIDS[kind][0] - 1 + 1e-4 and np.ptp(np.rint(codes)) > 1


@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_a_source_matches_its_quantization_and_a_fine_tune_does_not(kind):
    raw, values = make_k_rows(kind)
    size = gguf.GGML_QUANT_SIZES[T[kind]][1]
    lo, step = grid(kind, T[kind], raw, size)
    rng = np.random.default_rng(1)
    source = values + rng.uniform(-0.45, 0.45, values.shape) * step  # rounds back to the stored values
    codes = np.rint((values - lo) / np.where(step == 0, 1, step))
    ends = (codes == 0) | (codes == GRIDS[kind][0] - 1)
    source[ends] = values[ends] + np.where(codes[ends] == 0, -3, 3) * step[ends]  # beyond the end: clamped
    assert grid_match(kind, T[kind], raw, size, values, source) == 1.0
    tuned = source + rng.standard_normal(values.shape) * np.abs(step)  # a change the size of a step
    assert grid_match(kind, T[kind], raw, size, values, tuned) < 0.8


@pytest.mark.parametrize("kind", ["IQ4_NL", "IQ4_XS"])
def test_codebook_types_match_the_nearest_of_their_16_values(kind):
    from modelatlas.weights.gguf_grid import codebook_match

    t = T[kind]
    _, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(0).integers(0, 256, (4, 256 // gguf.GGML_QUANT_SIZES[t][0], size), dtype=np.uint8)
    raw[:, :, 0:2] = np.full(raw.shape[:2], 0.01, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(4, -1)
    values = gguf.quants.dequantize(raw, t)
    rng = np.random.default_rng(1)
    assert codebook_match(kind, t, raw, size, values, values * (1 + 1e-4 * rng.standard_normal(values.shape))) == 1.0
    moved = values + rng.standard_normal(values.shape) * 0.3 * np.abs(values).mean()
    assert codebook_match(kind, t, raw, size, values, moved) < 0.8


@pytest.mark.parametrize("kind", ["IQ4_NL", "IQ4_XS"])
def test_codebook_levels_are_the_dequantized_codes_bit_for_bit(kind):
    """Scale times book value gives what the package's dequantizer gives with every code set to 0 .. 15 (one
    dequantization in place of 16), whatever the sub-block scales (random bytes; IQ4_XS: signed 6-bit)."""
    from modelatlas.weights.gguf_grid import CODEBOOKS, _book_levels, _with_codes

    t = T[kind]
    _, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(2).integers(0, 256, (3, 512 // gguf.GGML_QUANT_SIZES[t][0], size), dtype=np.uint8)
    raw[:, :, 0:2] = np.random.default_rng(3).uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16).view(
        np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(3, -1)
    first, end = CODEBOOKS[kind]
    levels = list(_book_levels(kind, t, raw, size))
    assert len(levels) == 16
    for code, level in enumerate(levels):
        check = _with_codes(raw, t, size, [(first, end, code | (code << 4))])  # the package's, code by code
        assert level.dtype == np.float64 and np.array_equal(level, check)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN and infinite scales, on purpose
@pytest.mark.parametrize("kind", ["IQ4_NL", "IQ4_XS"])
def test_codebook_gaps_by_code_are_those_by_all_16_levels(kind):
    """The neighbours read off each value's code are, bit for bit, the nearest of all 16 levels on each side,
    whatever the scales: random bytes, float16 scales of either sign, 0, subnormal, inf and NaN, and values
    off the levels (those go the slow way)."""
    from modelatlas.weights.gguf_grid import _book_gaps, _book_levels, _gaps_by_levels

    t = T[kind]
    _, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(4).integers(0, 256, (4, 2048 // gguf.GGML_QUANT_SIZES[t][0], size), dtype=np.uint8)
    d = np.random.default_rng(5).uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
    d.flat[:6] = [0.0, -0.0, 6e-8, np.inf, np.nan, -3e-5]
    raw[:, :, 0:2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(4, -1)
    stored = gguf.quants.dequantize(raw, t).astype(np.float64)
    stored[3, :40] += 1e-3  # off the levels
    fast = _book_gaps(kind, t, raw, size, stored)
    slow = _gaps_by_levels(_book_levels(kind, t, raw, size), stored)
    for a, b in zip(fast, slow):
        assert np.array_equal(a, b, equal_nan=True)
    assert (fast[0] > 0).mean() > 0.5 and (fast[1] > 0).mean() > 0.5  # most values have both neighbours


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN and infinite scales, on purpose
@pytest.mark.parametrize("kind", sorted({**GRIDS, **LEGACY}))
def test_one_dequantization_gives_the_grid_of_two_bit_for_bit(kind):
    """The grid from one dequantization of alternating codes is the lowest level and the difference of the
    next, each dequantized whole (as it was read before), whatever the bytes: float16 scales of either sign,
    0, -0, subnormal, inf, NaN."""
    from modelatlas.weights.gguf_grid import _with_codes

    t = T[kind]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.random.default_rng(6).integers(0, 256, (3, 4096 // block, size), dtype=np.uint8)
    for n, at in enumerate(SUPER.get(kind, (0,))):  # the float16 scales (a legacy block's d first)
        d = np.random.default_rng(7 + n).uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
        d.flat[:7] = [0.0, -0.0, 6e-8, np.inf, -np.inf, np.nan, -3e-5]
        raw[:, :, at:at + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(3, -1)
    regions = {**GRIDS, **LEGACY}[kind][1]
    with np.errstate(invalid="ignore"):
        lo = _with_codes(raw, t, size, [(a, b, low) for a, b, low, _ in regions])
        step = _with_codes(raw, t, size, [(a, b, nxt) for a, b, _, nxt in regions]) - lo
    got = grid(kind, t, raw, size)
    for a, b in zip(got, (lo, step)):
        real = ~np.isnan(b)  # (a NaN's sign bit means nothing)
        assert np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a[real]), np.signbit(b[real]))


def check_share_by_every_slack(kind, raw, values, x):
    """grid_test's share computed with every value's tolerance terms (rel_tol = abs_tol = 0), as before its
    one-number slack."""
    from modelatlas.weights.gguf_grid import OFFSET, TOL

    n = {**GRIDS, **LEGACY}[kind][0]
    lo, step = grid(kind, T[kind], raw, gguf.GGML_QUANT_SIZES[T[kind]][1])
    flat = step == 0
    safe = np.where(flat, 1.0, step)
    code = np.rint((values - lo) / safe)
    offset = np.abs(lo) if kind in OFFSET else 0.0
    t = (x.astype(np.float64) - lo) / safe
    ax, s = np.abs(x), np.abs(safe)
    slack = TOL + ((0.0 * ax + 0.0) + (ax / s * np.maximum(0.0 * s, 0.0) + 0.0 * offset + 0.0)) / s
    near = np.abs(t - code) <= 0.5 + slack
    clamped = ((code == 0) & (t <= 0.5 + slack)) | ((code == n - 1) & (t >= n - 1.5 - slack))
    return float(np.mean(flat | near | clamped))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the infinite and NaN values, on purpose
@pytest.mark.parametrize("kind", sorted(GRIDS))
def test_share_with_one_slack_is_the_share_with_every_values(kind):
    """The zero-tolerance test's one-number slack gives the share every value's tolerance terms gave, on a
    source, a fine-tune, and values with infs, a NaN or a float64 so large that |x| / step overflows (there
    the terms are NaN, not 0: the general path)."""
    from modelatlas.weights.gguf_grid import grid_test

    raw, values = make_k_rows(kind, rows=4, blocks=3, seed=5)
    size = gguf.GGML_QUANT_SIZES[T[kind]][1]
    lo, step = grid(kind, T[kind], raw, size)
    rng = np.random.default_rng(2)
    source = (values + rng.uniform(-0.45, 0.45, values.shape) * step).astype(np.float32)
    tuned = (source + rng.standard_normal(values.shape) * np.abs(step)).astype(np.float32)
    code = np.rint((values - lo) / np.where(step == 0, 1, step))
    odd = [source.copy() for _ in range(3)]
    odd[0][code == GRIDS[kind][0] - 1] = np.inf  # beyond the top level: clamped only with a finite slack
    odd[1][1, 3] = np.nan
    odd[2] = odd[2].astype(np.float64)
    odd[2][2, -1] = 1e306
    test = grid_test(kind, T[kind], raw, size, values)
    for x in [source, tuned, *odd]:
        assert test(x) == check_share_by_every_slack(kind, raw, values, x)
    assert test(source) == 1.0 > test(odd[0])  # infinite values count as misses, as they did
