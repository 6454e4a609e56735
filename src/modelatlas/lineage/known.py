"""Edge directions known from outside the weights' statistics, and the placement of a tree that has them.

Two facts are known for certain when they apply (:class:`Known`):
  * the base that PEFT adapters were merged onto (``fit(adapter_base=...)``, ``--base``) is the root of its
    tree: each adapter merged onto it was trained from it;
  * a model made from a quantized model's dequantized values (a QLoRA merge, its values on that model's
    levels: :func:`~modelatlas.lineage.quantized.made_from_copy`) descends from it.
Either fixes the root of the tree (the base; the quantized model where the weights drew it below a model
made from it), so every edge's direction there is known and an MST edge's score is its placement margin
alone (:func:`place_tree`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.edmonds import minimum_spanning_arborescence
from modelatlas.lineage.orient import (
    edge_costs,
    edge_scores,
    hung_from,
    mst_edge_scores,
    orient_votes_sure,
    solve_tree,
)


@dataclass(frozen=True)
class Known:
    """``base``: the adapters' base among the models (or None), ``merged``: the models merged onto it;
    ``made``: model -> the quantized model it was made from (both as placed: a copy is named by the model it
    equals, so a quantized copy of a given model stands for that model)."""

    base: str | None = None
    merged: tuple[str, ...] = ()
    made: dict[str, str] = field(default_factory=dict)

    def pairs(self, members: list[str]) -> list[tuple[int, int]]:
        """(ancestor, descendant) index pairs known among one tree's ``members``: the base and each model
        merged onto it, each quantized model and each model made from it. Time O(n + known)."""
        pos = {n: i for i, n in enumerate(members)}
        from_base = [(self.base, m) for m in self.merged] if self.base in pos else []
        return [(pos[a], pos[d]) for a, d in from_base + [(b, m) for m, b in self.made.items()]
                if a in pos and d in pos and a != d]


class Placement(NamedTuple):
    """One tree placed: ``parent`` (-1 at the root), edge ``scores``, the root confidence and runner-up root
    (None unless kurtosis votes chose the root), the root the weights chose (``chosen``) and the root that the
    known directions imposed (``root``, None when none did)."""

    parent: list[int]
    scores: list[float]
    conf: float | None
    second: int | None
    chosen: int
    root: int | None


def place_tree(cfg: LineageConfig, placement: str, stage: str, tree: tuple, root: int | None = None,
               above: list[tuple[int, int]] = ()) -> Placement:
    """Place one tree; ``tree`` = (distances, kurtosis, per-layer kurtosis or None).

    ``root``: the index of the base PEFT adapters were merged onto, or None. Each adapter merged onto it was
    trained from it, so it is no model's child, whatever the kurtosis says: the tree hangs from it (root
    confidence 1.0). ``above``: (quantized model, model made from it) pairs; where the weights drew the
    quantized model below one made from it, the tree hangs from the quantized model instead (turning round
    the fewest edges that put it above that model). Where the models sit is still read from the distances
    (MST placement: the same undirected tree, :func:`~modelatlas.lineage.orient.hung_from`; joint: the
    arborescence with no edge into the root), so that an adapter whose training went on from another's (a
    later checkpoint of the same run) can still lie below it; rooted, every edge's direction is known, and
    an MST edge's score is its placement margin alone. Time that of the placement: O(n^2 + n L) (MST),
    O(n^3) (joint)."""
    d, k, lk = tree
    conf = second = sure = cost = None
    if placement == "mst" and cfg.orient == "votes":
        parent, conf, second, sure = orient_votes_sure(d, k, lk, stage, cfg.root_prior, cfg.root_votes)
    else:
        parent = solve_tree(d, k, stage, cfg.lam, placement)[0]
    chosen = parent.index(-1)
    if root is None:
        root = next((b for b, m in above if _ancestor(parent, m, b)), None)
    if placement == "joint":
        cost = edge_costs(d, k, stage, cfg.lam)
    if root is not None and placement == "mst":
        parent, sure, conf = hung_from(parent, root), np.ones(len(parent)), None if conf is None else 1.0
    elif root is not None:
        cost[:, root] = np.inf  # no edge into the root
        parent = minimum_spanning_arborescence(cost)
    scores = mst_edge_scores(d, k, stage, parent, sure) if placement == "mst" else edge_scores(cost, parent)
    return Placement(parent, scores, conf, second, chosen, root)


def _ancestor(parent: list[int], a: int, v: int) -> bool:
    """Whether ``a`` lies above ``v`` in the tree ``parent``. Time O(depth)."""
    while parent[v] >= 0:
        v = parent[v]
        if v == a:
            return True
    return False
