"""Checkpoints whose weights a quantization library stored packed or scaled, read as float weights.

:func:`dequantized` wraps a checkpoint holding such layers so that each reads as one float32 ``<layer>.weight``
of its real shape, in place of the tensors that store it:

- GPTQ (AutoGPTQ, GPTQModel): ``qweight``, ``qzeros``, ``scales``, ``g_idx``, 2, 4 or 8 bits
  (:mod:`.packed_ints`); the ``gptq`` checkpoint format's zeros are stored minus one, ``gptq_v2``'s not (the
  ``checkpoint_format`` of the model's ``quantization_config``; ``gptq`` when none is given).
- compressed-tensors ``pack-quantized`` (llm-compressor W4A16, W8A16): ``weight_packed``, ``weight_scale``,
  ``weight_shape``, optionally ``weight_zero_point`` and ``weight_g_idx``.
- float8 / int8 values with scales (compressed-tensors ``float-quantized`` / ``int-quantized``; DeepSeek's
  ``weight_scale_inv``): ``weight`` and its scale (:mod:`.scaled`).

The other tensors read as stored. AWQ (``qweight`` without ``g_idx``), EXL2 and bitsandbytes layers stay as
stored (AWQ also rescales the weights it quantizes, so they are no rounding of the model's own). Each layer's
:meth:`~Checkpoint.quantization` names its type ("GPTQ-INT4", "INT4", "FP8", "INT8"), and
:meth:`~Checkpoint.requantized_match` rounds a float weight onto its stored grid, to tell the model it was
quantized from (every value) from a fine-tune of it (fewer). Header reads only, plus the small
``weight_shape`` tensors; time O(P) per dequantized layer of P weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights import bnb as B
from modelatlas.weights import packed_ints as P
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line, named_by_folder
from modelatlas.weights.scaled import SCALED_DTYPES, requantized_share, scaled_weight, working_dtypes

SAMPLE_ROWS = 256  # output rows (channels) compared by requantized_match: a copy matches on every one
_CONFIGS = ("config.json", "quantize_config.json", "quantization_config.json")
_INTS = ("int32", "int64", "int16", "int8", "uint8")
_MARKS = (".qweight", "_packed", "_scale", "_scale_inv", ".absmax", ".SCB")  # name endings of the tensors of a dequantized layer


@dataclass(frozen=True)
class PackedLayer:
    """One dequantized layer: the weight it reads as, how it is stored, and the stored tensors by role."""

    name: str
    scheme: str  # "gptq" | "pack-quantized" | "scaled"
    shape: tuple[int, ...]
    label: str  # the quantization type shown: "GPTQ-INT4", "INT4", "FP8", "INT8"
    bits: int
    parts: dict[str, str] = field(default_factory=dict)  # role -> stored tensor name
    offset: int = 0  # added to GPTQ's stored zeros: 1 in the ``gptq`` checkpoint format, 0 in ``gptq_v2``


def quantization_config(path: Path) -> dict:
    """The ``quantization_config`` of the model at ``path`` (its folder's ``config.json``, or AutoGPTQ's
    ``quantize_config.json``), {} when it has none. A file is read with its folder's config only when it is
    the folder's model file (``model.safetensors``). A config that is no JSON object raises, naming it."""
    folder = path if path.is_dir() else path.parent if named_by_folder(path) else None
    for name in _CONFIGS if folder is not None else ():
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f, f"cannot read the quantization settings: {error_line(e)}") from e
        if not isinstance(data, dict):
            raise CheckpointError(f, "not a JSON object")
        got = data.get("quantization_config", data if name != "config.json" else None)
        if isinstance(got, dict):
            return got
    return {}


def find_packed(infos: dict[str, TensorInfo], config: dict, read) -> list[PackedLayer]:
    """The layers of ``infos`` (name -> info) stored packed or scaled, as :class:`PackedLayer`; ``read(name)``
    reads a small tensor (a ``weight_shape``). AWQ-style packings (no ``g_idx``) and widths that span words
    are left out. Time O(tensors)."""
    if str(config.get("quant_method", "")).lower() == "awq":
        return []
    out = []
    for name, t in infos.items():
        if not t.dtype.startswith(_INTS + ("float8",)):
            continue
        layer = (_gptq(name, infos, config) or _pack_quantized(name, infos, config, read)
                 or _scaled(name, infos) or _bnb(name, infos, read))
        if layer is not None:
            out.append(layer)
    return out


def _gptq(name: str, infos: dict[str, TensorInfo], config: dict) -> PackedLayer | None:
    base = name.removesuffix(".qweight")
    parts = {r: f"{base}.{r}" for r in ("qweight", "qzeros", "scales", "g_idx")}
    if base == name or not all(p in infos for p in parts.values()):
        return None
    bits = P.gptq_bits(torch.Size(infos[name].shape), torch.Size(infos[parts["g_idx"]].shape))
    if bits not in P.BITS:
        return None
    v2 = str(config.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    shape = (infos[name].shape[1], infos[parts["g_idx"]].shape[0])  # (out, in)
    return PackedLayer(f"{base}.weight", "gptq", shape, f"GPTQ-INT{bits}", bits, parts, 0 if v2 else 1)


def _pack_quantized(name: str, infos: dict[str, TensorInfo], config: dict, read) -> PackedLayer | None:
    base = name.removesuffix("_packed")
    parts = {r: f"{base}_{r}" for r in ("packed", "scale", "shape", "zero_point", "g_idx")}
    if base == name or not all(parts[r] in infos for r in ("scale", "shape")):
        return None
    parts = {r: p for r, p in parts.items() if p in infos}
    shape = P.packed_shape(read(parts["shape"]), parts["shape"])
    words = infos[name].shape[-1]
    given = _weights_config(config).get("num_bits")
    fits = [b for b in P.BITS if -(-shape[1] * b // 32) == words]
    bits = given if given in fits else (fits[-1] if fits else None)
    if bits is None:
        return None
    return PackedLayer(base, "pack-quantized", shape, f"INT{bits}", bits, parts)


def _scaled(name: str, infos: dict[str, TensorInfo]) -> PackedLayer | None:
    scale = next((name + s for s in ("_scale", "_scale_inv") if name + s in infos), None)
    if infos[name].dtype not in SCALED_DTYPES or scale is None:
        return None
    parts = {"weight": name, "scale": scale}
    if name + "_zero_point" in infos:
        parts["zero_point"] = name + "_zero_point"
    dtype = infos[name].dtype
    label = "INT8" if dtype == "int8" else "FP8"
    return PackedLayer(name, "scaled", tuple(infos[name].shape), label, 8, parts)


def _bnb(name: str, infos: dict[str, TensorInfo], read) -> PackedLayer | None:
    """A bitsandbytes layer: 4-bit (``weight`` uint8 + ``weight.absmax``, ``weight.quant_map`` and its JSON
    ``weight.quant_state.bitsandbytes__nf4``) or LLM.int8 (``weight`` int8 + ``SCB`` beside it)."""
    state = next((f"{name}.{B.STATE}{t}" for t in ("nf4", "fp4") if f"{name}.{B.STATE}{t}" in infos), None)
    if state is not None and f"{name}.absmax" in infos and f"{name}.quant_map" in infos:
        parts = {r: f"{name}.{r}" for r in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
        parts = {"weight": name, "state": state, **{r: p for r, p in parts.items() if p in infos}}
        shape = tuple(B.parse_state(read(state), state)["shape"])
        return PackedLayer(name, "bnb4", shape, state.rpartition("__")[2].upper(), 4, parts)
    scb = name.removesuffix("weight") + "SCB"
    if name.endswith(".weight") and infos[name].dtype == "int8" and scb in infos:
        parts = {"weight": name, "scb": scb}
        fmt = name + "_format"  # a format flag transformers saves beside it (not a weight)
        parts.update({"format": fmt} if fmt in infos else {})
        return PackedLayer(name, "bnb8", tuple(infos[name].shape), "LLM-INT8", 8, parts)
    return None


def _weights_config(config: dict) -> dict:
    """compressed-tensors' weight settings (the first config group's ``weights``), {} when absent."""
    groups = config.get("config_groups")
    first = next(iter(groups.values()), None) if isinstance(groups, dict) and groups else None
    weights = first.get("weights") if isinstance(first, dict) else None
    return weights if isinstance(weights, dict) else {}


def block_sizes(config: dict) -> tuple[int, ...] | None:
    """The block sizes a config names for scaled weights (DeepSeek's ``weight_block_size``,
    compressed-tensors' ``block_structure``), None when it names none."""
    blocks = config.get("weight_block_size") or _weights_config(config).get("block_structure")
    if isinstance(blocks, list) and all(isinstance(b, int) and b > 0 for b in blocks):
        return tuple(blocks)
    return None


class DequantizedCheckpoint(Checkpoint):
    """``inner`` with its packed or scaled layers (``layers``) read as float32 weights: see the module."""

    def __init__(self, inner: Checkpoint, layers: list[PackedLayer], config: dict):
        super().__init__(inner.path, inner.name)
        self.inner, self.format, self.kind, self.name_prefix = inner, inner.format, inner.kind, inner.name_prefix
        self.layers = {layer.name: layer for layer in layers}
        self._blocks = block_sizes(config)
        first = {layer.parts.get("qweight") or layer.parts.get("packed") or layer.parts["weight"]: layer
                 for layer in layers}
        self._hidden = {p for layer in layers for p in layer.parts.values()} - set(first)
        self._first = first

    def __getattr__(self, attr: str):  # a reader's own attributes (a GGUF's architecture, a folder's weight_file)
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def _infos(self) -> list[TensorInfo]:
        out = []
        for t in self.inner.tensors():
            layer = self._first.get(t.name)
            if layer is not None:
                out.append(TensorInfo(layer.name, layer.shape, "float32"))
            elif t.name not in self._hidden:
                out.append(t)
        return out

    def _read(self, name: str) -> torch.Tensor:
        layer = self.layers.get(name)
        if layer is None:
            return self.inner.read(name)
        try:
            return self._dequantize(layer)
        except (ValueError, RuntimeError, IndexError) as e:  # stored tensors that do not fit together
            raise CheckpointError(self.path, f"cannot dequantize {name!r} ({layer.label}): {error_line(e)}") from e

    def _part(self, layer: PackedLayer, role: str) -> torch.Tensor | None:
        return self.inner.read(layer.parts[role]) if role in layer.parts else None

    def _dequantize(self, layer: PackedLayer) -> torch.Tensor:
        get = lambda role: self._part(layer, role)  # noqa: E731
        if layer.scheme == "gptq":
            return P.gptq_weight(get("qweight"), get("qzeros"), get("scales"), get("g_idx"), layer.bits,
                                 layer.offset)
        if layer.scheme == "pack-quantized":
            return P.pack_quantized_weight(get("packed"), get("scale"), layer.shape, get("zero_point"),
                                           layer.bits, get("g_idx"))
        if layer.scheme == "bnb4":
            state = B.parse_state(get("state"), layer.parts["state"])
            scale = B.absmax(get("absmax"), state, get("nested_absmax"), get("nested_quant_map"))
            return B.dequantize_4bit(get("weight"), scale, get("quant_map"), state)
        if layer.scheme == "bnb8":
            return B.dequantize_int8(get("weight"), get("scb"))
        return scaled_weight(get("weight"), get("scale"), get("zero_point"), self._blocks)

    def _bnb_match(self, layer: PackedLayer, x: torch.Tensor, get) -> float:
        """Share of a bitsandbytes layer's stored codes that quantizing ``x`` gives (its scales from ``x``)."""
        if layer.scheme == "bnb8":
            return float((B.requantize_int8(x) == get("weight")).float().mean())
        state = B.parse_state(get("state"), layer.parts["state"])
        again = B.requantize_4bit(x, get("quant_map"), state["blocksize"])  # (n,)
        return float((again == B.nibbles(get("weight"), again.numel())).float().mean())

    def quantization(self, name: str) -> str | None:
        self.info(name)
        layer = self.layers.get(name)
        return layer.label if layer is not None else self.inner.quantization(name)

    def requantized_match(self, name: str, x: torch.Tensor) -> float | None:
        """How far ``x`` rounds to the layer's stored values. Float8 / int8 values with scales: the share of
        them (on up to :data:`SAMPLE_ROWS` evenly spaced rows) that quantizing ``x`` again gives, 1.0 for the
        model they were made from. Packed integers: the share of codes that are a nearest rounding of ``x``
        on the stored grid (:func:`~.packed_ints.on_grid`), over the whole layer or, when higher, over its
        best input column. A round-to-nearest copy has every code so; GPTQ moves codes to make up for the
        error of the columns it quantized before, so only its first column (the one it started from) is
        plain rounding of its source, while a fine-tune of that source has no such column once the layer
        has a few thousand rows. Time O(P) for a packed layer of P weights, O(rows x cols) for a sample."""
        layer = self.layers.get(name)
        if layer is None:
            return self.inner.requantized_match(name, x)
        if tuple(x.shape) != layer.shape:
            return None
        get = lambda role: self._part(layer, role)  # noqa: E731
        if layer.scheme in ("bnb4", "bnb8"):
            return self._bnb_match(layer, x, get)
        if layer.scheme == "scaled":
            rows = torch.linspace(0, layer.shape[0] - 1, min(SAMPLE_ROWS, layer.shape[0])).round().long().unique()
            return requantized_share(get("weight")[rows], x[rows], get("scale"), get("zero_point"),
                                     self._blocks, layer.shape, rows)
        # AutoGPTQ / GPTQModel round with a float32 scale and store it in float16: a value near a tie may
        # have gone either way; compressed-tensors rounds with the scale it stores, in the weight's dtype
        scale_dtype = self.inner.info(layer.parts["scales" if layer.scheme == "gptq" else "scale"]).dtype
        tol = 2.0**-11 if scale_dtype == "float16" else 0.0
        best = 0.0
        for work in working_dtypes(x):
            codes, (scaled, zero), columns = self._grid(layer, x, get, work)
            ok = P.on_grid(scaled, zero, codes, layer.bits, tol).float()
            best = max(best, float(ok.mean()), float(ok.mean(dim=1 - columns).max()))
        return best

    @staticmethod
    def _grid(layer: PackedLayer, x: torch.Tensor, get, work: torch.dtype) -> tuple[torch.Tensor, tuple, int]:
        """(stored codes, (``x / scale`` computed in ``work``, zero) in the same orientation, the dimension
        of input columns) of a GPTQ layer ((in, out): 0) or a pack-quantized one ((rows, cols): 1)."""
        if layer.scheme == "gptq":
            codes = P.unpack(get("qweight"), layer.bits, 0)  # (in, out)
            zeros = P.unpack(get("qzeros"), layer.bits, 1)[:, : layer.shape[0]]  # (groups, out)
            return codes, P.gptq_quotient(x, get("scales"), zeros, get("g_idx"), layer.offset, work), 0
        zero = get("zero_point")
        zero = None if zero is None else P.unpack(zero, layer.bits, 0)[: layer.shape[0]]  # (rows, groups)
        codes = P.unpack(get("packed"), layer.bits, 1)[:, : layer.shape[1]]  # (rows, cols)
        scale = get("scale").reshape(layer.shape[0], -1)  # (rows, groups)
        return codes, P.pack_quantized_quotient(x, scale, zero, layer.bits, get("g_idx"), work), 1

    def stored_tensors(self) -> list[TensorInfo]:
        return self.inner.stored_tensors()

    def files(self) -> list[Path]:
        return self.inner.files()

    def prefetch(self, name: str) -> None:
        layer = self.layers.get(name)
        for part in layer.parts.values() if layer is not None else [name]:
            self.inner.prefetch(part)

    def close(self) -> None:
        self.inner.close()


def dequantized(ck: Checkpoint) -> Checkpoint:
    """``ck`` reading its packed or scaled layers as float weights (:class:`DequantizedCheckpoint`), or ``ck``
    itself when it has none (header only; a LoRA adapter, a GGUF file: as they are)."""
    if ck.kind != "full" or ck.format == "gguf" or not any(n.endswith(_MARKS) for n in ck.tensor_names()):
        return ck
    infos = {t.name: t for t in ck.tensors()}
    config = quantization_config(ck.path)
    layers = find_packed(infos, config, ck.read)
    return DequantizedCheckpoint(ck, layers, config) if layers else ck
