"""Search an atlas: by free text through the stored ProbeX text embeddings, or by keywords.

Text search (the atlas was built with text experts): the query is embedded by the offline MiniLM encoder,
mapped by each tree's text expert, and every embedded model is scored by the log-probability of the query
against the query plus that expert's seen prompts (:meth:`ProbeXTextAligner.scores_from_embeddings`): a model
ranks first when the query describes it better than any known description does. No weights are read.
Time O(N r_T + C d_text r_T) per query for N embedded models and C seen prompts.

Keyword search (no text embeddings, or ``mode="keywords"``): each query word (letters and digits of any script,
casefolded, in Unicode NFC form) is looked up in a model's name,
path below the folder all the atlas's models share (a word every path holds would match every model),
predicted classes (and best-matching description), dtype and tree number (whole words); the score counts
matched words, a word found in a predicted class or description adds its probability, and a query that is a
model's whole name adds 2. "tree N" is one term, matched by the members of tree N (2, its two words); "tree"
alone is matched by the models in a tree. Time O(N W) for W words per model.
"""

from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelatlas.atlas.index import Atlas, ModelEntry, shown_value
from modelatlas.errors import AtlasError, same_form

MODES = ("auto", "text", "keywords")
EXACT_NAME = 2.0  # bonus when the whole query is a model's name
TREE_TERM = 2.0  # "tree N" matched by a member of tree N: its two words, above any one word's 1 + probability


@dataclass(frozen=True)
class Hit:
    name: str
    score: float
    how: str  # "text" or "keywords"


def search_atlas(atlas: Atlas, query: str, top: int = 10, mode: str = "auto",
                 text_experts: str | Path | None = None) -> list[Hit]:
    """The ``top`` models best matching ``query``, best first. ``mode="auto"``: text search when the atlas
    holds text embeddings, keywords otherwise. ``text_experts`` overrides the experts folder the atlas
    recorded (e.g. after moving it)."""
    if mode not in MODES:
        raise AtlasError(f"search mode must be one of {MODES}; got {mode!r}")
    check_query(query)
    whole = isinstance(top, numbers.Integral) and not isinstance(top, bool)  # numpy's integers too
    if not whole or top < 1:  # [:0] or [:-1] would drop hits silently
        raise AtlasError(f"top must be a positive number of models; got {int(top) if whole else repr(top)}")
    top = int(top)
    if mode == "keywords" and text_experts is not None:  # it was ignored without a word, whatever it named
        raise AtlasError("--text-experts is for text search; --mode keywords uses no experts (drop one of them)")
    if (mode == "text" or text_experts is not None) and not atlas.embeddings:
        given = " (so --text-experts has nothing to search)" if text_experts is not None else ""
        used = atlas.experts.get("text", {}).get("folder")
        fix = (f"none of its models is in a tree the text experts {used} were trained on (their notes say why: "
               "`atlas index show`)" if used else "rebuild it with `atlas index build --text-experts DIR`")
        raise AtlasError(f"this atlas has no text embeddings{given}: {fix}, or search keywords (--mode keywords)")
    if atlas.embeddings and mode != "keywords":
        return _text_hits(atlas, query, text_experts)[:top]
    return _keyword_hits(atlas, query)[:top]


def _text_hits(atlas: Atlas, query: str, folder) -> list[Hit]:
    from modelatlas.probex.experts import TreeExperts
    from modelatlas.probex.text_encoder import encode_texts

    recorded = atlas.experts.get("text", {}).get("folder")
    if not (folder or recorded):
        raise AtlasError("the atlas does not say which text experts embedded it; pass --text-experts DIR")
    if not folder and not Path(recorded).is_dir():
        raise AtlasError(f"the text experts this atlas was built with are no longer at {recorded} (moved or "
                         "deleted); pass --text-experts DIR to say where they are now")
    folder = folder or recorded
    experts = TreeExperts.load(folder)
    _check_text_experts(atlas, experts, folder)
    q = encode_texts([query])  # (1, d_text)
    experts.check_query(q)
    hits = []
    for tree, (names, emb) in atlas.embeddings.items():
        expert = experts.experts[tree]
        scores = expert.scores_from_embeddings(emb, q, expert.text_)
        hits += [Hit(n, float(s), "text") for n, s in zip(names, np.asarray(scores))]
    return sorted(hits, key=lambda h: (-h.score, h.name))


def _check_text_experts(atlas: Atlas, experts, folder) -> None:
    """The experts are text experts on the layer the atlas was embedded with, one per embedded tree, mapping
    models into a space of the stored embeddings' width; else a one-line AtlasError saying what differs."""
    if experts.task != "text":
        raise AtlasError(f"{folder}: experts trained with --task {experts.task}; text search needs the text "
                         "experts (--task text) the atlas was built with")
    layer, digest = (atlas.experts.get("text", {}).get(k) for k in ("layer", "digest"))
    if layer is not None and experts.layer != layer:
        raise AtlasError(f"{folder}: text experts on layer {experts.layer!r}, but the atlas was embedded with "
                         f"experts on layer {layer!r}; pass the text experts the atlas was built with")
    for tree, (_, emb) in atlas.embeddings.items():
        expert = experts.experts.get(tree)
        if expert is None:
            raise AtlasError(f"{folder}: no expert for tree {tree!r}, which embedded this atlas; pass the text "
                             "experts the atlas was built with")
        if expert.config.rank_t != emb.shape[1]:
            raise AtlasError(f"{folder}: the expert of tree {tree!r} embeds models in {expert.config.rank_t} "
                             f"dimensions, the atlas stores {emb.shape[1]}; pass the text experts the atlas was "
                             "built with")
    if digest is not None and experts.weights_digest() != digest:  # (atlases before session 23 record none)
        raise AtlasError(f"{folder}: these text experts are not the ones that embedded this atlas (their weights "
                         "differ: retrained?), so its stored embeddings would be scored with other experts; "
                         f"rebuild the atlas with `atlas index build --text-experts {folder}`")


def split_words(text: str) -> list[str]:
    """The casefolded words of ``text``: runs of Unicode letters and digits ("Größe-v2" -> grösse, v2; "bert-日本"
    -> bert, 日本), split at punctuation, spaces and underscores. In NFC form: a name macOS wrote decomposed
    (e + combining grave) is the word typed, where its combining mark, no letter, split it in two."""
    return re.findall(r"[^\W_]+", same_form(text.casefold()))


def tree_terms(words: list[str]) -> tuple[list[str], list[int]]:
    """(the other words, the tree numbers) of a query's words: each "tree" followed by a number is one term,
    tree N, so that "tree 3" finds the members of tree 3, not the models predicted to know class 3."""
    rest: list[str] = []
    trees: list[int] = []
    i = 0
    while i < len(words):
        if words[i] == "tree" and i + 1 < len(words) and words[i + 1].isdecimal():
            trees.append(int(words[i + 1]))
            i += 2
        else:
            rest.append(words[i])
            i += 1
    return rest, trees


def _keyword_score(entry: ModelEntry, query: str, words: list[str], trees: list[int], root: str) -> float:
    where = below(entry.path, root)
    fields = set(split_words(" ".join([entry.name, where, entry.dtype])))
    if entry.tree is not None:  # "tree" alone: the models in a tree (a model in none had "None" to match)
        fields |= {"tree", str(entry.tree)}
    classes = [(set(split_words(c)), p) for c, p in (entry.predicted or []) + (entry.described or [])[:1]]
    score = EXACT_NAME if same_form(query.strip().casefold()) == same_form(entry.name.casefold()) else 0.0
    score += TREE_TERM * trees.count(entry.tree)
    for w in words:
        matched = [p for ws, p in classes if w in ws]
        score += (1.0 + max(matched)) if matched else (1.0 if w in fields else 0.0)
    return score


def shared_folder(paths: list[str]) -> str:
    """The folder every model file lies under ("" when there is none), so that its words match no model. Hub ids
    (the relative paths of an atlas: models of the hub cache, recorded by their id) are left out: their words
    are their own."""
    local = [p for p in paths if os.path.isabs(p)]
    try:
        return os.path.dirname(os.path.commonpath(local)) if len(local) == 1 else os.path.commonpath(local)
    except ValueError:  # none, or different drives
        return ""


def below(path: str, root: str) -> str:
    """``path`` below the :func:`shared_folder` ``root``; a hub id as it is."""
    return os.path.relpath(path, root) if root and os.path.isabs(path) else path


def check_query(query: str) -> None:
    """Refuse a query with no word (letters or digits) in it: keywords have nothing to look up, and a text
    embedding of '!!!' scored every model about the same."""
    if not query.strip():
        raise AtlasError("empty search query")
    if not split_words(query):
        raise AtlasError(f"search query {shown_value(query)} has no words to look up")


def _keyword_hits(atlas: Atlas, query: str) -> list[Hit]:
    words, trees = tree_terms(split_words(query))
    root = shared_folder([m.path for m in atlas.models])
    hits = [Hit(m.name, s, "keywords") for m in atlas.models
            if (s := _keyword_score(m, query, words, trees, root)) > 0]
    return sorted(hits, key=lambda h: (-h.score, h.name))
