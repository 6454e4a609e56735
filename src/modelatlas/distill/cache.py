"""Where distillation methods keep what they train once and reuse: MTT's expert trajectories, Teddy's model
pool, HeLlO's teacher.

One root for all of them: a method's ``cache_dir`` field when set, else ``$ATLAS_CACHE_DIR/<kind>``, else
``~/.cache/modelatlas/<kind>`` (``$MODELATLAS_CACHE`` is still read, after ``$ATLAS_CACHE_DIR``, for caches
made before the two were one). An entry is named by :func:`cache_key`, a hash of a fingerprint of the training
tensors, the fields that determine the cached object, and the seed: the same key means the same object.
Fingerprint cost O(N x D): a SHA-256 of the pixels and labels (~0.75 ms per MB). Before session 28 it was two
sums over the pixels and a hash of the labels, which a flipped or permuted copy of the images shared: a
stale entry (trained on the other images) was reused. Entries made then are not found any more and are
trained again once.

The key holds no device: an entry is stored device-neutral (safetensors of CPU tensors) and moved to the run's
device on load, so a GPU run reuses what a CPU run trained and the other way round. Keying by device would
train every entry again per device type (MTT: ``num_experts x expert_epochs`` epochs over the real data) to
gain only last-bit agreement, which a GPU does not promise between two of its own runs anyway (TF32, atomic
adds; docs/distill.md, Devices); the dtype needs no key either (every network is float32). What an entry
cannot say by its name, the device type that trained it, it records (``"device"`` in its metadata), and the
method puts it in the set's meta (:func:`trained_on`), so a result says whose rounding its cache carries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.digests import data_digest


def cache_root(kind: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of ``kind`` ("mtt", "teddy", "hello"): ``cache_dir`` itself when given."""
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("ATLAS_CACHE_DIR") or os.environ.get("MODELATLAS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "modelatlas") / kind


def check_cache_folder(folder: Path, cache_dir: str | Path | None) -> None:
    """Refuse, before the training whose result it keeps, a cache ``folder`` no file can be made in (a file, a
    folder below one, read-only): MTT's experts were trained, then lost at their save with "forest.json: File
    exists" (``--set cache_dir=forest.json``) or "/proc/x: No such file or directory". Then removes the
    temporary files a killed run left there (:func:`~modelatlas.atomic.remove_stale_temp_files`: an MTT buffer or
    HeLlO teacher stopped by SIGTERM while it was written, as large as the entry). O(files in the folder)."""
    from modelatlas.atomic import check_out_folder, remove_stale_temp_files

    name = f"cache_dir {folder}" if cache_dir else f"the cache folder {folder} ($ATLAS_CACHE_DIR, else ~/.cache)"
    check_out_folder(folder, name, "pass a folder with --set cache_dir=DIR (cache_dir=), or set $ATLAS_CACHE_DIR")
    remove_stale_temp_files(folder)


def data_fingerprint(train: ArrayDataset) -> dict:
    """Name, shape, and a digest of the pixels and labels of ``train`` (:func:`~modelatlas.digests.data_digest`)."""
    return {"name": train.name, "shape": list(train.x.shape), "data": data_digest(train.x, train.y)}


def cache_key(train: ArrayDataset, fields: dict, seed: int, length: int = 16) -> str:
    """A stable hex hash of (data fingerprint, ``fields``, ``seed``); ``fields`` must be JSON-serialisable."""
    desc = {"data": data_fingerprint(train), "fields": fields, "seed": seed}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:length]


def device_type(device: str | torch.device) -> str:
    """The type ("cpu", "cuda", "mps") an entry records as the device that trained it."""
    return torch.device(device).type


def trained_on(path: Path) -> str | None:
    """The device type that trained the cache entry ``path`` (a safetensors file's ``"device"`` metadata, or a
    JSON file's ``"device"`` key: Teddy's pool.json); None where it records none (an entry of before session 36)
    or cannot be read (the entry's loader names the damage). O(the header)."""
    from safetensors import SafetensorError, safe_open

    from modelatlas.weights.base import utf8_path

    try:
        if path.suffix == ".json":
            value = json.loads(path.read_text(encoding="utf-8")).get("device")
        else:
            with utf8_path(path) as readable, safe_open(readable, "pt") as f:
                value = (f.metadata() or {}).get("device")
    except (OSError, ValueError, AttributeError, SafetensorError):  # (AttributeError: a JSON list)
        return None
    return value if isinstance(value, str) else None


class UnitStore:
    """The finished units of a pre-training not yet cached whole (MTT's experts, Teddy's pool models), one
    safetensors file each in ``folder``, written atomically as each unit ends: a Ctrl-C or a crash loses only
    the unit in progress, and a rerun trains the missing ones alone. A unit is determined by the key that names
    ``folder`` and its own name (its seed is derived from both), so a kept one is the tensors a straight run
    makes. ``folder`` is never the complete entry: that is written after the last unit (MTT: the buffer file
    beside ``<stem>.partial``; Teddy: ``pool.json``). O(one unit) per call. A unit is only ever read under its
    own name, which exists once its file is whole (renamed into place); the temporary file of a unit whose run
    was killed while writing it (SIGTERM, SIGKILL: no clean-up ran) is removed by the next store of ``folder``
    and by :meth:`remove` (:func:`~modelatlas.atomic.remove_stale_temp_files`; another run's write is kept)."""

    def __init__(self, folder: Path, device: str | torch.device):
        from modelatlas.atomic import remove_stale_temp_files

        self.folder, self.device = folder, device_type(device)
        remove_stale_temp_files(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def get(self, name: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
        """Unit ``name`` when kept with exactly these tensor ``shapes``; None when absent, and (with one
        :class:`~modelatlas.errors.CacheWarning` line naming the file) when unreadable or of other shapes."""
        import warnings

        from modelatlas.atomic import read_tensors
        from modelatlas.errors import CacheWarning, CheckpointError

        path = self.path(name)
        if not path.is_file():
            return None
        try:
            tensors = read_tensors(path)
        except CheckpointError as err:
            warnings.warn(f"{err}; training it again", CacheWarning, stacklevel=2)
            return None
        if {k: tuple(v.shape) for k, v in tensors.items()} != shapes:
            warnings.warn(f"{path}: not a unit of this config (other tensors or shapes); training it again",
                          CacheWarning, stacklevel=2)
            return None
        return tensors

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from modelatlas.atomic import atomic_save_tensors

        atomic_save_tensors(self.path(name), tensors, {"unit": name, "device": self.device})

    def devices(self, names: list[str]) -> str:
        """The device types that trained the units ``names`` ("cpu", "cpu+cuda"); this run's for a unit that
        records none (a Teddy pool model of before session 39)."""
        return "+".join(sorted({trained_on(self.path(n)) or self.device for n in names}))

    def remove(self, names: list[str]) -> None:
        """Drop the units ``names`` (their whole is cached now) and ``folder`` when that leaves it empty."""
        from modelatlas.atomic import remove_stale_temp_files

        for n in names:
            self.path(n).unlink(missing_ok=True)
        remove_stale_temp_files(self.folder)  # a killed run's: the folder stayed, holding only it
        try:
            self.folder.rmdir()
        except OSError:  # not empty (a unit of another name, another run's write in progress), or already gone
            pass
