"""CIFAR-10 / CIFAR-100 in the "python version" format, read through a restricted unpickler.

The official batches are pickles. An ordinary ``pickle.load`` would run any code a tampered file names, so
:class:`RestrictedUnpickler` admits only plain containers, str/bytes/int/float and NumPy arrays rebuilt from
(dtype, shape, bytes): the allowlisted globals are exactly ``numpy.core.multiarray._reconstruct`` (and its
NumPy 2 name ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``. Any other
global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafeCheckpointError` naming the file and the
refused global before anything is called; object arrays are refused too. O(file size) time and memory.

Folders: CIFAR-10 ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``);
CIFAR-100 ``cifar-100-python/`` (``train``, ``test``, ``meta``). Pass ``root=`` (the folder itself or its
parent) or set ``$ATLAS_CIFAR10`` / ``$ATLAS_CIFAR100``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from modelatlas.data.registry import ArrayDataset, register_dataset
from modelatlas.errors import CheckpointError, DatasetNotFoundError, UnsafeCheckpointError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only the NumPy array globals in ``_ALLOWED``."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UnsafeCheckpointError(self._path, f"refused global {module}.{name} (only NumPy arrays and "
                                                    "plain containers are allowed in a CIFAR batch)")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(self._path, "refused persistent id in a CIFAR batch")


def safe_unpickle(path: str | Path) -> object:
    """Load a pickle admitting only plain data and NumPy arrays; raises on anything else."""
    path = Path(path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(path, f"not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    _check_plain(obj, path)
    return obj


def _check_plain(obj: object, path: Path) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, path)
            _check_plain(v, path)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, path)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafeCheckpointError(path, "refused object-dtype array in a CIFAR batch")
    elif not isinstance(obj, (str, bytes, int, float, bool, type(None))):
        raise UnsafeCheckpointError(path, f"refused value of type {type(obj).__name__}")


def _get(d: dict, key: str):
    return d[key.encode()] if key.encode() in d else d[key]


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    if not isinstance(d, dict):
        raise CheckpointError(path, "a CIFAR batch must be a dict with 'data' and labels")
    try:
        data, labels = np.asarray(_get(d, "data")), np.asarray(_get(d, label_key), dtype=np.int64)
    except KeyError as e:
        raise CheckpointError(path, f"missing key {e.args[0]!r} in CIFAR batch") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise CheckpointError(path, f"expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data, labels


def _resolve(root: str | Path | None, env: str, sub: str, name: str) -> Path:
    folder = Path(root or os.environ.get(env, "") or ".")
    if (folder / sub).is_dir():
        folder = folder / sub
    if root is None and not os.environ.get(env):
        raise DatasetNotFoundError(f"{name}: no folder given; pass root= (the {sub}/ folder from the official "
                                   f"python-version archive) or set ${env}")
    return folder


def load_cifar(split: str, root: str | Path | None = None, num_classes: int = 10) -> ArrayDataset:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (100, fine labels) as (N, 3, 32, 32) float32 in [0, 1]."""
    if num_classes == 10:
        folder = _resolve(root, "ATLAS_CIFAR10", "cifar-10-batches-py", "cifar10")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        folder = _resolve(root, "ATLAS_CIFAR100", "cifar-100-python", "cifar100")
        files, meta_file, label_key, names_key = [split], "meta", "fine_labels", "fine_label_names"
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(f"cifar{num_classes}: {folder / missing[0]} not found; pass root= to the "
                                   "folder of the official python-version batches")
    parts = [_batch_arrays(folder / f, label_key) for f in files]
    data = np.concatenate([p[0] for p in parts])  # (N, 3072) uint8, channel-major
    labels = np.concatenate([p[1] for p in parts])
    classes = [str(i) for i in range(num_classes)]
    if (folder / meta_file).is_file():
        meta = safe_unpickle(folder / meta_file)
        if isinstance(meta, dict):
            raw = _get(meta, names_key) if (names_key.encode() in meta or names_key in meta) else None
            if raw is not None and len(raw) == num_classes:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    x = torch.from_numpy(data.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)  # (N, 3, 32, 32)
    return ArrayDataset(f"cifar{num_classes}", x, torch.from_numpy(labels), classes, {"source": str(folder)})


def _load_cifar100(split: str, root: str | Path | None = None) -> ArrayDataset:
    return load_cifar(split, root, num_classes=100)


register_dataset("cifar10", load_cifar, "CIFAR-10 python-format batches (root=, restricted unpickler)")
register_dataset("cifar100", _load_cifar100, "CIFAR-100 python-format batches, fine labels (root=, restricted unpickler)")
