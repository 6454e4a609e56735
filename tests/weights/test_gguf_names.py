import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelatlas.weights import open_checkpoint
from modelatlas.weights.gguf_names import conversion_of, gguf_view, permute_rows

gguf = pytest.importorskip("gguf")

E, HEADS, KV, FF = 16, 2, 1, 24  # width, query heads (head size 8), key/value heads, feed-forward


def make_hf_model(folder, arch="LlamaForCausalLM", seed=0, **config):
    """A 1-block Hugging Face decoder saved as ``folder``/model.safetensors + config.json (HF names)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (32, E), "model.norm.weight": (E,), "lm_head.weight": (32, E),
              "model.layers.0.input_layernorm.weight": (E,), "model.layers.0.post_attention_layernorm.weight": (E,),
              "model.layers.0.self_attn.q_proj.weight": (E, E), "model.layers.0.self_attn.k_proj.weight": (E // 2, E),
              "model.layers.0.self_attn.v_proj.weight": (E // 2, E), "model.layers.0.self_attn.o_proj.weight": (E, E),
              "model.layers.0.mlp.gate_proj.weight": (FF, E), "model.layers.0.mlp.up_proj.weight": (FF, E),
              "model.layers.0.mlp.down_proj.weight": (E, FF)}
    folder.mkdir(parents=True)
    save_file({k: torch.randn(s, generator=gen) for k, s in shapes.items()}, str(folder / "model.safetensors"))
    cfg = {"architectures": [arch], "num_attention_heads": HEADS, "num_key_value_heads": KV,
           "num_hidden_layers": 1, **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def check_rows(heads, d):
    """The converter's row order written out by hand: new row j of a head takes old row (j % 2) * d/2 + j // 2."""
    return [h * d + (j % 2) * (d // 2) + j // 2 for h in range(heads) for j in range(d)]


def test_permute_rows_by_hand():
    w = torch.arange(8.0)[:, None].repeat(1, 3)  # (8, 3): row i holds i
    assert permute_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_rows(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # one head: the halves interleave
    assert permute_rows(w, 2)[:, 0].tolist() == check_rows(2, 4)
    assert permute_rows(w, 3) is w  # 8 rows do not split into 3 heads: left as they are


def test_llama_view_renames_and_permutes_query_and_key(tmp_path):
    with open_checkpoint(make_hf_model(tmp_path / "m")) as hf:
        view = gguf_view(hf, "llama")
        assert view is not None and view.name == "m" and view.gguf_architecture == "llama"
        assert sorted(view.keys()) == sorted([
            "token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_norm.weight",
            "blk.0.ffn_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
            "blk.0.attn_output.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"])
        q, k = hf.read("model.layers.0.self_attn.q_proj.weight"), hf.read("model.layers.0.self_attn.k_proj.weight")
        assert torch.equal(view.read("blk.0.attn_q.weight"), q[check_rows(HEADS, E // HEADS)])
        assert torch.equal(view.read("blk.0.attn_k.weight"), k[check_rows(KV, E // HEADS)])  # key heads: KV
        assert torch.equal(view.read("blk.0.attn_v.weight"), hf.read("model.layers.0.self_attn.v_proj.weight"))
        assert view.info("blk.0.ffn_down.weight").shape == (E, FF)


def test_qwen2_keeps_the_row_order(tmp_path):
    with open_checkpoint(make_hf_model(tmp_path / "q", arch="Qwen2ForCausalLM")) as hf:
        view = gguf_view(hf, "qwen2")
        assert torch.equal(view.read("blk.0.attn_q.weight"), hf.read("model.layers.0.self_attn.q_proj.weight"))
        assert gguf_view(hf, "llama") is None  # another architecture's GGUF files: not mapped


def test_models_that_are_not_mapped(tmp_path):
    with open_checkpoint(make_hf_model(tmp_path / "g", arch="GemmaForCausalLM")) as hf:
        assert gguf_view(hf, "gemma") is None  # its norms are stored +1 by the converter: not listed
    with open_checkpoint(make_hf_model(tmp_path / "h")) as hf:
        assert gguf_view(hf, "llama", heads=4) is None  # the GGUF file lists other head counts
        assert gguf_view(hf, "llama", heads=HEADS, kv_heads=KV) is not None
    folder = make_hf_model(tmp_path / "bare")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}, str(tmp_path / "bare.safetensors"))
    with open_checkpoint(tmp_path / "bare.safetensors") as ck:
        assert gguf_view(ck, "llama") is None  # a lone file: no config.json of its own
    (folder / "config.json").write_text("{not json")
    with open_checkpoint(folder) as hf:
        assert gguf_view(hf, "llama") is None
    assert conversion_of({"architectures": ["LlamaForCausalLM"], "num_attention_heads": True}) == (
        "llama", True, None, None)  # a boolean is no head count


def test_a_name_the_converter_does_not_know_leaves_the_model_unmapped(tmp_path):
    folder = make_hf_model(tmp_path / "x")
    extra = {"model.layers.0.self_attn.q_proj.weight": torch.ones(E, E), "adapter.secret.weight": torch.ones(2, 2)}
    save_file(extra, str(folder / "model.safetensors"))
    with open_checkpoint(folder) as hf:
        assert gguf_view(hf, "llama") is None


def test_gguf_header_lists_architecture_and_head_counts(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen2")
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_checkpoint(tmp_path / "m.gguf") as ck:
        assert ck.architecture == "qwen2" and ck.head_counts() == (8, 2)
        assert ck.keys() == ["blk.0.attn_q.weight"]
