import json

import torch
from safetensors.torch import load_file

from modelatlas.zoo import load_state, make_zoo
from modelatlas.zoo.lora import adapter_tensors, add_lora, apply_adapter, merge_lora


def test_merge_is_base_plus_scaled_product():
    lin = torch.nn.Linear(6, 5)
    model = torch.nn.Sequential(lin)
    w0 = lin.weight.detach().clone()
    wrappers = add_lora(model, ["0"], r=2, alpha=3.0, seed=0)
    with torch.no_grad():
        wrappers["0"].lora_B.normal_()
    a, b = wrappers["0"].lora_A.detach().clone(), wrappers["0"].lora_B.detach().clone()
    x = torch.rand(4, 6)
    y_lora = model(x)
    merge_lora(model, wrappers)
    assert isinstance(model[0], torch.nn.Linear)
    assert torch.allclose(model[0].weight, w0 + (3.0 / 2) * (b @ a), atol=1e-6)
    assert torch.allclose(model(x), y_lora, atol=1e-5)


def test_only_lora_params_train():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    add_lora(model, ["0"], r=1, alpha=1.0, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B"}


def test_adapter_folder_matches_merged_zoo(tmp_path, make_config):
    cfg = dict(method="lora", lora_ranks=(2, 3), depth=2, trees=1)
    merged = make_zoo(make_config(**cfg), tmp_path / "m", workers=1)
    adapter = make_zoo(make_config(**cfg, storage="adapter"), tmp_path / "a", workers=1)
    child = adapter["t0.1"]
    folder = adapter.path_of("t0.1")
    assert child.storage == "adapter" and sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "zoo_record.json"]
    conf = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = conf["r"], conf["lora_alpha"]
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"] == "t0" and r == child.train["lora_r"]
    ad = load_file(str(folder / "adapter_model.safetensors"))
    assert ad["base_model.model.layers.0.lora_A.weight"].shape == (r, 8)
    assert ad["base_model.model.layers.0.lora_B.weight"].shape == (8, r)
    assert ad["base_model.model.classifier.lora_B.weight"].shape == (10, r)
    assert set(conf["target_modules"]) == {"embed", "layers.0", "layers.1", "classifier"}
    # merged child == parent + (alpha / r) B A, for every adapted module
    parent = load_file(str(merged.path_of("t0") / "model.safetensors"))
    child_w = load_file(str(merged.path_of("t0.1") / "model.safetensors"))
    for module in conf["target_modules"]:
        a, b = ad[f"base_model.model.{module}.lora_A.weight"], ad[f"base_model.model.{module}.lora_B.weight"]
        assert torch.allclose(child_w[f"{module}.weight"], parent[f"{module}.weight"] + (alpha / r) * (b @ a), atol=1e-6)
        assert torch.equal(child_w[f"{module}.bias"], parent[f"{module}.bias"])
    # adapters of adapters resolve to the merged grandchild
    grand = load_state(tmp_path / "a", "t0.1.0")
    want = load_file(str(merged.path_of("t0.1.0") / "model.safetensors"))
    assert all(torch.allclose(grand[k], want[k], atol=1e-5) for k in want)


def test_apply_adapter_roundtrip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrappers = add_lora(model, ["0"], r=1, alpha=2.0, seed=1)
    with torch.no_grad():
        wrappers["0"].lora_B.fill_(0.5)
    tensors = adapter_tensors(wrappers)
    merge_lora(model, wrappers)
    out = apply_adapter(base, tensors, 1, 2.0)
    assert torch.allclose(out["0.weight"], model[0].weight)


def test_an_adapter_zoo_opens_as_full_models_for_lineage(tmp_path, make_config):
    """Adapter-stored models (and adapters of adapters) are merged onto their parents from the manifest, so
    `atlas demo` on an adapter preset compares every model instead of skipping them all."""
    from modelatlas.lineage import recover_lineage
    from modelatlas.lineage.scoring import score_forest
    from modelatlas.zoo.store import open_zoo_models

    manifest = make_zoo(make_config(method="lora", storage="adapter", depth=2, trees=1), tmp_path, workers=1)
    models = open_zoo_models(manifest)
    try:
        assert [ck.name for ck in models] == manifest.names and all(ck.kind == "full" for ck in models)
        grand = load_state(tmp_path, "t0.1.0")
        ck = models[manifest.names.index("t0.1.0")]
        assert all(torch.allclose(ck.read(k), v, atol=1e-5) for k, v in grand.items())
        forest = recover_lineage(models, stage="specialize")
        assert forest.skipped == {} and score_forest(forest, manifest).n_true_edges == 6
    finally:
        for ck in models:
            ck.close()
