"""CIFAR-10 / CIFAR-100 in the "python version" format, read through a restricted unpickler.

The official batches are pickles. An ordinary ``pickle.load`` would run any code a tampered file names, so
:class:`RestrictedUnpickler` admits only plain containers, str/bytes/int/float and NumPy arrays rebuilt from
(dtype, shape, bytes): the allowlisted globals are exactly ``numpy.core.multiarray._reconstruct`` (and its
NumPy 2 name ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``. Any other
global (``os.system``, ``builtins.eval``, ...) raises :class:`UnsafeCheckpointError` naming the file and the
refused global before anything is called; object arrays are refused too. The three NumPy names resolve to
stand-ins, never to NumPy's own ``__setstate__`` (which trusts its input: a crafted dtype state crashes the
interpreter); the stand-ins' (dtype, shape, bytes) are checked, then made arrays with ``np.frombuffer``.
Protocol 2 (bytes written as ``_codecs.encode(str, 'latin1')``) and protocol 5 (arrays written through
NumPy's ``_frombuffer(buf, dtype, shape, order)``) load through stand-ins for those two globals as well,
admitting exactly those calls.
Shared references are walked once, and a file whose references would expand far beyond its size (nested
shared lists: 2**depth values from a few hundred bytes) is refused. O(file size) time and memory.

Folders: CIFAR-10 ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``);
CIFAR-100 ``cifar-100-python/`` (``train``, ``test``, ``meta``). Pass ``root=`` (the folder itself or its
parent) or set ``$ATLAS_CIFAR10`` / ``$ATLAS_CIFAR100``.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import torch

from modelatlas.data.registry import ArrayDataset, register_dataset
from modelatlas.errors import CheckpointError, ConfigError, DatasetNotFoundError, UnsafeCheckpointError


class _Dtype:
    """Stands in for ``numpy.dtype`` while unpickling: keeps the type code and the state for :func:`_dtype`."""

    code: object = None
    state: object = None

    def __init__(self, code: object = None, *args: object):
        self.code = code

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Array:
    """Stands in for ``_reconstruct(numpy.ndarray, ...)``: keeps the state for :func:`_array`."""

    state: object = None

    def __init__(self, subtype: object = None, *args: object):
        if subtype is not _NDARRAY:
            raise TypeError("_reconstruct is only allowed for numpy.ndarray")

    def __setstate__(self, state: object) -> None:
        self.state = state


_NDARRAY = object()  # what the global numpy.ndarray resolves to: only a marker for _reconstruct
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
}


class _Buffered:
    """Stands in for NumPy's ``_frombuffer(buf, dtype, shape, order)`` (protocol 5 arrays): the array is built
    here from the checked arguments, and kept in a stand-in rather than returned, so that no BUILD opcode
    of a crafted file ever reaches ``ndarray.__setstate__``."""

    def __init__(self, path: Path, buf: object, dtype: object, shape: object, order: object):
        if not isinstance(dtype, _Dtype) or order not in ("C", "F") or not isinstance(buf, (bytes, bytearray)):
            raise UnsafeCheckpointError(path, f"refused _frombuffer arguments (buffer of {type(buf).__name__}, "
                                              f"dtype {type(dtype).__name__}, order {order!r}) in a CIFAR batch")
        dt = _dtype(dtype, path)
        if (not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)
                or len(buf) != math.prod(shape) * dt.itemsize):
            raise CheckpointError(path, f"corrupt array in a CIFAR batch: shape {shape!r} of {dt} does not match "
                                        f"its {len(buf)} bytes of data")
        self.path = path
        self.array = np.frombuffer(buf, dt).reshape(shape, order=order).copy(order="K")  # shape as saved

    def __setstate__(self, state: object) -> None:
        raise UnsafeCheckpointError(self.path, "refused state for an array rebuilt by _frombuffer")


def _latin1_encode(path: Path, text: object = None, encoding: object = None) -> bytes:
    """Stands in for ``_codecs.encode``, which Python 3 pickles bytes through at protocol 2 as
    ``encode(str, 'latin1')``: exactly that call, and nothing else, gives the bytes back."""
    if not isinstance(text, str) or encoding != "latin1" or max(text, default="\0") > "\xff":
        raise UnsafeCheckpointError(path, f"refused _codecs.encode({type(text).__name__}, {encoding!r}) in a CIFAR "
                                          "batch (only a latin-1 str to bytes, as pickle protocol 2 writes bytes)")
    return text.encode("latin1")


def _empty_bytes(path: Path, *args: object) -> bytes:
    """Stands in for ``bytes``, which protocol 2 calls with no argument for an empty ``b''`` (any other bytes
    go through ``_codecs.encode``): exactly that call, nothing else."""
    if args:
        raise UnsafeCheckpointError(path, f"refused bytes() of {len(args)} argument(s) in a CIFAR batch (only "
                                          "bytes() with none, as pickle protocol 2 writes b'')")
    return b""


# Globals another pickle protocol brings in for plain data, each mapped to a checked stand-in taking the path
# first: protocol 2 writes bytes through _codecs.encode (b'' as bytes()), protocol 5 (pickle.HIGHEST_PROTOCOL)
# arrays through NumPy's _frombuffer. The real callables are never reached.
_PROTOCOL_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("numpy._core.numeric", "_frombuffer"): _Buffered,
    ("numpy.core.numeric", "_frombuffer"): _Buffered,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only the NumPy array globals in ``_ALLOWED`` and the
    protocol 2/5 globals in ``_PROTOCOL_GLOBALS`` (as stand-ins)."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _PROTOCOL_GLOBALS:  # a batch the user saved with protocol 2 or 5
            return functools.partial(_PROTOCOL_GLOBALS[module, name], self._path)
        if (module, name) not in _ALLOWED:
            raise UnsafeCheckpointError(self._path, f"refused global {module}.{name} (only NumPy arrays and "
                                                    "plain containers are allowed in a CIFAR batch)")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(self._path, "refused persistent id in a CIFAR batch")


def safe_unpickle(path: str | Path) -> object:
    """Load a pickle admitting only plain data and NumPy arrays; raises on anything else."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        _check_sizes(raw, path)
        return _Walker(path, 2 * len(raw) + 1024).plain(RestrictedUnpickler(io.BytesIO(raw), path).load())
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OverflowError, IndexError,
            RecursionError) as e:  # OverflowError: an absurd length; IndexError: SETITEM on a list
        raise CheckpointError(path, f"not a readable CIFAR batch ({type(e).__name__}: {e})") from None


def _check_sizes(raw: bytes, path: Path) -> None:
    """Walk the opcodes (no object is built) so that a length or memo index the file cannot hold is refused
    before the C unpickler allocates it: BINBYTES8 of 2**40 bytes raised MemoryError, and LONG_BINPUT 2**31 - 1
    grows the memo to 2**32 slots (32 GB). :func:`pickletools.genops` raises ValueError for a length past
    the end; a memo index is at most the number of opcodes, so never above the file's size. O(file size)."""
    for op, arg, pos in pickletools.genops(raw):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > len(raw):
            raise CheckpointError(path, f"memo index {arg} at byte {pos} is past the end of the file "
                                        f"({len(raw)} bytes); not a CIFAR batch")


class _Walker:
    """Turns the unpickled tree into plain data (stand-ins made arrays; anything else refused), each object
    once: shared references (pickle memo gets) are looked up by ``id`` instead of walked again, which keeps
    a crafted file of nested shared lists linear instead of exponential. The tree as the caller would expand
    it is counted too and refused beyond ``budget`` nodes (a legitimate pickle spends at least a byte per
    node, so twice the file size never refuses one). O(file size) time and memory."""

    def __init__(self, path: Path, budget: int):
        self.path, self.budget, self.nodes = path, budget, 0
        self.memo: dict[int, tuple[object, int]] = {}  # id -> (plain value, expanded node count)
        self.active: set[int] = set()  # containers being walked: seeing one again is a cycle

    def plain(self, obj: object) -> object:
        key = id(obj)
        if key in self.memo:
            value, size = self.memo[key]
            self._spend(size)
            return value
        if key in self.active:
            raise CheckpointError(self.path, "a container contains itself (not a CIFAR batch)")
        self.active.add(key)
        start = self.nodes
        self._spend(1)
        value = self._convert(obj)
        self.active.discard(key)
        self.memo[key] = (value, self.nodes - start)
        return value

    def _spend(self, n: int) -> None:
        self.nodes += n
        if self.nodes > self.budget:
            raise CheckpointError(self.path, f"shared references expand to over {self.budget} values, far more "
                                             "than the file holds (a crafted pickle); refused")

    def _convert(self, obj: object) -> object:
        if isinstance(obj, dict):
            return {self.plain(k): self.plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.plain(v) for v in obj)
        if isinstance(obj, _Array):
            return _array(obj, self.path)
        if isinstance(obj, _Buffered):
            return obj.array
        if not isinstance(obj, (str, bytes, int, float, bool, type(None))):
            raise UnsafeCheckpointError(self.path, f"refused value of type {type(obj).__name__}")
        return obj


def _text(v: object) -> object:
    return v.decode("latin-1") if isinstance(v, bytes) else v  # encoding="bytes" leaves Python 2 str as bytes


def _dtype(d: _Dtype, path: Path) -> np.dtype:
    """The plain bool/int/float dtype a stand-in names; structured, subarray and object dtypes are refused."""
    state = d.state if d.state is not None else (3, "|")
    order = _text(state[1]) if isinstance(state, tuple) and len(state) > 1 else None
    try:
        dt = np.dtype(_text(d.code))
    except (TypeError, ValueError):
        dt = None
    rest = state[2:] if isinstance(state, tuple) else [state]
    if (dt is None or dt.kind not in "biuf" or dt.shape != () or order not in ("|", "<", ">", "=")
            or not all(v is None or isinstance(v, int) for v in rest)):
        raise UnsafeCheckpointError(path, f"refused dtype {d.code!r} with state {state!r} in a CIFAR batch "
                                          "(only plain numeric arrays are allowed)")
    return dt.newbyteorder(order) if order in ("<", ">") else dt


def _array(a: _Array, path: Path) -> np.ndarray:
    """The array a stand-in describes, once its shape and byte count agree with its dtype."""
    state = a.state[1:] if isinstance(a.state, tuple) and len(a.state) == 5 else a.state  # (version, ...)
    if not isinstance(state, tuple) or len(state) != 4 or not isinstance(state[1], _Dtype):
        raise UnsafeCheckpointError(path, "refused array state in a CIFAR batch")
    shape, dtype, fortran, raw = state
    dt = _dtype(dtype, path)
    if (not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dt.itemsize):
        raise CheckpointError(path, f"corrupt array in a CIFAR batch: shape {shape!r} of {dt} does not match "
                                    f"its data")
    return np.frombuffer(raw, dt).reshape(shape, order="F" if fortran else "C").copy(order="K")


def _get(d: dict, key: str):
    return d[key.encode()] if key.encode() in d else d[key]


def _batch_arrays(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    if not isinstance(d, dict):
        raise CheckpointError(path, "a CIFAR batch must be a dict with 'data' and labels")
    try:
        raw_data, raw_labels = _get(d, "data"), _get(d, label_key)
    except KeyError as e:
        raise CheckpointError(path, f"missing key {_text(e.args[0])!r} in CIFAR batch") from None
    data, labels = _pixels(raw_data, path), _labels(raw_labels, path, label_key, num_classes)
    if data.shape[0] != labels.shape[0]:
        raise CheckpointError(path, f"expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data, labels


def _pixels(raw: object, path: Path) -> np.ndarray:
    """Key 'data' as an (N, 3072) uint8 array: integer pixel values 0-255, 32 x 32 x 3 per row."""
    try:
        data = np.asarray(raw)
    except ValueError:  # a ragged list
        raise CheckpointError(path, "key 'data' is not a rectangular (N, 3072) array") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise CheckpointError(path, f"key 'data' must have shape (N, 3072) (32 x 32 x 3 pixels per row), "
                                    f"got {data.shape}")
    if data.size and data.dtype.kind not in "iu":
        raise CheckpointError(path, f"key 'data' must hold integer pixel values 0-255, got dtype {data.dtype}")
    if data.size and (int(data.min()) < 0 or int(data.max()) > 255):
        raise CheckpointError(path, f"key 'data' has pixel values {int(data.min())}..{int(data.max())}; "
                                    "CIFAR pixels are integers 0-255")
    return data.astype(np.uint8)


def _labels(raw: object, path: Path, key: str, num_classes: int) -> np.ndarray:
    """Key ``key`` as an (N,) int64 array of class indices in [0, num_classes)."""
    try:
        labels = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    except ValueError:  # a ragged list
        labels = None
    if labels is not None and labels.size == 0:
        labels = labels.reshape(0).astype(np.int64)
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        got = type(raw).__name__ if labels is None else f"shape {labels.shape} of {labels.dtype}"
        raise CheckpointError(path, f"key {key!r} must be a flat list of integer class indices, got {got}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise CheckpointError(path, f"key {key!r} has label {bad}, outside 0..{num_classes - 1}")
    return labels.astype(np.int64)


def _resolve(root: str | Path | None, env: str, sub: str, name: str) -> Path:
    folder = Path(root or os.environ.get(env, "") or ".").expanduser()  # "~/data": not a folder named ~
    if (folder / sub).is_dir():
        folder = folder / sub
    if root is None and not os.environ.get(env):
        raise DatasetNotFoundError(f"{name}: no folder given; pass --data-root DIR (root=: the {sub}/ folder "
                                   f"from the official python-version archive) or set ${env}")
    if folder.is_file():  # the downloaded archive itself: "<archive>/data_batch_1 not found" hid that
        raise DatasetNotFoundError(f"{name}: {folder} is a file, not a folder; extract the archive (tar xzf) and pass "
                                   f"the folder it makes ({sub}/ or its parent)")
    return folder


def load_cifar(split: str, root: str | Path | None = None, num_classes: int = 10) -> ArrayDataset:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (100, fine labels) as (N, 3, 32, 32) float32 in [0, 1]."""
    if num_classes not in (10, 100):
        raise ConfigError(f"num_classes={num_classes!r}: CIFAR has 10 (CIFAR-10) or 100 (CIFAR-100) classes")
    env = f"ATLAS_CIFAR{num_classes}"
    if num_classes == 10:
        folder = _resolve(root, env, "cifar-10-batches-py", "cifar10")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        folder = _resolve(root, env, "cifar-100-python", "cifar100")
        files, meta_file, label_key, names_key = [split], "meta", "fine_labels", "fine_label_names"
    for f in [*files, meta_file]:  # a folder was "not found" (a batch) or gave classes "0".."K-1" (the meta file)
        if (folder / f).is_dir():
            raise CheckpointError(folder / f, "is a folder, not a file of CIFAR batches")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _not_found(folder, files, missing, num_classes, "" if root else f" (the folder ${env} names)")
    parts = [_batch_arrays(folder / f, label_key, num_classes) for f in files]
    data = np.concatenate([p[0] for p in parts])  # (N, 3072) uint8, channel-major
    labels = np.concatenate([p[1] for p in parts])
    classes = _class_names(folder / meta_file, names_key, num_classes)
    x = torch.from_numpy(data.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)  # (N, 3, 32, 32)
    return ArrayDataset(f"cifar{num_classes}", x, torch.from_numpy(labels), classes, {"source": str(folder)})


def _not_found(folder: Path, files: list[str], missing: list[str], num_classes: int, named: str) -> DatasetNotFoundError:
    """The error for a batch missing from ``folder``; a folder holding some of the batches (a user's own batch
    named data_batch_1) was told to pass --data-root to the folder it had been given."""
    head = f"cifar{num_classes}: {folder / missing[0]} not found{named}"
    if len(missing) == len(files):
        return DatasetNotFoundError(f"{head}; pass --data-root DIR (root=) to the folder of the official python-version batches")
    return DatasetNotFoundError(f"{head}: the folder holds {len(files) - len(missing)} of the {len(files)} training batches "
                                f"({', '.join(files)}), and CIFAR-{num_classes} needs them all; for batches of your own, "
                                "read each with modelatlas.data.cifar.safe_unpickle into an ArrayDataset (docs/data.md)")


def _class_names(path: Path, key: str, num_classes: int) -> list[str]:
    """The class names in the meta file ``path`` (key ``key``); "0".."K-1" without the file or the key."""
    meta = safe_unpickle(path) if path.is_file() else None
    raw = _get(meta, key) if isinstance(meta, dict) and (key.encode() in meta or key in meta) else None
    if raw is None:
        return [str(i) for i in range(num_classes)]
    if not (isinstance(raw, (list, tuple)) and len(raw) == num_classes
            and all(isinstance(n, (str, bytes)) for n in raw)):
        size = f" of length {len(raw)}" if isinstance(raw, (list, tuple)) else ""
        raise CheckpointError(path, f"key {key!r} must be a list of {num_classes} class names, got "
                                    f"{type(raw).__name__}{size}")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in raw]


def _load_cifar10(split: str, root: str | Path | None = None) -> ArrayDataset:
    return load_cifar(split, root, num_classes=10)  # not load_cifar itself: num_classes=100 made it CIFAR-100


def _load_cifar100(split: str, root: str | Path | None = None) -> ArrayDataset:
    return load_cifar(split, root, num_classes=100)


register_dataset("cifar10", _load_cifar10, "CIFAR-10 python-format batches (root=, restricted unpickler)",
                 lambda: "needs its folder: --data-root DIR (root= in Python)")
register_dataset("cifar100", _load_cifar100, "CIFAR-100 python-format batches, fine labels (root=, restricted unpickler)",
                 lambda: "needs its folder: --data-root DIR (root= in Python)")
