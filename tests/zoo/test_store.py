import shutil

import pytest

from modelatlas.cli.main import main
from modelatlas.errors import AtlasError
from modelatlas.zoo import load_state, make_zoo


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
    """(manifest, folder) of a root with two LoRA children stored as adapters."""
    from tests.zoo.conftest import _config

    out = tmp_path_factory.mktemp("adapters")
    return make_zoo(_config(trees=1, depth=1, method="lora", storage="adapter", lora_ranks=(2,)), out, workers=1), out


@pytest.mark.parametrize("text, said", [('{"r": 2,', "corrupt adapter config"),
                                        ('{"peft_type": "LORA", "r": 2}', "'lora_alpha' is missing"),
                                        ('{"peft_type": "LORA", "r": "x", "lora_alpha": 4}', "'r' must be")])
def test_a_damaged_adapter_config_is_an_error_naming_it(adapter_zoo, tmp_path, capsys, text, said):
    """A hand-edited or truncated adapter_config.json ended `atlas zoo merge` (and load_state) in a
    JSONDecodeError, KeyError or TypeError traceback."""
    manifest, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    shutil.copytree(folder, zoo)
    child = next(m.name for m in manifest.models if m.storage == "adapter")
    (zoo / child / "adapter_config.json").write_text(text)
    with pytest.raises(AtlasError, match=f"adapter_config.json: .*{said}"):
        load_state(zoo, child)
    assert main(["zoo", "merge", str(zoo), "--out", str(tmp_path / "m")]) == 1
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["drop B", "reshape B"])
def test_adapter_tensors_that_do_not_fit_the_parent_are_an_error_naming_the_file(adapter_zoo, tmp_path, damage):
    """An adapter file missing a lora_B tensor, or holding one of another shape, ended load_state (and
    `atlas zoo merge`) in a KeyError / RuntimeError traceback."""
    import torch
    from safetensors.torch import load_file, save_file

    manifest, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    shutil.copytree(folder, zoo)
    child = next(m.name for m in manifest.models if m.storage == "adapter")
    path = zoo / child / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    if damage == "drop B":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(3, tensors[key].shape[1])
    save_file(tensors, path)
    with pytest.raises(AtlasError, match="adapter_model.safetensors: .*does not fit"):
        load_state(zoo, child)


@pytest.mark.parametrize("text", ["[]", '{"record": 5}', '{"fingerprint": "FP", "record": {"name": "t0", "extra": 1}}'])
def test_a_damaged_zoo_record_counts_as_unfinished(tmp_path, text):
    """A zoo_record.json that is JSON but not a record (a list, a number, unknown keys) ended a resumed
    `atlas zoo make` and `atlas zoo merge` in an AttributeError / TypeError traceback; like an unreadable
    one, it now marks the model unfinished: make trains it again (to the same weights)."""
    import json

    from tests.zoo.conftest import _config

    cfg = _config(trees=1, depth=1)
    digests = [m.sha256 for m in make_zoo(cfg, tmp_path, workers=1).models]
    fp = json.loads((tmp_path / "t0" / "zoo_record.json").read_text())["fingerprint"]
    (tmp_path / "t0" / "zoo_record.json").write_text(text.replace("FP", fp))
    with pytest.raises(AtlasError, match="zoo_record.json: not a zoo model record|not a finished zoo model"):
        load_state(tmp_path, "t0")
    assert [m.sha256 for m in make_zoo(cfg, tmp_path, workers=1).models] == digests


def test_verify_of_a_manifest_whose_models_were_renamed_finds_them_built(adapter_zoo, tmp_path):
    """Models renamed in manifest.json (folders kept) were each reported twice: 'ok' under the new name and
    'not built' under the planned one (exit code 1)."""
    import json

    from tests.zoo.conftest import make_renamed_copy

    from modelatlas.zoo import load_manifest
    from modelatlas.zoo.store import verify_zoo

    _, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    new, data = make_renamed_copy(folder, zoo)
    assert verify_zoo(load_manifest(zoo)) == {n: "ok" for n in new.values()}
    shutil.rmtree(zoo / next(iter(new)))
    data["models"] = data["models"][1:]
    data["models"][0]["parent"] = data["models"][1]["parent"] = None
    (zoo / "manifest.json").write_text(json.dumps(data))
    assert verify_zoo(load_manifest(zoo))[next(iter(new))] == "not built"  # a planned folder that is gone still is


@pytest.mark.parametrize("parent", [None, "self"])
def test_an_adapter_record_without_a_parent_or_on_itself_is_an_error(adapter_zoo, tmp_path, parent):
    """An adapter's zoo_record.json naming no parent ended load_state in a TypeError traceback, one naming
    itself (a loop) in a RecursionError."""
    import json

    manifest, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    shutil.copytree(folder, zoo)
    child = next(m.name for m in manifest.models if m.storage == "adapter")
    path = zoo / child / "zoo_record.json"
    data = json.loads(path.read_text())
    data["record"]["parent"] = child if parent == "self" else None
    path.write_text(json.dumps(data))
    with pytest.raises(AtlasError, match=f"{child}/zoo_record.json: adapter model {child!r} "):
        load_state(zoo, child)
