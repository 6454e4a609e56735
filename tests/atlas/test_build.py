"""build_atlas's inputs: what a caller may pass for the models."""

import torch
from safetensors.torch import load_file, save_file

from modelatlas.atlas import build_atlas
from modelatlas.lineage import LineageConfig
from modelatlas.lineage.synthetic import make_synthetic_forest
from modelatlas.weights import open_checkpoint


def make_models(folder):
    """One synthetic tree of a root and 2 children as safetensors files."""
    weights, parents = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=3)
    folder.mkdir()
    for name, tensors in weights.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    return parents


def test_one_folder_given_alone_is_one_input_not_its_characters(tmp_path):
    """build_atlas("zoo") read the letters z, o, o as three hub ids: '0 readable model(s) of 3'."""
    parents = make_models(tmp_path / "zoo")
    config = LineageConfig(stage="specialize")
    for given in (str(tmp_path / "zoo"), tmp_path / "zoo"):
        atlas = build_atlas(given, lineage=config)
        assert {m.name: m.parent for m in atlas.models} == parents


def test_a_hub_model_is_recorded_by_its_hub_id(tmp_path, monkeypatch):
    """A hub id was recorded as the path it would have below the working folder (/cwd/org/t0_0), which holds
    nothing: `atlas probex predict ATLAS` then said 'no such file' for a model the build had read, and the
    viewer and keyword search showed that made-up path."""
    from modelatlas.atlas import search_atlas
    from modelatlas.weights import open_checkpoint

    parents = make_models(tmp_path / "local")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--t0_0" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    blob = snapshot.parent.parent / "blobs" / ("b" * 64)  # the snapshot's file is a link to it, as the hub writes
    blob.parent.mkdir()
    (tmp_path / "local" / "t0_0.safetensors").rename(blob)
    (snapshot / "model.safetensors").symlink_to(blob)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.chdir(tmp_path / "local")  # "org/t0_0" must not exist as a local path
    atlas = build_atlas(["org/t0_0", tmp_path / "local"], lineage=LineageConfig(stage="specialize"))
    by = {m.name: m for m in atlas.models}
    assert set(by) == {"org/t0_0", "t0", "t0_1"} and by["org/t0_0"].parent == "t0" == parents["t0_0"]
    assert by["org/t0_0"].path == "org/t0_0" and by["t0"].path == str(tmp_path / "local" / "t0.safetensors")
    assert by["org/t0_0"].size_bytes == blob.stat().st_size > 1000  # the blob's bytes, not the link's
    monkeypatch.chdir(tmp_path)  # elsewhere, as a later `atlas probex predict ATLAS` may be
    with open_checkpoint(by["org/t0_0"].path) as ck:
        assert ck.name == "org/t0_0"
    # the local models' shared folder still matches nothing; the hub id's words match its model
    assert search_atlas(atlas, "local", mode="keywords") == []
    assert [h.name for h in search_atlas(atlas, "org", mode="keywords")] == ["org/t0_0"]


def test_sizes_are_what_is_stored_on_disk(tmp_path, make_adapter_family):
    """An adapter was described by the dense update it exposes (3 layers of 16 x 16: 768 parameters, 3 KB in
    float32), a Q8_0 GGUF file by its float32 dequantization: 6.8 KB shown for a 3.5 KB adapter. Now an
    adapter counts its A and B factors, a GGUF file its stored type, and every size is its files' bytes."""
    from tests.lineage.test_quantized import make_gguf  # Q8_0 unless told: 34 bytes a block of 32 values

    fam = make_adapter_family(tmp_path / "fam", n=2)
    gen = torch.Generator().manual_seed(0)
    make_gguf(fam / "q.gguf", {f"layers.{i}.weight": torch.randn(64, 64, generator=gen) for i in range(2)})
    own = [fam / "a0" / "adapter_config.json", fam / "a0" / "adapter_model.safetensors"]
    for base in (None, fam / "base.safetensors"):  # merged onto the base or not, the adapter stores the same
        by = {m.name: m for m in build_atlas(fam, adapter_base=base).models}
        assert (by["a0"].parameters, by["a0"].tensors, by["a0"].dtype) == (3 * (2 * 16 + 16 * 2), 6, "float32")
        assert by["a0"].size_bytes == sum(f.stat().st_size for f in own)
        assert (by["base"].parameters, by["base"].size_bytes) == (768, (fam / "base.safetensors").stat().st_size)
        assert (by["q"].parameters, by["q"].dtype) == (2 * 64 * 64, "Q8_0")
        assert by["q"].size_bytes == (fam / "q.gguf").stat().st_size
        assert 2 * 64 * 2 * 34 < by["q"].size_bytes < 4 * 2 * 64 * 64 // 2  # the blocks plus a header


def make_zoo_adapter(folder, base, seed, size=0.02):
    """A rank-2 PEFT adapter of layer ``layers.1`` of the full model ``base``, its update ``size`` times that
    layer's spread (a fine-tune's step, not a new model)."""
    from tests.weights.test_peft_lora import make_adapter

    w = load_file(str(base))["layers.1.weight"]
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, w.shape[1], generator=gen), torch.randn(w.shape[0], 2, generator=gen)
    b *= size * w.std() / (b @ a).std()  # s = alpha / r = 1
    return make_adapter(folder, {"layers.1.lora_A.weight": a, "layers.1.lora_B.weight": b}, lora_alpha=2,
                        target_modules=["layers.1"])


def test_experts_read_an_adapter_merged_onto_the_base(make_class_zoo, tmp_path):
    """With --base the lineage compared each adapter merged onto the base, but the experts read its update
    alone (B A: nothing like the full models' layers they were trained on, so routed to no tree or guessed).
    Now they read the merged layer: the adapter gets the predictions of the same weights saved as a model."""
    zoo, experts = make_class_zoo
    (tmp_path / "models").mkdir()
    for name in ("t0-c0001", "t0-c0002"):
        (tmp_path / "models" / f"{name}.safetensors").write_bytes((zoo / f"{name}.safetensors").read_bytes())
    ad = make_zoo_adapter(tmp_path / "models" / "ad", zoo / "t0.safetensors", seed=1)
    with open_checkpoint(ad, base=zoo / "t0.safetensors") as ck:  # the oracle: the merged model, saved whole
        (tmp_path / "merged").mkdir()
        save_file({k: ck.read(k) for k in ck.keys()}, str(tmp_path / "merged" / "merged.safetensors"))
    atlas = build_atlas([tmp_path / "models", tmp_path / "merged"], experts=experts, adapter_base=zoo / "t0.safetensors")
    by = {m.name: m for m in atlas.models}
    assert by["ad"].expert_tree == by["merged"].expert_tree == by["t0"].expert_tree == "t0"
    assert by["ad"].predicted == by["merged"].predicted and by["ad"].predicted  # some class above 0.5
    assert by["ad"].architecture == by["merged"].architecture == by["t0"].architecture  # the merged model's tensors
    assert [n for n in by["ad"].notes if "experts" in n] == []


def test_an_adapter_that_does_not_fit_the_base_is_noted_and_the_build_goes_on(tmp_path, make_adapter_family):
    """Its headers were read alone, then the lineage's merge failed and ended the whole build with that error."""
    from tests.weights.test_peft_lora import make_adapter

    fam = make_adapter_family(tmp_path / "fam", n=2)
    make_adapter(fam / "bad", {"layers.0.lora_A.weight": torch.ones(2, 8), "layers.0.lora_B.weight": torch.ones(16, 2)},
                 lora_alpha=2, target_modules=["layers.0"])  # an update of 16 x 8, the base's layer is 16 x 16
    by = {m.name: m for m in build_atlas(fam, adapter_base=fam / "base.safetensors").models}
    assert {n: m.tree for n, m in by.items()} == {"base": 1, "a0": 1, "a1": 1, "bad": None}
    assert by["bad"].notes == [f"unreadable: {fam / 'bad'}: LoRA module 'layers.0': update shape (16, 8) does not "
                               "match the base weight shape (16, 16)"]


def test_a_model_with_no_class_above_one_half_gets_its_most_probable_class_in_a_note(make_class_zoo, monkeypatch):
    """Routed to its expert, it got no class above 0.5 and was shown with no label and no note, as if no
    expert had looked at it. Now a note gives its most probable class, as `atlas probex predict` says."""
    import numpy as np

    from modelatlas.probex import ProbeXClassifier

    zoo, experts = make_class_zoo

    def unsure(self, x):  # (B, classes): class 3 at 0.42, the others below it
        probs = np.full((len(x), len(self.classes_)), 0.1)
        probs[:, self.classes_.index("3")] = 0.42
        return probs

    monkeypatch.setattr(ProbeXClassifier, "predict_proba", unsure)
    atlas = build_atlas([zoo / "t0.safetensors", zoo / "t0-c0001.safetensors"], experts=experts, lineage=LineageConfig(stage="specialize"))
    for m in atlas.models:
        assert (m.expert_tree, m.predicted) == ("t0", [])
        assert m.notes == ["classes experts: no class above 0.5; most probable 3 (0.42)"]


def test_probex_predict_reads_an_adapter_merged_onto_base(make_class_zoo, tmp_path, capsys):
    """atlas probex predict had no --base: an adapter was read as its update B A, routed to no tree, where
    atlas index build --base predicted it. Now --base gives it the predictions of its merged weights."""
    from modelatlas.cli.main import main

    zoo, experts = make_class_zoo
    ad = make_zoo_adapter(tmp_path / "ad", zoo / "t0.safetensors", seed=1)
    with open_checkpoint(ad, base=zoo / "t0.safetensors") as ck:  # the oracle: the merged model, saved whole
        save_file({k: ck.read(k) for k in ck.keys()}, str(tmp_path / "merged.safetensors"))
    args = ["probex", "predict", str(ad), str(tmp_path / "merged.safetensors"), "--experts", str(experts)]
    assert main([*args, "--base", str(zoo / "t0.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ad [tree t0]: ") and lines[0].removeprefix("ad") == lines[1].removeprefix("merged")
    main(args)
    assert "ad [tree" not in capsys.readouterr().out  # its update alone: in no tree
    assert main([*args, "--base", str(tmp_path / "none.safetensors")]) == 1
    assert capsys.readouterr().err.startswith("error: --base ")


def test_an_atlas_records_its_base_and_probex_predict_reads_its_adapters_on_it(make_class_zoo, tmp_path, capsys):
    """atlas.json kept no --base, so `atlas probex predict ATLAS` read its adapters as updates B A alone."""
    from modelatlas.atlas import Atlas
    from modelatlas.cli.main import main

    zoo, experts = make_class_zoo
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "c1.safetensors").write_bytes((zoo / "t0-c0001.safetensors").read_bytes())
    make_zoo_adapter(tmp_path / "models" / "ad", zoo / "t0.safetensors", seed=1)
    atlas = build_atlas(tmp_path / "models", experts=experts, adapter_base=zoo / "t0.safetensors")
    assert atlas.adapter_base == str(zoo / "t0.safetensors")
    atlas.save(tmp_path / "atlas")
    assert Atlas.load(tmp_path / "atlas").adapter_base == str(zoo / "t0.safetensors")
    assert main(["probex", "predict", str(tmp_path / "atlas"), "--experts", str(experts)]) == 0
    ad = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ad "))
    predicted = ", ".join(f"{c} ({p:.2f})" for c, p in atlas.entry("ad").predicted)
    assert ad == f"ad [tree t0]: {predicted}"


def test_probex_predict_refuses_a_missing_or_ambiguous_atlas_base(make_class_zoo, tmp_path, capsys):
    """A recorded base that is gone, or two atlases of two bases, are one line each; --base reads them."""
    import json

    from modelatlas.cli.main import main

    zoo, experts = make_class_zoo
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "c1.safetensors").write_bytes((zoo / "t0-c0001.safetensors").read_bytes())
    make_zoo_adapter(tmp_path / "models" / "ad", zoo / "t0.safetensors", seed=1)
    build_atlas(tmp_path / "models", experts=experts, adapter_base=zoo / "t0.safetensors").save(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "atlas.json").read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "atlas.json").write_text(json.dumps({**data, "adapter_base": str(tmp_path / "gone")}))
    predict = ["probex", "predict", "--experts", str(experts)]
    assert main([*predict, str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the atlas's base {tmp_path / 'gone'}") and err.rstrip().endswith("; pass --base")
    assert main([*predict, str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the atlases given were built with different --base (") and "pass --base" in err
    assert main([*predict, str(tmp_path / "b"), "--base", str(zoo / "t0.safetensors")]) == 0
    assert "ad [tree t0]" in capsys.readouterr().out


def test_a_model_equal_on_the_compared_layers_only_says_so(tmp_path):
    """A head-only fine-tune of t0_0 was noted as 'duplicate of t0_0' (identical weights)."""
    make_models(tmp_path / "zoo")
    tensors = load_file(str(tmp_path / "zoo" / "t0_0.safetensors"))
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(10, 32, generator=gen)
    for name in ("t0", "t0_0", "t0_1"):
        w = load_file(str(tmp_path / "zoo" / f"{name}.safetensors"))
        save_file({**w, "head.weight": head}, str(tmp_path / "zoo" / f"{name}.safetensors"))
    save_file({**tensors, "head.weight": head + 1}, str(tmp_path / "zoo" / "t0_0probe.safetensors"))
    by = {m.name: m for m in build_atlas(tmp_path / "zoo", lineage=LineageConfig(stage="specialize")).models}
    assert (by["t0_0probe"].parent, by["t0_0probe"].score) == ("t0_0", 0.0)
    assert by["t0_0probe"].notes == ["equal to t0_0 on the compared layers; differs in 1 other tensor(s), "
                                     "e.g. head.weight"]


def test_quantized_models_are_described_by_their_stored_tensors(tmp_path):
    """A GPTQ or FP8 model was noted 'unreadable: no tensor named layer.scales': the entry asked the type of
    each stored tensor, which the dequantized reader hid. Now the tensor holding a layer's values has the
    layer's type, its scales and zeros their dtype."""
    from tests.lineage.test_dequantized_copies import make_folder
    from tests.weights.conftest import make_gptq

    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    save_file({"a.weight": w}, tmp_path / "p.safetensors")
    make_folder(tmp_path / "p-gptq", make_gptq(w, group=32, name="a"), {"quant_method": "gptq", "bits": 4})
    scale = w.abs().amax(1, keepdim=True) / 448  # (rows, 1): one per channel
    make_folder(tmp_path / "p-fp8", {"a.weight": (w / scale).to(torch.float8_e4m3fn), "a.weight_scale": scale},
                {"quant_method": "compressed-tensors"})
    by = {m.name: m for m in build_atlas(tmp_path).models}
    assert [n for m in by.values() for n in m.notes if "unreadable" in n] == []
    assert (by["p-gptq"].dtype, by["p-gptq"].tensors, by["p-fp8"].dtype) == ("GPTQ-INT4", 4, "FP8")
    # the weights the layer holds, not its int32 words (512 x 64 / 8) nor its scales and zeros
    assert by["p-gptq"].parameters == by["p-fp8"].parameters == by["p"].parameters == 512 * 64
    assert by["p-gptq"].parent == by["p-fp8"].parent == "p"


def test_a_quantized_model_without_its_source_says_so(tmp_path):
    from tests.lineage.test_dequantized_copies import make_folder, make_gptq_like, make_weights

    p = make_weights(0)
    save_file(p, tmp_path / "p.safetensors")
    make_folder(tmp_path / "ft-gptq", make_gptq_like(make_weights(10, p, step=0.05)), {"quant_method": "gptq"})
    by = {m.name: m for m in build_atlas(tmp_path, lineage=LineageConfig(stage="specialize")).models}
    assert by["ft-gptq"].parent == "p"
    assert by["ft-gptq"].notes == ["quantized (gptq-int4); the model it was quantized from is not among these"]


def test_a_model_with_a_layer_the_others_lack_says_what_was_not_compared(tmp_path):
    """A classifier with a square head that its pretrained base lacks was a tree of its own, without a word."""
    make_models(tmp_path / "zoo")
    w = load_file(str(tmp_path / "zoo" / "t0_1.safetensors"))
    head = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    save_file({**w, "classifier.dense": head}, str(tmp_path / "zoo" / "t0_1.safetensors"))
    by = {m.name: m for m in build_atlas(tmp_path / "zoo", lineage=LineageConfig(stage="specialize")).models}
    assert by["t0_1"].parent == "t0"
    assert by["t0_1"].notes == ["compared on the 4 layers it shares with the others; 1 of its own not compared, "
                                "e.g. classifier.dense"]
