import shutil

import torch
from safetensors.torch import save_file

from modelatlas.zoo import Manifest, ModelRecord, load_manifest
from modelatlas.zoo.matching import match_models
from modelatlas.zoo.store import weights_digest


def make_zoo(folder):
    """r -> a, r -> b as model folders (model.safetensors each, digests recorded), saved and loaded back."""
    records = []
    for i, (name, parent) in enumerate([("r", None), ("a", "r"), ("b", "r")]):
        (folder / name).mkdir(parents=True)
        save_file({"w": torch.full((3, 4), float(i))}, str(folder / name / "model.safetensors"))
        digest = weights_digest(folder / name / "model.safetensors")
        records.append(ModelRecord(name, name, parent, "r", sha256=digest))
    Manifest(records).save(folder / "manifest.json")
    return load_manifest(folder)


def test_models_named_by_their_folder_are_matched_by_path(tmp_path):
    m = make_zoo(tmp_path / "zoo")
    given = {"zoo/r": tmp_path / "zoo" / "r", "a": tmp_path / "zoo" / "a",
             "zoo/b": tmp_path / "zoo" / "b" / "model.safetensors"}  # a folder, or its weights file
    assert match_models(m, given) == {"r": "zoo/r", "b": "zoo/b"}


def test_renamed_copies_are_matched_by_digest(tmp_path):
    m = make_zoo(tmp_path / "zoo")
    shutil.copytree(tmp_path / "zoo" / "a", tmp_path / "mine" / "ft-3")
    shutil.copy(tmp_path / "zoo" / "b" / "model.safetensors", tmp_path / "mine" / "ft-4.safetensors")
    save_file({"w": torch.full((3, 4), 9.0)}, str(tmp_path / "mine" / "other.safetensors"))  # same size, not a zoo model
    given = {"ft-3": tmp_path / "mine" / "ft-3", "ft-4": tmp_path / "mine" / "ft-4.safetensors",
             "other": tmp_path / "mine" / "other.safetensors", "r": tmp_path / "zoo" / "r"}
    assert match_models(m, given) == {"a": "ft-3", "b": "ft-4"}


def test_a_model_given_under_its_own_name_is_not_matched_again(tmp_path):
    m = make_zoo(tmp_path / "zoo")
    shutil.copytree(tmp_path / "zoo" / "a", tmp_path / "copy")
    assert match_models(m, {"a": tmp_path / "zoo" / "a", "copy": tmp_path / "copy"}) == {}
    assert match_models(m, {"x": tmp_path / "missing"}) == {}


def test_renamed_manifest_keeps_parents_and_source(tmp_path):
    m = make_zoo(tmp_path / "zoo").renamed({"r": "zoo/r", "b": "ft-4"})
    assert m.parents() == {"zoo/r": None, "a": "zoo/r", "ft-4": "zoo/r"}
    assert m.source == tmp_path / "zoo" / "manifest.json" and m.path_of("ft-4") == tmp_path / "zoo" / "b"


def test_a_moved_model_is_matched_though_no_zoo_file_has_its_size(tmp_path):
    m = make_zoo(tmp_path / "zoo")
    (tmp_path / "mine").mkdir()
    a = tmp_path / "zoo" / "a" / "model.safetensors"
    save_file({"w": torch.full((3, 5), 7.0)}, str(a))  # a of another shape than r and b
    [r for r in m.models if r.name == "a"][0].sha256 = weights_digest(a)
    shutil.move(a, tmp_path / "mine" / "ft-3.safetensors")  # moved out of the zoo: r's and b's files are smaller
    assert match_models(m, {"ft-3": tmp_path / "mine" / "ft-3.safetensors"}) == {"a": "ft-3"}


def test_a_name_written_in_another_unicode_form_is_matched_without_reading_a_file(tmp_path):
    """A manifest of NFC names (no digests) and models whose file names macOS wrote NFD (e + U+0301, as its
    zips do): the same names, found as such. A model of that NFC name given too keeps the record."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    m = Manifest([ModelRecord(nfc, nfc, None, nfc), ModelRecord("t\u00e9", "t\u00e9", nfc, nfc)])
    given = {nfd: tmp_path / "missing" / f"{nfd}.pt", "te\u0301": tmp_path / "missing" / "x.pt"}  # never read
    assert match_models(m, given) == {nfc: nfd, "t\u00e9": "te\u0301"}
    assert match_models(m, {nfc: tmp_path / "a.pt", nfd: tmp_path / "b.pt"}) == {}
    # c with cedilla and acute, spelt NFC, NFD, and two ways that are neither: one record per given model
    spelt = ["\u1e09", "c\u0327\u0301", "\u00e7\u0301", "\u0107\u0327"]
    twins = Manifest([ModelRecord(n, f"r{i}", None, "t") for i, n in enumerate(spelt[:2])])
    assert match_models(twins, {spelt[2]: tmp_path / "a.pt"}) == {spelt[0]: spelt[2]}
    assert match_models(twins, {spelt[3]: tmp_path / "a.pt", spelt[2]: tmp_path / "b.pt"}) \
        == {spelt[0]: spelt[3], spelt[1]: spelt[2]}
