"""The atlas index: every model of a collection with its recovered lineage and predicted properties.

An atlas folder (``atlas index build --out DIR``)::

    atlas.json              {"format": "modelatlas-atlas/1", "models": [...], "forest": {...}, "experts": {...}}
    embeddings.safetensors  only with text experts: "tree/<expert tree>" -> (n, r_T) unit-norm model embeddings
    atlas.html              a self-contained viewer (no network): the trees, a model table, a filter box

``models`` holds one :class:`ModelEntry` per model given, readable or not; ``forest`` is the lineage
(:meth:`modelatlas.lineage.forest.Forest.to_dict`); ``experts`` records which ProbeX experts made the
predictions and the text embeddings (their folders and layers), so a later search can load them again;
``adapter_base`` the ``--base`` PEFT adapters were read merged onto (null without one), which ``atlas probex
predict / search ATLAS`` use again.
Files are written atomically; a reader that meets a missing or malformed file gets a one-line error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from modelatlas.atomic import (
    atomic_save_tensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_out_folder,
    read_tensors,
)
from modelatlas.errors import AtlasError
from modelatlas.lineage.forest import Forest

if TYPE_CHECKING:  # torch loads with the embeddings (read_tensors): `atlas index show` needs none
    import torch

FORMAT = "modelatlas-atlas/1"
FORMAT_FAMILY = "modelatlas-atlas/"  # any version's atlas.json: `index build` may replace it (the fix for its load error)
JSON_NAME, EMBED_NAME, HTML_NAME = "atlas.json", "embeddings.safetensors", "atlas.html"
NO_CLASS = "no class above 0.5"  # a model its class expert saw (expert_tree set) whose classes all scored <= 0.5


@dataclass
class ModelEntry:
    """One model. ``tree`` is the 1-based lineage tree it was placed in (None when it could not be read);
    ``parent`` / ``score`` its recovered parent and that edge's confidence; ``predicted`` the class set its
    tree expert predicts, as [class, probability] pairs (probability > 0.5), best first; ``described`` the
    text expert's best-matching known descriptions as [prompt, probability] (top 3); ``notes`` say why a step
    was skipped for it (unreadable file, no known tree, a missing layer) or, with ``predicted`` empty, which
    class was the most probable."""

    name: str
    path: str
    parameters: int = 0
    size_bytes: int = 0
    dtype: str = ""
    tensors: int = 0
    architecture: str = ""
    tree: int | None = None
    parent: str | None = None
    score: float | None = None
    predicted: list[list] | None = None
    described: list[list] | None = None
    expert_tree: str | None = None
    text_tree: str | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> ModelEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Atlas:
    """An index of models (see the module docstring). ``embeddings``: expert tree -> (names, (n, r_T))."""

    models: list[ModelEntry]
    forest: Forest
    experts: dict = field(default_factory=dict)
    embeddings: dict[str, tuple[list[str], torch.Tensor]] = field(default_factory=dict)
    adapter_base: str | None = None  # the --base its PEFT adapters were read merged onto (absolute path)

    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise AtlasError(f"no model named {name!r} in the atlas")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "models": [asdict(m) for m in self.models], "forest": self.forest.to_dict(),
                "experts": self.experts, "embedded": {t: names for t, (names, _) in self.embeddings.items()},
                "adapter_base": self.adapter_base}

    def save(self, folder: str | Path) -> Path:
        """Write atlas.json, embeddings.safetensors (when there are embeddings) and atlas.html, together: a
        failure or Ctrl-C while writing any of them leaves the atlas the folder held before, all of it (old
        embeddings beside the old atlas.json would no longer match a new one's)."""
        from modelatlas.atlas.html import render_html

        folder, data, page = Path(folder), self.to_dict(), render_html(self)
        check_atlas_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # each writer is the file's usual atomic one, pointed at the temporary path that _write_together renames
        files = [(folder / JSON_NAME, lambda tmp: atomic_write_json(tmp, data)),  # first: renamed last
                 (folder / HTML_NAME, lambda tmp: atomic_write_text(tmp, page))]
        if self.embeddings:
            tensors = {f"tree/{t}": e for t, (_, e) in self.embeddings.items()}
            files.append((folder / EMBED_NAME, lambda tmp: atomic_save_tensors(tmp, tensors)))
        _write_together(files)
        if not self.embeddings:  # a rebuild without text experts: the old embeddings describe no model here
            (folder / EMBED_NAME).unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, embeddings: bool = True) -> Atlas:
        """The atlas in ``folder`` (or its atlas.json); ``embeddings=False`` leaves out the text embeddings (and
        does not need their file), for what never uses them: showing it, keyword search."""
        folder = Path(folder)
        path = folder / JSON_NAME if folder.is_dir() or not folder.suffix else folder
        if folder.is_file() and (path != folder or folder.suffix != ".json"):  # atlas.html was parsed as JSON
            hint = f"; pass {folder.parent}" if (folder.parent / JSON_NAME).is_file() else ""
            raise AtlasError(f"{folder}: a file, not an atlas folder or its {JSON_NAME}{hint}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            if not path.parent.exists():  # a mistyped folder: it said "nope/atlas.json: no atlas here"
                raise AtlasError(f"{path.parent}: no such folder (build an atlas with `atlas index build PATH... "
                                 "--out DIR`)") from e
            raise AtlasError(f"{path}: no atlas here (build one with `atlas index build PATH... --out DIR`)") from e
        except (OSError, ValueError) as e:
            raise AtlasError(f"{path}: cannot read the atlas ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            if got is None:  # a lineage forest or a distillation's result.json: "unknown atlas format None"
                raise AtlasError(f"{path}: not an atlas (no 'format' key; an atlas.json has {FORMAT!r}): build one "
                                 "with `atlas index build PATH... --out DIR`")
            if isinstance(got, str) and got.startswith(FORMAT_FAMILY):  # it said only 'unknown atlas format'
                raise AtlasError(f"{path}: an atlas of another modelatlas version (format {got!r:.60}; this one "
                                 f"reads {FORMAT!r}): rebuild it with `atlas index build PATH... --out "
                                 f"{path.parent}`")
            raise AtlasError(f"{path}: unknown atlas format {got!r:.60} (expected {FORMAT})")
        check_atlas_dict(data, path)
        models = [ModelEntry.from_dict(m) for m in data["models"]]
        embedded = _load_embeddings(path.parent, data.get("embedded", {})) if embeddings else {}
        try:
            forest = Forest.from_dict(data.get("forest", {"nodes": [], "edges": []}))
        except AtlasError as e:
            raise AtlasError(f"{path}: forest: {e}") from e
        return cls(models, forest, dict(data.get("experts", {})), embedded, data.get("adapter_base"))


def check_atlas_folder(folder: str | Path) -> None:
    """Refuse to write an atlas into a non-empty folder that holds none: its files would mix with the
    atlas's (and a later `atlas index build` of that folder would take embeddings.safetensors for a model),
    and a path that is a file or lies below one (it said 'File exists' after the whole lineage recovery). An
    atlas of another modelatlas version is replaced: rebuilding it is what its load error asks."""
    folder = Path(folder)
    check_out_folder(folder, f"--out {folder}", "choose a new --out", AtlasError)
    if folder.is_dir() and not (folder / JSON_NAME).is_file() and any(folder.iterdir()):
        raise AtlasError(f"--out {folder} is a non-empty folder that holds no atlas ({JSON_NAME}): the atlas's "
                         "files would mix with its files; choose a new or empty --out")
    if (folder / JSON_NAME).is_file():  # any atlas.json passed (a sprite sheet's is one too), and was overwritten
        try:
            form = json.loads((folder / JSON_NAME).read_text(encoding="utf-8")).get("format")
            why = f"format {form!r:.60}"
        except (OSError, ValueError, AttributeError):  # unreadable, or not an object
            form, why = None, "not readable as JSON"
        if not (isinstance(form, str) and form.startswith(FORMAT_FAMILY)):  # another version's: rebuilt in place
            raise AtlasError(f"--out {folder} is a folder whose {JSON_NAME} is no modelatlas atlas ({why}): it would "
                             "be overwritten; choose a new or empty --out (or delete that file)")


def _write_together(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write every (path, write) to a temporary file beside its path, then move them all in place, the first
    one last. :func:`atomic_write` of the first file writes the rest inside its own write, so that any failure
    before the moves removes every temporary file and leaves every old file."""
    if not files:
        return
    (path, write), rest = files[0], files[1:]

    def write_then_rest(tmp: Path) -> None:
        write(tmp)
        _write_together(rest)

    atomic_write(path, write_then_rest)


def _load_embeddings(folder: Path, embedded: dict) -> dict:
    if not embedded:
        return {}
    tensors = read_tensors(folder / EMBED_NAME, "rebuild the atlas with `atlas index build`")
    out = {}
    for tree, names in embedded.items():
        e = tensors.get(f"tree/{tree}")
        if e is None or e.shape[0] != len(names):
            raise AtlasError(f"{folder / EMBED_NAME}: embeddings of tree {tree!r} are missing or do not match "
                             f"atlas.json ({len(names)} models); rebuild the atlas")
        _check_embeddings(folder / EMBED_NAME, tree, e)
        out[tree] = (list(names), e.float())  # float32, as scored (a float64 file would meet float32 experts)
    return out


def _check_embeddings(path: Path, tree: str, e: torch.Tensor) -> None:
    """One row of finite numbers per model: a 1-D tensor was an IndexError in search, and NaN rows ranked every
    model at 'log p(query) nan', in no particular order."""
    if e.ndim != 2:
        raise AtlasError(f"{path}: embeddings of tree {tree!r} must be (models, dimensions); got shape "
                         f"{tuple(e.shape)}; rebuild the atlas")
    if not e.is_floating_point() or not bool(e.isfinite().all()):
        raise AtlasError(f"{path}: embeddings of tree {tree!r} holds NaN or inf values (or is not floating point); "
                         "rebuild the atlas")


# What each value of atlas.json must be, as (test, the words of the error). A kind ending in "?" may be null.
_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
    "numbers": (lambda v: isinstance(v, list) and all(_KINDS["number"][0](x) for x in v), "a list of numbers"),
    "pairs": (lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                    and _KINDS["number"][0](p[1]) for p in v),
              "a list of [name, probability] pairs"),
}
_TOP = {"models": "list", "forest": "object", "experts": "object", "embedded": "object", "adapter_base": "str?"}
_ENTRY = {"name": "str", "path": "str", "parameters": "int", "size_bytes": "int", "dtype": "str", "tensors": "int",
          "architecture": "str", "tree": "int?", "parent": "str?", "score": "number?", "predicted": "pairs?",
          "described": "pairs?", "expert_tree": "str?", "text_tree": "str?", "notes": "strings"}
_FOREST = {"nodes": "strings", "edges": "list", "trees": "list", "decisions": "object", "kurtosis": "object",
           "skipped": "object"}
_EDGE = {"parent": "str", "child": "str", "score": "number", "distance": "number", "kind": "str", "runner_up": "str?",
         "runner_up_ratio": "number"}
_EXPERTS = {"folder": "str", "layer": "str", "digest": "str"}
_DECISIONS = {"root_confidence": "numbers?", "root_runner_up": "list?", "stage_trees": "list?", "stage": "str?",
              "precision_copies": "object?", "same_model_roundings": "object?", "model_merges": "object?"}
_MISSING = object()


def check_atlas_dict(data: dict, path: Path) -> None:
    """Raise :class:`AtlasError` naming ``path``, the key and its value at the first value of a wrong type, so
    that a hand-edited or truncated atlas.json fails here in one line, not as a TypeError deep in `show`.
    Keys an older atlas may lack (all but a model's name and path, and models) keep their defaults."""
    _check_keys(path, "", data, _TOP, required=("models",))
    for i, m in enumerate(data["models"]):
        _check_keys(path, f"models[{i}]", m, _ENTRY, required=("name", "path"))
    forest = data.get("forest", {"nodes": [], "edges": []})
    _check_keys(path, "forest", forest, _FOREST, required=("nodes", "edges"))
    nodes = set(forest["nodes"])
    for i, e in enumerate(forest["edges"]):
        _check_keys(path, f"forest.edges[{i}]", e, _EDGE, required=("parent", "child"))
        for end in ("parent", "child"):
            if e[end] not in nodes:  # Forest.children() indexes by node: a stray name is a KeyError in `show`
                raise AtlasError(f"{path}: forest.edges[{i}].{end} {shown_value(e[end])} is not one of forest.nodes")
    for i, tree in enumerate(forest.get("trees", [])):
        _check(path, f"forest.trees[{i}]", tree, "strings")
    _check_decisions(path, forest.get("decisions", {}))
    for name, used in data.get("experts", {}).items():
        _check_keys(path, f"experts.{name}", used, _EXPERTS)
    known = {m["name"] for m in data["models"]}
    for tree, names in data.get("embedded", {}).items():
        _check(path, f"embedded.{tree}", names, "strings")
        stray = next((i for i, n in enumerate(names) if n not in known), None)
        if stray is not None:  # found only after scoring, as "no model named ... in the atlas"
            raise AtlasError(f"{path}: embedded.{tree}[{stray}] {shown_value(names[stray])} is not one of the models")


def _check_decisions(path: Path, decisions: dict) -> None:
    """The forest's decisions that `show` and the viewer format (a root confidence of text was a ValueError)."""
    _check_keys(path, "forest.decisions", decisions, _DECISIONS)
    for i, tree in enumerate(decisions.get("stage_trees") or []):
        _check_keys(path, f"forest.decisions.stage_trees[{i}]", tree, {"stage": "str", "confidence": "number"},
                    required=("stage", "confidence"))
    for i, name in enumerate(decisions.get("root_runner_up") or []):
        _check(path, f"forest.decisions.root_runner_up[{i}]", name, "str?")


def _check_keys(path: Path, where: str, obj, kinds: dict, required: tuple = ()) -> None:
    """``obj`` is an object whose keys named in ``kinds`` hold values of their kind."""
    _check(path, where, obj, "object")
    for key, kind in kinds.items():
        if key in obj or key in required:
            _check(path, f"{where}.{key}" if where else key, obj.get(key, _MISSING), kind)


def _check(path: Path, key: str, value, kind: str) -> None:
    if value is _MISSING:
        raise AtlasError(f"{path}: {key} is missing")
    if value is None and kind.endswith("?"):
        return
    test, words = _KINDS[kind.rstrip("?")]
    if not test(value):
        words += " or null" if kind.endswith("?") else ""
        raise AtlasError(f"{path}: {key} must be {words}; got {shown_value(value)}")


def shown_value(value) -> str:
    """The value as an error shows it: its repr, cut short (a whole list of models, or a pasted page as a query,
    is no help on one line)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
