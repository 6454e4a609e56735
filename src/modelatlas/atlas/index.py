"""The atlas index: every model of a collection with its recovered lineage and predicted properties.

An atlas folder (``atlas index build --out DIR``)::

    atlas.json              {"format": "modelatlas-atlas/1", "models": [...], "forest": {...}, "experts": {...}}
    embeddings.safetensors  only with text experts: "tree/<expert tree>" -> (n, r_T) unit-norm model embeddings
    atlas.html              a self-contained viewer (no network): the trees, a model table, a filter box

``models`` holds one :class:`ModelEntry` per model given, readable or not; ``forest`` is the lineage
(:meth:`modelatlas.lineage.forest.Forest.to_dict`); ``experts`` records which ProbeX experts made the
predictions and the text embeddings (their folders and layers), so a later search can load them again.
Files are written atomically; a reader that meets a missing or malformed file gets a one-line error naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, atomic_write_text, read_tensors
from modelatlas.errors import AtlasError
from modelatlas.lineage.forest import Forest

FORMAT = "modelatlas-atlas/1"
JSON_NAME, EMBED_NAME, HTML_NAME = "atlas.json", "embeddings.safetensors", "atlas.html"


@dataclass
class ModelEntry:
    """One model. ``tree`` is the 1-based lineage tree it was placed in (None when it could not be read);
    ``parent`` / ``score`` its recovered parent and that edge's confidence; ``predicted`` the class set its
    tree expert predicts, as [class, probability] pairs (probability > 0.5), best first; ``described`` the
    text expert's best-matching known descriptions as [prompt, probability] (top 3); ``notes`` say why a step
    was skipped for it (unreadable file, no known tree, a missing layer)."""

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

    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise AtlasError(f"no model named {name!r} in the atlas")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "models": [asdict(m) for m in self.models], "forest": self.forest.to_dict(),
                "experts": self.experts, "embedded": {t: names for t, (names, _) in self.embeddings.items()}}

    def save(self, folder: str | Path) -> Path:
        """Write atlas.json, embeddings.safetensors (when there are embeddings) and atlas.html, each atomically."""
        from modelatlas.atlas.html import render_html

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.embeddings:
            atomic_save_tensors(folder / EMBED_NAME, {f"tree/{t}": e for t, (_, e) in self.embeddings.items()})
        atomic_write_text(folder / HTML_NAME, render_html(self))
        atomic_write_json(folder / JSON_NAME, self.to_dict())  # last: a folder with atlas.json is complete
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Atlas:
        folder = Path(folder)
        path = folder / JSON_NAME if folder.is_dir() or not folder.suffix else folder
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise AtlasError(f"{path}: no atlas here (build one with `atlas index build PATH... --out DIR`)") from e
        except (OSError, ValueError) as e:
            raise AtlasError(f"{path}: cannot read the atlas ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise AtlasError(f"{path}: unknown atlas format {got!r} (expected {FORMAT})")
        try:
            models = [ModelEntry.from_dict(m) for m in data["models"]]
        except (KeyError, TypeError) as e:
            raise AtlasError(f"{path}: malformed 'models' ({e})") from e
        embeddings = _load_embeddings(path.parent, data.get("embedded", {}))
        return cls(models, Forest.from_dict(data.get("forest", {"nodes": [], "edges": []})),
                   dict(data.get("experts", {})), embeddings)


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
        out[tree] = (list(names), e)
    return out
