"""Copies found on the compared layers, checked on every other tensor (lineage.copies)."""

import numpy as np
import torch

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.copies import ROUNDOFF, differing_tensors, split_duplicates
from modelatlas.lineage.synthetic import make_synthetic_forest
from modelatlas.weights import open_checkpoint


def make_with_head(seed: int = 3) -> dict:
    """A synthetic forest whose models also hold a head (10 x 32) and a bias, both non-square: not compared."""
    weights, _ = make_synthetic_forest(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    head, bias = torch.randn(10, 32, generator=gen), torch.randn(32, generator=gen)
    return {n: {**w, "head.weight": head.clone(), "block.bias": bias.clone()} for n, w in weights.items()}


def make_checkpoint(tensors: dict, tmp_path, name: str):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    return open_checkpoint(tmp_path / f"{name}.safetensors")


def test_split_duplicates_keeps_the_first_of_each_group():
    rel = np.array([[0, 0.5, 0, 0.5], [0.5, 0, 0.5, 1e-9], [0, 0.5, 0, 0.5], [0.5, 1e-9, 0.5, 0]])
    assert split_duplicates(rel, [0, 1, 2, 3]) == ([0, 1], [(2, 0), (3, 1)])
    assert split_duplicates(rel, [1, 2]) == ([1, 2], [])  # a failed model (0) is no one's representative


def test_split_duplicates_prefers_the_higher_precision_original():
    rel = np.array([[0, 3e-4, 0.5], [3e-4, 0, 0.5], [0.5, 0.5, 0]])
    # model 0 is the float16 save (given first), model 1 its float32 original: 1 represents, 0 is the copy
    assert split_duplicates(rel, [0, 1, 2], roundoff=[ROUNDOFF["float16"], 0, 0]) == ([1, 2], [(0, 1)])
    # the same distance between two float32 models is a fine-tune, not a copy
    assert split_duplicates(rel, [0, 1, 2], roundoff=[0, 0, 0]) == ([0, 1, 2], [])
    # nor between two float16 models (both rounded: a nonzero difference is a real change)
    assert split_duplicates(rel, [0, 1, 2], roundoff=[ROUNDOFF["float16"]] * 3) == ([0, 1, 2], [])


def test_differing_tensors_names_each_kind_of_difference(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=gen), "head": torch.randn(3, 8, generator=gen),
            "bias": torch.randn(8, generator=gen), "steps": torch.tensor([7])}
    a = make_checkpoint(base, tmp_path, "a")
    assert differing_tensors(a, make_checkpoint({k: v.clone() for k, v in base.items()}, tmp_path, "same")) == []
    # a float16 save is float16 rounding away everywhere: no difference; the integer tensor is not compared
    half = {k: (v.half() if v.is_floating_point() else v + 1) for k, v in base.items()}
    assert differing_tensors(a, make_checkpoint(half, tmp_path, "half")) == []
    tuned = {**base, "head": base["head"] + 0.01, "bias": base["bias"] * 1.001}
    assert differing_tensors(a, make_checkpoint(tuned, tmp_path, "tuned")) == ["bias", "head"]  # file order
    assert differing_tensors(a, make_checkpoint(tuned, tmp_path, "tuned2"), skip={"head"}) == ["bias"]
    broken = {**base, "head": torch.randn(4, 8, generator=gen), "bias": base["bias"].clone()}
    broken["bias"][3] = float("inf")
    assert differing_tensors(a, make_checkpoint(broken, tmp_path, "broken")) == [
        "bias (NaN or inf values)", "head (shape (3, 8) vs (4, 8))"]
    # a tensor only one of them holds is not compared
    assert differing_tensors(a, make_checkpoint({"w": base["w"].clone()}, tmp_path, "part")) == []


def test_a_head_only_fine_tune_is_no_copy():
    weights = make_with_head()
    probe = {**weights["t0_1"], "head.weight": weights["t0_1"]["head.weight"] + 0.1}  # linear probing of t0_1
    bitfit = {**weights["t1"], "block.bias": weights["t1"]["block.bias"] * 1.01}  # BitFit of the root t1
    f = recover_lineage({**weights, "t0_1-probe": probe, "t0_1-probe-again": {k: v.clone() for k, v in probe.items()},
                         "t1-bitfit": bitfit, "t2-copy": {k: v.clone() for k, v in weights["t2"].items()}})
    edges = {e.child: e for e in f.edges}
    # before: "identical weights to t0_1" and "to t1"; now a training step of unknown direction beside them
    assert (edges["t0_1-probe"].parent, edges["t0_1-probe"].kind, edges["t0_1-probe"].score) == ("t0_1", "trained", 0.0)
    assert (edges["t1-bitfit"].parent, edges["t1-bitfit"].kind, edges["t1-bitfit"].distance) == ("t1", "trained", 0.0)
    assert f.decisions["outside_layers"] == {
        "t0_1-probe": {"like": "t0_1", "differs_in": ["head.weight"], "n_differing": 1},
        "t1-bitfit": {"like": "t1", "differs_in": ["block.bias"], "n_differing": 1}}
    # a second save of the probe is the probe's copy (not a second probe of t0_1); a true copy stays one
    assert f.decisions["duplicates"] == {"t0_1-probe-again": "t0_1-probe", "t2-copy": "t2"}
    assert edges["t0_1-probe-again"].kind == "duplicate" and edges["t2-copy"].parent == "t2"
    i = f.nodes.index("t0_1")
    assert f.nodes[i:i + 3] == ["t0_1", "t0_1-probe", "t0_1-probe-again"]
    tree = next(t for t in f.trees if "t0_1" in t)
    assert {"t0_1-probe", "t0_1-probe-again"} <= set(tree)


def test_copies_placed_outside_keep_the_rest_of_the_forest():
    weights = make_with_head(seed=5)
    plain = recover_lineage(weights)
    probe = {**weights["t1_0"], "head.weight": weights["t1_0"]["head.weight"] * 2}
    f = recover_lineage({**weights, "probe": probe})
    assert {(e.parent, e.child) for e in plain.edges} == {(e.parent, e.child) for e in f.edges if e.child != "probe"}
    assert f.kurtosis["probe"] == f.kurtosis["t1_0"]


def test_cli_says_which_tensors_differ(tmp_path, capsys):
    from safetensors.torch import save_file

    from modelatlas.cli.main import main

    weights = make_with_head()
    for name in ("t0", "t0_0", "t0_1", "t0_2"):
        save_file(weights[name], str(tmp_path / f"{name}.safetensors"))
    probe = {**weights["t0_2"], "head.weight": weights["t0_2"]["head.weight"] - 0.5}
    save_file(probe, str(tmp_path / "t0_2probe.safetensors"))  # after t0_2: the first given is placed above
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    out, err = capsys.readouterr()
    assert "    └── t0_2probe  (0.00)" in out and "identical" not in out
    assert "5 models, 1 equal to another on the compared layers only, 1 tree" in out
    assert ("t0_2probe: equal to t0_2 on the compared layers, but differs in head.weight: placed below it with score "
            "0 (which way it was trained cannot be told from the compared layers; a --layers pattern that takes in "
            "those tensors compares them)") in err


def test_trees_asked_for_count_a_model_equal_on_the_compared_layers_once():
    import pytest

    from modelatlas.errors import ConfigError

    weights = make_with_head()
    probe = {**weights["t0"], "head.weight": weights["t0"]["head.weight"] + 1}
    with pytest.raises(ConfigError, match=r"of 39 distinct model\(s\) \(copies, and models equal to another on the "
                                          r"compared layers, count once\); give a value in \[1, 39\]"):
        recover_lineage({**weights, "probe": probe}, n_trees=40)


def test_a_float32_save_of_float16_values_is_a_precision_copy_outside_the_layers_too():
    """A model rounded to float16 and saved back as float32 is a precision copy on the compared layers (by
    its values); its head, rounded the same way, was compared at float32 tolerance and made it 'equal to t2
    on the compared layers only', a training step of score 0."""
    weights = make_with_head(seed=3)
    up = {k: v.half().float() for k, v in weights["t2"].items()}
    f = recover_lineage({**weights, "t2-fp16": up})
    assert "outside_layers" not in f.decisions
    assert f.decisions["duplicates"] == {"t2-fp16": "t2"}
    assert f.decisions["precision_copies"] == {"t2-fp16": "float16"}


def test_a_float16_copy_of_a_small_bitfit_goes_to_the_bitfit_not_its_base():
    """A float16 copy (matrices rounded, the bias kept in float32, as GGUF keeps 1-D tensors) of a fine-tune of
    the bias alone, 1e-4 away: the bias is exact, so it tells the fine-tune from its base, though the change is
    below float16's unit roundoff."""
    weights = make_with_head(seed=3)
    gen = torch.Generator().manual_seed(1)
    bias = weights["t2"]["block.bias"]
    bitfit = {**weights["t2"], "block.bias": bias + 1e-4 * bias.abs().mean() * torch.randn(bias.shape, generator=gen)}
    f16 = {k: (v if k == "block.bias" else v.half()) for k, v in bitfit.items()}
    f = recover_lineage({**weights, "t2-bitfit": bitfit, "t2-bitfit-f16": f16})
    assert f.decisions["duplicates"] == {"t2-bitfit-f16": "t2-bitfit"}
    assert f.decisions["outside_layers"]["t2-bitfit"]["like"] == "t2"


def test_a_bfloat16_base_of_float32_fine_tunes_is_no_copy_of_them():
    """A bfloat16 base with float32 fine-tunes 0.2 % away (within bfloat16's unit roundoff, 0.39 %) was drawn as
    'lower-precision copy of ft', its fine-tune: the distance alone was taken for rounding. A copy is now also
    the source rounded to the copy's format, on the sampled rows; a float16 save of ft still is one."""
    gen = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(64, 64, generator=gen).bfloat16() for i in range(4)}
    ft = {k: v.float() + 0.002 * torch.randn(64, 64, generator=gen) for k, v in base.items()}
    ft2 = {k: v.float() + 0.002 * torch.randn(64, 64, generator=gen) for k, v in base.items()}
    f = recover_lineage({"base": base, "ft": ft, "ft2": ft2, "ft-f16": {k: v.half() for k, v in ft.items()}},
                        stage="specialize")
    assert f.decisions["precision_copies"] == {"ft-f16": "float16"}
    trained = {frozenset((e.parent, e.child)) for e in f.edges if e.kind == "trained"}  # the root is a guess here
    assert trained == {frozenset(("base", "ft")), frozenset(("base", "ft2"))}


def make_q8_base_and_q4_fine_tune(folder, step: float, seed: int = 5):
    """A base (not written) as base-q8_0.gguf, and a fine-tune ``step`` x its RMS away only as ft-q4_0.gguf (three
    64 x 256 layers), with a float32 fine-tune of the base 5 % away beside them (ft2.safetensors)."""
    from safetensors.torch import save_file

    from modelatlas.zoo.gguf import quantized, save_gguf

    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}
    ft = {k: v + step * torch.randn(64, 256, generator=gen) for k, v in base.items()}
    save_gguf(folder / "base-q8_0.gguf", {k: quantized(v, "Q8_0") for k, v in base.items()})
    save_gguf(folder / "ft-q4_0.gguf", {k: quantized(v, "Q4_0") for k, v in ft.items()})
    save_file({k: v + 0.05 * torch.randn(64, 256, generator=gen) for k, v in base.items()}, str(folder / "ft2.safetensors"))


def test_a_coarse_file_of_a_close_fine_tune_is_no_rounding_of_the_finer_files_model(tmp_path):
    """A Q4_0 file of a fine-tune 1.2 % away reads within the rounding energies of the base's Q8_0 file (its
    update is ~2 % of Q4_0's rounding energy): it was drawn as a Q4_0 rounding of the base, dropped from the
    tree. The Q8_0 values miss the Q4_0 file's levels on ~3x the share a rounding of one model does."""
    make_q8_base_and_q4_fine_tune(tmp_path, step=0.012)
    forest = recover_lineage(sorted(tmp_path.iterdir()))
    assert not forest.decisions.get("same_model_roundings")
    assert next(e for e in forest.edges if "ft-q4_0" in (e.child, e.parent)).kind == "trained"


def test_on_coarser_grid_by_hand(tmp_path):
    """Q8_0 values of the model a Q4_0 file rounds miss its levels on ~E|u8| / step4 (~1.6 %: under twice
    sqrt(ratio) / 4); those of a model 1.2 % away miss 3-4x that."""
    from modelatlas.lineage.copies import on_coarser_grid
    from modelatlas.zoo.gguf import quantized, save_gguf

    make_q8_base_and_q4_fine_tune(tmp_path, step=0.012)
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}  # the same base
    save_gguf(tmp_path / "base-q4_0.gguf", {k: quantized(v, "Q4_0") for k, v in base.items()})
    q8, q4, ft = (open_checkpoint(tmp_path / f) for f in ("base-q8_0.gguf", "base-q4_0.gguf", "ft-q4_0.gguf"))
    layers = q8.tensors()
    ratio = sum(float(q8.rounding_variance(t.name).sum()) for t in layers) / sum(
        float(q4.rounding_variance(t.name).sum()) for t in layers)
    assert on_coarser_grid(q4, q8, layers, ratio)
    assert not on_coarser_grid(ft, q8, layers, ratio)
    assert 0.005 < 1 - q4.grid_match("a.weight", q8.read("a.weight")) < 2 * np.sqrt(ratio) / 4


def test_on_coarser_grid_reads_only_the_compared_rows_of_the_finer_file(tmp_path, monkeypatch):
    """The finer file's layers were read whole (a 1B model's every compared layer dequantized) where the grid
    test compares 256 rows of them: only those rows are read, the same shares as from the whole layers."""
    from modelatlas.lineage.copies import on_coarser_grid
    from modelatlas.zoo.gguf import quantized, save_gguf

    gen = torch.Generator().manual_seed(3)
    base = {k: torch.randn(600, 64, generator=gen) for k in ("a.weight", "b.weight")}  # more rows than the 256 compared
    save_gguf(tmp_path / "q8.gguf", {k: quantized(v, "Q8_0") for k, v in base.items()})
    save_gguf(tmp_path / "q4.gguf", {k: quantized(v, "Q4_0") for k, v in base.items()})
    q8, q4 = open_checkpoint(tmp_path / "q8.gguf"), open_checkpoint(tmp_path / "q4.gguf")
    whole = [q4.grid_match(t.name, q8.read(t.name)) for t in q8.tensors()]
    read = []
    monkeypatch.setattr(q8, "read", lambda name: read.append(name))
    assert on_coarser_grid(q4, q8, q8.tensors(), 0.004) and not read
    rows = q4.compared_rows("a.weight")
    assert len(rows) == 256 and q4.grid_match("a.weight", q8.read_rows("a.weight", rows), rows=rows) == whole[0]
