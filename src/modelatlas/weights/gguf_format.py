"""GGUF files (llama.cpp, ``.gguf``): F16 and BF16 tensors in their own dtype, the others (F64 and the
block-quantized types) as float32 (extra ``gguf``).

The header is parsed by :mod:`modelatlas.weights.gguf_header`, which checks every count, length and tensor byte
range against the file size before using it (``gguf.GGUFReader`` trusts them: a lying array count hangs it, and
it builds an object per metadata item). A tensor's byte range is read, into an array of its own, only when the
tensor is (:mod:`.byte_ranges`), and dequantized with ``gguf.quants.dequantize`` (F16, BF16 and every
block-quantized type the package knows: Q8_0, Q4_K, ...). GGUF lists dimensions fastest-varying first (ggml order), the reverse of
numpy/torch; this reader exposes the numpy/torch shape, so a ``(out, in)`` linear weight is ``(out, in)``.
Integer, float16 and bfloat16 tensors keep their dtype (a float16 copy of a model is reported as float16, so
lineage recovery sees it as a lower-precision copy); F64 and quantized tensors are reported and read as float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line
from modelatlas.weights.byte_ranges import ByteRanges, distinct_rows
from modelatlas.weights.gguf_grid import GROUP_IQ, SEARCHED, SEARCHED_IMATRIX, SHARE_IQ
from modelatlas.weights.gguf_header import GGUFTensor, read_gguf_header
from modelatlas.weights.kept import Kept
from modelatlas.weights.registry import register_format
from modelatlas.weights.sampled import holds_sample, sample_values

_INT_TYPES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}
_FLOAT_TYPES = {"F16": "float16", "BF16": "bfloat16"}
_STORED = {**_INT_TYPES, **_FLOAT_TYPES}  # ggml type -> the dtype reported and read; others: float32
# the legacy types' codes of the values that set a block's scale (and offset), which are stored exactly:
# ggml's reference quantizers map the block's largest |x| (Q8_0: to +-127; Q4_0, Q5_0: its signed value to
# code 0) and, with an offset, its smallest to code 0 and its largest to the top code (Q4_1, Q5_1)
SCALE_CODES = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (1, 255), "Q4_1": (0, 15), "Q5_1": (0, 31)}
# SEARCHED, SEARCHED_IMATRIX, GROUP_IQ, SHARE_IQ: the rounding variance's calibrations, in gguf_grid (session 34)
_PLAIN = {**_INT_TYPES, "F16": "float16", "F32": "float32", "F64": "float64"}  # read as they are stored


def import_gguf(path: Path):
    """The ``gguf`` module, or a CheckpointError naming the file and the install command."""
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError(path, "reading GGUF files needs the gguf package: pip install modelatlas[gguf]") from e
    return gguf


class GGUFCheckpoint(Checkpoint):
    """A ``.gguf`` file; quantized tensors are exposed as float32 (dequantized on read), the others in their
    own dtype."""

    format = "gguf"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name)
        self._gguf = import_gguf(self.path)
        self.metadata: dict = {}  # general.architecture and its head counts (gguf_header.KEPT_KEYS)
        self._tensors = {t.name: t for t in read_gguf_header(self.path, self._gguf, self.metadata)}
        self._ranges = ByteRanges(self.path)
        # the raw bytes of the quantized tensor :meth:`read` gave last, until a method of that tensor takes
        # them (:meth:`_bytes`), the next read, or close() (:mod:`.kept`)
        self._kept = Kept()

    @property
    def architecture(self) -> str | None:
        """llama.cpp's name of the model's architecture (``general.architecture``: "llama", "qwen2", ...)."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def imatrix(self) -> bool:
        """Whether llama-quantize used an importance matrix (it records ``quantize.imatrix.*`` metadata)."""
        from modelatlas.weights.gguf_header import IMATRIX_KEYS

        return any(k.startswith(IMATRIX_KEYS) for k in self.metadata)

    def head_counts(self) -> tuple[int | None, int | None]:
        """(attention heads, key/value heads) as the file lists them; None where it does not."""
        arch = self.architecture
        return (self.metadata.get(f"{arch}.attention.head_count"), self.metadata.get(f"{arch}.attention.head_count_kv"))

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(n, t.shape, _STORED.get(t.ggml_type.name, "float32")) for n, t in self._tensors.items()]

    def _bytes(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes: those :meth:`read` kept for it (taken: one reader each), else read
        into an array of their own (:class:`~.byte_ranges.ByteRanges`: exactly its byte range comes off the
        disk; through the memory map of sessions 24-30, the kernel's readahead around it came too, and a file
        cut short after it was opened read zeros or raised SIGBUS). Never written to by their users."""
        raw = self._kept.take(t.name)  # held no longer than the read and the one call that uses it
        if raw is not None:
            return raw
        data = np.empty(t.nbytes, dtype=np.uint8)
        self._ranges.read_into(t.offset, memoryview(data), f"tensor {t.name!r}")
        return data

    def _pick(self, t: GGUFTensor, max_rows: int) -> np.ndarray:
        """``max_rows`` evenly spaced rows of ``t`` (rows of its last dimension), ascending, (r,) int64."""
        n = int(np.prod(t.shape[:-1]))
        return np.unique(np.linspace(0, n - 1, min(max_rows, n)).round().astype(np.int64))

    def _sampled_rows(self, t: GGUFTensor, pick: np.ndarray) -> np.ndarray:
        """The bytes of rows ``pick`` (ascending) of ``t``, (r, row bytes): taken from the bytes :meth:`read`
        kept, else each run of consecutive rows read as one byte range: only the sampled rows come off the
        disk (256 of a 2048-row layer are an eighth of it; of a 128k-row embedding, 0.2 %; all of it was read
        for each source tested against a copy). Time O(r m)."""
        block, type_size = self._gguf.GGML_QUANT_SIZES[t.ggml_type]
        width, n = t.shape[-1] // block * type_size, int(np.prod(t.shape[:-1]))
        if len(pick) == n or self._kept.has(t.name):
            return self._bytes(t).reshape(n, width)[pick]  # (r, row bytes)
        return self._ranges.read_rows(t.offset, width, pick, f"tensor {t.name!r}")

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read tensor ``name``'s bytes into the page cache in the background."""
        if (t := self._tensors.get(name)) is not None:
            self._ranges.prefetch(t.offset, t.nbytes)

    def _read(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        self._kept.drop()  # one layer's bytes at most: the last read's, dropped by this one
        data = self._bytes(t)
        if self.quantization(name) is not None:  # its rounding variance or grid may follow: kept for it
            self._kept.keep(name, data)
        return self._decode(t, data, t.shape)

    def _decode(self, t: GGUFTensor, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """``data``, bytes of tensor ``t`` (all of them, or whole rows of its last dimension), as the values of
        ``shape``: :meth:`read`'s dtype, dequantized for the quantized types. Time O(values)."""
        from gguf.quants import dequantize

        kind = t.ggml_type.name
        try:
            if kind in _PLAIN:
                arr = data.view(np.dtype(_PLAIN[kind]).newbyteorder(t.byteorder)).reshape(shape)
                arr = arr.astype(np.float32) if kind == "F64" else arr  # plain doubles: dequantize does not take them
            else:  # BF16 and the block-quantized types: dequantized to float32
                if kind == "BF16" and t.byteorder == ">":  # dequantize reads little-endian halves
                    data = data.view(">u2").astype("<u2").view(np.uint8)
                block, type_size = self._gguf.GGML_QUANT_SIZES[t.ggml_type]
                rows = data.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else data
                empty = not data.size  # (2, 0): rows of no blocks, which dequantize cannot reshape
                arr = (np.zeros(shape, np.float32) if empty else dequantize(rows, t.ggml_type)).astype(
                    np.float32, copy=False).reshape(shape)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise CheckpointError(self.path, f"cannot read tensor {t.name!r} ({kind}): {error_line(e)}") from e
        out = torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), copy=True))  # never pins the map
        return out.to(torch.bfloat16) if kind == "BF16" else out  # exact: the values are bfloat16

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`~.base.Checkpoint.read_rows` from those rows' bytes alone (dequantized for the quantized
        types; :meth:`read`'s kept bytes stay kept). Time O(r m)."""
        t = self._tensors[name] if name in self._tensors else None
        if t is None or not t.shape:
            return super().read_rows(name, rows)
        distinct, where = distinct_rows(rows, int(np.prod(t.shape[:-1])))
        block, type_size = self._gguf.GGML_QUANT_SIZES[t.ggml_type]
        got = self._ranges.read_rows(t.offset, t.shape[-1] // block * type_size, distinct, f"tensor {name!r}")
        return self._decode(t, got, (len(distinct), t.shape[-1]))[torch.from_numpy(where)]  # (r, m)

    def compared_rows(self, name: str, max_rows: int = 256) -> torch.Tensor | None:
        """The ``max_rows`` evenly spaced rows :meth:`requantized_match` and :meth:`grid_position` compare, for a
        quantized tensor; None for another."""
        t = self._tensors.get(name)
        if t is None or not t.shape or self.quantization(name) is None:
            return None
        return torch.from_numpy(self._pick(t, max_rows))

    def _compared(self, t: GGUFTensor, x: torch.Tensor, max_rows: int, rows: torch.Tensor | None
                  ) -> tuple[torch.Tensor, np.ndarray, int] | None:
        """What :meth:`requantized_match` and :meth:`grid_position` compare: ``x``'s values at the ``max_rows``
        evenly spaced rows, (r, m); the stored bytes of those rows, (r, row bytes); the type's bytes a block.
        None when ``x`` is neither the whole tensor (``rows`` None) nor those rows (``rows`` the
        :meth:`compared_rows` they are; :func:`~.sampled.holds_sample`). Time O(r m)."""
        pick = self._pick(t, max_rows)
        if not holds_sample(x, t.shape, at := torch.from_numpy(pick), rows):
            return None
        return sample_values(x, t.shape, at), self._sampled_rows(t, pick), self._gguf.GGML_QUANT_SIZES[t.ggml_type][1]

    def quantization(self, name: str) -> str | None:
        self.info(name)  # a clear error for an unknown name
        kind = self._tensors[name].ggml_type.name
        return None if kind in _PLAIN or kind == "BF16" else kind

    def requantized_match(self, name: str, x: torch.Tensor, max_rows: int = 256,
                          rows: torch.Tensor | None = None) -> float | None:
        """Share of the stored values that quantizing ``x``, or ``x`` rounded to float16 or bfloat16 first
        (llama.cpp's tools quantize an F16 or BF16 conversion), gives, on ``max_rows`` evenly spaced rows (a copy matches on every
        row, a quantized fine-tune on few: one sample decides, and a large layer is not quantized whole).
        Types ``gguf.quants.quantize`` knows (Q8_0, Q4_0, ...; ggml's reference rounding) are quantized again
        and compared; the K-quants, whose scales llama.cpp searches for, are checked on their stored grid
        (:mod:`modelatlas.weights.gguf_grid`: every value the level nearest to ``x``), IQ4_NL / IQ4_XS against
        their 16 codebook values. None for other types (IQ1-IQ3: lattice codebooks). A rounding that leaves the
        values as they are (float16 to float16) is not tested twice. ``rows``: :meth:`compared_rows`, when ``x`` is
        only those rows (:meth:`~.base.Checkpoint.requantized_match`). Time O(max_rows m) for rows of m values."""
        from gguf.quants import dequantize

        if self.quantization(name) is None or not (t := self._tensors[name]).nbytes:  # unknown: read's error; no bytes
            return None
        if (compared := self._compared(t, x, max_rows, rows)) is None:
            return None
        sample, rows, type_size = compared  # (r, m) values, (r, row bytes) stored
        have = dequantize(rows, t.ggml_type)  # (r, m) float32, the stored values: once for both tests below
        test = self._value_test(t, rows, type_size, have)  # read once, tested for each rounding of x
        best, tried = 0.0, []
        for cast in (torch.float32, torch.float16, torch.bfloat16):
            y = sample.to(cast).to(torch.float32)
            if any(torch.equal(y, z) for z in tried):  # a float16 source rounded to float16: tested already
                continue
            tried.append(y)
            match = test(y.numpy())
            if match is None:
                return None
            best = max(best, match)
            if best == 1.0:
                break
        if best < 1.0 and x.dtype == torch.float16:  # a float16 copy of the model this was quantized from
            best = max(best, self._rounded_source_match(t, rows, type_size, have, tried[0]))  # tried[0]: as float32
        return best

    def _rounded_source_match(self, t: GGUFTensor, rows: np.ndarray, type_size: int, have: np.ndarray,
                              x: torch.Tensor) -> float:
        """Share of the stored values ``have`` (r, m; ``rows`` dequantized) on the level nearest to ``x`` (r, m,
        float16 values as float32) within float16's rounding:
        llama.cpp's converter quantizes a model's own float32 or bfloat16 values (``--outtype q8_0``), which
        its float16 conversion has rounded, so quantizing that again misses ~25 % of a Q8_0 copy's values;
        on the grid, within float16's rounding, it misses none (a fine-tune 0.1 % away misses ~2 %, 0.05 %
        away ~0.5 %). For the legacy types only (Q8_0, Q4_0, ...: what the converter writes itself); the
        K-quants come from llama-quantize, which reads a GGUF file, and their coarse steps would let a
        fine-tune 0.1 % away pass within that rounding. 0.0 for others. Time O(r m)."""
        from modelatlas.weights.gguf_grid import LEGACY, grid_test

        kind = t.ggml_type.name
        if kind not in LEGACY:
            return 0.0
        # float16's rounding of x, and of a legacy block's scale (its codes were set with the float32 scale)
        test = grid_test(kind, t.ggml_type, rows, type_size, have, rel_tol=2.0**-11, abs_tol=2.0**-25)
        return test(x.numpy())

    def grid_position(self, name: str, x: torch.Tensor, max_rows: int = 256,
                      rows: torch.Tensor | None = None) -> float | None:
        """Where ``x``'s values sit on the tensor's levels (:mod:`.grid_position`), on ``max_rows`` evenly
        spaced rows: ~0.5 for the model it was quantized from, ~0 for one made from its dequantized values
        (``llama-export-lora`` merges a LoRA into a quantized base). For the legacy types and the K-quants
        (evenly spaced levels per block); None for others. Time O(max_rows m)."""
        from modelatlas.weights.gguf_grid import GRIDS, LEGACY, grid
        from modelatlas.weights.grid_position import uniform_position

        t = self._tensors[name] if name in self._tensors else None
        if t is None or t.ggml_type.name not in {**GRIDS, **LEGACY} or not t.nbytes:
            return None
        if (compared := self._compared(t, x, max_rows, rows)) is None:
            return None
        sample, rows, type_size = compared  # (r, m) values, (r, row bytes) stored
        lo, step = grid(t.ggml_type.name, t.ggml_type, rows, type_size)  # (r, m) each
        sample = sample.double().numpy()  # (r, m)
        live = step != 0  # a sub-block of scale 0 holds its offset whatever x
        return uniform_position(torch.from_numpy((sample - lo)[live] / step[live]))

    def grid_match(self, name: str, x: torch.Tensor, slack: float = 0.0, rows: torch.Tensor | None = None,
                   max_rows: int = 256) -> float | None:
        """Share of the stored values, on ``max_rows`` evenly spaced rows, that are the level of their stored grid
        nearest to ``x`` (the whole tensor), or its end level with ``x`` beyond it (:func:`~.gguf_grid.grid_test`,
        ``slack`` its relative tolerance): 1.0 for ``x`` rounded on this grid, ~1 - E|u| / step for a finer
        rounding ``x = w + u`` of the model this was quantized from. Legacy types and K-quants; None for others.
        ``rows``: :meth:`compared_rows`, when ``x`` is only those rows. Time O(max_rows m)."""
        from gguf.quants import dequantize

        from modelatlas.weights.gguf_grid import GRIDS, LEGACY, grid_test

        t = self._tensors[self.info(name).name]
        if t.ggml_type.name not in {**GRIDS, **LEGACY} or not t.nbytes or (got := self._compared(t, x, max_rows, rows)) is None:
            return None
        sample, rows, size = got  # (r, m) values, (r, row bytes) stored
        return grid_test(t.ggml_type.name, t.ggml_type, rows, size, dequantize(rows, t.ggml_type), slack)(sample.numpy())

    def rounding_variance(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """``step**2 / 12`` per value for the legacy types and the K-quants (evenly spaced levels per block or
        sub-block, read off the stored scales by :func:`~modelatlas.weights.gguf_grid.grid`), the error over each
        value's cell between its block's 16 levels for IQ4_NL / IQ4_XS
        (:func:`~modelatlas.weights.gguf_grid.codebook_variance`), :data:`SHARE_IQ` of each sub-block's root mean
        stored square times its largest |value| for IQ1-IQ3 (:data:`GROUP_IQ`); None for plain tensors, a
        TensorNotFoundError for an unknown name. A file quantized with an importance matrix (:attr:`imatrix`) divides by :data:`SEARCHED_IMATRIX` in place of :data:`SEARCHED`. The
        error of a block's largest value is 0 (Q4_0, Q8_0: it sets the scale) and that of its smallest too where
        levels have an offset (Q4_1, Q5_1): those values get 0 (:data:`SCALE_CODES`). They are the tails a
        kurtosis is made of: counted as rounded, the fourth moment's correction overshot (a Q4_0 stand-in's
        summed kurtosis read 0.06-0.1 low). K-quants search their scales for the least error, so no value is
        exact and the rest lie nearer their levels (:data:`SEARCHED`). ``values``: the tensor as :meth:`read`
        gave it (any shape of its size), which the legacy and IQ4 types then take in place of dequantizing it
        again (the same float32 values: the same result). Rows in chunks of ~1M values. Time O(P), memory O(P)
        float32 plus O(1M) float64."""
        from modelatlas.weights.gguf_grid import CODEBOOKS, GRIDS, LEGACY

        t = self._tensors[self.info(name).name]  # an unknown name raises naming the file, as read does
        if t.ggml_type.name not in {**GRIDS, **LEGACY, **CODEBOOKS, **GROUP_IQ} or not t.nbytes:  # no rows: no blocks
            return None
        block, type_size = self._gguf.GGML_QUANT_SIZES[t.ggml_type]
        rows = self._bytes(t).reshape(-1, t.shape[-1] // block * type_size)  # (R, row bytes)
        stored = None if values is None else values.detach().reshape(len(rows), -1).float().numpy()  # (R, m)
        out = np.empty((len(rows), t.shape[-1]), dtype=np.float32)  # (R, m)
        chunk = max(1, (1 << 20) // t.shape[-1])
        for a in range(0, len(rows), chunk):
            part = rows[a:a + chunk]
            self._variance_rows(t, part, type_size, None if stored is None else stored[a:a + chunk], out[a:a + chunk])
        return torch.from_numpy(out).reshape(t.shape)

    def _variance_rows(self, t: GGUFTensor, part: np.ndarray, type_size: int, stored: np.ndarray | None,
                       out: np.ndarray) -> None:
        """:meth:`rounding_variance` of ``part`` (r, row bytes) into ``out`` (r, m), their dequantized values
        ``stored`` (r, m) or None (dequantized here where needed). An evenly spaced type's variance is computed
        per group of values that share their scales (:func:`~modelatlas.weights.gguf_grid.group_grid`), each
        value's the same float64 operations as before. Time O(r m)."""
        from gguf.quants import dequantize

        from modelatlas.weights.gguf_grid import CODEBOOKS, GROUP, codebook_variance, group_grid

        kind = t.ggml_type.name
        gains = SEARCHED_IMATRIX if self.imatrix else SEARCHED
        if kind in GROUP_IQ:  # a constant share of each sub-block's size squared
            have = (dequantize(part, t.ggml_type) if stored is None else stored).astype(np.float64)
            groups = have.reshape(len(part), -1, GROUP_IQ[kind])  # (r, m / g, g)
            size = np.sqrt(np.mean(groups**2, axis=2, keepdims=True)) * np.max(np.abs(groups), axis=2, keepdims=True)
            out.reshape(groups.shape)[:] = SHARE_IQ[kind] * size
            return
        if kind in CODEBOOKS:
            have = dequantize(part, t.ggml_type) if stored is None else stored
            out[:] = codebook_variance(kind, t.ggml_type, part, type_size, have) / gains[kind]
            return
        lo, step = group_grid(kind, t.ggml_type, part, type_size)  # (r, m / GROUP) float64
        each = out.reshape(len(part), -1, GROUP)  # (r, m / GROUP, GROUP) a view of out
        each[:] = (step**2 / (12 * gains.get(kind, 1.0)))[:, :, None]
        if kind in SCALE_CODES and not (self.imatrix and kind in SEARCHED_IMATRIX):  # set the scale: exact
            have = (dequantize(part, t.ggml_type) if stored is None else stored).reshape(each.shape)
            code = np.subtract(have, lo[:, :, None], dtype=np.float64)  # in place from here: no 8 MB temporaries
            np.rint(np.divide(code, np.where(step == 0, 1.0, step)[:, :, None], out=code), out=code)
            each[np.isin(code, SCALE_CODES[kind])] = 0.0

    def least_squares(self, name: str, max_rows: int = 256) -> bool | None:
        """Whether llama.cpp fitted the layer's scales by least squares: the K-quants, and a legacy type whose
        ``max_rows`` sampled rows say so (:func:`~modelatlas.weights.gguf_grid.least_squares_blocks`: an
        importance matrix, with or without its metadata); None for other types. Time O(max_rows m)."""
        from modelatlas.weights.gguf_grid import GRIDS, least_squares_blocks

        t = self._tensors[self.info(name).name]
        kind = t.ggml_type.name
        if kind in GRIDS or kind not in SCALE_CODES or not t.nbytes:
            return True if kind in GRIDS else None
        rows = self._sampled_rows(t, self._pick(t, max_rows))  # (r, row bytes)
        return least_squares_blocks(kind, t.ggml_type, rows, self._gguf.GGML_QUANT_SIZES[t.ggml_type], SCALE_CODES[kind])

    def _value_test(self, t: GGUFTensor, rows: np.ndarray, type_size: int, have: np.ndarray):
        """``x -> share`` for :meth:`requantized_match` of the sampled ``rows`` (r, row bytes) and their stored
        values ``have`` (r, m), x (r, m); a K-quant's grid is computed once. The share is None for a type with
        no test."""
        from functools import partial

        from gguf.quants import dequantize, quantize

        from modelatlas.weights.gguf_grid import CODEBOOKS, GRIDS, codebook_match, grid_test

        kind = t.ggml_type.name
        if kind in GRIDS:
            return grid_test(kind, t.ggml_type, rows, type_size, have)
        if kind in CODEBOOKS:
            return partial(codebook_match, kind, t.ggml_type, rows, type_size, have)

        def again(x: np.ndarray) -> float | None:
            try:
                return float(np.mean(dequantize(quantize(x, t.ggml_type), t.ggml_type) == have))
            except (NotImplementedError, ValueError, TypeError):
                return None

        return again

    def close(self) -> None:
        """Close the file (every returned tensor is a copy) and drop the kept bytes. Reads after this reopen it."""
        self._kept.drop()
        self._ranges.close()


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


register_format("gguf", is_gguf, GGUFCheckpoint)
