"""Lineage recovery end to end: :class:`LineageRecovery` (estimator) and :func:`recover_lineage` (twin).

Pipeline (MoTHer, Horwitz et al. 2024, with the additions described in ``docs/lineage.md``):
  1. open the models and split them by architecture (:mod:`.sources`);
  2. one streaming pass per architecture: Gram-matrix distances, kurtosis, rank sketches (:mod:`.distances`);
  3. trees: K found from the relative-distance gap, or Ward with K given (:mod:`.clustering`);
  4. per tree, the edge distance: RMS (full fine-tuning), summed rank (LoRA), or nuclear norm x rank fraction
     when low-rank differences are found (``distance="auto"``);
  5. the stage of each tree from its own evidence, the other trees' counting at most 1.5 violation penalties
     (:mod:`.stage`; known descents, :mod:`.known`, as labelled evidence), or given for all; per tree,
     the edges of the undirected minimum spanning tree of the distances oriented from the root that best keeps
     the kurtosis direction (or, ``placement="joint"``, MoTHer's Chu-Liu/Edmonds arborescence of distance +
     penalty); edge confidence (:mod:`.orient`).
``method="mother-paper"`` runs the published recipe instead (mean|dW| + Ward with the true K, RMS or rank
distances, the stage given, lambda = 0.3) as a baseline.

Time: O(L N P + L N^2 min(P, k)) for the distance pass (L layers of P weights, N models, distance sketch k;
exact O(L N^2 P) for layers of <= 4k weights or ``distance_sketch=None``) + O(sum over trees n^3) for
Edmonds + rank estimates O(pairs L n s^2) within trees when ranks are used. Memory O(N min(P_l, 4k) + P_l +
N k + N^2): large layers are streamed one model at a time (:mod:`.distances`).
"""

from __future__ import annotations

import numpy as np

from modelatlas.errors import ConfigError
from modelatlas.lineage.clustering import detect_trees, ward_clusters
from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.copies import split_copies, split_same_model
from modelatlas.lineage.declared import split_all_merges
from modelatlas.lineage.distances import PairStats, stream_pair_stats
from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.known import Known, Placement, place_tree
from modelatlas.lineage.merges import MERGE_TOL, main_parent
from modelatlas.lineage.qlora import mark_merges
from modelatlas.lineage.quantized import least_squares_fitted, quant_type
from modelatlas.lineage.rounding import least_squares_models
from modelatlas.lineage.runner_up import runner_up_parents
from modelatlas.lineage.shared_layers import described, extra_layers
from modelatlas.lineage.sources import (
    adapter_roles,
    as_checkpoints,
    gguf_aligned,
    group_by_architecture,
    own_layers,
)
from modelatlas.lineage.stage import decide_tree_stages, stage_trees
from modelatlas.lineage.tree_distance import summarise, tree_distance, with_views
from modelatlas.lineage.unsmoothed import unsmoothed
from modelatlas.progress import Progress


class LineageRecovery:
    """Recover the directed lineage forest of a set of models from their weights.

    ``LineageRecovery(config).fit(weights)``; ``weights`` is a list of paths or open
    :class:`~modelatlas.weights.Checkpoint`, or a dict ``name -> {tensor name: tensor}``.
    Fitted attributes: ``names_``, ``forest_``, ``edges_``, ``roots_``, ``clusters_`` (tree label per
    model, aligned with ``names_``), ``n_trees_``, ``stage_`` (the stage of most models; each tree's in
    ``decisions_["stage_trees"]``), ``stage_confidence_``, ``distances_``
    ((N, N) edge distances, NaN between architectures and for merged models), ``kurtosis_`` ((N,)), ``decisions_``, ``skipped_``.
    Complexity: see the module docstring.
    """

    def __init__(self, config: LineageConfig | None = None, **params):
        self.config = config
        self.params = params

    def fit(self, weights, progress: Progress | None = None, adapter_base=None) -> LineageRecovery:
        """``adapter_base``: an open :class:`~modelatlas.weights.Checkpoint` (full weights) that PEFT adapter
        paths among ``weights`` are merged onto; without it an adapter (an update, not a model) is skipped. Given
        among ``weights`` too (the same checkpoint, or the same model on disk), it is the first model and the
        root of its tree (:func:`_place_tree`; ``decisions["adapter_base"]``)."""
        cfg = self.config if self.config is not None else LineageConfig(**self.params)
        ckpts, skipped = as_checkpoints(weights, adapter_base=adapter_base)
        base, merged = adapter_roles(ckpts, adapter_base)  # base first below: a copy of it is no parent
        ckpts, renamed, unmapped = gguf_aligned(ckpts if base is None else sorted(ckpts, key=lambda c: c.name != base), cfg.layers)
        groups, rules, shared = _grouped(ckpts, cfg.layers, skipped)
        names, stats, duplicates, lowp, outside, quantized, made, same, merges, awq, fitted, mixed, declared = \
            [], [], {}, {}, {}, {}, {}, {}, [], {}, set(), {}, {}  # mixed: lineage.merges; merges: lineage.qlora
        for members, layers in groups:
            members, found = _as_read(members, layers, merges, awq)
            st = _pair_stats(cfg, members, layers, progress)
            keep = [i for i in range(len(members)) if i not in st.failed]
            skipped.update({members[i].name: r for i, r in st.failed.items()})
            keep = split_copies(members, layers, st, keep, duplicates, lowp, outside, made, shared)
            keep = split_same_model(members, layers, st, keep, duplicates, lowp, same)
            keep = split_all_merges(members, layers, st, keep, mixed, declared) if cfg.merges else keep
            _add_quantized(members, keep, layers, found, quantized, fitted)
            names.append([members[i].name for i in keep])
            stats.append(_subset(st, keep))
        if not any(names):
            raise ConfigError(_nothing_comparable(skipped))
        self._fit_groups(cfg, names, stats, rules, skipped, _known(base, merged, made, duplicates, outside, names),
                         set(awq) - set(duplicates), least_squares_models(quantized, frozenset(fitted)))  # (an AWQ copy of a given source is placed as it)
        if duplicates or outside or mixed:
            self._add_duplicates(duplicates, lowp, outside, mixed)
        # nf4_merges: float models read as merged QLoRA models (lineage.qlora); quantized, but no model given is
        # the one it was made from: placed as a model; same: roundings of one model not given (lineage.rounding);
        # GGUF files compared under llama.cpp's names or (unmapped) their own; awq_unsmoothed: rescaling undone
        # (lineage.unsmoothed); shared_layers: compared on fewer layers than their own (lineage.shared_layers)
        extra = {"made_from_quantized": made, "quantized_models": quantized, "same_model_roundings": same,
                 "gguf_names": renamed, "gguf_unmapped": unmapped, "nf4_merges": merges, "declared_merges": declared,
                 "awq_unsmoothed": {n: r for n, r in awq.items() if n not in duplicates},
                 "shared_layers": described(shared)}
        self.forest_.decisions.update({k: v for k, v in extra.items() if v})
        return self

    def _fit_groups(self, cfg, names, stats, rules, skipped, known: Known | None = None,
                    unsmoothed: set[str] = frozenset(), rounded: frozenset[str] = frozenset()) -> None:
        """Trees, stage and edges of the models kept (``names`` and ``stats`` per architecture group); ``known``:
        the directions known from outside the weights (the adapters' base, quantized bases: :mod:`.known`);
        ``unsmoothed``: the AWQ models read with their rescaling undone (:func:`~.tree_distance.with_views`);
        ``rounded``: K-quant stand-ins, left out of the stage's evidence (:func:`~.stage.as_stored`)."""
        known, (labels, k_info) = known or Known(), _cluster(cfg, stats)
        flat = [n for g in names for n in g]
        trees = _tree_members(labels, stats)
        views = [[k for k, i in enumerate(idx) if names[g][i] in unsmoothed] for g, idx in trees]
        found = [tree_distance(cfg, stats[g], idx, v) for (g, idx), v in zip(trees, views)]  # (distances, kind) each
        dists = [with_views(d, kind, stats[g], idx, v) for (d, kind), (g, idx), v in zip(found, trees, views)]
        dist_info = [kind for _, kind in found]
        kurt = [stats[g].kurtosis[idx] for g, idx in trees]
        lks = [None if stats[g].layer_kurtosis is None else stats[g].layer_kurtosis[idx] for g, idx in trees]
        members = [[names[g][i] for i in idx] for g, idx in trees]
        placement = "joint" if cfg.method == "mother-paper" else cfg.placement
        placed = list(zip(members, dists, kurt, lks))
        if cfg.stage == "auto":  # each tree its own stage where its evidence is strong enough (:mod:`.stage`)
            stages, s_info = decide_tree_stages(cfg, placement, placed, known, rounded)
        else:
            stages = [cfg.stage] * len(placed)
            s_info = {"stage": cfg.stage, "stage_confidence": 1.0, "stage_evidence": None, "stage_mixed": False,
                      "stage_trees": stage_trees(stages)}
        edges, t_info = _place_trees(cfg, placement, stages, placed, known, flat)
        decisions = {"method": cfg.method, "stage_given": cfg.stage != "auto", "n_trees": len(trees), **k_info, **s_info,
                     "lambda": cfg.lam, "placement": placement,
                     "orient": cfg.orient if placement == "mst" else "joint", **t_info,
                     "distance": summarise(dist_info), "layers": rules, "architectures": len(names)}
        kurt_all = np.concatenate([s.kurtosis for s in stats])
        self.forest_ = Forest(flat, edges, decisions, members, dict(zip(flat, kurt_all.tolist())), skipped)
        self._set_attributes(flat, labels, stats, trees, dists, kurt_all)

    def _set_attributes(self, flat, labels, stats, trees, dists, kurt_all) -> None:
        f = self.forest_
        offsets = np.cumsum([0] + [len(s.kurtosis) for s in stats])
        d = np.full((len(flat), len(flat)), np.nan)
        for g, s in enumerate(stats):
            d[offsets[g]:offsets[g + 1], offsets[g]:offsets[g + 1]] = s.rms
        for (g, idx), dt in zip(trees, dists):
            glob = offsets[g] + idx
            d[np.ix_(glob, glob)] = dt
        self.names_, self.edges_, self.roots_ = flat, f.edges, f.roots()
        self.clusters_, self.n_trees_ = labels, len(trees)
        self.stage_, self.stage_confidence_ = f.decisions["stage"], f.decisions["stage_confidence"]
        self.distances_, self.kurtosis_ = d, kurt_all
        self.decisions_, self.skipped_ = f.decisions, f.skipped

    def _add_duplicates(self, duplicates: dict[str, str], lowp: dict[str, str], outside: dict[str, dict],
                        mixed: dict[str, dict] | None = None) -> None:
        """Put each copy back beside the model it equals: a node right after it, in its tree, joined by a
        ``"duplicate"`` edge (``"precision"`` for a copy stored at the lower precision ``lowp[name]``; score 1,
        distance 0). A model of ``outside`` (equal on the compared layers only) goes beside its model the same
        way, joined by a ``"trained"`` edge of score 0 (which way it went, those layers cannot tell) and
        distance 0, and is listed in ``decisions["outside_layers"]``. Fitted arrays are extended by copying
        the row of the model each one equals. A merge of other models (``mixed``, :mod:`.merges`) goes beside its
        most weighted parent, joined by a ``"merge"`` edge (score 1 - residual / MERGE_TOL, distance its RMS one)
        and listed in ``decisions["model_merges"]``; its distances to the others are unknown on the tree's scale
        (NaN in ``distances_``). Time O(N^2)."""
        f, pos, mixed = self.forest_, {n: i for i, n in enumerate(self.names_)}, mixed or {}
        like = {**duplicates, **{n: o["like"] for n, o in outside.items()}, **{n: main_parent(r) for n, r in mixed.items()}}
        after: dict[str, list[str]] = {}
        for dup, rep in like.items():
            after.setdefault(rep, []).append(dup)
        nodes = [m for n in f.nodes for m in _with_copies(n, after)]
        src = np.array([pos[_equal_to(n, like, pos)] for n in nodes])  # row of the model each node equals
        f.nodes = nodes
        f.edges = f.edges + [Edge(rep, dup, 1.0, 0.0, "precision" if dup in lowp else "duplicate")
                             for dup, rep in duplicates.items()]
        f.edges += [Edge(o["like"], n, 0.0, 0.0) for n, o in outside.items()]
        f.edges += [Edge(main_parent(r), n, 1.0 if r["residual"] is None else float(np.clip(1 - r["residual"] / MERGE_TOL, 0, 1)),
                         r["rms"], "merge") for n, r in mixed.items()]
        f.trees = [[m for n in tree for m in _with_copies(n, after)] for tree in f.trees]
        f.kurtosis.update({n: f.kurtosis[_equal_to(n, like, pos)] for n in like})
        f.decisions["duplicates"] = dict(duplicates)
        f.decisions["precision_copies"] = dict(lowp)
        if outside:
            f.decisions["outside_layers"] = dict(outside)
        f.kurtosis.update({n: r["kurtosis"] for n, r in mixed.items()})
        if mixed:
            f.decisions["model_merges"] = {n: {k: v for k, v in r.items() if k not in ("kurtosis", "rms", "main")}
                                           for n, r in mixed.items()}
        self.names_, self.edges_, self.roots_ = nodes, f.edges, f.roots()
        self.clusters_, self.kurtosis_ = self.clusters_[src], np.array([f.kurtosis[n] for n in nodes])
        self.distances_ = self.distances_[np.ix_(src, src)]  # a copy is at distance 0 from its model
        blank = np.array([n in mixed for n in nodes])
        self.distances_[blank, :] = self.distances_[:, blank] = np.nan
        np.fill_diagonal(self.distances_, 0.0)


def _place_trees(cfg: LineageConfig, placement: str, stages: list[str], trees: list[tuple], known: Known,
                 flat: list[str]) -> tuple[list[Edge], dict]:
    """The edges of every tree ((members, distances, kurtosis, per-layer kurtosis) each, its stage in
    ``stages``) placed by
    :func:`~modelatlas.lineage.known.place_tree`, and the decisions they make: ``root_confidence`` and
    ``root_runner_up`` (trees whose root kurtosis votes chose; None for a tree of one model), ``adapter_base`` (the base, the models merged
    onto it, the root the weights alone chose, merged models placed in another tree: ``apart``) and
    ``rooted_at_quantized_base``. Time that of the placements."""
    edges, conf, runner_up, given, rooted = [], [], [], {}, []
    for (members, d, k, lk), stage in zip(trees, stages):
        root = members.index(known.base) if known.base in members else None
        p = place_tree(cfg, placement, stage, (d, k, lk), root, known.pairs(members))
        if p.conf is not None:
            conf.append(p.conf)
            runner_up.append(members[p.second] if len(members) > 1 else None)  # (one model: it was itself)
        if root is not None:
            given = {"base": known.base, "merged": list(known.merged), "root_by_weights": members[p.chosen],
                     "apart": [m for m in known.merged if m in flat and m not in members]}  # (copies: in no tree yet)
        elif p.root is not None and p.root != p.chosen:
            rooted.append(members[p.root])
        edges += _tree_edges(members, d, p)
    info = {"root_confidence": conf, "root_runner_up": runner_up, **({"adapter_base": given} if given else {}),
            **({"rooted_at_quantized_base": rooted} if rooted else {})}
    return edges, info


def _tree_edges(members: list[str], d: np.ndarray, p: Placement) -> list[Edge]:
    """The edges of one placed tree, each with its runner-up parent (:mod:`.runner_up`) where it has one at a
    finite ratio. Time O(n^2)."""
    alt, ratio = runner_up_parents(d, p.parent)
    has = (alt >= 0) & np.isfinite(ratio)  # (n,)
    return [Edge(members[u], members[v], p.scores[v], float(d[u, v]), runner_up=members[alt[v]] if has[v] else None,
                 runner_up_ratio=float(ratio[v]) if has[v] else float("nan"))
            for v, u in enumerate(p.parent) if u >= 0]


def _with_copies(node: str, after: dict[str, list[str]]) -> list[str]:
    """``node`` then the models placed beside it, each followed by its own (a copy of a head-only fine-tune)."""
    return [node, *(m for n in after.get(node, []) for m in _with_copies(n, after))]


def _as_read(members: list, layers: list, merges: list, awq: dict[str, str]) -> tuple[list, list]:
    """(``members`` as the pass reads them, the QLoRA merges found): merges of an NF4 model (:func:`~.qlora.mark_merges`,
    added to ``merges``), AWQ models unsmoothed (:func:`~.unsmoothed.unsmoothed`, into ``awq``). Time: theirs."""
    members, found = mark_merges(members, layers)
    members, rescaled = unsmoothed(members, layers)
    merges.extend(found), awq.update(rescaled)
    return members, found


def _known(base: str | None, merged: list[str], made: dict[str, str], duplicates: dict[str, str],
           outside: dict[str, dict], names: list[list[str]]) -> Known:
    """The directions known from outside the weights, named as placed: a model made from a quantized one's
    dequantized values (``made``: model -> that one, which is no copy of it but above it) and the quantized one
    each as the model placed in a tree that it stands for (:func:`_placed_as`). Time O(N)."""
    like, kept = {**duplicates, **{n: o["like"] for n, o in outside.items()}}, {n for g in names for n in g}
    return Known(base, tuple(merged), {_placed_as(m, like, kept): _placed_as(b, like, kept) for m, b in made.items()})


def _placed_as(node: str, like: dict[str, str], kept: set[str]) -> str:
    """The model placed in a tree that ``node`` stands as: itself, or the one its copies chain ends at (a
    quantized copy of a given model: that model). Time O(chain)."""
    while node not in kept and node in like:
        node = like[node]
    return node


def _equal_to(node: str, like: dict[str, str], pos: dict[str, int]) -> str:
    """The fitted model whose row ``node`` takes: itself, or the model its copies chain ends at."""
    while node not in pos:
        node = like[node]
    return node


def _grouped(ckpts: list, pattern: str | None, skipped: dict) -> tuple[list, list, dict]:
    """(:func:`~.sources.group_by_architecture`'s groups and rules, the models compared on fewer layers than their
    own: :func:`~.shared_layers.extra_layers`); the models with no layer to compare go into ``skipped``."""
    groups, rules, bad = group_by_architecture(ckpts, pattern)
    skipped.update(bad)
    shared = {}
    for members, layers in groups:
        shared.update(extra_layers(members, [own_layers(m, pattern) for m in members], layers))
    return groups, rules, shared


def _pair_stats(cfg: LineageConfig, members, layers, progress) -> PairStats:
    """One architecture group's streaming pass (:func:`~modelatlas.lineage.distances.stream_pair_stats`) with
    ``cfg``'s sketches. Time: see the module."""
    return stream_pair_stats(members, layers, sketch=cfg.sketch if cfg.distance != "l2" else None,
                             l1=cfg.method == "mother-paper", seed=cfg.seed, progress=progress,
                             gram_sketch=cfg.distance_sketch, rank_sketch=cfg.rank_sketch,
                             layer_sq=cfg.merges)  # (per-layer distances serve merge detection only)


def recover_lineage(weights, *, config: LineageConfig | None = None, progress: Progress | None = None,
                    adapter_base=None, **params) -> Forest:
    """Plain-function twin of :class:`LineageRecovery`: returns the recovered :class:`Forest`."""
    return LineageRecovery(config, **params).fit(weights, progress=progress, adapter_base=adapter_base).forest_


def _subset(st: PairStats, keep: list[int]) -> PairStats:
    ix = np.ix_(keep, keep)
    return PairStats(st.rms[ix], st.rel[ix], st.kurtosis[keep], None if st.l1 is None else st.l1[ix],
                     [s[keep] for s in st.sketches], layer_kurtosis=st.layer_kurtosis[keep], failed={},
                     rounding=[r.subset(keep) for r in st.rounding],
                     stored_rel=None if st.stored_rel is None else st.stored_rel[ix])


def _cluster(cfg: LineageConfig, stats: list[PairStats]) -> tuple[np.ndarray, dict]:
    """Global tree labels (aligned with the concatenated names) and how K was decided."""
    sizes = [len(s.kurtosis) for s in stats]
    if cfg.n_trees is None:
        labels, infos, base = [], [], 0
        for s in stats:
            if len(s.kurtosis) == 0:
                continue
            lab, info = detect_trees(s.rel, cfg.tree_gap)
            labels.append(lab + base)
            base += int(lab.max()) + 1
            infos.append(info)
        info = {"n_trees_given": False, "tree_rule": [i["rule"] for i in infos],
                "tree_gap_ratio": [i["gap_ratio"] for i in infos]}
        return np.concatenate(labels), info
    n_groups = sum(1 for n in sizes if n)
    if cfg.n_trees < n_groups or cfg.n_trees > sum(sizes):
        raise ConfigError(f"n_trees (--trees) = {cfg.n_trees} is impossible: the models form {n_groups} "
                          f"architecture group(s) of {sum(sizes)} distinct model(s) (copies, and models equal to "
                          f"another on the compared layers, count once); give a value in [{n_groups}, {sum(sizes)}]")
    dist = _block_diagonal([s.l1 if cfg.method == "mother-paper" else s.rel for s in stats])
    return ward_clusters(dist, cfg.n_trees), {"n_trees_given": True}


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    """One distance matrix; pairs across architectures get 10x the largest distance (never merged first)."""
    n = sum(b.shape[0] for b in blocks)
    big = 10 * max([float(b.max()) for b in blocks if b.size] + [1.0])
    d = np.full((n, n), big)
    o = 0
    for b in blocks:
        d[o:o + len(b), o:o + len(b)] = b
        o += len(b)
    np.fill_diagonal(d, 0)
    return d


def _tree_members(labels: np.ndarray, stats: list[PairStats]) -> list[tuple[int, np.ndarray]]:
    """(architecture group, indices inside the group) of each tree; a tree never spans groups."""
    out, o = [], 0
    for g, s in enumerate(stats):
        n = len(s.kurtosis)
        lab = labels[o:o + n]
        out += [(g, np.flatnonzero(lab == t)) for t in dict.fromkeys(lab.tolist())]
        o += n
    return out


def _add_quantized(members, keep: list[int], layers, found, quantized: dict[str, str], fitted: set[str]) -> None:
    """Adds to ``quantized`` each model of ``keep`` stored quantized (name -> :func:`~.quantized.quant_type`; the
    AWQ views of ``found`` are placed as read, not as stand-ins) and to ``fitted`` those of them whose blocks
    say they were scaled by least squares (:func:`~.quantized.least_squares_fitted`). Time O(rows m) of up to
    four layers a quantized model."""
    for m in (members[i] for i in keep):
        if m.name not in found and (kind := quant_type(m, layers)):
            quantized[m.name] = kind
            if least_squares_fitted(m, layers):
                fitted.add(m.name)


def _nothing_comparable(skipped: dict[str, str], shown: int = 3) -> str:
    """The one-line error when every model was skipped, with the first reasons (the CLI prints skipped
    models only after a successful fit, so the error itself must say why)."""
    reasons = [" ".join(why.split()) for why in skipped.values()]
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    return f"no model could be compared, every model was skipped: {'; '.join(reasons[:shown])}{more}"
