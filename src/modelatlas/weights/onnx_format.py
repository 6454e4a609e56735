"""ONNX models (``.onnx``): the graph's initializers are the tensors, and its Constant nodes' tensor values
(named by their output) too (extra ``onnx``).

The protobuf is parsed once without external data; a tensor stored in an external data file is read from
that file when asked for. Initializers stored inline live in the protobuf, so an inline model is held in
memory while open (ONNX cannot parse lazily); large models use external data, which is read per tensor.
External files must be named inside the model's folder (a location that leaves it, such as ``../../etc/passwd``
or an absolute path, is refused); a file there may be a symlink, as in a Hugging Face cache snapshot.
``onnx`` is imported inside the reader, so modelatlas works without it until an ``.onnx`` file is opened.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line, lfs_pointer_reason
from modelatlas.weights.registry import register_format


def import_onnx(path: Path):
    """The ``onnx`` module, or a CheckpointError naming the file and the install command."""
    try:
        import onnx
    except ImportError as e:
        raise CheckpointError(path, "reading ONNX files needs the onnx package: pip install modelatlas[onnx]") from e
    return onnx


# Float types numpy lacks: onnx returns them as ml_dtypes arrays, which torch.from_numpy refuses; the
# ml_dtypes name is the torch dtype's name, so they are passed through their raw bits.
_BITS_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_SMALL_INTS = {"int2": np.int8, "int4": np.int8, "uint2": np.uint8, "uint4": np.uint8}  # exact in 8 bits
_PACKED = {*_SMALL_INTS, "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn"}  # fewer bits than their numpy itemsize


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    name = arr.dtype.name
    if name in _BITS_DTYPES and hasattr(torch, name):
        return torch.from_numpy(arr.view(f"uint{8 * arr.dtype.itemsize}")).view(getattr(torch, name))
    if name in _SMALL_INTS:
        return torch.from_numpy(arr.astype(_SMALL_INTS[name]))
    try:
        return torch.from_numpy(arr)
    except TypeError:  # the other ml_dtypes floats torch lacks (float4_e2m1fn, float6_*): exact in float32
        return torch.from_numpy(arr.astype(np.float32))


def _graph_tensors(onnx, graph):
    """(name, TensorProto) of the graph's initializers, then of its Constant nodes' tensor values (named by
    their output): some exporters store the weights as Constant nodes, and such a model had no tensor at all."""
    for t in graph.initializer:
        yield t.name, t
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    yield node.output[0], a.t


def _initializers(path: Path, onnx, graph) -> dict:
    """Name -> numeric initializer (or Constant node tensor), after checking dims and type. String ones (class
    labels, vocabularies) are text, not weights, and are left out."""
    out = {}
    for name, t in _graph_tensors(onnx, graph):
        if t.data_type == onnx.TensorProto.STRING:
            continue
        if not isinstance(name, str):  # protobuf gives a string field of bytes that are not UTF-8 as bytes
            raise CheckpointError(path, f"initializer {name!r} has a name that is not UTF-8 (corrupt file)")
        if name in out:  # ONNX defines a name once; the last copy was kept, where another tool may read the first
            raise CheckpointError(path, f"initializer {name!r} is listed twice")
        try:
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"initializer {name!r} has unknown data type {t.data_type}") from None
        if any(d < 0 for d in t.dims):
            raise CheckpointError(path, f"initializer {name!r} has negative dimensions {list(t.dims)}")
        if t.data_location != onnx.TensorProto.EXTERNAL and 2 * math.prod(t.dims) > _stored_bits(t):
            raise CheckpointError(path, f"initializer {name!r}: shape {list(t.dims)} claims more values than "
                                        f"its {_stored_bits(t) // 8} bytes of data hold")
        out[name] = (t, str(_to_torch(np.empty(0, dtype=np_dtype)).dtype).removeprefix("torch."),
                     np.dtype(np_dtype).itemsize, np.dtype(np_dtype).name not in _PACKED)
    return out


def _stored_bits(t) -> int:
    """Bits of data an inline initializer stores. Every value takes at least 2 bits (int2, packed), so a shape
    needing more than this allows is a claim the file cannot back (callers size buffers from listed shapes)."""
    return (8 * len(t.raw_data) + 32 * (len(t.float_data) + len(t.int32_data))
            + 64 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data)))


class OnnxCheckpoint(Checkpoint):
    """An ``.onnx`` file's initializers, read one at a time."""

    format = "onnx"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name)
        self._onnx = import_onnx(self.path)
        try:
            model = self._onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError on corrupt input
            raise CheckpointError(self.path, lfs_pointer_reason(self.path) or f"corrupt ONNX file: {error_line(e)}") from e
        if not model.HasField("graph"):  # an empty file parses as an empty ModelProto
            raise CheckpointError(self.path, lfs_pointer_reason(self.path)
                                  or "corrupt ONNX file: no graph (empty, or not an ONNX model)")
        # name -> (proto, dtype, bytes per value, whether that size is exact: not a packed 2/4/6-bit type)
        self._init = _initializers(self.path, self._onnx, model.graph)
        for t, _, itemsize, exact in self._init.values():  # locations and sizes checked now, like inline data
            if t.data_location == self._onnx.TensorProto.EXTERNAL:
                self._external_range(t, itemsize, exact)

    def files(self) -> list[Path]:
        """The model file and the external data files its initializers name (checked at open)."""
        external = [self._external_range(t, itemsize, exact)[0] for t, _, itemsize, exact in self._init.values()
                    if t.data_location == self._onnx.TensorProto.EXTERNAL]
        return [self.path, *dict.fromkeys(external)]

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(int(d) for d in t.dims), dtype) for n, (t, dtype, *_) in self._init.items()]

    def _read(self, name: str) -> torch.Tensor:
        from onnx import numpy_helper

        tensor, _, itemsize, exact = self._init[name]
        try:
            if tensor.data_location == self._onnx.TensorProto.EXTERNAL:
                tensor = self._with_external_bytes(tensor, itemsize, exact)
            arr = numpy_helper.to_array(tensor)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(self.path, f"cannot read initializer {name!r}: {error_line(e)}") from e
        return _to_torch(np.array(arr, copy=True))

    def _with_external_bytes(self, tensor, itemsize: int, exact: bool):
        """A copy of ``tensor`` holding its external bytes inline. Read here rather than by onnx, which refuses
        any symlink, while a Hugging Face cache snapshot is made of symlinks into ``../../blobs/``."""
        target, offset, length = self._external_range(tensor, itemsize, exact)
        with open(target, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        inline = self._onnx.TensorProto()
        inline.CopyFrom(tensor)  # cheap: an external tensor holds no data
        del inline.external_data[:]
        inline.data_location = self._onnx.TensorProto.DEFAULT
        inline.raw_data = data
        return inline

    def _external_range(self, tensor, itemsize: int, exact: bool) -> tuple[Path, int, int]:
        """(file, offset, length) of an external tensor, after checking that the location names a file in the
        model's folder (no absolute path, no ``..``) that exists and is large enough, and that the length is
        no more than the tensor's shape needs (without one, that many bytes are read, not the rest of the file).

        The check is on the name, not on where a symlink leads: the location string comes from the model file
        (untrusted), a symlink in the folder was put there by whoever made the folder (the hub cache's blobs).
        """
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not isinstance(location, str):  # bytes that are not UTF-8, as protobuf gives them
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data location {location!r} "
                                             "is not UTF-8 (corrupt file)")
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data {location!r} "
                                             "lies outside the model's folder (refused)")
        target = self.path.parent / location
        if not target.is_file():
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data file "
                                             f"{location!r} is {'not a file' if target.exists() else 'missing'}")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            offset = length = -1
        if offset < 0 or (length is not None and length < 0):
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data offset "
                                             f"{info.get('offset')!r} / length {info.get('length')!r} are not "
                                             "non-negative integers")
        needed = math.prod(tensor.dims) * itemsize  # packed 2/4/6-bit types: an upper bound
        if length is not None and (length > needed or exact and length != needed):
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data length {length} does not "
                                             f"match its shape {list(tensor.dims)} ({needed} bytes)")
        size = target.stat().st_size
        end = offset + (length if length is not None else needed if exact else 0)
        if end > size:
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data file "
                                             f"{location!r} is truncated: it needs bytes {offset}..{end} but has {size}")
        return target, offset, min(needed, size - offset) if length is None else length


def is_onnx(path: Path) -> bool:
    return path.is_file() and path.suffix == ".onnx"


register_format("onnx", is_onnx, OnnxCheckpoint)
