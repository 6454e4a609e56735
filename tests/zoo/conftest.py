"""Shared tiny zoos: a few-step MLP on digits (hidden 8), built once per test module."""

import pytest

from modelatlas.zoo import ZooConfig, make_zoo


def _config(**overrides) -> ZooConfig:
    base = dict(arch_kwargs={"hidden": 8, "n_hidden": 2}, trees=2, children=2, depth=2, method="mixed",
                root_steps=(5, 8), ft_steps=(3, 5), eval_samples=50, seed=11)
    base.update(overrides)
    return ZooConfig(**base)


@pytest.fixture
def make_config():
    """A factory of tiny zoo configs: ``make_config(**overrides)``."""
    return _config


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """(manifest, folder) of a 2 x 2 x depth-2 mixed full/LoRA zoo."""
    out = tmp_path_factory.mktemp("zoo")
    return make_zoo(_config(), out, workers=1), out


def make_renamed_copy(folder, zoo):
    """A copy of the zoo ``folder`` at ``zoo`` whose manifest renames every model ``model-<i>`` (folders and
    paths kept). Returns (old name -> new name, the edited manifest data)."""
    import json
    import shutil

    shutil.copytree(folder, zoo)
    data = json.loads((zoo / "manifest.json").read_text())
    new = {m["name"]: f"model-{i}" for i, m in enumerate(data["models"])}
    for m in data["models"]:
        m["name"], m["parent"] = new[m["name"]], new.get(m["parent"])
    (zoo / "manifest.json").write_text(json.dumps(data))
    return new, data
