"""One tree's edge distances: RMS, summed rank (a LoRA tree) or nuclear norm x rank fraction, chosen from the
tree's own spectra (``distance="auto"``), and the rows of AWQ models read unsmoothed put in the tree's units.

MoTHer (Horwitz et al. 2024) places edges by weight distance: RMS for full fine-tuning, rank for LoRA. The
nuclear norm x rank fraction is this project's (docs/lineage.md, "How it works" step 4). Split out of
:mod:`.recover` in session 31. Times in each docstring.
"""

from __future__ import annotations

import numpy as np

from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.distances import PairStats
from modelatlas.lineage.orient import prim_mst
from modelatlas.lineage.rounding import MERGE_KIND, LayerRounding
from modelatlas.lineage.spectra import spectral_distances

SHOWN = 0.5  # an update is seen when half its energy is in values over the noise's edge (_hidden_tree)
# a LoRA tree's updates stand out whole: 0.94-1.0 of their energy over the noise on the development zoos' stand-ins
# (any type); full 2 % updates under Q6_K (width-256 llama tree) show 0.53-0.55 in 20 % of the ranks (_low_rank_tree)
LOW_RANK_SHOWN = 0.75
NEIGHBOURS = 12  # spectra (rank) are computed for each model's 12 nearest models by RMS: O(12 n), not O(n^2)


def with_views(d: np.ndarray, kind: str, st: PairStats, idx: np.ndarray, views: list[int]) -> np.ndarray:
    """Tree distances ``d`` (``kind``), rows and columns of ``views`` (AWQ models read unsmoothed) their RMS times
    the median ``d`` / RMS of the others' neighbour pairs: a view's noise differs per column, which the spectra's
    Marchenko-Pastur shrinkage (iid) leaves in (everyone's parent under "nuclear*rank"). Time O(n^2 log n)."""
    rms = st.rms[np.ix_(idx, idx)]
    others = np.array([k for k in range(len(idx)) if k not in set(views)], dtype=int)
    if kind == "l2" or not views:
        return d
    if len(others) < 2:  # no plain pairs to scale the views' RMS by
        return rms
    pairs = others[_candidate_pairs(rms[np.ix_(others, others)], NEIGHBOURS)]  # (P, 2) in the tree's positions
    ratio = float(np.median(d[pairs[:, 0], pairs[:, 1]] / np.maximum(rms[pairs[:, 0], pairs[:, 1]], 1e-30)))
    out = d.copy()
    out[views, :], out[:, views] = rms[views, :] * ratio, rms[:, views] * ratio
    return out


def tree_distance(cfg: LineageConfig, st: PairStats, idx: np.ndarray, views: list[int] = ()
                   ) -> tuple[np.ndarray, str]:
    """One tree's edge distances and their kind ("l2", "rank", "nuclear*rank"; ``views`` not in the choice).

    ``auto``: when nearly all (90%) edges of the tree's RMS minimum spanning tree differ by a rank below a quarter
    of the sketch, ranks that carry most of the update (a LoRA tree, :func:`_low_rank_tree`), the summed rank is
    used (RMS breaks ties). Otherwise nuclear norm x rank fraction: a fine-tuning update is low-rank-ish too, and a
    grandparent differs by the *sum* of two updates in different subspaces, whose nuclear norms (unlike Frobenius
    norms) add and whose ranks add, even where it is not farther in RMS. Spectra are computed for near-neighbour
    pairs only (each model's ``NEIGHBOURS`` nearest by RMS; all pairs for the paper's recipe); other pairs count as
    far (10 x the largest computed distance, full rank). With ``method="mother-paper"``, ``auto`` is the recipe's
    own choice: rank for a LoRA tree, else RMS (``l2``). A tree of quantized models whose updates are hidden under
    the rounding noise (:func:`_hidden_tree`) takes RMS (debiased for the rounding) in either; one whose models are
    all quantized (alike, :func:`_one_rounding`; or in several types, counted over the coarsest's noise,
    :func:`_common_noise`) nuclear norm x signal rank (the rank over the noise) in ``auto``, whatever the LoRA test
    says. Time O(n k L n_l s^2)."""
    rms, paper = st.rms[np.ix_(idx, idx)], cfg.method == "mother-paper"
    if cfg.distance == "l2" or len(idx) < 2 or not st.sketches:
        return rms, "l2"
    sk = [s[idx] for s in st.sketches]
    pairs = np.stack(np.triu_indices(len(idx), 1), 1) if paper else _candidate_pairs(rms, NEIGHBOURS)
    common = None if paper else _common_noise(st.rounding, idx)
    ranks, nuc, cap, signal, seen = spectral_distances(sk, pairs, cfg.rank_rtol, [r.subset(idx) for r in st.rounding],
                                                       True, common)
    frac, nuclear = _pair_matrix(pairs, ranks / cap, len(idx), 1.0), _pair_matrix(pairs, nuc, len(idx), None)
    low = _pair_matrix(pairs, signal / cap, len(idx), 1.0)  # ranks above a quantized model's rounding noise
    shown = _pair_matrix(pairs, seen, len(idx), 1.0)  # the update's share those ranks carry
    kind = cfg.distance
    if kind == "auto":
        plain = np.setdiff1d(np.arange(len(idx)), views)  # (a view's spectra: see with_views)
        kind = _auto_kind(*(m[np.ix_(plain, plain)] for m in (rms, low, shown)), paper)
        if kind != "l2" and not paper and (common is not None or _one_rounding(st.rounding, idx)):
            return nuclear * low, "nuclear*rank"  # the rank over the noise, which every pair carries alike
    if kind == "l2":
        return rms, "l2"
    if kind == "rank":
        if paper:
            return low * cap, "rank"
        return low * cap + 0.01 * rms / max(float(rms.max()), 1e-30), "rank"  # RMS only breaks ties
    return nuclear * frac, "nuclear*rank"


def _auto_kind(rms: np.ndarray, low: np.ndarray, shown: np.ndarray, paper: bool) -> str:
    """``auto``'s distance for one tree from its pairs' RMS, signal-rank fraction ``low`` and the update's share
    those ranks carry ``shown``. "l2" when the updates are hidden under rounding noise (:func:`_hidden_tree`):
    the few values over the noise's edge are then no evidence of low rank, and the shrunk spectra see a
    quarter of each update; "rank" for a LoRA tree (:func:`_low_rank_tree`); else "nuclear*rank" ("l2" for
    the paper's recipe, which has only its own two distances). O(n^2)."""
    if len(rms) < 2:
        return "l2" if paper else "nuclear*rank"
    edges = _mst_edges(rms)
    if _hidden_tree(shown[edges[:, 0], edges[:, 1]]):
        return "l2"
    if _low_rank_tree(low[edges[:, 0], edges[:, 1]], shown[edges[:, 0], edges[:, 1]]):
        return "rank"
    return "l2" if paper else "nuclear*rank"


def _mst_edges(rms: np.ndarray) -> np.ndarray:
    """(n - 1, 2) edges u < v of the RMS minimum spanning tree. MST edges, not each model's nearest neighbour:
    a full fine-tune whose LoRA children are its nearest models is nobody's nearest itself, yet the edge that
    joins it to its parent is in the MST (and one full fine-tuning edge would be misplaced by rank alone).
    O(n^2)."""
    adj = prim_mst(rms)
    return np.array([(u, v) for u in range(len(adj)) for v in adj[u] if u < v])  # (n - 1, 2)


def _low_rank_tree(frac: np.ndarray, shown: np.ndarray) -> bool:
    """Whether a tree is a LoRA tree: nearly all (90%) of its MST edges (their signal-rank fractions ``frac``)
    differ by a rank below a quarter of the sketch, and those ranks carry most (the median edge's ``shown`` at
    least :data:`LOW_RANK_SHOWN`) of the update. A full update half under the noise (Q6_K files of 2 % fine-tunes:
    a fifth of the ranks, half the energy) read as LoRA there, and the summed ranks, all alike, placed a
    sibling and reversed an edge of each of 3 seeds (6/12 against 9/12 under nuclear x rank). O(n)."""
    return bool(np.quantile(frac, 0.9) < 0.25 and np.median(shown) >= LOW_RANK_SHOWN)


def _hidden_tree(shown: np.ndarray) -> bool:
    """Whether most (the median) of a tree's MST edges carry under ``SHOWN`` of their update's energy in the
    values over the rounding noise's edge (``shown``; 1 unquantized). A LoRA update stands out (0.94-1.0 on
    the development zoos as Q4_0 stand-ins), a trained full fine-tune mostly (0.71-1.0); a full update of
    1 % under a 4-bit rounding of ~8 % does not (0.22-0.25: seven 1B Q4_K_M files; docs/benchmarks.md,
    session 31). O(n)."""
    return bool(np.median(shown) < SHOWN)


def _one_rounding(rounding: list[LayerRounding], idx: np.ndarray) -> bool:
    """Whether every model of the tree ``idx`` is quantized, each layer to one type for all (or left unquantized
    by all), with a rounding variance: every pair then carries the same noise, so the ranks over it (signal
    ranks) compare across pairs, and such a tree takes nuclear norm x signal-rank fraction. Under 4-bit noise
    the LoRA test does not tell full trees from LoRA trees (16 of 17 development zoos as Q4_0 stand-ins read
    "rank", full ones too); nuclear norm x signal rank placed 560 of their 612 edges, rank 548, nuclear norm x
    the rank before the shrinkage 555 (docs/benchmarks.md, session 32). Not so when a pair holds an unquantized
    model (its values under the noise count, the others' do not: 164 of 360 held-out edges,
    :func:`~.spectra.spectral_distances`), nor for types of two noise levels (each pair's own signal ranks
    placed 498 of 612 development edges as Q4_0 and Q5_1 stand-ins: those take :func:`_common_noise`), nor for merged
    QLoRA models (:data:`~.rounding.MERGE_KIND`: no noise between them is shrunk). O(n L)."""
    walk = _rounding_walk(rounding, idx)
    return walk is not None and not walk[1] and any(c > 0 for c in walk[0])


def _common_noise(rounding: list[LayerRounding], idx: np.ndarray) -> list[float] | None:
    """Per layer, the pair noise energy over whose edge a tree of two or more quantization types counts its
    signal ranks and nuclear norm (``common`` of :func:`~.spectra.spectral_distances`): twice the largest
    rounding energy of the tree's models (two independent roundings of the coarsest). None unless every model
    is quantized in each layer (or none is; rounding variances, no merged QLoRA model) and some layer holds
    two types: for one type :func:`_one_rounding`. Over each pair's own noise edge a finer pair (Q5_1's
    rounding is ~1/4 of Q4_0's) counts more of a full update's small values and reads farther (the
    development zoos as Q4_0 and Q5_1 stand-ins: 484 -> 564 of 612 edges; docs/benchmarks.md, session 32).
    O(n L)."""
    walk = _rounding_walk(rounding, idx)
    return walk[0] if walk is not None and walk[1] else None


def _rounding_walk(rounding: list[LayerRounding], idx: np.ndarray) -> tuple[list[float], bool] | None:
    """The one walk over the layers behind :func:`_one_rounding` and :func:`_common_noise`: per layer twice the
    largest rounding energy of the tree ``idx``'s models (0 for a layer none quantizes; over 0 for a quantized
    one), and whether some layer holds two types. None unless each layer is quantized by every model or by none,
    with a rounding variance, and no model is a merged QLoRA model. O(n L)."""
    common, mixed = [], False
    for layer in rounding:
        kinds = set(layer.kinds[idx].tolist())
        if kinds == {None}:
            common.append(0.0)
            continue
        if None in kinds or MERGE_KIND in kinds or not bool((layer.energy[idx] > 0).all()):
            return None
        mixed = mixed or len(kinds) > 1
        common.append(2 * float(layer.energy[idx].max()))
    return common, mixed


def _pair_matrix(pairs: np.ndarray, values: np.ndarray, n: int, fill: float | None) -> np.ndarray:
    """(n, n) symmetric matrix with ``values`` at ``pairs``, 0 on the diagonal, ``fill`` elsewhere
    (None: 10 x the largest value, i.e. "far")."""
    far = 10 * float(values.max()) if fill is None and len(values) else (fill or 0.0)
    out = np.full((n, n), far)
    out[pairs[:, 0], pairs[:, 1]] = out[pairs[:, 1], pairs[:, 0]] = values
    np.fill_diagonal(out, 0)
    return out


def _candidate_pairs(dist: np.ndarray, k: int) -> np.ndarray:
    """(P, 2) pairs u < v where v is among u's k nearest by ``dist`` or the reverse. Time O(n^2 log n)."""
    n = dist.shape[0]
    order = np.argsort(dist + np.diag(np.full(n, np.inf)), axis=1)[:, :min(k, n - 1)]  # (n, k)
    rows = np.repeat(np.arange(n), order.shape[1])
    a, b = np.minimum(rows, order.ravel()), np.maximum(rows, order.ravel())
    return np.unique(np.stack([a, b], 1), axis=0)


def summarise(kinds) -> str:
    """One label for the distances used by the trees ("l2", "rank", "nuclear*rank" or "mixed: ...")."""
    kinds = sorted(set(kinds))
    return kinds[0] if len(kinds) == 1 else "mixed: " + ", ".join(kinds) if kinds else "none"
