"""Atlas.save / Atlas.load: a round trip, errors naming the file, key and value, a forest that is not one,
older atlases, a save that fails leaving the old atlas."""

import json

import pytest
import torch
from tests.atlas.conftest import SPECIALIZE, make_forest_folder

from modelatlas.atlas import Atlas, ModelEntry, build_atlas
from modelatlas.errors import AtlasError
from modelatlas.lineage.forest import Edge, Forest


def test_save_load_roundtrip_and_viewer(tmp_path):
    make_forest_folder(tmp_path / "m")
    atlas = build_atlas([tmp_path / "m"], lineage=SPECIALIZE)
    atlas.save(tmp_path / "atl")
    again = Atlas.load(tmp_path / "atl")
    assert again.to_dict() == atlas.to_dict()
    assert Atlas.load(tmp_path / "atl" / "atlas.json").models == atlas.models
    page = (tmp_path / "atl" / "atlas.html").read_text()
    assert page.startswith("<!doctype html>") and "tree 1 (3 models; root confidence 0." in page
    assert page.count("<tr data-s=") == 6


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(AtlasError, match="no atlas here"):
        Atlas.load(tmp_path)
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(AtlasError, match="afile: a file, not an atlas folder or its atlas.json"):
        Atlas.load(tmp_path / "afile")
    (tmp_path / "atlas.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(AtlasError, match="unknown atlas format 'other'"):
        Atlas.load(tmp_path)
    (tmp_path / "forest.json").write_text(json.dumps({"nodes": ["a"], "edges": []}))  # said "format None"
    with pytest.raises(AtlasError, match=r"forest\.json: not an atlas \(no 'format' key; an atlas\.json has "
                                         r"'modelatlas-atlas/1'\): build one with `atlas index build"):
        Atlas.load(tmp_path / "forest.json")
    (tmp_path / "atlas.json").write_text("{trunc")
    with pytest.raises(AtlasError, match="atlas.json: cannot read the atlas"):
        Atlas.load(tmp_path)
    good = Atlas([ModelEntry("a", "a")], Forest(["a"], []), embeddings={"t": (["a"], torch.ones(1, 3))})
    good.save(tmp_path / "e")
    (tmp_path / "e" / "embeddings.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(AtlasError, match="embeddings.safetensors"):
        Atlas.load(tmp_path / "e")


def test_load_of_the_viewer_page_points_to_the_folder(tmp_path):
    """`atlas index show my-atlas/atlas.html` (the file just opened in a browser) was parsed as JSON:
    'cannot read the atlas (Expecting value: line 1 column 1)'."""
    Atlas([ModelEntry("a", "a"), ModelEntry("b", "b")], Forest(["a", "b"], [])).save(tmp_path / "at")
    with pytest.raises(AtlasError, match=r"atlas\.html: a file, not an atlas folder or its atlas\.json; pass "
                                         r".*at\b"):
        Atlas.load(tmp_path / "at" / "atlas.html")
    assert [m.name for m in Atlas.load(tmp_path / "at" / "atlas.json").models] == ["a", "b"]


def make_saved_atlas(folder):
    """A small saved atlas (two models, one edge); returns its atlas.json as a dict."""
    models = [ModelEntry("a", "/m/a", parameters=10, predicted=[["Shirt", 0.9]]), ModelEntry("b", "/m/b", tree=1)]
    Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)], trees=[["a", "b"]])).save(folder)
    return json.loads((folder / "atlas.json").read_text())


def make_edit(keys, value):
    """A change to an atlas.json dict: set the value at the path ``keys`` (None as value: delete it)."""
    def change(data):
        *inner, last = keys
        for k in inner:
            data = data[k]
        if value is None:
            del data[last]
        else:
            data[last] = value
    return change


@pytest.mark.parametrize("change, where, got", [
    (make_edit(["models"], {"a": 1}), "models", "{'a': 1}"),
    (make_edit(["models"], "ab"), "models", "'ab'"),
    (make_edit(["models", 1], 5), "models[1]", "5"),
    (make_edit(["models", 0, "name"], None), "models[0].name", "missing"),
    (make_edit(["models", 0, "name"], 3), "models[0].name", "3"),
    (make_edit(["models", 0, "parameters"], "big"), "models[0].parameters", "'big'"),
    (make_edit(["models", 1, "tree"], "1"), "models[1].tree", "'1'"),
    (make_edit(["models", 0, "score"], "high"), "models[0].score", "'high'"),
    (make_edit(["models", 0, "predicted"], [["Shirt"]]), "models[0].predicted", "[['Shirt']]"),
    (make_edit(["models", 0, "predicted"], "Shirt"), "models[0].predicted", "'Shirt'"),
    (make_edit(["models", 0, "notes"], "x"), "models[0].notes", "'x'"),
    (make_edit(["forest"], [1]), "forest", "[1]"),
    (make_edit(["forest", "nodes"], "ab"), "forest.nodes", "'ab'"),
    (make_edit(["forest", "edges"], {"a": 1}), "forest.edges", "{'a': 1}"),
    (make_edit(["forest", "edges", 0], "a->b"), "forest.edges[0]", "'a->b'"),
    (make_edit(["forest", "edges", 0, "child"], None), "forest.edges[0].child", "missing"),
    (make_edit(["forest", "edges", 0, "parent"], "zzz"), "forest.edges[0].parent", "'zzz'"),
    (make_edit(["forest", "edges", 0, "score"], "x"), "forest.edges[0].score", "'x'"),
    (make_edit(["forest", "trees"], 5), "forest.trees", "5"),
    (make_edit(["forest", "decisions"], [1]), "forest.decisions", "[1]"),
    # fuzzed (session 40): `show` formatted these with :.2f or indexed them, a ValueError traceback
    (make_edit(["forest", "decisions"], {"root_confidence": ["high"]}), "forest.decisions.root_confidence",
     "['high']"),
    (make_edit(["forest", "decisions"], {"root_runner_up": [3]}), "forest.decisions.root_runner_up[0]", "3"),
    (make_edit(["forest", "decisions"], {"stage_trees": [{"stage": "specialize"}]}),
     "forest.decisions.stage_trees[0].confidence", "missing"),
    (make_edit(["forest", "decisions"], {"model_merges": ["m"]}), "forest.decisions.model_merges", "['m']"),
    (make_edit(["experts"], [1]), "experts", "[1]"),
    (make_edit(["experts"], {"text": "dir"}), "experts.text", "'dir'"),
    (make_edit(["embedded"], [1]), "embedded", "[1]"),
    (make_edit(["embedded"], {"t": "a"}), "embedded.t", "'a'"),
    (make_edit(["embedded"], {"t": ["a", "ghost"]}), "embedded.t[1]", "'ghost' is not one of the models"),
])
def test_load_names_the_file_key_and_value_of_a_wrong_type(tmp_path, change, where, got):
    data = make_saved_atlas(tmp_path)
    change(data)
    (tmp_path / "atlas.json").write_text(json.dumps(data))
    with pytest.raises(AtlasError) as e:
        Atlas.load(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'atlas.json'}: {where} ") and got in message


@pytest.mark.parametrize("edges, words", [
    ([["a", "b"], ["b", "a"]], "the edges form a cycle 'a' <- 'b' <- 'a'"),
    ([["a", "b"], ["c", "b"]], "edges[1] gives 'b' a second parent ('c'; it already has 'a')"),
    ([["c", "c"]], "the edges form a cycle 'c' <- 'c'"),
])
def test_load_refuses_a_forest_that_is_not_one(tmp_path, edges, words):
    # a hand-edited forest with a cycle made `atlas index show` print trees forever
    data = make_saved_atlas(tmp_path)
    data["forest"]["nodes"].append("c")
    data["forest"]["edges"] = [{"parent": p, "child": c, "score": 0.5} for p, c in edges]
    (tmp_path / "atlas.json").write_text(json.dumps(data))
    with pytest.raises(AtlasError) as e:
        Atlas.load(tmp_path)
    assert str(e.value) == f"{tmp_path / 'atlas.json'}: forest: not a lineage forest: {words}"


def test_load_keeps_what_older_atlases_leave_out(tmp_path):
    data = make_saved_atlas(tmp_path)
    for key in ("experts", "embedded"):
        del data[key]
    for key in ("parameters", "notes", "predicted", "score"):
        del data["models"][0][key]
    (tmp_path / "atlas.json").write_text(json.dumps(data))
    atlas = Atlas.load(tmp_path)
    assert atlas.models[0].parameters == 0 and atlas.models[0].notes == [] and atlas.experts == {}
    from dataclasses import fields

    from modelatlas.atlas.index import _ENTRY

    assert set(_ENTRY) == {f.name for f in fields(ModelEntry)}  # a new field is checked on load too


def check_folder(folder):
    """Every file of a folder with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failing_save_leaves_the_old_atlas(tmp_path, monkeypatch):
    old = Atlas([ModelEntry("a", "a"), ModelEntry("b", "b")], Forest(["a", "b"], []),
                embeddings={"t": (["a"], torch.ones(1, 3))})
    old.save(tmp_path)
    before = check_folder(tmp_path)
    new = Atlas([ModelEntry("a", "a"), ModelEntry("b", "b")], Forest(["a", "b"], []),
                embeddings={"t": (["a", "b"], torch.ones(2, 3))})
    new.forest.decisions["x"] = object()
    with pytest.raises(TypeError, match="not JSON serialisable"):  # a bug found only when writing atlas.json
        new.save(tmp_path)
    del new.forest.decisions["x"]
    assert check_folder(tmp_path) == before
    import safetensors.torch

    import modelatlas.atlas.html

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # the embeddings, written after atlas.json's
    with pytest.raises(OSError, match="No space left"):
        new.save(tmp_path)
    assert check_folder(tmp_path) == before

    def interrupted(atlas):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelatlas.atlas.html, "render_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path)
    assert check_folder(tmp_path) == before
    assert Atlas.load(tmp_path).to_dict() == old.to_dict()


def test_a_rebuild_without_embeddings_drops_the_old_ones(tmp_path):
    Atlas([ModelEntry("a", "a")], Forest(["a"], []), embeddings={"t": (["a"], torch.ones(1, 3))}).save(tmp_path)
    Atlas([ModelEntry("a", "a")], Forest(["a"], [])).save(tmp_path)
    assert set(check_folder(tmp_path)) == {"atlas.json", "atlas.html"}
