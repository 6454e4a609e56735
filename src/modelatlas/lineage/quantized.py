"""Quantized copies: a model whose block-quantized layers (GGUF Q8_0, Q4_0, ...) are another model's layers
quantized, told from a fine-tune by quantizing that model again.

A quantization moves weights by up to half a quantization step: for Q8_0 about 0.3 % of their RMS, for the
4-bit types several percent, the size of a fine-tune, so no distance threshold tells a quantized copy
from a child (MoTHer placed one as a fine-tune, and its direction was a guess). Quantizing is a function,
though: a copy's stored values are exactly what quantizing its source gives, while those of a quantized
fine-tune of the source differ wherever the fine-tune moved a value across a rounding boundary (whole
blocks whose scale moved: about 30 % of the values for a fine-tune 0.05 % away, with Q8_0).
:func:`quantized_copies` quantizes each quantized model's nearest models again and compares. The K-quants,
whose scales llama.cpp searches for, are checked on their stored grid instead
(:mod:`modelatlas.weights.gguf_grid`), IQ4_NL / IQ4_XS against their 16 codebook values; IQ1-IQ3 (lattice
codebooks over groups of 8 values) are not tested, and such copies are placed as fine-tunes as before.
AWQ models (their input channels rescaled before rounding) fail that test against every model; those whose
norm-fed layers are quantized are tested again with the rescaling undone (:mod:`.smoothed`), on the nearest
sources by the norm-folded weights.
"""

from __future__ import annotations

import numpy as np
import torch

from modelatlas.lineage import smoothed as S
from modelatlas.lineage.unsmoothed import stored
from modelatlas.weights import Checkpoint, TensorInfo

# share of values the requantized source must reproduce: a copy reproduces all (float ties aside); a fine-tune
# misses whole blocks (Q8_0, Q4_0: 30 % at 0.05 % relative distance) or |change| / step of its values on a
# K-quant grid (0.4 % for a change of 0.001 sigma on Q4_K, steps of ~0.27 sigma)
MIN_MATCH = 0.999
# the K-quants, tested on their stored grid: a copy has every value there (llama.cpp's own: 100.000 %), while a
# Q2_K / Q3_K step is so coarse that a fine-tune 0.1 % away misses only ~0.07 % (llama.cpp's Q2_K of a fine-tune
# of the blocks alone read 99.93 %: a copy at MIN_MATCH)
MIN_MATCH_GRID = 0.9999
# the IQ4 codebook types: llama.cpp rounds a block's scale (float16, 6-bit sub-scales) after choosing the codes,
# so a copy reads 99.89-99.99 % on its own source (a fine-tune 0.1 % away: ~99.7-99.8 %)
MIN_MATCH_CODEBOOK = 0.998
CANDIDATES = 3  # nearest higher-precision models tested per quantized model
# mean position of a model's values between a copy's levels (0: on them, ~0.5: anywhere between) below which
# it was made from the copy's dequantized values: 0.02 for a QLoRA-style merge, 0.49-0.50 for the source
ON_GRID = 0.25
POSITION_LAYERS = 4  # layers read again to test it: the positions agree across layers


def quantized_copies(ckpts: list[Checkpoint], layers: list[TensorInfo], rel: np.ndarray, keep: list[int],
                     candidates: int = CANDIDATES, accept=None,
                     made_from: dict[int, int] | None = None) -> list[tuple[int, int, str]]:
    """(copy, source, type) for each model of ``keep`` holding block-quantized ``layers`` that is the
    quantization of a model of ``keep`` stored without block quantization: on every matrix the two share
    (the compared ``layers`` and the others: an embedding, a head), the copy's stored values what quantizing
    the source's gives (share >= :data:`MIN_MATCH`; :data:`MIN_MATCH_GRID` for the K-quants,
    :data:`MIN_MATCH_CODEBOOK` for the IQ4 types), its plain
    matrices the source's rounded to their dtype. The ``candidates`` nearest sources by ``rel`` (N x N
    relative distances) are tested and the one with the highest smallest margin over the threshold wins (a coarse type, Q2_K, can pass for a model and its 0.1 % fine-tune alike;
    only the true source reproduces every value); ``accept(copy, source)``, when given, must hold too (tried
    from the best candidate down: a source whose other tensors differ gives way to one whose do not).
    ``type`` is the lower-cased quantization ("q8_0";
    "q4_k+q6_k" for a mix). A candidate whose values sit on the copy's levels (:func:`made_from_copy`) is
    made from it, not its source: it goes into ``made_from`` (candidate -> copy), when given. Time O(Q c P) for
    Q quantized models, c candidates, P weights; only models with a quantized layer are read again. A model
    that passes for none and has AWQ-rescaled layers (:func:`~.smoothed.smoothed_pairs`) is tested again by
    :func:`~.smoothed.smoothed_score` on the ``candidates`` nearest by :func:`~.smoothed.rescaled_distance`,
    ``accept`` then given the 1-D tensors AWQ changed (``accept(copy, source, skip)``)."""
    kinds = {i: _kinds(ckpts[i], layers) for i in keep}
    quant = [i for i in keep if kinds[i]]
    sources = [i for i in keep if not kinds[i]]
    out = []
    for q in quant:
        nearest = sorted(sources, key=lambda j: rel[q, j])[:candidates]
        best = _best_source(ckpts, q, nearest, copy_score, layers, accept, made_from)
        if best is None and S.smoothed_pairs(ckpts[q]):
            known = getattr(ckpts[q], "rescaled", {})  # an AWQ view's, from choosing its relative: not read again
            rescaled = {j: known[ckpts[j].name] if ckpts[j].name in known
                        else S.rescaled_distance(stored(ckpts[q]), ckpts[j]) for j in sources}
            nearest = sorted(sources, key=rescaled.__getitem__)[:candidates]
            skip = S.smoothed_tensors(stored(ckpts[q]))
            best = _best_source(ckpts, q, nearest, _smoothed_score, layers,
                                None if accept is None else lambda a, b, skip=skip: accept(a, b, skip), made_from)
        if best is not None:
            out.append((q, best, quant_type(ckpts[q], layers)))
    return out


def _best_source(ckpts: list[Checkpoint], q: int, nearest: list[int], score, layers: list[TensorInfo], accept,
                 made_from: dict[int, int] | None) -> int | None:
    """Of the ``nearest`` candidates (nearest first), the one ``score(copy, source) >= 0`` rates highest that
    is not made from copy ``q`` (:func:`made_from_copy`; those go into ``made_from``) and that ``accept``
    takes; None when none does. Time O(c P) for c candidates."""
    scored = [(score(ckpts[q], ckpts[r]), -n, r) for n, r in enumerate(nearest)]
    passing = sorted((s for s in scored if s[0] >= 0), reverse=True)
    derived = [s[2] for s in passing if made_from_copy(ckpts[q], ckpts[s[2]], layers)]
    if made_from is not None:
        made_from.update(dict.fromkeys(derived, q))
    return next((s[2] for s in passing if s[2] not in derived and (accept is None or accept(q, s[2]))), None)


def _smoothed_score(copy: Checkpoint, source: Checkpoint) -> float:
    """:func:`~.smoothed.smoothed_score` at :data:`MIN_MATCH`: an AWQ-rescaled copy's codes are a plain
    rounding. Time O(P) of the tested layers."""
    return S.smoothed_score(stored(copy), source, MIN_MATCH)


def made_from_copy(copy: Checkpoint, model: Checkpoint, layers: list[TensorInfo]) -> bool:
    """Whether ``model``'s values sit on ``copy``'s quantization levels (mean :meth:`~modelatlas.weights.
    Checkpoint.grid_position` over the quantized ``layers`` below :data:`ON_GRID`): it was made from the
    copy's dequantized weights (a QLoRA merge), which also quantize back to the copy's codes. False where the
    format has no such test. On at most :data:`POSITION_LAYERS` evenly spaced layers: a merge sits on the
    levels in every layer, a source in none, and each layer tested is read once more (only the rows the copy
    compares, :func:`compared`). Time O(P) of those layers."""
    quantized = [t for t in layers if copy.quantization(t.name)]
    picked = quantized[:: max(1, -(-len(quantized) // POSITION_LAYERS))]
    where = [_tested(copy.grid_position, copy, model, t.name) for t in picked]
    where = [w for w in where if w is not None]
    return bool(where) and sum(where) / len(where) < ON_GRID


def least_squares_fitted(ck: Checkpoint, layers: list[TensorInfo]) -> bool:
    """Whether ``ck``'s quantized ``layers`` were scaled by least squares (:meth:`~modelatlas.weights.
    Checkpoint.least_squares`, asked of at most :data:`POSITION_LAYERS` evenly spaced ones; most of those that
    tell): llama-quantize's legacy types with an importance matrix, whose type does not tell them from round
    to nearest (its ``--pure`` Q4_0 files: every layer Q4_0). Their rounding error is not independent of the
    values, so their kurtosis is not the source's (:func:`~modelatlas.lineage.stage.as_stored`). Time O(rows m)
    of those layers (256 sampled rows each; K-quant layers are told by their type)."""
    quantized = [t for t in layers if ck.quantization(t.name)]
    picked = quantized[:: max(1, -(-len(quantized) // POSITION_LAYERS))]
    said = [s for s in (ck.least_squares(t.name) for t in picked) if s is not None]
    return bool(said) and 2 * sum(said) > len(said)


def quant_type(ck: Checkpoint, layers: list[TensorInfo]) -> str:
    """The lower-cased block quantization ``ck`` stores ``layers`` in ("q8_0", "q4_k+q6_k"), "" for none."""
    return "+".join(sorted(_kinds(ck, layers))).lower()


def _kinds(ck: Checkpoint, layers: list[TensorInfo]) -> set[str]:
    return {k for k in (ck.quantization(t.name) for t in layers) if k is not None}


def copy_score(copy: Checkpoint, source: Checkpoint) -> float:
    """How surely ``copy`` is ``source`` quantized: the smallest, over the float matrices (2-D or more) the two
    share by name and shape, of the share of the copy's values consistent with the source's minus the share
    required (>= 0: a copy). Consistent: quantized (block-quantized matrices,
    :meth:`~modelatlas.weights.Checkpoint.requantized_match`; required :data:`MIN_MATCH`,
    :data:`MIN_MATCH_GRID` for the K-quants, :data:`MIN_MATCH_CODEBOOK` for the IQ4 types) or rounded (others: all values equal to the source's in the
    copy's dtype, or none). Stops at the first matrix below its threshold; -1.0 when a quantized type has no
    test or no matrix is shared. Of a quantized matrix, only the rows the copy compares are read from
    ``source`` (:func:`compared`). Time O(P), one matrix at a time."""
    from modelatlas.weights.gguf_grid import CODEBOOKS, GRIDS

    need = {**dict.fromkeys(GRIDS, MIN_MATCH_GRID), **dict.fromkeys(CODEBOOKS, MIN_MATCH_CODEBOOK)}
    theirs = {t.name: t.shape for t in source.tensors()}
    shared = [t for t in copy.tensors() if len(t.shape) >= 2 and theirs.get(t.name) == t.shape
              and (t.dtype.startswith(("float", "bfloat")) or copy.quantization(t.name))]
    worst = 1.0 if shared else -1.0  # no cap: a source matching every value outranks one missing a few
    for t in shared:
        kind = copy.quantization(t.name)
        if kind is None:
            x, y = source.read(t.name), copy.read(t.name)
            share = 1.0 if bool((x.to(y.dtype) == y).all()) else 0.0
        else:
            share = _tested(copy.requantized_match, copy, source, t.name)
            share = -1.0 if share is None else share
        worst = min(worst, share - need.get(kind, MIN_MATCH))
        if worst < 0:
            break
    return worst


def _tested(test, copy: Checkpoint, source: Checkpoint, name: str) -> float | None:
    """``test`` (``copy``'s ``requantized_match`` or ``grid_position``) of tensor ``name`` of ``source``."""
    x, rows = compared(copy, source, name)
    return test(name, x, rows=rows)


def compared(copy: Checkpoint, source: Checkpoint, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``copy``'s test of tensor ``name`` (``requantized_match``, ``grid_position``) needs of ``source``, as
    its (``x``, ``rows``) arguments: the rows it compares (:meth:`~modelatlas.weights.Checkpoint.compared_rows`:
    256 of a GGUF layer, only their bytes read) and which they are, or the whole tensor and None (formats that
    compare all of it; a tensor of another shape, which the test then refuses, even one shaped like the
    sample). Time O(r m), or O(P) for the whole."""
    rows = copy.compared_rows(name)
    if rows is None or source.info(name).shape != copy.info(name).shape:
        return source.read(name), None
    return source.read_rows(name, rows), rows
