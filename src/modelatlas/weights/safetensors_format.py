"""The ``.safetensors`` format: a JSON header of names, dtypes, shapes and byte offsets, then raw data.

The header is read and checked against the file size before any tensor is touched, so a truncated file or
a header that lies about sizes is reported as such (naming the file) instead of failing somewhere later.
Tensors are read one at a time, each its own byte range into a fresh buffer (:mod:`.byte_ranges`: no readahead
around it), also from a file whose name is not UTF-8.
"""

from __future__ import annotations

import json
import reprlib
import struct
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line, lfs_pointer_reason, misnamed_reason
from modelatlas.weights.byte_ranges import ByteRanges, distinct_rows

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate the header; returns (header without ``__metadata__``, data start offset).

    Checks (:func:`header_length`, :func:`parse_header`): the 8-byte length fits the file, the header is a JSON
    object, ``__metadata__`` maps strings to strings, every tensor's byte range lies inside the data section and
    matches its dtype and shape.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(path, f.read(8), size,
                              lambda: lfs_pointer_reason(path) or misnamed_reason(path, "safetensors"))
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from e
    return parse_header(path, raw, size), 8 + n


def header_length(where: str | Path, head: bytes, size: int, why=lambda: None) -> int:
    """The JSON header's length from a file's first 8 bytes ``head``, checked against the file's ``size`` (bytes);
    ``where`` (a path or URL) names the file in errors, ``why()`` says what else the bytes may be (an LFS pointer, a
    file of another format). Shared by the local and the HTTP reader (:mod:`.remote`)."""
    if len(head) < 8:
        raise CheckpointError(where, "truncated safetensors file (no header length)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER:
        raise CheckpointError(where, why() or f"corrupt safetensors header: length {n} is over the {_MAX_HEADER} "
                                             "bytes that safetensors allows")
    if n > size - 8:  # "length 8 exceeds the file size 15" read as a contradiction
        raise CheckpointError(where, why() or f"truncated file: the header length says {n} "
                                     f"bytes but only {size - 8} follow it (file size {size})")
    return n


def parse_header(where: str | Path, raw: bytes, size: int) -> dict:
    """The tensors of header ``raw`` (the JSON after the 8-byte length) of a file of ``size`` bytes, checked as
    :func:`read_safetensors_header` says; ``__metadata__`` removed. Time O(tensors log tensors)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError as e:
        raise CheckpointError(where, "corrupt safetensors header: JSON nested too deeply") from e
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, a duplicate key, an integer of 5,000 digits
        raise CheckpointError(where, f"corrupt safetensors header: {error_line(e)}") from e
    if not isinstance(header, dict):
        raise CheckpointError(where, "corrupt safetensors header: not a JSON object")
    _check_metadata(where, header.pop("__metadata__", None))
    data_size = size - 8 - len(raw)
    _check_offsets(where, header, data_size)
    _check_packed(where, header, data_size)
    return header


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object without repeated keys: with one, json keeps the last and another reader may keep the first,
    so two tools would read different tensors from the same file."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key[:80]!r} appears twice")
        out[key] = value
    return out


def _check_packed(path: Path, header: dict, data_size: int) -> None:
    """Tensors tile the data section exactly, in offset order, as safetensors requires (it refuses overlaps, gaps
    and trailing bytes only at the first read, without naming the tensor). Time O(tensors log tensors)."""
    end, last = 0, None
    for name, meta in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start = meta["data_offsets"][0]
        if start < end:
            raise CheckpointError(path, f"header lies about tensor {name!r}: its bytes {start}.."
                                        f"{meta['data_offsets'][1]} overlap tensor {last!r}")
        if start > end:
            raise CheckpointError(path, f"corrupt safetensors header: {start - end} unused bytes before tensor "
                                        f"{name!r} (tensors must be packed)")
        end, last = meta["data_offsets"][1], name
    if end != data_size:
        raise CheckpointError(path, f"corrupt safetensors file: {data_size - end} bytes after the last tensor that "
                                    "the header does not describe")


def _check_metadata(path: Path, meta: object) -> None:
    """``__metadata__`` is string -> string (or absent/null). safetensors itself refuses anything else, but only
    when a tensor is first read and without naming the key; checking here reports it when the file is opened."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"corrupt safetensors header: __metadata__ is a {type(meta).__name__}, not an "
                                    "object of strings")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise CheckpointError(path, f"corrupt safetensors header: __metadata__ key {key!r} has a non-string "
                                        f"value {reprlib.repr(value)} (the format allows only strings)")


def _check_offsets(path: Path, header: dict, data_size: int) -> None:
    for name, meta in header.items():
        try:
            dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except KeyError as e:
            raise CheckpointError(path, f"corrupt safetensors header entry {name!r}: no {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:  # not an object, or not two offsets
            raise CheckpointError(path, f"corrupt safetensors header entry {name!r}: {reprlib.repr(meta)} is not "
                                        "{'dtype', 'shape', 'data_offsets': [start, end]}") from e
        # Sizes and offsets are non-negative integers (usize in the spec); anything else would fail in the
        # arithmetic below or in safetensors' own parser, without naming the file.
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(map(_is_count, [*shape, start, end])):
            raise CheckpointError(path, f"corrupt safetensors header entry {name!r}: dtype {dtype!r}, shape {shape!r}, "
                                        f"offsets {[start, end]!r}")
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
            if numel >= 2**64:  # safetensors computes sizes in 64 bits, in this order, and refuses overflow
                raise CheckpointError(path, f"tensor {name!r}: shape {shape} overflows 64-bit sizes")
        if end - start != numel * _DTYPE_BYTES[dtype] or start < 0:
            raise CheckpointError(path, f"header lies about tensor {name!r}: offsets {start}..{end} "
                                        f"do not hold shape {shape} of {dtype}")
        if end > data_size:
            raise CheckpointError(path, f"truncated file: tensor {name!r} ends at byte {end} "
                                        f"but the data section has {data_size} bytes")


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsCheckpoint(Checkpoint):
    """A single ``.safetensors`` file."""

    format = "safetensors"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name)
        self._header, self._data_start = read_safetensors_header(self.path)
        self._ranges = ByteRanges(self.path)

    def _infos(self) -> list[TensorInfo]:
        items = sorted(self._header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        return [TensorInfo(k, tuple(int(s) for s in v["shape"]), _DTYPE_NAMES[v["dtype"]]) for k, v in items]

    def _read(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s bytes read into a buffer of its own (:class:`~.byte_ranges.ByteRanges`: exactly
        its byte range comes off the disk, not the kernel's readahead around it as through safetensors' memory
        map before session 31). Time O(bytes)."""
        meta = self._header[name]
        start, end = meta["data_offsets"]
        # (over HTTP the buffer grows with the bytes received: a header served states the file's size too)
        raw = self._ranges.read(self._data_start + start, end - start, f"tensor {name!r}")
        buf = torch.from_numpy(raw) if raw.size else torch.empty(0, dtype=torch.uint8)  # (numpy's stride 0 for none)
        dtype = getattr(torch, _DTYPE_NAMES[meta["dtype"]])
        return buf.view(dtype).reshape(meta["shape"])  # little-endian, as safetensors stores it

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`~.base.Checkpoint.read_rows` from those rows' bytes alone (each run of consecutive rows one
        range: :meth:`~.byte_ranges.ByteRanges.read_rows`), for a tensor of one dimension or more. Time O(r m)."""
        info = self.info(name)
        if not info.shape or not info.shape[-1]:  # a scalar; rows of no value, (3, 0), which no bytes count
            return super().read_rows(name, rows)
        meta, m = self._header[name], info.shape[-1]
        n = info.numel // m
        distinct, where = distinct_rows(rows, n)
        width = m * _DTYPE_BYTES[meta["dtype"]]
        got = self._ranges.read_rows(self._data_start + meta["data_offsets"][0], width, distinct, f"tensor {name!r}")
        dtype = getattr(torch, _DTYPE_NAMES[meta["dtype"]])
        if not len(where):  # no rows: a (0, width) byte array has no stride to view another dtype through
            return torch.empty((0, m), dtype=dtype)
        return torch.from_numpy(got[where]).view(dtype).reshape(len(where), m)  # (r, width) bytes -> (r, m)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read tensor ``name``'s byte range into the page cache in the background
        (asynchronous; a no-op where unsupported or when the file is gone)."""
        meta = self._header.get(name)
        if meta is not None:
            start, end = meta["data_offsets"]
            self._ranges.prefetch(self._data_start + start, end - start)

    def close(self) -> None:
        self._ranges.close()


def is_safetensors(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"
