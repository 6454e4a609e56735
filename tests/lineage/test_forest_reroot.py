"""Re-rooting a recovered tree at a node whose place above others is known from elsewhere."""

from modelatlas.lineage.forest import Edge, Forest, rerooted


def make_edges():
    """a -> b -> c, b -> d, and a separate tree x -> y."""
    return [Edge("a", "b", 0.5, 1.0), Edge("b", "c", 0.6, 2.0), Edge("b", "d", 0.7, 3.0), Edge("x", "y", 0.8, 4.0)]


def test_rerooting_turns_the_path_from_the_old_root_round():
    got = {(e.parent, e.child, e.score, e.distance) for e in rerooted(make_edges(), "c")}
    assert got == {("b", "a", 0.5, 1.0), ("c", "b", 0.6, 2.0), ("b", "d", 0.7, 3.0), ("x", "y", 0.8, 4.0)}
    forest = Forest(["a", "b", "c", "d", "x", "y"], rerooted(make_edges(), "c"))
    assert sorted(forest.roots()) == ["c", "x"]


def test_rerooting_at_a_root_changes_nothing():
    assert rerooted(make_edges(), "a") == make_edges()
