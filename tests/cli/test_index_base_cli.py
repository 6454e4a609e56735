"""``atlas index build --base`` / ``atlas lineage recover --base`` with no adapter among the models, and the base
opened once."""

import json

import pytest

from modelatlas.cli.main import main


@pytest.fixture(scope="module")
def make_full_zoo(tmp_path_factory):
    from tests.zoo.conftest import _config

    from modelatlas.zoo import make_zoo

    zoo = tmp_path_factory.mktemp("full") / "zoo"
    make_zoo(_config(trees=2, depth=1, method="full"), zoo, workers=1)
    return zoo


def test_an_atlas_records_no_base_that_merged_nothing(make_full_zoo, tmp_path, capsys):
    """atlas.json kept --base as its adapter_base though no adapter was merged onto it, and `atlas probex predict
    ATLAS` reopened it (an error when it had moved, for a base it needs not)."""
    from modelatlas.cli.probex import _model_paths

    out = tmp_path / "atl"
    assert main(["index", "build", str(make_full_zoo), "--base", str(make_full_zoo / "t0"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "atlas.json").read_text())["adapter_base"] is None
    assert _model_paths([str(out)])[1] == set()  # the bases predict would open


@pytest.mark.parametrize("command, recovery", [(["lineage", "recover"], "modelatlas.lineage.LineageRecovery.fit"),
                                               (["index", "build"], "modelatlas.atlas.build.recover_lineage")])
def test_a_base_with_no_adapter_is_warned_before_the_recovery(make_full_zoo, tmp_path, capsys, monkeypatch,
                                                              command, recovery):
    """'no PEFT adapter among the models' came after the recovery (minutes on a large zoo), though the models'
    paths tell it before; it is said once."""
    import importlib

    module, name = recovery.rsplit(".", 1)
    owner = importlib.import_module(module) if name == "recover_lineage" else importlib.import_module(
        module.rsplit(".", 1)[0]).LineageRecovery
    real, seen = getattr(owner, name), []

    def check_recovery(*a, **kw):
        seen.append(capsys.readouterr().err)
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, check_recovery)
    base = make_full_zoo / "t0"
    assert main([*command, str(make_full_zoo), "--base", str(base), "--out", str(tmp_path / "out")]) == 0
    said = f"warning: --base {base}: no PEFT adapter among the models, so none is merged onto it"
    assert said in seen[0] and said not in capsys.readouterr().err


def test_index_build_opens_the_base_once(make_full_zoo, tmp_path, capsys, monkeypatch):
    """`index build --base` opened the base to check it, closed it, and build_atlas opened it again."""
    import modelatlas.weights
    import modelatlas.weights.peft_lora as peft_lora

    real, opened = peft_lora.open_adapter_base, []

    def count_opens(path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(peft_lora, "open_adapter_base", count_opens)
    monkeypatch.setattr(modelatlas.weights, "open_adapter_base", count_opens)
    base = make_full_zoo / "t0"
    assert main(["index", "build", str(make_full_zoo), "--base", str(base), "--out", str(tmp_path / "atl")]) == 0
    assert opened == [str(base)]


def test_index_build_merges_adapters_onto_the_base_it_opened(tmp_path, capsys, make_adapter_family):
    """The base the CLI opened once is the one build_atlas merges onto and records; no warning with adapters."""
    fam = make_adapter_family(tmp_path / "fam")
    base, out = fam / "base.safetensors", tmp_path / "atl"
    assert main(["index", "build", str(fam / "a0"), str(fam / "a1"), str(fam / "a2"), "--stage", "specialize",
                 "--base", str(base), "--out", str(out)]) == 0
    assert "--base" not in capsys.readouterr().err
    data = json.loads((out / "atlas.json").read_text())
    assert data["adapter_base"] == str(base) and not any(m["notes"] for m in data["models"])
    assert {m["name"]: m["parent"] for m in data["models"]} == {"base": None, "a0": "base", "a1": "base", "a2": "base"}


@pytest.mark.parametrize("command", [["lineage", "recover"], ["index", "build"]])
def test_adapters_of_another_base_are_not_called_absent(tmp_path, capsys, make_adapter_family, command):
    """Adapters that do not fit --base (16 x 16 updates, an 8 x 8 base) are left out; the warning then said 'no
    PEFT adapter among the models', below the lines naming them."""
    import torch
    from safetensors.torch import save_file

    fam = make_adapter_family(tmp_path / "fam")
    base = tmp_path / "other.safetensors"
    save_file({f"layers.{i}.weight": torch.full((8, 8), float(i)) for i in range(3)}, str(base))
    save_file({f"layers.{i}.weight": torch.eye(16) * (i + 1) for i in range(3)}, str(tmp_path / "m.safetensors"))
    assert main([*command, str(fam / "a0"), str(fam / "a1"), str(tmp_path / "m.safetensors"), "--base", str(base),
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "does not match the base weight shape (8, 8)" in err and "no PEFT adapter among the models," not in err
    assert (f"warning: --base {base}: no PEFT adapter among the models was merged onto it (none was given, or each "
            "was left out: see above)") in err
