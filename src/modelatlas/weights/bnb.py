"""bitsandbytes layers as transformers saves them (``load_in_4bit`` / ``load_in_8bit`` models, QLoRA bases),
turned back into float weights.

4-bit (NF4, FP4): ``weight`` is uint8, two codes a byte (the first in the high nibble), over the flattened
matrix; each block of ``blocksize`` (64) consecutive values has one ``absmax``, and a value is
``quant_map[code] * absmax``. With double quantization (``nested_absmax``) the absmaxes are themselves stored
as 8-bit codes: ``absmax = nested_quant_map[code] * nested_absmax[block of 256] + nested_offset``. The shape,
block sizes and offset are in the JSON bytes of ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``).
Quantizing: ``absmax`` is the block's largest ``|x|``, and the code the nearest ``quant_map`` value to
``x / absmax`` (the midpoints between sorted values decide).

8-bit (LLM.int8): ``weight`` is int8 and ``SCB`` one float per row: ``weight * SCB / 127``, quantized as
``round(x * (127 / max |row|))``. Pure tensor functions: no I/O; :func:`check_4bit` and :func:`check_int8`
check the stored parts from their headers, :func:`block_absmax` the values only reading shows. Time O(P)
for P weights.
"""

from __future__ import annotations

import json
import math

import torch

from modelatlas.config_types import fits
from modelatlas.weights import grid_position as G
from modelatlas.weights import packed_ints as P
from modelatlas.weights.base import TensorInfo

STATE = "quant_state.bitsandbytes__"  # + "nf4" / "fp4": the name ending of a 4-bit layer's JSON state
MAX_STATE = 1 << 16  # bytes of JSON state read when a model is opened (bitsandbytes writes ~170)
CHUNK = 1 << 20  # values decoded or quantized at a time: int64 temporaries of 8 MiB
STORAGE = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "int16": 2, "float32": 4, "int32": 4, "float64": 8,
           "int64": 8}  # ``bnb_4bit_quant_storage``: the bytes of the codes viewed as this dtype (bytes per value)
# bitsandbytes' NF4 book (functional.get_4bit_type("nf4")): what a QLoRA base's codes stand for, needed to
# recognise a merged QLoRA model (a float file) from its values alone, where no quant_map is stored
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230850219727, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}  # LLM.int8 ``weight_format``: only row read


def parse_state(raw: torch.Tensor, where: str) -> dict:
    """A 4-bit layer's quant state (uint8 JSON bytes) as a dict with ``shape`` (a list of sizes) and an integer
    ``blocksize``; a ValueError naming ``where`` otherwise."""
    try:
        state = json.loads(bytes(raw.flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: not the JSON of a bitsandbytes quant state ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{where}: the JSON quant state is a {type(state).__name__}, not an object")
    shape, block = state.get("shape"), state.get("blocksize")
    if not (isinstance(shape, list) and shape and all(_count(s) for s in shape)):
        raise ValueError(f"{where}: 'shape' {shape!r} is no list of positive sizes")
    if not _count(block):
        raise ValueError(f"{where}: 'blocksize' {block!r} is no positive integer")
    nested_block, offset = state.get("nested_blocksize", 256), state.get("nested_offset", 0.0)
    if not _count(nested_block):
        raise ValueError(f"{where}: 'nested_blocksize' {nested_block!r} is no positive integer")
    if not fits(offset, float) or not math.isfinite(offset):
        raise ValueError(f"{where}: 'nested_offset' {offset!r} is no finite number")
    return state


def _count(v) -> bool:
    """Whether a JSON value is a positive integer (``true`` is none, though Python's bool is an int)."""
    return fits(v, int) and v > 0


def check_state(info: TensorInfo) -> None:
    """A ValueError naming a 4-bit layer's JSON state tensor unless it is up to :data:`MAX_STATE` uint8 bytes
    (it is read when the model is opened). Header only."""
    if info.dtype != "uint8" or len(info.shape) != 1 or info.numel > MAX_STATE:
        raise ValueError(f"{info.name} is {info.dtype} {tuple(info.shape)}, not the uint8 bytes of a JSON quant "
                         f"state (up to {MAX_STATE})")


def check_4bit(infos: dict[str, TensorInfo], state: dict, where: str) -> None:
    """A ValueError naming the tensor when a 4-bit layer's stored parts (``infos``: role -> header) do not fit
    its JSON state ``where`` says: ``weight`` uint8 of two codes a byte for ``state["shape"]``, one ``absmax``
    per ``blocksize`` values (float, or uint8 codes with both nested parts, one ``nested_absmax`` per
    ``nested_blocksize`` codes), a 16-value ``quant_map``; the bytes may be stored as another dtype
    (:data:`STORAGE`). Header only, time O(1)."""
    weight, absmax, book = infos["weight"], infos["absmax"], infos["quant_map"]
    n = math.prod(state["shape"])
    if weight.dtype not in STORAGE:
        raise ValueError(f"{weight.name} is {weight.dtype} {tuple(weight.shape)}, not the bytes of 4-bit codes")
    size, need = STORAGE[weight.dtype], -(-n // 2)
    if not 0 <= weight.numel * size - need < size:  # whole values of the storage dtype, the last one padded
        raise ValueError(f"{weight.name} holds {weight.numel * size} bytes, but {where} says shape {state['shape']}: "
                         f"{need} bytes of two 4-bit codes")
    if len(book.shape) != 1 or book.numel != 16 or not _floats(book):
        raise ValueError(f"{book.name} is {book.dtype} {tuple(book.shape)}, not the 16 values of 4-bit codes")
    blocks = -(-n // state["blocksize"])
    if len(absmax.shape) != 1 or absmax.numel != blocks:
        raise ValueError(f"{absmax.name} holds {absmax.numel} values, but {where}'s blocksize {state['blocksize']} "
                         f"makes {blocks} blocks of the {n} weights")
    _check_nested(infos, state, where)


def _check_nested(infos: dict[str, TensorInfo], state: dict, where: str) -> None:
    """:func:`check_4bit` of the absmaxes: float, or 8-bit codes of double quantization with both nested parts."""
    absmax, scale, book = infos["absmax"], infos.get("nested_absmax"), infos.get("nested_quant_map")
    if (scale is None) != (book is None):
        have, lack = (scale, "nested_quant_map") if book is None else (book, "nested_absmax")
        raise ValueError(f"{have.name} is stored without {absmax.name.removesuffix('absmax')}{lack}")
    if scale is None:
        if not _floats(absmax):
            raise ValueError(f"{absmax.name} is {absmax.dtype} {tuple(absmax.shape)}: 8-bit codes of double "
                             f"quantization, but {absmax.name.removesuffix('absmax')}nested_absmax and "
                             f"{absmax.name.removesuffix('absmax')}nested_quant_map are missing")
        return
    if absmax.dtype != "uint8":
        raise ValueError(f"{absmax.name} is {absmax.dtype}, not the uint8 codes {scale.name} scales")
    if len(book.shape) != 1 or not 0 < book.numel <= 256 or not _floats(book):
        raise ValueError(f"{book.name} is {book.dtype} {tuple(book.shape)}, not a book of up to 256 values")
    blocks, nested = -(-absmax.numel // state.get("nested_blocksize", 256)), state.get("nested_blocksize", 256)
    if len(scale.shape) != 1 or scale.numel != blocks or not _floats(scale):
        raise ValueError(f"{scale.name} holds {scale.numel} values, but {where}'s nested_blocksize {nested} "
                         f"makes {blocks} blocks of the {absmax.numel} absmax codes")


def _floats(info: TensorInfo) -> bool:
    return info.dtype.startswith(("float", "bfloat"))


def check_int8(weight: TensorInfo, scb: TensorInfo, fmt: int | None) -> None:
    """A ValueError naming the tensor unless an LLM.int8 layer is a 2-D int8 ``weight`` with one float ``SCB``
    per row, stored in the row format (``fmt``, the ``weight_format`` value; None when not saved). Header
    only but the format's value."""
    if len(weight.shape) != 2:
        raise ValueError(f"{weight.name} is {weight.dtype} {tuple(weight.shape)}, not the (rows, columns) matrix "
                         "of an LLM.int8 layer")
    if tuple(scb.shape) != (weight.shape[0],) or not _floats(scb):
        raise ValueError(f"{scb.name} is {scb.dtype} {tuple(scb.shape)}, not one scale for each of the "
                         f"{weight.shape[0]} rows of {weight.name}")
    if fmt not in (None, 0):
        raise ValueError(f"{weight.name}_format is {fmt} ({FORMATS.get(fmt, 'unknown')}): only the row format (0) "
                         "is read, as bitsandbytes loads it")


def nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of the bytes of ``packed`` (uint8, or another :data:`STORAGE` dtype), the
    high nibble of each byte first: (n,) uint8."""
    b = _bytes(packed)  # (bytes,)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]  # (bytes, 2) -> (2 * bytes,) -> (n,)


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    """The bytes of a 4-bit layer's stored codes, whatever dtype holds them: (bytes,) uint8, a view."""
    return packed.reshape(-1).view(torch.uint8)


def _step(block: int, chunk: int) -> int:
    """Values per chunk: whole blocks of ``block``, about ``chunk``, an even count (whole bytes of codes)."""
    return max(2, chunk // block // 2 * 2) * block


def block_absmax(parts: dict[str, torch.Tensor], names: dict[str, str], state: dict) -> torch.Tensor:
    """Each block's absmax of a 4-bit layer as float32 (``parts``, ``names``: its stored tensors and their names
    by role): as stored, or decoded from 8-bit codes under double quantization, ``nested_quant_map[code] *
    nested_absmax[code's block] + nested_offset``. A ValueError naming the tensor for what the headers cannot
    show: a NaN or infinite book value or absmax, a code past the nested book. Time O(blocks)."""
    for role in ("quant_map", "nested_quant_map"):
        if role in parts and not bool(torch.isfinite(parts[role].float()).all()):
            raise ValueError(f"{names[role]} holds NaN or infinite values (a corrupt checkpoint)")
    stored = parts["absmax"]
    if "nested_absmax" not in parts:
        out = stored.float()
    else:
        book, scale = parts["nested_quant_map"].float(), parts["nested_absmax"].float()
        P.check_finite(scale, names["nested_absmax"])
        if stored.numel() and int(stored.max()) >= book.numel():
            raise ValueError(f"{names['absmax']} holds codes up to {int(stored.max())}, but {names['nested_quant_map']} "
                             f"has {book.numel()} values")
        scale = scale.repeat_interleave(int(state.get("nested_blocksize", 256)))[: stored.numel()]  # (blocks,)
        out = book[stored.long()] * scale + float(state.get("nested_offset", 0.0))
    P.check_finite(out, names["absmax"])
    return out


def _chunks(packed: torch.Tensor, block_absmax: torch.Tensor, state: dict, chunk: int):
    """A 4-bit layer's values about ``chunk`` (whole blocks) at a time: (their slice of the flattened weight,
    codes (m,) uint8, their block's absmax (m,) float32). Memory O(chunk) each, time O(P) in all."""
    n, block, b = math.prod(state["shape"]), state["blocksize"], _bytes(packed)
    step = _step(block, chunk)
    for start in range(0, n, step):
        stop = min(n, start + step)
        codes = nibbles(b[start // 2 : -(-stop // 2)], stop - start)  # (m,) the chunk's codes
        scale = block_absmax[start // block : -(-stop // block)].repeat_interleave(block)[: stop - start]  # (m,)
        yield slice(start, stop), codes, scale


def dequantize_4bit(packed: torch.Tensor, block_absmax: torch.Tensor, quant_map: torch.Tensor,
                    state: dict, chunk: int = CHUNK) -> torch.Tensor:
    """A 4-bit layer's float32 weight of ``state["shape"]``: ``quant_map[code] * absmax`` of its block, decoded
    about ``chunk`` values (whole blocks) at a time into the result. Memory O(P) for the result plus O(chunk)
    (16 MiB of temporaries per million values), time O(P)."""
    out, book = torch.empty(math.prod(state["shape"])), quant_map.float()
    for where, codes, scale in _chunks(packed, block_absmax, state, chunk):
        torch.mul(book[codes.long()], scale, out=out[where])
    return out.reshape(state["shape"])  # (n,) -> the state's shape


def requantize_4bit(x: torch.Tensor, quant_map: torch.Tensor, block: int) -> torch.Tensor:
    """The 4-bit codes quantizing ``x`` gives (flattened): each block's absmax from ``x`` itself, then the
    nearest ``quant_map`` value to ``x / absmax``, clamped to [-1, 1]. (n,) uint8; memory O(n) (called on
    chunks by :func:`requantized_share_4bit`)."""
    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    pad = (-n) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)  # (B, block), the last padded by zeros
    scale = blocks.abs().amax(dim=1).clamp(min=1e-38)  # (B,)
    scaled = torch.clamp(blocks * (1.0 / scale[:, None]), -1, 1).reshape(-1)[:n]  # (n,)
    values, order = torch.sort(quant_map.float())
    nearest = torch.bucketize(scaled, (values[:-1] + values[1:]) / 2)  # index into the sorted values
    return order.to(torch.uint8)[nearest]


def requantized_share_4bit(x: torch.Tensor, packed: torch.Tensor, quant_map: torch.Tensor, block: int,
                           chunk: int = CHUNK) -> float:
    """Share of a 4-bit layer's stored codes (``packed``) that quantizing ``x`` gives (:func:`requantize_4bit`),
    about ``chunk`` values (whole blocks) at a time. Memory O(chunk) beyond ``x``, time O(P)."""
    flat, b = x.reshape(-1), _bytes(packed)  # (n,) a view of a contiguous x; (bytes,)
    n, step, same = flat.numel(), _step(block, chunk), 0
    for start in range(0, n, step):
        part = flat[start : start + step]
        codes = nibbles(b[start // 2 : -(-(start + part.numel()) // 2)], part.numel())
        same += int((requantize_4bit(part, quant_map, block) == codes).sum())
    return same / max(n, 1)


def rounding_variance_4bit(packed: torch.Tensor, block_absmax: torch.Tensor, quant_map: torch.Tensor,
                           state: dict, chunk: int = CHUNK) -> torch.Tensor:
    """Variance of each value's rounding error of a 4-bit layer, float32 of ``state["shape"]``: its code's
    :func:`~.grid_position.level_variance` (from the code counts of :func:`_code_counts`) times its block's
    absmax squared, and on an end level (+-1) times ``(k - 1) / k`` for k such values in the block: one is
    its absmax, exact. About ``chunk`` values at a time: time O(P), memory O(P) for the result plus
    O(chunk)."""
    n, book = math.prod(state["shape"]), quant_map.float()
    counts, seen = _code_counts(packed, n, book.numel())
    table = G.level_variance(book, counts, block_absmax.numel() * seen / n)  # (16,)
    end, out = G.end_codes(book), torch.empty(n)
    for where, codes, scale in _chunks(packed, block_absmax, state, chunk):
        c = codes.long()
        torch.mul(table[c] * scale.square(), _inexact_share(end[c], state["blocksize"]), out=out[where])
    return out.reshape(state["shape"])


def merged_variance_4bit(x: torch.Tensor, quant_map: torch.Tensor, block: int) -> torch.Tensor:
    """Rounding variance of a float layer ``x`` made from a 4-bit layer's dequantized values (a QLoRA merge),
    read off ``x`` itself as :func:`rounding_variance_4bit` reads it off the stored parts: each block's absmax
    and each value's nearest code from :func:`requantize_4bit` (the merge's small update does not move them).
    Float32 of ``x``'s shape; time and memory O(P)."""
    flat = x.reshape(-1).float()  # (n,)
    n, book = flat.numel(), quant_map.float()
    codes = requantize_4bit(flat, book, block).long()  # (n,)
    pad = torch.nn.functional.pad(flat.abs(), (0, (-n) % block)).view(-1, block)  # (B, block)
    scale = pad.amax(dim=1).repeat_interleave(block)[:n]  # (n,) each value's block absmax
    table = G.level_variance(book, torch.bincount(codes, minlength=book.numel()), -(-n // block))  # (16,)
    out = table[codes] * scale.square() * _inexact_share(G.end_codes(book)[codes], block)
    return out.reshape(x.shape)


def _code_counts(packed: torch.Tensor, n: int, size: int, sample: int = G.SAMPLE) -> tuple[torch.Tensor, int]:
    """How many of a 4-bit layer's ``n`` values hold each of ``size`` codes, on about ``sample`` of them (the
    codes of evenly strided bytes; all of a smaller layer): ((size,) counts, values seen). Time O(sample)."""
    b = _bytes(packed)[: -(-n // 2)]  # (bytes,) without the storage's padding
    stride = max(1, 2 * b.numel() // max(sample, 1))
    picked = b[::stride]
    codes = nibbles(picked, n if stride == 1 else 2 * picked.numel())  # a whole layer: its last pad nibble cut
    return torch.bincount(codes.long(), minlength=size), codes.numel()


def _inexact_share(at_end: torch.Tensor, block: int) -> torch.Tensor:
    """Per value (m,) of whole blocks (the last may be short): ``(k - 1) / k`` where it is on an end level, k
    such values in its block (one of them the block's absmax, with no error), else 1. Time O(m)."""
    m, f = at_end.numel(), at_end.float()
    f = torch.nn.functional.pad(f, (0, (-m) % block)).view(-1, block)  # (blocks, block)
    return (1 - f / f.sum(1, keepdim=True).clamp(min=1)).view(-1)[:m]


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """An LLM.int8 layer's float32 weight: ``weight * SCB / 127`` row by row, computed in the result (memory
    O(P) for it, no temporary of its size)."""
    out = weight.float()
    out *= scb.float().reshape(-1, 1)  # (rows,) -> (rows, 1): one scale per row
    out *= 1.0 / 127
    return out


def rounding_variance_int8(scb: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Variance of each value's rounding error of an LLM.int8 layer of ``shape``: ``step**2 / 12``, its row's
    step ``SCB / 127``. (rows, cols) float32; time and memory O(P)."""
    out = torch.empty(shape)
    out[:] = ((scb.float() / 127).square() / 12).reshape(-1, 1)  # (rows, 1) over each row
    return out


def requantize_int8(x: torch.Tensor) -> torch.Tensor:
    """The int8 values quantizing ``x`` gives: ``round(x * (127 / max |row|))``; 0 for a row of zeros (whose
    0 * inf would be NaN, cast to int8 as whatever the platform makes of it)."""
    rows = x.float().abs().amax(dim=1, keepdim=True)  # (rows, 1)
    return torch.round(x.float() * (127.0 / rows.clamp(min=torch.finfo(torch.float32).tiny))).to(torch.int8)


def requantized_share_int8(x: torch.Tensor, weight: torch.Tensor, chunk: int = CHUNK) -> float:
    """Share of an LLM.int8 layer's stored values that quantizing ``x`` gives (:func:`requantize_int8`), about
    ``chunk`` values (whole rows) at a time. Memory O(chunk) beyond ``x``, time O(P)."""
    step, same = max(1, chunk // max(x.shape[1], 1)), 0
    for r in range(0, x.shape[0], step):
        same += int((requantize_int8(x[r : r + step]) == weight[r : r + step]).sum())
    return same / max(x.numel(), 1)
