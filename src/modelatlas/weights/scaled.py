"""Weights stored as float8 or int8 values with scales: compressed-tensors' ``float-quantized`` and
``int-quantized`` formats (llm-compressor's FP8 and W8A8: ``weight`` + ``weight_scale``, an optional
``weight_zero_point``) and the DeepSeek-V3 / transformers ``fp8`` format (``weight`` + ``weight_scale_inv``,
one scale per 128 x 128 block), turned back into float weights.

A weight is ``scale * (value - zero)``. One scale covers the whole tensor, a row (channel), a group of a row's
columns, or a block of rows x columns: the scale tensor's shape says which, each of its entries covering
``ceil(size / entries)`` consecutive rows (columns), or the block size a config names (a 300-row matrix in
128-row blocks has 3 row scales, as would 100-row blocks). Quantizing is rounding ``weight / scale`` to the
stored type, so a model's copy is recognised by doing it again (:func:`requantized_share`).
Pure tensor functions: no I/O. Time O(P) for P weights.
"""

from __future__ import annotations

import math

import torch

from modelatlas.weights import grid_position as G
from modelatlas.weights.base import TensorInfo

SCALED_DTYPES = ("float8_e4m3fn", "float8_e5m2", "int8")  # stored value types that need a scale


def block_size(size: int, entries: int, given: int | None = None) -> int:
    """Rows (columns) each of ``entries`` scales covers along a dimension of ``size``: ``given`` (a config's
    block size) when it fits, else ``ceil(size / entries)``. A ValueError when neither fits."""
    if given is not None and -(-size // given) == entries:
        return given
    b = -(-size // entries) if entries > 0 else 0
    if b < 1 or -(-size // b) != entries:
        raise ValueError(f"{entries} scales cannot cover {size} rows or columns in equal blocks")
    return b


def scale_blocks(scale: tuple[int, ...], shape: tuple[int, ...],
                 blocks: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The positions each scale covers along each dimension of a weight of ``shape``, for scales of shape
    ``scale``: None for a single scale; one per row ((rows,) or (rows, 1)); or blocks of a 2-D weight
    (``blocks``: a config's block sizes, else inferred by :func:`block_size`). A ValueError when they do not
    fit. Time O(dims)."""
    n = 1
    for k in scale:
        n *= k
    if n == 1:
        return None
    if len(scale) == 1 and len(shape) > 1:  # (rows,): one per output channel
        if scale[0] != shape[0]:
            raise ValueError(f"{scale[0]} scales for {shape[0]} rows")
        scale = (scale[0],) + (1,) * (len(shape) - 1)
    if len(scale) != len(shape):
        raise ValueError(f"a scale of shape {tuple(scale)} does not fit a weight of shape {tuple(shape)}")
    return tuple(block_size(d, k, None if blocks is None or i >= len(blocks) else blocks[i])
                 for i, (d, k) in enumerate(zip(shape, scale)))


def check_scale(scale: TensorInfo, weight: TensorInfo, blocks: tuple[int, ...] | None = None) -> None:
    """A ValueError naming ``scale`` (a scale or zero-point tensor) when its shape does not fit ``weight``'s
    (:func:`scale_blocks`). Header only."""
    try:
        scale_blocks(tuple(scale.shape), tuple(weight.shape), blocks)
    except ValueError as e:
        raise ValueError(f"{scale.name} {tuple(scale.shape)} for {weight.name} {tuple(weight.shape)}: {e}") from None


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Stored scales as float32: MX formats (MXFP8) store each as a uint8 power-of-two exponent biased by 127
    (E8M0), the others as the numbers themselves."""
    if scale.dtype == torch.uint8:
        return torch.pow(2.0, scale.float() - 127)  # exact: powers of two
    return scale.float()


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], blocks: tuple[int, ...] | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """``scale`` repeated to ``shape`` (see :func:`scale_blocks`). With ``rows`` (indices into the first
    dimension), only those rows: (len(rows), *shape[1:]). Time and memory O(result)."""
    s = scale.float()
    want = tuple(shape) if rows is None else (len(rows), *shape[1:])
    sizes = scale_blocks(tuple(scale.shape), tuple(shape), blocks)
    if sizes is None:
        return s.reshape(()).expand(want)  # (1, ..) -> () -> want, a view
    s = s.reshape(s.shape + (1,) * (len(shape) - s.dim()))  # (rows,) -> (rows, 1, ..)
    for d, (n, b) in enumerate(zip(shape, sizes)):
        at = torch.arange(n) if d or rows is None else rows.long()  # positions along d
        s = s.index_select(d, at // b)  # each position's block
    return s


def scaled_weight(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                  blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """The float32 weight ``scale * (values - zero)`` of float8 / int8 ``values`` (zero: 0 when not stored)."""
    x = values.float()
    if zero is not None:
        x = x - expand_scale(zero, tuple(values.shape), blocks)
    return x * expand_scale(scale, tuple(values.shape), blocks)


def scaled_quotient(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                    blocks: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """``x / scale (+ zero)`` in float32: ``x`` on the stored grid, its levels at the integers (int8). ``x``
    holds the ``rows`` of a weight of ``shape`` when they are given."""
    full = tuple(x.shape) if shape is None else tuple(shape)
    y = x.float() / expand_scale(scale, full, blocks, rows)
    return y if zero is None else y + expand_scale(zero, full, blocks, rows)


def requantize(x: torch.Tensor, like: torch.dtype, scale: torch.Tensor, zero: torch.Tensor | None = None,
               blocks: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None,
               rows: torch.Tensor | None = None, work: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` quantized onto the stored grid: ``x / scale (+ zero)`` computed in ``work`` (a bfloat16 model is
    quantized in bfloat16: the quotient rounded to it), clamped to the range of ``like`` and rounded to it
    (nearest, ties to even, as a cast to float8 or ``torch.round`` does). ``x`` holds the ``rows`` of a weight
    of ``shape`` when they are given (a sample), else the whole weight."""
    full = tuple(x.shape) if shape is None else tuple(shape)
    y = x.to(work) / expand_scale(scale, full, blocks, rows).to(work)
    if zero is not None:
        y = y + expand_scale(zero, full, blocks, rows).to(work)
    if like.is_floating_point:
        top = torch.finfo(like).max
        return y.clamp(-top, top).to(like)
    info = torch.iinfo(like)
    return torch.round(y).clamp(info.min, info.max).to(like)


def requantized_share(stored: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                      blocks: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None,
                      rows: torch.Tensor | None = None) -> float:
    """Share of ``stored`` values that quantizing ``x`` (same shape; both the ``rows`` of a weight of ``shape``
    when given) with the stored scales gives: 1.0 for the model it was made from, less for a fine-tune of it
    (values moved across a rounding boundary). The best of :func:`working_dtypes`."""
    best = 0.0
    for work in working_dtypes(x):
        again = requantize(x, stored.dtype, scale, zero, blocks, shape, rows, work)
        same = again.view(torch.uint8) == stored.view(torch.uint8) if stored.dtype.is_floating_point else again == stored
        best = max(best, float(same.float().mean()))
    return best


def scaled_variance(values: torch.Tensor, scale: torch.Tensor, blocks: tuple[int, ...] | None = None,
                    chunk: int = 1 << 20) -> torch.Tensor:
    """Variance of each value's rounding error of float8 / int8 ``values`` with scales, float32 of their shape,
    about ``chunk`` values (whole rows) at a time. int8: ``scale**2 / 12`` (levels 1 apart). float8: the
    stored value's :func:`_float8_variance` (its gaps to the float8 values around, the layer's density
    there) times the scale squared. Time O(P), memory O(P) for the result plus O(chunk)."""
    v = values.reshape(1) if values.dim() == 0 else values
    shape, table = tuple(v.shape), _float8_variance(v, scale.numel()) if v.dtype.is_floating_point else None
    out, step = torch.empty(shape), max(1, chunk // max(math.prod(shape[1:]), 1))  # rows at a time
    for r in range(0, shape[0], step):
        part = expand_scale(scale, shape, blocks, torch.arange(r, min(shape[0], r + step))).square()  # (rows, ..)
        if table is None:
            part /= 12
        else:
            part *= table[v[r : r + step].view(torch.uint8).long()]
        out[r : r + step] = part
    return out.reshape(values.shape)


def _float8_variance(values: torch.Tensor, blocks: int, sample: int = G.SAMPLE) -> torch.Tensor:
    """Per float8 code (256,): :func:`~.grid_position.level_variance` of the float8 values (in units of the
    scale squared), from the codes' counts on about ``sample`` evenly strided values; ``blocks`` of the
    values on the largest float8 value (one per scale: its absmax, which FP8 quantizers scale to it) exact,
    their share taken off that level's mean. Time O(sample)."""
    flat = values.reshape(-1).view(torch.uint8)
    seen = flat[:: max(1, flat.numel() // max(sample, 1))]
    counts, exact = torch.bincount(seen.long(), minlength=256), blocks * seen.numel() / max(flat.numel(), 1)
    levels = torch.arange(256, dtype=torch.uint8).view(values.dtype).float()
    table, end = G.level_variance(levels, counts, exact), G.end_codes(levels)
    table[end] *= 1 - min(1.0, exact / max(int(counts[end].sum()), 1))
    return table


def working_dtypes(x: torch.Tensor) -> list[torch.dtype]:
    """The dtypes a quantizer may have computed ``x / scale`` in: float32, and the model's own half-precision
    dtype (compressed-tensors divides in the weight's dtype)."""
    return [torch.float32] + ([x.dtype] if x.dtype in (torch.bfloat16, torch.float16) else [])
