"""Which layers of a checkpoint a quantization library stored packed or scaled, found and checked from the
tensor headers and the model's ``quantization_config`` (read by :mod:`.dequantized`).

A layer is recognised by its stored parts (GPTQ: ``qweight`` with ``g_idx``; AWQ: ``qweight`` with ``qzeros``
and ``scales`` under a ``quant_method: awq`` config; compressed-tensors
``pack-quantized``: ``weight_packed``, ``weight_scale``, ``weight_shape``; float8 / int8 ``weight`` with
``weight_scale`` or ``weight_scale_inv``; bitsandbytes: a 4-bit ``weight`` with its ``absmax``, ``quant_map``
and JSON quant state, an int8 ``weight`` with ``SCB``; MLX: a uint32 ``weight`` with ``scales`` and ``biases``
(mode ``affine``) or uint8 ``scales`` alone (modes ``mxfp4``, read by :mod:`.fp4`, and ``mxfp8``); FP4: a uint8
``weight_packed`` without ``weight_shape``, gpt-oss's ``_blocks`` with ``_scales``: :mod:`.fp4`). Once recognised, parts that do not fit together (a missing
``qzeros``, a ``weight_shape`` of another row count, scales of the wrong shape, bits the config contradicts)
raise a ValueError naming the tensor, so that no layer is read into a wrong weight, nor advertised at a size
it does not have. AWQ layouts other than GEMM (GEMV, llm-awq) raise, naming the version. Layouts not read here
stay as stored: a ``qweight`` without ``g_idx`` under no AWQ config, GPTQ and ``pack-quantized``
widths that span words (3 bits; MLX's are read), ``pack-quantized`` stacked (3-D) experts (MLX's are read).
MLX's ``nvfp4`` mode is refused, naming the mode. No I/O but ``read`` of small tensors:
the two-value ``weight_shape``, bitsandbytes' JSON quant state and ``weight_format`` flag, and of the model's
``config.json`` (:func:`quantization_config`, moved from :mod:`.dequantized` in session 32). Time O(tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from modelatlas.config_types import fits
from modelatlas.errors import CheckpointError
from modelatlas.weights import awq as A
from modelatlas.weights import bnb as B
from modelatlas.weights import fp4 as F
from modelatlas.weights import mlx_affine as M
from modelatlas.weights import packed_ints as P
from modelatlas.weights.base import TensorInfo, error_line, named_by_folder
from modelatlas.weights.scaled import SCALED_DTYPES, check_scale

_INTS = ("int32", "int64", "int16", "int8", "uint8", "uint32")
GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint formats read; marlin, bitblas, ipex... repack the words
CONFIG_FILES = ("config.json", "quantize_config.json", "quantization_config.json")  # the first that has settings


@dataclass(frozen=True)
class PackedLayer:
    """One dequantized layer: the weight it reads as, how it is stored, and the stored tensors by role."""

    name: str
    scheme: str  # "gptq" | "awq" | "pack-quantized" | "scaled" | "bnb4" | "bnb8" | "mlx" | "fp4"
    shape: tuple[int, ...]
    label: str  # the quantization type shown: "GPTQ-INT4", "AWQ-INT4", "INT4", "FP8", "INT8", "NF4", "LLM-INT8"
    bits: int
    parts: dict[str, str] = field(default_factory=dict)  # role -> stored tensor name
    offset: int = 0  # added to GPTQ's stored zeros: 1 in the ``gptq`` checkpoint format, 0 in ``gptq_v2``
    group_size: int = 0  # pack-quantized, AWQ, MLX: input columns per scale (0: no group)
    state: dict = field(default_factory=dict)  # bnb4: its JSON quant state, parsed once when the model is opened;
    # fp4: {"experts": True} for gpt-oss's (experts, out, in) codes read transposed


def find_packed(infos: dict[str, TensorInfo], config: dict, read) -> list[PackedLayer]:
    """The layers of ``infos`` (name -> info) stored packed or scaled, as :class:`PackedLayer`; ``read(name)``
    reads a small tensor (a ``weight_shape``, a bitsandbytes JSON state or format flag). Raises ValueError naming the tensor when a recognised layer's
    parts do not fit together. Time O(tensors)."""
    if str(config.get("quant_method", "")).lower() == "awq":
        A.awq_version(config)  # GEMV, llm-awq: refused before any layer is misread
        return [layer for name in infos if (layer := _awq(name, infos, config)) is not None]
    out = []
    for name, t in infos.items():
        if not t.dtype.startswith(_INTS + ("float8",)) and f"{name}.quant_map" not in infos:  # (bitsandbytes'
            continue  # 4-bit codes may be stored as bfloat16: bnb_4bit_quant_storage)
        layer = (_gptq(name, infos, config) or _pack_quantized(name, infos, config, read)
                 or _scaled(name, infos, config) or _bnb(name, infos, read) or _mlx(name, infos, config)
                 or F.find_fp4(name, infos))
        if layer is not None:
            out.append(layer)
    return out


def _gptq(name: str, infos: dict[str, TensorInfo], config: dict) -> PackedLayer | None:
    base = name.removesuffix(".qweight")
    if base == name or f"{base}.g_idx" not in infos:  # without g_idx: AWQ's layout, left as stored
        return None
    parts = {r: f"{base}.{r}" for r in ("qweight", "qzeros", "scales", "g_idx")}
    missing = [p for p in parts.values() if p not in infos]
    if missing:
        raise ValueError(f"{name} and {parts['g_idx']} make a GPTQ layer, but {missing[0]} is missing")
    bits = P.gptq_layout(*(infos[parts[r]] for r in ("qweight", "qzeros", "scales", "g_idx")))
    if bits is None:  # 3 bits: values span words
        return None
    given = config.get("bits")
    if isinstance(given, int) and given != bits and not config.get("dynamic"):  # GPTQModel's per-layer bits
        raise ValueError(f"{name}: its shape holds {bits}-bit values for the {infos[parts['g_idx']].shape[0]} "
                         f"inputs of {parts['g_idx']}, but the quantization_config says bits {given}")
    shape = (infos[name].shape[1], infos[parts["g_idx"]].shape[0])  # (out, in)
    return PackedLayer(f"{base}.weight", "gptq", shape, f"GPTQ-INT{bits}", bits, parts, _zero_offset(config))


def _awq(name: str, infos: dict[str, TensorInfo], config: dict) -> PackedLayer | None:
    """An AWQ GEMM layer (``qweight``, ``qzeros``, ``scales``; a ``g_idx`` beside it would make it GPTQ's),
    its parts checked (:func:`~.awq.awq_layout`); None for other tensors."""
    base = name.removesuffix(".qweight")
    if base == name or f"{base}.g_idx" in infos:
        return None
    parts = {r: f"{base}.{r}" for r in ("qweight", "qzeros", "scales")}
    missing = [p for p in parts.values() if p not in infos]
    if missing:
        raise ValueError(f"{name} is an AWQ layer's words, but {missing[0]} is missing")
    group = A.awq_layout(*(infos[parts[r]] for r in ("qweight", "qzeros", "scales")), config.get("group_size"))
    n_in, words = infos[name].shape
    return PackedLayer(f"{base}.weight", "awq", (words * 32 // A.BITS, n_in), f"AWQ-INT{A.BITS}", A.BITS, parts,
                       group_size=group)


def _zero_offset(config: dict) -> int:
    """What GPTQ's stored zeros need added: 1 in the ``gptq`` checkpoint format (the default), 0 in
    ``gptq_v2``; a format whose words are laid out otherwise (Marlin's tiles) raises."""
    fmt = config.get("checkpoint_format", "gptq")
    if config.get("is_marlin_format") or not isinstance(fmt, str) or fmt.lower() not in GPTQ_FORMATS:
        shown = "marlin (is_marlin_format)" if config.get("is_marlin_format") else repr(fmt)
        raise ValueError(f"quantization_config: checkpoint_format {shown} is not read here (its words are laid "
                         f"out for a kernel); {' and '.join(GPTQ_FORMATS)} are")
    return 0 if fmt.lower() == "gptq_v2" else 1


def _pack_quantized(name: str, infos: dict[str, TensorInfo], config: dict, read) -> PackedLayer | None:
    base = name.removesuffix("_packed")
    parts = {r: f"{base}_{r}" for r in ("packed", "scale", "shape", "zero_point", "g_idx")}
    if base == name or not all(parts[r] in infos for r in ("scale", "shape")):  # NVFP4, MXFP4: no weight_shape
        return None
    packed, shape_info = infos[name], infos[parts["shape"]]
    if len(packed.shape) != 2 or packed.dtype != "int32" or shape_info.numel == 3:  # (3-D: stacked experts)
        return None
    if not shape_info.dtype.startswith("int") or shape_info.numel != 2:
        raise ValueError(f"{parts['shape']}: {shape_info.dtype} {shape_info.shape}, not the 2 integer sizes of "
                         f"{name}'s matrix")
    shape = P.packed_shape(read(parts["shape"]), parts["shape"], packed)
    bits = P.packed_bits(shape[1], packed, _named_bits(config))
    if bits is None:  # a width whose values span words (3, 5, 6, 7 bits)
        return None
    parts = {r: p for r, p in parts.items() if p in infos}
    group = P.pack_quantized_layout(shape, bits, {r: infos[p] for r, p in parts.items()},
                                    _weights_config(config).get("group_size"))
    return PackedLayer(base, "pack-quantized", shape, f"INT{bits}", bits, parts, group_size=group)


def _scaled(name: str, infos: dict[str, TensorInfo], config: dict) -> PackedLayer | None:
    scale = next((name + s for s in ("_scale", "_scale_inv") if name + s in infos), None)
    if infos[name].dtype not in SCALED_DTYPES or scale is None:
        return None
    parts = {"weight": name, "scale": scale}
    if name + "_zero_point" in infos:
        parts["zero_point"] = name + "_zero_point"
    if not infos[scale].dtype.startswith(("float", "bfloat", "uint8")):  # uint8: MX exponents (E8M0)
        raise ValueError(f"{scale} is {infos[scale].dtype}, not scales")
    for p in parts.values():
        if p != name:
            check_scale(infos[p], infos[name], block_sizes(config))
    if "zero_point" in parts and infos[parts["zero_point"]].shape != infos[scale].shape:
        raise ValueError(f"{parts['zero_point']} has shape {infos[parts['zero_point']].shape}, its scales "
                         f"{scale} {infos[scale].shape}: one zero point per scale")
    label = "INT8" if infos[name].dtype == "int8" else "FP8"
    return PackedLayer(name, "scaled", tuple(infos[name].shape), label, 8, parts)


def _bnb(name: str, infos: dict[str, TensorInfo], read) -> PackedLayer | None:
    """A bitsandbytes layer: 4-bit (``weight`` uint8 + ``weight.absmax``, ``weight.quant_map`` and its JSON
    ``weight.quant_state.bitsandbytes__nf4``) or LLM.int8 (``weight`` int8 + ``SCB`` beside it), its parts
    checked (:func:`~.bnb.check_4bit`, :func:`~.bnb.check_int8`: reads the JSON state, the format flag)."""
    state = next((f"{name}.{B.STATE}{t}" for t in ("nf4", "fp4") if f"{name}.{B.STATE}{t}" in infos), None)
    if state is not None:
        parts = {r: f"{name}.{r}" for r in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
        missing = [parts[r] for r in ("absmax", "quant_map") if parts[r] not in infos]
        if missing:
            raise ValueError(f"{name} and {state} make a bitsandbytes 4-bit layer, but {missing[0]} is missing")
        parts = {"weight": name, "state": state, **{r: p for r, p in parts.items() if p in infos}}
        B.check_state(infos[state])
        parsed = B.parse_state(read(state), state)
        B.check_4bit({r: infos[p] for r, p in parts.items()}, parsed, state)
        return PackedLayer(name, "bnb4", tuple(parsed["shape"]), state.rpartition("__")[2].upper(), 4, parts,
                           state=parsed)
    scb = name.removesuffix("weight") + "SCB"
    if name.endswith(".weight") and infos[name].dtype == "int8" and scb in infos:
        parts = {"weight": name, "scb": scb}
        fmt = name + "_format"  # a format flag transformers saves beside it (not a weight): 0, row-major
        parts.update({"format": fmt} if fmt in infos else {})
        B.check_int8(infos[name], infos[scb], _flag(infos.get(fmt), read))
        return PackedLayer(name, "bnb8", tuple(infos[name].shape), "LLM-INT8", 8, parts)
    return None


def _flag(info: TensorInfo | None, read) -> int | None:
    """The integer value of a one-value flag tensor (bitsandbytes' ``weight_format``), None when absent; a
    ValueError naming it when it is no single integer."""
    if info is None:
        return None
    if info.numel != 1 or not info.dtype.startswith(_INTS):
        raise ValueError(f"{info.name} is {info.dtype} {tuple(info.shape)}, not a one-value format flag")
    return int(read(info.name).reshape(-1)[0])


def _mlx(name: str, infos: dict[str, TensorInfo], config: dict) -> PackedLayer | None:
    """An MLX-quantized layer: ``weight`` uint32 words with ``scales`` beside it (and ``biases`` in mode
    ``affine``), its mode, bits and group size from the config's ``quantization``, or from an entry of its own
    for a layer quantized otherwise (whose mode is its own, ``affine`` unless named: mlx-lm passes the entry to
    ``to_quantized``). ``mxfp4``, ``mxfp8``: :func:`_mlx_fp`. Raises when the config names none, its entry says
    the layer is not quantized, or the shapes do not fit (:func:`~.mlx_affine.layout`). Header only."""
    base = name.removesuffix(".weight")
    parts = {"weight": name, "scales": f"{base}.scales", "biases": f"{base}.biases"}
    if base == name or infos[name].dtype != "uint32" or parts["scales"] not in infos:
        return None
    own, biased = config.get(base), parts["biases"] in infos
    if not biased and own is None and "mode" not in config:  # no MLX layer by its parts nor by the config
        return None
    stored = f"{name}: uint32 codes with {parts['scales']}{' and ' + parts['biases'] if biased else ''} (MLX), but"
    where = f"its entry {base!r} in the config.json's quantization" if own is not None else "the config.json beside it"
    if own is not None and own is not True and not isinstance(own, dict):  # False: a layer mlx-lm left as it was
        raise ValueError(f"{stored} {where} is {json.dumps(own)}: no settings of a quantized layer")
    settings = own if isinstance(own, dict) else config
    if settings.get("mode", "affine") != "affine":
        return _mlx_fp(name, infos, parts, settings, f"{stored} {where}")
    if not biased:
        raise ValueError(f"{stored} {where} names mode affine, whose {parts['biases']} is missing")
    bits, group = settings.get("bits"), settings.get("group_size")
    if not fits(bits, int) or bits not in M.BITS or not fits(group, int) or group < 1:
        what = "bits" if own is not None else "'quantization' bits"
        raise ValueError(f"{stored} {where} names no {what} (2-8) and group_size for them (bits {bits!r}, "
                         f"group_size {group!r})")
    shape = M.layout(infos[name], infos[parts["scales"]], infos[parts["biases"]], bits, group)
    return PackedLayer(name, "mlx", shape, f"MLX-{bits}BIT", bits, parts, group_size=group)


def _mlx_fp(name: str, infos: dict[str, TensorInfo], parts: dict[str, str], settings: dict,
            said: str) -> PackedLayer:
    """An MLX layer of a floating-point mode, with uint8 E8M0 ``scales`` per 32 values: ``mxfp4`` (4-bit E2M1
    codes, eight a uint32 word from its low bits: read by :mod:`.fp4`) or ``mxfp8`` (float8 E4M3 values, four a
    word from its low byte: read as :mod:`.scaled` float8 with MX scales); ``nvfp4`` and unknown modes raise,
    naming it (``said``: the tensor and the config that says the mode). Header only."""
    mode, bits, group = settings.get("mode"), settings.get("bits"), settings.get("group_size")
    width = {"mxfp4": 4, "mxfp8": 8}.get(mode)
    if width is None:
        raise ValueError(f"{said} names mode {json.dumps(mode)}, which is not read here (affine, mxfp4 and mxfp8 "
                         "are)")
    if parts["biases"] in infos:
        raise ValueError(f"{said} names mode {mode}, which stores no biases")
    if bits not in (None, width) or group not in (None, 32):  # (None: mlx's defaults for the mode)
        raise ValueError(f"{said} names {mode} with bits {bits!r} and group_size {group!r}: the mode is {width} "
                         "bits in groups of 32")
    w, s = infos[name], infos[parts["scales"]]
    if s.dtype != "uint8":
        raise ValueError(f"{s.name} is {s.dtype}, not {mode.upper()}'s uint8 exponents")
    ws, ss = tuple(w.shape), tuple(s.shape)
    if len(ws) < 2 or len(ss) != len(ws) or ss[:-1] != ws[:-1] or ss[-1] * width != ws[-1]:  # a group of 32:
        # width words of 32 / width values
        raise ValueError(f"{name} {ws} does not hold {width}-bit values for {s.name} {ss} in groups of 32")
    shape, state = (*ws[:-1], ws[-1] * 32 // width), {"experts": False, "words": True}
    if mode == "mxfp8":
        return PackedLayer(name, "scaled", shape, "MXFP8", 8, {"weight": name, "scale": s.name}, group_size=32,
                           state=state)
    return PackedLayer(name, "fp4", shape, "MXFP4", 4, {"packed": name, "scale": s.name}, group_size=32, state=state)


def _weights_config(config: dict) -> dict:
    """compressed-tensors' weight settings (the first config group's ``weights``), {} when absent."""
    groups = config.get("config_groups")
    first = next(iter(groups.values()), None) if isinstance(groups, dict) and groups else None
    weights = first.get("weights") if isinstance(first, dict) else None
    return weights if isinstance(weights, dict) else {}


def _named_bits(config: dict) -> set[int]:
    """The bit widths compressed-tensors' config groups name for weights (``num_bits``), an empty set for none."""
    groups = config.get("config_groups")
    found = set()
    for group in groups.values() if isinstance(groups, dict) else ():
        bits = group.get("weights", {}).get("num_bits") if isinstance(group, dict) else None
        if fits(bits, int):
            found.add(bits)
    return found


def block_sizes(config: dict) -> tuple[int, ...] | None:
    """The block sizes a config names for scaled weights (DeepSeek's ``weight_block_size``,
    compressed-tensors' ``block_structure``), None when it names none."""
    blocks = config.get("weight_block_size") or _weights_config(config).get("block_structure")
    if isinstance(blocks, list) and all(isinstance(b, int) and b > 0 for b in blocks):
        return tuple(blocks)
    return None


def quantization_config(path: Path) -> dict:
    """The ``quantization_config`` of the model at ``path`` (its folder's ``config.json``, or AutoGPTQ's
    ``quantize_config.json``), {} when it has none. A file is read with its folder's config only when it is
    the folder's model file (``model.safetensors``). A config that is no JSON object raises, naming it."""
    folder = path if path.is_dir() else path.parent if named_by_folder(path) else None
    if folder is None:
        return {}
    return config_of(lambda name: (folder / name).read_bytes() if (folder / name).is_file() else None,
                     lambda name: folder / name)


def config_of(read, where) -> dict:
    """The quantization settings in the first file of :data:`CONFIG_FILES` in a model's folder that names any, {}
    when none does: its ``quantization_config``, MLX's ``quantization``, or the whole file for a file of them
    alone. ``read(name)`` gives a file's bytes (None when there is no such file), ``where(name)`` its path or URL
    for errors: the folder on the disk (:func:`quantization_config`) or on a server (:mod:`.remote`). Time O(file
    sizes)."""
    for name in CONFIG_FILES:
        try:
            raw = read(name)
            data = None if raw is None else json.loads(raw.decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(where(name), f"cannot read the quantization settings: {error_line(e)}") from e
        if raw is None:
            continue
        if not isinstance(data, dict):
            raise CheckpointError(where(name), "not a JSON object")
        got = data.get("quantization_config", data.get("quantization", data if name != "config.json" else None))
        if got is not None and not isinstance(got, dict):
            raise CheckpointError(where(name), f"quantization_config is a JSON {type(got).__name__}, not an object")
        if got is not None:
            return got
    return {}
