"""A tree's edge distance chosen from its own spectra (lineage.tree_distance)."""

import numpy as np
import torch

from modelatlas.lineage import recover_lineage, tree_distance
from modelatlas.lineage.rounding import MERGE_KIND, LayerRounding

from .test_rounding import write_gguf

TREE = {"m.0": "m", "m.1": "m", "m.0.0": "m.0", "m.0.1": "m.0", "m.1.0": "m.1", "m.1.1": "m.1"}


def make_hidden_tree(folder, seed=0, step=0.02):
    """A base and six full fine-tunes (each 2 % of the weights' spread from its parent: 128 x 256 layers), all
    seven only as Q4_0 files, whose rounding moves the weights ~9 %: the updates lie under the noise."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"m": {k: torch.randn(128, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}}
    for child, parent in TREE.items():
        weights[child] = {k: v + step * torch.randn(v.shape, generator=gen) for k, v in weights[parent].items()}
    for name, w in weights.items():
        write_gguf(folder / f"{name}.gguf", w, "Q4_0")
    return folder


def test_full_fine_tunes_hidden_under_rounding_are_not_a_lora_tree(tmp_path):
    """Each pair shows ~2 of 64 values a layer over the noise's edge (a "signal rank" of 3 %, a LoRA tree's
    below a quarter), but those carry ~0.2-0.3 of the update's energy, not ~1 as a LoRA update's: the tree
    was labelled "rank" (LoRA); it is RMS (debiased), with the same edges."""
    forest = recover_lineage(sorted(make_hidden_tree(tmp_path).iterdir()))
    assert forest.decisions["distance"] == "l2"
    assert {e.child: e.parent for e in forest.edges} == TREE


def check_kind(shown, low, want):
    rms = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float)  # MST: 0-1, 1-2
    full = lambda v: np.full((3, 3), v) - np.diag(np.full(3, v))  # noqa: E731
    assert tree_distance._auto_kind(rms, full(low), full(shown), paper=False) == want


def test_auto_kind_by_hand():
    check_kind(shown=1.0, low=0.0625, want="rank")  # a LoRA tree, visible (or unquantized)
    check_kind(shown=0.25, low=0.0625, want="l2")  # as few signal ranks, a quarter of the update: hidden
    check_kind(shown=1.0, low=0.5, want="nuclear*rank")  # visible, not low rank: full fine-tuning
    check_kind(shown=0.6, low=0.5, want="nuclear*rank")
    # a fifth of the ranks carrying half the update (full 2 % updates under Q6_K) is not a LoRA tree's
    check_kind(shown=0.55, low=0.2, want="nuclear*rank")
    check_kind(shown=0.94, low=0.2, want="rank")  # the least a LoRA tree showed on the development zoos


def make_visible_tree(folder, kinds=None, seed=0, step=0.3):
    """The tree of :data:`TREE` (128 x 256 layers), each update of rank 4 and ``step`` x the weights' spread,
    well over the Q4_0 rounding's ~9 %: each model as a GGUF file of its type in ``kinds`` (Q4_0 by default),
    or as float32 safetensors where that type is None."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    weights = {"m": {k: torch.randn(128, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}}
    for child, parent in TREE.items():
        weights[child] = {k: v + step * torch.randn(128, 4, generator=gen) @ torch.randn(4, 256, generator=gen) / 2
                          for k, v in weights[parent].items()}
    for name, w in weights.items():
        kind = (kinds or {}).get(name, "Q4_0")
        if kind is None:
            save_file(w, str(folder / f"{name}.safetensors"))
        else:
            write_gguf(folder / f"{name}.gguf", w, kind)
    return folder


def test_a_tree_of_one_quantization_takes_nuclear_norm_times_signal_rank(tmp_path):
    """Every model Q4_0: the LoRA test reads "rank" for full and LoRA trees alike under the noise, and nuclear
    norm x signal rank placed 560 of 612 development edges where rank placed 548 (docs/benchmarks.md, session
    32). Here the tree read "rank" before; the edges stay right."""
    forest = recover_lineage(sorted(make_visible_tree(tmp_path).iterdir()))
    assert forest.decisions["distance"] == "nuclear*rank"
    assert {e.child: e.parent for e in forest.edges} == TREE


def test_a_tree_with_an_unquantized_model_keeps_the_lora_test(tmp_path):
    """One model unquantized: its pairs' small values count, the others' drown, so signal ranks do not compare
    across pairs, and the LoRA test decides as before."""
    forest = recover_lineage(sorted(make_visible_tree(tmp_path, {"m.0": None}).iterdir()))
    assert forest.decisions["distance"] == "rank"


def make_full_tree(folder, seed=0, step=0.05, rank=16):
    """The tree of :data:`TREE` (128 x 256 layers), each update of rank 16 and ``step`` x the weights' spread
    (under Q4_0's ~9 % rounding, over Q5_1's ~2 %): "m", "m.1", "m.0.0" and "m.1.1" as Q5_1 files, the rest
    Q4_0."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"m": {k: torch.randn(128, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}}
    for child, parent in TREE.items():
        weights[child] = {k: v + step * torch.randn(128, rank, generator=gen) @ torch.randn(rank, 256, generator=gen)
                          / rank**0.5 for k, v in weights[parent].items()}
    for name, w in weights.items():
        write_gguf(folder / f"{name}.gguf", w, "Q5_1" if name in ("m", "m.1", "m.0.0", "m.1.1") else "Q4_0")
    return folder


def test_a_tree_of_two_types_counts_signal_ranks_over_the_coarser_noise(tmp_path):
    """Two types in one tree: each pair's ranks were counted over its own noise's edge, so the Q5_1 pairs
    (a quarter of Q4_0's noise) counted more of an update's values and read farther; the LoRA test read
    "rank" and 4 of the 6 edges went wrong. Counted over the noise of two Q4_0 roundings, every pair alike,
    nuclear norm x signal rank places all six."""
    forest = recover_lineage(sorted(make_full_tree(tmp_path).iterdir()))
    assert forest.decisions["distance"] == "nuclear*rank"
    assert {e.child: e.parent for e in forest.edges} == TREE


def check_common_noise(kinds, energy, want):
    layers = [LayerRounding(np.array(e, dtype=float), np.array(k, dtype=object), 64) for k, e in zip(kinds, energy)]
    assert tree_distance._common_noise(layers, np.arange(3)) == want


def test_common_noise_by_hand():
    q, z = [1.0, 4.0, 1.5], [0.0, 0.0, 0.0]
    check_common_noise([["Q5_1", "Q4_0", "Q5_1"], [None] * 3], [q, z], [8.0, 0.0])  # twice the coarsest's
    check_common_noise([["Q4_0"] * 3, ["Q8_0", "Q4_0", "Q4_0"]], [q, q], [8.0, 8.0])  # two types in one layer
    check_common_noise([["Q4_0"] * 3], [q], None)  # one type: _one_rounding
    check_common_noise([["Q4_0", "Q5_1", None]], [[1.0, 1.0, 0.0]], None)  # one model unquantized
    check_common_noise([[MERGE_KIND, "Q4_0", "Q4_0"]], [q], None)  # a merged QLoRA model
    check_common_noise([["INT4", "Q4_0", "Q4_0"]], [[0.0, 1.0, 1.0]], None)  # a type that gives no variance


def check_one_rounding(kinds, energy, want):
    layers = [LayerRounding(np.array(e, dtype=float), np.array(k, dtype=object), 64) for k, e in zip(kinds, energy)]
    assert tree_distance._one_rounding(layers, np.arange(3)) == want


def test_one_rounding_by_hand():
    q, z = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    check_one_rounding([["Q4_0"] * 3, [None] * 3], [q, z], True)  # a layer left unquantized by all: fine
    check_one_rounding([[None] * 3], [z], False)  # nothing quantized
    check_one_rounding([["Q4_0", "Q4_0", None]], [[1.0, 1.0, 0.0]], False)  # one model unquantized
    check_one_rounding([["Q4_0", "Q4_0", "Q5_1"]], [q], False)  # two noise levels
    check_one_rounding([["Q4_0"] * 3, ["Q8_0"] * 3], [q, q], True)  # a type per layer (K-quant mixes)
    check_one_rounding([[MERGE_KIND] * 3], [q], False)  # merged QLoRA models: no noise between them
    check_one_rounding([["INT4"] * 3], [[1.0, 0.0, 1.0]], False)  # a model whose type gives no variance
