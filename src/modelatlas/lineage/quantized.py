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
(:mod:`modelatlas.weights.gguf_grid`); the I-quants (codebooks) are not tested, and such copies are placed
as fine-tunes as before.
"""

from __future__ import annotations

import numpy as np

from modelatlas.weights import Checkpoint, TensorInfo

# share of values the requantized source must reproduce: a copy reproduces all (float ties aside); a fine-tune
# misses whole blocks (Q8_0, Q4_0: 30 % at 0.05 % relative distance) or |change| / step of its values on a
# K-quant grid (0.4 % for a change of 0.001 sigma on Q4_K, steps of ~0.27 sigma)
MIN_MATCH = 0.999
CANDIDATES = 3  # nearest higher-precision models tested per quantized model


def quantized_copies(ckpts: list[Checkpoint], layers: list[TensorInfo], rel: np.ndarray, keep: list[int],
                     min_match: float = MIN_MATCH, candidates: int = CANDIDATES) -> list[tuple[int, int, str]]:
    """(copy, source, type) for each model of ``keep`` holding block-quantized ``layers`` that are the
    quantization of a model of ``keep`` stored without block quantization: for every compared layer, the
    copy's stored values reproduced by quantizing the source's (share >= ``min_match``), and its plain
    layers equal to the source's rounded to their dtype. Sources are tried nearest first by ``rel``
    (N x N relative distances), ``candidates`` of them. ``type`` is the lower-cased quantization
    ("q8_0"; "q4_0+q8_0" for a mix). Time O(Q c P) for Q quantized models, c candidates, P weights; only
    models with a quantized layer are read again."""
    kinds = {i: _kinds(ckpts[i], layers) for i in keep}
    quant = [i for i in keep if kinds[i]]
    sources = [i for i in keep if not kinds[i]]
    out = []
    for q in quant:
        for r in sorted(sources, key=lambda j: rel[q, j])[:candidates]:
            if is_quantization_of(ckpts[q], ckpts[r], layers, min_match):
                out.append((q, r, "+".join(sorted(kinds[q])).lower()))
                break
    return out


def _kinds(ck: Checkpoint, layers: list[TensorInfo]) -> set[str]:
    return {k for k in (ck.quantization(t.name) for t in layers) if k is not None}


def is_quantization_of(copy: Checkpoint, source: Checkpoint, layers: list[TensorInfo],
                       min_match: float = MIN_MATCH) -> bool:
    """Whether every layer of ``copy`` is ``source``'s layer quantized (block-quantized layers, by
    quantizing again) or rounded (plain layers, to the copy's dtype). Stops at the first layer that is
    not; False when a quantized layer's type has no quantizer. Time O(P), one layer at a time."""
    for t in layers:
        x = source.read(t.name)
        if copy.quantization(t.name) is None:
            y = copy.read(t.name)
            if not bool((x.to(y.dtype) == y).all()):
                return False
            continue
        match = copy.requantized_match(t.name, x)
        if match is None or match < min_match:
            return False
    return True
