"""Edge directions known from outside the weights' statistics, and the placement of a tree that has them.

Two facts are known for certain when they apply (:class:`Known`):
  * the base that PEFT adapters were merged onto (``fit(adapter_base=...)``, ``--base``) is the root of its
    tree: each adapter merged onto it was trained from it;
  * a model made from a quantized model's dequantized values (a QLoRA merge, its values on that model's
    levels: :func:`~modelatlas.lineage.quantized.made_from_copy`) descends from it.
Either fixes the root of the tree (the base; the quantized model where the weights drew it below a model
made from it), so every edge's direction there is known and an MST edge's score is its placement margin
alone (:func:`place_tree`). Each known (ancestor, descendant) pair is also labelled evidence of the stage: its
per-layer kurtosis change votes on it (:func:`known_votes`, :func:`tree_evidence_known`).
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
    prim_mst,
    solve_tree,
    tree_evidence,
)
from modelatlas.lineage.root import layer_scales, per_layer, stage_lean

# Weight of a known pair's vote, in violation penalties (the unit of the unlabelled evidence, where an edge counts
# at most 1 and a chain's none). Along a true edge the summed kurtosis moved the way of its zoo's stage on 91 of
# 104 true edges of the 8 zoos of docs/benchmarks.md "Session 30: known descents vote on the stage" (q = 0.875:
# log-odds log(q / (1 - q)) = 1.95 nats per edge); a pair whose layers all move by their typical amount votes
# tanh(1) = 0.76, so 2.5 x 0.76 = 1.9 penalties, that log-odds. (The 80 known pairs of 24 LoRA stars: 79 leaned
# one way, mean |vote| 0.54, i.e. 1.35 penalties each.)
KNOWN_WEIGHT = 2.5


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


def known_votes(dist: np.ndarray, kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None,
                pairs: list[tuple[int, int]], votes: str = "scaled") -> np.ndarray:
    """(P,) each known (ancestor, descendant) pair's vote in [-1, 1] for "specialize" (> 0: kurtosis fell from
    ancestor to descendant; < 0: it rose, "generalize"): the mean over layers of tanh((k_l(a) - k_l(d)) / m_l),
    m_l the layer's median nonzero |change| over the tree's MST edges, as the root votes scale each layer
    (:func:`~modelatlas.lineage.root.edge_votes`; ``votes="sign"``: the mean sign). Time O(n^2 + (n + P) L)."""
    if not pairs:
        return np.zeros(0)
    lk = per_layer(kurtosis, layer_kurtosis)  # (n, L)
    a, d = np.array(pairs).T
    diff = lk[a] - lk[d]  # (P, L)
    if votes == "sign":
        return np.sign(diff).mean(1)
    u, v = np.array([(x, y) for x, nbrs in enumerate(prim_mst(dist)) for y in nbrs if x < y]).T
    return np.tanh(diff / layer_scales(lk[u] - lk[v])).mean(1)


def tree_evidence_known(cfg: LineageConfig, placement: str, trees: list[tuple], known: Known) -> tuple[np.ndarray, dict]:
    """(T,) each tree's own stage evidence in violation penalties (> 0: "specialize"), the known directions
    counted as labelled evidence, and details (``violations``, ``stage_known``).

    Along a known ancestor -> descendant pair, kurtosis falling says "specialize" and rising "generalize"
    outright, where the unlabelled evidence (:func:`~modelatlas.lineage.orient.tree_evidence`) must first find
    each stage's best root: a chain read backwards is as good a tree (no evidence at all), a star's reading
    with the root moved to a leaf loses one edge. Each pair adds :data:`KNOWN_WEIGHT` x its vote
    (:func:`known_votes`) to its tree's evidence; a tree whose root is known (the adapters' base) gives these
    votes instead of its unlabelled evidence, which would read it again with the root left free. Details add
    ``stage_known``: the pairs that voted, how many leaned each way, and their evidence. Time that of
    :func:`~modelatlas.lineage.orient.tree_evidence` + O(n^2 + (n + P) L) per tree."""
    own, votes, viol = np.zeros(len(trees)), [], {"specialize": 0, "generalize": 0}
    for t, (members, d, k, lk) in enumerate(trees):
        votes.append(known_votes(d, k, lk, known.pairs(members), cfg.root_votes))
        own[t] = KNOWN_WEIGHT * float(votes[-1].sum())
        if known.base not in members:
            free, bad = tree_evidence([(d, k)], cfg.lam, placement)
            own[t] += agreed(free[0], d, k, lk, cfg.root_votes)
            viol = {s: viol[s] + bad[s] for s in viol}
    v = np.concatenate([np.zeros(0), *votes])
    info = {"violations": viol}
    if len(v):
        info["stage_known"] = {"pairs": len(v), "specialize": int((v > 0).sum()),
                               "generalize": int((v < 0).sum()), "evidence": KNOWN_WEIGHT * float(v.sum())}
    return own, info


def agreed(count: float, dist: np.ndarray, kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None,
           votes: str = "scaled") -> float:
    """A tree's unlabelled stage evidence ``count`` (violation penalties, :func:`~modelatlas.lineage.orient.
    tree_evidence`) where its layers' votes (:func:`~modelatlas.lineage.root.stage_lean`) lean the same way,
    else 0. Why: the count reads each edge by the sign of its summed kurtosis, so in a small tree a layer's
    large swing on two edges decides it; the votes scale each layer by its typical change. Where the two
    readings of the same weights disagree, neither is the tree's evidence, and the tree follows the others
    (:mod:`.stage`). `atlas zoo make --preset demo --seed 16`, tree t1 (7 models): count +2, votes -6.3, read
    "specialize" with two edges reversed; on the 17 accuracy, 24 demo and 30 held-out zoos (213 trees) no
    other tree's readings disagree (docs/benchmarks.md, "Session 38: small trees' stage evidence"). Time O(n^2 + n L)."""
    if count == 0:
        return 0.0
    lean = stage_lean(prim_mst(dist), kurtosis, layer_kurtosis, votes)
    return count if lean * count > 0 else 0.0
