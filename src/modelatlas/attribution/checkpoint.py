"""The resumable state of an attribution run: the folder ``OUT/checkpoint``.

- ``offline.json`` + ``offline-<unit>.safetensors``: the run's settings and the finished units of DDM's offline
  phase (:mod:`~.units`: ``clusters``, ``target``, and ``match`` saved as it goes, every ``every_s`` seconds, at
  its end and on Ctrl-C, as ``offline-match-<steps done>.safetensors``); dropped once DDM has finished;
- ``run.json`` + ``ddm.safetensors`` (with validation): the run's settings and the DDM attribution, written
  (tensors first, then the JSON) as soon as DDM has finished, before the leave-one-cluster-out (LOO) retraining
  starts;
- ``loo.json`` (with the settings) + ``loo-<done>.safetensors``: the LOO rows of the clusters retrained so far and the full model's
  test losses, written every ``every_s`` seconds, at the end and when interrupted (Ctrl-C); ``loo.json`` names
  its tensor file, so a run killed between the two writes resumes from the previous state.

Every file is replaced atomically, a JSON after the tensors it names. A resume compares the settings first and refuses, naming the first that
differs, a state another run wrote. Saving the LOO state costs O(done x n_test); with one save per ``every_s``
seconds that is at most O(K_total x n_test) per save. The folder is removed once the results are written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from modelatlas.atomic import (
    atomic_save_tensors,
    atomic_write_json,
    peek_json_object,
    read_json_object,
    read_tensors,
)
from modelatlas.attribution.ddm import Attribution
from modelatlas.digests import check_file_sha256, file_sha256
from modelatlas.errors import CheckpointError, ConfigError, SettingsMismatchError

FOLDER, RUN_JSON, DDM_TENSORS, LOO_JSON = "checkpoint", "run.json", "ddm.safetensors", "loo.json"
OFFLINE_JSON = "offline.json"
UNITS = ("clusters", "target", "match")  # DDM's offline units, in the order they finish
_DDM = ("matrix", "assign", "cluster_class", "synthetic", "synthetic_labels", "base_losses")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def kept_state(out: str | Path) -> Path | None:
    """The file that marks a resumable state in ``out`` (``run.json``, else ``offline.json``), or None. A
    distillation's ``OUT/checkpoint/run.json`` is none: it was taken for an interrupted attribution, whose
    refusal said to delete the distillation's checkpoint folder."""
    return next((p for p in (Path(out) / FOLDER / n for n in (RUN_JSON, OFFLINE_JSON))
                 if p.is_file() and not _a_distillation(p)), None)


def _a_distillation(path: Path) -> bool:
    """Whether the JSON file at ``path`` is an ``atlas distill`` run.json ({"method", ...}, no "settings");
    unreadable or another shape counts as ours, so its resume says what is wrong with it."""
    data = peek_json_object(path)
    return data is not None and "method" in data and "settings" not in data


def check_start(out: str | Path, resume: bool) -> None:
    """Refuse, before any work, a run without ``resume`` into a folder holding an interrupted run's state."""
    for name in (RUN_JSON, OFFLINE_JSON, LOO_JSON, DDM_TENSORS):  # a folder there was taken for no state: a run
        odd = Path(out) / FOLDER / name  # started over, dropped the kept rows, then failed to write it
        if odd.exists() and not odd.is_file():
            raise CheckpointError(odd, f"is not a file (a folder?); delete {odd.parent} to start over")
    path = kept_state(out)
    if path is not None and not resume:
        raise ConfigError(f"{path} exists: {out} holds an interrupted attribution; pass --resume (resume=True) to "
                          f"continue it, choose a new --out, or delete {path.parent} to start over")


def progress_of(out: str | Path) -> dict | None:
    """What ``OUT/checkpoint`` keeps: ``{"ddm": True, "loo_done": k, "loo_total": K}`` once DDM has finished,
    before ``{"ddm": False, "units": [the offline units kept], "match": [steps done, of steps] or None}``; None
    when it holds no readable state (nothing to resume)."""
    folder = Path(out) / FOLDER
    if not (folder / RUN_JSON).is_file():
        return _offline_progress(folder / OFFLINE_JSON)
    try:
        total = len(read_json_object(folder / RUN_JSON, "no run", "a run")["cluster_class"])
        done = read_json_object(folder / LOO_JSON, "no LOO", "a LOO state").get("done", 0) \
            if (folder / LOO_JSON).is_file() else 0
    except (CheckpointError, KeyError, TypeError):
        return None
    return {"ddm": True, "loo_done": done if isinstance(done, int) else 0, "loo_total": total}


def _offline_progress(path: Path) -> dict | None:
    """``progress_of`` for a run stopped in DDM's offline phase (``offline.json``)."""
    try:
        units = read_json_object(path, "no offline state", "an offline state")["units"]
        kept = [u for u in UNITS if u in units]
        match = units["match"]["progress"] if "match" in kept else None
    except (CheckpointError, KeyError, TypeError):
        return None
    return {"ddm": False, "units": kept, "match": match} if kept else None


class RunCheckpoint:
    """``OUT/checkpoint`` of one run with the given ``settings`` (JSON values; module docstring)."""

    def __init__(self, out: str | Path, settings: dict, every_s: float = 5.0):
        self.folder, self.every_s = Path(out) / FOLDER, float(every_s)
        self.settings = json.loads(json.dumps(settings))  # as they read back from run.json
        self.last_save = time.perf_counter()
        self._units: dict | None = None  # offline.json's units, once read (settings checked) or written

    @property
    def restart(self) -> str:
        """The hint of a refusal: 'delete the folder' was read as --out itself, the results in it."""
        return f"delete {self.folder} to start over"

    def check_settings(self) -> None:
        """Refuse a kept state (``run.json``, ``offline.json``) of other settings, naming the first that differs.
        Called before any work: a run refused for its new settings must not first drop the state it could resume."""
        path = self.folder / RUN_JSON
        if path.is_file():
            self._check_settings(path, read_json_object(path, "no run", "an attribution run").get("settings"))
        self._read_units()

    def load_ddm(self) -> Attribution | None:
        """The saved DDM attribution (None when there is none); a state of other settings is refused."""
        path = self.folder / RUN_JSON
        if not path.is_file():
            return None
        meta = read_json_object(path, "no run", "an attribution run")
        self._check_settings(path, meta.get("settings"))
        t = self._tensors(path, DDM_TENSORS, meta.get("tensors_sha256"))
        if any(k not in t for k in _DDM) or not isinstance(meta.get("match_losses"), list):
            raise CheckpointError(path, f"cannot resume: the DDM state is incomplete; {self.restart}")
        timings, losses = meta.get("timings"), meta["match_losses"]
        if not isinstance(timings, dict) or not all(_number(v) for v in [*timings.values(), *losses]) or not (
                timings.get("total_s", 0) > 0 and timings.get("online_s", -1) >= 0):  # the report divides by them
            raise CheckpointError(path, "cannot resume: its timings (total_s > 0, online_s >= 0) and match_losses "
                                        f"must be numbers (another type was a TypeError in the report); {self.restart}")
        return Attribution(**{k: t[k] for k in _DDM}, timings=dict(meta.get("timings") or {}),
                           match_losses=list(meta["match_losses"]))

    def save_ddm(self, attr: Attribution) -> None:
        """Write the DDM attribution and the settings (tensors first: ``run.json`` marks a complete state); an
        earlier run's LOO state is dropped first (it would pass for this run's), the offline units last."""
        self._drop_loo()
        atomic_save_tensors(self.folder / DDM_TENSORS, {k: getattr(attr, k) for k in _DDM})
        atomic_write_json(self.folder / RUN_JSON, {"settings": self.settings, "timings": attr.timings,
                                                   "match_losses": attr.match_losses,
                                                   "cluster_class": attr.cluster_class.tolist(),
                                                   "tensors_sha256": file_sha256(self.folder / DDM_TENSORS)})
        self._drop_offline()  # the attribution replaces them

    def load(self, unit: str, shapes: dict) -> dict[str, torch.Tensor] | None:
        """The kept tensors of DDM's offline ``unit`` (:class:`~.units.UnitStore`), or None; a state of other
        settings, or one missing a tensor of ``shapes`` (or of another shape), is refused."""
        kept = self._read_units().get(unit, {})
        name = kept.get("tensors")
        if name is None:
            return None
        path = self.folder / OFFLINE_JSON
        if not isinstance(name, str):
            raise CheckpointError(path, f"cannot resume: the {unit} unit names no tensor file; {self.restart}")
        t = self._tensors(path, name, kept.get("sha256"))
        for key, shape in shapes.items():
            if key not in t or (shape is not None and tuple(t[key].shape) != tuple(shape)):
                raise CheckpointError(path, f"cannot resume: the {unit} unit lacks {key!r} or holds it in another "
                                            f"shape; {self.restart}")
        return t

    def save(self, unit: str, tensors: dict[str, torch.Tensor], progress: tuple[int, int] | None = None) -> None:
        """Keep DDM's offline ``unit`` (tensors first, then ``offline.json`` naming them, then its older file)."""
        units = self._read_units()
        name = f"offline-{unit}{'' if progress is None else f'-{progress[0]}'}.safetensors"
        atomic_save_tensors(self.folder / name, tensors)
        units[unit] = {"tensors": name, "sha256": file_sha256(self.folder / name),
                       **({} if progress is None else {"progress": list(progress)})}
        atomic_write_json(self.folder / OFFLINE_JSON, {"settings": self.settings, "units": units})
        for old in self.folder.glob(f"offline-{unit}*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last_save = time.perf_counter()

    def due(self) -> bool:
        """Whether ``every_s`` seconds have passed since the last save."""
        return time.perf_counter() - self.last_save >= self.every_s

    def _read_units(self) -> dict:
        """``offline.json``'s units (its settings checked), read once; {} when there is none."""
        if self._units is None:
            path = self.folder / OFFLINE_JSON
            meta = read_json_object(path, "no offline state", "an offline state") if path.is_file() else {}
            if meta:
                self._check_settings(path, meta.get("settings"))
            units = meta.get("units", {})
            if not isinstance(units, dict) or not all(isinstance(v, dict) for v in units.values()):
                raise CheckpointError(path, f"cannot resume: its 'units' are not a JSON object of objects; {self.restart}")
            self._units = units
        return self._units

    def _drop_offline(self) -> None:
        """Delete the offline units (``offline.json`` first: no half state passes for one)."""
        (self.folder / OFFLINE_JSON).unlink(missing_ok=True)
        for old in self.folder.glob("offline-*.safetensors"):
            old.unlink(missing_ok=True)
        self._units = {}

    def _tensors(self, json_path: Path, name: str, recorded) -> dict[str, torch.Tensor]:
        """The tensor file ``name`` that ``json_path`` names, refused when its bytes are not those it was saved
        with (``recorded``: its SHA-256; None in a state of before session 40, not checked): a flipped bit of the
        kept rows or the synthetic set resumed silently into another attribution."""
        path = self.folder / Path(name).name
        if not Path(name).name or not path.exists():  # deleted, or the name edited ('.' named the folder): 'checkpoint/I4: missing' named no file of the run
            raise CheckpointError(json_path, f"cannot resume: the tensor file it names, {name!r:.60}, is missing; "
                                             f"{self.restart}")
        check_file_sha256(path, recorded, json_path.name, self.restart)
        return read_tensors(path, self.restart)

    def _check_settings(self, path: Path, saved) -> None:
        """Refuse a state of other settings, naming the first key that differs (one line)."""
        if not isinstance(saved, dict):
            raise CheckpointError(path, f"cannot resume: it records no settings; {self.restart}")
        for key in [*self.settings, *(k for k in saved if k not in self.settings)]:
            if saved.get(key) != self.settings.get(key):
                raise SettingsMismatchError(path, key, saved.get(key), self.settings.get(key),
                                            f"delete {self.folder} to start over")

    def load_loo(self, k_total: int, n_test: int) -> tuple[list[torch.Tensor], torch.Tensor, float] | None:
        """(rows done, full model's test losses, wall seconds so far) of the LOO retraining, or None."""
        path = self.folder / LOO_JSON
        if not path.is_file():
            return None
        meta = read_json_object(path, "no LOO state", "a LOO state")
        if "settings" in meta:  # loo_attribution alone took another run's rows (states saved before lack it)
            self._check_settings(path, meta["settings"])
        done, name, wall = meta.get("done"), meta.get("tensors"), meta.get("wall_s")
        if not (isinstance(done, int) and 0 <= done <= k_total and isinstance(name, str)
                and isinstance(wall, (int, float))):
            raise CheckpointError(path, f"cannot resume: 'done', 'tensors' or 'wall_s' is missing or wrong; {self.restart}")
        t = self._tensors(path, name, meta.get("tensors_sha256"))
        rows, base = t.get("rows"), t.get("base")
        if rows is None or base is None or tuple(rows.shape) != (done, n_test) or tuple(base.shape) != (n_test,):
            raise CheckpointError(path, f"cannot resume: its tensors do not fit {done} rows of {n_test} test "
                                        f"samples; {self.restart}")
        return list(rows), base, float(wall)

    def save_loo(self, rows: list[torch.Tensor], base: torch.Tensor, wall_s: float, force: bool = False) -> None:
        """Write the LOO state when ``every_s`` seconds have passed since the last save, or ``force``."""
        if not force and time.perf_counter() - self.last_save < self.every_s:
            return
        done, n_test = len(rows), len(base)
        name = f"loo-{done}.safetensors"
        stacked = torch.stack(rows) if rows else torch.zeros(0, n_test)
        atomic_save_tensors(self.folder / name, {"rows": stacked, "base": base})
        atomic_write_json(self.folder / LOO_JSON, {"done": done, "tensors": name, "wall_s": wall_s,
                                                   "settings": self.settings,
                                                   "tensors_sha256": file_sha256(self.folder / name)})
        for old in self.folder.glob("loo-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last_save = time.perf_counter()

    def remove(self) -> None:
        """Delete the state (the results are written): its own files, then the folder if that left it empty."""
        (self.folder / RUN_JSON).unlink(missing_ok=True)  # the marker first: no half state passes for one
        (self.folder / DDM_TENSORS).unlink(missing_ok=True)
        self._drop_loo()
        self._drop_offline()
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def _drop_loo(self) -> None:
        (self.folder / LOO_JSON).unlink(missing_ok=True)
        for old in self.folder.glob("loo-*.safetensors"):
            old.unlink(missing_ok=True)
