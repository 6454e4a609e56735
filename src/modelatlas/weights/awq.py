"""AutoAWQ's GEMM checkpoint format (``quant_method: awq``, ``version: gemm``; what transformers and vLLM read
as AWQ), unpacked to float weights.

Per linear layer: ``qweight`` int32 (in, out / 8), ``qzeros`` int32 (in / group, out / 8) and ``scales``
float16 (in / group, out). Unlike GPTQ the words pack along the *output* dimension, 8 4-bit values to a word,
and not in column order: the word's nibble i (bits 4i .. 4i + 3) holds output column :data:`AWQ_ORDER` [i] of
its 8 (AutoAWQ's ``order_map`` for its GEMM kernel's interleaved loads). The zeros are stored as they are (no
minus one as in GPTQ), and the weight is ``weight[out, in] = (q[in, out] - zero[g, out]) * scale[g, out]``,
``g = in // group``. Other layouts (GEMV's (out, in / 8) words, llm-awq's) are refused by
:func:`awq_version`. Pure tensor functions: no I/O. Time O(P) for P weights.
"""

from __future__ import annotations

import torch

from modelatlas.weights import packed_ints as P
from modelatlas.weights.base import TensorInfo

BITS = 4  # AutoAWQ packs 4 bits only (its GEMM packer raises NotImplementedError for others)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column (of 8) that nibble i of a word holds
NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(c) for c in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7): the inverse
VERSIONS = ("gemm",)  # layouts read; GEMV packs (out, in / 8), llm-awq interleaves for its own kernel


def awq_version(config: dict) -> str:
    """The AWQ layout a ``quantization_config`` names (``version``, "gemm" when absent, as transformers
    defaults), lower-cased; a ValueError naming it when it is not read here (GEMV, llm-awq's backend, a bit
    width other than 4). Time O(1)."""
    version = str(config.get("version", "gemm")).lower()
    backend = str(config.get("backend", "autoawq")).lower()
    if version not in VERSIONS or backend not in ("autoawq", ""):
        shown = f"version {version!r}" + (f", backend {backend!r}" if backend not in ("autoawq", "") else "")
        raise ValueError(f"quantization_config: AWQ {shown} is not read here (its words are laid out for its own "
                         f"kernel); AutoAWQ's {' and '.join(VERSIONS)} is")
    bits = config.get("bits", config.get("w_bit", BITS))
    if bits != BITS:
        raise ValueError(f"quantization_config: AWQ with bits {bits!r}; only AutoAWQ's {BITS}-bit packing is read")
    return version


def awq_layout(qweight: TensorInfo, qzeros: TensorInfo, scales: TensorInfo, group_size: object = None) -> int:
    """Input columns per scale of an AWQ GEMM layer, from its parts' headers: ``qweight`` (in, out / 8) int32,
    ``scales`` (groups, out) floats, ``qzeros`` (groups, out / 8) int32, ``in`` a multiple of the groups (the
    config's ``group_size`` when it names one; -1: one group). A ValueError naming the part that does not fit.
    Time O(1)."""
    per = 32 // BITS
    if len(qweight.shape) != 2 or qweight.dtype != "int32":
        raise ValueError(f"{qweight.name} is {qweight.dtype} {qweight.shape}, not AWQ's (in, out / {per}) int32 words")
    n_in, words = qweight.shape
    if len(scales.shape) != 2 or scales.shape[1] != words * per or not scales.dtype.startswith(("float", "bfloat")):
        raise ValueError(f"{scales.name} is {scales.dtype} {scales.shape}, not the (groups, {words * per}) float "
                         f"scales of the {words * per} outputs {qweight.name} packs")
    groups = scales.shape[0]
    if groups < 1 or n_in % groups:
        raise ValueError(f"{scales.name} holds {groups} groups of scales, which do not divide the {n_in} inputs of "
                         f"{qweight.name}")
    if tuple(qzeros.shape) != (groups, words) or qzeros.dtype != "int32":
        raise ValueError(f"{qzeros.name} is {qzeros.dtype} {qzeros.shape}, not the {(groups, words)} int32 words "
                         f"of 4-bit zeros for {scales.name} {scales.shape}")
    group = n_in // groups
    given = group_size if isinstance(group_size, int) and not isinstance(group_size, bool) else None
    if given is not None and given > 0 and given != group:
        raise ValueError(f"{scales.name} holds {groups} groups for {n_in} inputs ({group} each), but the "
                         f"quantization_config says group_size {given}")
    return group


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of (rows, n) AWQ words in output-column order: (rows, 8 n) int32 in 0 .. 15. Time
    O(rows x n)."""
    vals = P.unpack(words, BITS, 1)  # (rows, 8 n) in nibble order
    rows, n = words.shape
    return vals.reshape(rows, n, 8)[:, :, list(NIBBLE_OF_COLUMN)].reshape(rows, 8 * n)  # column k: nibble rev[k]


def group_index(n_in: int, group: int) -> torch.Tensor:
    """Each input column's group (``in // group``): the ``g_idx`` GPTQ would store, (in,) int64. Time O(in)."""
    return torch.arange(n_in) // group


def awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
               chunk: int = 512) -> torch.Tensor:
    """An AWQ GEMM layer's (out, in) float32 weight, ``(q - zero) * scale`` transposed; ``chunk`` input rows of
    ``qweight`` unpacked at a time. Memory O(P) for the result plus O(chunk x out), time O(P)."""
    zeros, s = unpack_columns(qzeros), scales.float()  # (groups, out) each
    n_in, n_out = qweight.shape[0], s.shape[1]
    out = torch.empty(n_out, n_in)
    for r in range(0, n_in, chunk):
        q = unpack_columns(qweight[r : r + chunk])  # (chunk, out)
        g = torch.arange(r, r + len(q)) // group  # (chunk,)
        q -= zeros[g]
        out[:, r : r + len(q)] = (q.float() * s[g]).T  # (chunk, out) -> (out, chunk)
    return out


def awq_variance(scales: torch.Tensor, n_in: int, group: int) -> torch.Tensor:
    """Variance of each value's rounding error: ``step**2 / 12``, the step its group's scale (plain rounding's;
    AWQ's clipping moves the values beyond a clipped group's range to its end codes, a larger error there).
    (out, in) float32; time and memory O(P)."""
    return P.gptq_variance(scales.float(), group_index(n_in, group))


def awq_grid(w: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
             work: torch.dtype, chunk: int = 512):
    """For :func:`~.packed_ints.on_grid`, per ``chunk`` input columns of an AWQ layer and the (out, in) float
    weight ``w``: (their slice, stored codes, ``w / scale``, zero), each (chunk, out). Time O(P) over all
    chunks, memory O(chunk x out)."""
    zeros = unpack_columns(qzeros)  # (groups, out)
    g_idx = group_index(qweight.shape[0], group)
    for r in range(0, qweight.shape[0], chunk):
        codes = unpack_columns(qweight[r : r + chunk])  # (chunk, out)
        cols = slice(r, r + len(codes))
        yield (cols, codes, *P.gptq_quotient(w[:, cols], scales, zeros, g_idx[cols], 0, work))
