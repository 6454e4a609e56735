import torch

from modelatlas.zoo import arch_config, build_model
from modelatlas.zoo.architectures import lora_targets


def test_forward_shapes():
    for arch, shape in [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("vit", (1, 8, 8)), ("vit", (1, 28, 28))]:
        sizes = {"patch_size": 7} if shape[1] == 28 else {}
        model = build_model(arch_config(arch, shape, 10, **sizes))
        assert model(torch.rand(3, *shape)).shape == (3, 10)


def test_mlp_has_square_hidden_layers():
    sd = build_model(arch_config("mlp", (1, 8, 8), 10, hidden=16, n_hidden=3)).state_dict()
    assert [tuple(sd[f"layers.{i}.weight"].shape) for i in range(3)] == [(16, 16)] * 3


def test_vit_uses_hugging_face_names():
    model = build_model(arch_config("vit", (1, 8, 8), 10, hidden=16, n_layers=2, n_heads=2))
    sd = model.state_dict()
    for key in ["vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.cls_token",
                "vit.embeddings.position_embeddings", "vit.layernorm.weight", "classifier.weight"]:
        assert key in sd
    for i in range(2):
        p = f"vit.encoder.layer.{i}."
        for name in ["attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"]:
            assert p + name + ".weight" in sd and p + name + ".bias" in sd
        assert sd[p + "attention.attention.value.weight"].shape == (16, 16)
        assert p + "layernorm_before.weight" in sd and p + "layernorm_after.weight" in sd
    assert "vit.encoder.layer.1.attention.attention.value" in lora_targets(model)
