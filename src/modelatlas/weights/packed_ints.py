"""Integer weights packed into int32 words by quantization libraries: GPTQ (AutoGPTQ / GPTQModel's ``qweight``,
``qzeros``, ``scales``, ``g_idx``) and compressed-tensors' ``pack-quantized`` format (llm-compressor's W4A16:
``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``), unpacked to float weights.

Both store ``32 / bits`` values per int32 word, the first value in the lowest bits. A weight is
``scale * (q - zero)`` with one scale and zero per group of input columns. GPTQ stores the matrix transposed
(input dim first) and, in its original ``gptq`` checkpoint format, each zero minus one (``gptq_v2`` stores
them as they are); compressed-tensors stores it as ``(out, in)`` and, when symmetric, no zeros at all (the
offset is ``2 ** (bits - 1)``). Pure tensor functions: no I/O. Time O(P) for P weights.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)  # widths that divide a 32-bit word (GPTQ's 3-bit packing spans words: not unpacked)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``bits``-bit unsigned values packed into int32 ``words`` along ``dim``, lowest bits first: a
    (.., n, ..) tensor gives (.., n * 32 / bits, ..) int32 values in 0 .. 2**bits - 1."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # (32 / bits,)
    w = words.to(torch.int32).movedim(dim, -1).unsqueeze(-1)  # (.., n, 1)
    vals = (w >> shifts) & ((1 << bits) - 1)  # (.., n, 32 / bits): arithmetic shift, the mask drops the sign
    return vals.flatten(-2).movedim(-1, dim)  # (.., n * 32 / bits) back at dim


def gptq_bits(qweight: torch.Size, g_idx: torch.Size) -> int:
    """The bit width of a GPTQ layer from its shapes: ``qweight`` is (in * bits / 32, out), ``g_idx`` (in,)."""
    rows, cols = qweight[0], g_idx[0]
    if rows == 0 or cols == 0 or (32 * rows) % cols:
        raise ValueError(f"qweight has {rows} rows for {cols} input columns (g_idx): not a GPTQ packing")
    return 32 * rows // cols


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                bits: int, zero_offset: int = 1) -> torch.Tensor:
    """A GPTQ layer's (out, in) float32 weight: ``scales[g] * (q - (zeros[g] + zero_offset))`` for input column
    i of group ``g = g_idx[i]``; ``zero_offset`` 1 for the ``gptq`` checkpoint format, 0 for ``gptq_v2``.
    Shapes: qweight (in * bits / 32, out), qzeros (groups, out * bits / 32), scales (groups, out), g_idx (in,)."""
    q = unpack(qweight, bits, 0)  # (in, out)
    zeros = unpack(qzeros, bits, 1)[:, : scales.shape[1]] + zero_offset  # (groups, out)
    g = g_idx.long()  # (in,)
    return (scales.float()[g] * (q - zeros[g]).float()).T.contiguous()  # (out, in)


def gptq_quotient(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                  zero_offset: int = 1, work: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``w / scale + zero`` of an (out, in) float weight ``w`` on a GPTQ layer's grid, as (in, out) like its
    codes: rounded, the codes that plain rounding gives (GPTQ's first column). ``scales`` and the unpacked
    ``zeros`` are (groups, out) as stored (zeros before ``zero_offset``); the quotient is computed in ``work``
    (a quantizer that divides in bfloat16 rounds it there). Returned as (``w / scale``, ``zero``)."""
    g = g_idx.long()  # (in,)
    return (w.to(work).T / scales.to(work)[g]).float(), (zeros[g] + zero_offset).float()  # (in, out) each


def packed_shape(shape: torch.Tensor, where: str) -> tuple[int, int]:
    """compressed-tensors' ``weight_shape`` tensor as (rows, cols), or a ValueError naming ``where``."""
    dims = [int(v) for v in shape.flatten().tolist()]
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"{where}: weight_shape {dims} is not the 2 sizes of a matrix")
    return dims[0], dims[1]


def pack_quantized_weight(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                          zero_point: torch.Tensor | None, bits: int,
                          g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """A compressed-tensors ``pack-quantized`` layer's (rows, cols) float32 weight:
    ``scale[r, g] * (q - zero[r, g])`` for column c of group ``g = c // group_size`` (or ``g_idx[c]``).
    ``packed`` (rows, ceil(cols * bits / 32)) packs along the columns; ``zero_point``, when stored, packs along
    the rows; without it the values are signed, stored plus ``2 ** (bits - 1)``."""
    rows, cols = shape
    q = unpack(packed, bits, 1)[:, :cols]  # (rows, cols): the last word's padding cut
    groups = scale.shape[-1] if scale.dim() == 2 else 1
    if zero_point is None:
        zero = torch.full((rows, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zero = unpack(zero_point, bits, 0)[:rows]  # (rows, groups)
    g = column_groups(cols, groups, g_idx)  # (cols,)
    s = scale.float().reshape(rows, groups)
    return s[:, g] * (q - zero[:, g]).float()  # (rows, cols)


def pack_quantized_quotient(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                            g_idx: torch.Tensor | None = None,
                            work: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``w / scale + zero`` of a (rows, cols) float weight on a ``pack-quantized`` layer's grid (the offset
    ``2 ** (bits - 1)`` in place of a zero when symmetric); ``scale`` and the unpacked ``zero`` are (rows,
    groups); the quotient is computed in ``work``. Returned as (``w / scale``, ``zero``)."""
    rows, cols = w.shape
    groups = scale.shape[-1] if scale.dim() == 2 else 1
    g = column_groups(cols, groups, g_idx)  # (cols,)
    shift = torch.full((rows, cols), float(1 << (bits - 1))) if zero is None else zero[:, g].float()
    return (w.to(work) / scale.to(work).reshape(rows, groups)[:, g]).float(), shift  # (rows, cols) each


def on_grid(scaled: torch.Tensor, zero: torch.Tensor, codes: torch.Tensor, bits: int, tol: float) -> torch.Tensor:
    """Where the stored ``codes`` are a rounding of ``scaled + zero`` (``scaled = w / scale``) to the nearest
    code: within half a step, widened by ``tol`` times ``|scaled|`` (a scale rounded to half precision after
    it was used moves a value near a tie to either side); the end codes take everything beyond them
    (clamping)."""
    quotient = scaled + zero
    slack = 0.5 + tol * scaled.abs()
    low = torch.where(codes == 0, -torch.inf, codes - slack)
    high = torch.where(codes == (1 << bits) - 1, torch.inf, codes + slack)
    return (quotient >= low) & (quotient <= high)


def column_groups(cols: int, groups: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Each column's group: ``g_idx`` when stored, else consecutive groups of ``ceil(cols / groups)``."""
    if g_idx is not None:
        return g_idx.long().flatten()
    size = -(-cols // groups)
    return torch.arange(cols) // size
