import json
import math

import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError
from modelatlas.weights import discover_models, open_checkpoint

A = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # (r=2, in=3)
B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # (out=4, r=2)
# Hand-checked B @ A: rows are B's mixes of A's rows.
BA = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 1.0, 1.0], [2.0, 0.0, 4.0]])


def make_adapter(folder, tensors, fmt="safetensors", **config):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]} | config
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    full = {f"base_model.model.{k}": v.clone().contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        save_file(full, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(full, folder / "adapter_model.bin")
    return folder


def make_linear_adapter(folder, fmt="safetensors", **config):
    return make_adapter(folder, {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B},
                        fmt, **config)


def make_base(path, q_shape=(4, 3)):
    base = {"layers.0.q_proj.weight": torch.ones(q_shape), "layers.0.q_proj.bias": torch.zeros(q_shape[0]),
            "head.weight": torch.full((2, 4), 3.0)}
    save_file(base, str(path))
    return path, base


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_delta_is_scaled_b_at_a(tmp_path, fmt):
    with open_checkpoint(make_linear_adapter(tmp_path / "ad", fmt)) as ck:
        assert ck.kind == "lora_delta" and ck.name == "ad"
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [("layers.0.q_proj.weight", (4, 3), "float32")]
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), 2.0 * BA)  # alpha / r = 4 / 2


def test_rank_and_alpha_patterns_and_rslora(tmp_path):
    a1, b1 = A[:1], B[:, :1]  # rank 1 for one module
    tensors = {"blocks.0.mlp.lora_A.weight": A, "blocks.0.mlp.lora_B.weight": B,
               "blocks.1.attn.lora_A.weight": a1, "blocks.1.attn.lora_B.weight": b1,
               "blocks.2.attn.lora_A.weight": A, "blocks.2.attn.lora_B.weight": B}
    tensors = {k.replace("blocks.2.attn.lora_A", "blocks.2.attn.lora_A.default"): v for k, v in tensors.items()}
    folder = make_adapter(tmp_path / "ad", tensors, r=2, lora_alpha=4,
                          rank_pattern={"blocks.1.attn": 1}, alpha_pattern={"mlp": 8, "blocks.1.attn": 3})
    with open_checkpoint(folder) as ck:
        assert torch.allclose(ck.read("blocks.0.mlp.weight"), 4.0 * BA)  # 8 / 2
        assert torch.allclose(ck.read("blocks.1.attn.weight"), 3.0 * (b1 @ a1))  # 3 / 1
        assert torch.allclose(ck.read("blocks.2.attn.weight"), 2.0 * BA)  # global 4 / 2
    rs = make_linear_adapter(tmp_path / "rs", use_rslora=True, lora_alpha=4)
    with open_checkpoint(rs) as ck:
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), (4 / math.sqrt(2)) * BA)


def test_conv_lora_reshaped_to_conv_weight(tmp_path):
    a = torch.randn(2, 3, 3, 3)  # (r, in, k, k)
    b = torch.randn(5, 2, 1, 1)  # (out, r, 1, 1)
    folder = make_adapter(tmp_path / "conv", {"conv1.lora_A.weight": a, "conv1.lora_B.weight": b})
    with open_checkpoint(folder) as ck:
        assert ck.info("conv1.weight").shape == (5, 3, 3, 3)
        expected = 2.0 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        assert torch.allclose(ck.read("conv1.weight"), expected, atol=1e-6)


def test_fan_in_fan_out_and_embedding_are_transposed(tmp_path):
    folder = make_adapter(tmp_path / "gpt2", {"h.0.c_attn.lora_A.weight": A, "h.0.c_attn.lora_B.weight": B,
                                              "wte.lora_embedding_A": A, "wte.lora_embedding_B": B},
                          fan_in_fan_out=True)
    with open_checkpoint(folder) as ck:
        assert ck.info("h.0.c_attn.weight").shape == (3, 4)
        assert torch.allclose(ck.read("h.0.c_attn.weight"), 2.0 * BA.T)
        assert torch.allclose(ck.read("wte.weight"), 2.0 * BA.T)


@pytest.mark.parametrize("as_checkpoint", [False, True])
def test_merged_with_base(tmp_path, as_checkpoint):
    base_path, base = make_base(tmp_path / "base.safetensors")
    adapter = make_linear_adapter(tmp_path / "ad")
    base_arg = open_checkpoint(base_path) if as_checkpoint else base_path
    with open_checkpoint(adapter, base=base_arg) as ck:
        assert ck.kind == "full" and ck.name == "ad"
        assert sorted(ck.keys()) == sorted(base)
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), torch.ones(4, 3) + 2.0 * BA)
        assert torch.equal(ck.read("head.weight"), base["head.weight"])


def test_merged_modules_to_save_replace_base(tmp_path):
    base_path, _ = make_base(tmp_path / "base.safetensors")
    adapter = make_adapter(tmp_path / "ad", {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B,
                                             "head.weight": torch.zeros(2, 4)})
    with open_checkpoint(adapter) as ck:
        assert ck.keys() == ["layers.0.q_proj.weight"]  # a full weight is not a delta
    with open_checkpoint(adapter, base=base_path) as ck:
        assert torch.equal(ck.read("head.weight"), torch.zeros(2, 4))


def test_merge_shape_mismatch_names_module_and_shapes(tmp_path):
    base_path, _ = make_base(tmp_path / "base.safetensors", q_shape=(5, 3))
    with pytest.raises(CheckpointError, match=r"LoRA module 'layers.0.q_proj': update shape \(4, 3\) does not "
                                              r"match the base weight shape \(5, 3\)"):
        open_checkpoint(make_linear_adapter(tmp_path / "ad"), base=base_path)


def test_merge_module_missing_from_base(tmp_path):
    save_file({"other.weight": torch.ones(1)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(CheckpointError, match="LoRA module 'layers.0.q_proj' has no weight"):
        open_checkpoint(make_linear_adapter(tmp_path / "ad"), base=tmp_path / "base.safetensors")


def test_base_model_name_is_not_followed(tmp_path):
    base_path, _ = make_base(tmp_path / "base.safetensors")
    folder = make_linear_adapter(tmp_path / "ad", base_model_name_or_path=str(base_path))
    with open_checkpoint(folder) as ck:
        assert ck.kind == "lora_delta" and ck.keys() == ["layers.0.q_proj.weight"]


@pytest.mark.parametrize("config, tensors, message", [
    ({"peft_type": "PREFIX_TUNING"}, None, "unsupported peft_type 'PREFIX_TUNING'"),
    ({"r": None}, None, r"key 'r' is missing \(PEFT writes it; if the adapter was trained with PEFT's default, add \"r\": 8\)"),
    ({"lora_alpha": None}, None, "key 'lora_alpha' is missing"),
    ({"r": 3}, None, r"module 'layers.0.q_proj': rank 3 from adapter_config.json does not match"),
    ({}, {"layers.0.q_proj.lora_A.weight": A}, "module 'layers.0.q_proj' has no lora_B tensor"),
    ({}, {"x.weight": A}, "no LoRA tensors"),
])
def test_bad_adapters(tmp_path, config, tensors, message):
    folder = make_adapter(tmp_path / "ad", tensors or {"layers.0.q_proj.lora_A.weight": A,
                                                      "layers.0.q_proj.lora_B.weight": B}, **config)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(folder)
    assert "ad" in str(info.value)


def test_corrupt_config(tmp_path):
    folder = make_linear_adapter(tmp_path / "ad")
    (folder / "adapter_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: corrupt adapter config"):
        open_checkpoint(folder)


def test_adapter_folders_are_discovered_as_models(tmp_path):
    make_linear_adapter(tmp_path / "zoo" / "child-a")
    make_linear_adapter(tmp_path / "zoo" / "child-b", fmt="bin")
    assert [p.name for p in discover_models([tmp_path / "zoo"])] == ["child-a", "child-b"]


def test_dora_adapter_is_refused_not_misread(tmp_path):
    """DoRA rescales W + s * B @ A by a learned magnitude: reading only B @ A would be a wrong delta."""
    folder = make_adapter(tmp_path / "dora", {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B,
                                              "layers.0.q_proj.lora_magnitude_vector": torch.ones(4)}, use_dora=True)
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: key 'use_dora' is true"):
        open_checkpoint(folder)


def make_bias_adapter(folder, fmt="safetensors"):
    """PEFT ``lora_bias=True``: lora_B is a Linear with a bias, saved as ``<module>.lora_B.bias``."""
    return make_adapter(folder, {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B,
                                 "layers.0.q_proj.lora_B.bias": torch.tensor([1.0, -1.0, 0.5, 0.0])},
                        fmt, lora_bias=True)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_lora_bias_is_a_scaled_bias_delta(tmp_path, fmt):
    """PEFT merges ``bias += s * lora_B.bias``; the B weight must not be replaced by the bias (or vice versa)."""
    with open_checkpoint(make_bias_adapter(tmp_path / "ad", fmt)) as ck:
        assert [(t.name, t.shape) for t in ck.tensors()] == [("layers.0.q_proj.weight", (4, 3)),
                                                              ("layers.0.q_proj.bias", (4,))]
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), 2.0 * BA)
        assert torch.equal(ck.read("layers.0.q_proj.bias"), torch.tensor([2.0, -2.0, 1.0, 0.0]))  # s = 4 / 2


def test_lora_bias_merged_into_base_bias(tmp_path):
    base_path, base = make_base(tmp_path / "base.safetensors")  # q_proj.bias is zeros
    with open_checkpoint(make_bias_adapter(tmp_path / "ad"), base=base_path) as ck:
        assert torch.equal(ck.read("layers.0.q_proj.bias"), torch.tensor([2.0, -2.0, 1.0, 0.0]))
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), torch.ones(4, 3) + 2.0 * BA)


def test_lora_bias_without_base_bias_is_refused(tmp_path):
    save_file({"layers.0.q_proj.weight": torch.ones(4, 3)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(CheckpointError, match=r"LoRA module 'layers.0.q_proj' has no bias 'layers.0.q_proj.bias' "
                                              r"in the base"):
        open_checkpoint(make_bias_adapter(tmp_path / "ad"), base=tmp_path / "base.safetensors")


def test_bias_on_lora_a_is_refused_naming_the_key(tmp_path):
    folder = make_adapter(tmp_path / "ad", {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B,
                                            "layers.0.q_proj.lora_A.bias": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: .*'base_model\.model\.layers\.0\.q_proj"
                                              r"\.lora_A\.bias'"):
        open_checkpoint(folder)


@pytest.mark.parametrize("as_checkpoint", [False, True])
def test_an_adapter_as_the_base_is_refused(tmp_path, as_checkpoint):
    """Merging an update onto another update gives no model: the base must hold full weights."""
    parent = make_linear_adapter(tmp_path / "parent")
    base_arg = open_checkpoint(parent) if as_checkpoint else parent
    with pytest.raises(CheckpointError, match=r"child: base .*parent is itself a LoRA adapter \(a weight update, "
                                              r"not a model\); give the model it adapts"):
        open_checkpoint(make_linear_adapter(tmp_path / "child"), base=base_arg)


def test_an_adapter_of_an_adapter_merges_through_its_merged_parent(tmp_path):
    base_path, _ = make_base(tmp_path / "base.safetensors")
    parent = open_checkpoint(make_linear_adapter(tmp_path / "parent"), base=base_path)
    with open_checkpoint(make_linear_adapter(tmp_path / "child"), base=parent) as ck:
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), torch.ones(4, 3) + 4.0 * BA)


@pytest.mark.parametrize("config, message", [
    ({"rank_pattern": {"(a+)+$": 2}}, r"key 'rank_pattern': pattern '\(a\+\)\+\$' could take too long to match "
                                      r"\(a repeat inside a repeat\)"),
    ({"alpha_pattern": {"(qq|q)*_proj": 2}}, r"pattern '\(qq\|q\)\*_proj' .*\(a repeat of alternatives\)"),
    ({"rank_pattern": {r"[a-z.]*[a-z.]*x": 2}}, r"\(2 repeats \(at most 1\)\)"),
    ({"rank_pattern": {r"(q)\1": 2}}, r"\(a backreference\)"),
    ({"rank_pattern": {"q_proj": 0}}, r"key 'rank_pattern' entry 'q_proj' must be a positive number \(a whole one\), got 0"),
    ({"rank_pattern": {"q_proj": "x"}}, r"entry 'q_proj' must be a positive number \(a whole one\), got 'x'"),
    ({"alpha_pattern": {"q_proj": "x"}}, r"key 'alpha_pattern' entry 'q_proj' must be a positive number, got 'x'"),
    ({"rank_pattern": [1]}, r"key 'rank_pattern' must be an object of module pattern -> number, got list"),
    ({"lora_alpha": float("nan")}, r"key 'lora_alpha' must be a positive number, got nan"),
    ({"lora_alpha": float("inf")}, r"key 'lora_alpha' must be a positive number, got inf"),
    ({"r": 2.5}, r"key 'r' must be a positive number \(a whole one\), got 2.5"),
])
def test_bad_config_values_and_unsafe_patterns_are_named(tmp_path, config, message):
    """Each used to raise ZeroDivisionError / ValueError / TypeError, read as NaN or a truncated rank, or (the
    patterns: Python's re backtracks exponentially on them) hang on a module named like 'aaa...a!'."""
    folder = make_adapter(tmp_path / "ad", {("a" * 40 + "!.lora_A.weight"): A, ("a" * 40 + "!.lora_B.weight"): B},
                          **config)
    with pytest.raises(CheckpointError, match=rf"ad/adapter_config\.json: .*{message}") as info:
        open_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_safe_patterns_still_match(tmp_path):
    folder = make_linear_adapter(tmp_path / "ad", r=1, rank_pattern={r"layers\.\d+\.(q|k)_proj": 2},
                                 alpha_pattern={".*q_proj": 8})
    with open_checkpoint(folder) as ck:
        assert torch.allclose(ck.read("layers.0.q_proj.weight"), 4.0 * BA)  # alpha 8 / r 2


@pytest.mark.parametrize("text, message", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                           ('{"r": ' + "9" * 5000 + "}", "Exceeds the limit")])
def test_config_json_that_python_cannot_parse(tmp_path, text, message):
    folder = make_linear_adapter(tmp_path / "ad")
    (folder / "adapter_config.json").write_text(text)  # RecursionError / ValueError tracebacks before
    with pytest.raises(CheckpointError, match=rf"adapter_config\.json: corrupt adapter config: {message}"):
        open_checkpoint(folder)


@pytest.mark.parametrize("a, b", [(torch.tensor(2.0), B), (A[:, 0], B), (A, B[:, 0]), (A, B[:, :, None].expand(4, 2, 3))])
def test_factors_of_the_wrong_rank_are_refused(tmp_path, a, b):
    """A 0-d A raised IndexError, a 1-d A gave a (4,) 'update', a (4, 2, 3) B failed in the matmul."""
    folder = make_adapter(tmp_path / "ad", {"layers.0.q_proj.lora_A.weight": a, "layers.0.q_proj.lora_B.weight": b})
    with pytest.raises(CheckpointError, match=r"ad/adapter_model\.safetensors: module 'layers.0.q_proj': lora_A .* / "
                                              r"lora_B .* are not LoRA factors"):
        open_checkpoint(folder)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("a, b", [(A, B[:0]), (A[:, :0], B)])
def test_factors_with_a_zero_dimension_are_refused_naming_the_adapter_file(tmp_path, fmt, a, b):
    """The fuzzer's case 2435: a lying size in adapter_model.bin made lora_B (0, 2); the update's reshape then
    failed, named after the folder, not the damaged file."""
    folder = make_adapter(tmp_path / "ad", {"layers.0.q_proj.lora_A.weight": a, "layers.0.q_proj.lora_B.weight": b},
                          fmt)
    with pytest.raises(CheckpointError, match=rf"ad/adapter_model\.{fmt}: module 'layers.0.q_proj': lora_A .* / "
                                              r"lora_B .* have a dimension of size 0"):
        open_checkpoint(folder)


def test_an_update_too_large_for_memory_is_named(tmp_path, monkeypatch):
    import modelatlas.weights.peft_lora as peft_lora

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000 bytes")
    monkeypatch.setattr(peft_lora, "lora_delta", fail)
    with open_checkpoint(make_linear_adapter(tmp_path / "ad")) as ck:
        with pytest.raises(CheckpointError, match=r"ad: cannot compute the update of 'layers.0.q_proj.weight' "
                                                  r"\(4 x 3 float32\): DefaultCPUAllocator"):
            ck.read("layers.0.q_proj.weight")


def test_a_replaced_module_of_another_shape_is_refused(tmp_path):
    # modules_to_save saved a (5, 4) head over the base's (2, 4): the merged model listed (2, 4) and read (5, 4)
    base_path, _ = make_base(tmp_path / "base.safetensors")
    adapter = make_adapter(tmp_path / "ad", {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B,
                                             "head.weight": torch.zeros(5, 4)})
    with pytest.raises(CheckpointError, match=r"ad: saved module weight 'head\.weight' has shape \(5, 4\), the base "
                                              r"weight \(2, 4\)"):
        open_checkpoint(adapter, base=base_path)


def test_a_replaced_module_is_read_in_the_dtype_listed(tmp_path):
    # a bfloat16 modules_to_save weight over a float32 base was listed float32 and read bfloat16; PEFT copies it
    # into the base model's module, in the base's dtype
    base_path, _ = make_base(tmp_path / "base.safetensors")
    adapter = make_adapter(tmp_path / "ad", {"layers.0.q_proj.lora_A.weight": A, "layers.0.q_proj.lora_B.weight": B,
                                             "head.weight": torch.zeros(2, 4, dtype=torch.bfloat16)})
    with open_checkpoint(adapter, base=base_path) as ck:
        assert ck.info("head.weight").dtype == "float32" and ck.read("head.weight").dtype == torch.float32


def test_join_adapter_base_puts_the_base_first_once(tmp_path, make_adapter_family):
    from modelatlas.weights import join_adapter_base

    fam = make_adapter_family(tmp_path / "fam", n=2)
    models = [fam / "a0", fam / "base.safetensors", fam / "a1"]  # the base also given: kept once, first
    base, joined = join_adapter_base(fam / "base.safetensors", models)
    with base:
        assert base.kind == "full" and joined == [fam / "base.safetensors", fam / "a0", fam / "a1"]
    assert join_adapter_base(None, models) == (None, models)
    with pytest.raises(CheckpointError, match="a0: a lora delta"):
        join_adapter_base(fam / "a0", models)


def test_an_adapter_stores_its_factors_in_its_own_files(tmp_path):
    """An adapter's files hold lora_A (2, 3) and lora_B (4, 2), 14 numbers, not the (4, 3) update it exposes;
    merged onto a base it still stores those (the base's files are the base's). An atlas counted the update."""
    ad = make_linear_adapter(tmp_path / "ad")
    base, _ = make_base(tmp_path / "base.safetensors")
    for kwargs in ({}, {"base": base}):
        with open_checkpoint(ad, **kwargs) as ck:
            assert sorted((t.name, t.shape) for t in ck.stored_tensors()) == [
                ("base_model.model.layers.0.q_proj.lora_A.weight", (2, 3)),
                ("base_model.model.layers.0.q_proj.lora_B.weight", (4, 2))]
            assert sorted(ck.files()) == [ad / "adapter_config.json", ad / "adapter_model.safetensors"]
