"""The GGUF header (magic, version, key/value metadata, tensor table), parsed with every size checked first.

``gguf.GGUFReader`` trusts the file's counts: an array that claims 2^62 items past the end of the file loops
forever (each missing item reads as zero bytes), and it builds one numpy view per metadata array item, so a
5 MB file of one-byte items takes 4 GB of memory. This parser checks each count and length against the bytes
left in the file before using it, skips metadata without building objects (modelatlas needs only
``general.alignment``), and returns the tensor table. Layout (GGUF v2/v3, little- or big-endian): ``"GGUF"``,
u32 version, u64 tensor count, u64 key/value count, the key/values, the tensor infos (name, u32 n_dims, u64
dims fastest-varying first, u32 ggml type, u64 offset from the aligned start of the data), padding, data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import lfs_pointer_reason

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays; real files use none
_VERSIONS = (2, 3)
KEPT_KEYS = ("general.architecture", ".attention.head_count", ".attention.head_count_kv")  # exact, then suffixes
IMATRIX_KEYS = "quantize.imatrix."  # llama-quantize's record of an importance matrix (file, dataset, counts)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor-table entry: its ggml type, numpy-order shape and byte range (absolute, inside the file)."""

    name: str
    ggml_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    byteorder: str  # "<" or ">", as the file was written


class _Cursor:
    """Reads fixed-size fields from ``buf``; anything that would run past the end is a CheckpointError."""

    def __init__(self, path: Path, buf, order: str = "<"):
        self.path, self.buf, self.order, self.pos = path, buf, order, 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(self.path, f"corrupt or truncated GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, but the file has {len(self.buf)}")

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(self.order + fmt)  # with the order prefix: no native padding
        self.need(size, what)
        values = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> bytes:
        (n,) = self.take("Q", f"{what} length")
        self.need(n, what)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])


def read_gguf_header(path: Path, gguf, meta: dict | None = None) -> list[GGUFTensor]:
    """The tensor table of GGUF file ``path``, checked against the file size; CheckpointError naming the file
    and the field otherwise. ``meta``, when given, receives the few metadata values modelatlas uses
    (:data:`KEPT_KEYS`: the architecture and its attention head counts; :data:`IMATRIX_KEYS`: the importance
    matrix llama-quantize used, if any); the rest is skipped.
    Time O(header bytes) (O(1) per metadata item), memory O(tensors)."""
    try:
        with open(path, "rb") as f:
            if path.stat().st_size == 0:
                raise CheckpointError(path, "corrupt or truncated GGUF file: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(path, buf), gguf, {} if meta is None else meta)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from e


def _parse(cur: _Cursor, gguf, meta: dict) -> list[GGUFTensor]:
    magic, version = cur.take("4sI", "header")
    if magic != b"GGUF":
        lfs = lfs_pointer_reason(cur.path)
        raise CheckpointError(cur.path, lfs) if lfs else cur.fail(f"bad magic {magic!r} (expected b'GGUF')")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cur.order = ">"
        (version,) = struct.unpack(">I", struct.pack("<I", version))
    if version not in _VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (readable: {', '.join(map(str, _VERSIONS))})")
    n_tensors, n_kv = cur.take("QQ", "tensor and key/value counts")
    cur.need(n_kv * 13, f"{n_kv} key/values")  # each at least: key length, type, a 1-byte value
    alignment = 32
    for _ in range(n_kv):
        key = cur.string("metadata key").decode("utf-8", "replace")
        (vtype,) = cur.take("I", f"type of key {key!r}")
        if key == "general.alignment":
            alignment = _alignment(cur, vtype)
        elif _kept(key, vtype):
            meta[key] = cur.string(key).decode("utf-8", "replace") if vtype == _STRING else cur.take(
                _SCALARS[vtype], key)[0]
        else:
            _skip_value(cur, vtype, key, 0)
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, n_dims, type, offset
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    return _tensors(cur, infos, data_start, gguf)


def _kept(key: str, vtype: int) -> bool:
    """Whether a metadata value is one of :data:`KEPT_KEYS` or :data:`IMATRIX_KEYS` (a string or an integer scalar; a per-layer array
    of head counts is skipped like any other value)."""
    if key == "general.architecture":
        return vtype == _STRING
    if key.startswith(IMATRIX_KEYS):  # its rounding differs (gguf_grid.SEARCHED_IMATRIX)
        return vtype == _STRING or (vtype in _SCALARS and _SCALARS[vtype] in "BbHhIiQq")
    return key.endswith(KEPT_KEYS[1:]) and vtype in _SCALARS and _SCALARS[vtype] in "BbHhIiQq"


def _alignment(cur: _Cursor, vtype: int) -> int:
    if vtype != 4:
        raise cur.fail(f"key 'general.alignment' has value type {vtype}, expected 4 (uint32)")
    (alignment,) = cur.take("I", "general.alignment")
    if alignment == 0 or alignment & (alignment - 1):
        raise cur.fail(f"key 'general.alignment' is {alignment}, not a power of two")
    return alignment


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int) -> None:
    """Skip one metadata value; an array's items are checked to fit before they are walked."""
    if vtype in _SCALARS:
        cur.skip(struct.calcsize(_SCALARS[vtype]), f"value of key {key!r}")
    elif vtype == _STRING:
        cur.string(f"value of key {key!r}")
    elif vtype == _ARRAY:
        itype, count = cur.take("IQ", f"array header of key {key!r}")
        if itype in _SCALARS:
            cur.skip(count * struct.calcsize(_SCALARS[itype]), f"{count}-item array of key {key!r}")
            return
        if itype not in (_STRING, _ARRAY):
            raise cur.fail(f"key {key!r} is an array of unknown value type {itype}")
        if depth >= _MAX_NESTING:
            raise cur.fail(f"key {key!r}: arrays nested more than {_MAX_NESTING} deep")
        cur.need(count * (8 if itype == _STRING else 12), f"{count}-item array of key {key!r}")
        for _ in range(count):
            _skip_value(cur, itype, key, depth + 1)
    else:
        raise cur.fail(f"key {key!r} has unknown value type {vtype}")


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    raw = cur.string("tensor name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"tensor name {raw[:64]!r} is not UTF-8") from None
    (n_dims,) = cur.take("I", f"dimension count of tensor {name!r}")
    if n_dims > _MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most {_MAX_DIMS})")
    dims = cur.take(f"{n_dims}Q", f"dimensions of tensor {name!r}")
    ggml_type, offset = cur.take("IQ", f"type and offset of tensor {name!r}")
    return name, dims, ggml_type, offset


def _tensors(cur: _Cursor, infos: list, data_start: int, gguf) -> list[GGUFTensor]:
    """Check each tensor's type, shape and byte range against the file; dims are in ggml order."""
    out: dict[str, GGUFTensor] = {}
    for name, dims, raw_type, offset in infos:
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        if name in out:
            raise cur.fail(f"tensor {name!r} is listed twice")
        if block > 1 and (not dims or dims[0] % block):
            raise cur.fail(f"tensor {name!r}: row size {dims[0] if dims else 1} is not a multiple of the "
                           f"{ggml_type.name} block size {block}")
        n = 1
        for d in dims:
            n *= d
        nbytes, start = n // block * type_size, data_start + offset
        if start + nbytes > len(cur.buf):
            raise cur.fail(f"tensor {name!r} ({ggml_type.name}, shape {tuple(reversed(dims))}) needs bytes "
                           f"{start}..{start + nbytes}, but the file has {len(cur.buf)}")
        out[name] = GGUFTensor(name, ggml_type, tuple(reversed(dims)), start, nbytes, cur.order)
    _check_overlaps(cur, list(out.values()), data_start)
    return list(out.values())


def _check_overlaps(cur: _Cursor, tensors: list[GGUFTensor], data_start: int) -> None:
    """Refuse two tensors whose byte ranges overlap (llama.cpp refuses any tensor that does not start where the
    one before it ends): both would read the same bytes. Time O(tensors log tensors)."""
    last = None
    for t in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if last is not None and t.offset < last.offset + last.nbytes:
            a, b = t.offset - data_start, last.offset - data_start
            raise cur.fail(f"tensor {t.name!r} (bytes {a}..{a + t.nbytes} of the data) overlaps tensor "
                           f"{last.name!r} (bytes {b}..{b + last.nbytes})")
        last = t
