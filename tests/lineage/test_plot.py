import io

import pytest

from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.plot import MAX_ARROWS, MAX_LABELS, render_forest, tree_layout


def make_forest():
    """a -> b, a -> c -> d, and a second tree e; hand-checked layout below."""
    edges = [Edge("a", "c", 0.9), Edge("a", "b", 0.4), Edge("c", "d", 0.7)]
    return Forest(["a", "b", "c", "d", "e"], edges, trees=[["a", "b", "c", "d"], ["e"]])


def test_layout_places_leaves_in_order_and_parents_over_their_children():
    pos = tree_layout(make_forest())
    # leaves in depth-first order with children sorted by name: b at 0, d at 1; c over d, a over b..c;
    # one empty column between the trees, so e at 3
    assert pos == {"b": (0, 1), "d": (1, 2), "c": (1.0, 1), "a": (0.5, 0), "e": (3, 0)}


def test_layout_of_a_long_chain_and_of_a_cycle_terminates_without_recursion():
    n = 5000  # deeper than Python's recursion limit
    names = [f"m{i}" for i in range(n)]
    pos = tree_layout(Forest(names, [Edge(names[i], names[i + 1], 0.5) for i in range(n - 1)]))
    assert pos["m4999"] == (0, 4999) and pos["m0"] == (0, 0)
    cyc = tree_layout(Forest(["r", "x", "y"], [Edge("x", "y", 0.5), Edge("y", "x", 0.5)]))  # hand-edited JSON
    assert set(cyc) == {"r", "x", "y"} and cyc["y"][1] == cyc["x"][1] + 1


def check_png(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("marks", [None, {("a", "c"): "right", ("a", "b"): "wrong", ("c", "d"): "reversed"}])
def test_render_draws_a_png(marks):
    w, h = check_png(render_forest(make_forest(), marks))
    assert w > 200 and h > 150


def test_render_survives_a_nan_score():
    """A hand-edited forest JSON may hold NaN (Python's json reads it): shaded light, not a colour error."""
    check_png(render_forest(Forest(["a", "b"], [Edge("a", "b", float("nan"))])))


@pytest.mark.parametrize("n", [MAX_LABELS + 50, MAX_ARROWS + 50])  # names dropped; then segments, not arrows
def test_render_of_a_large_forest_stays_within_bounds(n):
    names = ["root"] + [f"c{i}" for i in range(n)]
    w, h = check_png(render_forest(Forest(names, [Edge("root", c, 0.5, kind="duplicate" if i % 7 == 0 else "trained")
                                                 for i, c in enumerate(names[1:])])))
    assert w <= 40 * 150 + 150 and h <= 30 * 150 + 150  # the figure size is capped


def test_render_draws_names_with_dollar_signs_as_plain_text():
    """'run$\\frac$' is a file name, not mathtext: matplotlib failed on it when drawing (`atlas index build`
    lost its whole run at the viewer's picture)."""
    check_png(render_forest(Forest(["run$\\frac$", "b$x_{$", "c$"], [Edge("run$\\frac$", "b$x_{$", 0.5),
                                                                     Edge("run$\\frac$", "c$", 0.5)])))


def test_a_merge_arrow_is_dotted_and_a_copy_dashed():
    from modelatlas.lineage.forest import Edge
    from modelatlas.lineage.plot import _edge_style

    assert _edge_style(Edge("a", "m", 1.0, 0.1, "merge"), None)[1] == ":"
    assert _edge_style(Edge("a", "c", 1.0, 0.0, "duplicate"), None)[1] == "--"
    assert _edge_style(Edge("a", "b", 0.5, 0.1), None)[1] == "-"
