"""build_atlas's inputs: what a caller may pass for the models."""

from safetensors.torch import save_file

from modelatlas.atlas import build_atlas
from modelatlas.lineage import LineageConfig
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_models(folder):
    """One synthetic tree of a root and 2 children as safetensors files."""
    weights, parents = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=3)
    folder.mkdir()
    for name, tensors in weights.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    return parents


def test_one_folder_given_alone_is_one_input_not_its_characters(tmp_path):
    """build_atlas("zoo") read the letters z, o, o as three hub ids: '0 readable model(s) of 3'."""
    parents = make_models(tmp_path / "zoo")
    config = LineageConfig(stage="specialize")
    for given in (str(tmp_path / "zoo"), tmp_path / "zoo"):
        atlas = build_atlas(given, lineage=config)
        assert {m.name: m.parent for m in atlas.models} == parents
