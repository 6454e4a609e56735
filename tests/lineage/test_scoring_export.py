import pytest

from modelatlas.errors import AtlasError
from modelatlas.lineage.export import to_dot, to_mermaid, to_text
from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.scoring import (
    edge_accuracy,
    edge_errors,
    edge_marks,
    error_notes,
    given_parents,
    score_forest,
    tree_labels,
)
from modelatlas.zoo.manifest import Manifest, ModelRecord

TRUTH = {"a": None, "b": "a", "c": "a", "d": "b", "x": None, "y": "x"}


def make_forest():
    # b->a reversed, a->c right, b->d right, x->y right; all in the right trees.
    edges = [Edge("b", "a", 0.5), Edge("a", "c", 0.9), Edge("b", "d", 0.25), Edge("x", "y", 1.0)]
    return Forest(list(TRUTH), edges, {"stage": "specialize"}, [["a", "b", "c", "d"], ["x", "y"]])


def test_scores_by_hand():
    s = score_forest(make_forest(), TRUTH)
    assert s.n_true_edges == 4 and s.n_correct == 3
    assert s.directed == pytest.approx(3 / 4)
    assert s.undirected == pytest.approx(1.0)
    assert s.ari == pytest.approx(1.0)


def test_scores_with_manifest_and_wrong_tree():
    m = Manifest([ModelRecord(n, n, p, "t") for n, p in TRUTH.items()])
    f = Forest(list(TRUTH), [Edge("a", "b", 1), Edge("a", "c", 1), Edge("b", "d", 1), Edge("d", "y", 1)], {})
    s = score_forest(f, m)
    assert s.directed == pytest.approx(3 / 4)
    # predicted trees {a,b,c,d,y}, {x}; true {a,b,c,d}, {x,y}: ARI by hand (sklearn) is below 1
    assert s.ari < 1.0


def test_edge_accuracy_edge_cases():
    assert edge_accuracy(set(), set()) == 1.0
    assert edge_accuracy({("a", "b")}, set()) == 0.0
    assert edge_accuracy({("b", "a")}, {("a", "b")}, directed=False) == 1.0


def test_tree_labels_follow_parents():
    assert tree_labels(TRUTH) == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}


def check_tree_labels_brute(parents):
    out = {}
    for node in parents:
        seen, v = set(), node
        while parents.get(v) is not None and v not in seen:
            seen.add(v)
            v = parents[v]
        out[node] = v
    return out


@pytest.mark.parametrize("seed", range(10))
def test_tree_labels_match_walking_each_node_up(seed):
    """Memoised labels equal a walk from every node, also with a cycle and a parent that is no node."""
    import random

    rng = random.Random(seed)
    names = [f"m{i}" for i in range(rng.randint(1, 25))]
    parents = {n: (rng.choice(names[:i]) if i and rng.random() < 0.8 else None) for i, n in enumerate(names)}
    if seed % 3 == 0 and len(names) > 3:
        parents[names[1]] = names[3]  # m1 -> m3 -> ... may now loop back to m1
    if seed % 4 == 0:
        parents[names[-1]] = "elsewhere"
    assert tree_labels(parents) == check_tree_labels_brute(parents)


def test_marks_and_text_drawing():
    f = make_forest()
    marks = edge_marks(f, TRUTH)
    assert marks[("b", "a")] == "reversed" and marks[("a", "c")] == "right"
    text = to_text(f, marks)
    assert text.splitlines()[0].startswith("b")
    assert "├── a  (0.50)  ✗ (reversed)" in text
    assert "│   └── c  (0.90)  ✓" in text
    assert "└── d  (0.25)  ✓" in text


def test_tree_header_of_a_lone_model_is_singular():
    f = Forest(["solo"], [], {"stage": "specialize"}, [["solo"]])
    assert to_text(f).splitlines() == ["solo  [tree 1, 1 model]"]


def test_tree_header_gives_root_confidence_and_names_the_runner_up_when_in_doubt():
    f = make_forest()
    assert to_text(f).splitlines()[0] == "b  [tree 1, 4 models]"  # no root confidences (joint placement)
    f.decisions.update(root_confidence=[0.6, 0.9], root_runner_up=["a", "y"])
    lines = to_text(f).splitlines()
    assert lines[0] == "b  [tree 1, 4 models; root confidence 0.60, next best root a]"
    assert "x  [tree 2, 2 models; root confidence 0.90]" in lines
    f.decisions.pop("root_runner_up")  # a forest JSON written before runner-ups were recorded
    assert to_text(f).splitlines()[0] == "b  [tree 1, 4 models; root confidence 0.60]"


def test_dot_and_mermaid():
    f = make_forest()
    dot = to_dot(f, edge_marks(f, TRUTH))
    assert dot.startswith("digraph lineage {") and '"b" -> "a" [label="0.50", color=orange];' in dot
    mer = to_mermaid(f)
    assert mer.startswith("graph TD") and 'n1["b"]' in mer and 'n1 -->|"0.50"| n0' in mer


def test_forest_json_roundtrip(tmp_path):
    f = make_forest()
    f.save(tmp_path / "f.json")
    g = Forest.load(tmp_path / "f.json")
    assert g.nodes == f.nodes and [(e.parent, e.child) for e in g.edges] == [(e.parent, e.child) for e in f.edges]
    assert g.roots() == ["b", "x"]


def test_forest_json_with_an_edge_to_no_node_names_file_and_edge(tmp_path):
    path = tmp_path / "f.json"
    path.write_text('{"nodes": ["a", "b"], "edges": [{"parent": "a", "child": "b"}, {"parent": "a", "child": "zz"}]}')
    with pytest.raises(AtlasError, match=r"f\.json: not a lineage forest: edges\[1\] names 'zz', which is not in"):
        Forest.load(path)


@pytest.mark.parametrize("content, message", [
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\xff", "cannot read forest JSON"),  # a model file: UnicodeDecodeError
    (b"9" * 5000, "cannot read forest JSON"),  # ValueError: an integer of 5,000 digits
    (b"[" * 100_000 + b"]" * 100_000, "cannot read forest JSON"),  # RecursionError
    (b'["nodes", "edges"]', "not a lineage forest"),
])
def test_forest_json_that_is_no_forest_is_one_error(tmp_path, content, message):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(AtlasError, match=rf"f\.json: {message}") as info:
        Forest.load(path)
    assert "\n" not in str(info.value)


# a -> b -> {d -> g, e}, a -> c -> f; x -> y (two trees) for the error kinds
DEEP = {"a": None, "b": "a", "c": "a", "d": "b", "e": "b", "f": "c", "g": "d", "x": None, "y": "x"}


def check_kind(parent: str, child: str, expected: str) -> None:
    f = Forest(list(DEEP), [Edge(parent, child, 0.5)], {})
    assert edge_errors(f, DEEP) == {(parent, child): expected}


@pytest.mark.parametrize("parent,child,expected", [
    ("d", "e", "sibling"),  # e's true parent b; d is b's child
    ("c", "d", "uncle"),  # c is a sibling of d's parent b
    ("a", "d", "grandparent"),
    ("b", "a", "reversed"),
    ("g", "b", "descendant"),  # g sits two levels below b
    ("f", "d", "other"),  # a cousin
    ("y", "a", "other tree"),
    ("b", "x", "other tree"),
])
def test_edge_error_kinds_by_hand(parent, child, expected):
    check_kind(parent, child, expected)


def test_true_root_given_a_parent_in_its_own_tree():
    truth = {"a": None, "b": "a", "c": "b"}
    f = Forest(list(truth), [Edge("c", "a", 0.5)], {})
    assert edge_errors(f, truth) == {("c", "a"): "true root"}


def test_score_counts_kinds_and_notes_in_drawing():
    f = Forest(list(DEEP), [Edge("a", "b", 1), Edge("a", "c", 1), Edge("b", "d", 1), Edge("d", "e", 1),
                            Edge("b", "f", 1), Edge("y", "x", 1)], {})
    s = score_forest(f, DEEP)
    assert s.errors == {"reversed": 1, "sibling": 1, "uncle": 1}
    assert s.as_dict()["wrong_edges"] == s.errors
    notes = error_notes(f, DEEP)
    assert notes == {("d", "e"): "sibling; true parent b", ("b", "f"): "uncle; true parent c"}
    text = to_text(f, edge_marks(f, DEEP), notes)
    assert "e  (1.00)  ✗ (sibling; true parent b)" in text
    assert "x  (1.00)  ✗ (reversed)" in text
    assert 'n1 -->|"1.00 ✗ (uncle; true parent c)"| n5' in to_mermaid(f, edge_marks(f, DEEP), notes)


def test_mermaid_labels_are_quoted_so_marks_in_parentheses_parse():
    """An unquoted ``-->|0.50 ✗ (reversed)|`` is a Mermaid syntax error: every label is quoted, and a ``"``
    in a model name or note is written as ``#quot;``."""
    f = Forest(['a"1', "b"], [Edge('a"1', "b", 0.5)], {})
    mer = to_mermaid(f, {('a"1', "b"): "wrong"}, {('a"1', "b"): 'other; true parent "z"'})
    assert 'n0["a#quot;1"]' in mer
    assert 'n0 -->|"0.50 ✗ (other; true parent #quot;z#quot;)"| n1' in mer
    for line in mer.splitlines()[3:4]:  # the edge line: no raw quote inside the label
        assert line.count('"') == 2


def make_chain(n):
    names = [f"m{i}" for i in range(n)]
    return Forest(names, [Edge(names[i], names[i + 1], 0.5) for i in range(n - 1)], trees=[names])


def test_text_of_a_long_chain_stays_narrow():
    """1,200 checkpoints of one run form a chain: drawn without recursion, indentation capped."""
    from modelatlas.lineage.export import MAX_INDENT

    lines = to_text(make_chain(1200)).splitlines()
    assert len(lines) == 1200 and lines[-1].endswith("└── [depth 1199] m1199  (0.50)")
    assert max(map(len, lines)) == len(lines[-1]) < 4 * MAX_INDENT + 40
    assert lines[MAX_INDENT].strip() == f"└── m{MAX_INDENT}  (0.50)"
    assert lines[MAX_INDENT + 1].strip() == f"└── [depth {MAX_INDENT + 1}] m{MAX_INDENT + 1}  (0.50)"


def test_only_true_edges_between_given_models_are_scored():
    """Five of a zoo's models are scored against the edges among them, not against the whole manifest."""
    f = Forest(["a", "b", "d"], [Edge("a", "b", 1), Edge("b", "d", 1)], {})
    s = score_forest(f, TRUTH)
    assert (s.n_correct, s.n_true_edges, s.n_left_out) == (2, 2, 2)  # a->c and x->y: c, x, y not given
    assert s.directed == 1.0 and s.as_dict()["true_edges_left_out"] == 2


def test_a_skipped_model_still_counts_as_a_miss():
    f = Forest(["a", "b"], [Edge("a", "b", 1)], {}, skipped={"d": "d.safetensors: truncated"})
    s = score_forest(f, TRUTH)
    assert (s.n_correct, s.n_true_edges, s.n_left_out) == (1, 2, 2)


def test_a_model_not_given_is_bridged_to_the_nearest_given_ancestor():
    """a -> b -> d with b not given: among the given models, d's parent is a, so a -> d is right."""
    f = Forest(["a", "c", "d"], [Edge("a", "c", 1), Edge("a", "d", 1)], {})
    s = score_forest(f, TRUTH)
    assert (s.n_correct, s.n_true_edges, s.n_left_out, s.n_bridged) == (2, 2, 3, 1)  # a->b, b->d, x->y left out
    assert edge_marks(f, TRUTH) == {("a", "c"): "right", ("a", "d"): "right"}
    assert s.as_dict()["edges_past_models_not_given"] == 1


def test_true_parent_not_given_is_said_in_the_note():
    f = Forest(["a", "c", "d"], [Edge("a", "c", 1), Edge("c", "d", 1)], {})
    assert error_notes(f, TRUTH) == {("c", "d"): "sibling; true parent b (not given; nearest given a)"}
    assert given_parents(TRUTH, ["c", "d", "y"]) == {"c": None, "d": None, "y": None}


def test_a_truth_naming_none_of_the_models_is_an_error_naming_the_file(tmp_path):
    from modelatlas.errors import ManifestError
    from modelatlas.zoo.manifest import load_manifest

    Manifest([ModelRecord(n, n, p, "t") for n, p in TRUTH.items()]).save(tmp_path / "other.json")
    truth = load_manifest(tmp_path / "other.json")
    f = Forest(["p", "q"], [Edge("p", "q", 1)], {})
    for fn in (score_forest, edge_marks, error_notes):
        with pytest.raises(ManifestError, match=r"none of the 2 models \(p, q\) are named in .*other\.json"):
            fn(f, truth)


def test_models_not_in_the_truth_are_marked_unknown_not_wrong():
    f = Forest(["a", "b", "extra"], [Edge("a", "b", 1), Edge("b", "extra", 0.4)], {}, [["a", "b", "extra"]])
    marks = edge_marks(f, TRUTH)
    assert marks == {("a", "b"): "right", ("b", "extra"): "unknown"}
    assert edge_errors(f, TRUTH) == {} and score_forest(f, TRUTH).errors == {}
    assert "extra  (0.40)  ? (not in truth)" in to_text(f, marks, error_notes(f, TRUTH))
    assert "color=gray" in to_dot(f, marks)


def test_an_identical_copy_given_first_does_not_cost_the_true_edges():
    """``acopy`` (not in the truth) equals ``b`` and was given first, so it represents the pair: scoring reads
    it as ``b``, and ``prefer_named_copies`` redraws the pair with ``b`` holding its own subtree."""
    from modelatlas.lineage.scoring import prefer_named_copies

    truth = {"t": None, "b": "t", "k": "b"}
    f = Forest(["t", "acopy", "b", "k"], [Edge("t", "acopy", 0.6), Edge("acopy", "b", 1, 0, "duplicate"),
                                          Edge("acopy", "k", 0.7)],
               {"duplicates": {"b": "acopy"}, "root_runner_up": ["acopy"]}, [["t", "acopy", "b", "k"]],
               {"t": 1.0, "acopy": 2.0, "b": 2.0, "k": 3.0})
    s = score_forest(f, truth)
    assert (s.n_correct, s.n_true_edges, s.errors) == (2, 2, {})
    assert edge_marks(f, truth) == {("t", "acopy"): "right", ("acopy", "k"): "right"}
    g = prefer_named_copies(f, truth)
    assert [(e.parent, e.child, e.kind) for e in g.edges] == [("t", "b", "trained"), ("b", "acopy", "duplicate"),
                                                              ("b", "k", "trained")]
    assert g.nodes == ["t", "b", "acopy", "k"] and g.decisions["duplicates"] == {"acopy": "b"}
    assert g.decisions["root_runner_up"] == ["b"] and g.trees == [["t", "b", "acopy", "k"]]
    assert edge_marks(g, truth) == {("t", "b"): "right", ("b", "k"): "right"}
    assert "acopy  (identical weights to b)" in to_text(g, edge_marks(g, truth))
    assert prefer_named_copies(g, truth) is g  # nothing left to swap


def test_a_truth_naming_only_the_low_precision_copy_scores_through_it():
    from modelatlas.lineage.scoring import prefer_named_copies

    truth = {"t": None, "lo": "t", "k": "lo"}
    f = Forest(["t", "hi", "lo", "k"], [Edge("t", "hi", 0.6), Edge("hi", "lo", 1, 0, "precision"),
                                        Edge("hi", "k", 0.7)])
    assert score_forest(f, truth).n_correct == 2
    assert error_notes(f, truth) == {}
    assert prefer_named_copies(f, truth) is f  # the higher-precision model stays the parent


def test_mermaid_labels_escape_html_marks_and_hash():
    """``<``, ``>`` and ``&`` in a name would be read as HTML by Mermaid's renderer, and a name that holds
    ``#quot;`` must stay that text: ``#`` is escaped first (``#35;``), then the other marks."""
    f = Forest(["<b>&#quot;", "c"], [Edge("<b>&#quot;", "c", 0.5)], {})
    mer = to_mermaid(f)
    assert 'n0["#lt;b#gt;#amp;#35;quot;"]' in mer
    assert "<" not in mer and ">" not in mer.replace("-->", "") and "&" not in mer


def test_an_edge_to_a_model_the_truth_does_not_name_scores_neither_way():
    """Roots a and x given, each with a model the truth does not name hung below: no true edge to score,
    and the unnamed models' edges (marked '? (not in truth)') are not wrong: it read 0.0% (0/0)."""
    f = Forest(["a", "x", "new1", "new2"], [Edge("a", "new1", 1), Edge("new1", "new2", 1)], {})
    s = score_forest(f, TRUTH)
    assert (s.n_true_edges, s.directed, s.undirected) == (0, 1.0, 1.0)
    wrong = Forest(["a", "x", "new1"], [Edge("a", "x", 1), Edge("a", "new1", 1)], {})
    assert score_forest(wrong, TRUTH).directed == 0.0  # two true roots joined: still wrong


def test_trees_are_numbered_in_the_order_the_forest_lists_them():
    # "a-ft" (fine-tuned from "z-base") comes first among the nodes, so the first listed tree's root comes after
    # the second tree's root: tree k must still be trees[k - 1], the numbering an atlas gives its models
    f = Forest(["a-ft", "m-base", "m-ft", "z-base"], [Edge("z-base", "a-ft", 0.5), Edge("m-base", "m-ft", 0.5)],
               {"root_confidence": [0.9, 0.8]}, [["a-ft", "z-base"], ["m-base", "m-ft"]])
    assert f.roots() == ["z-base", "m-base"]
    lines = to_text(f).splitlines()
    assert lines[0] == "z-base  [tree 1, 2 models; root confidence 0.90]"
    assert lines[2] == "m-base  [tree 2, 2 models; root confidence 0.80]"
    assert Forest(["b", "a"], []).roots() == ["b", "a"]  # no trees listed (an older JSON): node order


def test_text_drawing_keeps_a_name_with_a_newline_on_its_line():
    """A model file named 'a\\nb' split its line of the drawing in two (the second half looked like a root)."""
    forest = Forest(["r", "a\nb"], [Edge("r", "a\nb", 0.5)], trees=[["r", "a\nb"]])
    assert to_text(forest) == "r  [tree 1, 2 models]\n└── a\\nb  (0.50)\n"
