"""GGUF files (llama.cpp, ``.gguf``): F16 and BF16 tensors in their own dtype, the others (F64 and the
block-quantized types) as float32 (extra ``gguf``).

``gguf.GGUFReader`` memory-maps the file and parses the tensor table; a tensor's bytes are only touched when
it is read, then dequantized with ``gguf.quants.dequantize`` (F16, BF16 and every block-quantized type the
package knows: Q8_0, Q4_K, ...). GGUF lists dimensions fastest-varying first (ggml order), the reverse of
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
from modelatlas.weights.registry import register_format

_INT_TYPES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}
_FLOAT_TYPES = {"F16": "float16", "BF16": "bfloat16"}
_STORED = {**_INT_TYPES, **_FLOAT_TYPES}  # ggml type -> the dtype reported and read; others: float32


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
        self._tensors: dict | None = None
        self._state()  # parse now, so a corrupt file is reported when opened

    def _state(self) -> dict:
        """Name -> gguf ReaderTensor, parsing the file (again, after close()) when needed."""
        if self._tensors is None:
            gguf = import_gguf(self.path)
            try:
                reader = gguf.GGUFReader(str(self.path))
            except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on a corrupt file
                raise CheckpointError(self.path, f"corrupt or truncated GGUF file: {error_line(e)}") from e
            # Every ReaderTensor's data is a view of the reader's np.memmap: holding them holds the mapping.
            self._tensors = {t.name: t for t in reader.tensors}
        return self._tensors

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(n, self._shape(t), _STORED.get(t.tensor_type.name, "float32"))
                for n, t in self._state().items()]

    @staticmethod
    def _shape(t) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml order -> numpy order

    def _read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._state()[name]
        shape = self._shape(t)
        try:
            if t.tensor_type.name in _INT_TYPES or t.tensor_type.name == "F16":
                arr = np.asarray(t.data).reshape(shape)
            elif t.tensor_type.name == "F64":  # plain doubles, which gguf.quants.dequantize does not take
                arr = np.asarray(t.data).astype(np.float32).reshape(shape)
            else:  # F32, BF16 and the block-quantized types: dequantized to float32
                arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise CheckpointError(self.path, f"cannot read tensor {name!r} ({t.tensor_type.name}): {error_line(e)}") from e
        out = torch.from_numpy(np.array(arr, copy=True))  # a copy: returned tensors never pin the mapping
        return out.to(torch.bfloat16) if t.tensor_type.name == "BF16" else out  # exact: the values are bfloat16

    def close(self) -> None:
        """Drop the reader's tensor views, the only references to its memory map, so the file is unmapped
        (np.memmap has no close of its own; the mapping goes with its last view). Reads after this reopen."""
        self._tensors = None


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


register_format("gguf", is_gguf, GGUFCheckpoint)
