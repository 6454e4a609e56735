"""build_atlas over folders of models: every model placed and described, names told apart, class experts'
predictions, an adapter base, the models the lineage skips or cannot read."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.atlas.conftest import SPECIALIZE, make_forest_folder

from modelatlas.atlas import build_atlas
from modelatlas.errors import AtlasError, CheckpointError


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


def test_too_few_readable_models_says_why_the_others_were_not_read(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(AtlasError, match=r"0 readable model\(s\) of 1: an atlas needs at least 2 \(broken: "
                                         r"unreadable: .*broken\.safetensors"):
        build_atlas([tmp_path / "broken.safetensors"])


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
    with pytest.raises(AtlasError, match="typo: no such folder"):
        build_atlas([zoo], experts=tmp_path / "typo")


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
