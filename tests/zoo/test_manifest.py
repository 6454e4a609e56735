import pytest

from modelatlas.errors import ManifestError
from modelatlas.zoo import Manifest, ModelRecord, load_manifest


def make_manifest():
    return Manifest([ModelRecord("r", "r", None, "r"), ModelRecord("c", "c", "r", "r", method="lora")])


def test_roundtrip(tmp_path):
    make_manifest().save(tmp_path / "manifest.json")
    m = load_manifest(tmp_path)
    assert m.edges() == [("r", "c")] and m.root == tmp_path and m["c"].method == "lora"


def test_errors_name_file_and_key(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"models": [{"name": "a"}]}')
    with pytest.raises(ManifestError, match=r"manifest.json: model #0 lacks key\(s\) \['path', 'parent', 'tree'\]"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="names parent 'x'"):
        Manifest([ModelRecord("a", "a", "x", "t")])
