"""A tree's edge distance chosen from its own spectra (lineage.tree_distance)."""

import numpy as np
import torch

from modelatlas.lineage import recover_lineage, tree_distance

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
