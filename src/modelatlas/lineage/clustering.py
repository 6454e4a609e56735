"""Splitting models into trees: with the number of trees K found from the data, or given.

**Finding K** (:func:`detect_trees`). Models of different trees start from different random
initialisations, so their weights are nearly uncorrelated: the *relative* distance
``||W_u - W_v|| / sqrt((||W_u||^2 + ||W_v||^2) / 2)`` is about sqrt(2) between unrelated models of equal
norm, whatever the architecture or weight scale, while a fine-tune stays close to its parent (typically
0.001-0.3; LoRA at high learning rates up to 0.75 in our zoos). Single-linkage merge heights are the edge lengths of the minimum spanning tree; sorted, the
merges that join two trees sit above a large jump. The cut is the largest ratio of consecutive heights
among those whose upper height is at least ``_FLOOR`` (so that a jump from a tiny LoRA edge to a long
full fine-tuning edge inside one tree is never mistaken for a tree boundary), when that ratio is at least
``tree_gap``. Without such a jump, merges above ``_UNRELATED`` split trees (between the largest
within-tree and the smallest between-tree values measured: 0.75 and 1.39). Time O(N^2) (scipy single linkage), memory O(N^2).

**Given K** (:func:`ward_clusters`): Ward hierarchical clustering cut at K clusters (MoTHer step 1).
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

_FLOOR = 0.8  # relative distance: a jump must reach at least this far to mark a new tree
_UNRELATED = 1.0  # relative distance: without a clear jump, merges above this join unrelated models


def merge_heights(dist: np.ndarray, method: str = "single") -> tuple[np.ndarray, np.ndarray]:
    """(scipy linkage matrix, its merge heights) of a symmetric distance matrix. Time O(N^2)."""
    cond = squareform(_symmetric(dist), checks=False)
    z = linkage(cond, method=method)
    return z, z[:, 2]


def detect_trees(rel: np.ndarray, tree_gap: float = 3.0) -> tuple[np.ndarray, dict]:
    """Tree labels (0..K-1) of N models from their relative distances, and how K was decided.

    The decision dict holds ``n_trees``, ``rule`` (``"gap"``, ``"threshold"`` or ``"single model"``),
    ``gap_ratio`` (the jump at the cut, or the largest jump seen) and ``cut`` (the height cut at).
    """
    n = rel.shape[0]
    if n == 1:
        return np.zeros(1, dtype=int), {"n_trees": 1, "rule": "single model", "gap_ratio": None, "cut": None}
    z, h = merge_heights(rel, "single")  # h ascending: single linkage merges in order
    h = np.maximum(h, 1e-12)
    ratios = h[1:] / h[:-1]  # ratios[j - 1]: jump between merge j-1 and merge j
    ok = (h[1:] >= _FLOOR) & (ratios >= tree_gap)
    if ok.any():
        j = int(np.argmax(np.where(ok, ratios, 0))) + 1  # merges j.. are not performed
        cut = float(np.sqrt(h[j - 1] * h[j]))  # geometric middle of the jump
        rule, ratio = "gap", float(ratios[j - 1])
    else:
        cut, rule = _UNRELATED, "threshold"
        ratio = float(ratios.max()) if len(ratios) else None
    labels = fcluster(z, t=cut, criterion="distance") - 1
    return _relabel(labels), {"n_trees": int(labels.max() + 1), "rule": rule, "gap_ratio": ratio, "cut": cut}


def ward_clusters(dist: np.ndarray, k: int) -> np.ndarray:
    """Labels 0..k-1 from Ward linkage on ``dist`` cut into ``k`` clusters. Time O(N^2)."""
    n = dist.shape[0]
    if k >= n:
        return np.arange(n)
    z, _ = merge_heights(dist, "ward")
    return _relabel(fcluster(z, t=k, criterion="maxclust") - 1)


def _symmetric(d: np.ndarray) -> np.ndarray:
    d = (np.asarray(d, dtype=np.float64) + np.asarray(d, dtype=np.float64).T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered in order of first appearance (stable output across runs)."""
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(x), len(order)) for x in labels])
