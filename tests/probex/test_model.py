import pytest
import torch

from modelatlas.errors import ConfigError
from modelatlas.probex import DenseNet, ProbeXConfig, ProbeXNet, as_matrix, count_parameters


def test_probex_parameter_count_by_hand():
    net = ProbeXNet(d_h=12, d_w=10, d_y=4, rank_u=3, rank_v=5, rank_t=7)
    # U 10*3 + V 12*5 + encoders 3*5*7 + bias 7 + head 7*4 + bias 4
    assert count_parameters(net) == 30 + 60 + 105 + 7 + 28 + 4 == 234


def test_paper_count_768_layer():
    net = ProbeXNet(d_h=768, d_w=768, d_y=100, rank_u=128, rank_v=128, rank_t=128)
    paper = 768 * 128 + 768 * 128 + 128**3 + 128 * (100 + 1)  # the paper's formula (no head bias)
    assert count_parameters(net) == paper + 100
    assert abs(paper - 2.3e6) < 0.1e6


def test_dense_parameter_count_by_hand():
    assert count_parameters(DenseNet(12, 10, 4)) == 12 * 10 * 4 + 4


def test_forward_shapes_batched():
    x = torch.randn(5, 12, 10)
    net = ProbeXNet(12, 10, 4, 3, 5, 7)
    assert net(x).shape == (5, 4)
    assert net.embed(x).shape == (5, 7)
    assert DenseNet(12, 10, 4)(x).shape == (5, 4)


def test_probex_matches_formula():
    net = ProbeXNet(4, 3, 2, 2, 2, 2)
    x = torch.randn(1, 4, 3)
    z = torch.relu(net.projection.T @ x[0] @ net.probes)  # (r_V, r_U): column l is ReLU(V^T X u_l)
    e = net.encoder.weight @ z.T.reshape(-1) + net.encoder.bias
    assert torch.allclose(net.embed(x)[0], e, atol=1e-6)


def test_as_matrix_conv_and_refuses_vector():
    assert as_matrix(torch.zeros(8, 3, 3, 3)).shape == (8, 27)
    with pytest.raises(ConfigError, match="'bias'.*pick a weight"):
        as_matrix(torch.zeros(8), "bias")


@pytest.mark.parametrize("field,value", [("rank_u", 0), ("model", "mlp"), ("lr", 0.0), ("val_fraction", 1.0)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ProbeXConfig(**{field: value})


def test_load_layer_reads_lora_update_and_conv(tmp_path):
    import json

    from safetensors.torch import save_file

    from modelatlas.probex import load_layer

    a, b = torch.randn(2, 5), torch.randn(6, 2)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    x = load_layer([folder], "fc.weight")
    assert x.shape == (1, 6, 5) and torch.allclose(x[0], 2.0 * b @ a, atol=1e-6)  # dW = (alpha / r) B A
    save_file({"conv.weight": torch.randn(8, 3, 3, 3)}, str(tmp_path / "c.safetensors"))
    assert load_layer([tmp_path / "c.safetensors"], "conv.weight").shape == (1, 8, 27)
    # with the base it adapts: the merged layer W + dW; a full model among the paths is read as itself
    from modelatlas.weights import open_checkpoint

    w = torch.randn(6, 5)
    save_file({"fc.weight": w}, str(tmp_path / "base.safetensors"))
    with open_checkpoint(tmp_path / "base.safetensors") as base:
        x = load_layer([folder, tmp_path / "base.safetensors"], "fc.weight", adapter_base=base)
    assert torch.allclose(x[0], w + 2.0 * b @ a, atol=1e-6) and torch.equal(x[1], w)


def test_absurd_ranks_are_refused_before_allocating():
    """--rank 100000 asked for 10**15 encoder weights: an allocator traceback, now one line naming --rank."""
    from modelatlas.probex.model import build_network

    with pytest.raises(ConfigError, match=r"r_U=100000.*1,000,000,000,000,000 encoder weights.*--rank"):
        build_network("probex", 4, 4, 2, ProbeXConfig(rank_u=100000, rank_v=100000, rank_t=100000))
    assert count_parameters(build_network("probex", 4, 4, 2, ProbeXConfig(rank_u=2, rank_v=2, rank_t=2))) > 0


def test_ranks_whose_training_does_not_fit_in_memory_are_refused_first(monkeypatch, tmp_path):
    """--rank 1290 passed the weight limit and needed ~34 GB to train on a 23 GB machine: the system killed the
    process without a word. Now one line, before any model is read; loading a trained expert is not checked."""
    import numpy as np

    import modelatlas.allocator as allocator
    from modelatlas.probex import ProbeXClassifier
    from modelatlas.probex.experts import train_tree_experts

    monkeypatch.setattr(allocator, "available_memory", lambda: 1000 * 16 - 1)  # one byte short of 10^3 weights x 16 bytes
    cfg = ProbeXConfig(rank_u=10, rank_v=10, rank_t=10, epochs=1)
    x, y = np.zeros((4, 3, 3), dtype=np.float32), np.eye(2)[[0, 1, 0, 1]]
    with pytest.raises(ConfigError, match=r"r_U=10, r_V=10, r_T=10 need 1,000 encoder weights, about 0.0 GiB to "
                                          r"train .*, more than the 0.0 GiB of memory available; lower them \(--rank\)"):
        ProbeXClassifier(cfg).fit(x, y)
    with pytest.raises(ConfigError, match="memory available"):  # before the manifest is even opened
        train_tree_experts(tmp_path / "no-such-manifest.json", tmp_path / "out", config=cfg)
    monkeypatch.setattr(allocator, "available_memory", lambda: 1000 * 16)
    expert = ProbeXClassifier(cfg).fit(x, y)
    expert.save(tmp_path / "expert")
    monkeypatch.setattr(allocator, "available_memory", lambda: 1)
    from modelatlas.probex import load_expert

    assert load_expert(tmp_path / "expert").predict_proba(x).shape == (4, 2)
    monkeypatch.setattr(allocator, "available_memory", lambda: None)  # unknown: not refused
    ProbeXClassifier(cfg).fit(x, y)
