"""FP4 (E2M1) layers, turned back into float weights: compressed-tensors' NVFP4 and MXFP4 (llm-compressor's
``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``) and gpt-oss's MXFP4 experts (OpenAI's safetensors, as
transformers reads them).

A 4-bit code is a sign (bit 3) and one of the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (:data:`E2M1`); two codes
a byte, the first (even column) in the low nibble. Each block of consecutive values along a row has one scale:

- NVFP4 (compressed-tensors): ``L.weight_packed`` uint8 (rows, cols / 2), ``L.weight_scale`` float8_e4m3
  (rows, cols / 16), ``L.weight_global_scale`` (1,): a value is ``code * weight_scale / weight_global_scale``
  (the global scale divides: llm-compressor stores the block scale times it, ``448 * 6 / max |w|``).
- MXFP4 (compressed-tensors): the same with ``L.weight_scale`` uint8 E8M0 exponents per 32 values, a scale
  ``2 ** (e - 127)``, no global scale.
- gpt-oss: ``X_blocks`` uint8 (experts, out, cols / 32, 16) and ``X_scales`` uint8 E8M0 (experts, out,
  cols / 32): read as transformers' ``convert_moe_packed_tensors`` gives them, one float32 ``X``
  (experts, in, out) (``gate_up_proj``, ``down_proj``: the matrix transposed, as the dense model stores it).
- MLX's ``mxfp4`` mode (``mx.quantize(w, mode="mxfp4")``, mlx-lm): ``L.weight`` uint32 (.., rows, cols / 8),
  eight codes a word from its low bits up (so its little-endian bytes are compressed-tensors' code bytes), and
  ``L.scales`` uint8 E8M0 (.., rows, cols / 32); leading dims are stacked experts, read as stored
  (:func:`~.packed_layers.find_packed` finds them; ``state["words"]``).

Quantizing is ``x / scale`` rounded to the nearest E2M1 value (ties to the even mantissa, as
compressed-tensors' ``cast_to_fp4`` and MLX's Metal kernel), clamped to +-6: :func:`requantized_share` does it
again with the stored scales (MLX's CPU quantizer, an argmin over the levels, sends ties to the lower magnitude:
either is taken for MLX's layers). Pure tensor functions but :func:`find_fp4`, which reads headers only. Time O(P) for P weights.
"""

from __future__ import annotations

import math

import torch

from modelatlas.weights import grid_position as G
from modelatlas.weights.base import TensorInfo, spaced_rows
from modelatlas.weights.sampled import holds_sample, sample_values

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_EDGES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # magnitudes half way between levels
GROUPS = {"NVFP4": 16, "MXFP4": 32}
CHUNK = 1 << 20  # values decoded at a time: int64 temporaries of 8 MiB


def find_fp4(name: str, infos: dict[str, TensorInfo]):
    """The FP4 layer whose code bytes are ``name`` (a :class:`~.packed_layers.PackedLayer`), None for other
    tensors; a ValueError naming the tensor when its parts do not fit together. Header only, time O(1)."""
    from modelatlas.weights.packed_layers import PackedLayer  # (that module dispatches here)

    if name.endswith(".weight_packed") and infos[name].dtype == "uint8":
        found = _compressed(name, infos)
    elif _uint8(infos, name) and name.endswith("_blocks") and _uint8(infos, name.removesuffix("_blocks") + "_scales"):
        found = _gpt_oss(name, infos)  # (other ``_blocks`` / ``_scales`` pairs are left as stored)
    else:
        return None
    if found is None:
        return None
    base, shape, label, parts, experts = found
    return PackedLayer(base, "fp4", shape, label, 4, parts, group_size=GROUPS[label],
                       state={"experts": experts})


def _uint8(infos: dict[str, TensorInfo], name: str) -> bool:
    """Whether ``name`` is a stored uint8 tensor. Header only."""
    return name in infos and infos[name].dtype == "uint8"


def _compressed(name: str, infos: dict[str, TensorInfo]):
    """compressed-tensors' NVFP4 / MXFP4 ``weight_packed`` with its ``weight_scale`` (+ ``weight_global_scale``)
    checked: (layer name, shape, label, parts, False); None beside a ``weight_shape`` (``pack-quantized``).
    Header only, time O(1)."""
    base = name.removesuffix("_packed")
    parts = {"packed": name, "scale": f"{base}_scale", "global_scale": f"{base}_global_scale"}
    if f"{base}_shape" in infos:
        return None
    if parts["scale"] not in infos:
        raise ValueError(f"{name} is uint8 FP4 codes, but {parts['scale']} is missing")
    packed, scale = infos[name], infos[parts["scale"]]
    label = "MXFP4" if scale.dtype == "uint8" else "NVFP4"
    if label == "NVFP4" and not scale.dtype.startswith(("float", "bfloat")):
        raise ValueError(f"{parts['scale']} is {scale.dtype}, not NVFP4's float8 scales nor MXFP4's uint8 exponents")
    glob = infos.get(parts["global_scale"])
    if (glob is None) != (label == "MXFP4") or (glob is not None and (glob.numel != 1 or glob.dtype.startswith(
            ("int", "uint")))):
        shown = f"{glob.dtype} {tuple(glob.shape)}" if glob is not None else "missing"
        raise ValueError(f"{parts['global_scale']} is {shown}: {label} ({scale.dtype} scales) needs "
                         f"{'one float' if label == 'NVFP4' else 'none'}")
    if label == "MXFP4":
        del parts["global_scale"]
    if len(packed.shape) != 2:
        raise ValueError(f"{name} is {tuple(packed.shape)}, not the (rows, columns / 2) bytes of a matrix")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    _check_scales(scale, (rows, -(-cols // GROUPS[label])), label, name)
    return base, (rows, cols), label, parts, False


def _gpt_oss(name: str, infos: dict[str, TensorInfo]):
    """gpt-oss's ``X_blocks`` (experts, out, blocks, 16) with ``X_scales`` (experts, out, blocks) checked:
    (``X``, (experts, in, out), "MXFP4", parts, True). Header only, time O(1)."""
    base = name.removesuffix("_blocks")
    blocks, scales = infos[name], infos[base + "_scales"]
    if len(blocks.shape) != 4 or blocks.shape[3] != 16:
        raise ValueError(f"{name} is uint8 {tuple(blocks.shape)} beside uint8 {scales.name}, not gpt-oss's MXFP4 "
                         "blocks (experts, out, blocks, 16)")
    _check_scales(scales, tuple(blocks.shape[:3]), "MXFP4", name)
    experts, out, n = blocks.shape[:3]
    return base, (experts, n * 32, out), "MXFP4", {"packed": name, "scale": base + "_scales"}, True


def _check_scales(scale: TensorInfo, want: tuple[int, ...], label: str, codes: str) -> None:
    """A ValueError naming ``scale`` unless it has shape ``want`` (MXFP4: uint8 exponents). Header only."""
    if label == "MXFP4" and scale.dtype != "uint8":
        raise ValueError(f"{scale.name} is {scale.dtype}, not MXFP4's uint8 exponents")
    if tuple(scale.shape) != want:
        raise ValueError(f"{scale.name} has shape {tuple(scale.shape)}, but {codes}'s {label} codes need one "
                         f"scale per {GROUPS[label]} values: {want}")


def block_scales(parts: dict[str, torch.Tensor], label: str, where: str) -> torch.Tensor:
    """Each block's scale as float32, of the stored scales' shape: ``2 ** (e - 127)`` for MXFP4's exponents,
    ``scale / global_scale`` for NVFP4. A ValueError naming ``where`` for NaN (E8M0's 255) or infinite scales,
    a zero global scale. Time O(blocks)."""
    s = parts["scale"]
    if label == "MXFP4":
        e = s.to(torch.int32)
        out = torch.ldexp(torch.ones(e.shape), e - 127)
        out[e == 255] = float("nan")  # E8M0's NaN
    else:
        out = s.float() / parts["global_scale"].float().reshape(())  # (1,) -> (): one for the tensor
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{where} holds NaN or infinite scales (a corrupt checkpoint, or a zero global scale)")
    return out


def _rows(parts: dict[str, torch.Tensor], state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The code bytes (rows, cols / 2) and scales (rows, blocks) row by row (gpt-oss: each expert's output
    rows in turn; MLX: the rows of its last dimension). Views, no copy."""
    b, s = parts["packed"], parts["scale"]
    if state.get("experts"):
        return b.reshape(-1, b.shape[2] * 16), s.reshape(-1, s.shape[2])  # (experts * out, in / 2), (., blocks)
    if state.get("words"):  # MLX's uint32 words: their bytes in memory (little-endian, as safetensors stores
        # them on every host torch runs on here) are the codes' bytes, low nibble first
        b = b.contiguous().view(torch.uint8)  # (.., rows, cols / 8) -> (.., rows, cols / 2)
        return b.reshape(-1, b.shape[-1]), s.reshape(-1, s.shape[-1])  # (rows, cols / 2), (rows, blocks)
    return b, s


def _chunks(codes: torch.Tensor, scales: torch.Tensor, group: int):
    """(row slice, codes (r, cols) uint8, value scales (r, cols) float32) about :data:`CHUNK` values at a time.
    Time O(P) in all, memory O(chunk) each."""
    cols = codes.shape[1] * 2
    step = max(1, CHUNK // max(cols, 1))
    for start in range(0, codes.shape[0], step):
        b = codes[start : start + step]
        c = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], cols)  # (r, cols / 2, 2) -> (r, cols)
        s = scales[start : start + step].repeat_interleave(group, dim=1)[:, :cols]  # (r, cols)
        yield slice(start, start + step), c, s


def _codes_scales(parts: dict[str, torch.Tensor], layer, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(code bytes (rows, cols / 2), block scales (rows, blocks)) of the layer as stored (gpt-oss: a row each
    expert's output), the scales checked finite (:func:`block_scales`)."""
    codes, stored = _rows(parts, layer.state)
    return codes, block_scales({**parts, "scale": stored}, layer.label, where)


def _store(out: torch.Tensor, layer, rows: slice, values: torch.Tensor) -> None:
    """``values`` (r, cols) of stored rows ``rows`` written into ``out``: gpt-oss's rows (each expert's outputs
    in turn) into the columns of its (experts, in, out) result, as transformers transposes them, without a
    transposed copy of the whole layer (a gpt-oss-20b ``gate_up_proj`` is 2 GiB in float32). Time O(r cols)."""
    if not layer.state.get("experts"):
        out.view(-1, out.shape[-1])[rows] = values  # (.., rows, cols) -> (rows, cols): MLX's stacked experts
        return
    n_out, by_row = layer.shape[2], out.transpose(1, 2)  # (experts, out, in): a view
    at, stop = rows.start, rows.start + values.shape[0]
    while at < stop:  # the rows of each expert the chunk holds
        e, o = divmod(at, n_out)
        n = min(stop - at, n_out - o)
        by_row[e, o : o + n] = values[at - rows.start : at - rows.start + n]
        at += n


def dequantize(parts: dict[str, torch.Tensor], layer, where: str) -> torch.Tensor:
    """The layer's float32 weight: ``E2M1[code] * scale`` of its block, about a million values at a time.
    Time O(P), memory O(P) for the result plus the chunk's temporaries."""
    codes, scales = _codes_scales(parts, layer, where)
    out = torch.empty(layer.shape)  # (rows, cols), or gpt-oss's (experts, in, out)
    for rows, c, s in _chunks(codes, scales, layer.group_size):
        _store(out, layer, rows, E2M1[c.long()] * s)
    return out


def rounding_variance(parts: dict[str, torch.Tensor], layer, where: str) -> torch.Tensor:
    """Variance (second moment) of each value's rounding error: its level's :func:`_level_table` entry (the
    cells of the E2M1 grid are not even: 0.5 wide up to 1.5, 0.75 at 2, 1 at 3, 1.5 at 4) times its block's
    scale squared; NVFP4's values at +-6 times ``(k - 1) / k`` for k of them in the block (one is its
    largest, which the scale puts there but for its float8 rounding). MXFP4's scales are powers of two, so
    its largest value is on no level. Time O(P)."""
    codes, scales = _codes_scales(parts, layer, where)
    out, table = torch.empty(layer.shape), _level_table(codes, layer.label, layer.group_size)
    for rows, c, s in _chunks(codes, scales, layer.group_size):
        share = _inexact((c & 7) == 7, layer.group_size) if layer.label == "NVFP4" else 1.0
        _store(out, layer, rows, table[c.long()] * share * s.square())
    return out


def _level_table(codes: torch.Tensor, label: str, group: int) -> torch.Tensor:
    """Each code's rounding error second moment in units of its block scale squared: over its level's cell
    under a density linear there, fitted to the code counts of ~:data:`~.grid_position.SAMPLE` evenly strided
    values (:func:`~.grid_position.level_variance`; NVFP4's one largest value a block left out); MXFP4's +-6
    is 1/3, its cell [5, 7] taken even (compressed-tensors' exponents put a block's largest value in [3.5, 7),
    the OCP rule's in [4, 8): values past 6 are clipped). (16,) float32; time O(sample)."""
    b = codes.reshape(-1)  # (bytes,)
    picked = b[:: max(1, 2 * b.numel() // G.SAMPLE)]
    c = torch.stack([picked & 0xF, picked >> 4], dim=-1).reshape(-1)  # (2 * picked,)
    table = G.level_variance(E2M1, torch.bincount(c.long(), minlength=16),
                             c.numel() / group if label == "NVFP4" else 0.0)
    if label == "MXFP4":
        table[[7, 15]] = 1 / 3
    return table


def _inexact(at_top: torch.Tensor, group: int) -> torch.Tensor | float:
    """``(k - 1) / k`` at each of a block's k values on the top level, 1 elsewhere: (r, cols) (1.0 when the
    columns are no whole blocks)."""
    r, cols = at_top.shape
    if cols % group:
        return 1.0
    f = at_top.float().view(r, cols // group, group)  # (r, blocks, group)
    return (1 - f / f.sum(-1, keepdim=True).clamp(min=1)).view(r, cols)  # (r, blocks, group) -> (r, cols)


def round_e2m1(q: torch.Tensor, ties_even: bool = True) -> torch.Tensor:
    """Codes of the E2M1 values nearest ``q`` (clamped to +-6; a tie to the even mantissa: 0.25 -> 0,
    0.75 -> 1, 2.5 -> 2, 5 -> 4, as compressed-tensors rounds; not ``ties_even``: to the lower magnitude, as
    MLX's CPU ``mx.quantize``, the first of an argmin over the levels), negative values signed (bit 3). uint8."""
    m = q.abs().clamp(max=6.0)
    idx = torch.bucketize(m, _EDGES)  # ties to the lower level
    if not ties_even:
        return (idx | ((q < 0).long() << 3)).to(torch.uint8)
    up = torch.zeros(8, dtype=torch.bool)
    up[[1, 3, 5]] = True  # edges 0.75, 1.75, 3.5 round up (their upper level's mantissa is even)
    tie = (idx < 7) & (m == _EDGES[idx.clamp(max=6)]) & up[idx.clamp(max=6)]
    return ((idx + tie.long()) | ((q < 0).long() << 3)).to(torch.uint8)


def requantized_share(x: torch.Tensor, parts: dict[str, torch.Tensor], layer, where: str,
                      max_rows: int | None = None) -> float:
    """Share of the layer's values that rounding ``x`` with the stored scales gives (:func:`round_e2m1` of
    ``x / scale``, in float32 as compressed-tensors divides); +0 and -0 alike. On up to ``max_rows`` evenly
    spaced rows (:func:`sampled_rows`; ``x`` whole or those rows), as the other formats' tests sample: a copy
    matches on every row, a fine-tune misses on each (every value checked took 2.0 s for 16M, session 32).
    Every block's scale is checked finite all the same. A block of scale 0 holds 0 whatever its codes: its
    values match (as GGUF's sub-blocks of scale 0, :func:`~.gguf_grid.grid_test`). Time O(max_rows cols), O(P)
    with ``max_rows`` None. MLX's layers (``state["words"]``): a value half way between two levels matches
    either (its Metal kernel rounds ties to even, its CPU quantizer to the lower magnitude)."""
    same = total = 0
    for xs, c, s in _sample(x, parts, layer, sampled_rows(layer, max_rows), where):
        q = xs / s
        again = round_e2m1(q)
        hit = E2M1[again.long()] == E2M1[c]
        if layer.state.get("words"):
            hit |= E2M1[round_e2m1(q, ties_even=False).long()] == E2M1[c]
        same += int((hit | (s == 0)).sum())  # scale 0: 0 whatever x / 0 gave
        total += xs.numel()
    return same / max(total, 1)


def _sample(x: torch.Tensor, parts: dict[str, torch.Tensor], layer, rows: torch.Tensor, where: str):
    """(values of ``x``, codes, value scales), each (r, m) float32 / int64 / float32, at rows ``rows`` as
    :meth:`read_rows` counts them, about :data:`CHUNK` values at a time; ``x`` the whole layer or those rows.
    gpt-oss: row ``e * in + i`` of its (experts * in, out) view is input ``i`` of every output ``o`` of expert
    ``e``, stored at column ``i`` of stored row ``e * out + o``: gathered from there, nibble by nibble. Every
    block's scale is checked finite. Time O(r m)."""
    codes, scales = _codes_scales(parts, layer, where)  # all the scales: checked
    xs = sample_values(x, layer.shape, rows)  # (r, m): m the last dimension's, gpt-oss's outputs
    if not layer.state.get("experts"):
        for at, c, s in _chunks(codes[rows], scales[rows], layer.group_size):
            yield xs[at].float(), c.long(), s
        return
    n_exp, n_in, n_out = layer.shape
    e, i = rows // n_in, rows % n_in
    b = parts["packed"].reshape(n_exp, n_out, -1)[e, :, i // 2]  # (experts, out, in / 2) -> (r, out)
    c = torch.where((i % 2 == 1)[:, None], b >> 4, b & 0xF)  # an odd input's code: the high nibble
    s = scales.reshape(n_exp, n_out, -1)[e, :, i // layer.group_size]  # (experts, out, blocks) -> (r, out)
    yield xs.float(), c.long(), s


def sampled_rows(layer, max_rows: int | None) -> torch.Tensor:
    """The rows :func:`requantized_share` and :func:`grid_position` look at, as :meth:`read_rows` counts them
    (of the layer's last dimension: a compressed-tensors matrix's own rows, gpt-oss's ``e * in + i`` of its
    (experts * in, out) view): up to ``max_rows`` evenly spaced ones, every row for None. (r,) int64,
    ascending."""
    n = layer.shape[0] * layer.shape[1] if layer.state.get("experts") else math.prod(layer.shape[:-1])
    return torch.arange(n) if max_rows is None else spaced_rows(n, max_rows)


def fits(x: torch.Tensor, layer, max_rows: int, rows: torch.Tensor | None = None) -> bool:
    """Whether ``x`` is the whole layer (``rows`` None) or its :func:`sampled_rows` (r, m), ``rows`` being
    those, as the tests take it (:func:`~.sampled.holds_sample`). Time O(r)."""
    return holds_sample(x, layer.shape, sampled_rows(layer, max_rows), rows)


def grid_position(x: torch.Tensor, parts: dict[str, torch.Tensor], layer, where: str, max_rows: int) -> float:
    """Mean distance of ``x``'s values to the nearest E2M1 level times their block's scale, in halves of the
    gap between the two levels around it (:func:`~.grid_position.book_position`; past +-6: on the end): ~0.5
    for the model the layer was quantized from, near 0 for one made from its dequantized values (a QLoRA-style
    merge). On the rows :func:`requantized_share` compares (``x`` whole or those rows). Time O(max_rows cols)."""
    t = [(xs / s).reshape(-1) for xs, _, s in _sample(x, parts, layer, sampled_rows(layer, max_rows), where)]
    return G.book_position(torch.cat(t), E2M1)  # (r * m,)
