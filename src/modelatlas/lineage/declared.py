"""Merges a model folder declares (mergekit's ``mergekit_config.yml``, read by :mod:`modelatlas.weights.mergekit`),
placed as merges where the weights cannot show them.

:mod:`.merges` finds weighted sums (linear, task arithmetic, SLERP); TIES, DARE and breadcrumbs trim or drop
values and elect signs, so their merges lie off every line and plane, and placed as models they draw their
parents below them as any merge does. A folder that says what it merged is believed when every model it names
is among the models given (by name: ``org/name`` ids and paths match a model named as their last part, when one
model alone is); it is then drawn below its first merged model that is not the base, with all its parents
named, and kept out of the trees. One whose models are not all given is placed as a model, and its declaration
listed (``decisions["declared_merges"]``) with the models not found. Time O(N) plus reading each config.
"""

from __future__ import annotations

from modelatlas.lineage.merge_values import SampledRows, verify_grid
from modelatlas.lineage.merges import split_merges
from modelatlas.lineage.sparse_merges import split_sparse_merges
from modelatlas.weights.mergekit import declared_merge


def split_all_merges(members: list, layers: list, st, keep: list[int], found: dict[str, dict],
                     declared: dict[str, dict]) -> list[int]:
    """``keep`` less the merges found from the weights (:func:`~.merges.split_merges`) and those declared by
    their folders whose models are all given (into ``found`` with ``"declared"``: the method); other declarations
    go to ``declared``. A merge found from the weights that its folder declares too gets ``"declared"``."""
    rows = SampledRows(members, verify_grid(layers))  # the sampled rows both read, once a model
    keep = split_merges(members, layers, st, keep, found, rows)
    keep = split_sparse_merges(members, layers, st, keep, found, rows)
    names = {members[i].name: i for i in keep}
    for i in list(keep):
        rec = declared_merge(members[i].path) if members[i].path.is_dir() else None
        if rec is None:
            continue
        name = members[i].name
        if "problem" in rec:
            declared[name] = rec
            continue
        ids = ([rec["base"]] if rec["base"] and rec["base"] not in rec["models"] else []) + rec["models"]
        matched = [_given(x, names) for x in ids]
        if name in found:
            found[name]["declared"] = rec["method"]
        elif None not in matched and name not in matched and len(set(matched)) >= 2:
            keep.remove(i)
            found[name] = _record(rec, matched, st, i, names)
        else:
            declared[name] = {**rec, "not_given": [x for x, m in zip(ids, matched) if m is None]}
    return keep


def _given(model_id: str, names: dict[str, int]) -> str | None:
    """The model given that ``model_id`` (a mergekit ``model:`` value) names: the same name, else the only one
    named as its last part (``org/name`` and ``./models/name`` -> ``name``); None when none or several are."""
    if model_id in names:
        return model_id
    last = model_id.rstrip("/").rsplit("/", 1)[-1]
    hits = [n for n in names if n == last or n.rsplit("/", 1)[-1] == last]
    return hits[0] if len(hits) == 1 else None


def _record(rec: dict, parents: list[str], st, i: int, names: dict[str, int]) -> dict:
    """A declared merge as :mod:`.merges` records one: drawn below its first merged model that is not the base."""
    base = parents[0] if rec["base"] and rec["base"] not in rec["models"] else None
    main = next((p for p in parents if p != base), parents[0])
    return {"parents": parents, "weights": [], "residual": None, "declared": rec["method"], "main": main,
            "kurtosis": float(st.kurtosis[i]), "rms": float(st.rms[i, names[main]])}
