"""Copies of one model among the models compared: identical ones, lower-precision float ones and quantized ones,
told apart from models that equal another only on the compared layers.

A copy is found on the compared layers (their relative distance, :func:`split_duplicates`; quantized copies by
quantizing again, :mod:`.quantized`), but the layers compared by default are a part of each model (the square
matrices): a head-only fine-tune (linear probing), a fine-tune of the biases alone (BitFit) or of the norms
keeps them unchanged. So each identical or lower-precision copy is checked on every other float tensor the two
models share (:func:`differing_tensors`), on up to :data:`SAMPLE_ROWS` evenly spaced rows of each. A model that
differs there is no copy: it is listed with the tensors where it differs (``outside``) and placed beside the
model it equals on the compared layers as a training step whose direction the compared layers cannot tell.
Time O(C P_rest) for C copies found and P_rest weights sampled outside the compared layers.
"""

from __future__ import annotations

import numpy as np
import torch

from modelatlas.errors import CheckpointError
from modelatlas.lineage.quantized import compared, quant_type, quantized_copies
from modelatlas.lineage.rounding import same_model_pairs
from modelatlas.lineage.sources import whole
from modelatlas.weights import Checkpoint, TensorInfo

DUPLICATE_TOL = 1e-6  # relative distance below which two models count as identical (float32 rounding is ~1e-7)
# unit roundoff of the low-precision float formats: rounding a model to one of them moves it by at most this
# relative amount, so a model within it of a higher-precision one is that model stored at lower precision
ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
SAMPLE_ROWS = 256  # rows read of each tensor outside the compared layers (1-D tensors: up to 65,536 values)
_SAMPLE_VALUES = 65_536
MAX_LISTED = 10  # differing tensors named per model in the decisions
# a finer rounding of one model misses a coarser one's levels on sqrt(ratio) / 4 of its values (on_coarser_grid):
# Q8_0 against Q4_0 of one llama-quantize model 1.75 % against 1.58 %; Q4_0 files of fine-tunes 2 % of the
# weights' deviation from a Q8_0 file's model 5.0-6.9 % (bench/lineage_kquant_tree.py's tree, session 34)
GRID_MISS = 2.0


def split_duplicates(rel: np.ndarray, keep: list[int], tol: float = DUPLICATE_TOL,
                     roundoff: list[float] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """(representatives, [(duplicate, representative)]) among ``keep``: a model whose relative distance to a
    kept one is below ``tol`` (identical weights up to float32 rounding) is that model's duplicate. With
    ``roundoff`` (each model's :data:`ROUNDOFF` of its :func:`storage_dtype`), a model stored at a lower precision than a kept one
    and within that precision's unit roundoff of it is its copy at lower precision (rounding alone explains the
    difference). Models are taken highest precision first, then in order, so a representative is the
    original, not its rounded copy; representatives keep their order. Time O(N^2)."""
    u = np.zeros(len(rel)) if roundoff is None else np.asarray(roundoff, dtype=float)
    reps: list[int] = []
    dups: list[tuple[int, int]] = []
    for i in sorted(keep, key=lambda j: u[j]):  # stable: the given order within one precision
        r = np.array(reps, dtype=int)
        limit = np.where(u[r] != u[i], np.maximum(u[r], u[i]).clip(min=tol), tol)  # (R,)
        same = np.flatnonzero(rel[i, r] < limit)
        if len(same):
            dups.append((i, reps[int(same[0])]))
        else:
            reps.append(i)
    pos = {k: n for n, k in enumerate(keep)}
    return sorted(reps, key=pos.__getitem__), dups


def storage_dtype(ck: Checkpoint, layers: list[TensorInfo]) -> str:
    """The lowest-precision dtype ``ck`` stores ``layers`` in (by :data:`ROUNDOFF`; any of them when all are
    float32 or wider): header only."""
    stored = {t.name: t.dtype for t in ck.tensors()}
    return max((stored.get(t.name, "") for t in layers), key=lambda d: ROUNDOFF.get(d, 0.0), default="")


def _coarser(a: str, b: str) -> str:
    """Of two dtype names, the one of the larger :data:`ROUNDOFF` (the stored dtype vs the format the values fit)."""
    return max(a, b, key=lambda d: ROUNDOFF.get(d, 0.0))


def split_copies(members: list[Checkpoint], layers: list[TensorInfo], st, keep: list[int],
                 duplicates: dict[str, str], lowp: dict[str, str], outside: dict[str, dict],
                 made_from: dict[str, str] | None = None, extra: dict | None = None) -> list[int]:
    """``keep`` less the copies of other kept models: identical ones, lower-precision float ones
    (:func:`split_duplicates`, each checked outside the compared layers) and quantized ones
    (:func:`~modelatlas.lineage.quantized.quantized_copies`, whose unquantized 1-D tensors are checked the same
    way: a quantized fine-tune of the biases alone stays a model); each copy's name -> its model's goes into
    ``duplicates``, and -> its format into ``lowp`` unless identical (an identical copy of a quantized copy is the
    source's quantized copy too: no chains); a model made from a quantized one's dequantized values (it rounds to
    the same codes, but sits on their levels) goes into ``made_from`` (model -> quantized one), the quantized one
    not being its copy. A model equal to a kept one on ``layers`` only (or with layers not compared, ``extra``,
    that the other lacks) goes into ``outside``: name -> {"like": that model, "differs_in": the first
    :data:`MAX_LISTED` differing tensors, "n_differing": their number}."""
    dtypes, given = [_coarser(storage_dtype(c, layers), v) for c, v in zip(members, st.value_formats)], list(keep)
    rel = st.rel if st.stored_rel is None else st.stored_rel  # as read: a rounding is no identity
    narrow_first = sorted(keep, key=lambda i: members[i].name in (extra or {}))  # one that added layers: below
    keep, dups = split_duplicates(rel, narrow_first, roundoff=[ROUNDOFF.get(d, 0.0) for d in dtypes])
    unrounded = {d for d, r in dups if rel[d, r] >= DUPLICATE_TOL and not _rounds_to(members[r], members[d],
                                                                                     layers, dtypes[d])}
    keep = [i for i in given if i in keep or i in unrounded]  # a fine-tune within roundoff: a model of its own
    dups = [(d, r) for d, r in dups if d not in unrounded]
    for d, r in _checked_outside(members, layers, dups, outside, dtypes, extra or {}):
        duplicates[members[d].name] = members[r].name
        if rel[d, r] >= DUPLICATE_TOL:
            lowp[members[d].name] = dtypes[d]
    made = _split_quantized(members, layers, st.rel, keep, duplicates, lowp, outside)
    if made_from is not None:  # models made from a quantized one's dequantized values (QLoRA merges)
        made_from.update({members[m].name: members[q].name for m, q in made.items()})
    return keep


def _split_quantized(members: list[Checkpoint], layers: list[TensorInfo], rel: np.ndarray, keep: list[int],
                     duplicates: dict[str, str], lowp: dict[str, str], outside: dict[str, dict]) -> dict[int, int]:
    """:func:`split_copies`' quantized copies, taken out of ``keep`` (or ``outside``) into ``duplicates`` and
    ``lowp``, with the identical copies of each; returns the models made from a quantized one's values (model ->
    that one, by index)."""
    aside = [i for i, m in enumerate(members) if m.name in outside]  # may be quantized copies, or their sources
    by_name = {m.name: m for m in members}
    made: dict[int, int] = {}
    for q, r, kind in quantized_copies(members, layers, rel, keep + aside, accept=_same_vectors(members),
                                       made_from=made):
        if q in keep:
            keep.remove(q)
        else:
            del outside[members[q].name]
        for d in [d for d, rep in duplicates.items() if rep == members[q].name]:  # q's identical copies: r's too
            own = quant_type(by_name[d], layers)  # TQ2_0 equal to TQ1_0: tq2_0
            duplicates[d], lowp[d] = members[r].name, own or kind
        duplicates[members[q].name], lowp[members[q].name] = members[r].name, kind
    return made


def _rounds_to(source: Checkpoint, copy: Checkpoint, layers: list[TensorInfo], fmt: str) -> bool:
    """Whether ``copy``'s ``layers`` are ``source``'s rounded to ``fmt`` (float16 / bfloat16) on the sampled rows,
    up to 1/16 of its :data:`ROUNDOFF` (a bfloat16 model's float16 conversion loses float16's subnormals): a
    distance within the unit roundoff is a fine-tune as well as a copy (a float32 fine-tune 0.2 % from a bfloat16
    base), rounding tells them apart. Time O(sampled weights)."""
    gap, norm = 0.0, 0.0
    try:
        for t in layers:
            x, y = _sample(source.read(t.name)), _sample(copy.read(t.name))
            gap += _rounded_gap(x, y, fmt) ** 2
            norm += float(x.square().sum())
    except CheckpointError:
        return False
    return gap <= (ROUNDOFF[fmt] / 16) ** 2 * norm


def _rounded_gap(x: torch.Tensor, y: torch.Tensor, fmt: str) -> float:
    """||round(x) - round(y)||, both rounded to the float format ``fmt`` ("float16", "bfloat16")."""
    low = getattr(torch, fmt)
    return float((x.to(low).double() - y.to(low).double()).norm())


def split_same_model(members: list[Checkpoint], layers: list[TensorInfo], st, keep: list[int],
                     duplicates: dict[str, str], lowp: dict[str, str], same: dict[str, str]) -> list[int]:
    """``keep`` less the quantized models that are roundings of the same model as a finer one kept (two GGUF
    types of one model not given: :func:`~modelatlas.lineage.rounding.same_model_pairs`) whose unquantized
    tensors equal its too; each goes into ``duplicates`` (-> the finer one), ``lowp`` (-> its type) and
    ``same``, so it is drawn beside the finer one as a "precision" copy, not as a fine-tune of it, whose
    direction the weights cannot tell. Time O(Q^2) for Q quantized models, plus their 1-D tensors read."""
    if st.excess is None:
        return keep
    kinds = {i: quant_type(members[i], layers) for i in keep}
    energy = -np.diagonal(st.excess) / 2  # each model's summed rounding energy (d^2 = 0 less twice it)
    accept = _same_vectors(members)
    excess = st.excess.copy()
    for q in keep:  # two files of one type are never roundings of one model (two of one model: one file)
        excess[q, [r for r in keep if kinds[r] and kinds[r] == kinds[q]]] = np.inf
    pairs = {q: r for q, r in same_model_pairs(excess, st.spread, energy, [i for i in keep if kinds[i]]).items()
             if accept(q, r) and on_coarser_grid(members[q], members[r], layers, energy[r] / max(energy[q], 1e-300))}
    for q, r in pairs.items():
        duplicates[members[q].name] = same[members[q].name] = members[r].name
        lowp[members[q].name] = kinds[q]
    return [i for i in keep if i not in pairs]


def on_coarser_grid(coarse: Checkpoint, fine: Checkpoint, layers: list[TensorInfo], ratio: float) -> bool:
    """Whether ``fine``'s values round to ``coarse``'s stored levels as two roundings of one model's do: each
    value is the finer rounding ``w + u`` of the value ``w`` that ``coarse`` rounded, so it misses the level
    ``coarse`` stores only within ``|u|`` of a rounding boundary, a share ``E|u| / step`` = ``sqrt(ratio) / 4``
    (``ratio``: the rounding energies, fine over coarse; uniform errors), where a fine-tune misses ``E|D + u| /
    step`` for its change ``D``. At most :data:`GRID_MISS` times that share (:meth:`~modelatlas.weights.
    Checkpoint.grid_match`, summed over the layers both quantize; True where no layer is tested). The energies
    alone cannot tell a fine-tune 2 % away under Q4_0 (3-5 % of the energy) from the same model. O(sampled P)."""
    missed, seen = 0.0, 0
    for t in layers:
        if coarse.quantization(t.name) is None or fine.quantization(t.name) is None:
            continue
        x, rows = compared(coarse, fine, t.name)  # only the compared rows of fine's layer read (GGUF: 256)
        share = coarse.grid_match(t.name, x, rows=rows)
        if share is not None:
            missed, seen = missed + (1 - share) * t.numel, seen + t.numel
    return seen == 0 or missed / seen <= GRID_MISS * np.sqrt(ratio) / 4


def _same_vectors(members: list[Checkpoint]):
    """``accept(copy, source, skip)`` for :func:`quantized_copies`: the copy's tensors that are not tested by
    quantizing again (the unquantized 1-D ones: GGUF keeps biases and norms in float32), less those in ``skip``
    (AWQ's rescaled norms and biases, tested with its layers), equal the source's."""
    def accept(q: int, r: int, skip: set[str] = frozenset()) -> bool:
        tested = {t.name for t in members[q].tensors()  # matrices: quantized again; other quantized ones: none
                  if len(t.shape) >= 2 or members[q].quantization(t.name) is not None}
        return not differing_tensors(members[r], members[q], tested | skip)  # skip: AWQ's norms, tested
    return accept


def _checked_outside(members: list[Checkpoint], layers: list[TensorInfo], dups: list[tuple[int, int]],
                     outside: dict[str, dict], formats: list[str], extra: dict) -> list[tuple[int, int]]:
    """The (copy, model) pairs of ``dups`` that also agree outside ``layers``, also when both are rounded to
    the coarser of their value ``formats`` where those differ (a float32 file of float16 values: its head is
    rounded too). A model that does not is recorded in ``outside``; a later one may still be its copy."""
    compared = {t.name for t in layers}
    kept: list[tuple[int, int]] = []
    differing: dict[int, list[int]] = {}  # representative -> models equal to it on the layers only
    def differs(d: int, c: int) -> list[str]:  # d's tensors that differ from c's outside ``layers``
        rounded = _rounded(formats, d, c)
        return (_extra_differing(extra, members[d], members[c], rounded)
                + differing_tensors(members[c], members[d], compared, rounded))

    for d, r in dups:
        first = differs(d, r)
        # a copy of an earlier model that differs from r the same way?
        found = r if not first else next((c for c in differing.get(r, []) if not differs(d, c)), None)
        if found is not None:
            kept.append((d, found))
            continue
        differing.setdefault(r, []).append(d)
        outside[members[d].name] = {"like": members[r].name, "differs_in": first[:MAX_LISTED],
                                    "n_differing": len(first)}
    return kept


def _extra_differing(extra: dict, a: Checkpoint, b: Checkpoint, rounded: str) -> list[str]:
    """The layers not compared (``extra``: :func:`~.shared_layers.extra_layers`) of ``a`` or ``b`` that the other
    lacks (named "(only in A)") or holds with other values: two models equal on the shared layers are no copies
    when one has more (a projector trained on a frozen model), or both have a vision tower, unlike. Each read
    whole (a view under a prefix lists only the shared part). Time O(sampled weights)."""
    out: list[str] = []
    for x, y in ((a, b), (b, a)):
        mine = extra.get(x.name, (0, []))[1]
        if not mine:
            continue
        xw, yw = whole(x), whole(y)
        theirs = {t.name for t in yw.tensors()}
        out += [f"{n} (only in {x.name})" for n in mine if n not in theirs]
        skip = {t.name for t in xw.tensors()} - (set(mine) & theirs)
        out += [n for n in differing_tensors(xw, yw, skip, rounded) if n not in out]
    return out


def _rounded(formats: list[str], i: int, j: int) -> str:
    """The format two models' tensors are also compared in, rounded: the coarser one; "" at one precision."""
    a, b = (ROUNDOFF.get(formats[k], 0.0) for k in (i, j))
    return "" if a == b else _coarser(formats[i], formats[j])


def differing_tensors(a: Checkpoint, b: Checkpoint, skip: set[str] = frozenset(), rounded: str = "") -> list[str]:
    """The float tensors of ``a`` (names not in ``skip``) that ``b`` holds in another shape, or whose values
    differ by more than float rounding: relative distance over :data:`SAMPLE_ROWS` evenly spaced rows above
    :data:`DUPLICATE_TOL`, or above the coarser of the two dtypes' :data:`ROUNDOFF` when they are stored
    in different dtypes (with ``rounded``, a float dtype name: unless equal when both are rounded to it, up
    to :data:`DUPLICATE_TOL`); a tensor that cannot be read, or holds NaN or inf there, differs too (named so).
    Tensors only one model holds are not compared. Time O(sampled weights)."""
    theirs = {t.name: t for t in b.tensors()}
    out = []
    for t in a.tensors():
        other = theirs.get(t.name)
        if t.name in skip or other is None or not _is_float(t) or not _is_float(other):
            continue
        if tuple(other.shape) != tuple(t.shape):
            out.append(f"{t.name} (shape {tuple(t.shape)} vs {tuple(other.shape)})")
            continue
        why = _sample_differs(a, b, t, other, rounded)
        if why is not None:
            out.append(t.name + why)
    return out


def _is_float(t: TensorInfo) -> bool:
    return t.dtype.startswith(("float", "bfloat")) and t.numel > 0


def _sample_differs(a: Checkpoint, b: Checkpoint, t: TensorInfo, other: TensorInfo, rounded: str) -> str | None:
    """None when tensor ``t`` of ``a`` and ``b`` agree on the sample, else "" or a reason in parentheses."""
    try:
        x, y = _sample(a.read(t.name)), _sample(b.read(t.name))
    except CheckpointError:
        return " (unreadable)"
    if not bool(torch.isfinite(y).all()) or not bool(torch.isfinite(x).all()):
        return " (NaN or inf values)"
    limit = DUPLICATE_TOL if t.dtype == other.dtype else max(ROUNDOFF.get(t.dtype, 0.0),
                                                             ROUNDOFF.get(other.dtype, 0.0), DUPLICATE_TOL)
    scale = float(x.norm())
    gap = float((x - y).norm())
    if gap > limit * scale and rounded:  # a float32 file of float16 values: all its tensors were rounded
        gap, limit = _rounded_gap(x, y, rounded), DUPLICATE_TOL
    return None if gap <= limit * scale else ""


def _sample(x: torch.Tensor) -> torch.Tensor:
    """Up to :data:`SAMPLE_ROWS` evenly spaced rows of ``x`` (1-D: up to 65,536 evenly spaced values), float64."""
    flat = x.reshape(len(x), -1) if x.dim() >= 2 else x.reshape(-1, 1)  # (rows, row length)
    most = SAMPLE_ROWS if x.dim() >= 2 else _SAMPLE_VALUES
    pick = torch.linspace(0, len(flat) - 1, min(len(flat), most)).round().long()
    return flat[pick].double()  # (rows picked, row length)
