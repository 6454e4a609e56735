"""Runner-up parents (lineage.runner_up): the nearest model outside a child's own subtree, other than its
parent, with its distance over the parent's; carried on each recovered edge, in the JSON and, as a close call,
in the terminal tree."""

import math

import numpy as np
import pytest

from modelatlas.lineage import recover_lineage
from modelatlas.lineage import runner_up as ru
from modelatlas.lineage.export import runner_up_note, to_text
from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.runner_up import runner_up_parents
from modelatlas.lineage.scoring import prefer_named_copies
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_points_tree():
    """Points on a line: 0 at 0, 1 at 1, 2 at 2.05, 3 at 0.9 + a side step. Tree 0 -> 1 -> 2, 0 -> 3."""
    x = np.array([[0.0, 0.0], [1.0, 0.0], [2.05, 0.0], [0.9, 0.5]])
    dist = np.linalg.norm(x[:, None] - x[None, :], axis=2)  # (4, 4)
    return dist, [-1, 0, 1, 0]


def check_brute_force(dist: np.ndarray, parent: list[int]) -> tuple[list[int], list[float]]:
    """The oracle: each child's subtree by walking parents, then the nearest eligible model."""
    n = len(parent)

    def below(u: int, v: int) -> bool:  # u in v's subtree
        while u >= 0:
            if u == v:
                return True
            u = parent[u]
        return False

    alt, ratio = [], []
    for v in range(n):
        cand = [u for u in range(n) if parent[v] >= 0 and u != parent[v] and not below(u, v)]
        if not cand:
            alt.append(-1), ratio.append(math.inf)
            continue
        u = min(cand, key=lambda c: (dist[v, c], c))
        alt.append(u), ratio.append(dist[v, u] / dist[v, parent[v]])
    return alt, ratio


def test_hand_checked_tree():
    dist, parent = make_points_tree()
    alt, ratio = runner_up_parents(dist, parent)
    # 1: not its parent 0 nor its child 2: model 3 at sqrt(0.01 + 0.25) against 1.0
    # 2: its parent is 1; nearest other is 3 (|(1.15, 0.5)|); 3: nearest other than 0 is 1 (|(0.1, 0.5)|)
    assert alt.tolist() == [-1, 3, 3, 1]
    assert ratio[0] == math.inf
    assert ratio[1] == pytest.approx(math.hypot(0.1, 0.5) / 1.0)
    assert ratio[2] == pytest.approx(math.hypot(1.15, 0.5) / 1.05)
    assert ratio[3] == pytest.approx(math.hypot(0.1, 0.5) / math.hypot(0.9, 0.5))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_forests(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n = 23
    parent = [-1 if v in (0, 7) else int(rng.integers(0, v)) for v in range(n)]  # two trees, parents first
    x = rng.normal(size=(n, 5))
    dist = np.linalg.norm(x[:, None] - x[None, :], axis=2)
    monkeypatch.setattr(ru, "_BLOCK", 4)  # several blocks of rows
    alt, ratio = runner_up_parents(dist, parent)
    want_alt, want_ratio = check_brute_force(dist, parent)
    assert alt.tolist() == want_alt
    assert np.allclose(ratio, want_ratio)


def test_a_parent_at_distance_zero_and_a_lone_child():
    dist = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    alt, ratio = runner_up_parents(dist, [-1, 0, 0])  # 1 is at distance 0 from its parent: no ratio
    assert alt.tolist() == [-1, 2, 1] and ratio[1] == math.inf and ratio[2] == pytest.approx(0.5)
    alt, ratio = runner_up_parents(dist, [-1, 0, 1])  # 1's only other model is its own child
    assert alt.tolist() == [-1, -1, 0] and ratio[1] == math.inf and ratio[2] == pytest.approx(2.0)
    alt, ratio = runner_up_parents(np.array([[0.0, 1.0], [1.0, 0.0]]), [-1, 0])
    assert alt.tolist() == [-1, -1] and ratio.tolist() == [math.inf, math.inf]


def test_recovered_edges_carry_their_runner_up():
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=3)
    forest = recover_lineage(weights)
    got = forest.parents()
    for e in forest.edges:
        assert e.runner_up is not None and e.runner_up not in (e.parent, e.child)
        u = e.runner_up
        while u is not None:  # never the child's own descendant
            assert u != e.child
            u = got[u]
        assert e.runner_up_ratio >= 1.0 - 1e-9  # an MST: no other parent is nearer
    data = forest.to_dict()
    assert all({"runner_up", "runner_up_ratio"} <= set(d) for d in data["edges"])
    back = Forest.from_dict(data).edges
    assert [(e.parent, e.child, e.runner_up) for e in back] == [(e.parent, e.child, e.runner_up) for e in forest.edges]
    assert [e.runner_up_ratio for e in back] == pytest.approx([e.runner_up_ratio for e in forest.edges], rel=1e-5)


def test_an_older_forest_json_loads_without_runner_ups():
    f = Forest.from_dict({"nodes": ["a", "b"], "edges": [{"parent": "a", "child": "b", "score": 0.5}]})
    assert f.edges[0].runner_up is None and math.isnan(f.edges[0].runner_up_ratio)
    assert "runner_up" not in f.to_dict()["edges"][0]


def test_the_tree_shows_a_close_runner_up_only():
    edges = [Edge("a", "b", 0.03, 1.0, runner_up="c", runner_up_ratio=1.031),
             Edge("a", "c", 0.40, 1.0, runner_up="b", runner_up_ratio=1.6),
             Edge("c", "d", 0.01, 1.0, runner_up="a", runner_up_ratio=1.004)]
    text = to_text(Forest(["a", "b", "c", "d"], edges, trees=[["a", "b", "c", "d"]]))
    assert "b  (0.03; or from c, 3% farther)" in text
    assert "c  (0.40)" in text
    assert "d  (0.01; or from a, 0.4% farther)" in text
    assert runner_up_note(Edge("a", "b", 0.0, 1.0, runner_up="c", runner_up_ratio=1.1)) != ""
    assert runner_up_note(Edge("a", "b", 0.0, 1.0, runner_up="c", runner_up_ratio=1.1001)) == ""
    assert runner_up_note(Edge("a", "b", 0.0, 1.0)) == ""


def test_renaming_to_named_copies_renames_the_runner_up():
    f = Forest(["a", "b", "c"], [Edge("a", "b", 0.5, 1.0, runner_up="c", runner_up_ratio=1.2),
                                 Edge("a", "c", 1.0, 0.0, "duplicate")],
               {"duplicates": {"c": "a"}}, [["a", "b", "c"]])
    out = prefer_named_copies(f, {"c": None, "b": "c"})  # the truth names the copy c, not a
    assert [(e.parent, e.child, e.runner_up) for e in out.edges][0] == ("c", "b", "a")


def test_scoring_counts_misplaced_edges_whose_runner_up_is_the_true_parent():
    from modelatlas.lineage.scoring import score_forest

    truth = {"r": None, "a": "r", "b": "r", "c": "r", "d": "c"}
    edges = [Edge("r", "a", 0.5, 1.0, runner_up="b", runner_up_ratio=1.5),
             Edge("a", "b", 0.01, 1.0, runner_up="r", runner_up_ratio=1.01),  # sibling; its runner-up is right
             Edge("r", "d", 0.01, 1.0, runner_up="a", runner_up_ratio=1.05),  # grandparent; runner-up wrong
             Edge("d", "c", 0.2, 1.0, runner_up="r", runner_up_ratio=1.2)]  # reversed: not misplaced
    forest = Forest(["r", "a", "b", "c", "d"], edges, trees=[["r", "a", "b", "c", "d"]])
    s = score_forest(forest, truth)
    assert s.errors == {"grandparent": 1, "reversed": 1, "sibling": 1}
    assert (s.n_misplaced, s.n_runner_up_right) == (2, 1)
    assert s.as_dict()["misplaced_runner_up_true"] == 1
