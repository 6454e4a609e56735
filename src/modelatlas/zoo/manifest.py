"""The zoo manifest: one JSON file listing every model of a zoo with its true parent.

Format (``manifest.json`` at the zoo's root)::

    {"format": "modelatlas-zoo/1",
     "config": {...the ZooConfig that built it...},
     "models": [{"name": "t0", "path": "t0", "parent": null, "tree": "t0", "arch": "mlp",
                 "dataset": "digits", "method": "root", "storage": "full",
                 "task": {"classes": [0, 1, ...], "transform": "identity", "label": "..."},
                 "train": {"lr": 0.01, "steps": 300, "seed": 7, ...}, "sha256": "..."}, ...]}

``path`` is relative to the manifest's folder. ``method`` is ``root``, ``full`` (full fine-tuning),
``lora`` or ``merge`` (a merged model, :mod:`modelatlas.zoo.merged`: its record also holds ``"merge": {"kind":
"linear", "parents": ["t0.1", "t0.2"], "weights": [0.3, 0.7]}``, and ``parent`` is its most weighted parent); ``storage`` is ``full`` (a full state dict, LoRA merged) or ``adapter`` (a PEFT-style adapter
folder whose base is the parent). ``sha256`` is the digest of the weights file (``atlas zoo verify``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from modelatlas.atomic import atomic_write_json, peek_json_object
from modelatlas.errors import ManifestError

FORMAT = "modelatlas-zoo/1"
_REQUIRED = ("name", "path", "parent", "tree")
_STORAGES = ("full", "adapter")


@dataclass
class ModelRecord:
    name: str
    path: str
    parent: str | None
    tree: str
    arch: str = ""
    dataset: str = ""
    method: str = "root"
    storage: str = "full"
    task: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    sha256: str = ""  # of the weights file ("" in manifests written before digests)
    merge: dict = field(default_factory=dict)  # a merged model's {"kind", "parents", "weights"}; {} otherwise


@dataclass
class Manifest:
    """A zoo's models; ``root`` is the folder that model paths are relative to; ``source`` the file it was
    loaded from (None when built in memory), for error messages; ``reused`` the models that the
    :func:`~modelatlas.zoo.make_zoo` call returning it found finished, not trained (not saved)."""

    models: list[ModelRecord]
    config: dict = field(default_factory=dict)
    root: Path = field(default_factory=Path)
    source: Path | None = field(default=None, compare=False, repr=False)
    reused: tuple[str, ...] = field(default=(), compare=False, repr=False)  # found finished by make_zoo (not saved)

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ManifestError(f"duplicate model names in manifest: {sorted(dup)}")
        known = set(names)
        for m in self.models:
            if m.parent is not None and m.parent not in known:
                raise ManifestError(f"model {m.name!r} names parent {m.parent!r}, which is not in the manifest")
            for p in m.merge.get("parents", []) if isinstance(m.merge, dict) else []:
                if p == m.name:
                    raise ManifestError(f"model {m.name!r} is a merge of itself (its 'merge' parents name it)")
                if p not in known:
                    raise ManifestError(f"model {m.name!r} is a merge of {p!r}, which is not in the manifest")
        self._check_acyclic()

    def _check_acyclic(self) -> None:
        """Every model reaches a root through its parents (a -> b -> a was shown as no tree at all and
        scored as no edges). O(N) amortised: each model is walked once."""
        parents, done = self.parents(), set()
        for name in parents:
            path: list[str] = []
            on_path: set[str] = set()
            while name is not None and name not in done:
                if name in on_path:
                    loop = " -> ".join([*path[path.index(name):], name])
                    raise ManifestError(f"parents form a loop ({loop}); every model must descend from a root")
                path.append(name)
                on_path.add(name)
                name = parents[name]
            done.update(path)

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, name: str) -> ModelRecord:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def parents(self) -> dict[str, str | None]:
        """Child name -> parent name (None for roots)."""
        return {m.name: m.parent for m in self.models}

    def merges(self) -> dict[str, dict]:
        """Merged model name -> its ``merge`` record (``kind``, ``parents``, ``weights``)."""
        return {m.name: m.merge for m in self.models if m.merge}

    def edges(self) -> list[tuple[str, str]]:
        """True directed edges (parent, child)."""
        return [(m.parent, m.name) for m in self.models if m.parent is not None]

    def trees(self) -> dict[str, str]:
        """Model name -> tree id."""
        return {m.name: m.tree for m in self.models}

    def path_of(self, name: str) -> Path:
        return self.root / self[name].path

    def renamed(self, names: Mapping[str, str]) -> Manifest:
        """This manifest with models renamed (old name -> new name), parents following; paths, trees, digests
        and the source file kept (``zoo.matching.match_models`` gives the names). O(N)."""
        def new(name: str | None) -> str | None:
            return None if name is None else names.get(name, name)

        models = [replace(m, name=new(m.name), parent=new(m.parent)) for m in self.models]
        return Manifest(models, self.config, self.root, self.source)

    def save(self, path: str | Path) -> Path:
        """Write the manifest atomically to ``path`` (model paths stay relative)."""
        models = [{k: v for k, v in asdict(m).items() if k != "merge" or v} for m in self.models]  # as before merges
        data = {"format": FORMAT, "config": self.config, "models": models}
        return atomic_write_json(path, data)


def is_zoo_manifest(path: str | Path) -> bool:
    """Whether the JSON file at ``path`` is a zoo manifest by its own word (format modelatlas-zoo/1, or no format
    and a 'models' list, as written by hand), not another program's manifest.json. Reads the file once."""
    data = peek_json_object(path)
    return data is not None and data.get("format", FORMAT if isinstance(data.get("models"), list) else None) == FORMAT


def load_manifest(path: str | Path) -> Manifest:
    """Read a zoo's manifest file, or ``manifest.json`` inside a zoo folder; errors name the file and key. A
    plain ``{"model": "its parent"}`` object is refused: it has no tasks, configs nor digests, so ``atlas zoo
    show`` drew every model a root and ``atlas zoo verify`` called the folder's files extra
    (:func:`load_truth` reads it)."""
    path, data = _read_json(path)
    if is_parents_map(data):
        raise ManifestError(f"{path}: a plain {{\"model\": \"its parent\"}} object (a --truth for `atlas lineage "
                            "recover`), not a zoo manifest; give a zoo folder built by `atlas zoo make`")
    return _from_data(path, data, "")


def load_truth(path: str | Path) -> Manifest:
    """The true lineage at ``path``: a zoo manifest (or zoo folder), or a plain ``{"model": "its parent" or
    null}`` object (what a user who knows some parents writes); errors name the file and key."""
    path, data = _read_json(path)
    if is_parents_map(data):
        return _from_parents(path, data)
    return _from_data(path, data, ", and not a plain {\"model\": \"its parent\" or null} object either")


def _read_json(path: str | Path) -> tuple[Path, object]:
    """(the manifest file ``path`` names, its JSON data); a folder names its ``manifest.json``."""
    given = path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    zoo = _zoo_above(given)
    if zoo is not None:  # a model folder or weights file of a zoo: "zoo/t0/manifest.json: no such manifest"
        raise ManifestError(f"{given}: inside the zoo {zoo}, not a zoo; pass the zoo folder ({zoo})")
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest (a zoo folder holds manifest.json; build one with `atlas zoo make`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as e:
        raise ManifestError(f"{path}: not a valid JSON manifest (nested too deeply)") from e
    except (OSError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError, an integer of 5,000 digits
        raise ManifestError(f"{path}: not a valid JSON manifest ({' '.join(str(e).split())})") from e
    if isinstance(data, dict) and data.get("format", FORMAT) != FORMAT:  # an atlas.json has 'models' too
        raise ManifestError(f"{path}: not a zoo manifest: its format is {data['format']!r:.60} (a zoo's is "
                            f"{FORMAT!r}, written by `atlas zoo make`)")
    return path, data


def _zoo_above(given: Path) -> Path | None:
    """The zoo folder ``given`` lies in (its parent; a file's grandparent too: ``zoo/t0/model.safetensors``) when
    ``given`` exists and is no manifest itself, else None. Reads at most two manifests."""
    if not given.exists() or (given.is_file() and given.suffix == ".json") or (given / "manifest.json").exists():
        return None
    for zoo in [given.parent] if given.is_dir() else [given.parent, given.parent.parent]:
        if (zoo / "manifest.json").is_file() and is_zoo_manifest(zoo / "manifest.json"):
            return zoo
    return None


def _from_data(path: Path, data: object, nor: str) -> Manifest:
    """The manifest of a zoo's JSON ``data`` read from ``path``; ``nor`` ends the message of data that is no
    manifest (what else it could have been)."""
    if isinstance(data, dict) and "models" not in data and "nodes" in data and "edges" in data:  # read "missing key"
        raise ManifestError(f"{path}: a lineage forest (what `atlas lineage recover --out` writes), not a zoo "
                            "manifest; give a zoo folder built by `atlas zoo make`, or its manifest.json")
    if isinstance(data, dict) and "models" in data and not isinstance(data["models"], list):  # read "missing key"
        raise ManifestError(f"{path}: key 'models' must be a list of model records, got {data['models']!r:.40}")
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ManifestError(f"{path}: missing key 'models' (a list of model records){nor}")
    if not isinstance(data.get("config", {}), dict):
        raise ManifestError(f"{path}: key 'config' must be an object, got {data['config']!r}")
    records = [_record(path, i, rec) for i, rec in enumerate(data["models"])]
    try:
        return Manifest(records, data.get("config", {}), path.parent, path)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from e


def is_parents_map(data: object) -> bool:
    """Whether ``data`` is the plain form of a truth, ``{"model": "its parent" or null, ...}`` (what a user
    who knows some parents writes by hand), not a manifest."""
    return (isinstance(data, dict) and bool(data) and "models" not in data and "format" not in data
            and all(v is None or isinstance(v, str) and v for v in data.values()))


def _from_parents(path: Path, parents: dict[str, str | None]) -> Manifest:
    """A manifest of the models of a plain ``{model: parent}`` object: paths = names (relative to the file's
    folder), a parent not listed a root, each model's tree its root's name. Time O(N) (each walk stops at a
    model already placed)."""
    from modelatlas.lineage.scoring import tree_labels  # (scoring reads manifests: imported here)

    parents = {**{p: None for p in parents.values() if p is not None and p not in parents}, **parents}
    tree = tree_labels(parents)  # a cycle ends its walk; Manifest refuses it
    try:
        return Manifest([ModelRecord(n, n, p, tree[n]) for n, p in parents.items()], {}, path.parent, path)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from e


def _record(path: Path, i: int, rec) -> ModelRecord:
    """Model record #i of the manifest at ``path``, each known key of its type (a number as a path or a
    string as the task used to fail later, deep in a command, with a traceback)."""
    missing = [k for k in _REQUIRED if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise ManifestError(f"{path}: model #{i} lacks key(s) {missing}")
    known = {k: v for k, v in rec.items() if k in ModelRecord.__dataclass_fields__}
    for key, value in known.items():
        if key == "parent" and value is None:
            continue
        want = _TYPES[key]
        if not isinstance(value, want) or (key in _NAMES and not value):
            what = {str: "a non-empty string" if key in _NAMES else "a string", dict: "an object"}[want]
            what += " or null" if key == "parent" else ""
            raise ManifestError(f"{path}: model #{i} key {key!r} must be {what}, got {value!r}")
    if known.get("storage", "full") not in _STORAGES:
        raise ManifestError(f"{path}: model #{i} key 'storage' must be one of {list(_STORAGES)}, got {known['storage']!r}")
    if known.get("merge"):
        _check_merge(path, i, known["merge"])
    return ModelRecord(**known)


def _check_merge(path: Path, i: int, merge: dict) -> None:
    """A merge record: ``parents`` two or more distinct names, ``weights`` as many numbers."""
    parents, weights = merge.get("parents"), merge.get("weights")
    ok = isinstance(parents, list) and len(parents) >= 2 and all(isinstance(p, str) and p for p in parents) \
        and len(set(parents)) == len(parents) and isinstance(weights, list) and len(weights) == len(parents) \
        and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)
    if not ok:
        raise ManifestError(f"{path}: model #{i} key 'merge' must hold 'parents' (two or more distinct model names) "
                            f"and 'weights' (a finite number each), got {merge!r:.120}")


_NAMES = ("name", "path", "parent", "tree")
_TYPES = {k: (dict if k in ("task", "train", "merge") else str) for k in ModelRecord.__dataclass_fields__}
