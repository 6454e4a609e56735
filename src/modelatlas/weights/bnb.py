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
``round(x * (127 / max |row|))``. Pure tensor functions: no I/O. Time O(P) for P weights.
"""

from __future__ import annotations

import json

import torch

STATE = "quant_state.bitsandbytes__"  # + "nf4" / "fp4": the name ending of a 4-bit layer's JSON state


def parse_state(raw: torch.Tensor, where: str) -> dict:
    """A 4-bit layer's quant state (uint8 JSON bytes) as a dict with ``shape`` (a list of sizes) and an integer
    ``blocksize``; a ValueError naming ``where`` otherwise."""
    try:
        state = json.loads(bytes(raw.flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not the JSON of a bitsandbytes quant state ({e})") from e
    shape, block = state.get("shape") if isinstance(state, dict) else None, state.get("blocksize")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{where}: 'shape' {shape!r} is no list of positive sizes")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{where}: 'blocksize' {block!r} is no positive integer")
    return state


def nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of uint8 ``packed``, the high nibble of each byte first: (n,) int64."""
    b = packed.reshape(-1).to(torch.int64)  # (bytes,)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]  # (2 * bytes,) -> (n,)


def absmax(stored: torch.Tensor, state: dict, nested_absmax: torch.Tensor | None,
           nested_map: torch.Tensor | None) -> torch.Tensor:
    """Each block's absmax as float32: as stored, or decoded from its 8-bit codes (double quantization)."""
    if nested_absmax is None:
        return stored.float()
    block = int(state.get("nested_blocksize", 256))
    scale = nested_absmax.float().repeat_interleave(block)[: stored.numel()]  # (blocks,)
    return nested_map.float()[stored.long()] * scale + float(state.get("nested_offset", 0.0))


def dequantize_4bit(packed: torch.Tensor, block_absmax: torch.Tensor, quant_map: torch.Tensor,
                    state: dict) -> torch.Tensor:
    """A 4-bit layer's float32 weight of ``state["shape"]``: ``quant_map[code] * absmax`` of its block."""
    shape, block = state["shape"], state["blocksize"]
    n = 1
    for s in shape:
        n *= s
    codes = nibbles(packed, n)  # (n,)
    blocks = torch.arange(n) // block  # (n,): each value's block
    return (quant_map.float()[codes] * block_absmax[blocks]).reshape(shape)


def requantize_4bit(x: torch.Tensor, quant_map: torch.Tensor, block: int) -> torch.Tensor:
    """The 4-bit codes quantizing ``x`` gives (flattened): each block's absmax from ``x`` itself, then the
    nearest ``quant_map`` value to ``x / absmax``, clamped to [-1, 1]. (n,) int64."""
    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    pad = (-n) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)  # (B, block), the last padded by zeros
    scale = blocks.abs().amax(dim=1).clamp(min=1e-38)  # (B,)
    scaled = torch.clamp(blocks * (1.0 / scale[:, None]), -1, 1).reshape(-1)[:n]  # (n,)
    values, order = torch.sort(quant_map.float())
    nearest = torch.bucketize(scaled, (values[:-1] + values[1:]) / 2)  # index into the sorted values
    return order[nearest]


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """An LLM.int8 layer's float32 weight: ``weight * SCB / 127`` row by row."""
    return weight.float() * scb.float().reshape(-1, 1) * (1.0 / 127)


def requantize_int8(x: torch.Tensor) -> torch.Tensor:
    """The int8 values quantizing ``x`` gives: ``round(x * (127 / max |row|))``."""
    rows = x.float().abs().amax(dim=1, keepdim=True)  # (rows, 1)
    return torch.round(x.float() * (127.0 / rows)).to(torch.int8)
