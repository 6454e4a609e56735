"""The stage per tree in the CLI (lineage.stage): where the trees' stages differ, the summary line says so
and each tree's header gives its stage; the JSON export has them in decisions["stage_trees"]."""

import json

from safetensors.torch import save_file

from modelatlas.cli.main import main
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_mixed_stage_folder(folder) -> None:
    """One synthetic "specialize" star of 3 (s...) and two "generalize" ones (t...), one architecture, on disk."""
    ws, _ = make_synthetic_forest(n_trees=1, children=3, depth=1, dim=16, stage="specialize", seed=0)
    wg, _ = make_synthetic_forest(n_trees=2, children=3, depth=1, dim=16, stage="generalize", seed=10)
    for name, tensors in {**{"s" + k: v for k, v in ws.items()}, **wg}.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))


def test_mixed_stages_in_the_summary_the_tree_headers_and_the_json(tmp_path, capsys):
    make_mixed_stage_folder(tmp_path)
    assert main(["lineage", "recover", str(tmp_path), "--out", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert "stage: mixed: 2 trees generalize, 1 tree specialize (from the weights, each tree by its own" in out
    assert "st0  [tree 1, 4 models; stage specialize 0.62; root confidence" in out, out  # +2 - 1.5
    assert "t0  [tree 2, 4 models; stage generalize 0.88; root confidence" in out  # -2 + (2 - 2)
    d = json.loads((tmp_path / "f.json").read_text())["decisions"]
    assert d["stage"] == "generalize" and d["stage_mixed"] is True
    assert [t["stage"] for t in d["stage_trees"]] == ["specialize", "generalize", "generalize"]
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    out = capsys.readouterr().out
    assert "stage: specialize (given)" in out and "; stage specialize" not in out  # one stage: the summary says it
