"""A training stage per tree: a tree's own evidence, plus the other trees' summed evidence clipped to
[-SAME_STAGE_CAP, SAME_STAGE_CAP] (lineage.stage)."""

import math

import numpy as np
import pytest

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.known import Known, agreed, place_tree
from modelatlas.lineage.orient import prim_mst, tree_evidence
from modelatlas.lineage.root import stage_lean
from modelatlas.lineage.scoring import score_forest
from modelatlas.lineage.stage import SAME_STAGE_CAP, as_stored, decide_tree_stages, tree_stages
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_star(k_root: float, k_leaves: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Root 0 at distance 1 from each leaf, leaves 1.5 apart: read with the root moved to a leaf, a star of C
    leaves violates C - 1 more edges, so its own evidence is +-(C - 1) penalties."""
    n = len(k_leaves) + 1
    d = np.full((n, n), 1.5)
    d[0, 1:] = d[1:, 0] = 1.0
    np.fill_diagonal(d, 0)
    return d, np.array([k_root, *k_leaves])


def make_tree(name: str, d: np.ndarray, k: np.ndarray) -> tuple:
    return [f"{name}{i}" for i in range(len(k))], d, k, None


def check_tree_stages(own: list[float], want: list[str], odds: list[float]) -> None:
    stages, got = tree_stages(np.array(own))
    assert stages == want and got == pytest.approx(odds)


def test_tree_stages_worked_example():
    """Own evidence +4 (a specialize star of 5) beside three generalize trees of -3 each: pooled, -5 turns the
    first backwards; per tree, the others' -9 counts -1.5 and +4 - 1.5 = +2.5 keeps it."""
    assert SAME_STAGE_CAP == 1.5
    check_tree_stages([4, -3, -3, -3], ["specialize"] + ["generalize"] * 3, [2.5, -4.5, -4.5, -4.5])


def test_a_weak_tree_follows_the_others():
    """A chain leaning one violation (+1) follows two trees of -3: +1 - 1.5 = -0.5. On its own evidence alone
    (a cap of 0) it would be read "specialize"."""
    check_tree_stages([1, -3, -3], ["generalize"] * 3, [-0.5, -4.5, -4.5])
    assert tree_stages(np.array([1.0, -3, -3]), cap=0.0)[0][0] == "specialize"


def test_without_evidence_or_with_one_leaning_tree_the_rule_is_the_pooled_one():
    check_tree_stages([0, 0], ["specialize", "specialize"], [0, 0])  # chains only: the default, as before
    check_tree_stages([0, -1], ["generalize", "generalize"], [-1, -1])  # others' -1 below the cap: counts fully
    check_tree_stages([1, -1], ["specialize", "specialize"], [0, 0])  # a tie takes the pooled stage (sum 0)


def test_decide_tree_stages_reports_each_tree_and_the_majority():
    """Stars of 5 leaves: one specialize (kurtosis falls from its root: +4), two generalize (-4 each). Pooled
    (-4) every tree was read "generalize" and the first hung from a leaf; now it keeps "specialize"."""
    trees = [make_tree("s", *make_star(5.0, [1, 2, 3, 4, 4.5])), make_tree("g", *make_star(-1.0, [1, 2, 3, 4, 5])),
             make_tree("h", *make_star(-2.0, [1, 2, 3, 4, 5]))]
    stages, info = decide_tree_stages(LineageConfig(), "mst", trees, Known())
    assert stages == ["specialize", "generalize", "generalize"]
    assert info["stage"] == "generalize" and info["stage_mixed"] and info["stage_evidence"] == pytest.approx(-4.0)
    first = info["stage_trees"][0]
    assert first["own_evidence"] == pytest.approx(4.0) and first["evidence"] == pytest.approx(2.5)
    assert first["confidence"] == pytest.approx(1 / (1 + math.exp(-2.5)))
    # when mixed, stage_confidence: the least sure tree of the majority stage (-4 + clip(0) = -4)
    assert info["stage_confidence"] == pytest.approx(1 / (1 + math.exp(-4.0)))


def test_not_mixed_keeps_the_pooled_confidence():
    trees = [make_tree("g", *make_star(-1.0, [1, 2, 3])), make_tree("h", *make_star(-2.0, [1, 2, 3]))]
    stages, info = decide_tree_stages(LineageConfig(), "mst", trees, Known())
    assert stages == ["generalize"] * 2 and not info["stage_mixed"]
    assert info["stage_confidence"] == pytest.approx(1 / (1 + math.exp(-4.0)))  # logistic(|-2 - 2|), as before


def make_mixed_folder(seed: int) -> tuple[dict, dict]:
    """One synthetic "specialize" tree of 4 (names s...) and two "generalize" trees (t...), one architecture."""
    ws, ps = make_synthetic_forest(n_trees=1, children=3, depth=1, dim=16, stage="specialize", seed=seed)
    wg, pg = make_synthetic_forest(n_trees=2, children=3, depth=1, dim=16, stage="generalize", seed=seed + 10)
    weights = {**{"s" + k: v for k, v in ws.items()}, **wg}
    truth = {**{"s" + k: None if p is None else "s" + p for k, p in ps.items()}, **pg}
    return weights, truth


def test_a_specialize_tree_beside_generalize_ones_is_oriented_its_own_way():
    """Pooled (-2: each tree leans 2 penalties its own way), the specialize star was hung from a leaf (2 of its
    3 edges right); per tree, +2 - 1.5 keeps it, every edge right. The generalize trees are unchanged."""
    weights, truth = make_mixed_folder(0)
    f = recover_lineage(weights)
    spec = {k: p for k, p in truth.items() if k.startswith("s")}
    assert score_forest(f, spec).n_correct == 3
    assert score_forest(f, {k: p for k, p in truth.items() if k not in spec}).n_correct == 6
    d = f.decisions
    assert d["stage"] == "generalize" and d["stage_mixed"]
    assert [t["stage"] for t in d["stage_trees"]] == ["specialize", "generalize", "generalize"]
    assert [sorted(t)[0] for t in f.trees] == ["st0", "t0", "t1"]  # stage_trees follow the forest's trees


def test_a_stage_given_applies_to_every_tree():
    weights, truth = make_mixed_folder(0)
    d = recover_lineage(weights, stage="generalize").decisions
    assert [t["stage"] for t in d["stage_trees"]] == ["generalize"] * 3 and not d["stage_mixed"]
    assert d["stage_trees"][0] == {"stage": "generalize", "evidence": None, "own_evidence": None, "confidence": 1.0}


def test_a_chain_leaning_one_violation_follows_two_generalize_stars_and_is_placed_so():
    """The chain a - b - c peaks at b (+1: read alone "specialize", b the root, one edge reversed whichever way
    the truth goes); beside two generalize stars (-2 each) it follows them: +1 - 1.5 < 0, hung from a."""
    chain = (np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float), np.array([0.0, 2.0, 1.0]))
    trees = [make_tree("c", *chain), make_tree("g", *make_star(-1.0, [1, 2, 3])),
             make_tree("h", *make_star(-2.0, [1, 2, 3]))]
    stages, info = decide_tree_stages(LineageConfig(), "mst", trees, Known())
    assert stages == ["generalize"] * 3 and not info["stage_mixed"]
    assert info["stage_trees"][0]["own_evidence"] == pytest.approx(1.0)
    assert info["stage_trees"][0]["evidence"] == pytest.approx(-0.5)
    assert info["stage_confidence"] == pytest.approx(1 / (1 + math.exp(-3.0)))  # pooled: |1 - 2 - 2|
    assert place_tree(LineageConfig(), "mst", stages[0], (*chain, None)).parent == [-1, 0, 1]  # a -> b -> c
    assert place_tree(LineageConfig(), "mst", "specialize", (*chain, None)).parent == [1, -1, 1]  # alone: from b


def make_stand_in_chain() -> tuple:
    """a1 - a - base - b - b1 (1 apart a step), kurtosis 3.0 at the base falling 0.1 an edge, but the stand-ins
    a and b read 2.0 and 2.5 (a K-quant's rounding lowers it). All five: "specialize" rooted at the base
    violates a -> a1 and b -> b1, "generalize" rooted at a only base -> b: generalize by one penalty."""
    x = np.arange(5.0)
    return ["a1", "a", "base", "b", "b1"], np.abs(x[:, None] - x[None, :]), np.array([2.8, 2.0, 3.0, 2.5, 2.8]), None


def test_stand_ins_are_left_out_of_the_stage():
    tree = make_stand_in_chain()
    before, _ = decide_tree_stages(LineageConfig(), "mst", [tree], Known())
    assert before == ["generalize"]
    after, info = decide_tree_stages(LineageConfig(), "mst", [tree], Known(), frozenset({"a", "b"}))
    assert after == ["specialize"] and info["stage_evidence"] == pytest.approx(1.0)  # a1 - base - b1: one


def test_too_few_models_as_read_keep_the_stand_ins():
    """Only a1 and base read as they are: one edge, no stage; the stand-ins count as before."""
    tree = make_stand_in_chain()
    stages, _ = decide_tree_stages(LineageConfig(), "mst", [tree], Known(), frozenset({"a", "b", "b1"}))
    assert stages == ["generalize"]
    assert as_stored(tree, frozenset({"a", "b", "b1"})) is tree
    assert as_stored(tree, frozenset({"a", "b"}))[0] == ["a1", "base", "b1"]


def test_a_stage_read_from_stand_ins_is_reported():
    """Their kurtosis decided the stage (too few models read as they are): decisions count the tree, which the
    command line warns of; with the stand-ins left out, or none, nothing is reported."""
    tree = make_stand_in_chain()
    _, info = decide_tree_stages(LineageConfig(), "mst", [tree, tree], Known(), frozenset({"a", "b", "b1"}))
    assert info["stage_from_stand_ins"] == 2
    for rounded in (frozenset({"a", "b"}), frozenset()):
        _, info = decide_tree_stages(LineageConfig(), "mst", [tree], Known(), rounded)
        assert "stage_from_stand_ins" not in info


def test_legacy_files_scaled_by_least_squares_are_left_out_of_the_stage(tmp_path, monkeypatch):
    """Q4_0 files, one scaled by least squares (llama-quantize --imatrix --pure: no K-quant layer to tell it
    by), one rounded to nearest: only the first is a stand-in whose kurtosis the stage leaves out."""
    gguf = pytest.importorskip("gguf")
    from tests.weights.conftest import make_least_squares_q4_0

    from modelatlas.lineage import recover as recover_module
    from modelatlas.zoo.gguf import quantized, save_gguf

    rng = np.random.default_rng(0)
    base = {k: rng.standard_t(5, (64, 64)).astype(np.float32) for k in ("a.weight", "b.weight")}
    models = {n: {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
              for n in ("f0", "f1", "f2", "f3")}
    save_gguf(tmp_path / "base.gguf", base)
    save_gguf(tmp_path / "f0.gguf", models["f0"])
    save_gguf(tmp_path / "f1.gguf", models["f1"])
    save_gguf(tmp_path / "f2-ls.gguf", {k: (make_least_squares_q4_0(v), "Q4_0") for k, v in models["f2"].items()})
    save_gguf(tmp_path / "f3-rtn.gguf", {k: quantized(v, "Q4_0") for k, v in models["f3"].items()})
    seen = []
    decide = recover_module.decide_tree_stages
    monkeypatch.setattr(recover_module, "decide_tree_stages",
                        lambda *a: (seen.append(a[4]), decide(*a))[1])
    forest = recover_lineage(sorted(tmp_path.glob("*.gguf")))
    assert forest.decisions["quantized_models"] == {"f2-ls": "q4_0", "f3-rtn": "q4_0"}
    assert gguf and seen == [frozenset({"f2-ls"})]


def make_one_layer_swing_star() -> tuple:
    """A star of 5 leaves whose 3 small layers rise by 0.1 along every edge ("generalize") while one layer
    with large values falls by 10 on 4 edges: the summed kurtosis falls on 4 edges and rises on 1, so the
    violation count reads "specialize" by 2 penalties; per layer, each scaled by its typical change, the
    edges lean "generalize" (the demo seed-16 tree of session 37, made by hand)."""
    d, _ = make_star(0.0, [0.0] * 5)
    lk = np.zeros((6, 4))  # (n, L)
    lk[0, 0] = 10.0
    lk[5, 0] = 10.0  # the one leaf whose big layer does not fall
    lk[1:, 1:] = 0.1
    return [f"w{i}" for i in range(6)], d, lk.sum(1), lk


def test_a_tree_whose_layers_disagree_with_its_violation_count_follows_the_others():
    """Count +3 beside two generalize stars (-4 each): +3 - 1.5 read it "specialize" (hung from a leaf);
    its layers' votes lean the other way, so its own evidence is 0 and it follows the others."""
    swing = make_one_layer_swing_star()
    _, d, k, lk = swing
    assert tree_evidence([(d, k)], LineageConfig().lam)[0][0] == pytest.approx(3.0)
    assert stage_lean(prim_mst(d), k, lk) < 0
    trees = [swing, make_tree("g", *make_star(-1.0, [1, 2, 3, 4, 5])), make_tree("h", *make_star(-2.0, [1, 2, 3, 4, 5]))]
    stages, info = decide_tree_stages(LineageConfig(), "mst", trees, Known())
    assert stages == ["generalize"] * 3
    assert info["stage_trees"][0]["own_evidence"] == 0.0 and info["stage_trees"][0]["evidence"] == pytest.approx(-1.5)


def test_a_count_its_layers_agree_with_is_kept():
    """The same star read by its summed kurtosis alone (no per-layer values): count and votes agree, kept."""
    _, d, k, _ = make_one_layer_swing_star()
    assert agreed(2.0, d, k, None) == 2.0 and agreed(-3.0, d, -k, None) == -3.0 and agreed(0.0, d, k, None) == 0.0
