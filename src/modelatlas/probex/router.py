"""Routing a model to its Model Tree's expert (ProbeX, Sec. "tree experts").

Each tree is summarised by the centroid of its members' flattened weights (one layer) and a radius: the
largest member distance times ``slack`` (a one-model tree: the other trees' median radius relative to their
centroid norm). A model goes to the nearest centroid; when even that is farther than
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
from modelatlas.probex.fitted import check_fitted

NAN_WEIGHTS = "its weights hold NaN or inf values: a diverged or corrupt checkpoint"


class NotInAnyTreeError(AtlasError):
    """A model is farther from every known tree than that tree's radius."""


@dataclass(frozen=True)
class RouteResult:
    name: str
    tree: str | None  # None when the model belongs to no known tree
    nearest: str
    distance: float
    radius: float
    reason: str | None = None  # why the model could not be routed at all (unreadable, another layer shape)

    @property
    def known(self) -> bool:
        return self.tree is not None

    def message(self) -> str:
        if self.reason is not None:
            return f"{self.name}: not routed ({self.reason})"
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


def _distances(flat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, K), in float64 and without cdist's matmul shortcut: fine-tunes sit very close
    to their tree's centroid, and ||a||^2 + ||b||^2 - 2ab cancels catastrophically there (in float32 it
    inflated a tree's radius ninefold, letting strangers in)."""
    c = centroids.double()
    # 256 models at a time: float64 copies of a whole zoo's layer would double its memory
    return torch.cat([torch.cdist(rows.double(), c, compute_mode="donot_use_mm_for_euclid_dist")
                      for rows in flat.split(256)])


def _single_member_radii(radii: torch.Tensor, sizes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """A one-model tree has radius 0 (its centroid is the model), so only exact copies would reach it. It
    gets instead the median relative radius (radius / centroid norm) of the trees with several members,
    times its own centroid norm: the spread its tree would have if it were like the others. Without such
    trees the radius stays 0."""
    norms = centroids.norm(dim=1)  # (K,)
    many = (sizes > 1) & (norms > 0)
    if bool(many.all()) or not bool(many.any()):
        return radii
    rel = (radii[many] / norms[many]).median()
    return torch.where(sizes > 1, radii, rel * norms)


def _check_saved(path: Path, tensors: dict) -> None:
    """Centroids (K, D) and radii (K,), finite, radii >= 0: one radius for two trees was an IndexError when
    routing, and NaN centroids sent every model to no tree 'at distance nan'. CheckpointError naming ``path``."""
    missing = next((key for key in ("centroids", "radii") if key not in tensors), None)
    if missing is not None:  # (it was named as router.json lacking it)
        raise CheckpointError(path, f"has no tensor {missing!r}; train the experts again")
    centroids, radii = tensors["centroids"], tensors["radii"]
    for key, value in (("centroids", centroids), ("radii", radii)):
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"tensor {key!r} holds NaN or inf values (or is not floating point); "
                                        "train the experts again")
    if centroids.ndim != 2:
        raise CheckpointError(path, f"centroids must be (trees, weights); got shape {tuple(centroids.shape)}; train "
                                    "the experts again")
    if tuple(radii.shape) != (centroids.shape[0],):
        raise CheckpointError(path, f"radii must hold one radius per tree ({centroids.shape[0]}); got shape "
                                    f"{tuple(radii.shape)}; train the experts again")
    if bool((radii < 0).any()):
        raise CheckpointError(path, f"radii must be >= 0 (distances); got {radii.tolist()!r:.60}; train the experts again")


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
        x = torch.as_tensor(x, dtype=torch.float32, device="cpu")
        if x.ndim >= 1 and x.shape[0] == 0:
            raise ConfigError(f"router fit needs at least one model; X has shape {tuple(x.shape)}")
        if trees is None:
            trees = [f"tree{k}" for k in cluster_trees(x)]
        if x.ndim < 2 or len(trees) != x.shape[0]:  # a reshape would otherwise regroup the weights silently
            raise ConfigError(f"router fit needs one tree id per model: X has shape {tuple(x.shape)} "
                              f"(models first), trees has {len(trees)} entries")
        self.shape_ = tuple(x.shape[1:])
        flat = x.reshape(len(trees), -1)  # (B, D)
        bad = (~torch.isfinite(flat)).any(1).nonzero().flatten().tolist()
        if bad:  # one would make its tree's centroid NaN, and every model of it a stranger
            raise ConfigError(f"router fit: model {bad[0]} of X holds NaN or inf weights (a diverged or corrupt "
                              "checkpoint); drop it")
        self.trees_ = sorted({str(t) for t in trees})
        labels = np.array([self.trees_.index(str(t)) for t in trees])
        members = [torch.as_tensor(labels == k) for k in range(len(self.trees_))]
        means = [flat[m].sum(0, dtype=torch.float64) / int(m.sum()) for m in members]
        self.centroids_ = torch.stack(means).float()  # (K, D)
        dist = _distances(flat, self.centroids_)[np.arange(len(labels)), labels]  # (B,)
        # float64 like the distances it is compared with: with slack 1 the farthest member stays inside
        self.radii_ = _single_member_radii(torch.stack([dist[m].max() * self.slack for m in members]),
                                           torch.tensor([int(m.sum()) for m in members]), torch.stack(means))
        return self

    def route(self, x, names: list[str] | None = None) -> list[RouteResult]:
        """One :class:`RouteResult` per model (``tree`` None when it belongs to no known tree)."""
        check_fitted(self, "centroids_")
        x = torch.as_tensor(x, dtype=torch.float32, device="cpu")
        shape = getattr(self, "shape_", None)  # None: a router saved before shapes were recorded
        if shape is not None and tuple(x.shape) == shape:
            x = x.unsqueeze(0)  # one model
        flat = x.flatten(1) if x.ndim > 1 else x.reshape(1, -1)  # (B, D); no models: (0, D)
        if flat.shape[1] != self.centroids_.shape[1]:
            raise ConfigError(f"router expects {self.centroids_.shape[1]} weights per model; got {flat.shape[1]}")
        if shape is not None and tuple(x.shape[1:]) != shape:  # e.g. a transposed layer with as many weights
            raise ConfigError(f"router expects models of shape {shape}; got {tuple(x.shape[1:])}")
        names = names if names is not None else [f"model #{i}" for i in range(flat.shape[0])]
        if len(names) != flat.shape[0]:  # zip would silently drop the unnamed models
            raise ConfigError(f"route got {len(names)} names for {flat.shape[0]} models")
        dist = _distances(flat, self.centroids_)  # (B, K)
        finite = torch.isfinite(flat).all(1)  # (B,)
        out = []
        for name, row, ok in zip(names, dist, finite):
            if not ok:
                out.append(RouteResult(name, None, "", float("nan"), float("nan"), NAN_WEIGHTS))
                continue
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
        check_fitted(self, "centroids_")
        folder = Path(folder)
        atomic_save_tensors(folder / "router.safetensors", {"centroids": self.centroids_, "radii": self.radii_})
        shape = getattr(self, "shape_", None)  # None: loaded from a file that predates it
        atomic_write_json(folder / "router.json", {"slack": self.slack, "trees": self.trees_,
                                                   **({"shape": list(shape)} if shape is not None else {})})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TreeRouter:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "router.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(folder / "router.json", f"cannot read the tree router: {e}") from e
        tensors = read_tensors(folder / "router.safetensors")
        _check_saved(folder / "router.safetensors", tensors)
        try:
            router = cls(meta["slack"])
            router.trees_, router.centroids_, router.radii_ = meta["trees"], tensors["centroids"], tensors["radii"]
            if "shape" in meta:  # older routers did not record it; they check the weight count only
                router.shape_ = tuple(int(n) for n in meta["shape"])
        except KeyError as e:
            raise CheckpointError(folder / "router.json", f"tree router files lack {e}; train the experts again") from e
        except (TypeError, ValueError) as e:  # a JSON list, or a value of the wrong type
            raise CheckpointError(folder / "router.json", f"not a tree router's settings ({' '.join(str(e).split())});"
                                                          " train the experts again") from e
        trees = router.trees_  # else a number among them failed as a TypeError when sorted for a message
        if not isinstance(trees, list) or len(trees) != len(router.centroids_) or len(set(map(str, trees))) != len(
                trees) or not all(isinstance(t, str) for t in trees):
            raise CheckpointError(folder / "router.json", f"trees must list one tree per centroid "
                                                          f"({len(router.centroids_)}), each once by its name; got "
                                                          f"{router.trees_!r:.60}")
        _check_shape(folder / "router.json", getattr(router, "shape_", None), router.centroids_)
        return router


def _check_shape(path: Path, shape: tuple | None, centroids: torch.Tensor) -> None:
    """Refuse a recorded layer shape that is not two positive sizes of as many weights as a centroid holds (an
    edited router.json was blamed on index.json: 'the experts and the router expect different shapes')."""
    if shape is None:
        return
    if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] != centroids.shape[-1]:
        raise CheckpointError(path, f"shape must be the layer's two sizes, of {centroids.shape[-1]} weights (a "
                                    f"centroid's); got {list(shape)}; train the experts again")
