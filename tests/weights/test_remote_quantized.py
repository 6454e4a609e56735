"""Quantized models read over HTTP take their settings from the config.json beside them, as local folders do
(modelatlas.weights.remote.remote_quantization_config), from a server on 127.0.0.1 only."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_mlx
from tests.weights.http_server import make_server

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.awq import awq_layer, save_folder

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm", "zero_point": True}


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)


def make_weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))


def check_same(remote, local) -> None:
    """The model over HTTP reads as its local copy: tensors, quantization types and values."""
    assert [(t.name, t.shape, t.dtype) for t in remote.tensors()] == [(t.name, t.shape, t.dtype) for t in local.tensors()]
    for t in local.tensors():
        assert remote.quantization(t.name) == local.quantization(t.name)
        assert torch.equal(remote.read(t.name), local.read(t.name))


def test_an_awq_folder_over_http_reads_as_the_local_folder(tmp_path):
    save_folder(tmp_path / "awq", {**awq_layer(make_weight()), "norm.weight": torch.ones(32)}, AWQ)
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("awq/model.safetensors")) as ck:
        with open_checkpoint(tmp_path / "awq") as local:
            assert local.quantization("layer.weight") == "AWQ-INT4"  # (without its config: words read as ints)
            check_same(ck, local)
        assert [p for p, _ in srv.seen].count("/awq/config.json") == 1  # once, and only because it is quantized


def test_an_mlx_model_and_a_sharded_one_read_their_folders_config(tmp_path):
    folder = tmp_path / "mlx"
    folder.mkdir()
    x = make_weight(1)
    save_file(make_mlx(x, 4, 32), folder / "model-00001-of-00001.safetensors")
    weight_map = {n: "model-00001-of-00001.safetensors" for n in make_mlx(x, 4, 32)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"quantization": {"group_size": 32, "bits": 4}}))
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("mlx/model.safetensors.index.json")) as ck:
        with open_checkpoint(folder) as local:
            assert local.quantization("a.weight") == "MLX-4BIT"
            check_same(ck, local)


def test_a_lone_file_or_a_folder_without_config_reads_as_locally(tmp_path):
    tensors = {**awq_layer(make_weight()), "norm.weight": torch.ones(32)}
    save_folder(tmp_path / "bare", tensors)  # model.safetensors, no config.json: the words stay as stored
    save_file(tensors, tmp_path / "awq.safetensors")  # a lone file reads no folder's config
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": AWQ}))
    with make_server(tmp_path) as srv:
        for name, local in (("bare/model.safetensors", tmp_path / "bare"), ("awq.safetensors", tmp_path / "awq.safetensors")):
            with open_checkpoint(srv.url(name)) as ck, open_checkpoint(local) as here:
                assert here.quantization("layer.qweight") is None
                check_same(ck, here)
        asked = [p for p, _ in srv.seen if not p.endswith(".safetensors")]
        assert asked == ["/bare/config.json", "/bare/quantize_config.json", "/bare/quantization_config.json"]


def test_a_bad_remote_config_is_named_by_its_url(tmp_path):
    save_folder(tmp_path / "awq", awq_layer(make_weight()), AWQ)
    (tmp_path / "awq" / "config.json").write_text("[1, 2]")
    with make_server(tmp_path) as srv, pytest.raises(CheckpointError) as e:
        open_checkpoint(srv.url("awq/model.safetensors"))
    assert str(e.value) == srv.url("awq/config.json") + ": not a JSON object"
