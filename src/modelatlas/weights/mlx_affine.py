"""MLX's affine quantization (mlx-lm's ``--q-bits`` models, the ``mlx-community`` 4-bit checkpoints), turned
back into float weights.

A quantized linear layer stores ``weight`` as uint32 words of ``bits``-bit codes (2, 3, 4, 5, 6 or 8), packed
along each row as one little-endian bit stream (a 3-bit code may span two words), and per group of
``group_size`` input columns a ``scales`` and a ``biases`` value: a weight is ``scale * code + bias``. The
model's ``config.json`` names them (``"quantization": {"group_size": 64, "bits": 4}``, with entries for
layers quantized otherwise). Quantizing (``mx.quantize``, mode ``affine``), per group, in float32: the
scale is ``(max - min) / (2**bits - 1)`` (at least 1e-7), signed so that the edge of larger magnitude is
exactly a level (``edge / round(edge / scale)``), the bias that edge (0 when it rounds to level 0), the code
``round((w - bias) / scale)`` clamped to the levels; the scales and biases are then stored in the weights'
dtype. Pure tensor functions: no I/O; :func:`layout` checks a layer's parts from their headers. Time O(P)
for P weights.
"""

from __future__ import annotations

import torch

from modelatlas.weights.base import TensorInfo

BITS = (2, 3, 4, 5, 6, 8)
CHUNK = 1 << 20  # values unpacked or quantized at a time: int64 temporaries of 8 MiB


def layout(weight: TensorInfo, scales: TensorInfo, biases: TensorInfo, bits: int, group_size: int) -> tuple[int, ...]:
    """The (.., rows, groups * group_size) shape an affine-quantized layer reads as (leading dims: stacked
    experts); a ValueError naming the tensor unless ``scales`` and ``biases`` are float (.., rows, groups) and
    ``weight`` (.., rows, W) holds the ``groups * group_size * bits`` bits of each row in its W uint32 words.
    Header only, time O(1)."""
    for t, what in ((scales, "scales"), (biases, "biases")):
        if not t.dtype.startswith(("float", "bfloat")):
            raise ValueError(f"{t.name} is {t.dtype}, not float {what}")
    w, s = tuple(weight.shape), tuple(scales.shape)
    if len(w) < 2 or len(s) != len(w) or s[:-1] != w[:-1] or tuple(biases.shape) != s \
            or -(-s[-1] * group_size * bits // 32) != w[-1]:
        raise ValueError(f"{weight.name} {w} does not hold {bits}-bit codes for {scales.name} {s} and {biases.name} "
                         f"{tuple(biases.shape)} in groups of {group_size}")
    return (*w[:-1], s[-1] * group_size)


def unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` ``bits``-bit codes of each row of uint32 ``words`` (rows, W), read as one little-endian
    bit stream per row: (rows, n) uint8. Memory O(rows x n) int64 temporaries (called on chunks of rows)."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # (rows, W): uint32 read as int32 turned back positive
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)  # (rows, W + 1): a code may reach into the next word
    start = torch.arange(n) * bits  # (n,) each code's first bit
    word, shift = start // 32, start % 32
    both = w[:, word] | (w[:, word + 1] << 32)  # (rows, n) the 64 bits from the code's word on
    both >>= shift
    both &= (1 << bits) - 1
    return both.to(torch.uint8)


def _rows(cols: int, chunk: int) -> int:
    """Rows per chunk: about ``chunk`` values, at least one row."""
    return max(1, chunk // max(cols, 1))


def dequantize(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
               group_size: int, chunk: int = CHUNK) -> torch.Tensor:
    """The (.., rows, groups * group_size) float32 weight ``scale * code + bias`` of an affine-quantized layer
    (leading dims: stacked experts), about ``chunk`` values (whole rows) at a time into the result. Memory O(P)
    for the result plus O(chunk) (~40 MiB of temporaries per million values), time O(P)."""
    lead, cols = scales.shape[:-1], scales.shape[-1] * group_size
    words, scales = words.reshape(-1, words.shape[-1]), scales.reshape(-1, scales.shape[-1])  # (rows, W), (rows, groups)
    biases = biases.reshape(scales.shape)  # (rows, groups)
    rows = scales.shape[0]
    out, step = torch.empty(rows, cols), _rows(cols, chunk)
    for r in range(0, rows, step):
        codes = unpack_stream(words[r : r + step], bits, cols).float()  # (step, cols)
        s = scales[r : r + step].float().repeat_interleave(group_size, dim=1)  # (step, cols)
        b = biases[r : r + step].float().repeat_interleave(group_size, dim=1)
        torch.add(codes * s, b, out=out[r : r + step])
    return out.reshape(*lead, cols)  # (rows, cols) -> (.., rows, cols)


def rounding_variance(scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Variance of each value's rounding error of an affine-quantized layer: ``step**2 / 12``, the step of each
    value its group's scale. (.., rows, groups * group_size) float32; time and memory O(P)."""
    return (scales.float().square() / 12).repeat_interleave(group_size, dim=-1)


def quantize_codes(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The codes ``mx.quantize`` (affine) gives a (rows, cols) weight ``x``, each group's scale and bias
    computed from ``x`` itself in float32 (module docstring): (rows, cols) uint8. Memory O(P) (called on
    chunks of rows by :func:`requantized_share`)."""
    levels = (1 << bits) - 1
    g = x.float().reshape(x.shape[0], -1, group_size)  # (rows, groups, group_size)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    low_side = lo.abs() > hi.abs()  # the edge of larger magnitude is made a level exactly
    scale = torch.clamp((hi - lo) / levels, min=1e-7)
    scale = torch.where(low_side, scale, -scale)
    edge = torch.where(low_side, lo, hi)
    q0 = torch.round(edge / scale)
    scale = torch.where(q0 != 0, edge / q0, scale)
    bias = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    q = g - bias  # (rows, groups, group_size)
    q /= scale
    return torch.clamp(q.round_(), 0, levels).reshape(x.shape).to(torch.uint8)  # (rows, groups, group_size) -> (rows, cols)


def requantized_share(x: torch.Tensor, words: torch.Tensor, bits: int, group_size: int,
                      chunk: int = CHUNK) -> float:
    """Share of a layer's stored codes (``words``) that quantizing ``x`` gives (:func:`quantize_codes`), about
    ``chunk`` values (whole rows) at a time; leading dims (stacked experts) count as rows. Memory O(chunk)
    beyond ``x``, time O(P)."""
    cols = x.shape[-1]
    x, words = x.reshape(-1, cols), words.reshape(-1, words.shape[-1])  # (rows, cols), (rows, W)
    rows, step, same = x.shape[0], _rows(cols, chunk), 0
    for r in range(0, rows, step):
        again = quantize_codes(x[r : r + step], bits, group_size)  # (step, cols)
        same += int((again == unpack_stream(words[r : r + step], bits, cols)).sum())
    return same / max(x.numel(), 1)
