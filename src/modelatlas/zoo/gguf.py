"""GGUF files of a model's tensors, written with llama.cpp's ``gguf`` package (the ``gguf`` extra): quantized
copies of models whose source is known, for tests and benchmarks of lineage on GGUF files
(``tests/weights``, ``tests/lineage``, ``bench/lineage_quantized.py``). The reader is
:mod:`modelatlas.weights.gguf_format`. Quantizing uses ``gguf.quants.quantize`` (ggml's reference rounding:
the legacy types Q8_0, Q4_0, ...; llama-quantize's searched K-quant scales are not reproduced). Time O(P) for
P weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def quantized(x, kind: str) -> tuple[np.ndarray, str]:
    """``x`` (a float array or tensor, rows a multiple of the type's block) quantized to ``kind``: (raw blocks,
    kind), as :func:`save_gguf` takes a quantized tensor."""
    import gguf

    values = x.float().numpy() if hasattr(x, "numpy") else np.asarray(x, dtype=np.float32)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]), kind


def save_gguf(path: str | Path, tensors: dict, imatrix: bool = False, arch: str = "llama"):
    """Write ``tensors`` (name -> float array, stored as it is, or (raw blocks, type name) from
    :func:`quantized`) as the GGUF file ``path`` of architecture ``arch``; ``imatrix``: with the metadata
    llama-quantize writes when it used an importance matrix. Returns ``path``."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    if imatrix:
        w.add_string("quantize.imatrix.file", "model.imatrix")
        w.add_string("quantize.imatrix.dataset", "calibration.txt")
        w.add_int32("quantize.imatrix.entries_count", 7)
        w.add_int32("quantize.imatrix.chunks_count", 100)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_shape=t[0].shape, raw_dtype=gguf.GGMLQuantizationType[t[1]])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
