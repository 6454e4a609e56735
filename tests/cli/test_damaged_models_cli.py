"""A folder of good models and damaged ones of every format through `atlas lineage recover`: each damaged model
is reported on one line and skipped, the run completes (the damage: tests/weights/fuzz_damage.py)."""

import io
import json
import struct
import zipfile

import torch
from safetensors.torch import save_file

from modelatlas.cli.main import main
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_as_torch(path, tensors):
    torch.save(dict(tensors), path)


def make_as_sharded(folder, tensors):
    folder.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / shard))
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_as_onnx(path, tensors):
    import onnx
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(v.numpy(), k) for k, v in tensors.items()]
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    onnx.save_model(helper.make_model(graph), str(path))


def make_as_gguf(path, tensors):
    from modelatlas.zoo.gguf import save_gguf

    save_gguf(path, {k: v.numpy() for k, v in tensors.items()})


def make_cut_storage(path):
    """A torch zip whose last tensor's storage member is cut in half (the zip itself consistent)."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    last = max(m for m in members if "/data/" in m)
    members[last] = members[last][: len(members[last]) // 2]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    path.write_bytes(buf.getvalue())


def make_cut_raw(path):
    """An ONNX file whose last initializer's raw bytes are cut in half."""
    import onnx

    model = onnx.load(str(path))
    init = model.graph.initializer[-1]
    init.raw_data = init.raw_data[: len(init.raw_data) // 2]
    onnx.save_model(model, str(path))


def make_lying_length(path):
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**64 - 1)
    path.write_bytes(bytes(data))


def make_damaged_zoo(zoo, tensors):
    """Damaged models of ``tensors``, each named for its damage; returns their names."""
    save_file(tensors, str(zoo / "bad-length.safetensors"))
    make_lying_length(zoo / "bad-length.safetensors")
    (zoo / "bad-folder.safetensors").mkdir()
    (zoo / "bad-folder.safetensors" / "x").write_bytes(b"1")
    (zoo / "bad-empty.pt").write_bytes(b"")
    make_as_torch(zoo / "bad-storage.pt", tensors)
    make_cut_storage(zoo / "bad-storage.pt")
    make_as_torch(zoo / "bad-cut.pt", tensors)
    (zoo / "bad-cut.pt").write_bytes((zoo / "bad-cut.pt").read_bytes()[:700])
    make_as_sharded(zoo / "bad-shard", tensors)
    shard = zoo / "bad-shard" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    make_as_sharded(zoo / "bad-index", tensors)
    (zoo / "bad-index" / "model.safetensors.index.json").write_text('{"weight_map": {"attn.q": 7}}')
    adapter = zoo / "bad-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "x", "lora_alpha": 4}))
    save_file({"base_model.model.attn.q.lora_A.weight": torch.ones(2, 32),
               "base_model.model.attn.q.lora_B.weight": torch.ones(32, 2)}, str(adapter / "adapter_model.safetensors"))
    names = ["bad-length", "bad-folder", "bad-empty", "bad-storage", "bad-cut", "bad-shard", "bad-index", "bad-adapter"]
    if _has("onnx"):
        make_as_onnx(zoo / "bad-raw.onnx", tensors)
        make_cut_raw(zoo / "bad-raw.onnx")
        (zoo / "bad-proto.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
        names += ["bad-raw", "bad-proto"]
    if _has("gguf"):
        make_as_gguf(zoo / "bad-gguf.gguf", tensors)
        (zoo / "bad-gguf.gguf").write_bytes((zoo / "bad-gguf.gguf").read_bytes()[:-100])
        names += ["bad-gguf"]
    return names


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_each_damaged_model_in_a_folder_is_one_line_and_skipped(tmp_path, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    weights, _ = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    for name, tensors in weights.items():
        save_file(tensors, str(zoo / f"{name}.safetensors"))
    (zoo / "t1_1.safetensors").unlink()  # a model folder whose mergekit config is damaged: read, its note a problem
    (zoo / "t1_1").mkdir()
    save_file(weights["t1_1"], str(zoo / "t1_1" / "model.safetensors"))
    (zoo / "t1_1" / "mergekit_config.yml").write_text("merge_method: ties\nmodels: [{model: a, parameters: "
                                                       "{weight: 1" + "0" * 400 + "}}]\nslices: 5\n")
    bad = make_damaged_zoo(zoo, weights["t0"])
    code = main(["lineage", "recover", str(zoo), "--out", str(tmp_path / "forest.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.err.splitlines() if "bad-" in line]
    for name in bad:
        assert sum(name in line for line in lines) == 1, (name, captured.err)
    forest = json.loads((tmp_path / "forest.json").read_text())
    assert set(forest["nodes"]) == set(weights)
    assert len(forest["skipped"]) == len(bad)
