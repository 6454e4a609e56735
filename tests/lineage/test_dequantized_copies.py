"""Lineage over GPTQ, compressed-tensors and float8 models: each read as float weights
(:mod:`modelatlas.weights.dequantized`) and placed as a lower-precision copy of the model it was quantized from,
not of a fine-tune of it, nor skipped."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import (
    make_bnb4,
    make_bnb8,
    make_gptq,
    make_mlx,
    make_mlx_mxfp4,
    make_mlx_mxfp8,
    make_mxfp4,
    make_nvfp4,
    make_pack_quantized,
)

from modelatlas.errors import ConfigError
from modelatlas.lineage import recover_lineage
from modelatlas.weights.packed_ints import pack, unpack

LAYERS = ("a.weight", "b.weight", "c.weight")


def make_weights(seed, base=None, step=0.0):
    """Three 512 x 64 layers: fresh, or ``base`` plus a relative change of ``step``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in LAYERS:
        noise = torch.randn(512, 64, generator=gen)
        out[k] = noise if base is None else base[k] + step * noise * base[k].std()
    return out


def make_folder(folder, tensors, quantization_config):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": quantization_config}))


def make_gptq_like(weights, seed=0):
    """GPTQ tensors of ``weights`` as GPTQ leaves them: the first input column plain rounding, 30 % of the
    other codes moved one step (its error compensation)."""
    out = {}
    for k in LAYERS:
        name = k.removesuffix(".weight")
        t = make_gptq(weights[k], group=32, name=name)
        q = unpack(t[f"{name}.qweight"], 4, 0)  # (in, out)
        moved = torch.rand(q.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
        moved[0] = False
        t[f"{name}.qweight"] = pack((q + moved.int()).clamp(0, 15), 4, 0)
        out.update(t)
    return out


def make_fp8(weights):
    out = {}
    for k in LAYERS:
        scale = weights[k].abs().amax(1, keepdim=True) / 448  # (rows, 1): one per channel
        out[k], out[k + "_scale"] = (weights[k] / scale).to(torch.float8_e4m3fn), scale
    return out


def test_quantized_models_hang_below_their_sources(tmp_path):
    p = make_weights(0)
    kids = {f"ft{i}": make_weights(10 + i, p, step=0.05) for i in range(2)}
    for name, w in {"p": p, **kids}.items():
        save_file(w, tmp_path / f"{name}.safetensors")
    packed = {}
    for k in LAYERS:
        packed.update(make_pack_quantized(p[k], group=32, name=k.removesuffix(".weight")))
    make_folder(tmp_path / "p-w4a16", packed, {"quant_method": "compressed-tensors", "format": "pack-quantized"})
    make_folder(tmp_path / "ft0-gptq", make_gptq_like(kids["ft0"]), {"quant_method": "gptq", "bits": 4})
    make_folder(tmp_path / "ft1-fp8", make_fp8(kids["ft1"]), {"quant_method": "compressed-tensors"})
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    copies = {(e.parent, e.child) for e in forest.edges if e.kind == "precision"}
    assert copies == {("p", "p-w4a16"), ("ft0", "ft0-gptq"), ("ft1", "ft1-fp8")}
    assert forest.decisions["precision_copies"] == {"p-w4a16": "int4", "ft0-gptq": "gptq-int4", "ft1-fp8": "fp8"}
    assert {(e.parent, e.child) for e in forest.edges if e.kind == "trained"} == {("p", "ft0"), ("p", "ft1")}


def test_a_gptq_model_of_a_source_not_in_the_set_is_a_fine_tune_of_the_nearest(tmp_path):
    """Its source missing, no model rounds to its first column: it is placed by distance, as a model."""
    p = make_weights(0)
    ft = make_weights(10, p, step=0.05)
    save_file(p, tmp_path / "p.safetensors")
    make_folder(tmp_path / "ft-gptq", make_gptq_like(ft), {"quant_method": "gptq", "bits": 4})
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert [(e.parent, e.child, e.kind) for e in forest.edges] == [("p", "ft-gptq", "trained")]
    assert forest.decisions["quantized_models"] == {"ft-gptq": "gptq-int4"}  # said, not left to guess


def test_the_cli_says_which_quantized_models_have_no_source_among_the_models(tmp_path, capsys):
    from modelatlas.cli.main import main

    p = make_weights(0)
    save_file(p, tmp_path / "p.safetensors")
    make_folder(tmp_path / "ft-gptq", make_gptq_like(make_weights(10, p, step=0.05)), {"quant_method": "gptq"})
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    assert capsys.readouterr().err.startswith("ft-gptq: quantized (gptq-int4), and no model given is the one it was "
                                              "quantized from: placed as a model of its own")


def check_copies_below_their_sources(tmp_path, copies: dict) -> None:
    """Write p, its fine-tune ft and ``copies`` (folder -> (source "p" / "ft", layer writer, quantization config,
    label)); lineage must draw each copy as a precision copy below its source, labelled."""
    models = {"p": make_weights(0)}
    models["ft"] = make_weights(10, models["p"], step=0.05)
    for name, w in models.items():
        save_file(w, tmp_path / f"{name}.safetensors")
    for folder, (source, write, config, _) in copies.items():
        tensors = {}
        for k in LAYERS:
            tensors.update(write(models[source][k], name=k.removesuffix(".weight")))
        make_folder(tmp_path / folder, tensors, config)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert forest.decisions["precision_copies"] == {folder: c[3] for folder, c in copies.items()}
    assert {(e.parent, e.child, e.kind) for e in forest.edges} == {("p", "ft", "trained")} | {
        (c[0], folder, "precision") for folder, c in copies.items()}


def test_bitsandbytes_models_hang_below_their_sources(tmp_path):
    check_copies_below_their_sources(tmp_path, {
        "ft-nf4": ("ft", make_bnb4, {"quant_method": "bitsandbytes", "load_in_4bit": True}, "nf4"),
        "p-int8": ("p", make_bnb8, {"quant_method": "bitsandbytes", "load_in_8bit": True}, "llm-int8")})


def test_fp4_models_hang_below_their_sources(tmp_path):
    """An NVFP4 copy of p and an MXFP4 copy of its fine-tune ft (compressed-tensors' layouts) are drawn as
    their precision copies: rounding the source with the stored scales gives every code, ft's other values not."""
    check_copies_below_their_sources(tmp_path, {
        "p-nvfp4": ("p", make_nvfp4, {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}, "nvfp4"),
        "ft-mxfp4": ("ft", make_mxfp4, {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized"},
                     "mxfp4")})


def test_mlx_models_hang_below_their_sources(tmp_path):
    """An MLX affine copy of p, MLX mxfp4 and mxfp8 copies of ft (mlx-lm's layouts, config.json's "quantization")
    are drawn as their precision copies. Before session 36 the mxfp4 / mxfp8 models got no edge (their layers read
    as uint32 words)."""
    check_copies_below_their_sources(tmp_path, {
        "p-mlx-4bit": ("p", lambda w, name: make_mlx(w, bits=4, group=32, name=name), {"group_size": 32, "bits": 4},
                       "mlx-4bit"),
        "ft-mlx-mxfp4": ("ft", make_mlx_mxfp4, {"group_size": 32, "bits": 4, "mode": "mxfp4"}, "mxfp4"),
        "ft-mlx-mxfp8": ("ft", make_mlx_mxfp8, {"group_size": 32, "bits": 8, "mode": "mxfp8"}, "mxfp8")})


def test_a_layers_pattern_naming_stored_parts_says_which_layer_to_name(tmp_path):
    """`--layers weight_packed` said 'no tensor matches the layers pattern' of a model that plainly holds
    a.weight_packed: the reader hides the stored parts and reads the layer as a.weight."""
    p = make_weights(0)
    packed = {}
    for k in LAYERS:
        packed.update(make_pack_quantized(p[k], group=32, name=k.removesuffix(".weight")))
    save_file(p, tmp_path / "p.safetensors")
    make_folder(tmp_path / "p-w4a16", packed, {"quant_method": "compressed-tensors"})
    with pytest.raises(ConfigError, match=r"p-w4a16: the layers pattern 'a\\\.weight_packed' matches only "
                                          r"a\.weight_packed, a stored part of the quantized layer a\.weight, which "
                                          r"is read dequantized under that name: match the layer's name"):
        recover_lineage(sorted(tmp_path.iterdir()), layers=r"a\.weight_packed", stage="specialize")


NF4 = (make_bnb4, {"quant_method": "bitsandbytes", "load_in_4bit": True})
NVFP4 = (make_nvfp4, {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"})


def make_qlora(folder, source=False, base_name="base-nf4", quantize=NF4):
    """``base_name`` (NF4 of make_weights(0), or another ``quantize``: (layer writer, config); with ``source``,
    that model too, as src) and merged0, merged1: its dequantized values plus a small rank-4 update each, saved
    in bfloat16, as a QLoRA merge is."""
    from modelatlas.weights import open_checkpoint

    base, src = {}, make_weights(0)
    for k in LAYERS:
        base.update(quantize[0](src[k], name=k.removesuffix(".weight")))
    make_folder(folder / base_name, base, quantize[1])
    if source:
        save_file(src, folder / "src.safetensors")
    nf4, gen = open_checkpoint(folder / base_name), torch.Generator().manual_seed(1)
    for i in range(2):
        merged = {k: (nf4.read(k) + torch.randn(512, 4, generator=gen) @ torch.randn(4, 64, generator=gen) * 1e-3)
                  .to(torch.bfloat16) for k in LAYERS}
        save_file(merged, folder / f"merged{i}.safetensors")


@pytest.mark.parametrize("rounding", [True, False])
def test_a_qlora_merge_is_no_source_of_its_quantized_base(tmp_path, capsys, monkeypatch, rounding):
    """A QLoRA merge (the dequantized NF4 base plus a small low-rank update, saved in bfloat16) quantizes back
    to the base's codes: the NF4 base was drawn as 'nf4 copy of' each merge, the wrong way round. The merges'
    values sit on the base's levels, a source's do not. Without the rounding taken out of the kurtosis
    (``rounding=False``), the votes drew the base below merged0, and it is rooted there by the levels."""
    from modelatlas.cli.main import main
    from modelatlas.lineage import rounding

    if not rounding:
        monkeypatch.setattr(rounding, "rounding_sums", lambda *a: None)
    make_qlora(tmp_path)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert forest.decisions["made_from_quantized"] == {"merged0": "base-nf4", "merged1": "base-nf4"}
    assert not [e for e in forest.edges if e.kind == "precision"]
    assert forest.roots() == ["base-nf4"]
    assert forest.decisions.get("rooted_at_quantized_base") == (None if rounding else ["base-nf4"])
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    assert "merged0: made from base-nf4's dequantized weights (its values sit on base-nf4's levels" in \
        capsys.readouterr().err


def test_edges_turned_round_by_the_levels_score_their_placement_margin(tmp_path, monkeypatch):
    """The levels root the tree at base-nf4 (the votes drew it below merged0): every edge's direction is then
    known, as below an adapters' base, so its score is its placement margin 1 - d(edge) / d(merged0, merged1).
    The edge turned round kept the votes' score of the other way, 0.00; root confidence was 1.0 already."""
    from modelatlas.lineage import LineageRecovery, rounding

    monkeypatch.setattr(rounding, "rounding_sums", lambda *a: None)
    make_qlora(tmp_path)
    est = LineageRecovery(stage="specialize").fit(sorted(tmp_path.iterdir()))
    assert est.decisions_["rooted_at_quantized_base"] == ["base-nf4"] and est.decisions_["root_confidence"] == [1.0]
    d = est.distances_  # base-nf4, merged0, merged1
    score = {e.child: e.score for e in est.edges_ if e.parent == "base-nf4"}
    assert score == {"merged0": pytest.approx(1 - d[0, 1] / d[1, 2]), "merged1": pytest.approx(1 - d[0, 2] / d[1, 2])}
    assert score == {"merged0": pytest.approx(0.28, abs=0.01), "merged1": pytest.approx(0.29, abs=0.01)}  # was 0.00, 0.21


def test_a_qlora_base_quantized_from_a_given_model_roots_that_model(tmp_path):
    """base-nf4 is src's NF4 copy, drawn beside src; the merges made from it descend from src. The votes drew
    src below merged1, and the tree was rooted at base-nf4 across its precision edge: src drawn as the 'nf4
    copy' of its own NF4 rounding. The tree is rooted at src, the model the copy stands for."""
    make_qlora(tmp_path, source=True)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert forest.decisions["precision_copies"] == {"base-nf4": "nf4"}
    assert forest.roots() == ["src"] and forest.decisions["rooted_at_quantized_base"] == ["src"]
    assert ("src", "base-nf4", "precision") in {(e.parent, e.child, e.kind) for e in forest.edges}
    assert forest.parents()["merged0"] in ("src", "merged1") and forest.parents()["merged1"] in ("src", "merged0")


def test_a_merge_of_a_dequantized_nvfp4_base_is_its_child(tmp_path):
    """The QLoRA case over NVFP4: merges of the base's dequantized values plus a small low-rank update round
    back to its codes, and FP4 had no grid_position, so base-nvfp4 was drawn as the 'nvfp4 copy of' merged0,
    the wrong way round. The merges' values sit on the base's E2M1 levels (times each block's scale): made from
    it, they are its children, and it roots the tree."""
    make_qlora(tmp_path, base_name="base-nvfp4", quantize=NVFP4)
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="specialize")
    assert forest.decisions["made_from_quantized"] == {"merged0": "base-nvfp4", "merged1": "base-nvfp4"}
    assert not [e for e in forest.edges if e.kind == "precision"]
    assert forest.parents() == {"base-nvfp4": None, "merged0": "base-nvfp4", "merged1": "base-nvfp4"}  # was
    # merged1 the root, base-nvfp4 its precision copy
