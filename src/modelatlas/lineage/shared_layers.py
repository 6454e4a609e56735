"""Models whose layers differ by a few blocks: compared on the layers they share.

Fine-tunes add and drop layers. A classifier adds a square ``pre_classifier`` (DistilBERT) or
``classifier.dense`` (RoBERTa) that the pretrained checkpoint, saved with its masked-LM head
(``vocab_transform``, ``lm_head.dense``), lacks; a multimodal fine-tune adds a vision tower and projector to a
chat model (LLaVA). Grouped by their exact sets of compared layers
(:func:`~modelatlas.lineage.sources.select_layers`), such models were different architectures, and the base
was drawn as a tree of its own apart from its fine-tunes: "found from the data", though the data had not
been compared. Here two groups whose layers share a large part, under the same relative names and shapes
(after a prefix on either side: ``language_model.`` in front of the chat model's names), become one group
compared on the shared layers (:func:`joined_signatures`); each model's own layers not compared are named in
``decisions["shared_layers"]``.

The shared layers must carry at least :data:`MIN_SHARE` of each side's compared weights: two models that share
one small matrix by chance are not one architecture. A side that fits the other in two places (an encoder's
and a decoder's copy of one block) is not joined: which copy it is like would be a guess. Unrelated models that
pass anyway are compared and land in trees of their own by distance, as unrelated models of one architecture do
(:func:`~modelatlas.lineage.clustering.detect_trees`).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

from modelatlas.weights import Checkpoint, TensorInfo

MIN_SHARE = 0.25  # of each side's compared weights (numel) that the shared layers must hold
# layer sets that hold a layer shape in common (the only ones that can join, :func:`shape_families`) up to which
# joins are looked for among them: every pair is compared, and each join compares the joined group again with
# all others (64 layer sets of 150 names, all joinable: ~5 s); a family of more is compared as before, each
# layer set apart (the summary's "N architectures, compared apart")
MAX_SIGNATURES = 64


def common_layers(a: tuple, b: tuple) -> tuple[tuple, str, str] | None:
    """(the shared layers as a signature of relative names, a's prefix, b's prefix): the layers ``(pa + n, s)``
    of ``a`` and ``(pb + n, s)`` of ``b`` for the prefix pair (each "" or ending in ".") under which they share
    the most weights, at least :data:`MIN_SHARE` of each side's; None when no pair does, or two share as much.
    Signatures are sorted tuples of (name, shape). Candidate pairs come from each layer of ``a`` and the layers
    of ``b`` that end in the same name (the longest dotted suffix they share: a vision tower's ``0.q`` also
    ends a language model's ``model.layers.0.q``, a lighter pair); a name's last component alone is no
    match (``x.weight`` and ``y.weight``) unless it is a whole name. Time O(T d) for T layers d deep."""
    return _Layers(a).common(_Layers(b))


class _Layers:
    """A signature with what :func:`common_layers` looks up in it, computed once: its weights, its weights per
    shape, and its layers by each dotted suffix of their names. O(T d)."""

    def __init__(self, sig: tuple):
        self.sig, self.numel = sig, numel(sig)
        self.per_shape = defaultdict(int)
        self.ends = defaultdict(list)  # (dotted suffix, shape) -> the layers ending in it
        for name, shape in sig:
            self.per_shape[shape] += math.prod(shape)
            for r in _suffixes(name):
                self.ends[(r, shape)].append(name)

    def common(self, other: _Layers) -> tuple[tuple, str, str] | None:
        """:func:`common_layers` of ``self.sig`` and ``other.sig``. An upper bound first (the weights of the
        shapes both hold): unrelated architectures of other widths cost O(shapes), not O(T d)."""
        need = MIN_SHARE * max(self.numel, other.numel)
        if sum(min(w, other.per_shape.get(s, 0)) for s, w in self.per_shape.items()) < need:
            return None
        weight = defaultdict(int)  # (pa, pb) -> shared weights
        for name, shape in self.sig:
            for r in _suffixes(name):  # a last component alone ("weight") matches only a whole name
                theirs = [t for t in other.ends.get((r, shape), []) if "." in r or r in (name, t)]
                if theirs:
                    break
            for t in theirs:
                weight[(name[: len(name) - len(r)], t[: len(t) - len(r)])] += math.prod(shape)
        ranked = sorted(((w, pair) for pair, w in weight.items() if w >= need), reverse=True)
        if not ranked or (len(ranked) > 1 and ranked[1][0] == ranked[0][0]):  # none, or two as good: a guess
            return None
        pa, pb = ranked[0][1]
        have = set(other.sig)
        return tuple(sorted((n[len(pa):], s) for n, s in self.sig if n.startswith(pa) and (pb + n[len(pa):], s)
                            in have)), pa, pb


@functools.lru_cache(maxsize=1 << 16)
def _suffixes(name: str) -> tuple[str, ...]:
    """``a.b.c`` -> (``a.b.c``, ``b.c``, ``c``): the names it can be under a prefix, longest first. Cached: a
    family's names are looked up once per pair compared."""
    parts = name.split(".")
    return tuple(".".join(parts[k:]) for k in range(len(parts)))


def joined_signatures(sigs) -> dict[tuple, tuple[tuple, str]]:
    """Signature -> (the layers its models are compared on, as a signature of relative names; the prefix their
    names carry over those), for each of ``sigs`` that joins another: the two groups sharing the most weights
    (:func:`common_layers`) become one, compared on the shared layers, again until no two groups qualify; the
    prefixes add up. Ties go to the first in sorted order, so the result does not depend on the order of
    ``sigs``. Joins are looked for within each family of layer sets that hold a shape in common
    (:func:`shape_families`; no other can join), none within a family of more than :data:`MAX_SIGNATURES`.
    Time O(S T) families, then per family of F: O(F^2) upper bounds, O(T d) a pair that passes one, O(F T d)
    a join."""
    out = {}
    for family in shape_families(sorted(set(sigs))):
        if 1 < len(family) <= MAX_SIGNATURES:
            out |= _join(family)
    return out


def shape_families(sigs: list[tuple]) -> list[list[tuple]]:
    """``sigs`` split into families: two signatures are in one when a chain of signatures, each holding a layer
    shape the next holds too, links them. Shared layers have the same shapes on both sides, so a join (of two
    signatures, or later of their groups, whose layers are a subset of each member's) never crosses families:
    the joins found per family are those found over all. Each family keeps the order of ``sigs``. Time O(S T)
    (union-find over shapes)."""
    root = list(range(len(sigs)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]  # path halving
            i = root[i]
        return i

    first = {}  # shape -> the first signature holding it
    for i, sig in enumerate(sigs):
        for _, shape in sig:
            j = first.setdefault(shape, i)
            root[find(i)] = find(j)
    families = defaultdict(list)
    for i, sig in enumerate(sigs):
        families[find(i)].append(sig)
    return list(families.values())


def _join(sigs: list[tuple]) -> dict[tuple, tuple[tuple, str]]:
    """:func:`joined_signatures` within one family (sorted signatures). Time O(F^2) upper bounds, O(F T d) a
    join."""
    groups = {k: (_Layers(s), {s: ""}) for k, s in enumerate(sigs)}  # id -> (layers, {sig: prefix})
    pairs = {}  # (i, j) -> (the shared layers' weights, common_layers) of the pairs that can join
    _compare(groups, pairs, [(i, j) for i in groups for j in groups if i < j])
    while best := max(((w, -i, -j) for (i, j), (w, _) in pairs.items()), default=None):
        i, j = -best[1], -best[2]
        shared, pa, pb = pairs[(i, j)][1]
        members = {s: p + pa for s, p in groups[i][1].items()} | {s: p + pb for s, p in groups.pop(j)[1].items()}
        groups[i] = (_Layers(shared), members)  # a member's names: its prefix + the group's (pa + a shared name)
        pairs = {k: c for k, c in pairs.items() if i not in k and j not in k}
        _compare(groups, pairs, [(min(i, k), max(i, k)) for k in groups if k != i])
    return {s: (layers.sig, p) for layers, members in groups.values() if len(members) > 1 for s, p in members.items()}


def _compare(groups: dict, pairs: dict, todo: list[tuple[int, int]]) -> None:
    """Add to ``pairs`` each pair of ``todo`` whose groups can join: (their shared weights, :func:`common_layers`).
    O(T d) a pair."""
    for i, j in todo:
        if c := groups[i][0].common(groups[j][0]):
            pairs[(i, j)] = (numel(c[0]), c)


def numel(sig: tuple) -> int:
    """Weights in the layers of signature ``sig`` ((name, shape) pairs)."""
    return sum(math.prod(shape) for _, shape in sig)


def extra_layers(members: list[Checkpoint], own: list[list[TensorInfo]], layers: list[TensorInfo]) -> dict:
    """Model name -> (the number of layers compared, the names of its own layers not compared), for each of
    ``members`` (one architecture group, compared on ``layers``) whose own selected layers ``own`` are more.
    Names are the model's own (a prefix included). O(N T)."""
    out = {}
    for ck, mine in zip(members, own):
        prefix = getattr(ck, "prefix", "")
        shared = {prefix + t.name for t in layers}
        rest = [t.name for t in mine if t.name not in shared]
        if rest:
            out[ck.name] = (len(layers), rest)
    return out


def described(extra: dict) -> dict:
    """:func:`extra_layers` as ``decisions["shared_layers"]``: model name -> ``{"compared": n, "not_compared":
    m, "examples": the first three names not compared}``."""
    return {name: {"compared": n, "not_compared": len(rest), "examples": rest[:3]} for name, (n, rest) in extra.items()}
