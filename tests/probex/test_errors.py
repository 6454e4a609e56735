"""Failure paths: each error names the file, key or value."""

import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError, ConfigError, ManifestError
from modelatlas.probex import ProbeXConfig, ProbeXTextAligner, TreeRouter, load_expert, load_layer
from modelatlas.probex.experts import train_tree_experts
from modelatlas.zoo.manifest import Manifest, ModelRecord


def test_load_layer_shape_mismatch_names_model(tmp_path):
    save_file({"w": torch.zeros(3, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(3, 5)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: layer 'w' has shape \(3, 5\)"):
        load_layer([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "w")


def test_router_wrong_size():
    router = TreeRouter().fit(torch.randn(4, 2, 2), ["a", "a", "b", "b"])
    with pytest.raises(ConfigError, match="router expects 4 weights per model; got 6"):
        router.route(torch.randn(1, 2, 3))


def test_manifest_without_task_key(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "r.safetensors"))
    Manifest([ModelRecord("r", "r.safetensors", None, "r"), ModelRecord("c", "r.safetensors", "r", "r")],
             {}, tmp_path).save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="no fine-tuned model has task key 'classes'"):
        train_tree_experts(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="--task must be one of"):
        train_tree_experts(tmp_path, tmp_path / "out", task="colour")


def test_labelled_models_without_a_parent_are_told_to_name_their_parent(tmp_path):
    """A hand-written manifest of one's own models with "parent": null (each a root) was told that no fine-tuned
    model had task key 'classes', which every one of them had."""
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "r.safetensors"))
    recs = [ModelRecord(f"m{i}", "r.safetensors", None, f"m{i}", task={"classes": [0]}) for i in range(12)]
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"manifest\.json: no fine-tuned model has task key 'classes' \(needed by "
                                            r"--task classes\); 12 model\(s\) have it \('m0', 'm1', 'm2', \.\.\.\) but "
                                            r'"parent": null, .*give each its parent'):
        train_tree_experts(tmp_path, tmp_path / "out")


def test_a_model_path_relative_to_the_current_folder_is_told_relative_to_the_manifest(tmp_path, monkeypatch):
    """A hand-written labels.json with paths from the current folder said only 'lab/own/c0.safetensors: no such
    file or folder', once the earlier models were read."""
    (tmp_path / "own").mkdir()
    (tmp_path / "lab").mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "own" / "c0.safetensors"))
    recs = [ModelRecord("r", "own/c0.safetensors", None, "r")]
    recs += [ModelRecord(f"c{i}", "own/c0.safetensors", "r", "r", task={"classes": [0]}) for i in range(12)]
    Manifest(recs, {}, tmp_path / "lab").save(tmp_path / "lab" / "labels.json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError, match=r"^lab/labels\.json: model 'c0': lab/own/c0\.safetensors not found \(its "
                                            r"path 'own/c0\.safetensors' is relative to the manifest's folder\); "
                                            r"own/c0\.safetensors is there from the current folder: write the paths "
                                            r"relative to lab, or absolute$"):
        train_tree_experts("lab/labels.json", tmp_path / "out")


@pytest.mark.parametrize("key,value", [("classes", ["3", 2]), ("classes", [2.5]), ("classes", 3), ("classes", [True]),
                                       ("classes", [-1, 2]), ("label", 5), ("label", " ")])
def test_a_hand_written_task_target_is_one_error_naming_the_model(tmp_path, key, value):
    """"3", 2.5, 3 or true as classes were a TypeError / IndexError deep in training; -1 marked the last class."""
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "r.safetensors"))
    recs = [ModelRecord("r", "r.safetensors", None, "r")]
    recs += [ModelRecord(f"c{i}", "r.safetensors", "r", "r", task={"classes": [0], "label": "zero"}) for i in range(12)]
    recs[5].task[key] = value
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=rf"manifest\.json: model 'c4' task '{key}' must be .*; got "):
        train_tree_experts(tmp_path, tmp_path / "out", task="classes" if key == "classes" else "text")


def test_too_few_models_per_tree(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "r.safetensors"))
    recs = [ModelRecord("r", "r.safetensors", None, "r")]
    recs += [ModelRecord(f"c{i}", "r.safetensors", "r", "r", task={"classes": [0]}) for i in range(3)]
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    # it did not say how many each tree has: the user could not tell a near miss from a wrong --task
    with pytest.raises(ManifestError, match=r"no tree has >= 10 labelled models to train an expert on \(r: 3\)$"):
        train_tree_experts(tmp_path, tmp_path / "out")


def test_text_labels_out_of_range():
    with pytest.raises(ConfigError, match="indices into 2 text embeddings"):
        ProbeXTextAligner(ProbeXConfig(epochs=1)).fit(torch.randn(3, 2, 2), [0, 1, 2], torch.randn(2, 4))


def test_unknown_expert_format(tmp_path):
    (tmp_path / "expert.json").write_text('{"format": "other"}')
    save_file({"mean": torch.zeros(1)}, str(tmp_path / "expert.safetensors"))
    with pytest.raises(CheckpointError, match="unknown expert format 'other'"):
        load_expert(tmp_path)


@pytest.mark.parametrize("size", [0, 11])
def test_class_subset_zoo_subset_size_is_named(tmp_path, size):
    from modelatlas.probex.families import make_class_subset_zoo
    with pytest.raises(ConfigError, match=f"subset_size must be 1..10 .digits has 10 classes., got {size}"):
        make_class_subset_zoo(tmp_path, children=(2,), subset_size=size)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_loading_the_text_encoder_shows_no_bar_and_restores_the_setting(capsys):
    pytest.importorskip("sentence_transformers")
    hf_logging = pytest.importorskip("transformers.utils.logging")
    from modelatlas.probex import text_encoder

    text_encoder._model.cache_clear()  # load it here, whatever other tests did
    hf_logging.enable_progress_bar()
    assert text_encoder.encode_texts(["a shirt"]).shape == (1, 384)
    assert "Loading weights" not in capsys.readouterr().err  # a progress bar in pipes and logs
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back


def test_a_torch_too_old_for_transformers_is_one_clear_error():
    """transformers 5 disables itself below torch 2.6 and then raised NameError: name 'nn' is not defined."""
    from modelatlas.probex.text_encoder import TextEncoderMissingError, _check_torch_for_transformers

    pytest.importorskip("transformers")
    _check_torch_for_transformers(lambda: True)
    with pytest.raises(TextEncoderMissingError, match=r"does not support the installed torch .*upgrade torch"):
        _check_torch_for_transformers(lambda: False)


def make_nan_x():
    x, y = torch.randn(12, 3, 4), torch.randint(0, 2, (12, 2))
    x[5, 1, 2], x[9, 0, 0] = float("nan"), float("inf")
    return x, y


def test_fit_and_predict_refuse_nan_weights_naming_the_model():
    from modelatlas.probex import ProbeXClassifier

    x, y = make_nan_x()
    cfg = ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1)
    with pytest.raises(ConfigError, match=r"^ProbeXClassifier.fit: models 5, 9 of X hold NaN or inf weights"):
        ProbeXClassifier(cfg).fit(x, y)
    with pytest.raises(ConfigError, match=r"^ProbeXTextAligner.fit: models 5, 9 of X hold NaN or inf"):
        ProbeXTextAligner(cfg).fit(x, [0, 1] * 6, torch.randn(2, 4))
    expert = ProbeXClassifier(cfg).fit(x[:5], y[:5])
    with pytest.raises(ConfigError, match=r"expert for layer '': models 0, 4 of X hold NaN or inf weights"):
        expert.predict_proba(x[5:10])
    with pytest.raises(ConfigError, match=r"model 0 of X holds NaN or inf weights \(a diverged .*\); drop it$"):
        expert.predict(x[9])


def test_router_refuses_nan_at_fit_and_names_it_at_route():
    x, _ = make_nan_x()
    with pytest.raises(ConfigError, match="router fit: model 5 of X holds NaN or inf weights"):
        TreeRouter().fit(x, ["a"] * 12)
    routes = TreeRouter().fit(x[:5], ["a"] * 5).route(x[4:6], ["ok", "bad"])
    assert routes[0].reason is None and not routes[1].known
    assert routes[1].message() == "bad: not routed (its weights hold NaN or inf values: a diverged or corrupt checkpoint)"


def test_training_on_a_zoo_with_a_nan_model_names_it(tmp_path):
    recs = [ModelRecord("r", "r.safetensors", None, "r")]
    save_file({"w": torch.randn(3, 3)}, str(tmp_path / "r.safetensors"))
    for i in range(10):
        w = torch.randn(3, 3)
        if i == 6:
            w[1, 1] = float("inf")
        save_file({"w": w}, str(tmp_path / f"c{i}.safetensors"))
        recs.append(ModelRecord(f"c{i}", f"c{i}.safetensors", "r", "r", task={"classes": [i % 2]}))
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    for layer in ("w", "auto"):
        with pytest.raises(CheckpointError, match=r"c6\.safetensors: tensor 'w' holds NaN or inf values"):
            train_tree_experts(tmp_path, tmp_path / "out", layer=layer, config=ProbeXConfig(epochs=1))


def test_a_family_zoo_records_digests_that_zoo_verify_checks(tmp_path):
    from modelatlas.probex.families import make_class_subset_zoo
    from modelatlas.zoo.manifest import load_manifest
    from modelatlas.zoo.store import verify_zoo

    make_class_subset_zoo(tmp_path, children=(2,), hidden=8, ft_steps=(2, 3))
    manifest = load_manifest(tmp_path)
    assert set(verify_zoo(manifest).values()) == {"ok"}
    (tmp_path / manifest.models[1].path).write_bytes(b"tampered")
    assert verify_zoo(manifest)[manifest.models[1].name] == "changed"


@pytest.mark.parametrize("key,edit,message", [
    ("radii", lambda t: t[:1], r"radii must hold one radius per tree \(2\); got shape \(1,\)"),
    ("centroids", lambda t: t.fill_(float("nan")), r"tensor 'centroids' holds NaN or inf values"),
    ("radii", lambda t: t.fill_(-1.0), r"radii must be >= 0"),
])
def test_router_load_refuses_damaged_centroids_or_radii(tmp_path, key, edit, message):
    """One radius for two trees was an IndexError at route time; NaN centroids sent every model to no tree with
    'at distance nan' as the reason."""
    from safetensors.torch import load_file

    TreeRouter().fit(torch.randn(4, 2, 2), ["a", "a", "b", "b"]).save(tmp_path)
    tensors = load_file(str(tmp_path / "router.safetensors"))
    tensors[key] = edit(tensors[key])
    save_file(tensors, str(tmp_path / "router.safetensors"))
    with pytest.raises(CheckpointError, match=r"router\.safetensors: " + message):
        TreeRouter.load(tmp_path)


def test_layer_auto_on_models_without_a_weight_matrix_says_so(tmp_path):
    """--layer auto on models holding only vectors picked from no candidate: max() of an empty dict, a
    ValueError traceback."""
    save_file({"b": torch.zeros(4), "w": torch.zeros(1, 4)}, str(tmp_path / "r.safetensors"))
    recs = [ModelRecord("r", "r.safetensors", None, "r")]
    recs += [ModelRecord(f"c{i}", "r.safetensors", "r", "r", task={"classes": [0]}) for i in range(12)]
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    with pytest.raises(ConfigError, match=r"r\.safetensors holds no weight matrix .*--layer auto.*pass --layer"):
        train_tree_experts(tmp_path, tmp_path / "out")
