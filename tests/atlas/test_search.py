"""Atlas search: text search scores from stored embeddings equal the weights' own and refuse experts the atlas was
not embedded with; keywords rank by matches and probability, match any script, ignore the shared folder."""

import numpy as np
import pytest
import torch

from modelatlas.atlas import Atlas, ModelEntry, build_atlas, search_atlas
from modelatlas.atomic import atomic_write_json
from modelatlas.errors import AtlasError
from modelatlas.lineage.forest import Edge, Forest

LAYER = "classifier.weight"


def make_experts_folder(folder, task="text", layer=LAYER, rank_t=4, d_text=384, tree="root", seed=0):
    """An experts folder as `atlas probex train` writes it, with one expert fitted for 1 epoch on noise."""
    from modelatlas.probex import ProbeXClassifier, ProbeXConfig, ProbeXTextAligner, TreeRouter
    from modelatlas.probex.experts import INDEX_FORMAT

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, generator=g)
    cfg = ProbeXConfig(rank_u=2, rank_v=2, rank_t=rank_t, epochs=1, seed=seed)
    if task == "text":
        expert = ProbeXTextAligner(cfg, layer).fit(x, [0, 1, 2, 0, 1, 2], torch.randn(3, d_text, generator=g),
                                                   ["a seven", "a three", "a four"])
    else:
        expert = ProbeXClassifier(cfg, layer).fit(x, np.eye(3, dtype=int)[[0, 1, 2, 0, 1, 2]])
    expert.save(folder / "experts" / tree)
    TreeRouter().fit(x, [tree] * 6).save(folder / "router")
    atomic_write_json(folder / "index.json", {"format": INDEX_FORMAT, "task": task, "layer": layer,
                                              "trees": {tree: f"experts/{tree}"}})
    return expert


def make_text_atlas(folder):
    """A two-model atlas embedded by the text experts in ``folder`` (no weights needed to search it)."""
    expert = make_experts_folder(folder)
    emb = torch.as_tensor(expert.embed_models(torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))))
    models = [ModelEntry("a", "/z/a"), ModelEntry("b", "/z/b")]
    return Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)]), {"text": {"folder": str(folder), "layer": LAYER}},
                 {"root": (["a", "b"], emb)})


@pytest.fixture
def fake_encoder(monkeypatch):
    """The MiniLM encoder's output shape (384 wide, unit norm) without loading it."""
    import modelatlas.probex.text_encoder as te

    def encode(texts):
        v = np.ones((len(texts), 384), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    monkeypatch.setattr(te, "encode_texts", encode)


def test_text_search_with_the_right_experts(tmp_path, fake_encoder):
    atlas = make_text_atlas(tmp_path / "tx")
    hits = search_atlas(atlas, "a seven")
    assert sorted(h.name for h in hits) == ["a", "b"] and {h.how for h in hits} == {"text"}
    assert search_atlas(atlas, "a seven", text_experts=tmp_path / "tx") == hits


@pytest.mark.parametrize("kind, message", [
    ({"task": "classes"}, "experts trained with --task classes; text search needs the text experts"),
    ({"layer": "embed.weight"}, "text experts on layer 'embed.weight', but the atlas was embedded with experts "
                                "on layer 'classifier.weight'"),
    ({"rank_t": 8}, "the expert of tree 'root' embeds models in 8 dimensions, the atlas stores 4"),
    ({"tree": "t0"}, "no expert for tree 'root', which embedded this atlas"),
    ({"d_text": 8}, "the expert of tree 'root' was not trained on text embeddings of width 384"),
])
def test_text_search_refuses_other_experts(tmp_path, fake_encoder, kind, message):
    atlas = make_text_atlas(tmp_path / "tx")
    make_experts_folder(tmp_path / "other", **kind)
    with pytest.raises(AtlasError, match=f"^{tmp_path / 'other'}: {message}"):
        search_atlas(atlas, "a seven", text_experts=tmp_path / "other")


def test_text_search_refuses_retrained_experts(tmp_path, fake_encoder):
    # same task, layer, tree and ranks, other weights: the stored embeddings came from the experts it replaced
    from modelatlas.probex.experts import TreeExperts

    atlas = make_text_atlas(tmp_path / "tx")
    atlas.experts["text"]["digest"] = TreeExperts.load(tmp_path / "tx").weights_digest()  # as index build records
    assert search_atlas(atlas, "a seven")  # the experts it was built with
    make_experts_folder(tmp_path / "tx", seed=1)  # retrained in place
    with pytest.raises(AtlasError, match=f"^{tmp_path / 'tx'}: these text experts are not the ones that embedded"):
        search_atlas(atlas, "a seven")
    del atlas.experts["text"]["digest"]  # an atlas built before digests were recorded is searched unchecked
    assert search_atlas(atlas, "a seven")


def test_scores_from_embeddings_refuse_other_widths():
    from modelatlas.errors import ConfigError
    from modelatlas.probex import ProbeXConfig, ProbeXTextAligner

    x = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(0))
    expert = ProbeXTextAligner(ProbeXConfig(rank_u=2, rank_v=2, rank_t=4, epochs=1)).fit(x, [0, 1, 0, 1],
                                                                                       torch.randn(2, 8))
    with pytest.raises(ConfigError, match="query embedding has width 384, but this expert was trained on .* 8"):
        expert.scores_from_embeddings(expert.embed_models(x), np.ones(384))
    with pytest.raises(ConfigError, match=r"model embeddings must be \(B, 4\)"):
        expert.scores_from_embeddings(np.ones((4, 3)), np.ones(8))


def test_keyword_search_matches_words_of_any_script():
    models = [ModelEntry("bert-日本", "/z/bert-日本"), ModelEntry("Größe-v2", "/z/Größe-v2", predicted=[["Straße", 0.9]]),
              ModelEntry("gr-e", "/z/gr-e")]
    atlas = Atlas(models, Forest([m.name for m in models], []))
    assert [h.name for h in search_atlas(atlas, "日本")] == ["bert-日本"]
    assert [h.name for h in search_atlas(atlas, "GRÖSSE")] == ["Größe-v2"]  # casefolded: ß is ss
    assert [(h.name, round(h.score, 2)) for h in search_atlas(atlas, "strasse")] == [("Größe-v2", 1.9)]
    assert [h.name for h in search_atlas(atlas, "gr")] == ["gr-e"]  # "Größe" is one word, not gr + e
    assert [(h.name, h.score) for h in search_atlas(atlas, "größe-v2")] == [("Größe-v2", 4.0)]  # 2 words + name


def test_keyword_search_matches_a_name_in_either_unicode_form():
    """A model file named on macOS (NFD: e + combining accent) is found by the word typed (NFC), and the other
    way round; before, the accent split 'mode\u0300le' into 'mode' and 'le'."""
    nfd, nfc = "mode\u0300le-fr", "mod\u00e8le-de"
    models = [ModelEntry(nfd, f"/z/{nfd}"), ModelEntry(nfc, f"/z/{nfc}"), ModelEntry("mode-x", "/z/mode-x")]
    atlas = Atlas(models, Forest([m.name for m in models], []))
    assert [h.name for h in search_atlas(atlas, "mod\u00e8le")] == [nfd, nfc]  # a tie: in name order
    assert [h.name for h in search_atlas(atlas, "mode\u0300le")] == [nfd, nfc]
    assert [h.name for h in search_atlas(atlas, "mode")] == ["mode-x"]
    assert [(h.name, h.score) for h in search_atlas(atlas, "mod\u00e8le-fr")] == [(nfd, 4.0), (nfc, 1.0)]


def test_moved_text_experts_are_named_with_the_fix(tmp_path, fake_encoder):
    import shutil

    atlas = make_text_atlas(tmp_path / "tx")
    shutil.move(tmp_path / "tx", tmp_path / "moved")
    with pytest.raises(AtlasError, match=r"no longer at .*tx \(moved or deleted\); pass --text-experts DIR"):
        search_atlas(atlas, "a seven")
    assert {h.name for h in search_atlas(atlas, "a seven", text_experts=tmp_path / "moved")} == {"a", "b"}


def test_text_experts_on_an_atlas_without_embeddings_is_an_error(tmp_path):
    atlas = Atlas([ModelEntry("a", "/z/a")], Forest(["a"], []))
    with pytest.raises(AtlasError, match=r"no text embeddings \(so --text-experts has nothing to search\)"):
        search_atlas(atlas, "seven", text_experts=tmp_path)
    assert search_atlas(atlas, "a") and search_atlas(atlas, "a", mode="keywords")


def test_an_atlas_built_with_text_experts_that_embedded_nothing_says_so():
    """It said "rebuild it with `atlas index build --text-experts DIR`": what the user had just done."""
    atlas = Atlas([ModelEntry("a", "/z/a")], Forest(["a"], []), experts={"text": {"folder": "/x/tx", "layer": "w"}})
    with pytest.raises(AtlasError, match=r"no text embeddings: none of its models is in a tree the text experts "
                                         r"/x/tx were trained on \(their notes say why: `atlas index show`\), or "
                                         r"search keywords"):
        search_atlas(atlas, "seven", mode="text")


@pytest.mark.parametrize("edit,words", [(lambda e: e[:, 0].contiguous(), r"must be \(models, dimensions\); got shape \(2,\)"),
                                        (lambda e: e.fill_(float("nan")), "holds NaN or inf")])
def test_load_refuses_stored_embeddings_that_cannot_be_scored(tmp_path, edit, words):
    """A 1-D embeddings tensor was an IndexError in `atlas index search`; NaN ones ranked every model at
    'log p(query) nan', in no particular order."""
    from safetensors.torch import load_file, save_file

    make_text_atlas(tmp_path / "tx").save(tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "embeddings.safetensors"))
    save_file({k: edit(v) for k, v in tensors.items()}, str(tmp_path / "a" / "embeddings.safetensors"))
    with pytest.raises(AtlasError, match=r"embeddings\.safetensors: embeddings of tree 'root' " + words):
        Atlas.load(tmp_path / "a")


def test_top_may_be_a_numpy_integer():
    """top=np.int64(1) (e.g. from an array of sizes) was refused as 'a positive number of models; got 1'."""
    atlas = Atlas([ModelEntry("a", "/z/a"), ModelEntry("ab", "/z/ab")], Forest(["a", "ab"], []))
    assert [h.name for h in search_atlas(atlas, "a", top=np.int64(1))] == ["a"]
    with pytest.raises(AtlasError, match="top must be a positive number of models; got 0"):
        search_atlas(atlas, "a", top=np.int64(0))


def test_show_and_keyword_search_need_no_embeddings_file(tmp_path, capsys):
    """An atlas.json copied without embeddings.safetensors could not even be shown: 'embeddings.safetensors:
    missing' from `atlas index show` and `--mode keywords`, which never use the embeddings."""
    from modelatlas.cli.main import main

    make_text_atlas(tmp_path / "tx").save(tmp_path / "a")
    (tmp_path / "a" / "embeddings.safetensors").unlink()
    assert main(["index", "show", str(tmp_path / "a")]) == 0
    assert main(["index", "search", "b", str(tmp_path / "a"), "--mode", "keywords"]) == 0
    assert "1. b  keyword score" in capsys.readouterr().out
    assert main(["index", "search", "a seven", str(tmp_path / "a")]) == 1  # text search does need them
    assert "embeddings.safetensors: missing" in capsys.readouterr().err


def test_probex_predict_over_an_atlas_needs_no_embeddings_file(tmp_path, capsys):
    """`atlas probex predict ATLAS` reads only the models' paths from it, yet failed with
    'embeddings.safetensors: missing' when the atlas.json was copied alone."""
    from modelatlas.cli.main import main

    make_text_atlas(tmp_path / "tx").save(tmp_path / "a")
    (tmp_path / "a" / "embeddings.safetensors").unlink()
    make_experts_folder(tmp_path / "cx", task="classes")
    assert main(["probex", "predict", str(tmp_path / "a"), "--experts", str(tmp_path / "cx")]) == 1  # /z/a: no file
    captured = capsys.readouterr()  # the models it lists are not there (skipped, saying so since session 37)
    assert "embeddings.safetensors" not in captured.err
    assert f"skipped: /z/a: listed in {tmp_path / 'a'}, but not there" in captured.err


def test_keyword_mode_refuses_text_experts_it_would_not_use(tmp_path, fake_encoder):
    """`--mode keywords --text-experts DIR` searched keywords and ignored DIR without a word (any DIR at all)."""
    atlas = make_text_atlas(tmp_path / "tx")
    with pytest.raises(AtlasError, match=r"^--text-experts is for text search; --mode keywords uses no experts"):
        search_atlas(atlas, "a", mode="keywords", text_experts=tmp_path / "nowhere")
    assert [h.how for h in search_atlas(atlas, "a", mode="keywords")] == ["keywords"]


def make_tree_atlas():
    """Tree 1: r1 and its child m1 (predicted class 7); tree 3: r3 and m3 (class 2); "c3", in no tree,
    predicted class 3 at 0.9; "lone", in no tree; "tree-x", in no tree, named with the word tree."""
    models = [ModelEntry("r1", "/z/r1", tree=1), ModelEntry("m1", "/z/m1", tree=1, parent="r1", predicted=[["7", 0.8]]),
              ModelEntry("r3", "/z/r3", tree=3), ModelEntry("m3", "/z/m3", tree=3, parent="r3", predicted=[["2", 0.6]]),
              ModelEntry("c3", "/z/c3", predicted=[["3", 0.9]]), ModelEntry("lone", "/z/lone"),
              ModelEntry("tree-x", "/z/tree-x")]
    forest = Forest([m.name for m in models], [Edge("r1", "m1", 0.9), Edge("r3", "m3", 0.9)],
                    trees=[["r1", "m1"], ["r3", "m3"]])
    return Atlas(models, forest)


def test_tree_n_finds_the_members_of_tree_n():
    """"tree 3" ranked c3 (in no tree, predicted class 3: 1 + 1.9) above the members of tree 3 (1 + 1), and the
    word "tree" matched every model, in a tree or not. Now "tree N" is one term, matched by tree N's members."""
    atlas = make_tree_atlas()
    hits = search_atlas(atlas, "tree 3")
    assert [(h.name, h.score) for h in hits] == [("m3", 2.0), ("r3", 2.0)]
    assert [h.name for h in search_atlas(atlas, "Tree 3 2")] == ["m3", "r3"]  # + class 2 at 0.6: 2 + 1.6
    assert [h.score for h in search_atlas(atlas, "Tree 3 2")] == [3.6, 2.0]
    assert [h.name for h in search_atlas(atlas, "3")] == ["c3", "m3", "r3"]  # a number alone: class, tree number
    assert search_atlas(atlas, "tree 9") == []
    # "tree" alone: the models in a tree, and a name holding the word; not the others
    assert sorted(h.name for h in search_atlas(atlas, "tree")) == ["m1", "m3", "r1", "r3", "tree-x"]
    assert search_atlas(atlas, "none") == []  # a model in no tree had the word "None" (its tree) to match


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


def test_text_search_needs_to_know_the_experts():
    atlas = Atlas([ModelEntry("a", "a")], Forest(["a"], []), embeddings={"t": (["a"], torch.ones(1, 3))})
    with pytest.raises(AtlasError, match="pass --text-experts DIR"):
        search_atlas(atlas, "a seven")


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
