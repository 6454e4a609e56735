"""The viewer: its filter box (words of names, paths and notes, whole class names, never probabilities, not the
folder every model shares), names escaped, a long chain balanced, the forest drawn inline."""

import json
import re
import shutil
import subprocess

import pytest

from modelatlas.atlas import Atlas, ModelEntry
from modelatlas.atlas.html import render_html
from modelatlas.lineage.forest import Edge, Forest


def make_class_atlas():
    models = [ModelEntry("t0-c0001", "/z/t0-c0001.safetensors", predicted=[["7", 0.91], ["Größe", 0.6]]),
              ModelEntry("t0-c0017", "/z/t0-c0017.safetensors", predicted=[["3", 0.97]]),
              ModelEntry("stray", "/z/stray.safetensors", notes=["classes experts: in no known tree (nearest 't0' "
                                                                  "at 1.5, radius 0.9)"])]
    return Atlas(models, Forest([m.name for m in models], [Edge("t0-c0001", "t0-c0017", 0.5)]))


def check_rows(page):
    """(data-s, data-c) of every table row."""
    return re.findall(r'<tr data-s="([^"]*)" data-c="([^"]*)">', page)


def test_filter_attributes_hold_words_not_probabilities():
    rows = check_rows(render_html(make_class_atlas()))
    assert rows == [("t0 c0001 safetensors", "7 größe"), ("t0 c0017 safetensors", "3"),
                    ("stray safetensors classes experts in no known tree nearest t0 at radius", "")]


def check_filter(page, query):
    """The names of the table rows the page's own filter keeps for ``query`` (its JavaScript, run in node)."""
    js = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    rows = [(name, s, c) for name, (s, c) in zip(re.findall(r"<tr data-s=[^>]*><td><b>([^<]*)</b>", page),
                                                  check_rows(page))]
    program = js + f"""
var rows={json.dumps(rows)};
var el=function(r){{return {{getAttribute:function(k){{return k==='data-s'?r[1]:r[2];}}}};}};
var ws=words({json.dumps(query)});
console.log(JSON.stringify(rows.filter(function(r){{return !ws.length||has(el(r),ws);}}).map(function(r){{return r[0];}})));
"""
    out = subprocess.run(["node", "-e", program], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
@pytest.mark.parametrize("query, kept", [
    ("1", []),  # not the 1 of t0-c0001, not the 0.91 of class 7
    ("9", []),
    ("7", ["t0-c0001"]),  # a whole class name
    ("3", ["t0-c0017"]),
    ("t0-c00", ["t0-c0001", "t0-c0017"]),  # words that start the name's words
    ("C0017", ["t0-c0017"]),
    ("grö", []), ("GRÖSSE", []), ("größe", ["t0-c0001"]),  # class names whole, lower-cased as the page does
    ("known tree", ["stray"]), ("1.5", []),  # notes' words, not their numbers
    ("", ["t0-c0001", "t0-c0017", "stray"]),
])
def test_the_filter_matches_names_and_whole_classes(query, kept):
    assert check_filter(render_html(make_class_atlas()), query) == kept


def test_header_counts_in_the_right_number():
    page = render_html(Atlas([ModelEntry("a", "/z/a")], Forest(["a"], [])))
    assert "1 model, 1 tree; stage:" in page and "tree 1 (1 model)" in page
    assert "3 models, 2 trees; stage:" in render_html(make_class_atlas())


def test_tree_numbers_agree_between_the_entries_and_the_page(tmp_path):
    """A tree whose root's name sorts after another tree's models: the page's "tree k" heading over a model and
    the model's own tree (table, search, `atlas index show`) are one number."""
    from safetensors.torch import save_file

    from modelatlas.atlas import build_atlas
    from modelatlas.lineage import LineageConfig
    from modelatlas.lineage.synthetic import make_synthetic_forest

    weights, _ = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    renamed = {"t0": "z-root", "t0_0": "a-kid", "t0_1": "b-kid", "t1": "m-root", "t1_0": "m-kid", "t1_1": "n-kid"}
    for name, tensors in weights.items():
        save_file(tensors, str(tmp_path / f"{renamed[name]}.safetensors"))
    atlas = build_atlas([tmp_path], lineage=LineageConfig(stage="specialize"))
    tree_of = {m.name: m.tree for m in atlas.models}
    assert tree_of["z-root"] != tree_of["m-root"]
    page = render_html(atlas)
    for root in ("z-root", "m-root"):
        heading = re.search(rf'<h3>tree (\d+) [^<]*</h3><ul class="tree">\n<li [^>]*><b>{root}</b>', page)
        assert int(heading.group(1)) == tree_of[root]


def test_a_model_with_no_class_above_one_half_says_so():
    """Its predictions cell was empty, as for a model no expert saw; its note said nothing either (none then)."""
    note = "classes experts: no class above 0.5; most probable 3 (0.42)"
    atlas = Atlas([ModelEntry("a", "/z/a", expert_tree="t0", predicted=[], notes=[note]), ModelEntry("b", "/z/b")],
                  Forest(["a", "b"], []))
    page = render_html(atlas)
    assert '<b>a</b><br><span class="pred">no class above 0.5</span>' in page  # in the tree
    assert "<td>no class above 0.5</td>" in page and f"<td>{note}" not in page  # (the note: in its own cell)
    assert f'<span class="note">{note}</span>' in page and "<b>b</b><br>" not in page


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
@pytest.mark.parametrize("query", ["mod\u00e8le", "mode\u0300le"])
def test_the_filter_finds_a_name_in_either_unicode_form(query):
    """A macOS (NFD) model name and an NFC query, or the reverse: one word, as atlas search reads them."""
    models = [ModelEntry(n, f"/z/{n}.pt") for n in ("mode\u0300le-fr", "mod\u00e8le-de", "mode-x")]
    page = render_html(Atlas(models, Forest([m.name for m in models], [])))
    assert check_filter(page, query) == ["mode\u0300le-fr", "mod\u00e8le-de"]


def test_viewer_escapes_names():
    entry = ModelEntry("<script>x</script>", "/p/<script>", predicted=[["a&b", 0.9]])
    page = render_html(Atlas([entry], Forest([entry.name], [])))
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "a&amp;b 0.90" in page


def test_viewer_of_a_long_chain_is_balanced():
    names = [f"m{i}" for i in range(1200)]
    forest = Forest(names, [Edge(names[i], names[i + 1], 0.5) for i in range(1199)], trees=[names])
    page = render_html(Atlas([ModelEntry(n, n) for n in names], forest))
    assert page.count("<li ") == 1200 and page.count("</li>") == 1200 and page.count("<ul") == page.count("</ul>")
    assert "[depth 1199]</span> <b>m1199</b>" in page


def check_filter_texts(page):
    """The text the viewer's filter box matches, one per tree item and table row."""
    import re

    return re.findall(r'data-s="([^"]*)"', page)


def test_viewer_filter_ignores_the_folder_every_model_shares():
    # Typing "mnist" must not keep every row because the models lie under /data/mnist-runs/ (a folder the
    # page never shows); the part of each path below it still counts, as in keyword search.
    models = [ModelEntry(n, f"/data/mnist-runs/{sub}/{n}.safetensors") for n, sub in [("a", "cnn"), ("b", "mlp")]]
    texts = check_filter_texts(render_html(Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)]))))
    assert len(texts) == 4 and not any("mnist" in t or "data" in t for t in texts)
    assert sum("cnn" in t for t in texts) == 2


def test_viewer_draws_the_forest_inline_when_it_has_edges():
    import base64
    import re

    page = render_html(Atlas([ModelEntry("a", "a"), ModelEntry("b", "b")], Forest(["a", "b"], [Edge("a", "b", 0.5)])))
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG")  # one self-contained file
    assert "data:image/png" not in render_html(Atlas([ModelEntry("a", "a")], Forest(["a"], [])))


def test_a_close_runner_up_parent_is_shown_beside_the_score():
    models = [ModelEntry(n, f"/z/{n}", parent=p, score=s) for n, p, s in
              (("base", None, None), ("a", "base", 0.5), ("b", "a", 0.02), ("c", "base", 0.4))]
    edges = [Edge("base", "a", 0.5, 1.0, runner_up="c", runner_up_ratio=1.8),
             Edge("a", "b", 0.02, 1.0, runner_up="base<x>", runner_up_ratio=1.02),
             Edge("base", "c", 0.4, 1.0)]
    page = render_html(Atlas(models, Forest([m.name for m in models], edges, trees=[[m.name for m in models]])))
    assert "<b>b</b> <span class=\"score\">(0.02; or from base&lt;x&gt;, 2% farther)</span>" in page
    assert "<b>a</b> <span class=\"score\">(0.50)</span>" in page


def test_a_merge_and_a_copy_read_in_the_tree_as_in_the_terminal():
    models = [ModelEntry(n, f"/z/{n}", parent=p, score=s) for n, p, s in
              (("base", None, None), ("a", "base", 0.5), ("b", "base", 0.4), ("soup", "a", 1.0), ("a-copy", "a", 1.0))]
    edges = [Edge("base", "a", 0.5, 1.0), Edge("base", "b", 0.4, 1.0), Edge("a", "soup", 1.0, 0.1, "merge"),
             Edge("a", "a-copy", 1.0, 0.0, "duplicate")]
    forest = Forest([m.name for m in models], edges, {"model_merges": {"soup": {"parents": ["a", "b"],
                    "weights": [0.6, 0.4], "residual": 0.0}}}, [[m.name for m in models]])
    page = render_html(Atlas(models, forest))
    assert '<b>soup</b> <span class="score">(merge: 0.60 a + 0.40 b)</span>' in page
    assert '<b>a-copy</b> <span class="score">(identical weights to a)</span>' in page
