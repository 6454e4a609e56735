"""IDX files (the MNIST / Fashion-MNIST format) and the ``fashion-mnist`` dataset.

IDX layout (big-endian): two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``d``,
``d`` uint32 sizes, then the data in C order. Files may be gzip-compressed (``.gz``). The header is
validated against the file size so a truncated or foreign file fails with a one-line error naming it.
Reading is O(file size) time and memory.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from modelatlas.data.registry import ArrayDataset, register_dataset
from modelatlas.errors import CheckpointError, DatasetNotFoundError

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DEFAULT_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class IDXError(CheckpointError):
    """An IDX file is malformed (bad magic, dtype code or size); the message names the file."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip or raw, chosen by the magic bytes) into a NumPy array of its native shape.
    A gzip stream is inflated no further than its header says (a small file claiming a few bytes can inflate
    to gigabytes)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return _parse(path, io.BytesIO(raw))
    try:
        return _parse(path, gzip.GzipFile(fileobj=io.BytesIO(raw)))
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
        raise IDXError(path, f"corrupt gzip stream ({e})") from None


def _parse(path: Path, stream: io.RawIOBase) -> np.ndarray:
    """The array in an IDX ``stream``, read no further than its header's size plus one byte."""
    head = stream.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IDXError(path, "not an IDX file (magic bytes must start with two zero bytes)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise IDXError(path, f"unknown IDX data type code 0x{code:02x}")
    if ndim == 0:  # was reported as 'truncated header (4 bytes for 0 dimensions)'
        raise IDXError(path, "the header declares 0 dimensions (an IDX array has at least 1)")
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise IDXError(path, f"truncated header ({4 + len(dims)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: np.prod wraps at 2**64 (65536**4 -> 0)
    data = _read_at_most(stream, expected + 1)  # one byte more tells a longer file
    if len(data) != expected:
        has = len(data) if len(data) < expected else "more"
        raise IDXError(path, f"header says shape {shape} ({expected} data bytes) but the file has {has}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _read_at_most(stream: io.RawIOBase, n: int, chunk: int = 1 << 24) -> bytearray:
    """Up to ``n`` bytes of ``stream``, in chunks: ``GzipFile.read(n)`` allocates ``n`` bytes at once (a header
    claiming 2**64 bytes raised MemoryError)."""
    out = bytearray()
    while len(out) < n:
        part = stream.read(min(chunk, n - len(out)))
        if not part:
            break
        out += part
    return out


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def _check_not_folder(root: Path, stem: str) -> None:
    """Refuse a folder under one of ``stem``'s names: it was reported as '<stem>[.gz] not found; install it'."""
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_dir():
            raise IDXError(root / name, "is a folder, not an IDX file; put the file itself there")


def load_idx_pair(images: str | Path, labels: str | Path, name: str, classes: list[str]) -> ArrayDataset:
    """An :class:`ArrayDataset` from an IDX image file (N, H, W) uint8 and a label file (N,)."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or 0 in x.shape[1:]:
        raise IDXError(images, f"expected images of shape (N, H, W) with H, W >= 1, got {x.shape}")
    if x.dtype != np.uint8:  # pixels are scaled by 1/255: other types would leave [0, 1] silently
        raise IDXError(images, f"expected uint8 pixels (IDX type code 0x08), got {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise IDXError(labels, f"expected {x.shape[0]} labels (as many as the images in {images}), got shape {y.shape}")
    if y.dtype.kind not in "iu":  # float labels would be truncated to classes silently
        raise IDXError(labels, f"expected integer labels, got {y.dtype}")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(classes):
        raise IDXError(labels, f"labels must be class indices 0..{len(classes) - 1}, got {int(y.min())}..{int(y.max())}")
    xt = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, H, W)
    return ArrayDataset(name, xt, torch.from_numpy(y.astype(np.int64)), list(classes), {"source": str(images)})


def _load_fashion(split: str, root: str | Path | None = None) -> ArrayDataset:
    """Fashion-MNIST (60k train / 10k test, 28x28) from ``root``, $ATLAS_FASHION_MNIST or the Debian package."""
    folder = Path(root or os.environ.get("ATLAS_FASHION_MNIST") or DEFAULT_FASHION_ROOT).expanduser()  # "~/data"
    if folder.is_file():  # one of the files itself: "<file>/train-images-idx3-ubyte not found" hid that
        raise DatasetNotFoundError(f"fashion-mnist: {folder} is a file, not a folder; pass the folder that holds the "
                                   f"four IDX files ({folder.parent})")
    img_stem, lab_stem = _FILES[split]
    img, lab = _find(folder, img_stem), _find(folder, lab_stem)
    if img is None or lab is None:
        missing = img_stem if img is None else lab_stem
        _check_not_folder(folder, missing)
        named = " (the folder $ATLAS_FASHION_MNIST names)" if not root and os.environ.get("ATLAS_FASHION_MNIST") else ""
        raise DatasetNotFoundError(
            f"fashion-mnist: {folder / missing}[.gz] not found{named}; install it with "
            f"`sudo apt-get install dataset-fashion-mnist` or pass --data-root DIR (root=, or set ATLAS_FASHION_MNIST) "
            f"to a folder with the standard IDX files")
    return load_idx_pair(img, lab, "fashion-mnist", FASHION_CLASSES)


def _fashion_status() -> str:
    """"ready" when the default folder ($ATLAS_FASHION_MNIST or the Debian package's) holds all four files."""
    folder = Path(os.environ.get("ATLAS_FASHION_MNIST") or DEFAULT_FASHION_ROOT).expanduser()
    if all(_find(folder, stem) is not None for pair in _FILES.values() for stem in pair):
        return "ready"
    return f"missing in {folder}: sudo apt-get install dataset-fashion-mnist, or --data-root DIR (root=)"


register_dataset("fashion-mnist", _load_fashion,
                 "Fashion-MNIST 28x28 grayscale, 10 classes, 60k/10k (IDX files; apt-get install dataset-fashion-mnist)",
                 _fashion_status)
