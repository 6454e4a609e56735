"""Known directions (the adapters' base, a quantized base) as labelled evidence of the stage: along a known
ancestor -> descendant pair, kurtosis rising says "generalize" and falling "specialize" outright."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.known import KNOWN_WEIGHT, Known, known_votes, tree_evidence_known
from modelatlas.lineage.orient import pooled_stage
from modelatlas.weights import open_checkpoint


def test_known_votes_scale_each_layer_by_its_typical_change_on_the_tree_edges():
    # MST edges 0-1 and 0-2 (1-2 is the longest pair); layer changes along them: layer 0 -1 and -3 (median 2),
    # layer 1 2 and 2 (median 2)
    d = np.array([[0, 1, 1], [1, 0, 2], [1, 2, 0]], dtype=float)
    lk = np.array([[0.0, 0.0], [1.0, -2.0], [3.0, -2.0]])
    got = known_votes(d, lk.sum(1), lk, [(0, 1), (0, 2)])
    assert got == pytest.approx([(math.tanh(-0.5) + math.tanh(1.0)) / 2, (math.tanh(-1.5) + math.tanh(1.0)) / 2])
    assert got == pytest.approx([0.1497, -0.0718], abs=1e-4)
    assert known_votes(d, lk.sum(1), lk, [(0, 1), (0, 2)], "sign") == pytest.approx([0.0, 0.0])
    assert known_votes(d, lk.sum(1), lk, []).shape == (0,)


def _trees():
    """A free chain a - b - c whose kurtosis peaks at b (read as specialize by one violation: b the root) and a
    tree base -> x, base -> y whose root is known, kurtosis rising by 1 on both edges."""
    chain = (np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float), np.array([0.0, 2.0, 1.0]))
    star = (np.array([[0, 1, 1], [1, 0, 1.5], [1, 1.5, 0]]), np.array([0.0, 1.0, 1.0]))
    return [(["a", "b", "c"], *chain, None), (["base", "x", "y"], *star, None)]


def decide_stage_known(cfg, placement, trees, known):
    """The stage of ``trees`` pooled with the known descents' votes, as recovery decided it before session 31's
    per-tree stages."""
    own, info = tree_evidence_known(cfg, placement, trees, known)
    stage, conf = pooled_stage(float(own.sum()))
    return stage, conf, {"stage_evidence": float(own.sum()), **info}


def test_known_edges_decide_the_stage_a_chain_cannot():
    """Unlabelled, the star's -1 (generalize: a leaf root violates one edge) and the chain's +1 cancel:
    "specialize" by default. Each known pair votes tanh(-1) (its layer's change, over the median change 1)."""
    stage, conf, info = decide_stage_known(LineageConfig(), "mst", _trees(), Known("base", ("x", "y")))
    assert info["stage_known"] == {"pairs": 2, "specialize": 0, "generalize": 2,
                                   "evidence": pytest.approx(2 * KNOWN_WEIGHT * math.tanh(-1.0))}
    assert KNOWN_WEIGHT == 2.5 and info["stage_evidence"] == pytest.approx(1 + 5 * math.tanh(-1.0))  # -2.808
    assert stage == "generalize" and conf == pytest.approx(1 / (1 + math.exp(-2.8080)), abs=1e-4)
    assert info["violations"] == {"specialize": 0, "generalize": 1}  # the free chain's only


def test_a_quantized_bases_pairs_add_to_its_trees_own_evidence():
    """Models made from a quantized base descend from it, but its tree's root is not known (the base's source
    or its parent may be given too): the tree's unlabelled evidence (-1) stays, the pairs' votes add to it."""
    known = Known(made={"x": "base", "y": "base"})
    assert known.pairs(["base", "x", "y"]) == [(0, 1), (0, 2)] and known.pairs(["x", "z"]) == []
    stage, _, info = decide_stage_known(LineageConfig(), "mst", _trees(), known)
    assert info["stage_evidence"] == pytest.approx(1 - 1 + 5 * math.tanh(-1.0))  # chain + star + votes: -3.81
    assert stage == "generalize" and info["violations"] == {"specialize": 1, "generalize": 1}


def test_without_known_pairs_the_stage_is_the_unlabelled_one():
    stage, conf, info = decide_stage_known(LineageConfig(), "mst", _trees(), Known())
    assert (stage, conf, info["stage_evidence"]) == ("specialize", pytest.approx(0.5), pytest.approx(0.0))
    assert "stage_known" not in info


def _spiked(weights, scale):
    """``weights`` with one entry of each layer set to ``scale`` x its RMS: an outlier, kurtosis up."""
    return {k: torch.cat([v.flatten()[:1] * 0 + scale * float(v.std()), v.flatten()[1:]]).reshape(v.shape)
            for k, v in weights.items()}


def _adapter(folder, spike, seed):
    """A rank-1 PEFT adapter whose update is one entry of ``spike`` (and a little noise) in each layer."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["layers.0", "layers.1", "layers.2"]}))
    tensors = {}
    for i in range(3):
        a, b = 0.05 * torch.randn(1, 16, generator=g), 0.05 * torch.randn(16, 1, generator=g)
        a[0, 3 + i], b[5 + i, 0] = spike, 1.0
        tensors[f"base_model.model.layers.{i}.lora_A.weight"] = a
        tensors[f"base_model.model.layers.{i}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_a_base_given_sets_the_stage_of_a_tree_without_one(tmp_path):
    """Two adapters that each add an outlier (kurtosis up: generalize) on a base given, and a chain of full
    models c0 -> c1 -> c2 whose kurtosis peaks at c1 (an outlier added, then noise). Read without labels the
    star's evidence (-1) and the chain's (+1) cancelled: stage "specialize" (confidence 0.5)."""
    g = torch.Generator().manual_seed(3)
    layers = lambda: {f"layers.{i}.weight": torch.randn(16, 16, generator=g) for i in range(3)}  # noqa: E731
    save_file(layers(), str(tmp_path / "base.safetensors"))
    _adapter(tmp_path / "a0", 6.0, 0)
    _adapter(tmp_path / "a1", 6.0, 1)
    c0 = layers()
    c1 = _spiked(c0, 8.0)
    c2 = {k: v + 0.3 * torch.randn(16, 16, generator=g) for k, v in c1.items()}
    for name, w in (("c0", c0), ("c1", c1), ("c2", c2)):
        save_file(w, str(tmp_path / f"{name}.safetensors"))
    paths = [tmp_path / n for n in ("base.safetensors", "a0", "a1", "c0.safetensors", "c1.safetensors", "c2.safetensors")]
    with open_checkpoint(tmp_path / "base.safetensors") as base:
        f = recover_lineage(paths, adapter_base=base)
    assert sorted(map(sorted, f.trees)) == [["a0", "a1", "base"], ["c0", "c1", "c2"]]
    assert f.decisions["stage"] == "generalize" and f.decisions["stage_evidence"] < -1  # was specialize, 0.0
    assert f.decisions["stage_known"]["pairs"] == 2 and f.decisions["stage_known"]["generalize"] == 2
