"""ONNX models (``.onnx``): the graph's initializers are the tensors (extra ``onnx``).

The protobuf is parsed once without external data; a tensor stored in an external data file is read from
that file when asked for. Initializers stored inline live in the protobuf, so an inline model is held in
memory while open (ONNX cannot parse lazily); large models use external data, which is read per tensor.
External files must be named inside the model's folder (a location that leaves it, such as ``../../etc/passwd``
or an absolute path, is refused); a file there may be a symlink, as in a Hugging Face cache snapshot.
``onnx`` is imported inside the reader, so modelatlas works without it until an ``.onnx`` file is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line
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
_BITS_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.name in _BITS_DTYPES:
        return torch.from_numpy(arr.view(f"uint{8 * arr.dtype.itemsize}")).view(getattr(torch, arr.dtype.name))
    return torch.from_numpy(arr)


def _torch_dtype_name(onnx, elem_type: int) -> str:
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        return str(_to_torch(np.empty(0, dtype=np_dtype)).dtype).removeprefix("torch.")
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


class OnnxCheckpoint(Checkpoint):
    """An ``.onnx`` file's initializers, read one at a time."""

    format = "onnx"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name)
        self._onnx = import_onnx(self.path)
        try:
            model = self._onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError on corrupt input
            raise CheckpointError(self.path, f"corrupt ONNX file: {error_line(e)}") from e
        self._init = {t.name: t for t in model.graph.initializer}

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(int(d) for d in t.dims), _torch_dtype_name(self._onnx, t.data_type))
                for n, t in self._init.items()]

    def _read(self, name: str) -> torch.Tensor:
        from onnx import numpy_helper

        tensor = self._init[name]
        try:
            if tensor.data_location == self._onnx.TensorProto.EXTERNAL:
                tensor = self._with_external_bytes(tensor)
            arr = numpy_helper.to_array(tensor)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(self.path, f"cannot read initializer {name!r}: {error_line(e)}") from e
        return _to_torch(np.array(arr, copy=True))

    def _with_external_bytes(self, tensor):
        """A copy of ``tensor`` holding its external bytes inline. Read here rather than by onnx, which refuses
        any symlink, while a Hugging Face cache snapshot is made of symlinks into ``../../blobs/``."""
        target, offset, length = self._external_range(tensor)
        with open(target, "rb") as f:
            f.seek(offset)
            data = f.read(length) if length is not None else f.read()
        inline = self._onnx.TensorProto()
        inline.CopyFrom(tensor)  # cheap: an external tensor holds no data
        del inline.external_data[:]
        inline.data_location = self._onnx.TensorProto.DEFAULT
        inline.raw_data = data
        return inline

    def _external_range(self, tensor) -> tuple[Path, int, int | None]:
        """(file, offset, length) of an external tensor, after checking that the location names a file in the
        model's folder (no absolute path, no ``..``) that exists and is large enough.

        The check is on the name, not on where a symlink leads: the location string comes from the model file
        (untrusted), a symlink in the folder was put there by whoever made the folder (the hub cache's blobs).
        """
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data {location!r} "
                                             "lies outside the model's folder (refused)")
        target = self.path.parent / location
        if not target.is_file():
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data file "
                                             f"{location!r} is missing")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            offset = length = -1
        if offset < 0 or (length is not None and length < 0):
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data offset "
                                             f"{info.get('offset')!r} / length {info.get('length')!r} are not "
                                             "non-negative integers")
        if offset + (length or 0) > target.stat().st_size:
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data file "
                                             f"{location!r} is truncated")
        return target, offset, length


def is_onnx(path: Path) -> bool:
    return path.is_file() and path.suffix == ".onnx"


register_format("onnx", is_onnx, OnnxCheckpoint)
