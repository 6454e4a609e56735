"""AWQ-quantized models told from fine-tunes by undoing AWQ's rescaling of input channels.

AWQ (AutoAWQ; llm-compressor's ``AWQModifier``, which writes compressed-tensors ``pack-quantized`` files)
multiplies each input channel j of a linear layer by a factor ``c_j > 0`` before rounding and divides what
feeds that channel by it, so that the model computes the same function: a layer fed by a norm (Llama names:
``input_layernorm`` -> ``q_proj``, ``k_proj``, ``v_proj``; ``post_attention_layernorm`` -> ``gate_proj``,
``up_proj``) is stored as ``Q(W diag(c))`` and the norm's weight as ``g / c``; ``v_proj`` -> ``o_proj`` and
``up_proj`` -> ``down_proj`` divide the feeding layer's rows by c instead. AutoAWQ also clips each group's
range before rounding (not for ``q_proj`` / ``k_proj``). The factors range over ~0.1-10, so the dequantized
weights are no rounding of the source's: its distance to its source is that of an unrelated model, and
:meth:`~modelatlas.weights.Checkpoint.requantized_match` finds nothing.

The norms give the factors back: ``c = g_source / g_awq``, up to the rounding of ``g / c`` to the norm's dtype
(a relative ``u``: 2^-11 in float16, 2^-8 in bfloat16, 2^-24 in float32). Rounding is a function, so the
source's ``W diag(c)`` must round to every stored code of the norm-fed layers whose rows were not rescaled
(:data:`NORM_FED`: ``q_proj``, ``k_proj``, ``gate_proj``) on the stored grid, up to ``3 u`` of each quotient
``W c / scale`` (the factor's rounding, the product's and the quotient's in the model's dtype; the sum with
the zero, rounded there by compressed-tensors, is the grid's own); a clipped value sits at its group's end
code, which takes everything beyond it (:meth:`~modelatlas.weights.Checkpoint.grid_match`). A fine-tune of the source moved
values across rounding boundaries and misses codes; another model's norms give factors that fit nothing.
``v_proj``, ``o_proj``, ``up_proj`` and ``down_proj`` (factors of their own on the rows or columns) are not
tested: a fine-tune of those layers alone passes as a copy.

Candidates are not the nearest models by the compared layers (the rescaling moved the AWQ model far from
all), but by the norm-folded weights ``W diag(g)``, which AWQ leaves unchanged: ``W diag(c) diag(g / c)``
(:func:`rescaled_distance`). Time O(P) per candidate tested, for the P weights of the tested layers.
"""

from __future__ import annotations

import re

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights import Checkpoint

# a norm -> the layers it feeds whose rows AWQ leaves unscaled (v_proj's and up_proj's are divided by the
# factors of o_proj's and down_proj's inputs), in the names of Llama and the models named like it (Mistral,
# Qwen2, Qwen3, ...)
NORM_FED = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj"), "post_attention_layernorm": ("mlp.gate_proj",)}
# a feeding layer whose rows AWQ divides -> its bias, divided the same way (differs from the source's)
ROW_SCALED_BIASES = ("self_attn.v_proj.bias", "mlp.up_proj.bias")
_NORM = re.compile(r"^(.*?)(" + "|".join(NORM_FED) + r")\.weight$")
# unit roundoff of the dtype the norm's weight g / c was rounded to
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
FOLDED_LAYERS = 2  # norm-fed layers read to rank candidates: the first block's and the last one's


def smoothed_pairs(ck: Checkpoint) -> list[tuple[str, list[str]]]:
    """(norm weight, [the quantized layers it feeds that AWQ leaves unscaled]) of ``ck``, in name order; empty
    for a model with no such layer (no test). Header only. Time O(tensors)."""
    names = set(ck.keys())
    out = []
    for name in sorted(names):
        m = _NORM.match(name)
        fed = [f"{m[1]}{layer}.weight" for layer in NORM_FED[m[2]]] if m else []
        fed = [f for f in fed if f in names and ck.quantization(f) is not None]
        if fed:
            out.append((name, fed))
    return out


def smoothed_tensors(ck: Checkpoint) -> set[str]:
    """The 1-D tensors of ``ck`` that AWQ changed and :func:`smoothed_score` accounts for: the norms it reads
    the factors off, and the biases of the layers whose rows it divided (those are not compared as plain
    tensors). Header only; time O(tensors)."""
    pairs = smoothed_pairs(ck)
    prefixes = {_NORM.match(norm)[1] for norm, _ in pairs}
    return {norm for norm, _ in pairs} | {p + b for p in prefixes for b in ROW_SCALED_BIASES}


def channel_factors(copy: Checkpoint, source: Checkpoint, norm: str) -> tuple[torch.Tensor, float] | None:
    """(``c = g_source / g_copy`` float64, the relative slack of the test: three times the unit roundoff of the
    copy's norm dtype) for norm weight ``norm``; None when the two norms differ in shape, or a factor is not a
    positive finite number (AWQ's are: another model's norms, or a norm of zeros). Time O(hidden size)."""
    if norm not in source or source.info(norm).shape != copy.info(norm).shape:
        return None
    g_s, g_c = source.read(norm).double(), copy.read(norm).double()
    c = g_s / g_c
    if not bool(torch.isfinite(c).all()) or not bool((c > 0).all()):
        return None
    return c, 3 * UNIT.get(copy.info(norm).dtype, UNIT["float16"])


def smoothed_score(copy: Checkpoint, source: Checkpoint, need: float, plain: bool = True) -> float:
    """How surely ``copy`` is ``source`` rescaled by AWQ and quantized: the smallest, over the layers of
    :func:`smoothed_pairs`, of :meth:`~modelatlas.weights.Checkpoint.grid_match` of the source's layer times
    the norm's :func:`channel_factors`, minus ``need`` (>= 0: a copy; ``need`` 0: the smallest share); with
    ``plain``, each unquantized matrix the two share must be the source's rounded to its dtype (an
    embedding, a head). Stops at the first layer below ``need``; -1.0 when no layer is tested or a norm gives
    no factors. Time O(P) of the tested layers."""
    pairs = smoothed_pairs(copy)
    worst = 1.0 if pairs else -1.0
    try:
        for norm, fed in pairs:
            got = channel_factors(copy, source, norm)
            if got is None:
                return -1.0
            c, slack = got
            for name in fed:
                share = _share(copy, source, name, c, slack)
                worst = min(worst, share - need)
                if worst < 0:
                    return worst
    except CheckpointError:  # a source whose tested tensor cannot be read is not this one
        return -1.0
    return worst if not plain or _plain_matrices_equal(copy, source) else -1.0


def _share(copy: Checkpoint, source: Checkpoint, name: str, c: torch.Tensor, slack: float) -> float:
    """:meth:`grid_match` of ``name`` on the source's weight with its input columns times ``c``; -1.0 when
    the source has no such layer or its columns are not ``len(c)``. Time O(P) of the layer."""
    if name not in source or source.info(name).shape != copy.info(name).shape:
        return -1.0
    w = source.read(name)
    if w.dim() != 2 or w.shape[1] != len(c):
        return -1.0
    share = copy.grid_match(name, (w.double() * c).float(), slack)  # (out, in) times (in,): column j by c_j
    return -1.0 if share is None else share


def _plain_matrices_equal(copy: Checkpoint, source: Checkpoint) -> bool:
    """Whether every float matrix ``copy`` stores unquantized and ``source`` holds in that shape is the
    source's rounded to the copy's dtype (AWQ leaves them as they are). Time O(their size)."""
    theirs = {t.name: t.shape for t in source.tensors()}
    for t in copy.tensors():
        if len(t.shape) < 2 or theirs.get(t.name) != t.shape or copy.quantization(t.name) is not None \
                or not t.dtype.startswith(("float", "bfloat")):
            continue
        y = copy.read(t.name)
        if not bool((source.read(t.name).to(y.dtype) == y).all()):
            return False
    return True


def rescaled_distance(copy: Checkpoint, source: Checkpoint) -> float:
    """Relative distance ``||W_copy - W_source diag(g_source / g_copy)|| / ||W_source diag(g_source / g_copy)||``
    over up to :data:`FOLDED_LAYERS` norm-fed layers of ``copy`` (its first and last): the source rescaled by
    the factors its norms give, the norm-folded weights ``W diag(g)`` (which AWQ leaves unchanged) compared
    in the copy's own scaling, so that its rounding counts as the plain 4-bit error (~10 %) it is, not as
    magnified in the columns AWQ scaled down (~30 %, folded as they are). Small for its source and the
    source's fine-tunes, above 1 for another model; inf when the source lacks a layer or its norm. Time O(P)
    of those layers."""
    pairs = [(norm, fed[0]) for norm, fed in smoothed_pairs(copy)]
    picked = pairs[:: max(1, len(pairs) - 1)][:FOLDED_LAYERS]
    gap, size = 0.0, 0.0
    try:
        for norm, name in picked:
            if norm not in source or name not in source or source.info(name).shape != copy.info(name).shape \
                    or source.info(norm).shape != copy.info(norm).shape:
                return float("inf")
            c = source.read(norm).double() / copy.read(norm).double()  # (in,): the factors it implies
            b = source.read(name).double() * c  # (out, in) times (in,): column j by c_j
            gap += float((copy.read(name).double() - b).square().sum())
            size += float(b.square().sum())
    except (CheckpointError, RuntimeError):  # unreadable, or a norm of another length
        return float("inf")
    return (gap / size) ** 0.5 if size > 0 and gap == gap else float("inf")  # (a zero norm: NaN, inf)
