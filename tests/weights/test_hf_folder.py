import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_byte_counter

from modelatlas.errors import CheckpointError, TensorNotFoundError
from modelatlas.weights import discover_models, model_name, open_checkpoint

TENSORS = {"embed.weight": torch.arange(12.0).reshape(4, 3), "head.weight": torch.ones(2, 3),
           "head.bias": torch.zeros(2)}


def make_sharded(folder, kind="safetensors"):
    """Two shards + index; shard 2 holds the head."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = "safetensors" if kind == "safetensors" else "bin"
    prefix = "model" if kind == "safetensors" else "pytorch_model"
    shards = {f"{prefix}-00001-of-00002.{ext}": ["embed.weight"],
              f"{prefix}-00002-of-00002.{ext}": ["head.weight", "head.bias"]}
    for shard, names in shards.items():
        part = {n: TENSORS[n] for n in names}
        save_file(part, str(folder / shard)) if ext == "safetensors" else torch.save(part, folder / shard)
    weight_map = {n: shard for shard, names in shards.items() for n in names}
    (folder / f"{prefix}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def check_model(ck, name):
    assert ck.name == name
    assert {t.name: t.shape for t in ck.tensors()} == {k: tuple(v.shape) for k, v in TENSORS.items()}
    for k, v in TENSORS.items():
        assert torch.equal(ck.read(k), v)


def test_single_safetensors_and_bin(tmp_path):
    (tmp_path / "st").mkdir()
    save_file(TENSORS, str(tmp_path / "st" / "model.safetensors"))
    (tmp_path / "st" / "config.json").write_text("{}")
    (tmp_path / "pt").mkdir()
    torch.save(TENSORS, tmp_path / "pt" / "pytorch_model.bin")
    for name in ("st", "pt"):
        with open_checkpoint(tmp_path / name) as ck:
            assert ck.format == "hf-folder"
            check_model(ck, name)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_reads_from_one_shard(tmp_path, kind):
    folder = make_sharded(tmp_path / "big-model", kind)
    with open_checkpoint(folder) as ck:
        assert torch.equal(ck.read("head.bias"), torch.zeros(2))
        assert len(ck._shards) == 1  # only the head's shard was opened
        check_model(ck, "big-model")


def test_missing_shard_is_named(tmp_path):
    folder = make_sharded(tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: shard "
                                              r"'model-00002-of-00002\.safetensors' listed in the index is missing"):
        open_checkpoint(folder)


def test_index_lies_about_a_tensor(tmp_path):
    folder = make_sharded(tmp_path / "m")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="index puts tensor 'ghost.weight' in shard"):
        open_checkpoint(folder).tensors()


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt shard index"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": {"a": "../outside.safetensors"}}', "must be a file name in the same folder"),
    ('{"weight_map": {"a": "/etc/passwd"}}', "bad shard file '/etc/passwd' for tensor 'a': must be a file name"),
    ("[" * 100_000 + "]" * 100_000, "corrupt shard index: JSON nested too deeply"),  # was RecursionError
    ('{"weight_map": ' + "9" * 5000 + "}", "corrupt shard index: Exceeds the limit"),  # was ValueError
    # json keeps the last of two entries for a tensor, another reader the first: two tools, two tensors
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "corrupt shard index: key 'a' appears twice"),
])
def test_corrupt_index(tmp_path, content, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(tmp_path / "m")
    assert "\n" not in str(info.value)


def test_corrupt_single_file_fails_at_open(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x05" * 20)
    with pytest.raises(CheckpointError, match=r"m/model\.safetensors: corrupt"):
        open_checkpoint(tmp_path / "m")


def test_discover_model_folders(tmp_path):
    make_sharded(tmp_path / "zoo" / "b")
    (tmp_path / "zoo" / "a").mkdir()
    save_file(TENSORS, str(tmp_path / "zoo" / "a" / "model.safetensors"))
    (tmp_path / "zoo" / "notes").mkdir()
    assert [p.name for p in discover_models([tmp_path / "zoo"])] == ["a", "b"]
    assert discover_models([tmp_path / "zoo" / "b"]) == [tmp_path / "zoo" / "b"]


def test_prefetch_goes_to_the_shard_and_never_fails(tmp_path):
    folder = make_sharded(tmp_path / "model")
    ck = open_checkpoint(folder)
    ck.prefetch("head.weight")
    ck.prefetch("missing")
    assert torch.equal(ck.read("head.weight"), TENSORS["head.weight"])
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"junk")  # a bad shard not opened yet
    ck.prefetch("embed.weight")  # reported by the read, not by the hint
    with pytest.raises(CheckpointError):
        ck.read("embed.weight")


def test_current_folder_is_named_after_itself(tmp_path, monkeypatch):
    folder = make_sharded(tmp_path / "big-model")
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder / "sub")
    with open_checkpoint("..") as ck:
        assert ck.name == "big-model"
    monkeypatch.chdir(folder)
    with open_checkpoint(".") as ck:
        assert ck.name == "big-model" and model_name(".") == "big-model"


def test_a_file_of_a_model_folder_given_alone_names_the_folder(tmp_path):
    from modelatlas.errors import UnknownFormatError

    folder = tmp_path / "run"
    folder.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    for call in (open_checkpoint, lambda p: discover_models([p])):  # was "unknown checkpoint format", no more
        with pytest.raises(UnknownFormatError, match=rf"config.json: unknown checkpoint format.*; config.json is part "
                                                     rf"of the model folder {folder}: give the folder$"):
            call(folder / "config.json")


def test_a_folder_saved_with_a_variant_is_one_model(tmp_path):
    # save_pretrained(variant="fp16") names its files model.fp16.safetensors, model.safetensors.index.fp16.json
    # and model.fp16-00001-of-00002.safetensors: such a folder was "config.json but no weights file"
    single = tmp_path / "zoo" / "single"
    single.mkdir(parents=True)
    save_file(TENSORS, str(single / "model.fp16.safetensors"))
    (single / "config.json").write_text("{}")
    sharded = make_sharded(tmp_path / "zoo" / "sharded")
    for shard in ("model-00001-of-00002", "model-00002-of-00002"):
        (sharded / f"{shard}.safetensors").rename(sharded / f"{shard.replace('model', 'model.fp16')}.safetensors")
    index = sharded / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-", "model.fp16-"))
    index.rename(sharded / "model.safetensors.index.fp16.json")
    (sharded / "config.json").write_text("{}")
    assert [p.name for p in discover_models([tmp_path / "zoo"])] == ["sharded", "single"]
    for name in ("single", "sharded"):
        with open_checkpoint(tmp_path / "zoo" / name) as ck:
            assert ck.format == "hf-folder"
            check_model(ck, name)
    (single / "config.json").unlink()  # a folder of models, one of them model.fp16: not one model
    assert discover_models([single]) == [single / "model.fp16.safetensors"]


def test_a_folder_with_two_variants_names_them(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for variant in ("fp16", "bf16"):
        save_file(TENSORS, str(folder / f"model.{variant}.safetensors"))
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds the variants model\.bf16\.safetensors, model\.fp16\."
                                              r"safetensors and no model\.safetensors: give one of the files"):
        open_checkpoint(folder)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_sharded_folder_named_by_bytes_that_are_not_utf8_is_read(tmp_path, non_utf8_name, kind):
    """Its shards' readers take paths inside the folder: each was refused (safetensors) or "corrupt" (torch)."""
    with open_checkpoint(make_sharded(tmp_path / non_utf8_name, kind)) as ck:
        check_model(ck, non_utf8_name)


def test_files_are_the_weight_files_read(tmp_path):
    """The index and its shards; not a second copy of the weights in another format, nor other files."""
    folder = make_sharded(tmp_path / "big-model")
    torch.save(TENSORS, folder / "pytorch_model.bin")
    (folder / "README.md").write_text("a model")
    with open_checkpoint(folder) as ck:
        assert ck.files() == [folder / "model.safetensors.index.json", folder / "model-00001-of-00002.safetensors",
                              folder / "model-00002-of-00002.safetensors"]
        assert ck.stored_tensors() == ck.tensors()
    (tmp_path / "one").mkdir()
    save_file(TENSORS, str(tmp_path / "one" / "model.safetensors"))
    with open_checkpoint(tmp_path / "one") as ck:
        assert ck.files() == [tmp_path / "one" / "model.safetensors"]


def test_read_rows_of_a_sharded_folder_reads_rows_of_its_shard(tmp_path, monkeypatch):
    with open_checkpoint(make_sharded(tmp_path / "m")) as ck:
        got = make_byte_counter(monkeypatch)
        assert ck.read_rows("embed.weight", torch.tensor([3, 1])).tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]
        assert got == {"model-00001-of-00002.safetensors": 2 * 3 * 4}  # two rows of 3 float32, one shard
        with pytest.raises(TensorNotFoundError, match="no tensor named 'x'"):
            ck.read_rows("x", torch.tensor([0]))
