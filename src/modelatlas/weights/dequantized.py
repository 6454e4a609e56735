"""Checkpoints whose weights a quantization library stored packed or scaled, read as float weights.

:func:`dequantized` wraps a checkpoint holding such layers so that each reads as one float32 ``<layer>.weight``
of its real shape, in place of the tensors that store it:

- GPTQ (AutoGPTQ, GPTQModel): ``qweight``, ``qzeros``, ``scales``, ``g_idx``, 2, 4 or 8 bits
  (:mod:`.packed_ints`); the ``gptq`` checkpoint format's zeros are stored minus one, ``gptq_v2``'s not (the
  ``checkpoint_format`` of the model's ``quantization_config``; ``gptq`` when none is given).
- AWQ (AutoAWQ's GEMM format, ``quant_method: awq``): ``qweight``, ``qzeros``, ``scales``, 4 bits, packed along
  the outputs in AWQ's interleaved order (:mod:`.awq`); GEMV and llm-awq layouts are refused, naming them.
- compressed-tensors ``pack-quantized`` (llm-compressor W4A16, W8A16): ``weight_packed``, ``weight_scale``,
  ``weight_shape``, optionally ``weight_zero_point`` and ``weight_g_idx``.
- float8 / int8 values with scales (compressed-tensors ``float-quantized`` / ``int-quantized``; DeepSeek's
  ``weight_scale_inv``): ``weight`` and its scale (:mod:`.scaled`).
- bitsandbytes as transformers saves it: 4-bit NF4 / FP4 and LLM.int8 (:mod:`.bnb`).
- MLX (mlx-lm): affine uint32 ``weight`` codes with ``scales`` and ``biases`` (:mod:`.mlx_affine`); ``mxfp8``: float8.
- FP4: compressed-tensors NVFP4 / MXFP4, gpt-oss's MXFP4 experts and MLX's ``mxfp4`` mode (:mod:`.fp4`).

The other tensors read as stored; EXL2 layers and a ``qweight`` without ``g_idx`` under no AWQ config stay as stored.
AWQ rescales each layer's input channels before rounding, so its weights are no rounding of the source's own:
:mod:`modelatlas.lineage.smoothed` undoes the scaling, with :meth:`~Checkpoint.grid_match`. Each layer's
:meth:`~Checkpoint.quantization` names its type ("GPTQ-INT4", "AWQ-INT4", "INT4", "FP8", "INT8", "NF4", "FP4",
"LLM-INT8", "MLX-4BIT", "NVFP4", "MXFP4", "MXFP8"), and :meth:`~Checkpoint.requantized_match` rounds a float weight
onto its stored grid, to tell a model's source (every value) from a fine-tune of it;
:meth:`~Checkpoint.rounding_variance` gives the variance of each value's rounding error. Reads headers,
``weight_shape`` tensors and bitsandbytes' quant states; time O(P) per dequantized layer of P weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights import awq as A
from modelatlas.weights import bnb as B
from modelatlas.weights import fp4 as F
from modelatlas.weights import grid_position as G
from modelatlas.weights import mlx_affine as M
from modelatlas.weights import packed_ints as P
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line, spaced_rows
from modelatlas.weights.kept import Kept
from modelatlas.weights.packed_layers import PackedLayer, block_sizes, find_packed, quantization_config
from modelatlas.weights.scaled import (
    requantized_share,
    scale_values,
    scaled_quotient,
    scaled_variance,
    scaled_weight,
    working_dtypes,
)

SAMPLE_ROWS = 256  # output rows (channels) compared by requantized_match: a copy matches on every one
_MARKS = (".qweight", "_packed", "weight_scale", "weight_scale_inv", ".absmax", "__nf4", "__fp4", ".SCB", ".biases", "_blocks", ".scales")  # endings of a dequantized layer's parts
_REQUANTIZED = ("bnb4", "bnb8", "mlx", "fp4")  # tested by quantizing the source again (fp4: with the stored scales)
_WORDS_IN = ("gptq", "awq")  # integer words stored (in, out)-wise, with (groups, out) ``scales``
_GRIDS = ("gptq", "awq", "pack-quantized")  # integer codes on a grid of stored scales and zeros
_UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff of a half-precision sum


class DequantizedCheckpoint(Checkpoint):
    """``inner`` with its packed or scaled layers (``layers``) read as float32 weights: see the module."""

    def __init__(self, inner: Checkpoint, layers: list[PackedLayer], config: dict):
        super().__init__(inner.path, inner.name)
        self.inner, self.format, self.kind, self.name_prefix = inner, inner.format, inner.kind, inner.name_prefix
        self.layers, self._blocks = {layer.name: layer for layer in layers}, block_sizes(config)
        first = {layer.parts.get("qweight") or layer.parts.get("packed") or layer.parts["weight"]: layer
                 for layer in layers}
        self._hidden = {p for layer in layers for p in layer.parts.values()} - set(first)
        self._layer_of = {p: layer.name for layer in layers for p in layer.parts.values()}
        self._first, self._kept = first, Kept()  # the last read layer's stored tensors, for its next call

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
        self._kept.drop()  # one layer's stored tensors at most: the last read's, dropped by this one
        if layer is None:
            return self.inner.read(name)
        x, parts = self._checked(layer, lambda parts: (self._dequantize(layer, parts), parts))
        self._kept.keep(name, parts)  # its rounding variance may follow (lineage's pass read them again for it)
        return x

    def _checked(self, layer: PackedLayer, work):
        """``work(parts)`` on the layer's stored tensors (those :meth:`read` kept for it, taken, else
        :meth:`_parts`); a CheckpointError naming the layer and the tensor when they do not fit together."""
        try:
            parts = self._kept.take(layer.name)
            return work(self._parts(layer) if parts is None else parts)
        except (ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(self.path, f"cannot dequantize {layer.name!r} ({layer.label}): {error_line(e)}") from e

    def _parts(self, layer: PackedLayer) -> dict[str, torch.Tensor]:
        """The layer's stored tensors by role (scales as float32), with what their headers cannot tell checked:
        finite scales, group numbers (``g_idx``) of existing groups. Time O(stored size)."""
        # bitsandbytes' JSON state is not read again: parsed when the model was opened (layer.state), it gave
        # the layer's shape and the checks of its parts, which a state read now could only contradict
        parts = {role: self.inner.read(p) for role, p in layer.parts.items() if role != "state"}
        if layer.scheme == "scaled" and layer.state.get("words"):  # MLX's mxfp8: float8 bytes in uint32 words
            parts["weight"] = parts["weight"].contiguous().view(torch.float8_e4m3fn)  # (.., cols / 4) -> (.., cols)
        if layer.scheme == "bnb4":
            parts["absmax"] = B.block_absmax(parts, layer.parts, layer.state)
        for key in {"bnb8": ("scb",), "mlx": ("scales", "biases")}.get(layer.scheme, ()):
            P.check_finite(parts[key].float(), layer.parts[key])
        if layer.scheme in _REQUANTIZED:
            return parts
        key = "scales" if layer.scheme in _WORDS_IN else "scale"
        parts[key] = scale_values(parts[key])
        P.check_finite(parts[key], layer.parts[key])
        if "g_idx" in parts:
            groups = parts[key].shape[0] if layer.scheme == "gptq" else P.row_scales(parts[key], layer.shape[0]).shape[1]
            P.check_groups(parts["g_idx"], groups, layer.parts["g_idx"])
        return parts

    def _dequantize(self, layer: PackedLayer, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        get = parts.get
        if layer.scheme == "gptq":
            return P.gptq_weight(get("qweight"), get("qzeros"), get("scales"), get("g_idx"), layer.bits,
                                 layer.offset)
        if layer.scheme == "awq":
            return A.awq_weight(get("qweight"), get("qzeros"), get("scales"), layer.group_size)
        if layer.scheme == "pack-quantized":
            return P.pack_quantized_weight(get("packed"), get("scale"), layer.shape, get("zero_point"),
                                           layer.bits, get("g_idx"), layer.group_size)
        if layer.scheme == "bnb4":
            return B.dequantize_4bit(get("weight"), get("absmax"), get("quant_map"), layer.state)
        if layer.scheme == "bnb8":
            return B.dequantize_int8(get("weight"), get("scb"))
        if layer.scheme == "fp4":
            return F.dequantize(parts, layer, layer.parts["scale"])
        if layer.scheme == "mlx":
            return M.dequantize(get("weight"), get("scales"), get("biases"), layer.bits, layer.group_size)
        return scaled_weight(get("weight"), get("scale"), get("zero_point"), self._blocks)

    @staticmethod
    def _requantized(layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor) -> float:
        """Share of a bitsandbytes or MLX layer's stored codes that quantizing ``x`` gives (its scales from
        ``x``, as the library computes them)."""
        if layer.scheme == "mlx":
            return M.requantized_share(x, parts["weight"], layer.bits, layer.group_size)
        if layer.scheme == "bnb8":
            return B.requantized_share_int8(x, parts["weight"])
        if layer.scheme == "fp4":
            return F.requantized_share(x, parts, layer, layer.parts["scale"], SAMPLE_ROWS)
        return B.requantized_share_4bit(x, parts["weight"], parts["quant_map"], layer.state["blocksize"])

    def grid_position(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        """Where ``x``'s values sit on the layer's levels (:mod:`.grid_position`): ~0.5 for the model it was
        quantized from, near 0 for one made from its dequantized values. On the first ~1M values (float8: in
        halves of the spacing of float8 values where each lies). GPTQ's codes are not all the nearest level,
        but its source's values still fall anywhere between levels. FP4: on the rows its copy test compares,
        ``x`` whole or those rows (:func:`~.fp4.grid_position`; ``rows``: :meth:`compared_rows`)."""
        layer = self.layers.get(name)
        if layer is not None and layer.scheme == "fp4" and F.fits(x, layer, SAMPLE_ROWS, rows):
            where = layer.parts["scale"]
            return self._checked(layer, lambda parts: F.grid_position(x, parts, layer, where, SAMPLE_ROWS))
        if layer is None or rows is not None or tuple(x.shape) != layer.shape or layer.scheme == "fp4":
            return None
        if layer.scheme in _GRIDS:
            return self._checked(layer, lambda parts: self._packed_position(layer, parts, x))
        if layer.scheme == "scaled":
            return self._checked(layer, lambda parts: self._scaled_position(layer, parts, x))
        return self._checked(layer, lambda parts: self._position(layer, parts, x))

    def _scaled_position(self, layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor) -> float:
        """:meth:`grid_position` of float8 / int8 values with scales, on the first rows (~1M values)."""
        rows = torch.arange(min(layer.shape[0], max(1, G.SAMPLE // max(layer.shape[-1], 1))))
        t = scaled_quotient(x[rows], parts["scale"], parts.get("zero_point"), self._blocks, layer.shape, rows)
        stored = parts["weight"].dtype
        return G.uniform_position(t) if not stored.is_floating_point else G.float8_position(t, stored)

    def _packed_position(self, layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor) -> float:
        """:meth:`grid_position` of a GPTQ or pack-quantized layer, on its first input columns (~1M values)."""
        seen, total = 0, 0.0
        for _, _, scaled, zero in self._grid(layer, parts, x, torch.float32):  # (chunk, out) each
            total += G.uniform_position(scaled + zero) * scaled.numel()
            seen += scaled.numel()
            if seen >= G.SAMPLE:
                break
        return total / max(seen, 1)

    @staticmethod
    def _position(layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor) -> float:
        rows = max(1, G.SAMPLE // max(layer.shape[-1], 1))
        xs = x[:rows].float()  # (r, cols) the first rows
        if layer.scheme == "bnb8":
            return G.uniform_position(xs * (127.0 / parts["scb"].float()[:rows, None]))
        if layer.scheme == "mlx":
            group = layer.group_size
            s = parts["scales"].float()[:rows].repeat_interleave(group, dim=-1)  # (r, cols)
            b = parts["biases"].float()[:rows].repeat_interleave(group, dim=-1)
            return G.uniform_position((xs - b) / s)
        state = layer.state
        flat = xs.reshape(-1)  # (r * cols,) the first values, in the blocks' order
        scale = parts["absmax"][: -(-flat.numel() // state["blocksize"])]  # decoded by _parts
        return G.book_position(flat / scale.repeat_interleave(state["blocksize"])[: flat.numel()], parts["quant_map"])

    def rounding_variance(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """Variance of the rounding error at each value of a dequantized layer, float32 of its shape; None for
        other tensors. Evenly spaced levels (GPTQ, ``pack-quantized``, int8 with scales, LLM.int8, MLX):
        ``step**2 / 12``, the step its group's or row's scale (an error even over one step; GPTQ's own is
        larger, see :func:`~.packed_ints.gptq_variance`). Uneven levels, NF4 / FP4 books and float8 values:
        the error's second moment over the stored level's cell (half way to the levels around it) under a
        density linear there, fitted to the layer's code counts (:func:`~.grid_position.level_variance`;
        ``gap**2 / 12`` where it is even), times the block's absmax or the scale squared; each block's
        absmax, which the quantizer puts on the end level, exact (:func:`~.bnb.rounding_variance_4bit`,
        :func:`~.scaled.scaled_variance`). A CheckpointError when the stored tensors do not fit together.
        Time O(P) for P weights, memory O(P) for the result plus a chunk's temporaries."""
        layer = self.layers.get(name)
        if layer is None:
            return self.inner.rounding_variance(name, values)
        return self._checked(layer, lambda parts: self._variance(layer, parts))  # from scales and codes: no values

    def _variance(self, layer: PackedLayer, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`rounding_variance` of the layer from its stored tensors (:meth:`_parts`). Time O(P)."""
        get = parts.get
        if layer.scheme == "gptq":
            return P.gptq_variance(get("scales"), get("g_idx"))
        if layer.scheme == "awq":
            return A.awq_variance(get("scales"), layer.shape[1], layer.group_size)
        if layer.scheme == "pack-quantized":
            return P.pack_quantized_variance(get("scale"), layer.shape, get("g_idx"), layer.group_size)
        if layer.scheme == "bnb4":
            return B.rounding_variance_4bit(get("weight"), get("absmax"), get("quant_map"), layer.state)
        if layer.scheme == "bnb8":
            return B.rounding_variance_int8(get("scb"), layer.shape)
        if layer.scheme == "mlx":
            return M.rounding_variance(get("scales"), layer.group_size)
        if layer.scheme == "fp4":
            return F.rounding_variance(parts, layer, layer.parts["scale"])
        return scaled_variance(get("weight"), get("scale"), self._blocks)

    def compared_rows(self, name: str, max_rows: int = SAMPLE_ROWS) -> torch.Tensor | None:
        """The rows an FP4 layer's tests compare (:func:`~.fp4.sampled_rows`: a source reads only those); None
        for other layers (their tests take the whole tensor). Header only."""
        layer = self.layers.get(name)
        return F.sampled_rows(layer, max_rows) if layer is not None and layer.scheme == "fp4" else None

    def quantization(self, name: str) -> str | None:
        """The layer's type ("GPTQ-INT4", "AWQ-INT4", "INT4", "FP8", "INT8", "NF4", "LLM-INT8", "MLX-4BIT", ...:
        :attr:`PackedLayer.label`) for a dequantized layer and for the stored tensor holding its values
        (``qweight``, ``weight_packed``, a bitsandbytes or MLX ``weight``: as :meth:`stored_tensors` lists it); None
        for its other stored tensors (scales, zeros, ``g_idx``) and for plain tensors."""
        layer = self.layers.get(name) or self._first.get(name)
        if layer is not None:
            return layer.label
        if name in self._hidden:
            return None
        self.info(name)
        return self.inner.quantization(name)

    def layer_of(self, stored: str) -> str | None:
        """The dequantized layer whose stored tensors include ``stored`` (``a.qweight``, ``a.scales``:
        ``a.weight``), None for a tensor read as stored."""
        return self._layer_of.get(stored)

    def requantized_match(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        """How far ``x`` rounds to the layer's stored values. Float8 / int8 values with scales: the share of
        them (on up to :data:`SAMPLE_ROWS` evenly spaced rows) that quantizing ``x`` again gives, 1.0 for the
        model they were made from. bitsandbytes and MLX layers: the share of all their codes that quantizing
        ``x`` gives with scales taken from ``x`` itself, as the library computes them (:meth:`_requantized`; the
        stored scales are rounded). FP4 (NVFP4, MXFP4): ``x`` rounded with the stored scales, on up to
        :data:`SAMPLE_ROWS` evenly spaced rows as read (:func:`~.fp4.requantized_share`; ``x`` whole or those
        rows, ``rows`` then :meth:`compared_rows`). Other packed integers (GPTQ, AWQ, ``pack-quantized``): the share of codes that
        are a nearest rounding of ``x`` on the stored grid (:func:`~.packed_ints.on_grid`), over the whole
        layer or, when higher, over its best input column. A round-to-nearest copy has every code so; GPTQ moves codes to make up for the
        error of the columns it quantized before, so only its first column (the one it started from) is
        plain rounding of its source, while a fine-tune of that source has no such column once the layer
        has a few thousand rows. A CheckpointError when the stored tensors do not fit together. Time O(P)
        for a packed layer of P weights, memory O(P / 8) beyond ``x`` and its stored tensors (512 input
        columns at a time); O(rows x cols) for a sample."""
        layer = self.layers.get(name)
        if layer is None:
            return self.inner.requantized_match(name, x, rows=rows)
        if not (F.fits(x, layer, SAMPLE_ROWS, rows) if layer.scheme == "fp4" else rows is None and tuple(x.shape) == layer.shape):
            return None
        if layer.scheme in _REQUANTIZED:
            return self._checked(layer, lambda parts: self._requantized(layer, parts, x))
        if layer.scheme in _GRIDS:
            return self._checked(layer, lambda parts: self._packed_match(layer, parts, x, 0.0, True))
        rows = spaced_rows(layer.shape[0], SAMPLE_ROWS)
        return self._checked(layer, lambda p: requantized_share(p["weight"][rows], x[rows], p["scale"],
                                                                p.get("zero_point"), self._blocks, layer.shape, rows))

    def grid_match(self, name: str, x: torch.Tensor, slack: float = 0.0,
                   rows: torch.Tensor | None = None) -> float | None:
        """Share of a GPTQ, AWQ or ``pack-quantized`` layer's codes that are a nearest rounding of ``x`` on its
        stored grid (:func:`~.packed_ints.on_grid`), over the whole layer (no best column: GPTQ's codes are
        not all a rounding), ``x`` allowed a relative error ``slack`` beyond the format's own (a source whose
        input channels were rescaled by factors read off rounded norms: :mod:`modelatlas.lineage.smoothed`).
        None for other tensors, for another shape (sampled ``rows`` too). Time O(P), memory O(P / 8) beyond ``x``."""
        layer = self.layers.get(name)
        if layer is None:
            return self.inner.grid_match(name, x, slack, rows=rows)
        if layer.scheme not in _GRIDS or tuple(x.shape) != layer.shape:
            return None
        return self._checked(layer, lambda parts: self._clipped_match(layer, parts, x, slack))

    def _clipped_match(self, layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor,
                       slack: float) -> float:
        """:meth:`grid_match` of a packed layer (:func:`~.packed_ints.clipped_share`), the best of
        :func:`~.scaled.working_dtypes`; the quotient plus zero rounded to the scales' dtype (compressed-tensors
        adds them in the weight's dtype, bfloat16: up to 1/32 of a step). Time O(P) per working dtype."""
        dtype = self._scale_dtype(layer)
        tol, tol_sum = (2.0**-11 if dtype == "float16" else 0.0) + slack, _UNIT.get(dtype, 0.0)
        return max(P.clipped_share(lambda work: self._grid(layer, parts, x, work), self._groups(layer, parts),
                                   layer.shape[0], layer.bits, tol, work, tol_sum) for work in working_dtypes(x))

    def _scale_dtype(self, layer: PackedLayer) -> str:
        """The dtype the layer's scales are stored in (header). Time O(1)."""
        return self.inner.info(layer.parts["scales" if layer.scheme in _WORDS_IN else "scale"]).dtype

    @staticmethod
    def _groups(layer: PackedLayer, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each input column's group of scales, (in,) int64: ``g_idx`` when stored, else consecutive groups.
        Time O(in)."""
        if layer.scheme == "awq":
            return A.group_index(layer.shape[1], layer.group_size)
        if layer.scheme == "gptq":
            return parts["g_idx"].long()
        groups = P.row_scales(parts["scale"], layer.shape[0]).shape[1]
        return P.column_groups(layer.shape[1], groups, parts.get("g_idx"), layer.group_size)

    def _packed_match(self, layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor, slack: float,
                      columns: bool) -> float:
        """:meth:`requantized_match` of a packed layer: the codes on the grid of ``x`` (up to a relative
        ``slack``), overall and (``columns``) on the best input column, counted per chunk of input columns."""
        # AutoGPTQ / GPTQModel / AutoAWQ round with a scale they store in float16 (computed in float32 for
        # the first two): a value near a tie may have gone either way; compressed-tensors rounds with the
        # scale it stores, in the weight's dtype
        tol = (2.0**-11 if self._scale_dtype(layer) == "float16" else 0.0) + slack
        (n_out, n_in), best = layer.shape, 0.0
        for work in working_dtypes(x):
            hits = torch.zeros(n_in, dtype=torch.long)  # codes on the grid per input column
            for cols, codes, scaled, zero in self._grid(layer, parts, x, work):  # (chunk, out) each
                hits[cols] += P.on_grid(scaled, zero, codes, layer.bits, tol).sum(dim=1)
            best = max(best, float(hits.sum()) / (n_out * n_in), float(hits.max()) / n_out if columns else 0.0)
        return best

    @staticmethod
    def _grid(layer: PackedLayer, parts: dict[str, torch.Tensor], x: torch.Tensor, work: torch.dtype):
        """:func:`~.packed_ints.gptq_grid`, :func:`~.awq.awq_grid` or :func:`~.packed_ints.pack_quantized_grid`
        of the layer."""
        get = parts.get
        if layer.scheme == "gptq":
            return P.gptq_grid(x, get("qweight"), get("qzeros"), get("scales"), get("g_idx"), layer.bits,
                               layer.offset, work)
        if layer.scheme == "awq":
            return A.awq_grid(x, get("qweight"), get("qzeros"), get("scales"), layer.group_size, work)
        return P.pack_quantized_grid(x, get("packed"), get("scale"), get("zero_point"), layer.bits, get("g_idx"),
                                     layer.group_size, work)

    def stored_tensors(self) -> list[TensorInfo]:
        return self.inner.stored_tensors()

    def files(self) -> list[Path]:
        return self.inner.files()

    def prefetch(self, name: str) -> None:
        layer = self.layers.get(name)
        for part in layer.parts.values() if layer is not None else [name]:
            self.inner.prefetch(part)

    def close(self) -> None:
        self._kept.drop()
        self.inner.close()


def dequantized(ck: Checkpoint, settings=None) -> Checkpoint:
    """``ck`` reading its packed or scaled layers as float weights (:class:`DequantizedCheckpoint`), or ``ck``
    itself when it has none (header only; a LoRA adapter, a GGUF file: as they are). ``settings()``: the model's
    ``quantization_config`` when it has quantized layers (default: its folder's; over HTTP, :mod:`.remote`'s)."""
    if ck.kind != "full" or ck.format == "gguf" or not any(n.endswith(_MARKS) for n in ck.tensor_names()):
        return ck
    try:
        infos = {t.name: t for t in ck.tensors()}
        config = settings() if settings is not None else quantization_config(ck.path)
        layers = find_packed(infos, config, ck.read)
    except ValueError as e:  # a layer whose stored tensors do not fit together: refused, not misread
        ck.close()
        raise CheckpointError(ck.path, f"quantized layers: {error_line(e)}") from e
    except BaseException:  # a corrupt config.json or shard: the checkpoint is refused, and closed
        ck.close()
        raise
    return DequantizedCheckpoint(ck, layers, config) if layers else ck
