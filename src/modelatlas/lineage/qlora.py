"""Merged QLoRA models recognised from their own values, so that lineage takes their NF4 rounding out.

A QLoRA merge is a float model made from a bitsandbytes NF4 base's dequantized weights plus a small LoRA
update: per block of 64 consecutive values of a flattened matrix, each value is the block's absmax times one
of the 16 NF4 book values, up to the update and the float16 / bfloat16 saving. Its NF4 base is rarely
published, so its values carry the base's rounding error (~9 % of the weights' RMS, as far as a fine-tune)
against its true ancestors (the float base, its other fine-tunes), which no stored scale announces: it sat
apart from all its relatives. Read off the values, it is a quantized stand-in like any other:

- detection: the mean position of ``w / absmax`` between the book values around it, in halves of their gap
  (:func:`~modelatlas.weights.grid_position.book_position`), is ~0.5 for an ordinary model and a random one
  (0.49-0.51 measured, any block size) and lower for a merge: 0.01 (update 1e-3 of the weights' RMS,
  bfloat16), 0.03 (3e-3), 0.08 (1e-2), 0.22 (3e-2) at its block size, 0.21-0.44 for updates of 4-22 %;
  below :data:`MERGE_POSITION` it is one. Block
  sizes 32 and 128 are tried too, the lowest position chosen (a 64-block merge read in blocks of 32 or 128
  gave 0.08-0.13 and 0.23-0.25: whole blocks of the wrong size miss their absmax);
- variance: :func:`~modelatlas.weights.bnb.merged_variance_4bit`, the NF4 level variance times each block's
  absmax squared, as bitsandbytes' own reader gives for the stored base;
- kind :data:`KIND` for every tested float matrix, so that two merges of one base are a pair of one kind.
  Their roundings are not two roundings on one grid but one and the same error, which their difference
  does not hold at all (:meth:`~modelatlas.lineage.rounding.LayerRounding.pair_noise` subtracts nothing).

A model made from a dequantized FP4 base (NVFP4, MXFP4) read 0.39-0.43 on NF4's levels and passed for an NF4
merge; it sits lower on the E2M1 levels times its blocks' scales (:func:`fp4_position`), and such a model is
no NF4 merge (left as it is: no FP4 merge view yet).

Wrapped (:class:`NF4MergeView`) only when detected: other models' results are unchanged.
"""

from __future__ import annotations

import torch

from modelatlas.errors import AtlasError
from modelatlas.lineage.quantized import POSITION_LAYERS, made_from_copy
from modelatlas.lineage.rounding import MERGE_KIND
from modelatlas.weights import Checkpoint, TensorInfo
from modelatlas.weights import bnb as B
from modelatlas.weights import fp4 as F
from modelatlas.weights import grid_position as G

KIND = MERGE_KIND  # the quantization type a detected merge's layers report
BLOCKS = (64, 128, 32)  # block sizes tried: bitsandbytes' default (QLoRA's) first
# mean position below which a model is a merge: ordinary and random models read 0.489-0.513 per layer (a
# density linear across a gap folds to an even one about its midpoint: only its curvature moves 0.5), merges
# 0.01-0.22 for updates of 1e-3 .. 3e-2 of the weights' RMS and 0.21-0.44 for a trained zoo's full fine-tunes
# of 4-22 % (bench/qlora_merge.py); the sampling's own spread is ~0.001
MERGE_POSITION = 0.45
HALF = ("bfloat16", "float16")  # the dtypes a merge is looked for in
SAMPLE = 1 << 16  # values looked at per layer: positions settle to ~0.005 long before


def merge_position(x: torch.Tensor, block: int, sample: int = SAMPLE) -> float:
    """Mean position of ``x``'s values between the NF4 book values around ``x / absmax`` (per block of
    ``block`` flattened values; 0.5 when no whole block), on about ``sample`` values of evenly strided whole
    blocks. Time O(sample)."""
    return _block_position(x, block, B.NF4, lambda amax: amax, sample)


def fp4_position(x: torch.Tensor, label: str, sample: int = SAMPLE) -> float:
    """Mean position of ``x``'s values between the E2M1 levels times their block's scale (blocks of
    :data:`~modelatlas.weights.fp4.GROUPS` flattened values; 0.5 when no whole block), on about ``sample``
    values: low for a model made from a dequantized FP4 model. NVFP4: the scale is the block's absmax / 6 (its
    largest value is stored as 6: the float8 scale is within 6.25 % of absmax / 6, and 5.65-6.4 rounds to 6).
    MXFP4: a power of two, absmax / 4 rounded down (its largest value is stored as 4 or 6; 1 % slack for a
    small update that lowers it). Zeros left out, as in :func:`merge_position`. Time O(sample)."""
    if label == "NVFP4":
        return _block_position(x, F.GROUPS[label], F.E2M1, lambda amax: amax / 6, sample)
    return _block_position(x, F.GROUPS[label], F.E2M1, lambda amax: torch.exp2(torch.floor(torch.log2(amax * 1.01 / 4))),
                           sample)


def _block_position(x: torch.Tensor, block: int, book: torch.Tensor, scale_of, sample: int) -> float:
    """Mean position of ``x``'s values between the levels of ``book`` times their block's scale (``scale_of``
    of the block's absmax), per block of ``block`` flattened values, on about ``sample`` values of evenly strided
    whole blocks; 0.5 when no whole block. Time O(sample)."""
    flat = x.reshape(-1)
    n = flat.numel() // block
    if not n:
        return 0.5
    blocks = flat[: n * block].view(n, block)[:: max(1, n * block // sample)].float()  # (b, block)
    scale = scale_of(blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-30))  # (b, 1)
    t = (blocks / scale).reshape(-1)
    # exact zeros sit on the book's 0 level whatever made them: a pruned model (half its weights 0) read 0.25 and
    # passed as an NF4 merge; a merge's zeros carry its update, so it loses nothing by their absence
    return G.book_position(t[t != 0], book)


def nf4_block(x: torch.Tensor, sample: int = SAMPLE) -> tuple[int, float]:
    """(block size of :data:`BLOCKS` whose :func:`merge_position` is lowest, that position). Time O(sample)."""
    return min(((b, merge_position(x, b, sample)) for b in BLOCKS), key=lambda bp: bp[1])


def _floats(layers: list[TensorInfo]) -> list[TensorInfo]:
    """The float matrices among ``layers`` (bitsandbytes quantizes only Linear weights: 2-D)."""
    return [t for t in layers if len(t.shape) == 2 and t.dtype.startswith(("float", "bfloat")) and t.numel >= 32]


def detect(ck: Checkpoint, layers: list[TensorInfo], sample: int = SAMPLE) -> int | None:
    """The block size at which ``ck`` is a merged NF4 model (mean :func:`nf4_block` position over at most
    :data:`POSITION_LAYERS` evenly spaced float matrices of ``layers`` below :data:`MERGE_POSITION`, at the block
    size most of them chose), None for an ordinary model, one already quantized or one stored in float32.
    Time O(sample) per layer tested after reading it."""
    # a merge is saved in the half precision bitsandbytes computes in: a float32 model is not read again (the
    # test read up to 4 matrices of every model once more: the held-out zoos' recovery took ~2x as long)
    mats = [t for t in _floats(layers) if ck.quantization(t.name) is None and ck.info(t.name).dtype in HALF]
    picked = mats[:: max(1, -(-len(mats) // POSITION_LAYERS))]
    try:
        read = [ck.read(t.name) for t in picked]
    except (AtlasError, OSError, RuntimeError, KeyError, ValueError):  # unreadable: the distances' read reports it
        return None
    for t in picked:  # the distances' pass reads them again: announced while held, a remote file keeps them
        ck.prefetch(t.name)
    found = [nf4_block(x, sample) for x in read]
    mean = sum(p for _, p in found) / max(len(found), 1)
    if not found or mean >= MERGE_POSITION or _fp4_mean(read, sample) < mean:  # an FP4 merge: not NF4
        return None
    blocks = [b for b, _ in found]
    return max(set(blocks), key=blocks.count)


def _fp4_mean(read: list[torch.Tensor], sample: int) -> float:
    """The lower of the NVFP4 and MXFP4 mean :func:`fp4_position` over the matrices ``read``: a model made from
    a dequantized FP4 model sits lower on its levels than on NF4's (0.39-0.43 on NF4's, read at block 32, for
    updates of 1e-3 .. 1e-2 of the RMS: below :data:`MERGE_POSITION`, it was taken for an NF4 merge and got
    NF4's variance). Time O(sample) per matrix."""
    return min(sum(fp4_position(x, label, sample) for x in read) / len(read) for label in F.GROUPS)


class NF4MergeView(Checkpoint):
    """``ckpt`` (a float model detected as a merged NF4 model of ``block``-sized blocks) with its float
    matrices among ``names`` reported as quantized (:data:`KIND`) and their rounding variance read off their
    values (:func:`~modelatlas.weights.bnb.merged_variance_4bit`). Reads go to ``ckpt``."""

    def __init__(self, ckpt: Checkpoint, block: int, names: set[str]):
        super().__init__(ckpt.path, name=ckpt.name)
        self.inner, self.block, self.names = ckpt, block, names
        self.format, self.kind, self.name_prefix = ckpt.format, ckpt.kind, ckpt.name_prefix

    def _infos(self) -> list[TensorInfo]:
        return self.inner.tensors()

    def _read(self, name: str) -> torch.Tensor:
        return self.inner.read(name)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def quantization(self, name: str) -> str | None:
        return KIND if name in self.names else None

    def rounding_variance(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """Time O(P); the layer is read again unless its ``values`` are given."""
        if name not in self.names:
            return None
        x = self.inner.read(name) if values is None else values.reshape(self.inner.info(name).shape)
        return B.merged_variance_4bit(x, B.NF4, self.block)

    def close(self) -> None:
        self.inner.close()


def mark_merges(members: list[Checkpoint], layers: list[TensorInfo]) -> tuple[list[Checkpoint], list[str]]:
    """``members`` with each detected merged NF4 model (:func:`detect`) wrapped in :class:`NF4MergeView`,
    and their names; not a model made from a quantized model given (its base is there). Time O(sample) per
    tested layer of each float model, after reading it."""
    names = {t.name for t in _floats(layers)}
    given = [q for q in members if any(q.quantization(t.name) for t in layers)]
    out, found = [], []
    for ck in members:
        block = detect(ck, layers) if ck.kind == "full" and ck not in given else None
        # made from a quantized model given: placed below it (lineage.quantized.made_from_copy), their shared
        # rounding is no noise between them
        if block is None or any(made_from_copy(q, ck, layers) for q in given):
            out.append(ck)
            continue
        out.append(NF4MergeView(ck, block, {n for n in names if ck.quantization(n) is None}))
        found.append(ck.name)
    return out, found
