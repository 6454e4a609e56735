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


def test_too_few_models_per_tree(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "r.safetensors"))
    recs = [ModelRecord("r", "r.safetensors", None, "r")]
    recs += [ModelRecord(f"c{i}", "r.safetensors", "r", "r", task={"classes": [0]}) for i in range(3)]
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="no tree has >= 10 labelled models"):
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
