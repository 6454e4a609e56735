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

from modelatlas.weights.base import TensorInfo
from modelatlas.weights.scaled import block_size

BITS = (2, 4, 8)  # widths that divide a 32-bit word (GPTQ's 3-bit packing spans words: not unpacked)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``bits``-bit unsigned values packed into int32 ``words`` along ``dim``, lowest bits first: a
    (.., n, ..) tensor gives (.., n * 32 / bits, ..) int32 values in 0 .. 2**bits - 1."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # (32 / bits,)
    w = words.to(torch.int32).movedim(dim, -1).unsqueeze(-1)  # (.., n, 1)
    vals = w >> shifts  # (.., n, 32 / bits): an arithmetic shift drags the sign ...
    vals &= (1 << bits) - 1  # ... which the mask drops (in place: one (.., n, 32 / bits) temporary, not two)
    return vals.flatten(-2).movedim(-1, dim)  # (.., n * 32 / bits) back at dim


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of :func:`unpack`: unsigned ``bits``-bit ``values`` packed into int32 words along ``dim``,
    lowest bits first, the dim padded with zeros to a whole word (what GPTQ, compressed-tensors and AWQ
    writers store; written here for fixtures, :mod:`modelatlas.zoo.awq`). Time O(P)."""
    per = 32 // bits
    c = values.long().movedim(dim, -1)
    pad = (-c.shape[-1]) % per
    c = torch.nn.functional.pad(c, (0, pad)).reshape(*c.shape[:-1], -1, per)  # (.., words, per)
    words = (c << (torch.arange(per) * bits)).sum(-1)  # (.., words) as int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(-1, dim)


def gptq_layout(qweight: TensorInfo, qzeros: TensorInfo, scales: TensorInfo, g_idx: TensorInfo) -> int | None:
    """The bit width of a GPTQ layer from its parts' headers, None for 3 bits (values spanning words); a
    ValueError naming the part that does not fit ``qweight`` (in * bits / 32, out) int32, ``qzeros`` (groups,
    out * bits / 32) int32, ``scales`` (groups, out) floats, ``g_idx`` (in,) integers. Time O(1)."""
    if len(qweight.shape) != 2 or len(g_idx.shape) != 1 or qweight.dtype != "int32":
        raise ValueError(f"{qweight.name} {qweight.dtype} {qweight.shape} and {g_idx.name} {g_idx.shape} are not "
                         "a GPTQ layer's (in * bits / 32, out) int32 words and (in,) groups")
    (rows, out), n_in = qweight.shape, g_idx.shape[0]
    bits = 32 * rows // n_in if n_in and (32 * rows) % n_in == 0 else 0
    if bits not in BITS + (3,):
        raise ValueError(f"{qweight.name} holds {rows} rows of words for the {n_in} inputs of {g_idx.name}: not "
                         "2, 3, 4 or 8 bits per weight")
    if len(scales.shape) != 2 or scales.shape[1] != out or not scales.dtype.startswith(("float", "bfloat")):
        raise ValueError(f"{scales.name} is {scales.dtype} {scales.shape}, not the (groups, {out}) float scales "
                         f"of {qweight.name}'s {out} outputs")
    want = (scales.shape[0], -(-out * bits // 32))  # (groups, out * bits / 32)
    if tuple(qzeros.shape) != want or qzeros.dtype != "int32":
        raise ValueError(f"{qzeros.name} is {qzeros.dtype} {qzeros.shape}, not the {want} int32 words of "
                         f"{bits}-bit zeros for {scales.name} {scales.shape}")
    if not g_idx.dtype.startswith(("int", "uint")):
        raise ValueError(f"{g_idx.name} is {g_idx.dtype}, not integer group numbers")
    return None if bits == 3 else bits


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                bits: int, zero_offset: int = 1, chunk: int = 512) -> torch.Tensor:
    """A GPTQ layer's (out, in) float32 weight: ``scales[g] * (q - (zeros[g] + zero_offset))`` for input column
    i of group ``g = g_idx[i]``; ``zero_offset`` 1 for the ``gptq`` checkpoint format, 0 for ``gptq_v2``.
    Shapes: qweight (in * bits / 32, out), qzeros (groups, out * bits / 32), scales (groups, out), g_idx (in,).
    Unpacked ``chunk`` input columns at a time into the result: memory O(P) for the result plus
    O(chunk x out) (a 4096 x 4096 layer: 64 MiB and 8 MiB per temporary), time O(P)."""
    n_out, n_in, per = scales.shape[1], g_idx.shape[0], 32 // bits
    zeros = unpack(qzeros, bits, 1)[:, :n_out] + zero_offset  # (groups, out)
    s, g = scales.float(), g_idx.long()
    out = torch.empty(n_out, n_in)
    step = max(1, chunk // per)  # words of qweight per chunk
    for r in range(0, qweight.shape[0], step):
        q = unpack(qweight[r : r + step], bits, 0)  # (chunk, out)
        cols = slice(r * per, r * per + len(q))
        q -= zeros[g[cols]]
        out[:, cols] = (q.float() * s[g[cols]]).T
    return out


def gptq_variance(scales: torch.Tensor, g_idx: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Variance of each value's rounding error of a GPTQ layer: ``step**2 / 12``, the step of input column i
    its group's scale ``scales[g_idx[i]]`` (the distance between its levels). Plain rounding's; GPTQ moves
    codes to make up for other columns' errors (its aim is the layer's output), so its weights' error from the
    model it was made from is typically larger. (out, in) float32, ``chunk`` input columns at a time: time
    O(P), memory O(P) for the result plus O(chunk x out)."""
    var, g = scales.float().square() / 12, g_idx.long()  # (groups, out), (in,)
    out = torch.empty(var.shape[1], g.shape[0])
    for c in range(0, g.shape[0], chunk):
        out[:, c : c + chunk] = var[g[c : c + chunk]].T  # (chunk, out) -> (out, chunk)
    return out


def check_groups(g_idx: torch.Tensor, groups: int, where: str) -> None:
    """A ValueError naming ``where`` unless every group number in ``g_idx`` is one of ``groups`` (a negative
    one would read another group's scale without a word). Time O(len(g_idx))."""
    if len(g_idx) and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"{where} holds group numbers {int(g_idx.min())}..{int(g_idx.max())}, but there are "
                         f"{groups} groups of scales")


def check_finite(scale: torch.Tensor, where: str) -> None:
    """A ValueError naming ``where`` when a scale is NaN or infinite (a corrupt file: every weight of its group
    would read so). Time O(len(scale))."""
    if not bool(torch.isfinite(scale.float()).all()):
        raise ValueError(f"{where} holds NaN or infinite scales (a corrupt or diverged checkpoint)")


def gptq_quotient(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                  zero_offset: int = 1, work: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``w / scale + zero`` of an (out, in) float weight ``w`` on a GPTQ layer's grid, as (in, out) like its
    codes: rounded, the codes that plain rounding gives (GPTQ's first column). ``scales`` and the unpacked
    ``zeros`` are (groups, out) as stored (zeros before ``zero_offset``); the quotient is computed in ``work``
    (a quantizer that divides in bfloat16 rounds it there). Returned as (``w / scale``, ``zero``)."""
    g = g_idx.long()  # (in,)
    return (w.to(work).T / scales.to(work)[g]).float(), (zeros[g] + zero_offset).float()  # (in, out) each


def packed_shape(shape: torch.Tensor, where: str, packed: TensorInfo) -> tuple[int, int]:
    """compressed-tensors' ``weight_shape`` tensor (2 values) as (rows, cols) of the matrix ``packed`` holds:
    a ValueError naming ``where`` unless its rows are ``packed``'s and its columns positive."""
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if rows != packed.shape[0] or cols < 1:
        raise ValueError(f"{where} says {[rows, cols]}, but {packed.name} {packed.shape} holds "
                         f"{packed.shape[0]} rows of words")
    return rows, cols


def packed_bits(cols: int, packed: TensorInfo, named: set[int]) -> int | None:
    """The bit width of ``packed`` (rows, ceil(cols * bits / 32)) int32 words: one of ``named`` (the
    quantization_config's ``num_bits``) when it names any, else the widest that fits; None for a width whose
    values span words (3, 5, 6, 7 bits), which is not unpacked. A ValueError when no width fits."""
    words = packed.shape[1]
    fits = [b for b in range(1, 9) if -(-cols * b // 32) == words]
    chosen = [b for b in fits if b in named] if named else fits
    if not chosen:
        said = f"the {sorted(named)} bits of the quantization_config" if named else "1 to 8 bits"
        raise ValueError(f"{packed.name} holds {words} words per row, which {cols} columns of {said} do not fill")
    return max(chosen) if max(chosen) in BITS else None


def pack_quantized_layout(shape: tuple[int, int], bits: int, parts: dict[str, TensorInfo],
                          group_size: object = None) -> int:
    """Input columns per scale of a ``pack-quantized`` layer of ``shape`` (rows, cols), checked from its
    ``parts``' headers (role -> info: ``scale`` (rows, groups), (rows,) or one value; ``zero_point``
    (rows * bits / 32, groups); ``g_idx`` (cols,)): the config's ``group_size`` when it fits (the last
    group may be short), else ``ceil(cols / groups)``. A ValueError naming the part that does not fit."""
    rows, cols = shape
    scale = parts["scale"]
    groups = scale.shape[-1] if len(scale.shape) == 2 else 1
    if scale.numel != 1 and (len(scale.shape) > 2 or scale.shape[0] != rows) or \
            not scale.dtype.startswith(("float", "bfloat")):
        raise ValueError(f"{scale.name} is {scale.dtype} {scale.shape}, not float scales of ({rows}, groups)")
    zero = parts.get("zero_point")
    if zero is not None and (tuple(zero.shape) != (-(-rows * bits // 32), groups) or zero.dtype != "int32"):
        raise ValueError(f"{zero.name} is {zero.dtype} {zero.shape}, not the "
                         f"{(-(-rows * bits // 32), groups)} int32 words of {bits}-bit zeros for {scale.name}")
    g_idx = parts.get("g_idx")
    if g_idx is not None and (tuple(g_idx.shape) != (cols,) or not g_idx.dtype.startswith(("int", "uint"))):
        raise ValueError(f"{g_idx.name} is {g_idx.dtype} {g_idx.shape}, not the ({cols},) group numbers of its columns")
    try:
        return block_size(cols, groups, group_size if isinstance(group_size, int) and group_size > 0 else None)
    except ValueError as e:
        raise ValueError(f"{scale.name} {scale.shape}: {e}") from None


def row_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A ``pack-quantized`` layer's scales as (rows, groups) float32: per group, per row, or one for all."""
    s = scale.float()
    return s.reshape(1, 1).expand(rows, 1) if s.numel() == 1 else s.reshape(rows, -1)  # (rows, groups)


def pack_quantized_weight(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                          zero_point: torch.Tensor | None, bits: int, g_idx: torch.Tensor | None = None,
                          group_size: int | None = None) -> torch.Tensor:
    """A compressed-tensors ``pack-quantized`` layer's (rows, cols) float32 weight:
    ``scale[r, g] * (q - zero[r, g])`` for column c of group ``g = c // group_size`` (or ``g_idx[c]``).
    ``packed`` (rows, ceil(cols * bits / 32)) packs along the columns; ``zero_point``, when stored, packs along
    the rows; without it the values are signed, stored plus ``2 ** (bits - 1)``. Time and memory O(P)."""
    rows, cols = shape
    s = row_scales(scale, rows)  # (rows, groups)
    q = unpack(packed, bits, 1)[:, :cols]  # (rows, cols): the last word's padding cut
    g = column_groups(cols, s.shape[1], g_idx, group_size)  # (cols,)
    if zero_point is None:
        q -= 1 << (bits - 1)
    else:
        q -= unpack(zero_point, bits, 0)[:rows][:, g]  # (rows, groups) -> (rows, cols)
    out = q.float()
    out *= s[:, g]
    return out  # (rows, cols)


def pack_quantized_variance(scale: torch.Tensor, shape: tuple[int, int], g_idx: torch.Tensor | None = None,
                            group_size: int | None = None) -> torch.Tensor:
    """Variance of each value's rounding error of a ``pack-quantized`` layer of ``shape``: ``step**2 / 12``,
    the step of each value its group's scale. (rows, cols) float32; time and memory O(P)."""
    rows, cols = shape
    s = row_scales(scale, rows)  # (rows, groups)
    return (s.square() / 12)[:, column_groups(cols, s.shape[1], g_idx, group_size)]  # (rows, cols)


def _quotient(w: torch.Tensor, s: torch.Tensor, zero: torch.Tensor | None, g: torch.Tensor, bits: int,
              work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(``w / s[:, g]`` computed in ``work``, the zeros ``zero[:, g]`` or the symmetric offset) of (rows, c)
    columns ``w`` of groups ``g`` (c,); ``s`` and ``zero`` are (rows, groups). Both (rows, c) float32."""
    shift = torch.full(w.shape, float(1 << (bits - 1))) if zero is None else zero[:, g].float()
    return (w.to(work) / s.to(work)[:, g]).float(), shift


def gptq_grid(w: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor, bits: int, zero_offset: int, work: torch.dtype, chunk: int = 512):
    """For :func:`on_grid`, per ``chunk`` input columns of a GPTQ layer and the (out, in) float weight ``w``:
    (their slice, stored codes, ``w / scale``, zero), each (chunk, out). Memory O(chunk x out)."""
    per = 32 // bits
    zeros = unpack(qzeros, bits, 1)[:, : scales.shape[1]]  # (groups, out)
    step = max(1, chunk // per)  # words per chunk
    for r in range(0, qweight.shape[0], step):
        codes = unpack(qweight[r : r + step], bits, 0)  # (chunk, out)
        cols = slice(r * per, r * per + len(codes))
        yield (cols, codes, *gptq_quotient(w[:, cols], scales, zeros, g_idx[cols], zero_offset, work))


def pack_quantized_grid(w: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        bits: int, g_idx: torch.Tensor | None, group_size: int | None, work: torch.dtype,
                        chunk: int = 512):
    """:func:`gptq_grid` of a ``pack-quantized`` layer (``w`` (rows, cols)): per ``chunk`` columns, (their
    slice, codes, ``w / scale``, zero), each (chunk, rows). Memory O(chunk x rows)."""
    (rows, cols), per = w.shape, 32 // bits
    s = row_scales(scale, rows)  # (rows, groups)
    zero = None if zero_point is None else unpack(zero_point, bits, 0)[:rows]  # (rows, groups)
    g = column_groups(cols, s.shape[1], g_idx, group_size)  # (cols,)
    step = max(1, chunk // per)  # words per chunk
    for c in range(0, packed.shape[1], step):
        sl = slice(c * per, min(cols, (c + step) * per))
        codes = unpack(packed[:, c : c + step], bits, 1)[:, : sl.stop - sl.start]  # (rows, chunk)
        scaled, shift = _quotient(w[:, sl], s, zero, g[sl], bits, work)  # (rows, chunk) each
        yield sl, codes.T, scaled.T, shift.T


def on_grid(scaled: torch.Tensor, zero: torch.Tensor, codes: torch.Tensor, bits: int, tol: float,
            top: torch.Tensor | None = None, bottom: torch.Tensor | None = None, tol_sum: float = 0.0) -> torch.Tensor:
    """Where the stored ``codes`` are a rounding of ``scaled + zero`` (``scaled = w / scale``) to the nearest
    code: within half a step, widened by ``tol`` times ``|scaled|`` (a scale rounded to half precision after
    it was used moves a value near a tie to either side) and ``tol_sum`` times ``|scaled + zero|`` (a sum
    rounded in the weight's dtype: compressed-tensors adds the zero in bfloat16); the end codes take
    everything beyond them (clamping), and so do codes at or above ``top`` (below ``bottom``), when given: each value's group's
    highest (lowest) code, where a clipped range puts what lies beyond it (AWQ's clipping, its scale rounded
    after, may leave that one below the end code). Time O(P), memory one float temporary of P values (two
    with ``tol``)."""
    d = scaled + zero
    slack = 0.5 if tol == 0 else scaled.abs().mul_(tol).add_(0.5)
    if tol_sum:
        slack = d.abs().mul_(tol_sum).add_(slack)
    d -= codes  # how far the quotient is from its stored code
    high = codes == (1 << bits) - 1 if top is None else codes >= top
    low = codes == 0 if bottom is None else codes <= bottom
    return ((d <= slack) | high) & ((d >= -slack) | low)


def clipped_share(grid, g: torch.Tensor, rows: int, bits: int, tol: float, work: torch.dtype,
                  tol_sum: float = 0.0) -> float:
    """Share of a layer's codes that :func:`on_grid` finds a rounding, each value's group's highest and lowest
    codes taking everything beyond them (a clipped range). ``grid(work)`` yields (input columns, codes,
    ``w / scale``, zero) per chunk, each (chunk, rows) (:func:`gptq_grid`, ...); ``g`` (in,) is each input
    column's group. Two passes over the chunks: the groups' extremes, then the test. Time O(P), memory
    O(groups x rows) plus a chunk's."""
    n = int(g.max()) + 1 if len(g) else 0
    top = torch.full((n, rows), -1, dtype=torch.int32)  # (groups, rows): each group's highest code
    bottom = torch.full((n, rows), 1 << bits, dtype=torch.int32)
    for cols, codes, _, _ in grid(torch.float32):  # (chunk, rows) each
        index = g[cols, None].expand_as(codes)
        top.scatter_reduce_(0, index, codes.to(torch.int32), "amax")
        bottom.scatter_reduce_(0, index, codes.to(torch.int32), "amin")
    hits, total = 0, 0
    for cols, codes, scaled, zero in grid(work):
        hits += int(on_grid(scaled, zero, codes, bits, tol, top[g[cols]], bottom[g[cols]], tol_sum).sum())
        total += codes.numel()
    return hits / max(total, 1)


def column_groups(cols: int, groups: int, g_idx: torch.Tensor | None, size: int | None = None) -> torch.Tensor:
    """Each column's group: ``g_idx`` when stored, else consecutive groups of ``size`` columns (by default
    ``ceil(cols / groups)``)."""
    if g_idx is not None:
        return g_idx.long().flatten()
    return torch.arange(cols) // (size or -(-cols // groups))
