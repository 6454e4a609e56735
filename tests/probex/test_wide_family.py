"""The wide class-subset family: layout, tasks, caching (tiny sizes; the image set is replaced by noise)."""

import torch

from modelatlas.probex import families
from modelatlas.zoo.manifest import load_manifest


def _fake_data(per_source=2000, pool=2, seed=0):
    g = torch.Generator().manual_seed(0)
    return torch.rand(80, 1, 4, 4, generator=g), torch.arange(20).repeat(4)


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
