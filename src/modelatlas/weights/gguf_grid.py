"""The value grid of GGUF K-quant blocks (Q2_K .. Q6_K), to tell whether a tensor is a given one quantized.

A K-quant block of 256 values holds sub-blocks of 16 or 32 with their own scale ``d`` and offset ``m``
(6- or 8-bit, times the block's float16 super-scales); a value is ``d q - m`` for an integer code ``q`` of
2 to 6 bits. llama.cpp searches for the scales (with an importance matrix or not), which no reference
here reproduces, but it then sets every code to the nearest level of the stored scales
(``l = nearest_int((x + dm) / d)``, clamped to the code range: ``quantize_row_q4_K_ref`` and the others,
with or without an importance matrix). So a tensor is ``x`` quantized exactly when each stored value is
the level nearest to ``x`` on its sub-block's grid, or the end level when ``x`` lies beyond it.

The grid is read with the ``gguf`` package's own dequantizer: the block with every code set to the lowest
value gives the lowest level of each value's sub-block, with every code set to the next value the level
above, so the scale decoding (6-bit packing, signed scales) is the package's. Only the bytes that hold
the codes are overwritten; their places are ggml's block layouts. The calibrations of each type's rounding
variance (:data:`SEARCHED`, :data:`SEARCHED_IMATRIX`, :data:`SHARE_IQ`) live here too (from gguf_format, session 34).
"""

from __future__ import annotations

import numpy as np

# type -> (levels, [(first byte, end byte, fill for the lowest code, fill for the next code), ...]) of the
# bytes holding the codes in one block (ggml-common.h's block_qN_K)
GRIDS = {
    "Q2_K": (4, [(16, 80, 0x00, 0x55)]),                          # scales[16], qs[64] 2-bit, d, dmin
    "Q3_K": (8, [(0, 32, 0x00, 0x00), (32, 96, 0x00, 0x55)]),     # hmask[32] (bit 0: q - 4), qs[64], scales, d
    "Q4_K": (16, [(16, 144, 0x00, 0x11)]),                        # d, dmin, scales[12], qs[128] 4-bit
    "Q5_K": (32, [(16, 48, 0x00, 0x00), (48, 176, 0x00, 0x11)]),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": (64, [(0, 128, 0x00, 0x11), (128, 192, 0x00, 0x00)]),  # ql[128] 4-bit, qh[64] 2-bit, scales, d
}
# the legacy types, quantized to the nearest level of their block's scale too (exactly reproducible, so
# tested by quantizing again; on their grid only against a half-precision source: see grid_test's rel_tol)
LEGACY = {
    "Q4_0": (16, [(2, 18, 0x00, 0x11)]),                     # d, qs[16] 4-bit: (q - 8) d
    "Q4_1": (16, [(4, 20, 0x00, 0x11)]),                     # d, m, qs[16]: q d + m
    "Q5_0": (32, [(2, 6, 0x00, 0x00), (6, 22, 0x00, 0x11)]),  # d, qh[4], qs[16]: (q - 16) d
    "Q5_1": (32, [(4, 8, 0x00, 0x00), (8, 24, 0x00, 0x11)]),  # d, m, qh[4], qs[16]: q d + m
    "Q8_0": (256, [(2, 34, 0x80, 0x81)]),                    # d, qs[32] int8: q d (code 0 = -128)
}
OFFSET = {"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"}  # types whose levels are q d + m (code 0: the offset m)
TOL = 1e-3  # in steps: float32 rounding of (x + dm) / d near a tie
# the 4-bit non-linear types: a code picks one of 16 fixed values (kvalues_iq4nl) times the block's scale;
# type -> the bytes holding the codes (nibbles) in one block (block_iq4_nl: d, qs[16]; block_iq4_xs: d,
# scales_h, scales_l[4], qs[128])
CODEBOOKS = {"IQ4_NL": (2, 18), "IQ4_XS": (8, 136)}


# the share of a legacy layer's blocks holding their scale codes under which its scales were fitted by least
# squares (:func:`least_squares_blocks`): round to nearest puts them in every block (1.000 on every layer of
# llama-quantize's files without an importance matrix), its least-squares fit in 0.65-0.81 (llama-quantize
# --pure --imatrix, t(5) weights, random importances: Q4_0 0.78-0.81, Q5_0 0.69-0.73, Q4_1 0.72-0.77, Q5_1
# 0.65-0.69; Q8_0 ignores the matrix: 1.000)
ROUNDED_SHARE = 0.95
# the K-quants' real error is smaller than a uniform one over their step: llama.cpp searches each sub-block's
# scale (and offset) for the least squared error, which puts values nearer their levels. step**2 / 12 over the
# real mean squared error of llama-quantize's output (bench/lineage_llamacpp.py's model, t(5) and Gaussian
# weights): Q2_K 1.23 / 1.27, Q3_K 1.10 / 1.08, Q4_K 1.27 / 1.30, Q5_K 1.15 / 1.17, Q6_K 1.16 / 1.21; the mean
# of the two divides the variance (legacy types, quantized plainly: 0.98-1.02 without)
# (IQ4_NL 1.19 / 1.20, IQ4_XS 1.17 / 1.18: their block scales are searched too, the error spread over each code's
# cell between its block's 16 levels)
SEARCHED = {"Q2_K": 1.25, "Q3_K": 1.09, "Q4_K": 1.28, "Q5_K": 1.16, "Q6_K": 1.18, "IQ4_NL": 1.195, "IQ4_XS": 1.175}
# with an importance matrix (llama-quantize --imatrix, recorded as quantize.imatrix.* metadata) the scale
# search weights each column by its activation energy: the important columns lie nearer their levels (the
# 10 % most important: 0.4-0.7 of step**2 / 12 / SEARCHED), the others farther (the 10 % least: 1.3-3.9x, Q6_K
# clipping t(5) tails), and the layer's error grows: real / estimate without this 1.07-1.41 (bench/gguf_imatrix.py,
# seeds 0 and 1, t(5) / Gaussian weights, log-normal importances sigma 1.5: Q2_K 1.215 / 1.206, Q3_K 1.147 /
# 1.135, Q4_K 1.178 / 1.159, Q5_K 1.092 / 1.070, Q6_K 1.281 / 1.138, IQ4_XS 1.108 / 1.101, IQ4_NL 1.117 /
# 1.109); SEARCHED over the mean of the two. The legacy types but Q8_0 search their scale too with one (no
# value exact: no gguf_format.SCALE_CODES), real / (step**2 / 12): Q4_0 1.022 / 1.018, Q4_1 0.904 / 0.895, Q5_0 0.995 /
# 0.991, Q5_1 0.889 / 0.885; one over the mean. Q8_0 ignores the matrix (ggml's reference rounding: 1.00).
# The gain follows the matrix's spread, which the file does not hold: on held-apart seeds 2 and 3 real /
# estimate was 0.88-0.97 with sigma 1.0 and 1.02-1.13 with sigma 2.0 (the IQ4 and K-quants; 1.17-1.27 before)
SEARCHED_IMATRIX = {"Q2_K": 1.032, "Q3_K": 0.955, "Q4_K": 1.095, "Q5_K": 1.073, "Q6_K": 0.976, "IQ4_NL": 1.074,
                    "IQ4_XS": 1.064, "Q4_0": 0.980, "Q4_1": 1.112, "Q5_0": 1.007, "Q5_1": 1.127}
# IQ1-IQ3 (lattice codebooks with sign bits and a scale per sub-block of GROUP_IQ values, quantized only with an
# importance matrix): the error variance is a constant share of the sub-block's root mean stored square times
# its largest |value| (both the scale times a codebook's magnitude; the mean square alone read t(5) weights
# 10-27 % apart from Gaussian ones, the largest alone 20-40 % the other way); the share is the mean of
# real / estimate over t(5) and Gaussian weights (bench/gguf_imatrix.py, seeds 0 and 1; within 6 % of either).
# Held apart (seeds 2 and 3): 0.82-0.96 with sigma 1.0, 1.03-1.37 with sigma 2.0 (the error follows the spread)
GROUP_IQ = {"IQ1_S": 32, "IQ1_M": 16, "IQ2_XXS": 32, "IQ2_XS": 16, "IQ2_S": 16, "IQ3_XXS": 32, "IQ3_S": 32}
SHARE_IQ = {"IQ1_S": 0.164, "IQ1_M": 0.150, "IQ2_XXS": 0.0710, "IQ2_XS": 0.0546, "IQ2_S": 0.0406,
            "IQ3_XXS": 0.0189, "IQ3_S": 0.0097}
GROUP = 16  # consecutive values that share their sub-block's scales in every type here (Q2_K, Q3_K, Q6_K: 16)


def _with_codes(rows: np.ndarray, ggml_type, type_size: int, fills: list[tuple[int, int, int]],
                every: int = 1) -> np.ndarray:
    """``rows`` (r, row bytes) dequantized, float64 (r, m), with the codes of :func:`_coded`."""
    return _coded(rows, ggml_type, type_size, fills, every).astype(np.float64)  # (r, m)


def _coded(rows: np.ndarray, ggml_type, type_size: int, fills: list[tuple[int, int, int]],
           every: int = 1) -> np.ndarray:
    """``rows`` (r, row bytes) dequantized as the package gives them (float32, (r, m)), with every
    ``every``-th byte of ``first:end`` of every block set to ``byte`` for each (first, end, byte) of ``fills``
    in turn: the blocks' scales with chosen codes."""
    from gguf.quants import dequantize

    blocks = np.array(rows, dtype=np.uint8).reshape(len(rows), -1, type_size)  # (r, blocks, bytes)
    for first, end, byte in fills:
        blocks[:, :, first:end:every] = byte
    return dequantize(blocks.reshape(len(rows), -1), ggml_type)  # (r, m)


def grid(kind: str, ggml_type, rows: np.ndarray, type_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lowest level, step) of each value's sub-block, both (r, m) float64, for ``rows`` (r, row bytes) of
    a ``kind`` tensor (:func:`group_grid`, each group's for its :data:`GROUP` values). A step may be 0 (a
    sub-block whose scale is 0) or negative (signed scales). Time O(r m)."""
    lo, step = group_grid(kind, ggml_type, rows, type_size)
    return np.repeat(lo, GROUP, axis=1), np.repeat(step, GROUP, axis=1)  # (r, m / GROUP) -> (r, m)


def group_grid(kind: str, ggml_type, rows: np.ndarray, type_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lowest level, step) of each group of :data:`GROUP` values of ``rows`` (r, row bytes), both (r, m /
    GROUP) float64. One dequantization: the code bytes alternate between the lowest code's fill and the
    next's, and in every type's layout consecutive code bytes hold consecutive values of one sub-block, so a
    group's first value is its lowest level and its second the next; bit for bit what dequantizing every code
    the lowest, then every code the next, gave (tests/weights/test_gguf_grid.py, on random bytes). Time
    O(r m)."""
    regions = {**GRIDS, **LEGACY}[kind][1]
    fills = [(a, b, low) for a, b, low, _ in regions] + [(a + 1, b, nxt) for a, b, _, nxt in regions]
    groups = _coded(rows, ggml_type, type_size, fills, every=2).reshape(len(rows), -1, GROUP)  # (r, m / GROUP, GROUP)
    lo = groups[:, :, 0].astype(np.float64)  # (r, m / GROUP)
    with np.errstate(invalid="ignore"):  # a non-finite scale: NaN, as before
        return lo, groups[:, :, 1].astype(np.float64) - lo


def grid_test(kind: str, ggml_type, rows: np.ndarray, type_size: int, stored: np.ndarray, rel_tol: float = 0.0,
              abs_tol: float = 0.0):
    """``x -> share`` of the ``stored`` values (r, m) that are the level of their sub-block's grid nearest to
    ``x`` (r, m), or its end level with ``x`` beyond it; the grid is read once for any number of ``x``.
    1.0 for a quantization of ``x``; a quantized fine-tune of ``x`` misses about |change| / step of its
    values. ``rel_tol``, ``abs_tol``: ``x`` is a rounding of the values that were quantized, and the scale
    and offset a rounding of those they were quantized with, each to within ``rel_tol`` of its size or
    ``abs_tol``, whichever is larger (float16: 2**-11, and 2**-25 among its subnormals), so a level that
    close to the nearest counts too. With no tolerance, a finite grid and a finite ``x`` every value's slack is
    :data:`TOL` exactly (each tolerance term 0.0), taken as one number: the same shares (session 32: 234
    shares of a 1B copy test 2.75 -> 0.74 s under cProfile). Time O(r m) to build, O(r m) a test."""
    n = {**GRIDS, **LEGACY}[kind][0]
    lo, step = grid(kind, ggml_type, rows, type_size)
    flat = step == 0  # every value of such a sub-block is its offset, whatever x
    safe = np.where(flat, 1.0, step)
    code = np.rint((stored - lo) / safe)  # (r, m) the stored code, 0 .. n - 1
    offset = np.abs(lo) if kind in OFFSET else 0.0  # a level is q d - m: m's rounding moves every level
    exact = rel_tol == 0 and abs_tol == 0 and lo.size and np.isfinite(lo).all() and np.isfinite(safe).all()
    least = float(np.abs(safe).min()) if exact else 0.0

    def share(x: np.ndarray) -> float:
        t = (x.astype(np.float64) - lo) / safe  # where x falls on the grid
        if exact and np.isfinite(float(np.abs(x).max()) / least):  # every |x| / s finite: slack TOL + 0.0 / s
            slack = TOL
        else:
            ax, s = np.abs(x), np.abs(safe)
            moved = rel_tol * ax + abs_tol  # x's rounding
            levels = ax / s * np.maximum(rel_tol * s, abs_tol) + rel_tol * offset + abs_tol  # scale's, offset's
            slack = TOL + (moved + levels) / s  # (r, m) in steps
        near = np.abs(t - code) <= 0.5 + slack
        clamped = ((code == 0) & (t <= 0.5 + slack)) | ((code == n - 1) & (t >= n - 1.5 - slack))
        return float(np.mean(flat | near | clamped))

    return share


def least_squares_blocks(kind: str, ggml_type, rows: np.ndarray, sizes: tuple[int, int],
                         codes: tuple[int, ...]) -> bool | None:
    """Whether the blocks of ``rows`` (r, row bytes) of a legacy ``kind`` tensor (``sizes``: values and bytes a
    block) were scaled by least squares: fewer than :data:`ROUNDED_SHARE` of them (of non-zero scale) hold
    their scale ``codes`` (each of them with an offset, :data:`OFFSET`: the block's smallest and largest value;
    without, any: its largest |value|). Rounding to nearest (ggml's reference quantizers) sets the scale from
    those values, so they sit on the end levels in every block; llama.cpp's least-squares fit (with an
    importance matrix) leaves them off in a quarter or a third of the blocks. None when no block has a
    scale. Time O(r m)."""
    from gguf.quants import dequantize

    block, type_size = sizes
    lo, step = group_grid(kind, ggml_type, rows, type_size)  # (r, m / GROUP) each
    stored = dequantize(rows, ggml_type).astype(np.float64).reshape(lo.shape + (GROUP,))  # (r, m / GROUP, GROUP)
    with np.errstate(invalid="ignore"):
        code = np.rint((stored - lo[:, :, None]) / np.where(step == 0, 1.0, step)[:, :, None])
    code = code.reshape(len(rows), -1, block)  # (r, blocks, block)
    live = (step != 0).reshape(len(rows), -1, block // GROUP).all(axis=2)  # (r, blocks)
    held = [(code == c).any(axis=2) for c in codes]  # (r, blocks) each
    has = np.logical_and.reduce(held) if kind in OFFSET else np.logical_or.reduce(held)
    return bool(has[live].mean() < ROUNDED_SHARE) if live.any() else None


def grid_match(kind: str, ggml_type, rows: np.ndarray, type_size: int, stored: np.ndarray,
               x: np.ndarray) -> float:
    """:func:`grid_test` of one ``x``."""
    return grid_test(kind, ggml_type, rows, type_size, stored)(x)


def codebook_match(kind: str, ggml_type, rows: np.ndarray, type_size: int, stored: np.ndarray,
                   x: np.ndarray) -> float:
    """Share of the ``stored`` values (r, m) that are, of the 16 values their code could take (each block's
    rows dequantized with every code set to 0 .. 15 in turn), the one nearest to ``x`` (r, m): llama.cpp
    picks the nearest codebook value once it has chosen a block's scale. A copy: 99.89-99.99 % on
    llama.cpp's IQ4_NL / IQ4_XS (the rest: rounding of the scales near a tie); a fine-tune 0.1 % away:
    99.71-99.78 %. Time O(16 r m), memory O(r m): the 16 levels are visited, not stacked."""
    x = x.astype(np.float64)
    mine = np.abs(stored.astype(np.float64) - x)  # (r, m) the stored value is its code's level
    best, top = np.full_like(x, np.inf), np.zeros_like(x)  # nearest level's distance, largest |level|
    for level in _book_levels(kind, ggml_type, rows, type_size):
        np.minimum(best, np.abs(level - x), out=best)
        np.maximum(top, np.abs(level), out=top)
    return float(np.mean(mine <= best + 1e-6 * top))


def codebook_variance(kind: str, ggml_type, rows: np.ndarray, type_size: int, stored: np.ndarray) -> np.ndarray:
    """(r, m) variance of the rounding error of each ``stored`` value of an IQ4 codebook type: the error spread
    evenly over its level's cell, half way to the levels next to it among the 16 its block can take
    (:func:`_book_levels`; at an end, the one gap: :func:`~modelatlas.weights.grid_position.cell_variance`).
    The neighbours are read off each value's code (:func:`_book_gaps`). Time O(r m), memory O(r m)."""
    from modelatlas.weights.grid_position import cell_variance

    return cell_variance(*_book_gaps(kind, ggml_type, rows, type_size, stored))  # numpy: no thread pool to wait on


def _book_gaps(kind: str, ggml_type, rows: np.ndarray, type_size: int, stored: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(r, m) float64 gaps from each ``stored`` value to the nearest of its block's 16 levels below and above
    it, 0 where there is none (an end level). A level is ``scale * book value``, an exact float32 product (a
    float16 scale times a 6-bit sub-scale times a 7-bit book value: at most 24 bits), so a nonzero scale's
    levels are distinct and ordered as its book values: the value's code is ``stored / scale`` and the nearest
    levels are those of the codes beside it, the same float32 products the dequantizer forms. Values this does
    not hold for (a zero or non-finite scale, a value off the levels) are compared with all 16
    (:func:`_gaps_by_levels`). Time O(r m)."""
    scale = _book_scale(kind, ggml_type, rows, type_size)  # (r, m) float32
    x, x64 = stored.astype(np.float32), stored.astype(np.float64)
    with np.errstate(all="ignore"):  # a zero or non-finite scale: those values go the slow way
        return _gaps_by_code(scale, x, x64)


def _gaps_by_code(scale: np.ndarray, x: np.ndarray, x64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_book_gaps` of ``x`` (float32) and ``x64`` (the values as given), ``scale`` (float32) each
    value's. Time O(r m)."""
    from gguf.quants import IQ4_NL

    book = np.array(IQ4_NL.kvalues, dtype=np.float32)  # (16,) ascending
    q = x / scale  # (r, m) the book value, exactly, for a value on its levels
    table = np.full(256, -1, dtype=np.int64)  # book value + 128 -> code
    table[book.astype(np.int64) + 128] = np.arange(16)
    whole = np.isfinite(q) & (np.abs(q) <= 127) & (scale != 0)
    code = np.where(whole, table[np.where(whole, q, 0).astype(np.int64) + 128], -1)
    ok = whole & (code >= 0) & (book[np.clip(code, 0, 15)] == q) & (x == x64)
    up = np.where(scale > 0, 1, -1)  # the code of the next level up: levels descend with a negative scale
    gaps = []
    for side, sign in ((code - up, 1.0), (code + up, -1.0)):  # below, above
        inside = ok & (side >= 0) & (side <= 15)
        level = (scale * book[np.clip(side, 0, 15)]).astype(np.float64)  # (r, m)
        gaps.append(np.where(inside, sign * (x64 - level), 0.0))
    if not ok.all():  # the rest, by every level
        slow = _gaps_by_levels(_scaled_book(scale[~ok]), x64[~ok])  # (the scales at hand: not dequantized again)
        for gap, other in zip(gaps, slow):
            gap[~ok] = other
    return gaps[0], gaps[1]


def _gaps_by_levels(levels, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaps from ``x`` (float64) to the nearest of ``levels`` (arrays like ``x``) strictly below and above it,
    0 where none is. Time O(levels x size)."""
    below, above = np.full_like(x, np.inf), np.full_like(x, np.inf)
    for level in levels:
        gap = level - x
        np.minimum(above, np.where(gap > 0, gap, np.inf), out=above)
        np.minimum(below, np.where(gap < 0, -gap, np.inf), out=below)
    # an end level has no level beyond it: 0 there, which cell_variance reads as no side
    return np.where(np.isinf(below), 0.0, below), np.where(np.isinf(above), 0.0, above)


def _book_scale(kind: str, ggml_type, rows: np.ndarray, type_size: int) -> np.ndarray:
    """(r, m) float32 scale of each value of IQ4 ``rows`` (r, row bytes): the package's dequantizer with every
    code set to 8, whose book value is 1. Time O(r m)."""
    from gguf.quants import IQ4_NL

    first, end = CODEBOOKS[kind]
    one = IQ4_NL.kvalues.index(1)
    return _coded(rows, ggml_type, type_size, [(first, end, one | (one << 4))]).astype(np.float32, copy=False)


def _book_levels(kind: str, ggml_type, rows: np.ndarray, type_size: int):
    """Each of the 16 levels an IQ4 block's values can take, as (r, m) float64 for ``rows`` (r, row bytes):
    the value's scale (:func:`_book_scale`) times each book value, in float32 as the dequantizer multiplies
    (``d * kvalues[q]``): the levels of every code set to 0 .. 15 in turn, bit for bit, for one
    dequantization in place of 16. Time O(r m) each."""
    return _scaled_book(_book_scale(kind, ggml_type, rows, type_size))


def _scaled_book(scale: np.ndarray):
    """Each book value times ``scale`` (float32, any shape), in float32 as the dequantizer multiplies, as float64
    arrays of ``scale``'s shape. Time O(16 size)."""
    from gguf.quants import IQ4_NL

    for value in np.array(IQ4_NL.kvalues, dtype=np.float32):
        yield (scale * value).astype(np.float64)  # (r, m)
