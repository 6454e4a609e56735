from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.synthetic import make_synthetic_forest


def test_a_folder_of_models_is_read_as_the_cli_reads_it(tmp_path):
    # recover_lineage(["zoo/"]) skipped the folder as "unknown checkpoint format"; atlas lineage recover zoo/
    # reads the models in it
    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=5)
    for name, tensors in weights.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    by_folder = recover_lineage([tmp_path])
    by_file = recover_lineage(sorted(tmp_path.glob("t*.safetensors")))
    assert by_folder.nodes == by_file.nodes == ["t0", "t0_0", "t0_1"]
    assert [(e.parent, e.child) for e in by_folder.edges] == [(e.parent, e.child) for e in by_file.edges]
    assert list(by_folder.skipped) == ["broken"]  # a bad model in the folder is reported and skipped
