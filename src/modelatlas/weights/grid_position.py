"""Where a float weight's values sit on a quantized layer's levels: right on them, or anywhere between.

Quantizing is many-to-one, so two models can both round to a quantized copy's codes: the model it was made
from, and a model made from the copy's own dequantized values plus an update too small to cross a rounding
boundary (a QLoRA merge: the dequantized NF4 base plus a low-rank update). Rounding cannot tell which way
they are related; the values' positions can. The source's values fall anywhere between two levels (their
mean distance to the nearest, in halves of the gap around them, is about 0.5), while a model made from the
dequantized copy sits on its levels (about |update| / half a gap). :func:`level_variance` gives the mean
squared error of the rounding onto uneven levels. Pure tensor functions; time O(P).
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


def end_codes(values: torch.Tensor) -> torch.Tensor:
    """Which codes of levels ``values`` are an end level (the largest finite |level|: where a quantizer that
    scales by the absmax puts it). (codes,) bool; time O(codes)."""
    top = values[torch.isfinite(values)].abs().max() if bool(torch.isfinite(values).any()) else 0.0
    return torch.isfinite(values) & (values.abs() == top)


def level_variance(values: torch.Tensor, counts: torch.Tensor, exact: float = 0.0) -> torch.Tensor:
    """Mean squared rounding error of a value stored as each code, ``values`` the codes' levels (a 4-bit book,
    every float8 value; a NaN or infinite one gets 0) and ``counts`` how many values of a layer (or of a
    sample of it) each code holds: the second moment, about the level, of a density over its cell (half way
    to the levels around it; at an end, up to the end) that is linear, its slope from the densities of the
    cells around (counts per width), never below 0 (:func:`_cell_moments`). ``exact`` of the values counted
    on the end levels (:func:`end_codes`: each block's absmax) are left out of the density: the result is
    the mean of the others, the caller shares it out. (codes,) float32; time O(codes log codes)."""
    finite = torch.isfinite(values)
    levels, level_of = torch.unique(values[finite].double(), return_inverse=True)  # sorted; each code's
    out = torch.zeros(values.numel())
    if levels.numel() < 2:
        return out
    n = torch.zeros(levels.numel(), dtype=torch.float64).index_add_(0, level_of, counts[finite].double())
    end = levels.abs() == levels.abs().max()
    n[end] *= 1 - min(1.0, exact / max(float(n[end].sum()), 1.0))  # the exact values taken out
    out[finite] = _cell_moments(levels, n)[level_of].float()
    return out


def _cell_moments(levels: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """For sorted ``levels`` (L,) holding ``n`` values each: the second moment of the error about each level
    under the linear density of :func:`level_variance` over its cell; :func:`cell_variance` (an even density)
    where nothing is counted. (L,) float64; time O(L)."""
    mid = (levels[:-1] + levels[1:]) / 2
    lo, hi = torch.cat([levels[:1], mid]), torch.cat([mid, levels[-1:]])  # each cell's edges
    center, half = (lo + hi) / 2, (hi - lo) / 2
    density = n / (hi - lo)
    slope = torch.gradient(density, spacing=(center,))[0]
    slope = torch.maximum(torch.minimum(slope, density / half), -density / half)  # >= 0 across the cell
    a, low, high = density + slope * (levels - center), lo - levels, hi - levels  # a + slope * u, u in [low, high]
    mass = a * (high - low) + slope * (high**2 - low**2) / 2
    moment = a * (high**3 - low**3) / 3 + slope * (high**4 - low**4) / 4
    even = cell_variance(2 * (levels - lo), 2 * (hi - levels))
    return torch.where(mass > 0, moment / mass.clamp(min=1e-300), even)


def cell_variance(below, above):
    """Variance of a rounding error spread evenly over a level's cell, the levels next to it ``below`` and
    ``above`` away (the cell reaches half way to each; 0 where there is none: an end level): ``(a**2 - a*b +
    b**2) / 3`` for half gaps a and b: ``gap**2 / 12`` for equal gaps, and of the one gap at an end (whose
    cell is half of it). Tensors or numpy arrays (the same operations: the same values). Time
    O(len(below))."""
    a, b = below / 2, above / 2
    return (a * a - a * b + b * b) / 3
