"""Scoring against a manifest holding merged models (its ``merge`` records)."""

from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.scoring import (
    edge_errors,
    edge_marks,
    found_merges,
    same_merge_parents,
    score_forest,
    truth_merges,
)
from modelatlas.zoo.manifest import Manifest, ModelRecord


def make_truth():
    """r -> a, r -> b; m = 0.5 a + 0.5 b (drawn under a, the first of equals); plain c under a."""
    return Manifest([ModelRecord("r", "r", None, "t"), ModelRecord("a", "a", "r", "t"), ModelRecord("b", "b", "r", "t"),
                     ModelRecord("c", "c", "a", "t"),
                     ModelRecord("m", "m", "a", "t", merge={"kind": "linear", "parents": ["a", "b"], "weights": [0.5, 0.5]})])


def make_forest(m_parent="b", m_parents=("b", "a"), c_kind="full"):
    """The truth's tree with m recovered as a merge of ``m_parents`` drawn under ``m_parent``."""
    edges = [Edge("r", "a", 1), Edge("r", "b", 1), Edge("a", "c", 1, kind=c_kind), Edge(m_parent, "m", 1, kind="merge")]
    merges = {"m": {"parents": list(m_parents), "weights": [0.5, 0.5]}}
    if c_kind == "merge":
        merges["c"] = {"parents": ["a", "r"], "weights": [0.9, 0.1]}
    return Forest(["r", "a", "b", "c", "m"], edges, {"model_merges": merges}, [["r", "a", "b", "c", "m"]])


def test_a_merge_found_with_its_parents_is_right_under_either():
    truth = make_truth()
    s = score_forest(make_forest(), truth)  # drawn under b, the truth's other parent of equal weight
    assert (s.n_correct, s.n_true_edges, s.n_merges, s.n_merges_found, s.n_false_merges) == (4, 4, 1, 1, 0)
    assert edge_marks(make_forest(), truth)[("b", "m")] == "right" and not edge_errors(make_forest(), truth)
    assert s.as_dict()["merges"] == {"true": 1, "found": 1, "false": 0}


def test_a_merge_with_other_parents_is_scored_as_drawn():
    truth = make_truth()
    s = score_forest(make_forest(m_parents=("b", "c")), truth)
    assert (s.n_correct, s.n_merges_found) == (3, 0)
    assert edge_errors(make_forest(m_parents=("b", "c")), truth) == {("b", "m"): "uncle"}  # b: a sibling of the true parent a
    s = score_forest(make_forest(m_parent="a", m_parents=("a", "c")), truth)  # under its main parent: right
    assert (s.n_correct, s.n_merges_found) == (4, 0)


def test_false_merges_and_a_truth_without_merges():
    truth = make_truth()
    s = score_forest(make_forest(c_kind="merge"), truth)
    assert (s.n_false_merges, s.n_merges_found) == (1, 1)
    plain = truth.parents()  # a dict truth knows no merges: m is read as drawn
    assert truth_merges(plain) == {} and truth_merges(truth)["m"]["parents"] == ["a", "b"]
    s = score_forest(make_forest(), plain)
    assert (s.n_correct, s.n_merges) == (3, 0)
    assert found_merges(make_forest(), truth_merges(truth)) == {"m"}


def test_a_parent_weighted_near_zero_is_none():
    # task arithmetic r + 0.6 (a - r) + 0.38 (b - r): r's weight 0.02, a linear merge of a and b to the weights
    truth = Manifest([ModelRecord("r", "r", None, "t"), ModelRecord("a", "a", "r", "t"), ModelRecord("b", "b", "r", "t"),
                      ModelRecord("c", "c", "a", "t"),
                      ModelRecord("m", "m", "a", "t", merge={"parents": ["r", "a", "b"], "weights": [0.02, 0.6, 0.38]})])
    assert score_forest(make_forest(), truth).n_merges_found == 1  # found as a merge of a and b
    three = make_forest()
    three.decisions["model_merges"]["m"] = {"parents": ["a", "r", "b"], "weights": [0.6, 0.02, 0.38]}
    assert score_forest(three, truth).n_merges_found == 1  # or of all three
    true = {"parents": ["r", "a", "b"], "weights": [0.3, 0.4, 0.3]}
    assert not same_merge_parents({"parents": ["a", "b"], "weights": [0.5, 0.5]}, true)  # r weighs
    assert same_merge_parents({"parents": ["b", "r", "a"], "weights": [0.3, 0.3, 0.4]}, true)
    assert same_merge_parents({"parents": ["a", "r", "b"]}, true)  # a declared merge: no weights


def test_a_ties_merge_has_its_base_and_models_for_parents():
    # TIES of a, b on base r: weights [0, x, y] (the base is the origin); found only with r, a and b
    ties = {"kind": "ties", "parents": ["r", "a", "b"], "weights": [0.0, 0.6, 0.4], "density": 0.5}
    truth = Manifest([ModelRecord("r", "r", None, "t"), ModelRecord("a", "a", "r", "t"), ModelRecord("b", "b", "r", "t"),
                      ModelRecord("c", "c", "a", "t"), ModelRecord("m", "m", "a", "t", merge=ties)])
    assert truth_merges(truth)["m"] == ties
    assert found_merges(make_forest(m_parents=("r", "a", "b")), truth_merges(truth)) == {"m"}
    assert score_forest(make_forest(), truth).n_merges_found == 0  # a and b alone: not its parents


def make_copy_forest():
    """The truth's tree given with a16, a precision copy of a that the truth does not name, given first: the
    merge m is recovered as a merge of a16 and b, drawn under a16."""
    edges = [Edge("r", "a16", 1), Edge("a16", "a", 1, kind="precision"), Edge("r", "b", 1),
             Edge("a16", "c", 1), Edge("a16", "m", 1, kind="merge")]
    merges = {"m": {"parents": ["a16", "b"], "weights": [0.5, 0.5]}}
    return Forest(["r", "a16", "a", "b", "c", "m"], edges, {"model_merges": merges}, [["r", "a16", "a", "b", "c", "m"]])


def test_a_merge_of_an_unnamed_copy_is_read_as_its_named_model():
    # a16 is scored as a (its edges are a's): so is it as a merge's parent (found_merges read no copy's name)
    truth = make_truth()
    s = score_forest(make_copy_forest(), truth)
    assert (s.n_correct, s.n_true_edges, s.n_merges, s.n_merges_found, s.n_false_merges) == (4, 4, 1, 1, 0)


def test_a_truth_silent_on_merges_counts_no_false_merge():
    # a {model: parent} truth, or a hand-written manifest, names no merge: m is no 'false merge' of it
    truth = make_truth()
    plain = {"r": None, "a": "r", "b": "r", "c": "a", "m": "a"}
    hand = Manifest([ModelRecord(n, n, p, "t") for n, p in plain.items()], {})
    for silent in (plain, hand):
        assert score_forest(make_forest(), silent).n_false_merges == 0
    zoo = Manifest([ModelRecord(n, n, p, "t") for n, p in plain.items()], {"arch_config": {}, "merges": 0})
    assert score_forest(make_forest(), zoo).n_false_merges == 1  # a zoo built without merges has none
    assert score_forest(make_forest(c_kind="merge"), truth).n_false_merges == 1  # c: the truth says no merge


def test_a_merge_whose_parent_was_not_given_is_not_counted_missed():
    # b not given: m cannot be found as a merge of a and b; it was counted '0 of 1 found'
    truth = make_truth()
    edges = [Edge("r", "a", 1), Edge("a", "c", 1), Edge("a", "m", 1)]
    forest = Forest(["r", "a", "c", "m"], edges, {"model_merges": {}}, [["r", "a", "c", "m"]])
    s = score_forest(forest, truth)
    assert (s.n_merges, s.n_merges_found, s.n_false_merges, s.n_correct) == (0, 0, 0, 3)
    base_left_out = Manifest([*truth.models[:4], ModelRecord("m", "m", "a", "t", merge={
        "parents": ["b", "a", "c"], "weights": [0.01, 0.6, 0.39]})])  # b weighs under MIN_WEIGHT: a merge of a and c
    forest.decisions["model_merges"]["m"] = {"parents": ["a", "c"], "weights": [0.6, 0.4]}
    s = score_forest(forest, base_left_out)
    assert (s.n_merges, s.n_merges_found) == (1, 1)
