"""Routing a model to its Model Tree's expert (ProbeX, Sec. "tree experts").

Each tree is summarised by the centroid of its members' flattened weights (one layer) and a radius: the
largest member distance times ``slack``. A model goes to the nearest centroid; when even that is farther than
the tree's radius the model belongs to no known tree and the router says so instead of guessing. The paper
reports nearest-tree-centroid routing as 100% accurate; the trees come from the zoo's lineage labels or
from lineage clustering (``modelatlas.lineage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_tensors
from modelatlas.errors import AtlasError, CheckpointError, ConfigError


class NotInAnyTreeError(AtlasError):
    """A model is farther from every known tree than that tree's radius."""


@dataclass(frozen=True)
class RouteResult:
    name: str
    tree: str | None  # None when the model belongs to no known tree
    nearest: str
    distance: float
    radius: float

    @property
    def known(self) -> bool:
        return self.tree is not None

    def message(self) -> str:
        if self.known:
            return f"{self.name}: tree {self.tree} (distance {self.distance:.4g} <= radius {self.radius:.4g})"
        return (f"{self.name} belongs to no known tree: nearest tree {self.nearest!r} is at distance "
                f"{self.distance:.4g}, beyond its radius {self.radius:.4g}")


def cluster_trees(x) -> np.ndarray:
    """Tree labels (0..K-1) of B models from one layer, K found from the data by lineage clustering
    (:func:`modelatlas.lineage.clustering.detect_trees` on relative distances). Time and memory O(B^2 + B D)."""
    from modelatlas.lineage.clustering import detect_trees

    flat = torch.as_tensor(x, dtype=torch.float64)
    flat = flat.reshape(flat.shape[0], -1)  # (B, D)
    sq = flat.pow(2).sum(1)
    rel = torch.cdist(flat, flat) / ((sq[:, None] + sq[None, :]) / 2).sqrt().clamp_min(1e-12)  # (B, B)
    labels, _ = detect_trees(rel.numpy())
    return np.asarray(labels)


class TreeRouter:
    """Nearest-tree-centroid router with an out-of-tree check.

    ``fit(X, trees)``: X (B, ...) one layer per model, ``trees`` the tree id of each. Time O(B D) to fit and
    O(B K D) to route B models among K trees of D weights; memory O(K D).
    """

    def __init__(self, slack: float = 1.5):
        if not slack >= 1:
            raise ConfigError(f"TreeRouter slack must be >= 1 (a multiple of the largest member distance); got {slack!r}")
        self.slack = slack

    def fit(self, x, trees=None) -> TreeRouter:
        """``trees`` None: find the trees with lineage clustering (:func:`cluster_trees`)."""
        if trees is None:
            trees = [f"tree{k}" for k in cluster_trees(x)]
        flat = torch.as_tensor(x, dtype=torch.float32).reshape(len(trees), -1)  # (B, D)
        self.trees_ = sorted({str(t) for t in trees})
        labels = np.array([self.trees_.index(str(t)) for t in trees])
        self.centroids_ = torch.stack([flat[labels == k].mean(0) for k in range(len(self.trees_))])  # (K, D)
        dist = torch.cdist(flat, self.centroids_)[np.arange(len(labels)), labels]  # (B,)
        self.radii_ = torch.stack([dist[labels == k].max() * self.slack for k in range(len(self.trees_))])
        return self

    def route(self, x, names: list[str] | None = None) -> list[RouteResult]:
        """One :class:`RouteResult` per model (``tree`` None when it belongs to no known tree)."""
        flat = torch.as_tensor(x, dtype=torch.float32)
        flat = flat.reshape(flat.shape[0], -1)  # (B, D)
        if flat.shape[1] != self.centroids_.shape[1]:
            raise ConfigError(f"router expects {self.centroids_.shape[1]} weights per model; got {flat.shape[1]}")
        names = names if names is not None else [f"model #{i}" for i in range(flat.shape[0])]
        dist = torch.cdist(flat, self.centroids_)  # (B, K)
        out = []
        for name, row in zip(names, dist):
            k = int(row.argmin())
            d, r = float(row[k]), float(self.radii_[k])
            out.append(RouteResult(name, self.trees_[k] if d <= r else None, self.trees_[k], d, r))
        return out

    def route_strict(self, x, names: list[str] | None = None) -> list[str]:
        """Tree ids; raises NotInAnyTreeError naming the first model outside every tree."""
        results = self.route(x, names)
        for res in results:
            if not res.known:
                raise NotInAnyTreeError(res.message())
        return [res.tree for res in results]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        atomic_save_tensors(folder / "router.safetensors", {"centroids": self.centroids_, "radii": self.radii_})
        atomic_write_json(folder / "router.json", {"slack": self.slack, "trees": self.trees_})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TreeRouter:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "router.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(folder, f"cannot read the tree router: {e}") from e
        tensors = read_tensors(folder / "router.safetensors")
        router = cls(meta["slack"])
        router.trees_, router.centroids_, router.radii_ = meta["trees"], tensors["centroids"], tensors["radii"]
        return router
