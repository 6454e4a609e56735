"""PyTorch state dicts saved with ``torch.save`` (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

Security: a pickle can run any code when loaded, so these files are only ever read with
``torch.load(path, map_location="cpu", weights_only=True, mmap=...)``: PyTorch's restricted unpickler, which
accepts tensors, containers and a short allowlist of globals. A file that needs anything else (a
``__reduce__`` calling ``os.system``, a pickled ``nn.Module`` or optimizer class) is refused with
:class:`~modelatlas.errors.UnsafeCheckpointError` before any of its code runs. With torch >= 2.6, the load also
admits the value classes Lightning's ``save_hyperparameters()`` commonly stores (:func:`admitted_globals`: pathlib
paths, ``argparse.Namespace``), only while our loads run.

Memory: files in the zip format (the default since PyTorch 1.6) are memory-mapped (``mmap=True``), so the
tensors stay on disk until :meth:`read` copies one out (each read returns a copy the caller owns). Legacy
(non-zip) pickles cannot be memory-mapped and are loaded into RAM once, when opened.

A training checkpoint that nests the state dict under ``"model_state_dict"`` (the PyTorch tutorial's
``{"epoch", "model_state_dict", "optimizer_state_dict"}``), ``"state_dict"`` (PyTorch Lightning) or
``"model"`` is unwrapped to it; otherwise top-level optimizer, scheduler and grad-scaler state (dicts under keys
naming ``optim``, ``sched`` or ``scaler``) is dropped: Adam moments are not weights. A prefix every tensor name shares
from a wrapper (``module.`` of DistributedDataParallel / DataParallel, ``_orig_mod.`` of ``torch.compile``) is
stripped, so a wrapped save of a model lists the same tensor names as a plain one. Nested dicts of tensors are
flattened with ``.``-joined keys and non-tensor entries (an epoch counter) are skipped.

A PyTorch Lightning checkpoint (:func:`is_lightning`) stores its LightningModule's state dict, so a network kept
as an attribute (``self.model = net``) is saved as ``model.<name>``, where ``torch.save(net.state_dict())`` writes
``<name>``. When every name of such a file shares one first component, it is stripped too, so that the fine-tune
lines up with a plain save of its base. Only there: ``model.layers.0...`` in a transformers checkpoint is a real
name. A module of two networks (``encoder.*``, ``decoder.*``) keeps its names. What was stripped is the
checkpoint's ``name_prefix``.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import pickle
import re
import struct
import threading
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import (
    Checkpoint,
    TensorInfo,
    error_line,
    lfs_pointer_reason,
    misnamed_reason,
    shared_first_component,
    utf8_path,
)
from modelatlas.weights.registry import register_format
from modelatlas.weights.torch_legacy import legacy_storage_problem
from modelatlas.weights.torch_refusals import LIGHTNING_VERSION, no_pickle, pickle_head, unpickling_error

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_NESTING_KEYS = ("model_state_dict", "state_dict", "model")  # where training checkpoints keep the weights
_TRAINING_STATE = re.compile(r"optim|sched|scaler", re.IGNORECASE)  # top-level keys of non-weight state
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
# Top-level keys only Lightning's Trainer writes beside "state_dict". Not "epoch": pytorch/examples' ImageNet
# script saves {"epoch", "arch", "state_dict", "best_acc1", "optimizer"} of a plain model, whose names are real.
_LIGHTNING_KEYS = ("global_step", "optimizer_states", "lr_schedulers", "callbacks", "loops")
_MAX_DEPTH = 32  # containers in a state dict nest a few levels (Lightning: 3-4)
_MAX_ITEMS = 2_000_000  # entries in all containers; a large model with optimizer state has ~100,000
# Bytes a tensor may claim beyond its storage's: a view that repeats stored values (stride 0, as an expanded
# buffer such as transformers' position_ids) reads as that many bytes; a pickle claiming 10^12 of them is a lie
_MAX_REPEATED = 64 * 2**20
_MINIZ_ADVICE = " This is an internal miniz error."  # "... If you are seeing this error, there is a high ..."


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict safely (``weights_only=True``); mmap'd when the file is in the zip format. Returns
    (name -> tensor, the prefix stripped from every stored name: ``""``, ``"module."``, a Lightning ``"model."``).

    Raises UnsafeCheckpointError for a pickle that would execute code, CheckpointError for anything else
    unreadable. Time O(number of tensors); memory O(1) tensor data for zip files, O(file) for legacy ones.
    """
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from e
    except zipfile.BadZipFile as e:  # is_zipfile passes on a zip64 record it refuses ("span multiple disks")
        raise CheckpointError(path, f"corrupt PyTorch zip file: {error_line(e)}") from e
    records = zip_records(path) if is_zip else _check_legacy(path)  # checked before torch unpacks anything
    try:
        with warnings.catch_warnings():  # torch warns about the file's pickle protocol: the error says what matters
            warnings.simplefilter("ignore", UserWarning)
            with utf8_path(path) as name, _admission:  # torch maps the file by a UTF-8 name
                obj = torch.load(name, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise unpickling_error(path, e, pickle_head(path, is_zip), None if is_zip else misnamed_reason(path, "PyTorch")) from e
    except OSError as e:
        raise CheckpointError(path, f"cannot read file: {e.strerror or e}") from e
    except Exception as e:  # on corrupt input the unpicklers raise RuntimeError, EOFError, IndexError, ...
        reason = error_line(e).partition(_MINIZ_ADVICE)[0]  # torch's paragraph of advice after the reason
        raise CheckpointError(path, no_pickle(path, is_zip) or f"corrupt or truncated PyTorch file: {reason}") from e
    _check_nesting(path, obj)
    if any(t.is_meta for t in _all_tensors(obj)):  # no bytes anywhere: read as "header lies about sizes"
        raise CheckpointError(path, "holds tensors on the meta device (shapes without values: a model saved before "
                                    "its weights were loaded); save it again after loading them")
    sparse = next((t for t in _all_tensors(obj) if t.layout != torch.strided), None)
    if sparse is not None:  # no storage of its own: the record check and every reader fail without naming it
        raise CheckpointError(path, f"holds a sparse tensor ({sparse.layout}, shape {tuple(sparse.shape)}), not "
                                    "dense weights; save it with .to_dense()")
    if records is not None:
        check_storage_records(path, obj, records)
    return _state_dict_from(path, obj)


def admitted_globals() -> list[tuple[type, str]]:
    """(class, pickled name) pairs the weights_only load admits beside torch's own allowlist: what Lightning's
    ``save_hyperparameters()`` stores for a data path or CLI args. Each is a plain value class: a path is rebuilt
    by calling its class on strings (``PurePath.__reduce__``: class + parts) and touches no file; a Namespace by
    ``object.__new__`` and a ``__dict__`` update (no ``__setstate__``), and what either holds must itself pass
    the same allowlist. Names: ``pathlib.X`` and, as Python 3.13 pickles them, ``pathlib._local.X``. The other
    system's concrete path (WindowsPath here, PosixPath on Windows) cannot be instantiated, so it loads as its pure
    flavour."""
    native = type(pathlib.Path())  # PosixPath or WindowsPath
    classes = {"PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath,
               "PosixPath": pathlib.PosixPath if native is pathlib.PosixPath else pathlib.PurePosixPath,
               "WindowsPath": pathlib.WindowsPath if native is pathlib.WindowsPath else pathlib.PureWindowsPath}
    paths = [(cls, f"{module}.{name}") for name, cls in classes.items() for module in ("pathlib", "pathlib._local")]
    return [*paths, (argparse.Namespace, "argparse.Namespace")]


class _SharedAdmission:
    """torch's ``safe_globals`` context for :func:`admitted_globals`, never ``add_safe_globals``: other loads in
    the process see them only while ours run. Entered by every load and shared by the loads that overlap (in
    threads): the first one in adds the pairs, the last one out removes them. One context per load let the
    first to end remove them under a load still running, which then refused its Path. Pairs the caller already
    added are left out, since leaving the context removes what it added. torch < 2.6 has no (class, name)
    pairs: nothing is admitted there."""

    def __init__(self):
        self._lock, self._loads, self._added = threading.Lock(), 0, contextlib.ExitStack()
        self._pairs = torch.__version__ >= (2, 6) and hasattr(torch.serialization, "safe_globals")

    def __enter__(self) -> None:
        with self._lock:
            if self._pairs and self._loads == 0:
                present = set(torch.serialization.get_safe_globals())
                admitted = [g for g in admitted_globals() if g not in present]
                self._added.enter_context(torch.serialization.safe_globals(admitted))
            self._loads += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._loads -= 1
            if self._loads == 0:
                self._added.close()  # removes what the first load added (nothing with torch < 2.6)


_admission = _SharedAdmission()


def _check_legacy(path: Path) -> None:
    """Refuse a legacy (not zip) file that is empty (the unpickler says only "EOFError"), a Git LFS pointer or a
    web page, or whose pickle claims a storage larger than the file (:mod:`.torch_legacy`): torch would allocate
    it before finding the file corrupt."""
    size = path.stat().st_size
    problem = lfs_pointer_reason(path) or ("corrupt or truncated PyTorch file: the file is empty (0 bytes)"
                                           if size == 0 else legacy_storage_problem(path, size))
    if problem:
        raise CheckpointError(path, problem)


def zip_records(path: Path) -> dict[int, tuple[str, int]]:
    """Data offset -> (name, size) of every tensor-storage record (``<archive>/data/<key>``) in the zip.

    Refuses a compressed record: torch.save writes every record stored (uncompressed), and torch unpacks a
    compressed ``data.pkl`` into memory whole, so a 1 MB file could claim gigabytes (a zip bomb). Time O(records).
    """
    records: dict[int, tuple[str, int]] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise CheckpointError(path, f"zip record {info.filename!r} is compressed or claims "
                                                f"{info.file_size} bytes for {info.compress_size} stored (torch.save "
                                                "stores records uncompressed; a packed one could unpack far beyond "
                                                "the file's size), refused")
                if "/data/" not in info.filename or info.filename.endswith("/"):
                    continue
                f.seek(info.header_offset)
                local = f.read(30)  # zip local file header: the data follows its name and extra field
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                records[info.header_offset + 30 + n_name + n_extra] = (info.filename, info.file_size)
    except (OSError, zipfile.BadZipFile, struct.error, UnicodeDecodeError, NotImplementedError) as e:  # a name
        # flagged UTF-8 that is not, a zip version over what zipfile reads
        raise CheckpointError(path, f"corrupt PyTorch zip file: {error_line(e)}") from e
    return records


def check_storage_records(path: Path, obj: object, records: dict[int, tuple[str, int]]) -> None:
    """Refuse a zip whose pickle claims more bytes for a storage than its record holds.

    With ``mmap=True`` torch does not check this itself: a lying header would read the bytes that follow the
    record (other records, the zip directory) as tensor data. Every mmap'd storage is a slice of one mapping
    of the file, so ``data_ptr - base`` is the record's data offset. Time O(tensors + records).
    """
    storages: dict[int, int] = {}
    for t in _all_tensors(obj):
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    if not storages:
        return
    base = min(storages) - min(records, default=0)
    for ptr, nbytes in storages.items():
        name, size = records.get(ptr - base, ("?", -1))
        if nbytes > size and nbytes > 0:
            where = f"record {name!r} holds {size} bytes" if size >= 0 else "no record starts there"
            raise CheckpointError(path, f"header lies about sizes: a tensor storage needs {nbytes} bytes but {where}")


def _all_tensors(obj: object):
    """Every tensor in a loaded object (dicts, lists, tuples); call after :func:`_check_nesting`."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (Mapping, list, tuple)):
        for v in obj.values() if isinstance(obj, Mapping) else obj:
            yield from _all_tensors(v)


def _check_nesting(path: Path, obj: object) -> None:
    """Refuse a loaded object that the recursive walks here (flatten, storage check) could not afford: containers
    nested deeper than _MAX_DEPTH (10,000 nested dicts are a few kB of pickle), or more than _MAX_ITEMS items
    counted along every path (pickle's memo can list one dict many times, and each listing doubles a flattened
    state dict's names). Iterative; time O(min(items, _MAX_ITEMS)), memory O(depth * width)."""
    stack, seen = [(obj, 0)], 0
    while stack:
        o, depth = stack.pop()
        if not isinstance(o, (Mapping, list, tuple)):
            continue
        if depth >= _MAX_DEPTH:
            raise CheckpointError(path, f"not a state dict: containers nested more than {_MAX_DEPTH} deep")
        seen += len(o)
        if seen > _MAX_ITEMS:
            raise CheckpointError(path, f"not a state dict: more than {_MAX_ITEMS:,} entries (counting a shared "
                                        "dict or list each time it is listed)")
        stack.extend((v, depth + 1) for v in (o.values() if isinstance(o, Mapping) else o))


def is_lightning(obj: Mapping) -> bool:
    """Whether a loaded top-level dict is a PyTorch Lightning Trainer checkpoint: it names its Lightning version,
    or holds ``"state_dict"`` beside a key only the Trainer writes (``global_step``, ``optimizer_states``, ...)."""
    return LIGHTNING_VERSION in obj or ("state_dict" in obj and any(k in obj for k in _LIGHTNING_KEYS))


def _state_dict_from(path: Path, obj: object) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the state dict out of what torch.load returned, flattened to name -> tensor; with the prefix
    stripped from every name (:func:`_unwrapped`)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"not a state dict: the file holds a {type(obj).__name__}, not a dict of tensors")
    if set(obj) == {"state", "param_groups"} and isinstance(obj["param_groups"], list):  # optimizer.state_dict()
        raise CheckpointError(path, "holds an optimizer's state (keys 'state' and 'param_groups': e.g. Adam's "
                                    "moments), not model weights; give the model's own file")
    key = next((k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping) and _has_tensor(obj[k])), None)
    lightning = key == "state_dict" and is_lightning(obj)
    if key is not None:
        obj = obj[key]
    else:
        obj = {k: v for k, v in obj.items()  # a tensor named like them ("scaler.weight" flattened) is a weight
               if isinstance(v, torch.Tensor) or not (isinstance(k, str) and _TRAINING_STATE.search(k))}
    flat: dict[str, torch.Tensor] = {}
    _flatten(path, obj, "", flat)
    if not flat:
        raise CheckpointError(path, "no tensors in this PyTorch file (not a state dict)")
    return _unwrapped(flat, lightning)


def _unwrapped(flat: dict[str, torch.Tensor], lightning: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """``flat`` without a wrapper prefix that every name shares (``module.module.`` too) and, for a Lightning
    checkpoint, without the one first component every name shares (the LightningModule's attribute holding the
    network; also under a wrapper: ``model._orig_mod.``); with the prefix stripped. Time O(tensors)."""
    stripped = ""
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if _all_under(flat, p)), None)
        if prefix is None and lightning:
            prefix, lightning = shared_first_component(flat), False  # one attribute, not its sub-modules
        if prefix is None:
            return flat, stripped
        flat = {k[len(prefix):]: v for k, v in flat.items()}
        stripped += prefix


def _all_under(flat: Mapping[str, torch.Tensor], prefix: str) -> bool:
    return all(k.startswith(prefix) and len(k) > len(prefix) for k in flat)


def _has_tensor(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _has_tensor(v)) for v in obj.values())


def _flatten(path: Path, obj: Mapping, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if name in out:  # {"a.b": x, "a": {"b": y}}: keeping either would drop the other without a word
                raise CheckpointError(path, f"two tensors are named {name!r} once nested dicts are flattened")
            _check_view(path, name, v)
            out[name] = v
        elif isinstance(v, Mapping):
            _flatten(path, v, name + ".", out)


def _check_view(path: Path, name: str, t: torch.Tensor) -> None:
    """Refuse tensor ``name`` when its shape claims far more bytes than its storage holds (a stride-0 view of
    10^12 elements over one stored value): each read copies the tensor, so believing it would allocate them."""
    claimed, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if claimed > stored + _MAX_REPEATED:
        raise CheckpointError(path, f"header lies about sizes: tensor {name!r} of shape {tuple(t.shape)} claims "
                                    f"{claimed} bytes over {stored} stored (strides {t.stride()}), refused")


def tensor_info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))


class TorchPickleCheckpoint(Checkpoint):
    """A ``torch.save``'d state dict, loaded with ``weights_only=True`` (mmap'd for zip-format files)."""

    format = "torch"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name)
        self._tensors: dict[str, torch.Tensor] | None
        self._tensors, self.name_prefix = load_state_dict(self.path)

    def _state(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:  # reopened after close()
            self._tensors, self.name_prefix = load_state_dict(self.path)
        return self._tensors

    def _infos(self) -> list[TensorInfo]:
        return [tensor_info(k, v) for k, v in self._state().items()]

    def _read(self, name: str) -> torch.Tensor:
        """A copy the caller owns, as every other reader returns: the loaded tensor stays in this object, so
        handing it out would let an in-place op (``w.add_(...)``) change what later reads, and tied tensors
        sharing its storage, return. The copy is of this tensor only (a view of a tied storage copies just the
        view); for mmap'd files it is where the pages are read from disk, once, straight into the copy."""
        try:
            # detached: a saved nn.Parameter would read as a tensor that requires grad, as no other reader's does
            return self._state()[name].detach().clone(memory_format=torch.contiguous_format)
        except RuntimeError as e:  # a page of a truncated mmap'd file
            raise CheckpointError(self.path, f"cannot read tensor {name!r}: {error_line(e)}") from e

    def close(self) -> None:
        self._tensors = None


def is_torch_pickle(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES


register_format("torch", is_torch_pickle, TorchPickleCheckpoint)
