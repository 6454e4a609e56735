import json

import pytest

from modelatlas.errors import ManifestError
from modelatlas.zoo import Manifest, ModelRecord, load_manifest, load_truth


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


@pytest.mark.parametrize("record, message", [
    ({"name": 1, "path": "a", "parent": None, "tree": "a"}, "key 'name' must be a non-empty string, got 1"),
    ({"name": "a", "path": 3, "parent": None, "tree": "a"}, "key 'path' must be a non-empty string, got 3"),
    ({"name": "a", "path": "", "parent": None, "tree": "a"}, "key 'path' must be a non-empty string, got ''"),
    ({"name": "a", "path": "a", "parent": 3, "tree": "a"}, "key 'parent' must be a non-empty string or null"),
    ({"name": "a", "path": "a", "parent": None, "tree": "a", "task": "x"}, "key 'task' must be an object"),
    ({"name": "a", "path": "a", "parent": None, "tree": "a", "sha256": None}, "key 'sha256' must be a string"),
    ({"name": "a", "path": "a", "parent": None, "tree": "a", "storage": "weird"},
     r"key 'storage' must be one of \['full', 'adapter'\], got 'weird'"),
])
def test_mistyped_record_keys_are_named(tmp_path, record, message):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"models": [record]}))
    with pytest.raises(ManifestError, match=r"manifest.json: model #0 " + message):
        load_manifest(tmp_path)


def test_a_config_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text('{"models": [], "config": 3}')
    with pytest.raises(ManifestError, match="key 'config' must be an object, got 3"):
        load_manifest(tmp_path)


def test_a_parent_loop_is_named():
    # a -> b -> a was loaded, shown as no tree at all and scored as no edges
    with pytest.raises(ManifestError, match=r"parents form a loop \(a -> b -> a\)"):
        Manifest([ModelRecord("r", "r", None, "r"), ModelRecord("a", "a", "b", "t"), ModelRecord("b", "b", "a", "t")])
    with pytest.raises(ManifestError, match=r"parents form a loop \(c -> c\)"):
        Manifest([ModelRecord("c", "c", "c", "c")])
    chain = [ModelRecord("m0", "m0", None, "t")] + [ModelRecord(f"m{i}", f"m{i}", f"m{i - 1}", "t") for i in range(1, 3000)]
    assert len(Manifest(chain)) == 3000  # a deep chain is fine (and fast)


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"models": ' + "9" * 5000 + "}"])
def test_a_manifest_json_python_cannot_parse_is_named(tmp_path, content):
    # `atlas lineage recover --truth` on such a file ended in a RecursionError / ValueError traceback
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=r"manifest\.json: not a valid JSON manifest") as info:
        load_manifest(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("form", ["modelatlas-atlas/1", "modelatlas-probex-experts/1"])
def test_another_modelatlas_file_is_named_by_its_format(tmp_path, form):
    """An atlas.json given as the zoo manifest (it has 'models' too) failed as "model #0 key 'tree' must be a
    non-empty string, got 1", and an experts index.json as "missing key 'models'"."""
    path = tmp_path / "atlas.json"
    path.write_text(json.dumps({"format": form, "models": [{"name": "a", "path": "/a", "tree": 1}]}))
    with pytest.raises(ManifestError, match=rf"atlas\.json: not a zoo manifest: its format is '{form}' \(a zoo's is "
                                            r"'modelatlas-zoo/1', written by `atlas zoo make`\)"):
        load_manifest(path)


def test_a_plain_parents_object_is_a_truth(tmp_path):
    """{"model": "its parent" or null}: what a user who knows some parents writes (it read "missing key
    'models'"). A parent not listed is a root; each model's tree is its root."""
    p = tmp_path / "truth.json"
    p.write_text(json.dumps({"m.0": "m", "m.0.0": "m.0", "m.1": "m", "x": None}))
    m = load_truth(p)
    assert m.parents() == {"m": None, "m.0": "m", "m.0.0": "m.0", "m.1": "m", "x": None}
    assert m.trees() == {"m": "m", "m.0": "m", "m.0.0": "m", "m.1": "m", "x": "x"}
    assert m.path_of("m.0") == tmp_path / "m.0" and m.source == p


@pytest.mark.parametrize("data, message", [
    ({"a": "b", "b": "a"}, r"truth.json: parents form a loop \((a -> b -> a|b -> a -> b)\)"),
    ({"a": 3}, r"truth.json: missing key 'models' \(a list of model records\), and not a plain "
               r"\{\"model\": \"its parent\" or null\} object either"),
])
def test_a_plain_parents_object_that_is_wrong_says_how(tmp_path, data, message):
    p = tmp_path / "truth.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_truth(p)


def test_a_plain_parents_object_is_no_zoo_manifest(tmp_path):
    """A zoo command given a --truth file refuses it, naming it (atlas zoo show drew every model a root, atlas
    zoo verify called the folder's files extra, atlas probex train named a 'manifest.json' that is not there)."""
    p = tmp_path / "truth.json"
    p.write_text(json.dumps({"m.0": "m", "x": None}))
    with pytest.raises(ManifestError, match=r"truth\.json: a plain \{\"model\": \"its parent\"\} object \(a --truth "
                                            r"for `atlas lineage recover`\), not a zoo manifest; give a zoo folder"):
        load_manifest(p)
    p.write_text(json.dumps({"a": 3}))
    with pytest.raises(ManifestError, match=r"truth\.json: missing key 'models' \(a list of model records\)$"):
        load_manifest(p)


@pytest.mark.parametrize("load", [load_manifest, load_truth])
def test_a_forest_or_a_models_value_that_is_no_list_is_named(tmp_path, load):
    """`atlas zoo show forest.json` (what `atlas lineage recover --out` writes) and a manifest whose 'models' is
    a number both said "missing key 'models'": the one names what it is, the other the key's wrong value."""
    p = tmp_path / "forest.json"
    p.write_text(json.dumps({"nodes": ["a", "b"], "edges": [{"parent": "a", "child": "b"}], "trees": [["a", "b"]]}))
    with pytest.raises(ManifestError, match=r"^\S*forest\.json: a lineage forest \(what `atlas lineage recover "
                                            r"--out` writes\), not a zoo manifest; give a zoo folder built by "
                                            r"`atlas zoo make`, or its manifest\.json$"):
        load(p)
    p.write_text(json.dumps({"models": 3}))
    with pytest.raises(ManifestError, match=r"^\S*forest\.json: key 'models' must be a list of model records, "
                                            r"got 3$"):
        load(p)


def test_a_model_of_a_zoo_given_as_the_zoo_names_the_zoo(tmp_path):
    """A zoo's model folder or weights file given where a zoo is needed said 'zoo/t0/manifest.json: no such
    manifest' or 'not a valid JSON manifest ('utf-8' codec can't decode ...)'."""
    make_manifest().save(tmp_path / "manifest.json")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xdc\xff")
    for given in (tmp_path / "r", tmp_path / "r" / "model.safetensors"):
        with pytest.raises(ManifestError, match=rf"^{given}: inside the zoo {tmp_path}, not a zoo; pass the zoo "
                                                rf"folder \({tmp_path}\)$"):
            load_manifest(given)
    with pytest.raises(ManifestError, match=r"nope: no such manifest"):  # a typo is no model of the zoo
        load_manifest(tmp_path / "nope")
    assert load_manifest(tmp_path).edges() == [("r", "c")]
