"""Configuration of lineage recovery: one dataclass, checked on construction."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from modelatlas.config_types import fits
from modelatlas.errors import ConfigError
from modelatlas.seeding import SEED_RANGE, is_seed

STAGES = ("auto", "specialize", "generalize")
DISTANCES = ("auto", "l2", "rank")
METHODS = ("atlas", "mother-paper")
PLACEMENTS = ("mst", "joint")
ORIENTS = ("votes", "kurtosis")
RANK_SKETCHES = ("count", "gaussian")
ROOT_VOTES = ("sign", "scaled")


@dataclass
class LineageConfig:
    """Settings of :class:`~modelatlas.lineage.LineageRecovery`.

    method: ``"atlas"`` (this library's recovery: K, stage and distance found from the data) or
        ``"mother-paper"`` (the published recipe: mean|dW| Ward clustering with ``n_trees`` given, RMS or
        rank distances, ``stage`` given; for comparison).
    stage: ``"specialize"`` (fine-tuning: kurtosis falls from parent to child), ``"generalize"``
        (pretraining-like training: kurtosis rises) or ``"auto"`` (decided from the weights).
    n_trees: number of trees, or None to find it from the data.
    lam: weight of the direction penalty, in units of the mean distance (paper: 0.3).
    layers: regular expression selecting tensors by name (``re.search``); None = square 2-D matrices
        (all matrices when a model has no square one).
    distance: ``"l2"`` (full fine-tuning: mean per-layer RMS of the difference), ``"rank"`` (LoRA: summed
        rank of the difference) or ``"auto"`` (per tree: rank when the edges of its RMS minimum spanning
        tree are low-rank differences, else nuclear norm x rank fraction; with ``method="mother-paper"``:
        rank for such a tree, else l2, the recipe's own distances).
    placement: ``"mst"`` (edges from the undirected minimum spanning tree of the distances, kurtosis only
        picks the root) or ``"joint"`` (MoTHer: the arborescence of distance + direction penalty; the
        mother-paper recipe always uses it).
    orient: how the root of an MST-placed tree is chosen: ``"votes"`` (each layer's kurtosis ordering votes
        on each edge, plus a weak prior that the root is central in the tree; :mod:`.root`) or
        ``"kurtosis"`` (the summed kurtosis: fewest violated edges).
    root_prior: weight of the centrality prior of ``orient="votes"`` (0: kurtosis votes only).
    root_votes: how one layer votes on an edge's direction: ``"scaled"`` (tanh of its kurtosis change over
        the layer's median change in the tree: noise-sized changes count little; the default since session 10)
        or ``"sign"`` (the sign of the change; the earlier default) (:func:`modelatlas.lineage.root.edge_votes`).
    sketch: columns of the random sketch used to estimate ranks (estimates saturate at this value).
    rank_sketch: how layers with more than 2 x ``sketch`` rows are reduced on the left before the Gaussian
        column sketch: ``"count"`` (each row, with a random sign, added to one of 2 x ``sketch`` buckets:
        O(n m), one pass) or ``"gaussian"`` (a dense random projection, O(n m s) per model). Layers with
        fewer rows are not reduced on the left.
    distance_sketch: layers of more than 4x this many weights get their full-FT distances from a seeded
        sign-bucket sketch of this size (O(N P + N^2 k) instead of O(N^2 P); unbiased, ~sqrt(2/k) relative
        spread per squared distance); None: exact Gram for every layer.
    rank_rtol: singular values below ``rank_rtol`` x the largest one do not count towards the rank.
    tree_gap: a ratio of consecutive single-linkage merge heights at least this large separates trees.
    merges: find models that are merges of other models given (weighted sums: linear, task arithmetic, SLERP,
        :mod:`~modelatlas.lineage.merges`; TIES / DARE, :mod:`~modelatlas.lineage.sparse_merges`; declared by a
        ``mergekit_config.yml``, :mod:`~modelatlas.lineage.declared`) and place them beside their parents,
        outside the trees.
    seed: seed of the random sketches.
    """

    method: str = "atlas"
    stage: str = "auto"
    n_trees: int | None = None
    lam: float = 0.3
    layers: str | None = None
    distance: str = "auto"
    placement: str = "mst"
    orient: str = "votes"
    root_prior: float = 2.0
    root_votes: str = "scaled"
    sketch: int = 64
    rank_sketch: str = "count"
    distance_sketch: int | None = 4096
    rank_rtol: float = 1e-2
    tree_gap: float = 3.0
    merges: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("stage", self.stage, STAGES)
        _choice("distance", self.distance, DISTANCES)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("orient", self.orient, ORIENTS)
        _choice("rank_sketch", self.rank_sketch, RANK_SKETCHES)
        _choice("root_votes", self.root_votes, ROOT_VOTES)
        if not 0 <= self.root_prior < math.inf:  # inf x 0 hops (a chain) would make every root score NaN
            raise ConfigError(f"root_prior must be >= 0 and finite (0: kurtosis votes only; default 2); got {self.root_prior!r}")
        if self.n_trees is not None and (not fits(self.n_trees, int) or self.n_trees < 1):
            raise ConfigError(f"n_trees must be a positive integer or None (find it from the data); got {self.n_trees!r}")
        if not 0 <= self.lam < math.inf:  # inf x 0 (an edge that keeps the direction) made edge costs NaN
            raise ConfigError(f"lam (--lambda) must be >= 0 and finite (paper: 0.3); got {self.lam!r}")
        if not fits(self.sketch, int) or self.sketch < 2:
            raise ConfigError(f"sketch must be an integer >= 2 (columns), e.g. 64; got {self.sketch!r}")
        if self.distance_sketch is not None and (not isinstance(self.distance_sketch, int) or self.distance_sketch < 16):
            raise ConfigError(f"distance_sketch must be an integer >= 16 or None (exact); got {self.distance_sketch!r}")
        if not is_seed(self.seed):  # 1.5 was truncated to 1 by the sketches, 2**64 repeated seed 0
            raise ConfigError(f"seed must be {SEED_RANGE}; got {self.seed!r}")
        if not 0 < self.rank_rtol < 1:
            raise ConfigError(f"rank_rtol must be in (0, 1), e.g. 1e-2; got {self.rank_rtol!r}")
        if not isinstance(self.merges, bool):
            raise ConfigError(f"merges must be True (find merged models) or False; got {self.merges!r}")
        if not self.tree_gap > 1:
            raise ConfigError(f"tree_gap must be > 1 (a ratio of merge heights), e.g. 3; got {self.tree_gap!r}")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as e:
                raise ConfigError(f"layers (--layers): invalid regular expression '{self.layers}' ({e}); "
                                  "e.g. 'attn|value'") from e
        if self.method == "mother-paper" and self.stage == "auto":
            raise ConfigError("stage (--stage): the mother-paper recipe must be told the stage ('specialize' or "
                              "'generalize')")
        if self.method == "mother-paper" and self.n_trees is None:
            raise ConfigError("n_trees (--trees): the mother-paper recipe must be told the number of trees K")


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")
