"""A training stage per tree (``stage="auto"``): each tree's own evidence, and the others' as a bounded prior.

MoTHer (Horwitz et al. 2024, step 3) orients edges by the stage: "specialize" (kurtosis falls along an edge)
or "generalize" (it rises). Until session 31 one stage was decided for all trees of a folder from their
summed evidence (:func:`~modelatlas.lineage.known.tree_evidence_known`, pooled). A folder may mix regimes (a small
model family trained from scratch beside fine-tunes of a pretrained one, LoRA adapters beside full
fine-tunes): there the pooled sum turned the trees of the minority regime backwards.

Rule: tree t's log-odds of "specialize" = e_t + clip(E - e_t, -c, c), e_t its own evidence
(:func:`~modelatlas.lineage.known.tree_evidence_known`, violation penalties), E the sum over all trees. The
other trees say which regime the folder is in, but a folder may mix regimes, so whatever they say, sharing
their stage is worth at most c penalties to a tree (c = log-odds of a tree sharing its folder's stage). A
tree whose own evidence exceeds c keeps its stage; a weaker one (a chain gives none, one violation's worth
is weak) follows the others. Where the others' evidence is below c, or every tree leans one way, the rule is
the pooled one. Time O(T).
"""

from __future__ import annotations

import math

import numpy as np

from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.known import Known, tree_evidence_known
from modelatlas.lineage.orient import pooled_stage

# The most the other trees' evidence counts for a tree, in violation penalties (log-odds: a tree shares its
# folder's stage with probability logistic(1.5) = 0.82). On the development zoos (docs/benchmarks.md, "Session
# 31: a training stage per tree": 67 trees of the accuracy suite and of the known-stage bench's other zoos) no
# tree of |own evidence| >= 2 leaned against its true edges (59 trees, 2 to 10 penalties), and the trees that
# did lean against them gave one penalty (a chain of 5 whose kurtosis dips once): any cap in (1, 2) keeps the
# first and turns the second with a folder that leans the other way; 1.5 is the middle.
# (Session 37 found a 7-model tree of +2 against its edges, demo seed 16: its layers' votes disagreed with its
# count, which :func:`~modelatlas.lineage.known.agreed` now sets to 0.)
SAME_STAGE_CAP = 1.5
# The fewest models read as they are (not quantized stand-ins) that decide a tree's stage without its stand-ins
# (:func:`as_stored`): three is the smallest tree whose kurtosis can favour a stage (two: one edge, either way).
MIN_AS_STORED = 3


def tree_stages(own: np.ndarray, cap: float = SAME_STAGE_CAP) -> tuple[list[str], np.ndarray]:
    """(stage per tree, (T,) log-odds of "specialize") from each tree's ``own`` evidence: own + the others'
    summed evidence clipped to [-cap, cap]. A tie (log-odds 0) takes the pooled stage. Time O(T)."""
    total = float(own.sum())
    odds = own + np.clip(total - own, -cap, cap)
    pooled = pooled_stage(total)[0]
    stages = [pooled if abs(x) < 1e-9 else "specialize" if x > 0 else "generalize" for x in odds]
    return stages, odds


def decide_tree_stages(cfg: LineageConfig, placement: str, trees: list[tuple],
                       known: Known, rounded: frozenset[str] = frozenset()) -> tuple[list[str], dict]:
    """The stage of each tree ((members, distances, kurtosis, per-layer kurtosis) each) from the weights and
    the known descents, and the decisions: ``stage`` (the stage most models' trees follow; ties: the pooled
    one), ``stage_mixed`` (trees differ), ``stage_confidence`` (logistic(|pooled evidence|); when mixed, the
    lowest confidence of the trees of ``stage``), ``stage_evidence`` (the pooled sum, as before session 31),
    ``violations``, ``stage_known``, ``stage_trees`` (:func:`stage_trees`) and, where some trees' evidence counted
    stand-ins of ``rounded`` (too few models read as they are, :func:`as_stored`), ``stage_from_stand_ins``,
    their number: such a stage is unreliable (bench/lineage_kquant_tree.py: stand-ins only, each with its own
    importance matrix, read "generalize" in 9 and a tie in 2 of 15 "specialize" trees). Time that of
    :func:`~modelatlas.lineage.known.tree_evidence_known`. ``rounded``: the models given only as files scaled by least
    squares (stand-ins, :func:`~modelatlas.lineage.rounding.least_squares_models`), left out of the evidence
    (:func:`as_stored`)."""
    stored = [as_stored(t, rounded, known.base) for t in trees]
    own, info = tree_evidence_known(cfg, placement, stored, known)
    total = float(own.sum())
    stages, odds = tree_stages(own)
    per_tree = stage_trees(stages, odds, own)
    stage, conf = pooled_stage(total)
    mixed = len(set(stages)) > 1
    if mixed:
        models = {s: sum(len(t[0]) for t, x in zip(trees, stages) if x == s) for s in ("specialize", "generalize")}
        stage = stage if models["specialize"] == models["generalize"] else max(models, key=models.get)
        conf = min(t["confidence"] for t in per_tree if t["stage"] == stage)
    biased = sum(s is t and any(m in rounded and m != known.base for m in t[0]) for s, t in zip(stored, trees))
    return stages, {"stage": stage, "stage_confidence": conf, "stage_evidence": total, **info,
                    "stage_mixed": mixed, "stage_trees": per_tree, **({"stage_from_stand_ins": biased} if biased else {})}


def as_stored(tree: tuple, rounded: frozenset[str], keep: str | None = None) -> tuple:
    """(members, distances, kurtosis, per-layer kurtosis) of ``tree`` without its members in ``rounded`` (but
    ``keep``). Why: a stand-in's kurtosis is its rounding's as much as its source's. llama.cpp's least-squares
    scales (the K-quants; its legacy types with an importance matrix, not told apart by type) shrink each
    block's largest value by 0.15-0.3 of a step, so a stand-in's debiased kurtosis reads 0.05-0.6 a layer
    under its source's, where a fine-tune moves it ~0.01: in the width-256 llama tree K-quant stand-ins of
    both children turned every seed's stage to "generalize" (docs/benchmarks.md, "Session 32: orientation
    of K-quant stand-ins"). ``rounded`` names the stand-ins recognised so (:func:`~modelatlas.lineage.
    rounding.least_squares_models`). The models read as they are (their
    grandparent-grandchild pairs included: the MST of the rest joins across a stand-in) decide the stage;
    the root is still chosen with every model. Fewer than :data:`MIN_AS_STORED` such models give no stage
    (two are one edge, read either way): the stand-ins count then. Time O(n^2 + n L)."""
    members, d, k, lk = tree
    idx = [i for i, m in enumerate(members) if m not in rounded or m == keep]
    if len(idx) == len(members) or len(idx) < MIN_AS_STORED:
        return tree
    return ([members[i] for i in idx], d[np.ix_(idx, idx)], k[idx],  # (n', n'), (n',)
            None if lk is None else lk[idx])  # (n', L)


def stage_trees(stages: list[str], odds: np.ndarray | None = None, own: np.ndarray | None = None) -> list[dict]:
    """``decisions["stage_trees"]``, one dict a tree (in the order of the forest's trees): ``stage``,
    ``evidence`` (the log-odds that decided it), ``own_evidence`` (the tree's alone) and ``confidence``
    (logistic(|evidence|)); with the stage given (no ``odds``): evidence None, confidence 1. Time O(T)."""
    if odds is None:
        return [{"stage": s, "evidence": None, "own_evidence": None, "confidence": 1.0} for s in stages]
    return [{"stage": s, "evidence": float(x), "own_evidence": float(e), "confidence": 1.0 / (1.0 + math.exp(-abs(x)))}
            for s, x, e in zip(stages, odds, own)]
