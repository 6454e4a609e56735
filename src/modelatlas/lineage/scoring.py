"""Scoring a recovered forest against the truth (a zoo manifest or a child -> parent dict).

* directed-edge accuracy: |predicted edges that are true edges, same direction| / |true edges|
  (MoTHer's metric; with n - 1 predicted edges per tree it equals precision and recall);
* undirected-edge accuracy: the same, ignoring direction;
* clustering ARI: adjusted Rand index between predicted trees (connected components) and true trees;
* the kind of each wrong edge (:func:`edge_errors`): where the recovered parent sits relative to the true one
  (a sibling, an uncle, the grandparent, a descendant, another tree), so a user sees *how* a recovery erred.

A subset of a zoo is scored against the lineage among the models it holds (:func:`given_parents`): each
given model's true parent is its nearest *given* ancestor, so with a -> b -> c and b not given, a -> c is
right; :attr:`LineageScore.n_left_out` counts the true edges with a model not given, and
:attr:`LineageScore.n_bridged` the scored edges that skip such a model. True edges whose models were skipped (unreadable) count as misses: a
skipped model is a failure to recover. A recovered edge with a model the truth does not name is marked
``"unknown"`` (not in truth), never wrong; a truth that names none of the models is an error
(:func:`check_truth`). Time O(N + E).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from sklearn.metrics import adjusted_rand_score

from modelatlas.errors import ManifestError
from modelatlas.lineage.forest import COPY_KINDS, Edge, Forest
from modelatlas.zoo.config import SPARSE_MERGE_KINDS
from modelatlas.zoo.manifest import Manifest


@dataclass(frozen=True)
class LineageScore:
    directed: float
    undirected: float
    ari: float
    n_true_edges: int
    n_correct: int
    errors: dict[str, int] = field(default_factory=dict)  # wrong-edge kind -> count (see ``edge_errors``)
    n_left_out: int = 0  # true edges not scored: one of their models was not given
    n_bridged: int = 0  # scored edges from a model to its nearest given ancestor, past a model not given
    n_misplaced: int = 0  # wrong edges other than reversed ones (the child hung from another model)
    n_runner_up_right: int = 0  # misplaced edges whose runner-up parent (Edge.runner_up) is the true parent
    n_merges: int = 0  # true merged models given with their weighty parents (a manifest's ``merge`` records)
    n_merges_found: int = 0  # of them, recovered as merges of exactly their true parents
    n_false_merges: int = 0  # models recovered as merges that the truth names and says are no merge
    n_skipped: int = 0  # true edges scored with a model that was skipped (unreadable): misses

    def as_dict(self) -> dict:
        """The scores as ``--out`` holds them; the accuracies are None where no true edge was left to score
        (``directed`` then reads 1.0, or 0.0 with an edge joining two true trees: it is 0/0)."""
        scored = self.n_true_edges > 0
        return {"directed_accuracy": self.directed if scored else None,
                "undirected_accuracy": self.undirected if scored else None, "ari": self.ari,
                "true_edges": self.n_true_edges, "correct_edges": self.n_correct, "wrong_edges": self.errors,
                "true_edges_left_out": self.n_left_out, "edges_past_models_not_given": self.n_bridged,
                "misplaced_edges": self.n_misplaced, "misplaced_runner_up_true": self.n_runner_up_right,
                "merges": {"true": self.n_merges, "found": self.n_merges_found, "false": self.n_false_merges},
                "true_edges_with_skipped_models": self.n_skipped}


def truth_parents(truth: Manifest | Mapping[str, str | None]) -> dict[str, str | None]:
    """Child -> parent (None for roots) from a manifest or a dict."""
    return truth.parents() if isinstance(truth, Manifest) else dict(truth)


def truth_merges(truth: Manifest | Mapping[str, str | None]) -> dict[str, dict]:
    """Merged model -> its manifest ``merge`` record (``parents``, ``weights``), {} for a dict truth. O(N)."""
    return truth.merges() if isinstance(truth, Manifest) else {}


def same_merge_parents(got: Mapping, true: Mapping) -> bool:
    """Whether a recovered merge record ``got`` names the parents of the true one: the same set, or the same set
    of parents weighted MIN_WEIGHT or more on both sides (task arithmetic whose weights sum to ~1 is a linear
    merge of its two fine-tunes, the base's weight ~0: recovery may report either). O(parents)."""
    return set(got.get("parents", [])) == set(true.get("parents", [])) or _weighty(got) == _weighty(true)


def _weighty(rec: Mapping) -> set:
    """A merge record's parents weighted MIN_WEIGHT or more (all of a declared merge's: it has no weights; all of
    a TIES / DARE merge's)."""
    from modelatlas.lineage.merges import MIN_WEIGHT

    if rec.get("kind") in SPARSE_MERGE_KINDS:  # TIES / DARE: its base (weight 0, its task vectors' origin) and its
        return set(rec.get("parents", []))  # models, as a declared mergekit merge names them
    ws = rec.get("weights") or [1.0] * len(rec.get("parents", []))
    return {p for p, w in zip(rec.get("parents", []), ws) if abs(w) >= MIN_WEIGHT}


def says_merges(truth: Manifest | Mapping[str, str | None]) -> bool:
    """Whether ``truth`` tells merges from other models: a manifest with ``merge`` records, or a zoo's (its
    config has ``arch_config``: make_zoo records every merge it makes). A {model: parent} dict or hand-written
    manifest without them is silent: a recovered merge is no false one of it. O(N)."""
    return isinstance(truth, Manifest) and (bool(truth.merges()) or "arch_config" in truth.config)


def found_merges(forest: Forest, merges: Mapping[str, dict],
                 truth: Manifest | Mapping[str, str | None] | None = None) -> set[str]:
    """The true merged models (``merges``: name -> true ``merge`` record) that ``forest`` recovered as merges of
    their parents (``decisions["model_merges"]``; :func:`same_merge_parents`), models read by the names
    scoring against ``truth`` reads them (:func:`truth_names`: a copy the truth does not name, as its named
    original; none without a truth). O(merges + E)."""
    named = truth_names(forest, truth or {})
    got = forest.decisions.get("model_merges", {}) if isinstance(forest.decisions, dict) else {}
    read = {named.get(c, c): rec for c, rec in got.items()}
    return {c for c, rec in read.items() if c in merges and same_merge_parents(
        {**rec, "parents": [named.get(p, p) for p in rec.get("parents", [])]}, merges[c])}


def check_truth(names: Iterable[str], truth: Manifest | Mapping[str, str | None]) -> dict[str, str | None]:
    """The truth's child -> parent dict, or a ManifestError (naming the manifest file) when it names none of
    ``names``: scoring would read 0% for models that are simply not in it. Time O(N)."""
    parents, names = truth_parents(truth), list(names)
    if not names or any(n in parents for n in names):
        return parents
    where = getattr(truth, "source", None) or "the truth"
    theirs = ", ".join(list(parents)[:3]) + (", ..." if len(parents) > 3 else "")
    ours = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise ManifestError(f"none of the {len(names)} models ({ours}) are named in {where} (it names {theirs or 'no model'}); "
                        "give the manifest of the zoo these models come from")


def given_parents(parents: Mapping[str, str | None], given: Iterable[str]) -> dict[str, str | None]:
    """The truth restricted to the ``given`` models: each given model the truth names -> its nearest given
    proper ancestor (None when no ancestor was given). The lineage a subset of a zoo can be asked to recover.
    Time O(N depth)."""
    given = set(given)
    out = {}
    for child in parents:
        if child not in given:
            continue
        seen, v = {child}, parents[child]
        while v is not None and v not in given and v not in seen:  # walk past models not given
            seen.add(v)
            v = parents.get(v)
        out[child] = v if v in given else None
    return out


def given_models(forest: Forest) -> list[str]:
    """The models a forest was recovered from: its nodes, then the models it skipped."""
    return forest.nodes + [n for n in forest.skipped if n not in set(forest.nodes)]


def edge_accuracy(pred: set[tuple[str, str]], true: set[tuple[str, str]], directed: bool = True) -> float:
    """Fraction of true (parent, child) edges found; 1.0 when there are no true edges and none predicted."""
    if not true:
        return 1.0 if not pred else 0.0
    if directed:
        return len(pred & true) / len(true)
    und = {frozenset(e) for e in pred}
    return sum(frozenset(e) in und for e in true) / len(true)


def tree_labels(parents: Mapping[str, str | None]) -> dict[str, str]:
    """Each node's root (its tree's label), following parent links; the nodes walked through get the same
    label, so each link is followed once: time O(N) (a chain of 1,000 was O(N depth), 0.16 s). On a cycle
    (a hand-made truth) the walk stops where it repeats and only the starting node is labelled."""
    out: dict[str, str] = {}
    known: dict[str, str] = {}  # labels that end at a root (never a cycle's), safe to reuse
    for node in parents:
        path, seen, v = [], set(), node
        while v not in known and parents.get(v) is not None and v not in seen:
            seen.add(v)
            path.append(v)
            v = parents[v]
        if v in seen and v not in known:  # a cycle
            out[node] = v
            continue
        label = known.get(v, v)
        known.update((w, label) for w in path)
        out[node] = label
    return out


def score_forest(forest: Forest, truth: Manifest | Mapping[str, str | None]) -> LineageScore:
    """Directed and undirected edge accuracy and tree ARI of ``forest`` against the true edges between the
    models it was given (the others are counted in ``n_left_out``); raises ManifestError when the truth names
    none of them (:func:`check_truth`)."""
    everyone = check_truth(given_models(forest), truth)
    given = set(given_models(forest))
    parents = given_parents(everyone, given)
    named = {(p, c) for c, p in everyone.items() if p is not None}
    true = {(p, c) for c, p in parents.items() if p is not None}
    # an edge to a model the truth does not name is neither right nor wrong (it made a zoo's 0/0 read 0%)
    merges = truth_merges(truth)
    pred = {(p, c) for _, p, c in scored_edges(forest, parents, merges) if p in parents and c in parents}
    common = [n for n in forest.nodes if n in parents]
    t_lab, p_lab = tree_labels(everyone), tree_labels(forest.parents())  # trees of the whole truth
    ari = float(adjusted_rand_score([t_lab[n] for n in common], [p_lab[n] for n in common])) if common else 0.0
    kinds = edge_errors(forest, truth)
    errors = dict(sorted(Counter(kinds.values()).items()))
    left_out = sum(p not in given or c not in given for p, c in named)
    skipped = given - set(forest.nodes)  # models that could not be read: their true edges are misses
    misplaced, runner_up = _runner_ups(forest, parents, kinds)
    # a merge is findable when it and its weighty parents were given (else it is no miss, as an edge left out)
    true_merges = {c: rec for c, rec in merges.items() if c in given and _weighty(rec) <= given}
    return LineageScore(edge_accuracy(pred, true), edge_accuracy(pred, true, directed=False), ari,
                        len(true), len(pred & true), errors, left_out, len(true - named), misplaced, runner_up,
                        len(true_merges), len(found_merges(forest, true_merges, truth)),
                        _false_merges(forest, truth, parents, merges), sum(p in skipped or c in skipped for p, c in true))


def _false_merges(forest: Forest, truth, parents: Mapping[str, str | None], merges: Mapping[str, dict]) -> int:
    """Models recovered as merges (read by their truth names) that a truth telling merges (:func:`says_merges`)
    names and says are none. O(merges + E)."""
    if not says_merges(truth):
        return 0
    named = truth_names(forest, truth)
    got = {named.get(c, c) for c in forest.decisions.get("model_merges", {})}
    return sum(c in parents and c not in merges for c in got)


def _runner_ups(forest: Forest, parents: Mapping[str, str | None], kinds: dict) -> tuple[int, int]:
    """(misplaced edges, those whose runner-up parent is the child's true parent), names read as scoring reads
    them (:func:`truth_names`). Time O(E)."""
    named = truth_names(forest, parents)
    placed = [e for e in forest.edges if kinds.get((e.parent, e.child), "reversed") != "reversed"]
    right = sum(e.runner_up is not None and named.get(e.runner_up, e.runner_up) == parents.get(named.get(e.child, e.child))
                for e in placed)
    return len(placed), right


def truth_names(forest: Forest, truth: Manifest | Mapping[str, str | None]) -> dict[str, str]:
    """Model -> the copy of it that scoring reads it as: a model with identical (or lower-precision) copies
    that the truth does not name, where one of its copies is named, is scored as that copy, so a harmless
    copy given first does not cost its original's true edges. Time O(E)."""
    parents = truth_parents(truth)
    out: dict[str, str] = {}
    for e in forest.edges:
        if e.kind in COPY_KINDS and e.parent not in parents and e.child in parents:
            out.setdefault(e.parent, e.child)
    return out


def scored_edges(forest: Forest, truth: Manifest | Mapping[str, str | None],
                 merges: Mapping[str, dict] | None = None) -> list[tuple[Edge, str, str]]:
    """(edge, parent, child) with the names scoring reads (:func:`truth_names`); a copy edge between a model
    and the copy it is read as is left out (both are one model to the truth). A true merge (``merges``: name
    -> its ``merge`` record) recovered with its parents is read as drawn from its true parent, the most
    weighted one: near-equal weights may draw it under another of them."""
    named = truth_names(forest, truth)
    exact = found_merges(forest, merges or {}, truth)
    parents = truth_parents(truth)
    out = []
    for e in forest.edges:
        p, c = named.get(e.parent, e.parent), named.get(e.child, e.child)
        if e.kind == "merge" and c in exact and parents.get(c) is not None:
            p = parents[c]
        if p != c:
            out.append((e, p, c))
    return out


def prefer_named_copies(forest: Forest, truth: Manifest | Mapping[str, str | None]) -> Forest:
    """``forest`` redrawn so that a group of identical models is represented by one the truth names: when the
    representative (the first given) is not in the truth and an identical copy of it is, the two names swap
    places (nodes, edges, trees, kurtosis, decisions), so the copy hangs beside the true model instead of
    holding its subtree. Lower-precision copies are not swapped (the higher-precision model stays the parent;
    scoring reads through them, :func:`truth_names`). A new Forest; time O(N + E)."""
    parents, swap = truth_parents(truth), {}
    for e in forest.edges:
        if e.kind == "duplicate" and e.parent not in parents and e.child in parents and e.parent not in swap:
            swap[e.parent], swap[e.child] = e.child, e.parent
    if not swap:
        return forest

    def s(name: str) -> str:
        return swap.get(name, name)

    d = dict(forest.decisions)
    for key in ("duplicates", "precision_copies"):
        if isinstance(d.get(key), dict):
            d[key] = {s(k): (s(v) if key == "duplicates" else v) for k, v in d[key].items()}
    if isinstance(d.get("root_runner_up"), list):
        d["root_runner_up"] = [s(n) for n in d["root_runner_up"]]
    return Forest([s(n) for n in forest.nodes], [_renamed(e, s) for e in forest.edges],
                  d, [[s(n) for n in t] for t in forest.trees], {s(k): v for k, v in forest.kurtosis.items()},
                  dict(forest.skipped))


def _renamed(e: Edge, s) -> Edge:
    """``e`` with its models (parent, child, runner-up) renamed by ``s``."""
    return replace(e, parent=s(e.parent), child=s(e.child), runner_up=None if e.runner_up is None else s(e.runner_up))


def edge_marks(forest: Forest, truth: Manifest | Mapping[str, str | None]) -> dict[tuple[str, str], str]:
    """(parent, child) -> "right", "reversed" (true edge, wrong direction), "wrong" or "unknown" (a model the
    truth does not name: neither right nor wrong). A duplicate edge whose copy is not in the truth is left
    unmarked (the truth says nothing about it)."""
    given = given_models(forest)
    parents = given_parents(check_truth(given, truth), given)
    out = {}
    for e, p, c in scored_edges(forest, parents, truth_merges(truth)):
        if e.kind in COPY_KINDS and c not in parents:
            continue
        if c not in parents or p not in parents:
            out[(e.parent, e.child)] = "unknown"
        elif parents.get(c) == p:
            out[(e.parent, e.child)] = "right"
        elif parents.get(p) == c:
            out[(e.parent, e.child)] = "reversed"
        else:
            out[(e.parent, e.child)] = "wrong"
    return out


def edge_errors(forest: Forest, truth: Manifest | Mapping[str, str | None]) -> dict[tuple[str, str], str]:
    """(parent, child) -> the kind of error, for each recovered edge that is not a true edge:
    ``reversed`` (the true edge, pointing the wrong way); else where the recovered parent sits relative to the
    child's true parent: ``sibling`` (a child of the true parent), ``uncle`` (a sibling of the true parent),
    ``grandparent`` (a level skipped), ``descendant`` (below the child); ``true root`` (the child is a true
    root); ``other tree``; ``other``. Edges with a model the truth does not name are left out (they are not
    known to be wrong). Time O(E depth)."""
    everyone = truth_parents(truth)
    labels = tree_labels(everyone)  # trees of the whole truth: a root not given still joins its children
    parents = given_parents(everyone, given_models(forest))
    out = {}
    for e, p, c in scored_edges(forest, parents, truth_merges(truth)):
        if c not in parents or p not in parents or parents.get(c) == p:
            continue
        out[(e.parent, e.child)] = _error_kind(parents, labels, p, c)
    return out


def _error_kind(parents: Mapping[str, str | None], labels: Mapping[str, str], parent: str, child: str) -> str:
    true, up = parents.get(child), parents.get(parent)
    if up == child:
        return "reversed"
    if labels.get(parent, parent) != labels.get(child, child):
        return "other tree"
    if true is None:
        return "true root"
    if up == true:
        return "sibling"
    if parents.get(true) == parent:
        return "grandparent"
    if up is not None and up == parents.get(true):
        return "uncle"
    return "descendant" if _is_ancestor(child, parent, parents) else "other"


def _is_ancestor(a: str, b: str, parents: Mapping[str, str | None]) -> bool:
    """Whether ``a`` is a proper ancestor of ``b`` in ``parents``. Time O(depth)."""
    seen, v = set(), parents.get(b)
    while v is not None and v not in seen:
        if v == a:
            return True
        seen.add(v)
        v = parents.get(v)
    return False


def error_notes(forest: Forest, truth: Manifest | Mapping[str, str | None]) -> dict[tuple[str, str], str]:
    """(parent, child) -> a short reading of each wrong edge, e.g. ``"sibling; true parent t0.1"``, for the
    terminal drawing and Mermaid labels (reversed edges are marked as such already); a true parent that was
    not given is said to be, with the nearest given ancestor the edge is scored against
    (``"sibling; true parent t0.1 (not given; nearest given t0)"``)."""
    given = given_models(forest)
    everyone = check_truth(given, truth)
    parents = given_parents(everyone, given)
    named = truth_names(forest, parents)
    out = {}
    for edge, kind in edge_errors(forest, truth).items():
        if kind == "reversed":
            continue
        child = named.get(edge[1], edge[1])
        true, nearest = everyone.get(child), parents.get(child)
        if true is None or kind == "other tree":
            out[edge] = kind
        elif true == nearest:
            out[edge] = f"{kind}; true parent {true}"
        else:
            out[edge] = f"{kind}; true parent {true} (not given{f'; nearest given {nearest}' if nearest else ''})"
    return out
