"""The recovered lineage: a :class:`Forest` of directed edges, and its JSON form.

JSON (``atlas lineage recover --out``)::

    {"nodes": ["t0", "t0_c0", ...],
     "edges": [{"parent": "t0", "child": "t0_c0", "score": 0.71, "distance": 0.013, "kind": "trained",
                "runner_up": "t0_c1", "runner_up_ratio": 1.84}, ...],
     "decisions": {"stage": "specialize", "stage_confidence": 0.99, "n_trees": 3, ...},
     "trees": [["t0", "t0_c0", ...], ...],
     "kurtosis": {"t0": 4.2, ...},
     "skipped": {"broken": "broken.safetensors: truncated file ..."}}

Names are model names (:func:`modelatlas.weights.model_name`: file or folder name without extension). An
edge of kind ``"duplicate"`` joins two models with identical weights, one of kind ``"precision"`` a model and its
copy rounded to float16 / bfloat16 (score 1, distance 0), one of kind ``"merge"`` a merged model (a weighted sum of
others, all named in ``decisions["model_merges"]``: :mod:`modelatlas.lineage.merges`) and its most weighted parent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from modelatlas.atomic import atomic_write_json
from modelatlas.errors import AtlasError, error_line

COPY_KINDS = ("duplicate", "precision")  # edge kinds that join two copies of one model, not a training step


@dataclass(frozen=True)
class Edge:
    """``parent`` -> ``child``; ``score`` in [0, 1] is the confidence. ``kind``: ``"trained"`` (child was trained
    from parent), ``"duplicate"`` (identical weights: child is a copy of parent, or parent of child -- which
    one came first cannot be told from the weights; the first one given is the parent) or ``"precision"``
    (child holds parent's weights rounded to a lower-precision float format, e.g. a float16 save of a float32
    model). ``runner_up``: the model the child would hang from instead (the nearest outside its own subtree,
    :func:`~modelatlas.lineage.runner_up.runner_up_parents`), ``runner_up_ratio`` its distance over the
    parent's (None / nan for copies and forests saved without them)."""

    parent: str
    child: str
    score: float
    distance: float = float("nan")
    kind: str = "trained"
    runner_up: str | None = None
    runner_up_ratio: float = float("nan")


@dataclass
class Forest:
    """Nodes, directed edges, the decisions taken (stage, K, distance...), trees, kurtosis, skipped models."""

    nodes: list[str]
    edges: list[Edge]
    decisions: dict = field(default_factory=dict)
    trees: list[list[str]] = field(default_factory=list)
    kurtosis: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def parents(self) -> dict[str, str | None]:
        """Node -> its parent (None for roots)."""
        out: dict[str, str | None] = {n: None for n in self.nodes}
        out.update({e.child: e.parent for e in self.edges})
        return out

    def roots(self) -> list[str]:
        """The roots in the order of their trees in ``trees``, so that "tree k" of every output (the text, the
        atlas's headings) is ``trees[k - 1]``, the tree an atlas numbers its models by; in node order a root
        named after another tree's first model came first and took its number. Roots in no listed tree (a
        forest saved without trees) follow in node order. O(N)."""
        listed = {n: k for k, tree in enumerate(self.trees) for n in tree}
        roots = [n for n, p in self.parents().items() if p is None]
        return sorted(roots, key=lambda n: listed.get(n, len(self.trees)))  # stable: node order within a rank

    def children(self) -> dict[str, list[Edge]]:
        """Node -> its outgoing edges, in node order."""
        order = {n: i for i, n in enumerate(self.nodes)}
        out: dict[str, list[Edge]] = {n: [] for n in self.nodes}
        for e in sorted(self.edges, key=lambda e: order.get(e.child, 0)):
            out[e.parent].append(e)
        return out

    def to_dict(self) -> dict:
        return {
            "nodes": list(self.nodes),
            "edges": [_edge_dict(e) for e in self.edges],
            "decisions": self.decisions,
            "trees": self.trees,
            "kurtosis": self.kurtosis,
            "skipped": self.skipped,
        }

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Forest:
        try:
            edges = [_edge_of(e) for e in data["edges"]]
            nodes = list(data["nodes"])
        except (KeyError, TypeError, ValueError) as e:
            raise AtlasError(f"not a lineage forest (needs 'nodes' and 'edges' with 'parent'/'child'): {e}") from e
        check_forest_shape(nodes, edges)
        try:
            return cls(nodes, edges, dict(data.get("decisions", {})), list(data.get("trees", [])),
                       dict(data.get("kurtosis", {})), dict(data.get("skipped", {})))
        except (TypeError, ValueError) as e:
            raise AtlasError(f"not a lineage forest: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> Forest:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except RecursionError as e:
            raise AtlasError(f"{path}: cannot read forest JSON (nested too deeply)") from e
        except (OSError, ValueError) as e:  # also not UTF-8 (a model file) and integers of 5,000 digits
            raise AtlasError(f"{path}: cannot read forest JSON ({error_line(e)})") from e
        try:
            return cls.from_dict(data)
        except AtlasError as e:
            raise AtlasError(f"{path}: {e}") from e


def _edge_dict(e: Edge) -> dict:
    """An edge's JSON object; the runner-up parent only where there is one."""
    out = {"parent": e.parent, "child": e.child, "score": round(e.score, 6), "distance": e.distance, "kind": e.kind}
    if e.runner_up is not None:
        out.update(runner_up=e.runner_up, runner_up_ratio=round(e.runner_up_ratio, 6))
    return out


def _edge_of(e: dict) -> Edge:
    """An edge from its JSON object (a forest saved before runner-ups has none)."""
    alt = e.get("runner_up")
    return Edge(e["parent"], e["child"], float(e.get("score", float("nan"))), float(e.get("distance", float("nan"))),
                str(e.get("kind", "trained")), None if alt is None else str(alt),
                float(e.get("runner_up_ratio", float("nan"))))


def check_forest_shape(nodes: list[str], edges: list[Edge]) -> None:
    """Raise :class:`AtlasError` unless ``edges`` form a forest over ``nodes``: every edge joins two known
    nodes, no node has two parents, and following parents never comes back to where it started. A hand-edited
    forest that breaks one of these would make ``children()`` fail far from here or the tree printer loop
    forever. O(N + E): each node's parent chain is walked once, marking nodes as they are finished."""
    known: set[str] = set()
    for n in nodes:
        if n in known:
            raise AtlasError(f"not a lineage forest: node {n!r} is listed twice in 'nodes'")
        known.add(n)
    parent: dict[str, str] = {}
    for i, e in enumerate(edges):  # children() and roots() index by node: a stray name fails far from here
        if e.parent not in known or e.child not in known:
            stray = e.parent if e.parent not in known else e.child
            raise AtlasError(f"not a lineage forest: edges[{i}] names {stray!r}, which is not in 'nodes'")
        if e.child in parent:
            raise AtlasError(f"not a lineage forest: edges[{i}] gives {e.child!r} a second parent "
                             f"({e.parent!r}; it already has {parent[e.child]!r})")
        parent[e.child] = e.parent
    _check_no_cycle(nodes, parent)


def _check_no_cycle(nodes: list[str], parent: dict[str, str]) -> None:
    done: set[str] = set()
    for start in nodes:
        path: dict[str, None] = {}  # the chain walked from start, in order (a dict: O(1) membership)
        node = start
        while node is not None and node not in done:
            if node in path:  # came back: the nodes from its first visit on form a cycle
                chain = list(path)
                cycle = chain[chain.index(node):] + [node]
                raise AtlasError("not a lineage forest: the edges form a cycle "
                                 + " <- ".join(repr(n) for n in cycle))
            path[node] = None
            node = parent.get(node)
        done.update(path)
