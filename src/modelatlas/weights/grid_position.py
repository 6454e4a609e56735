"""Where a float weight's values sit on a quantized layer's levels: right on them, or anywhere between.

Quantizing is many-to-one, so two models can both round to a quantized copy's codes: the model it was made
from, and a model made from the copy's own dequantized values plus an update too small to cross a rounding
boundary (a QLoRA merge: the dequantized NF4 base plus a low-rank update). Rounding cannot tell which way
they are related; the values' positions can. The source's values fall anywhere between two levels (their
mean distance to the nearest, in halves of the gap around them, is about 0.5), while a model made from the
dequantized copy sits on its levels (about |update| / half a gap). Pure tensor functions; time O(P).
"""

from __future__ import annotations

import torch

SAMPLE = 1 << 20  # values looked at: their mean settles long before


def uniform_position(u: torch.Tensor) -> float:
    """Mean distance of ``u`` (values in units of an evenly spaced grid's step, its levels at the integers)
    to the nearest level, in halves of a step: ~0.5 for values spread between levels, 0 on them."""
    return float(((u - torch.round(u)).abs() * 2).mean()) if u.numel() else 0.5


def book_position(t: torch.Tensor, book: torch.Tensor) -> float:
    """Mean distance of ``t`` (values divided by their block's scale) to the nearest of the ``book`` values,
    in halves of the gap between the two book values around it; values beyond the book's ends count as on
    it (clamped there when quantized)."""
    levels = torch.sort(book.float()).values  # (L,)
    inside = (t > levels[0]) & (t < levels[-1])
    t = t[inside]
    if not t.numel():
        return 0.5
    i = torch.bucketize(t, levels).clamp(1, len(levels) - 1)  # levels[i - 1] <= t < levels[i]
    low, high = levels[i - 1], levels[i]
    near = torch.minimum(t - low, high - t)
    return float((near / ((high - low) / 2).clamp(min=1e-30)).clamp(max=1).mean())


_FLOAT8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, smallest normal exponent


def float8_position(t: torch.Tensor, dtype: torch.dtype) -> float:
    """Mean distance of ``t`` (values divided by their scale) to the nearest ``dtype`` (float8) value, in
    halves of the spacing of float8 values there (2**(exponent - mantissa bits); the subnormals' below the
    smallest normal)."""
    if not t.numel():
        return 0.5
    mantissa, low = _FLOAT8[dtype]
    top = torch.finfo(dtype).max
    c = t.clamp(-top, top).to(dtype).float()  # the nearest float8 value
    exponent = torch.floor(torch.log2(c.abs().clamp(min=2.0**low))).clamp(min=low)
    half = 2.0 ** (exponent - mantissa) / 2
    return float(((t - c).abs() / half).clamp(max=1).mean())
