"""Merges declared by their folders (mergekit_config.yml; lineage.declared, weights.mergekit): a TIES-style
merge, no weighted sum of its parents, is drawn beside them when every model it names is given."""

import json

import torch
from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.export import to_text
from modelatlas.weights.mergekit import declared_merge

TIES = """models:
  - model: org/ft0
    parameters: {density: 0.5, weight: 0.6}
  - model: ./models/ft1
    parameters: {density: 0.5, weight: 0.4}
merge_method: ties
base_model: org/base
dtype: float32
"""


def make_folder(root, name, tensors, config=None):
    folder = root / name
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "test"}))
    if config is not None:
        (folder / "mergekit_config.yml").write_text(config)
    return folder


def make_ties_zoo(root, config=TIES):
    """base, three fine-tunes, and ft0 and ft1 merged TIES-style (top half of each update kept, signs elected)."""
    gen = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(64, 64, generator=gen) for i in range(3)}
    fts = [{k: v + 0.05 * torch.randn(64, 64, generator=gen) for k, v in base.items()} for _ in range(3)]
    for name, t in [("base", base)] + [(f"ft{i}", f) for i, f in enumerate(fts)]:
        make_folder(root, name, t)
    merged = {}
    for k, b in base.items():
        taus = [f[k] - b for f in fts[:2]]
        kept = [t * (t.abs() >= t.abs().median()) for t in taus]  # trim to the top half
        sign = torch.sign(0.6 * kept[0] + 0.4 * kept[1])
        agree = [(torch.sign(t) == sign) & (t != 0) for t in kept]
        num = 0.6 * kept[0] * agree[0] + 0.4 * kept[1] * agree[1]
        den = (0.6 * agree[0] + 0.4 * agree[1]).clamp_min(1e-12)
        merged[k] = b + num / den
    make_folder(root, "ties", merged, config)


def test_a_mergekit_config_is_read_safely(tmp_path):
    assert declared_merge("/nonexistent") is None
    make_folder(tmp_path, "evil", {"l0.weight": torch.zeros(2, 2)}, "merge_method: !!python/object/apply:os.system [echo hi]\n")
    assert "not readable as YAML" in declared_merge(tmp_path / "evil")["problem"]  # yaml.safe_load builds no objects


def test_a_declared_ties_merge_of_models_given_is_drawn_beside_them(tmp_path):
    make_ties_zoo(tmp_path)
    rec = declared_merge(tmp_path / "ties")
    assert rec["method"] == "ties" and rec["base"] == "org/base" and rec["models"] == ["org/ft0", "./models/ft1"]
    assert rec["weights"] == [0.6, 0.4]
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    got = forest.decisions["model_merges"]["ties"]
    assert got["parents"] == ["base", "ft0", "ft1"] and got["declared"] == "ties"
    assert got["residual"] is None  # no weighted sum of them: the folder's word, not the weights', placed it
    edge = next(e for e in forest.edges if e.child == "ties")
    assert (edge.parent, edge.kind) == ("ft0", "merge")
    assert "ties  (ties merge of base, ft0, ft1 (mergekit_config.yml))" in to_text(forest)
    trained = {(e.parent, e.child) for e in forest.edges if e.kind == "trained"}
    assert {c for _, c in trained} == {"ft0", "ft1", "ft2"}  # the merge drew none of them below it


def test_a_declaration_naming_models_not_given_is_listed_and_the_model_placed(tmp_path):
    make_ties_zoo(tmp_path, TIES.replace("org/ft0", "org/elsewhere"))
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert "ties" not in (forest.decisions.get("model_merges") or {})
    assert forest.decisions["declared_merges"]["ties"]["not_given"] == ["org/elsewhere"]


def test_a_broken_config_is_reported_not_raised(tmp_path):
    make_ties_zoo(tmp_path, "merge_method: [unclosed\n")
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert "not readable as YAML" in forest.decisions["declared_merges"]["ties"]["problem"]
    make_folder(tmp_path, "plain", {"l0.weight": torch.zeros(64, 64)}, "just: text\n")
    assert declared_merge(tmp_path / "plain")["problem"] == "no merge_method: not a mergekit config"


def test_the_command_line_draws_a_declared_merge_and_notes_one_it_cannot_place(tmp_path, capsys):
    from modelatlas.cli.main import main

    make_ties_zoo(tmp_path)
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    assert "── ties  (ties merge of base, ft0, ft1 (mergekit_config.yml))" in capsys.readouterr().out
    (tmp_path / "ties" / "mergekit_config.yml").write_text(TIES.replace("org/ft0", "org/elsewhere"))
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    err = capsys.readouterr().err
    assert "ties: mergekit_config.yml declares a ties merge of models not all given (not found: org/elsewhere)" in err


def test_configs_that_are_no_mergekit_configs_say_why(tmp_path):
    make_folder(tmp_path, "nomodels", {"l0.weight": torch.zeros(2, 2)}, "merge_method: ties\n")
    assert declared_merge(tmp_path / "nomodels")["problem"] == "no models: not a mergekit config"
    big = make_folder(tmp_path, "big", {"l0.weight": torch.zeros(2, 2)}, "merge_method: ties\n# " + "x" * (1 << 20))
    assert declared_merge(big)["problem"] == f"over {1 << 20} bytes: no mergekit config"
    slices = "slices:\n  - sources:\n      - model: a\n      - model: b\nmerge_method: slerp\nbase_model: a\n"
    make_folder(tmp_path, "sl", {"l0.weight": torch.zeros(2, 2)}, slices)
    assert declared_merge(tmp_path / "sl") == {"method": "slerp", "base": "a", "models": ["a", "b"],
                                               "weights": [None, None], "file": str(tmp_path / "sl" / "mergekit_config.yml")}
