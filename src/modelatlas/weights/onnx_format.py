"""ONNX models (``.onnx``): the graph's initializers are the tensors (extra ``onnx``).

The protobuf is parsed once without external data; a tensor stored in an external data file is read from
that file when asked for. Initializers stored inline live in the protobuf, so an inline model is held in
memory while open (ONNX cannot parse lazily); large models use external data, which is read per tensor. External files must lie in the model's folder (a location that leaves it, such as
``../../etc/passwd``, is refused). ``onnx`` is imported inside the reader, so modelatlas works without it
until an ``.onnx`` file is opened.
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
        self._check_external(tensor)
        try:
            arr = numpy_helper.to_array(tensor, base_dir=str(self.path.parent))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(self.path, f"cannot read initializer {name!r}: {error_line(e)}") from e
        return _to_torch(np.array(arr, copy=True))

    def _check_external(self, tensor) -> None:
        """External data must be a readable file in the model's folder, large enough for the tensor."""
        if tensor.data_location != self._onnx.TensorProto.EXTERNAL:
            return
        info = {e.key: e.value for e in tensor.external_data}
        folder = self.path.parent.resolve()
        target = (folder / info.get("location", "")).resolve()
        if target.parent != folder and folder not in target.parents:
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data {info.get('location')!r} "
                                             "lies outside the model's folder (refused)")
        if not target.is_file():
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data file "
                                             f"{info.get('location')!r} is missing")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise CheckpointError(self.path, f"initializer {tensor.name!r}: external data file "
                                             f"{info.get('location')!r} is truncated")


def is_onnx(path: Path) -> bool:
    return path.is_file() and path.suffix == ".onnx"


register_format("onnx", is_onnx, OnnxCheckpoint)
