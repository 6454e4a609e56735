import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError
from modelatlas.weights import discover_models, open_checkpoint, open_many
from modelatlas.weights.registry import formats, unique_names


def make_zoo(folder, n_good=4):
    """n_good models in four formats, plus one corrupt file and one unsafe pickle."""
    folder.mkdir()
    for i in range(n_good):
        sd = {"w": torch.full((2,), float(i))}
        if i % 2:
            torch.save(sd, folder / f"m{i}.pt")
        else:
            (folder / f"m{i}").mkdir()
            save_file(sd, str(folder / f"m{i}" / "model.safetensors"))
    (folder / "m9-corrupt.safetensors").write_bytes(b"\x10" + b"\x00" * 20)
    torch.save({"net": torch.nn.Linear(1, 1)}, folder / "m8-unsafe.pth")
    return folder


def test_open_many_reports_and_skips_bad_models(tmp_path):
    paths = discover_models([make_zoo(tmp_path / "zoo")])
    assert len(paths) == 6
    reported = []
    models = open_many(paths, on_error=lambda p, msg: reported.append(p.name))
    names = []
    for ck in models:
        with ck:
            names.append(ck.name)
            assert ck.read("w").shape == (2,)
    assert names == ["m0", "m1", "m2", "m3"]
    assert reported == ["m8-unsafe.pth", "m9-corrupt.safetensors"]
    assert [p.name for p, _ in models.skipped] == reported
    assert "refused to unpickle" in models.skipped[0][1]
    assert all("\n" not in msg and str(p) in msg for p, msg in models.skipped)


def test_open_many_skips_missing_paths(tmp_path):
    models = open_many([tmp_path / "gone.pt"])
    assert list(models) == []
    assert models.skipped == [(tmp_path / "gone.pt", f"{tmp_path / 'gone.pt'}: no such file or folder")]


def test_all_formats_registered():
    assert set(formats()) >= {"safetensors", "torch", "hf-folder", "peft-lora", "onnx", "gguf"}


def test_base_option_only_for_adapters(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1)}, str(p))
    with pytest.raises(CheckpointError, match=r"m\.safetensors: option\(s\) base do not apply to a safetensors"):
        open_checkpoint(p, base=p)
    with open_checkpoint(p, base=None) as ck:  # None means "not given"
        assert ck.keys() == ["w"]


@pytest.mark.parametrize("marker", ["atlas.json", "synthetic.json"])
def test_a_modelatlas_output_folder_is_not_taken_for_a_folder_of_models(tmp_path, marker):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "embeddings.safetensors"))
    (tmp_path / marker).write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a folder of models"):
        discover_models([tmp_path])
    (tmp_path / marker).unlink()
    assert discover_models([tmp_path]) == [tmp_path / "embeddings.safetensors"]


def test_a_missing_tensor_names_the_closest_ones(tmp_path):
    from modelatlas.errors import TensorNotFoundError

    save_file({"layers.0.weight": torch.zeros(2, 2), "layers.0.bias": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with open_checkpoint(tmp_path / "m.safetensors") as ck, pytest.raises(TensorNotFoundError) as e:
        ck.info("layers.1.weight")
    assert str(e.value).endswith("no tensor named 'layers.1.weight' (2 tensors; closest: layers.0.weight, layers.0.bias)")


def test_a_model_reached_twice_is_discovered_once(tmp_path, monkeypatch):
    """``atlas lineage recover models/ models/a.safetensors`` (or ``./a`` and ``a``, or a symlink) named the
    same model twice, which was then refused as two models of one name."""
    (tmp_path / "models").mkdir()
    for name in ("a", "b"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / "models" / f"{name}.safetensors"))
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "models" / "b.safetensors")
    monkeypatch.chdir(tmp_path)
    found = discover_models(["models/a.safetensors", "models", "./models/a.safetensors", "link.safetensors"])
    assert found == [Path("models/a.safetensors"), Path("models/b.safetensors")]


def test_unique_names_go_up_as_many_folders_as_needed(tmp_path):
    from modelatlas.weights import unique_names

    a, b = tmp_path / "x" / "run" / "ck.pt", tmp_path / "y" / "run" / "ck.pt"
    assert unique_names([a, b, tmp_path / "other.pt"]) == ["x/run/ck", "y/run/ck", "other"]


def test_a_model_folder_no_reader_opens_is_reported_not_dropped(tmp_path):
    from modelatlas.errors import UnknownFormatError

    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "config.json").write_text("{}")  # the user's own: a folder of models may hold one
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")  # a download without its weights
    (tmp_path / "run").mkdir()
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "run" / "model.pt")
    (tmp_path / "notes").mkdir()
    found = discover_models([tmp_path])  # was [a.safetensors]: the other two left out without a word
    assert found == [tmp_path / "a.safetensors", tmp_path / "partial", tmp_path / "run" / "model.pt"]
    assert discover_models([tmp_path / "run"]) == [tmp_path / "run" / "model.pt"]  # as when given alone
    with pytest.raises(UnknownFormatError, match=r"partial: has config.json but no weights file \(model.safetensors"):
        open_checkpoint(tmp_path / "partial")
    with pytest.raises(UnknownFormatError, match=r"run: a folder holding model.pt, but .* give the file .*run/model.pt$"):
        open_checkpoint(tmp_path / "run")
    assert discover_models([tmp_path / "partial"]) == [tmp_path / "partial"]  # alone: opening it says why
    assert discover_models(found) == found  # a second expansion of the result (atlas index build makes one)


def test_files_of_one_folder_that_differ_in_extension_keep_it(tmp_path):
    from modelatlas.weights import unique_names

    # no parent folder tells these apart: their names went up to "/" and lineage refused them as one name
    a, b, c = tmp_path / "x" / "a.pt", tmp_path / "x" / "a.safetensors", tmp_path / "y" / "a.pt"
    assert unique_names([a, b, c]) == ["a.pt", "a.safetensors", "a"]
    r = tmp_path / "run"
    assert unique_names([r / "model.safetensors", r / "pytorch_model.bin"]) == ["run/model.safetensors",
                                                                               "run/pytorch_model.bin"]


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin", "adapter_model.safetensors"])
def test_a_library_file_name_is_named_by_its_folder(tmp_path, file):
    from modelatlas.weights import model_name, unique_names

    a, b = tmp_path / "sweep1" / "lr3e-4" / file, tmp_path / "sweep2" / "lr3e-4" / file
    assert model_name(a) == "lr3e-4" and model_name(Path("/") / file) == file.split(".")[0]
    assert model_name(tmp_path / "model") == "model"  # a folder named model keeps its name
    assert unique_names([a, b, tmp_path / "c" / file]) == ["sweep1/lr3e-4", "sweep2/lr3e-4", "c"]


def test_a_model_folder_and_its_library_file_are_one_model(tmp_path):
    for run in ("a", "b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        save_file({"w": torch.ones(2, 2)}, str(tmp_path / "runs" / run / "model.safetensors"))
    got = discover_models([tmp_path / "runs", tmp_path / "runs" / "a" / "model.safetensors"])
    assert got == [tmp_path / "runs" / "a", tmp_path / "runs" / "b"]
    alone = discover_models([tmp_path / "runs" / "a" / "model.safetensors", tmp_path / "runs" / "b"])
    assert alone == [tmp_path / "runs" / "a" / "model.safetensors", tmp_path / "runs" / "b"]  # first kept


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daa"
               "a5e2ca24d17e2393\nsize 548105171\n")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".gguf", ".onnx"])
def test_a_git_lfs_pointer_is_named_as_such(tmp_path, suffix):
    if suffix in (".gguf", ".onnx"):
        pytest.importorskip(suffix[1:])
    p = tmp_path / f"m{suffix}"
    p.write_text(LFS_POINTER)  # a clone without Git LFS: was "header length 2336927755350992246", "operand 118"
    with pytest.raises(CheckpointError, match=rf"m\{suffix}: a Git LFS pointer file, not the weights .*git lfs pull"):
        open_checkpoint(p).tensors()


HTML_PAGE = "\n  <!DOCTYPE html>\n<html class=''><head><title>pytorch_model.bin</title></head><body>" + "x" * 600


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".gguf", ".onnx"])
def test_a_web_page_saved_as_weights_is_named_as_such(tmp_path, suffix):
    """wget of a Hugging Face '/blob/' link saves the page: was "corrupt or unsupported PyTorch pickle:
    Unsupported operand 10", "header length 2336927755350992246"."""
    if suffix in (".gguf", ".onnx"):
        pytest.importorskip(suffix[1:])
    p = tmp_path / f"m{suffix}"
    p.write_text(HTML_PAGE)
    with pytest.raises(CheckpointError, match=rf"m\{suffix}: an HTML page, not the weights .*'/resolve/' link"):
        open_checkpoint(p).tensors()


def test_shards_copied_without_their_index_are_one_unreadable_model(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    for i, name in enumerate(("a", "b")):  # `cp model/*.safetensors` leaves model.safetensors.index.json behind
        save_file({name: torch.ones(2, 2)}, str(folder / f"model-0000{i + 1}-of-00002.safetensors"))
    assert discover_models([folder]) == [folder] == discover_models([tmp_path])  # was two models, one per shard
    with pytest.raises(CheckpointError, match=r"llama: holds the shards model-00001-of-00002.safetensors, "
                                              r"model-00002-of-00002.safetensors of one model but no \*\.index\.json"):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    assert discover_models([tmp_path]) == [folder] and open_checkpoint(folder).keys() == ["a", "b"]


def test_an_unreadable_sub_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    # a sub-folder that cannot be listed (permissions; the tests run as root, so listing it is made to fail)
    # stopped the discovery of a whole folder of models with a PermissionError
    zoo = make_zoo(tmp_path / "zoo", n_good=2)
    (zoo / "locked").mkdir()
    listing = Path.iterdir

    def iterdir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    found = discover_models([zoo])
    assert zoo / "locked" in found
    with pytest.raises(CheckpointError, match="locked: cannot read: Permission denied"):
        open_checkpoint(zoo / "locked")
    opened = open_many(found)
    assert sorted(ck.name for ck in opened) == ["m0", "m1"]
    assert {p.name for p, _ in opened.skipped} == {"locked", "m8-unsafe.pth", "m9-corrupt.safetensors"}


@pytest.mark.parametrize("name, hint", [
    ("manifest.json", "manifest.json is a zoo's manifest, not a model: give the zoo folder"),
    ("atlas.json", "atlas.json is the index of an atlas (`atlas index build`), not a model: give the models'"),
])
def test_an_index_file_given_as_a_model_names_what_to_give(tmp_path, name, hint):
    (tmp_path / name).write_text("{}")  # it said only 'unknown checkpoint format'
    with pytest.raises(CheckpointError, match="unknown checkpoint format; " + hint.replace("(", r"\(").replace(")", r"\)")):
        discover_models([tmp_path / name])


def test_a_broken_link_in_a_folder_of_models_is_reported_not_dropped(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    save_file({"w": torch.zeros(2)}, str(zoo / "a.safetensors"))
    (zoo / "b.safetensors").symlink_to(tmp_path / "gone.safetensors")  # its target was moved or deleted
    (zoo / "c").symlink_to(tmp_path / "unmounted" / "run-c")  # a model folder on a disk that is not mounted
    (zoo / "notes.md").symlink_to(tmp_path / "gone.md")  # no model: left out, as a file would be
    paths = discover_models([zoo])
    assert [p.name for p in paths] == ["a.safetensors", "b.safetensors", "c"]
    models = open_many(paths)
    assert [ck.name for ck in models] == ["a"]
    assert models.skipped[1][1].endswith(f"a link to {tmp_path / 'unmounted' / 'run-c'}, which does not exist")
    assert models.skipped[0][1] == f"{zoo / 'b.safetensors'}: a link to {tmp_path / 'gone.safetensors'}, which " \
                                   "does not exist"


def test_a_broken_link_given_relative_is_named_as_a_link_not_as_a_hub_id(tmp_path, monkeypatch):
    # `atlas lineage recover zoo/` with zoo/run-c -> an unmounted disk: 'zoo/run-c' also reads as a hub id
    # org/name, and the error said it was not in the Hugging Face cache; a local path wins over a hub id
    monkeypatch.chdir(tmp_path)
    Path("zoo").mkdir()
    Path("zoo/run-c").symlink_to(tmp_path / "unmounted" / "run-c")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint("zoo/run-c")
    assert str(err.value) == f"zoo/run-c: a link to {tmp_path / 'unmounted' / 'run-c'}, which does not exist"


def test_a_broken_link_given_relative_is_named_by_its_own_name(tmp_path, monkeypatch):
    """`atlas lineage recover zoo` said 'skipped zoo/run-c: ...' beside 'skipped b: ...': the missing relative
    path read as the hub id zoo/run-c, whose name is that id."""
    monkeypatch.chdir(tmp_path)
    Path("zoo").mkdir()
    Path("zoo/run-c").symlink_to(tmp_path / "unmounted" / "run-c")
    assert unique_names([Path("zoo/run-c")]) == ["run-c"]


def test_a_variant_of_a_library_file_is_named_by_its_folder(tmp_path):
    # diffusers saves unet/diffusion_pytorch_model.fp16.safetensors beside unet/config.json: inside a folder of
    # models that unet was "config.json but no weights file", and given alone it was "diffusion_pytorch_model.fp16"
    zoo = tmp_path / "zoo"
    for run in ("sd-a", "sd-b"):
        (zoo / run).mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(zoo / run / "diffusion_pytorch_model.fp16.safetensors"))
        (zoo / run / "config.json").write_text("{}")
    paths = discover_models([zoo])
    assert [p.relative_to(zoo).as_posix() for p in paths] == ["sd-a/diffusion_pytorch_model.fp16.safetensors",
                                                              "sd-b/diffusion_pytorch_model.fp16.safetensors"]
    assert [ck.name for ck in open_many(paths)] == ["sd-a", "sd-b"]
    assert [ck.name for ck in open_many(discover_models([zoo / "sd-a"]))] == ["sd-a"]
    save_file({"w": torch.zeros(2)}, str(zoo / "sd-a" / "diffusion_pytorch_model.safetensors"))
    assert [p.name for p in discover_models([zoo])][0] == "diffusion_pytorch_model.safetensors"  # not both
    epochs = tmp_path / "epochs"  # model.1.pt, model.2.pt of one run, no library's config.json: their own names
    epochs.mkdir()
    for i in (1, 2):
        torch.save({"w": torch.zeros(2)}, epochs / f"model.{i}.pt")
    assert [ck.name for ck in open_many(discover_models([epochs]))] == ["model.1", "model.2"]


def test_variant_names_follow_transformers_add_variant():
    from modelatlas.weights.base import library_variant, variant_of

    assert variant_of("model.fp16.safetensors", "model.safetensors") == "fp16"
    assert variant_of("model.safetensors.index.bf16.json", "model.safetensors.index.json") == "bf16"
    assert variant_of("model.fp16-00001-of-00002.safetensors", "model.safetensors") is None  # a shard
    assert variant_of("model.safetensors", "model.safetensors") is None
    assert variant_of("pytorch_model.fp16.bin", "model.bin") is None
    assert library_variant("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert library_variant("model.safetensors") is None and library_variant("run.fp16.safetensors") is None
    assert library_variant("model.a.b.pt") is None


@pytest.mark.parametrize("saved, name, said", [
    ("torch", "m.safetensors", r"a PyTorch file \(what torch\.save writes\), not a safetensors file as its extension "
                               r"says: rename it to end in \.pt$"),
    ("torch-legacy", "m.safetensors", r"a PyTorch file .* rename it to end in \.pt$"),
    ("safetensors", "m.pt", r"a safetensors file, not a PyTorch file as its extension says: rename it to end in "
                            r"\.safetensors$"),
    ("safetensors", "m.bin", r"a safetensors file, not a PyTorch file .* \.safetensors$"),
])
def test_a_file_of_another_format_than_its_extension_says_names_the_rename(tmp_path, saved, name, said):
    """A torch.save file named .safetensors said "corrupt safetensors header: length 578712552184433488 is over
    ..."; a safetensors file named .pt or .bin, "corrupt or unsupported PyTorch pickle: Unsupported operand 64"."""
    from safetensors.torch import save_file

    p, sd = tmp_path / name, {"w": torch.ones(8, 8)}
    if saved == "safetensors":
        save_file(sd, str(p))
    else:
        torch.save(sd, p, _use_new_zipfile_serialization=saved == "torch")
    with pytest.raises(CheckpointError, match=rf"^{p}: {said}"):
        open_checkpoint(p).tensors()


def test_a_folder_named_like_a_weights_file_is_reported_not_left_out(tmp_path):
    """zoo/b.safetensors/ (a folder where the file belongs) was left out of the folder's models without a word;
    opened, it said only "unknown checkpoint format"."""
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.safetensors").mkdir()
    (tmp_path / "b.safetensors" / "x").write_bytes(b"1")
    assert discover_models([tmp_path]) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(CheckpointError, match=r"b\.safetensors: a folder, not a \.safetensors file as its name says"):
        open_checkpoint(tmp_path / "b.safetensors")
    models = open_many(discover_models([tmp_path]))
    assert [ck.name for ck in models] == ["a"] and [p.name for p, _ in models.skipped] == ["b.safetensors"]
    (tmp_path / "runs.pt").mkdir()  # a folder of models named so is still one: its models are found in it
    save_file({"w": torch.ones(2)}, str(tmp_path / "runs.pt" / "c.safetensors"))
    assert discover_models([tmp_path / "runs.pt"]) == [tmp_path / "runs.pt" / "c.safetensors"]


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "adapter_config.json", "adapter_model.bin",
                                  "model.safetensors"])
def test_a_folder_in_place_of_a_model_folders_file_is_named(tmp_path, name):
    """A folder where a model folder's index, adapter config or weights belong said "unknown checkpoint format",
    "no weights file" or "a folder holding adapter_model.safetensors, but ...": none named the file (fuzz cases)."""
    model = tmp_path / "m"
    model.mkdir()
    if name.startswith("adapter"):
        (model / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
        save_file({"w": torch.ones(2)}, str(model / "adapter_model.safetensors"))
        if name == "adapter_model.bin":
            (model / "adapter_model.safetensors").unlink()
    else:
        save_file({"w": torch.ones(2)}, str(model / "model-00001-of-00001.safetensors"))
    (model / name).unlink(missing_ok=True)
    (model / name).mkdir()
    with pytest.raises(CheckpointError, match=rf"m: {re.escape(name)} is a folder, not a file"):
        open_checkpoint(model)
    assert discover_models([tmp_path]) == [model]  # in a folder of models: listed, to be reported and skipped


def make_tool_outputs(root):
    """An atlas folder (its page and embeddings), an experts folder's index, a forest JSON and a notes file, as
    `atlas index build`, `atlas probex train` and `atlas lineage recover --out` write them (contents shortened)."""
    atlas, experts = root / "atl", root / "exp"
    (experts / "experts").mkdir(parents=True)
    atlas.mkdir()
    (atlas / "atlas.json").write_text('{"format": "modelatlas-atlas/1", "models": []}')
    (atlas / "atlas.html").write_text("<!doctype html><title>atlas</title>")
    save_file({"tree/t0": torch.zeros(2, 3)}, str(atlas / "embeddings.safetensors"))
    (experts / "index.json").write_text('{"format": "modelatlas-probex-experts/1"}')
    (root / "forest.json").write_text('{"nodes": ["a", "b"], "edges": [], "decisions": {}, "trees": []}')
    (root / "notes.txt").write_text("mine")
    return atlas, experts


def test_a_file_modelatlas_wrote_given_as_a_model_says_what_it_is_and_what_to_give(tmp_path):
    """An atlas's page, an experts index or a forest JSON said only 'unknown checkpoint format'; the atlas's
    embeddings.safetensors was read as a model of one tensor ('no tensor named ...' later)."""
    atlas, experts = make_tool_outputs(tmp_path)
    give = "not a model: give the models' files or folder"
    for path, said in [(atlas / "atlas.html", f"unknown checkpoint format; atlas.html is part of an atlas (`atlas "
                                              f"index build`) {atlas}, {give}"),
                       (experts / "index.json", f"index.json is part of ProbeX experts (`atlas probex train`) "
                                                f"{experts}, {give}"),
                       (tmp_path / "forest.json", "forest.json is a lineage forest (`atlas lineage recover --out`), "
                                                  "which names models but not their files: give the models'"),
                       (tmp_path / "notes.txt", f"unknown checkpoint format (known: {', '.join(formats())})"),
                       (atlas / "embeddings.safetensors", f"part of an atlas (`atlas index build`) {atlas}, not a "
                                                          "model; give the models' files or folder")]:
        said_of = str(discover_error(path))
        assert said_of.startswith(f"{path}: ") and said in said_of
    for path in (atlas / "atlas.html", tmp_path / "forest.json", tmp_path / "notes.txt"):  # opened: the same words
        with pytest.raises(CheckpointError, match=re.escape(str(discover_error(path)))):
            open_checkpoint(path)


def discover_error(path):
    with pytest.raises(CheckpointError) as e:
        discover_models([path])
    return e.value
