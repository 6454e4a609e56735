import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_evil

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.sources import MemoryCheckpoint, group_by_architecture
from modelatlas.lineage.synthetic import make_synthetic_forest
from modelatlas.weights import open_checkpoint


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


MLP = ("0.weight", "2.weight", "4.weight")  # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) of 16 x 16 layers


def test_lightning_fine_tunes_of_a_plain_base_are_one_architecture(tmp_path, make_lightning_ckpt):
    """base.safetensors (names "0.weight") <- ft.ckpt <- ft2.ckpt, Lightning saves of a LightningModule holding
    the network as self.model ("model.0.weight"): they were two architecture groups, never linked."""
    weights, _ = make_synthetic_forest(n_trees=1, children=1, depth=2, dim=16, seed=0, layers=MLP)
    save_file(weights["t0"], str(tmp_path / "base.safetensors"))
    for name, src in (("ft", "t0_0"), ("ft2", "t0_0_0")):
        make_lightning_ckpt(tmp_path / f"{name}.ckpt", {f"model.{k}": v for k, v in weights[src].items()})
    forest = recover_lineage([tmp_path])  # a folder: the .ckpt files in it are found
    assert forest.nodes == ["base", "ft", "ft2"] and forest.decisions["architectures"] == 1
    assert [(e.parent, e.child) for e in forest.edges] == [("base", "ft"), ("ft", "ft2")]
    assert forest.skipped == {}


def make_prefixed_models():
    """A bare network, its wrapper-module save ("model."), a wrapper of the wrapper, and near misses: another
    shape, another name after the prefix, two first components, a prefixed model with no bare match."""
    w = torch.arange(16.0).reshape(4, 4)
    return {"bare": {"x.w": w}, "wrapped": {"model.x.w": w + 1, "head": torch.ones(3)},
            "twice": {"model.net.x.w": w + 2}, "net": {"net.x.w": w + 3}, "shape": {"model.x.w": torch.ones(3, 3)},
            "renamed": {"model.y.w": w}, "two": {"enc.x.w": w, "dec.x.w": w}, "alone": {"model.z.w": w}}


def test_groups_differing_only_by_a_first_component_are_merged_nothing_else():
    ckpts = [MemoryCheckpoint(n, t) for n, t in make_prefixed_models().items()]
    groups, rules, skipped = group_by_architecture(ckpts, None)
    assert [([c.name for c in members], [t.name for t in layers]) for members, layers in groups] == [
        (["bare", "wrapped", "twice", "net"], ["x.w"]), (["shape"], ["model.x.w"]), (["renamed"], ["model.y.w"]),
        (["two"], ["dec.x.w", "enc.x.w"]), (["alone"], ["model.z.w"])]
    assert rules == ["square matrices"] * 5 and skipped == {}
    members = groups[0][0]
    assert [c.name_prefix for c in members] == ["", "model.", "model.net.", "net."]
    assert [float(c.read("x.w")[0, 0]) for c in members] == [0.0, 1.0, 2.0, 3.0]  # each its own tensor
    assert members[1].keys() == ["x.w"] and members[1].inner is ckpts[1]  # "head" is outside the prefix


def test_a_model_of_integer_packed_weights_is_skipped_saying_why():
    """A GPTQ model's only float matrices are its scales: two of them were compared by their scales alone,
    with no word, and drawn as two trees."""
    gen = torch.Generator().manual_seed(0)
    gptq = {"q.qweight": torch.randint(0, 2**30, (8, 64), dtype=torch.int32, generator=gen),
            "q.scales": torch.randn(2, 64, generator=gen).half(), "norm.weight": torch.randn(64, generator=gen)}
    bnb = {"q.weight": torch.randint(0, 255, (512, 1), dtype=torch.uint8, generator=gen),
           "q.weight.absmax": torch.rand(16, generator=gen), "k.weight": torch.randn(8, 8, generator=gen)}
    plain = {"q.weight": torch.randn(8, 8, generator=gen)}
    models = {"gptq": MemoryCheckpoint("gptq", gptq), "bnb": MemoryCheckpoint("bnb", bnb),
              "plain": MemoryCheckpoint("plain", plain)}
    groups, _, skipped = group_by_architecture(list(models.values()), None)
    assert [[m.name for m in g] for g, _ in groups] == [["plain"]]
    assert "by 3-bit GPTQ (or AWQ without its quantization_config) quantization ('q.qweight'), which is not unpacked here" in skipped["gptq"]
    assert "by bitsandbytes 4-bit quantization ('q.weight.absmax')" in skipped["bnb"]
    # asked for by a pattern, its float matrices are compared
    groups, _, skipped = group_by_architecture([models["gptq"]], "scales")
    assert skipped == {} and [t.name for t in groups[0][1]] == ["q.scales"]


def make_index_naming_the_wrong_shard(folder):
    """A sharded folder whose index puts tensor 'a.w' in a shard that does not hold it."""
    folder.mkdir()
    save_file({"a.w": torch.zeros(4, 4)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b.w": torch.ones(4, 4)}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a.w": "model-00002-of-00002.safetensors", "b.w": "model-00002-of-00002.safetensors"}}')
    return folder


def test_a_shard_index_naming_the_wrong_shard_skips_that_model_only(tmp_path):
    """The index is read when the tensors are first listed (the packed-weights check): that error ended the
    whole run ('error: ...') instead of skipping the one model."""
    bad = make_index_naming_the_wrong_shard(tmp_path / "bad")
    good = MemoryCheckpoint("good", {"a.w": torch.zeros(4, 4)})
    groups, _, skipped = group_by_architecture([good, open_checkpoint(bad)], None)
    assert [[m.name for m in g] for g, _ in groups] == [["good"]]
    assert "puts tensor 'a.w' in shard 'model-00002-of-00002.safetensors', which has no such tensor" in skipped["bad"]


def test_float_weights_named_like_packed_ones_are_compared():
    """A plain model whose own parameters are named q_weight (a custom attention) or SCB was skipped as EXL2 /
    bitsandbytes: the packed-weights check read the names alone, not that packed weights are integers."""
    gen = torch.Generator().manual_seed(0)
    custom = {"attn.q_weight": torch.randn(8, 8, generator=gen), "k.weight": torch.randn(8, 8, generator=gen),
              "k.SCB": torch.randn(8, generator=gen)}
    groups, _, skipped = group_by_architecture([MemoryCheckpoint("custom", custom)], None)
    assert skipped == {} and [t.name for t in groups[0][1]] == ["attn.q_weight", "k.weight"]


def test_a_sharded_folder_with_a_shard_that_would_run_code_is_skipped_and_runs_nothing(tmp_path):
    """A shard is first unpickled when the tensors are listed; its refusal ended the whole run before."""
    marker, evil = tmp_path / "pwned", tmp_path / "zoo" / "evil"
    evil.mkdir(parents=True)
    torch.save({"a.w": torch.zeros(4, 4), "x": make_evil(marker)}, evil / "pytorch_model-00001-of-00001.bin")
    (evil / "pytorch_model.bin.index.json").write_text('{"weight_map": {"a.w": "pytorch_model-00001-of-00001.bin"}}')
    for name in ("p", "c"):
        save_file({"a.w": torch.randn(4, 4)}, tmp_path / "zoo" / f"{name}.safetensors")
    forest = recover_lineage([tmp_path / "zoo"], stage="specialize")
    assert set(forest.nodes) == {"p", "c"} and "refused to unpickle" in forest.skipped["evil"]
    assert not marker.exists()


def test_a_model_of_float8_weights_with_scales_is_skipped_saying_why():
    """FP8 checkpoints (DeepSeek's weight_scale_inv blocks, vLLM's weight_scale) were compared by their stored
    float8 values, which are the weights only once multiplied by the scales."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=gen)
    blocks = {"q.weight": w.to(torch.float8_e4m3fn), "q.weight_scale_inv": torch.rand(1, 1, generator=gen)}
    per_tensor = {"k.weight": w.to(torch.float8_e4m3fn), "k.weight_scale": torch.tensor(0.5)}
    plain_fp8 = {"k.weight": w.to(torch.float8_e4m3fn)}  # float8 alone: its values are its weights
    float_scale = {"k.weight": w, "k.weight_scale": torch.tensor(0.5)}  # a float weight beside a 'scale': a model
    models = [MemoryCheckpoint(n, t) for n, t in (("blocks", blocks), ("per_tensor", per_tensor),
                                                   ("plain_fp8", plain_fp8), ("float_scale", float_scale))]
    groups, _, skipped = group_by_architecture(models, None)
    assert sorted(skipped) == ["blocks", "per_tensor"]
    assert "float8 values with scales ('q.weight_scale_inv'), which are not applied here" in skipped["blocks"]
    assert sorted(m.name for g, _ in groups for m in g) == ["float_scale", "plain_fp8"]


def test_a_prefixed_view_asks_its_model_under_the_full_name():
    """Quantization queries reach the wrapped model under its own names (grid_position did not: a QLoRA merge
    of a prefixed quantized base was never found made from it)."""
    from modelatlas.lineage.sources import PrefixedView

    class Quantized(MemoryCheckpoint):
        def quantization(self, name):
            return "Q8_0" if name == "model.w" else None

        def grid_position(self, name, x, rows=None):
            return 0.25 if name == "model.w" and rows is None else 0.5 if name == "model.w" else None

        def rounding_variance(self, name, values=None):
            return torch.full((2, 2), 0.5) + (0 if values is None else values) if name == "model.w" else None

        def compared_rows(self, name, max_rows=256):
            return torch.tensor([1]) if name == "model.w" else None

        def rounding_moments(self, name):  # (an AWQ model read unsmoothed has them: lineage.unsmoothed)
            return torch.tensor([1.0, 2, 3, 4], dtype=torch.float64) if name == "model.w" else None

        def least_squares(self, name):
            return name == "model.w" or None

        def grid_match(self, name, x, slack=0.0, rows=None):
            return 0.75 if name == "model.w" and rows is not None else None

    view = PrefixedView(Quantized("q", {"model.w": torch.arange(4.0).reshape(2, 2)}), "model.")
    assert view.compared_rows("w").tolist() == [1] and view.read_rows("w", torch.tensor([1])).tolist() == [[2.0, 3.0]]
    assert view.quantization("w") == "Q8_0" and view.grid_position("w", torch.ones(2, 2)) == 0.25
    assert view.grid_position("w", torch.ones(1, 2), rows=torch.tensor([1])) == 0.5  # the rows passed on
    assert torch.equal(view.rounding_variance("w"), torch.full((2, 2), 0.5))
    assert torch.equal(view.rounding_variance("w", torch.ones(2, 2)), torch.full((2, 2), 1.5))  # values passed on
    assert view.rounding_moments("w").tolist() == [1.0, 2, 3, 4]  # was the default's None: the uniform correction
    assert view.least_squares("w") is True  # was the default's None: a fitted legacy file read as rounded
    assert view.grid_match("w", torch.ones(1, 2), rows=torch.tensor([1])) == 0.75  # the rows passed on
