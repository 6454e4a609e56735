"""AWQ models placed under the model they were quantized from (:mod:`modelatlas.lineage.smoothed`).

The AWQ files are written as AutoAWQ does, from its description, by :mod:`modelatlas.zoo.awq`: factors c > 0 on
the input channels of the layers each norm feeds and on the v/o and up/down pairs, float16, 4-bit groups of
32, each group's range clipped first except for q_proj and k_proj.
"""

import torch

from modelatlas.lineage import recover_lineage
from modelatlas.lineage import smoothed as S
from modelatlas.lineage.sources import MemoryCheckpoint
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.awq import CONFIG, awq_model, save_folder
from modelatlas.zoo.awq import llama_model as make_llama


def test_awq_models_hang_below_their_own_sources(tmp_path):
    base = make_llama(0)
    models = {"base": base, "ft": make_llama(1, base, 0.01), "other": make_llama(2)}
    paths = [save_folder(tmp_path / n, m) for n, m in models.items()]
    paths += [save_folder(tmp_path / f"{n}-awq", awq_model(models[n]), CONFIG) for n in ("base", "ft")]
    forest = recover_lineage(paths)
    assert forest.decisions["duplicates"] == {"base-awq": "base", "ft-awq": "ft"}
    assert forest.decisions["precision_copies"] == {"base-awq": "awq-int4", "ft-awq": "awq-int4"}
    assert {(e.parent, e.child) for e in forest.edges if e.kind == "precision"} == {("base", "base-awq"), ("ft", "ft-awq")}


def test_the_factors_are_read_off_the_norms():
    source = MemoryCheckpoint("s", {"n.input_layernorm.weight": torch.tensor([1.0, 2.0])})
    copy = MemoryCheckpoint("c", {"n.input_layernorm.weight": torch.tensor([0.5, 4.0]).half()})  # g / (2, 0.5)
    c, slack = S.channel_factors(copy, source, "n.input_layernorm.weight")
    assert c.tolist() == [2.0, 0.5] and slack == 3 * 2.0**-11  # float16: the factor, product, quotient rounded
    flipped = MemoryCheckpoint("f", {"n.input_layernorm.weight": torch.tensor([-0.5, 4.0])})
    assert S.channel_factors(flipped, source, "n.input_layernorm.weight") is None  # AWQ's factors are > 0


def test_the_source_passes_every_code_and_a_fine_tune_does_not(tmp_path):
    """The tested layers: q_proj, k_proj, gate_proj of each block (their rows are not rescaled)."""
    base = make_llama(0)
    copy = open_checkpoint(save_folder(tmp_path / "q", awq_model(base), CONFIG))
    assert [fed for _, fed in S.smoothed_pairs(copy)][0] == ["model.layers.0.self_attn.q_proj.weight",
                                                             "model.layers.0.self_attn.k_proj.weight"]
    share = {n: S.smoothed_score(copy, MemoryCheckpoint(n, m), 0.0, plain=False) for n, m in (
        ("base", base), ("ft1", make_llama(1, base, 0.01, only="_proj")), ("other", make_llama(2)))}
    assert share["base"] == 1.0 and share["ft1"] < 0.999  # 1 % away: ~1.5 % of codes off the grid
    assert share["other"] < 0.9


def test_candidates_are_the_nearest_by_the_norm_folded_weights(tmp_path):
    base = make_llama(0)
    copy = open_checkpoint(save_folder(tmp_path / "q", awq_model(base), CONFIG))
    name = "model.layers.0.self_attn.q_proj.weight"
    as_stored = float((copy.read(name) - base[name].float()).norm() / base[name].float().norm())
    assert as_stored > 1.0  # rescaled by 0.25 .. 4 per column: as far as another model
    assert S.rescaled_distance(copy, MemoryCheckpoint("base", base)) < 0.15  # its 4-bit rounding only
    assert S.rescaled_distance(copy, MemoryCheckpoint("other", make_llama(2))) > 1.0


def test_an_awq_model_of_a_head_fine_tune_is_no_copy_of_the_base(tmp_path):
    """The plain matrices (embedding, head) must be the source's: AWQ leaves them as they are."""
    base = make_llama(0)
    head = make_llama(3, base, 0.05, only="lm_head")
    paths = [save_folder(tmp_path / "base", base), save_folder(tmp_path / "head-awq", awq_model(head), CONFIG)]
    forest = recover_lineage(paths)
    assert "head-awq" not in forest.decisions.get("duplicates", {})
    assert forest.decisions["quantized_models"] == {"head-awq": "awq-int4"}


def test_a_model_made_from_the_awq_weights_is_no_source_of_them(tmp_path):
    """A merge onto the dequantized AWQ model (its norms, its rescaled weights plus a small update) rounds to
    the same codes with factors 1, but sits on the levels: the AWQ model is its parent, not its copy."""
    base = make_llama(0)
    awq = save_folder(tmp_path / "base-awq", awq_model(base), CONFIG)
    deq = open_checkpoint(awq)
    merged = {t.name: deq.read(t.name) + (1e-5 * torch.randn(t.shape) if "_proj" in t.name else 0)
              for t in deq.tensors()}
    forest = recover_lineage([awq, save_folder(tmp_path / "merged", merged)])
    assert forest.decisions["made_from_quantized"] == {"merged": "base-awq"}
    assert "merged" not in forest.decisions.get("duplicates", {})
