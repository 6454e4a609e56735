"""Fixtures and helpers of the atlas tests: a tiny class zoo with its experts (trained once a session), a folder
of synthetic models with known parents."""

import pytest
import torch
from safetensors.torch import save_file

from modelatlas.lineage import LineageConfig
from modelatlas.lineage.synthetic import make_synthetic_forest

SPECIALIZE = LineageConfig(stage="specialize")


@pytest.fixture(scope="session")
def make_class_zoo(tmp_path_factory):
    """A tiny Task-A zoo (2 trees, hidden 16) and class experts trained on it for 3 epochs."""
    from modelatlas.probex import ProbeXConfig
    from modelatlas.probex.experts import train_tree_experts
    from modelatlas.probex.families import make_class_subset_zoo

    torch.set_num_threads(1)
    zoo = tmp_path_factory.mktemp("zoo")
    make_class_subset_zoo(zoo, children=(24, 12), hidden=16, ft_steps=(10, 20), batch_models=24)
    experts = tmp_path_factory.mktemp("experts")
    train_tree_experts(zoo, experts, "classes", "layers.1.weight", ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=3))
    return zoo, experts


def make_forest_folder(folder, broken=False):
    """2 synthetic trees x 2 children (known parents) as safetensors files; optionally one broken file."""
    weights, parents = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    folder.mkdir(exist_ok=True)
    for name, tensors in weights.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    if broken:
        (folder / "broken.safetensors").write_bytes(b"\xff" * 4)
    return weights, parents
