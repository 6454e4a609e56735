"""Models with more layers than their relatives: compared on the layers they share.

A fine-tune may add layers to the model it started from: a vision tower and projector on a language model (a
LLaVA-style model beside the chat model it was trained from), a new block, an extra head made of square
matrices. Its compared layers (:func:`~modelatlas.lineage.sources.select_layers`) are then another
architecture group's plus its own, and grouped by their exact set it was placed as the root of a tree of its
own: "found from the data", though the data had not been compared. Here such a group joins the group whose
layers it holds, under the same names and shapes (after a first-component prefix where it has one,
``language_model.`` in front of each), and every model of the joined group is compared on the shared layers
only; its own extra layers are named in ``decisions["shared_layers"]``.

The shared layers must carry at least :data:`MIN_SHARE` of the wider model's compared weights: two models that
share one small matrix by chance (a 64 x 64 projection of a 7B model) are not one architecture. Unrelated
models that pass anyway are compared and land in trees of their own by distance, as unrelated models of one
architecture do (:func:`~modelatlas.lineage.clustering.detect_trees`).
"""

from __future__ import annotations

import math

from modelatlas.weights import Checkpoint, TensorInfo

MIN_SHARE = 0.25  # of the wider model's compared weights (numel) that the shared layers must hold


def contained_prefix(small: tuple, big: tuple) -> str | None:
    """The prefix ``p`` ("" or ending in ".") such that every ``(name, shape)`` of ``small`` is ``(p + name,
    shape)`` in ``big``, with ``small`` smaller than ``big``; None when there is none, or more than one (an
    encoder's and a decoder's copy of one block: which the smaller model is like is a guess). Signatures are
    sorted tuples of (name, shape). Time O(|big| + c |small|) for c candidate prefixes (those under which
    ``big`` has ``small``'s first name)."""
    if not small or len(small) >= len(big):
        return None
    have = set(big)
    first, shape = small[0]
    found = [p for name, s in big if s == shape and name.endswith(first)
             and ((p := name[: len(name) - len(first)]) == "" or p.endswith("."))
             and all((p + n, sh) in have for n, sh in small)]
    return found[0] if len(found) == 1 else None


def wider_signatures(sigs) -> dict[tuple, tuple[tuple, str]]:
    """Signature -> (the signature it is compared under, the prefix its names carry over it), for each of
    ``sigs`` that holds another with at least :data:`MIN_SHARE` of its weights: the one with the most weights,
    then transitively (a model holding a model that holds a third is compared on the third's layers; the
    prefixes add up). Ties go to the first in sorted order, so the result does not depend on the order of
    ``sigs``. Time O(S^2) hash lookups for S signatures (a smaller one's first name must end a name of the wider
    one: a folder of many unrelated architectures is not matched name by name), plus O(T) a candidate."""
    sigs = [s for s in sorted(set(sigs)) if s]
    sizes = [(numel(s), len(s), s[0][0]) for s in sigs]  # by position: a tuple's hash is O(T)
    tails = [{n.split(".", k)[-1] for n, _ in s for k in range(n.count(".") + 1)} for s in sigs]  # dotted suffixes
    step = {}
    for big, (n_big, t_big, _), tail in zip(sigs, sizes, tails):
        held = [(n, s, p) for s, (n, t, first) in zip(sigs, sizes) if t < t_big and first in tail
                and n >= MIN_SHARE * n_big and (p := contained_prefix(s, big)) is not None]
        if held:
            best = max(n for n, _, _ in held)
            _, s, p = next(h for h in held if h[0] == best)
            step[big] = (s, p)
    out = {}
    for sig in step:
        target, prefix = step[sig]
        while target in step:  # strictly fewer layers each step: ends
            nxt, p = step[target]
            target, prefix = nxt, prefix + p
        out[sig] = (target, prefix)
    return out


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


def only_in(extra: dict, a: Checkpoint, b: Checkpoint) -> list[str]:
    """The layers not compared (:func:`extra_layers`) that one of ``a``, ``b`` holds and the other lacks, each
    named with the model holding it: two models equal on the shared layers are no copies when one has more
    (a projector trained on a frozen language model). O(T)."""
    out = []
    for x, y in ((a, b), (b, a)):
        theirs = {t.name for t in y.tensors()}
        out += [f"{n} (only in {x.name})" for n in extra.get(x.name, (0, []))[1] if n not in theirs]
    return out
