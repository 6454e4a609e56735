"""Shared inputs of the weights tests: a small state dict, its check, and a pickle payload that must not run."""

import json
import os
import shlex

import numpy as np
import torch

from modelatlas.weights import bnb as B
from modelatlas.weights.packed_ints import pack
from modelatlas.zoo.gguf import save_gguf


class make_evil:  # noqa: N801 - a pickle payload, named like the helpers it stands with
    """Unpickling this runs ``touch <marker>`` (if the loader lets it)."""

    def __init__(self, marker, around=None):
        self.marker, self.around = str(marker), around

    def __reduce__(self):
        if self.around is not None:  # the payload as the argument of another callable: PurePosixPath(os.system(...))
            return (self.around, (make_evil(self.marker),))
        return (os.system, (f"touch {shlex.quote(self.marker)}",))  # quoted: temp paths may hold spaces


def make_state_dict():
    return {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.ones(2, dtype=torch.float16)}


def check_reads_state_dict(ck):
    assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [
        ("layer.weight", (2, 3), "float32"), ("layer.bias", (2,), "float16")]
    assert torch.equal(ck.read("layer.weight"), torch.arange(6.0).reshape(2, 3))
    assert ck.kind == "full"


# Packers of quantized layers, following each format's layout (lowest bits first; GPTQ transposed, its zeros
# stored minus one): tests/weights/test_dequantized.py, tests/lineage/test_dequantized_copies.py; AWQ's is
# modelatlas.zoo.awq (a benchmark writes AWQ files too)


def make_gptq(w: torch.Tensor, bits: int = 4, group: int = 16, zero_offset: int = 1, name: str = "layer") -> dict:
    """GPTQ tensors of an (out, in) weight rounded to nearest (the layer ``name``): symmetric, one scale per
    group of ``group`` input columns."""
    out, inp = w.shape
    g_idx = torch.arange(inp, dtype=torch.int32) // group
    maxq = 2**bits - 1
    scales = (w.abs().reshape(out, -1, group).amax(-1) * 2 / maxq).T.contiguous()  # (groups, out)
    zero = (maxq + 1) // 2
    codes = (torch.round(w.T / scales[g_idx.long()]) + zero).clamp(0, maxq)  # (in, out)
    zeros = torch.full(scales.shape, zero - zero_offset)
    return {f"{name}.qweight": pack(codes, bits, 0), f"{name}.qzeros": pack(zeros, bits, 1),
            f"{name}.scales": scales.half(), f"{name}.g_idx": g_idx}


def make_pack_quantized(w: torch.Tensor, bits: int = 4, group: int = 16, name: str = "layer") -> dict:
    """compressed-tensors pack-quantized tensors of (rows, cols) ``w`` (the layer ``name``): symmetric, rounded
    to nearest."""
    rows, cols = w.shape
    half = 2 ** (bits - 1)
    scale = w.abs().reshape(rows, -1, group).amax(-1) / (half - 1)  # (rows, groups)
    q = torch.round(w / scale.repeat_interleave(group, 1)).clamp(-half, half - 1) + half
    return {f"{name}.weight_packed": pack(q, bits, 1), f"{name}.weight_scale": scale,
            f"{name}.weight_shape": torch.tensor([rows, cols])}


NF4 = B.NF4  # bitsandbytes' NF4 book
FP4 = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
                    -3.0]) / 12  # bitsandbytes' FP4 book, as get_4bit_type("fp4") normalises it (0 twice)


def make_bnb4(w: torch.Tensor, name: str = "layer", blocksize: int = 64, nested: bool = False,
              book: torch.Tensor | None = None, quant_type: str = "nf4") -> dict:
    """bitsandbytes 4-bit tensors of ``w`` as transformers saves them: per block of ``blocksize`` flattened
    values the absmax, codes of the nearest of 16 book values (``book``: a linear one by default; :data:`NF4`,
    :data:`FP4`), two a byte, the first in the high nibble; the quant state (``quant_type``) as JSON bytes.
    ``nested``: the absmaxes double quantized (:func:`make_nested`)."""
    book = torch.linspace(-1, 1, 16) if book is None else book
    flat = w.reshape(-1, blocksize)  # (blocks, blocksize)
    absmax = flat.abs().amax(1)
    codes = ((flat / absmax[:, None]).reshape(-1, 1) - book).abs().argmin(1)  # (n,)
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8).reshape(-1, 1)
    state = {"quant_type": quant_type, "blocksize": blocksize, "shape": list(w.shape)}
    out = {f"{name}.weight": packed, f"{name}.weight.absmax": absmax, f"{name}.weight.quant_map": book}
    if nested:
        out.update(make_nested(absmax, f"{name}.weight", state))
    state_bytes = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    out[f"{name}.weight.quant_state.bitsandbytes__{quant_type}"] = state_bytes
    return out


def make_nested(absmax: torch.Tensor, name: str, state: dict, block: int = 256) -> dict:
    """Double quantization of ``absmax`` as bitsandbytes stores it: minus their mean (``nested_offset`` in
    ``state``), 8-bit codes of the nearest of 256 book values per block of ``block`` absmaxes, scaled by the
    block's largest |value| (``nested_absmax``)."""
    offset = float(absmax.mean())
    a = absmax - offset
    pad = (-a.numel()) % block
    scale = torch.nn.functional.pad(a, (0, pad)).reshape(-1, block).abs().amax(1)  # (nested blocks,)
    book = torch.linspace(-1, 1, 256)
    scaled = a / scale.repeat_interleave(block)[: a.numel()]
    codes = (scaled[:, None] - book).abs().argmin(1).to(torch.uint8)  # (blocks,)
    state.update(nested_blocksize=block, nested_offset=offset)
    return {f"{name}.absmax": codes, f"{name}.nested_absmax": scale, f"{name}.nested_quant_map": book}


def make_bnb8(w: torch.Tensor, name: str = "layer") -> dict:
    """LLM.int8 tensors of ``w``: int8 rows scaled to 127 at their largest |value|, and that value (SCB)."""
    scb = w.abs().amax(1)
    return {f"{name}.weight": torch.round(w / scb[:, None] * 127).to(torch.int8), f"{name}.SCB": scb}


def make_mlx(x: torch.Tensor, bits: int = 4, group: int = 32, name: str = "a") -> dict:
    """MLX affine tensors of (rows, cols) ``x`` quantized as mx.quantize does (module docstring of
    mlx_affine): ``weight`` uint32 words of one little-endian bit stream per row, ``scales``, ``biases``."""
    from modelatlas.weights import mlx_affine as M

    levels = (1 << bits) - 1
    g = x.reshape(x.shape[0], -1, group)  # (rows, groups, group)
    hi, lo = g.amax(-1), g.amin(-1)
    low = lo.abs() > hi.abs()
    scale = torch.where(low, 1.0, -1.0) * ((hi - lo) / levels).clamp(min=1e-7)
    edge = torch.where(low, lo, hi)
    scale = edge / torch.round(edge / scale)
    codes = M.quantize_codes(x, bits, group)
    big = [sum(int(c) << (bits * i) for i, c in enumerate(row)) for row in codes.tolist()]
    n_words = -(-codes.shape[1] * bits // 32)
    words = torch.tensor([[(b >> (32 * k)) & 0xFFFFFFFF for k in range(n_words)] for b in big]).to(torch.uint32)
    return {f"{name}.weight": words, f"{name}.scales": scale, f"{name}.biases": edge}


def make_gguf_file(path, tensors: dict, imatrix: bool = False):
    """A GGUF file of ``tensors`` (name -> float array, or (raw blocks, type name)); ``imatrix``: with the
    metadata llama-quantize writes when it used an importance matrix (:func:`modelatlas.zoo.gguf.save_gguf`)."""
    return save_gguf(path, tensors, imatrix)


def make_least_squares_q4_0(x: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of ``x`` (rows, 32 k) with each block's scale fitted by least squares, as llama.cpp's
    ``make_qx_quants`` does with an importance matrix (here of ones): codes round(x / s) for 19 trial scales
    s = max / -(8 + 0.1 j), j = -9..9, clamped to -8..7, each refitted to sum(x L) / sum(L^2); the least error wins."""
    blocks = x.reshape(-1, 32).astype(np.float64)  # (B, 32)
    top = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)][:, None]  # (B, 1) the signed largest
    best, codes, scale = np.full(len(blocks), np.inf), None, None
    for j in range(-9, 10):
        q = np.clip(np.rint(blocks * -(8 + 0.1 * j) / top), -8, 7)
        s = (blocks * q).sum(1, keepdims=True) / (q * q).sum(1, keepdims=True)
        err = ((blocks - s * q) ** 2).sum(1)
        won = err < best
        best = np.where(won, err, best)
        codes = q if codes is None else np.where(won[:, None], q, codes)
        scale = s if scale is None else np.where(won[:, None], s, scale)
    u = (codes + 8).astype(np.uint8)  # (B, 32) stored codes 0..15
    qs = u[:, :16] | (u[:, 16:] << 4)  # (B, 16) value j in the low nibble, j + 16 in the high
    d = scale.astype(np.float16).view(np.uint8)  # (B, 2)
    return np.concatenate([d, qs], axis=1).reshape(x.shape[0], -1)  # (rows, blocks x 18)


def make_byte_counter(monkeypatch) -> dict:
    """file name -> bytes read through :class:`~modelatlas.weights.byte_ranges.ByteRanges` (safetensors and GGUF
    readers), counted from now on."""
    from modelatlas.weights.byte_ranges import ByteRanges

    got: dict = {}
    read_into = ByteRanges.read_into

    def counted(self, offset, buf, what):
        got[self.path.name] = got.get(self.path.name, 0) + buf.nbytes
        return read_into(self, offset, buf, what)

    monkeypatch.setattr(ByteRanges, "read_into", counted)
    return got


FP4_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # E2M1 magnitudes, by code & 7


def make_fp4_codes(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of the values nearest ``q`` (rows, cols), clamped to +-6, the sign in bit 3: (rows, cols)."""
    mag = (q.abs().clamp(max=6).unsqueeze(-1) - FP4_LEVELS).abs().argmin(-1)  # (rows, cols)
    return mag + 8 * (q < 0).long()


def make_fp4_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte, the even column in the low nibble: (rows, cols / 2) uint8."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def make_nvfp4(w: torch.Tensor, name: str = "layer") -> dict:
    """compressed-tensors NVFP4 tensors of (rows, cols) ``w``, as llm-compressor writes them: a global scale
    ``448 * 6 / max |w|``, a float8 scale per 16 values ``global * max |block| / 6``, codes of ``w / (scale /
    global)``."""
    glob = (448 * 6 / w.abs().amax()).reshape(1)  # () -> (1,)
    scale = (glob * w.abs().reshape(w.shape[0], -1, 16).amax(-1) / 6).to(torch.float8_e4m3fn)  # (rows, groups)
    codes = make_fp4_codes(w / (scale.float() / glob).repeat_interleave(16, 1))
    return {f"{name}.weight_packed": make_fp4_bytes(codes), f"{name}.weight_scale": scale,
            f"{name}.weight_global_scale": glob}


def make_mxfp4_exponents(w: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents per 32 values of (rows, cols) ``w``: the block's largest |value| over the scale in
    [3.5, 7), as compressed-tensors picks them (largest |value| rounded to a power of two from 1.75 up, over
    4). (rows, cols / 32) int64."""
    amax = w.abs().reshape(w.shape[0], -1, 32).amax(-1)  # (rows, blocks)
    return (torch.floor(torch.log2(amax / 1.75)) + 1 - 2 + 127).long()


def make_mxfp4(w: torch.Tensor, name: str = "layer") -> dict:
    """compressed-tensors MXFP4 tensors of (rows, cols) ``w``: uint8 exponents, codes of ``w / 2 ** (e - 127)``."""
    e = make_mxfp4_exponents(w)
    codes = make_fp4_codes(w / torch.exp2(e.float() - 127).repeat_interleave(32, 1))
    return {f"{name}.weight_packed": make_fp4_bytes(codes), f"{name}.weight_scale": e.to(torch.uint8)}


def make_gpt_oss(w: torch.Tensor, name: str = "experts.gate_up_proj") -> dict:
    """gpt-oss MXFP4 tensors of (experts, in, out) ``w``: ``name_blocks`` (experts, out, in / 32, 16),
    ``name_scales`` (experts, out, in / 32), of the transposed matrices."""
    e, n_in, n_out = w.shape
    rows = w.transpose(1, 2).reshape(e * n_out, n_in)  # (experts * out, in)
    t = make_mxfp4(rows)
    return {f"{name}_blocks": t["layer.weight_packed"].reshape(e, n_out, n_in // 32, 16),  # (e * out, in / 2) ->
            f"{name}_scales": t["layer.weight_scale"].reshape(e, n_out, n_in // 32)}  # (e * out, in / 32) ->


# MLX's fp4_e2m1 (its Metal kernel): the code of |q| is the last threshold it passes; ">=" at the edges whose
# upper level has the even mantissa (ties to even). Its CPU quantizer (an argmin over the levels) sends every
# tie to the lower magnitude: ">" throughout.
MLX_FP4_THRESHOLDS = ((0.25, 1, False), (0.75, 2, True), (1.25, 3, False), (1.75, 4, True), (2.5, 5, False),
                      (3.5, 6, True), (5.0, 7, False))


def make_mlx_mxfp4(x: torch.Tensor, name: str = "a", ties: str = "even") -> dict:
    """MLX ``mxfp4`` tensors of (.., rows, cols) ``x`` as ``mx.quantize(x, mode="mxfp4")`` made them in the mlx
    source read in session 36: per 32 values the exponent ``e = round(log2(max |x| / 6))`` (clamped to +-127;
    mlx 0.32.4 rounds it up instead: the reader takes the stored exponents), stored ``e + 127`` (E8M0); codes of
    ``x / 2**e`` by :data:`MLX_FP4_THRESHOLDS` (``ties="lower"``: as its CPU quantizer), the sign in bit 3; eight
    codes a uint32 word from its low bits up."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)  # (.., rows, groups, 32)
    e = torch.round(torch.log2(g.abs().amax(-1) / 6)).clamp(-127, 127)  # (.., rows, groups); log2(0): -127
    q = g / torch.exp2(e)[..., None]
    codes = torch.zeros(q.shape, dtype=torch.int64)
    for edge, code, even_above in MLX_FP4_THRESHOLDS:
        passed = q.abs() >= edge if even_above and ties == "even" else q.abs() > edge
        codes = torch.where(passed, code, codes)
    codes |= torch.signbit(q).long() << 3
    nibbles = codes.reshape(*x.shape[:-1], -1, 8)  # (.., rows, cols / 8, 8): a word's codes
    words = (nibbles << (4 * torch.arange(8))).sum(-1)  # (.., rows, cols / 8)
    return {f"{name}.weight": words.to(torch.uint32), f"{name}.scales": (e + 127).to(torch.uint8)}


def make_mlx_mxfp8(x: torch.Tensor, name: str = "a") -> dict:
    """MLX ``mxfp8`` tensors of (.., rows, cols) ``x`` as mlx 0.32.4's ``mx.quantize(x, mode="mxfp8")`` makes
    them: per 32 values the exponent ``ceil(log2(max |x| / 448))`` (seen in mlx 0.32.4: 600 in a group gives 1),
    stored ``e + 127``; ``x / 2**e`` as float8 E4M3 (nearest, ties to even), four bytes a uint32 word from its low
    byte up."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)  # (.., rows, groups, 32)
    e = torch.ceil(torch.log2(g.abs().amax(-1) / 448)).clamp(-127, 127)  # (.., rows, groups)
    values = (g / torch.exp2(e)[..., None]).to(torch.float8_e4m3fn).view(torch.uint8).long()
    quads = values.reshape(*x.shape[:-1], -1, 4)  # (.., rows, cols / 4, 4): a word's bytes
    words = (quads << (8 * torch.arange(4))).sum(-1)  # (.., rows, cols / 4)
    return {f"{name}.weight": words.to(torch.uint32), f"{name}.scales": (e + 127).to(torch.uint8)}
