"""The wide class-subset family: layout, tasks, caching (tiny sizes; the image set is replaced by noise)."""

import pytest
import torch

from modelatlas.errors import ConfigError
from modelatlas.probex import families
from modelatlas.zoo.manifest import load_manifest


def _fake_data(per_source=2000, pool=2, seed=0, transforms=()):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(80, 1, 4, 4, generator=g), torch.arange(20).repeat(4)
    if transforms:  # the same layout as the real one: one copy of the 20 classes per transform
        x = torch.cat([families.apply_transform(t, x) for t in transforms])
        y = torch.cat([y + 20 * k for k in range(len(transforms))])
    return x, y


def test_apply_transform_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.25, 0.5]]]])  # (1, 1, 2, 2)
    assert torch.equal(families.apply_transform("invert", x), 1 - x)
    assert torch.equal(families.apply_transform("vflip", x), torch.tensor([[[[0.25, 0.5], [0.0, 1.0]]]]))
    rot = families.apply_transform("rot90", x)  # a quarter turn counter-clockwise
    assert torch.equal(rot, torch.tensor([[[[1.0, 0.5], [0.0, 0.25]]]]))
    assert torch.equal(families.apply_transform("invert+rot90", x), 1 - rot)
    with pytest.raises(ConfigError, match="unknown transform 'spin'"):
        families.apply_transform("invert+spin", x)


def test_transforms_multiply_the_label_space(tmp_path, monkeypatch):
    monkeypatch.setattr(families, "mnist_fashion20", _fake_data)
    m = families.make_wide_subset_zoo(tmp_path / "z", children=3, hidden=8, subset_size=50, root_steps=2,
                                      ft_steps=(1, 2), batch=16, transforms=("identity", "invert", "rot90",
                                                                             "vflip", "invert+rot90"))
    kids = [r for r in m.models if r.parent is not None]
    assert all(len(r.task["classes"]) == 50 and max(r.task["classes"]) < 100 for r in kids)
    assert m.config["transforms"] == ["identity", "invert", "rot90", "vflip", "invert+rot90"]
    from safetensors.torch import load_file

    assert tuple(load_file(str(tmp_path / "z" / kids[0].path))["classifier.weight"].shape) == (100, 8)


def test_wide_subset_zoo_layout_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(families, "mnist_fashion20", _fake_data)
    kw = {"children": 5, "hidden": 8, "subset_size": 10, "root_steps": 3, "ft_steps": (1, 2), "batch": 16,
          "batch_models": 3}
    m = families.make_wide_subset_zoo(tmp_path / "z", **kw)
    assert len(m.models) == 6 and m.models[0].parent is None
    kids = [r for r in m.models if r.parent is not None]
    assert all(len(r.task["classes"]) == 10 and max(r.task["classes"]) < 20 for r in kids)
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "z" / kids[0].path))
    assert tuple(w["layers.1.weight"].shape) == (8, 8) and tuple(w["classifier.weight"].shape) == (20, 8)
    assert load_manifest(tmp_path / "z").config["family"] == "wide_subset_star"
    again = families.make_wide_subset_zoo(tmp_path / "z", **kw)  # cached: same records, no retraining
    assert [r.name for r in again.models] == [r.name for r in m.models]
