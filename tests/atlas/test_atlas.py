"""The atlas: build (lineage + metadata + expert predictions + text embeddings), save/load, search, viewer."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from modelatlas.atlas import Atlas, ModelEntry, build_atlas, search_atlas
from modelatlas.atlas.html import render_html
from modelatlas.errors import AtlasError, CheckpointError
from modelatlas.lineage import LineageConfig
from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.synthetic import make_synthetic_forest

SPECIALIZE = LineageConfig(stage="specialize")


def make_forest_folder(folder, broken=False):
    """2 synthetic trees x 2 children (known parents) as safetensors files; optionally one broken file."""
    weights, parents = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    folder.mkdir(exist_ok=True)
    for name, tensors in weights.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    if broken:
        (folder / "broken.safetensors").write_bytes(b"\xff" * 4)
    return weights, parents


def test_build_places_every_model_and_describes_it(tmp_path):
    weights, parents = make_forest_folder(tmp_path / "m", broken=True)
    atlas = build_atlas([tmp_path / "m"], lineage=SPECIALIZE)
    by = {m.name: m for m in atlas.models}
    assert set(by) == set(parents) | {"broken"}
    assert by["broken"].tree is None and by["broken"].notes[0].startswith("unreadable: ")
    for name, parent in parents.items():  # this forest is recovered exactly (tests/lineage)
        assert by[name].parent == parent and by[name].notes == []
    assert by["t0"].tree != by["t1"].tree and by["t0_1"].tree == by["t0"].tree
    n = sum(t.numel() for t in weights["t0"].values())
    assert by["t0"].parameters == n and by["t0"].dtype == "float32"
    assert by["t0"].size_bytes == (tmp_path / "m" / "t0.safetensors").stat().st_size > 4 * n  # values + header
    assert by["t0"].tensors == len(weights["t0"]) and by["t0"].architecture == by["t1_0"].architecture
    assert by["t0"].path == str((tmp_path / "m" / "t0.safetensors").resolve())


def test_build_tells_models_named_alike_apart_by_folder_and_refuses_too_few(tmp_path):
    make_forest_folder(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "t0.safetensors").write_bytes((tmp_path / "a" / "t0.safetensors").read_bytes())
    atlas = build_atlas([tmp_path / "a", tmp_path / "b"], lineage=SPECIALIZE)
    by = {m.name: m for m in atlas.models}
    assert {"a/t0", "b/t0", "t1", "t0_1"} <= set(by) and "t0" not in by
    assert by["b/t0"].parent == "a/t0" and by["b/t0"].notes == ["identical weights to a/t0"]
    assert by["t0_1"].parent == "a/t0"
    with pytest.raises(AtlasError, match="1 readable model"):
        build_atlas([tmp_path / "b"])


def test_build_names_library_file_names_by_their_folder_and_agrees_with_lineage(tmp_path):
    weights, parents = make_forest_folder(tmp_path / "m")
    paths = []
    for name in parents:  # each model saved the transformers way, as <run>/model.safetensors
        (tmp_path / "runs" / name).mkdir(parents=True)
        paths.append(tmp_path / "runs" / name / "model.safetensors")
        (tmp_path / "m" / f"{name}.safetensors").rename(paths[-1])
    (tmp_path / "other" / "t0").mkdir(parents=True)
    (tmp_path / "other" / "t0" / "model.safetensors").write_bytes(b"not a checkpoint")  # unreadable, named alike
    atlas = build_atlas([*paths, tmp_path / "other" / "t0" / "model.safetensors"], lineage=SPECIALIZE)
    by = {m.name: m for m in atlas.models}
    assert by["other/t0"].notes[0].startswith("unreadable: ")
    assert "t0_1" in by and "runs/t0_1" not in by  # only the names that clash go up a folder
    assert by["t0_1"].parent == "runs/t0" and by["t1_0"].parent == "t1"


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


def test_viewer_escapes_names():
    entry = ModelEntry("<script>x</script>", "/p/<script>", predicted=[["a&b", 0.9]])
    page = render_html(Atlas([entry], Forest([entry.name], [])))
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "a&amp;b 0.90" in page


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(AtlasError, match="no atlas here"):
        Atlas.load(tmp_path)
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(AtlasError, match="afile: a file, not an atlas folder or its atlas.json"):
        Atlas.load(tmp_path / "afile")
    (tmp_path / "atlas.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(AtlasError, match="unknown atlas format 'other'"):
        Atlas.load(tmp_path)
    (tmp_path / "atlas.json").write_text("{trunc")
    with pytest.raises(AtlasError, match="atlas.json: cannot read the atlas"):
        Atlas.load(tmp_path)
    good = Atlas([ModelEntry("a", "a")], Forest(["a"], []), embeddings={"t": (["a"], torch.ones(1, 3))})
    good.save(tmp_path / "e")
    (tmp_path / "e" / "embeddings.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(AtlasError, match="embeddings.safetensors"):
        Atlas.load(tmp_path / "e")


def test_class_experts_predict_and_flag_strangers(make_class_zoo, tmp_path):
    zoo, experts = make_class_zoo
    models = tmp_path / "models"
    models.mkdir()
    for name in ("t0", "t0-c0001", "t0-c0002", "t1-c0003"):
        (models / f"{name}.safetensors").write_bytes((zoo / f"{name}.safetensors").read_bytes())
    tensors = load_file(str(zoo / "t1-c0003.safetensors"))
    save_file({k: torch.randn_like(v) * 3 for k, v in tensors.items()}, str(models / "stranger.safetensors"))
    save_file({"w": torch.randn(4, 4)}, str(models / "other-arch.safetensors"))
    save_file({k: v.clone().fill_(float("nan")) for k, v in tensors.items()}, str(models / "nan.safetensors"))
    atlas = build_atlas([models], experts=experts)
    by = {m.name: m for m in atlas.models}
    assert by["t0-c0001"].expert_tree == "t0" and by["t1-c0003"].expert_tree == "t1"
    probs = [p for _, p in by["t0-c0001"].predicted]
    assert probs == sorted(probs, reverse=True) and all(p > 0.5 for p in probs)
    assert by["stranger"].predicted is None and "in no known tree" in by["stranger"].notes[0]
    assert "no tensor 'layers.1.weight' of shape (16, 16)" in by["other-arch"].notes[0]
    assert by["nan"].notes[-1] == "classes experts: not routed: its weights hold NaN or inf values: a diverged or " \
                                  "corrupt checkpoint"
    assert atlas.experts["classes"]["layer"] == "layers.1.weight"
    with pytest.raises(AtlasError, match="pass them as --experts"):
        build_atlas([models], text_experts=experts)


def test_wrong_experts_are_refused_before_the_lineage_recovery(make_class_zoo, tmp_path, monkeypatch):
    """A class experts folder given as --text-experts (or a mistyped one) failed only after the lineage
    recovery, the dominant cost of a build: minutes lost to a typo."""
    import modelatlas.atlas.build as build_module

    zoo, experts = make_class_zoo

    def no_lineage(*args, **kwargs):
        raise AssertionError("the lineage recovery ran before the experts were checked")

    monkeypatch.setattr(build_module, "recover_lineage", no_lineage)
    with pytest.raises(AtlasError, match="pass them as --experts"):
        build_atlas([zoo], text_experts=experts)
    with pytest.raises(AtlasError, match="not an experts folder"):
        build_atlas([zoo], experts=tmp_path / "typo")


def test_text_search_uses_stored_embeddings(tmp_path):
    from modelatlas.probex import ProbeXConfig
    from modelatlas.probex.experts import TreeExperts, train_tree_experts
    from modelatlas.probex.families import make_named_class_zoo
    from modelatlas.probex.text_encoder import encode_texts

    zoo = tmp_path / "named"
    make_named_class_zoo(zoo, models_per_class=1, hidden=16, ft_steps=(5, 10), batch_models=120)
    tx = tmp_path / "tx"
    train_tree_experts(zoo, tx, "text", "classifier.weight", ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2))
    atlas = build_atlas([zoo], text_experts=tx)
    atlas.save(tmp_path / "atl")
    loaded = Atlas.load(tmp_path / "atl")
    query = "a handwritten seven, upside down"
    hits = search_atlas(loaded, query, top=200)
    assert {h.how for h in hits} == {"text"} and len(hits) == len(atlas.embeddings["root"][0])
    # oracle: the scores from stored embeddings equal the scores computed from the weights themselves
    experts = TreeExperts.load(tx)
    assert loaded.experts["text"]["digest"] == experts.weights_digest()  # what a later search checks
    paths = [zoo / f"{h.name}.safetensors" for h in hits]
    x, routes = experts.read(paths)
    direct = experts.search_scores(x, routes, encode_texts([query]))
    np.testing.assert_allclose([h.score for h in hits], direct, rtol=1e-5, atol=1e-6)
    assert all(len(m.described) == 3 for m in atlas.models if m.text_tree)
    assert search_atlas(loaded, "seven", mode="keywords")[0].how == "keywords"


def test_build_merges_adapters_onto_the_adapter_base(tmp_path, make_adapter_family):
    fam = make_adapter_family(tmp_path / "fam")
    atlas = build_atlas([fam / "a0", fam / "a1", fam / "a2"], adapter_base=fam / "base.safetensors")
    assert [m.name for m in atlas.models][0] == "base" and {m.tree for m in atlas.models} == {1}
    # the base is the root (the kurtosis alone drew a2 as the root, the base its child) and a parent of each
    edges = {(e.parent, e.child) for e in atlas.forest.edges}
    assert edges == {("base", a) for a in ("a0", "a1", "a2")} and not atlas.forest.skipped
    assert atlas.forest.decisions["adapter_base"]["base"] == "base"
    plain = build_atlas([fam])  # without it the adapters hold no model: in no tree
    assert {m.name for m in plain.models if m.tree is None} == {"a0", "a1", "a2"}
    with pytest.raises(CheckpointError, match="a lora delta \\(an adapter\\), not a full model"):
        build_atlas([fam], adapter_base=fam / "a0")


def make_keyword_atlas():
    models = [ModelEntry("alpha", "/z/alpha", predicted=[["Shirt", 0.6], ["Bag", 0.55]]),
              ModelEntry("beta", "/z/beta", predicted=[["Shirt", 0.9]]),
              ModelEntry("shirt-model", "/z/shirt-model"), ModelEntry("gamma", "/z/gamma")]
    return Atlas(models, Forest([m.name for m in models], [Edge("alpha", "beta", 0.5)]))


def test_keyword_search_ranks_by_matches_and_probability():
    atlas = make_keyword_atlas()
    hits = search_atlas(atlas, "shirt")
    assert [h.name for h in hits] == ["beta", "alpha", "shirt-model"]
    assert [round(h.score, 2) for h in hits] == [1.9, 1.6, 1.0]
    assert [h.name for h in search_atlas(atlas, "shirt bag", top=1)] == ["alpha"]  # 1.6 + 1.55
    assert search_atlas(atlas, "nothing-like-it") == []
    with pytest.raises(AtlasError, match="empty search query"):
        search_atlas(atlas, "  ")
    for mode in ("keywords", "text"):  # no word: nothing to look up, and a text embedding of '!!!' ranks nothing
        with pytest.raises(AtlasError, match="search query '!!!' has no words to look up"):
            search_atlas(atlas, "!!!", mode=mode)
    with pytest.raises(AtlasError, match=r"search query '!{76}\.\.\. has no words"):
        search_atlas(atlas, "!" * 5000)  # a pasted page is not echoed whole
    with pytest.raises(AtlasError, match="no text embeddings"):
        search_atlas(atlas, "shirt", mode="text")
    with pytest.raises(AtlasError, match="search mode must be one of"):
        search_atlas(atlas, "shirt", mode="fuzzy")
    for top in (0, -1):
        with pytest.raises(AtlasError, match=f"top must be a positive number of models; got {top}"):
            search_atlas(atlas, "shirt", top=top)


def test_keyword_search_ignores_the_folder_every_model_shares():
    # Models under /runs/0/ must not all match "0": only the part of each path below the shared folder counts.
    models = [ModelEntry(n, f"/runs/0/{sub}/{n}.safetensors") for n, sub in
              [("a", "cnn"), ("b", "cnn"), ("c", "mlp")]]
    atlas = Atlas(models, Forest([m.name for m in models], [Edge("a", "b", 0.5)]))
    assert search_atlas(atlas, "0") == [] and search_atlas(atlas, "runs") == []
    assert [h.name for h in search_atlas(atlas, "cnn")] == ["a", "b"]
    alone = Atlas(models[:1], Forest(["a"], []))
    assert [h.name for h in search_atlas(alone, "a")] == ["a"] and search_atlas(alone, "cnn") == []


def test_viewer_of_a_long_chain_is_balanced():
    names = [f"m{i}" for i in range(1200)]
    forest = Forest(names, [Edge(names[i], names[i + 1], 0.5) for i in range(1199)], trees=[names])
    page = render_html(Atlas([ModelEntry(n, n) for n in names], forest))
    assert page.count("<li ") == 1200 and page.count("</li>") == 1200 and page.count("<ul") == page.count("</ul>")
    assert "[depth 1199]</span> <b>m1199</b>" in page


def test_a_model_the_lineage_skips_is_listed_with_the_reason(tmp_path):
    """A PEFT adapter folder opened alone holds an update, not a model: the lineage skips it with that reason."""
    make_forest_folder(tmp_path / "m")
    adapter = tmp_path / "m" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "target_modules": ["q_proj"]}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 3),
               "base_model.model.q_proj.lora_B.weight": torch.ones(4, 2)}, str(adapter / "adapter_model.safetensors"))
    atlas = build_atlas([tmp_path / "m"], lineage=SPECIALIZE)
    entry = atlas.entry("adapter")
    assert entry.tree is None and entry.parameters > 0
    assert entry.notes and entry.notes[0].startswith("lineage skipped it: ")
    with pytest.raises(AtlasError, match="no model named 'nope'"):
        atlas.entry("nope")


def test_text_search_needs_to_know_the_experts():
    atlas = Atlas([ModelEntry("a", "a")], Forest(["a"], []), embeddings={"t": (["a"], torch.ones(1, 3))})
    with pytest.raises(AtlasError, match="pass --text-experts DIR"):
        search_atlas(atlas, "a seven")


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


def make_saved_atlas(folder):
    """A small saved atlas (two models, one edge); returns its atlas.json as a dict."""
    models = [ModelEntry("a", "/m/a", parameters=10, predicted=[["Shirt", 0.9]]), ModelEntry("b", "/m/b", tree=1)]
    Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)], trees=[["a", "b"]])).save(folder)
    return json.loads((folder / "atlas.json").read_text())


def _set(keys, value):
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
    (_set(["models"], {"a": 1}), "models", "{'a': 1}"),
    (_set(["models"], "ab"), "models", "'ab'"),
    (_set(["models", 1], 5), "models[1]", "5"),
    (_set(["models", 0, "name"], None), "models[0].name", "missing"),
    (_set(["models", 0, "name"], 3), "models[0].name", "3"),
    (_set(["models", 0, "parameters"], "big"), "models[0].parameters", "'big'"),
    (_set(["models", 1, "tree"], "1"), "models[1].tree", "'1'"),
    (_set(["models", 0, "score"], "high"), "models[0].score", "'high'"),
    (_set(["models", 0, "predicted"], [["Shirt"]]), "models[0].predicted", "[['Shirt']]"),
    (_set(["models", 0, "predicted"], "Shirt"), "models[0].predicted", "'Shirt'"),
    (_set(["models", 0, "notes"], "x"), "models[0].notes", "'x'"),
    (_set(["forest"], [1]), "forest", "[1]"),
    (_set(["forest", "nodes"], "ab"), "forest.nodes", "'ab'"),
    (_set(["forest", "edges"], {"a": 1}), "forest.edges", "{'a': 1}"),
    (_set(["forest", "edges", 0], "a->b"), "forest.edges[0]", "'a->b'"),
    (_set(["forest", "edges", 0, "child"], None), "forest.edges[0].child", "missing"),
    (_set(["forest", "edges", 0, "parent"], "zzz"), "forest.edges[0].parent", "'zzz'"),
    (_set(["forest", "edges", 0, "score"], "x"), "forest.edges[0].score", "'x'"),
    (_set(["forest", "trees"], 5), "forest.trees", "5"),
    (_set(["forest", "decisions"], [1]), "forest.decisions", "[1]"),
    (_set(["experts"], [1]), "experts", "[1]"),
    (_set(["experts"], {"text": "dir"}), "experts.text", "'dir'"),
    (_set(["embedded"], [1]), "embedded", "[1]"),
    (_set(["embedded"], {"t": "a"}), "embedded.t", "'a'"),
    (_set(["embedded"], {"t": ["a", "ghost"]}), "embedded.t[1]", "'ghost' is not one of the models"),
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


def test_too_few_readable_models_says_why_the_others_were_not_read(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(AtlasError, match=r"0 readable model\(s\) of 1: an atlas needs at least 2 \(broken: "
                                         r"unreadable: .*broken\.safetensors"):
        build_atlas([tmp_path / "broken.safetensors"])


def test_load_of_the_viewer_page_points_to_the_folder(tmp_path):
    """`atlas index show my-atlas/atlas.html` (the file just opened in a browser) was parsed as JSON:
    'cannot read the atlas (Expecting value: line 1 column 1)'."""
    Atlas([ModelEntry("a", "a"), ModelEntry("b", "b")], Forest(["a", "b"], [])).save(tmp_path / "at")
    with pytest.raises(AtlasError, match=r"atlas\.html: a file, not an atlas folder or its atlas\.json; pass "
                                         r".*at\b"):
        Atlas.load(tmp_path / "at" / "atlas.html")
    assert [m.name for m in Atlas.load(tmp_path / "at" / "atlas.json").models] == ["a", "b"]
