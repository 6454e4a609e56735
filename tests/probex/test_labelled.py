"""Class names of a hand-written manifest (``config.class_names``), checked against its labels."""

import json

import pytest

from modelatlas.errors import ManifestError
from modelatlas.probex.labelled import class_names, task_records
from modelatlas.zoo.manifest import load_manifest


def make_manifest(tmp_path, config=None, classes=((0, 1), (2,))):
    records = [{"name": "base", "path": "base.safetensors", "parent": None, "tree": "t"}]
    records += [{"name": f"ft{i}", "path": f"ft{i}.safetensors", "parent": "base", "tree": "t",
                 "task": {"classes": list(c)}} for i, c in enumerate(classes)]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"models": records, **({"config": config} if config is not None else {})}))
    manifest = load_manifest(path)
    return manifest, task_records(manifest, "classes")


def test_the_manifests_class_names_name_the_classes(tmp_path):
    manifest, records = make_manifest(tmp_path, {"class_names": ["cat", "dog", "ship", "truck"]})
    assert class_names(records, manifest) == ["cat", "dog", "ship", "truck"]  # a class no model holds kept too


def test_without_names_the_classes_are_their_indices(tmp_path):
    manifest, records = make_manifest(tmp_path)
    assert class_names(records, manifest) == ["0", "1", "2"]
    assert class_names(records) == ["0", "1", "2"]


@pytest.mark.parametrize("given", [["cat", "dog"], "cat,dog,ship", ["cat", "", "ship"], ["cat", 1, "ship"]])
def test_class_names_too_few_or_not_strings_are_refused_naming_the_file(tmp_path, given):
    manifest, records = make_manifest(tmp_path, {"class_names": given})
    with pytest.raises(ManifestError, match=r"labels\.json: config 'class_names' must be a list of 3 or more"):
        class_names(records, manifest)
