import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tests.weights.conftest import make_byte_counter

from modelatlas.weights import gguf_names, open_checkpoint
from modelatlas.weights.gguf_names import (
    CONVERSIONS,
    conversion_of,
    gguf_attempt,
    gguf_view,
    permute_rows,
    regroup_qkv,
)

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
    cfg = {"num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": 1, **config}
    return make_named_model(folder, {k: torch.randn(s, generator=gen) for k, s in shapes.items()}, arch, **cfg)


def make_named_model(folder, tensors, arch, **config):
    """``tensors`` saved as ``folder``/model.safetensors beside a config.json naming ``arch``."""
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], **config}))
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


def test_llama_query_and_key_biases_are_permuted_as_their_rows(tmp_path):
    """convert_hf_to_gguf.py permutes q_proj.bias / k_proj.bias with their weights (a Llama saved with
    attention_bias=True); the view left them in Hugging Face order. OLMo's converter permutes weights only."""
    biases = {"model.layers.0.self_attn.q_proj.bias": torch.arange(8.0), "model.layers.0.self_attn.k_proj.bias":
              torch.arange(4.0), "model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8)}
    for arch, gguf_arch, q, k in (("LlamaForCausalLM", "llama", [0, 2, 1, 3, 4, 6, 5, 7], [0, 2, 1, 3]),
                                  ("MistralForCausalLM", "llama", [0, 2, 1, 3, 4, 6, 5, 7], [0, 2, 1, 3]),
                                  ("OlmoForCausalLM", "olmo", list(range(8)), list(range(4)))):
        folder = make_named_model(tmp_path / arch, biases, arch, num_attention_heads=2, num_key_value_heads=1,
                                  num_hidden_layers=1)
        with open_checkpoint(folder) as hf:
            view = gguf_view(hf, gguf_arch)
            assert view.read("blk.0.attn_q.bias").tolist() == q, arch  # per head of 4: (2, 2) -> (2, 2)
            assert view.read("blk.0.attn_k.bias").tolist() == k, arch  # one key head
            assert view.info("blk.0.attn_q.bias").shape == (8,)


def test_qwen2_keeps_the_row_order(tmp_path):
    with open_checkpoint(make_hf_model(tmp_path / "q", arch="Qwen2ForCausalLM")) as hf:
        view = gguf_view(hf, "qwen2")
        assert torch.equal(view.read("blk.0.attn_q.weight"), hf.read("model.layers.0.self_attn.q_proj.weight"))
        assert gguf_view(hf, "llama") is None  # another architecture's GGUF files: not mapped


def test_models_that_are_not_mapped(tmp_path):
    with open_checkpoint(make_hf_model(tmp_path / "g", arch="MixtralForCausalLM")) as hf:
        assert gguf_view(hf, "llama") is None  # its experts are stacked by the converter: not listed
    with open_checkpoint(make_hf_model(tmp_path / "h")) as hf:
        assert gguf_view(hf, "llama", heads=4) is None  # the GGUF file lists other head counts
        assert gguf_attempt(hf, "llama", heads=4) == f"its head counts ({HEADS}, {KV}) are not the GGUF files' (4, None)"
        assert gguf_attempt(hf, "qwen2") is None  # another architecture: no reason to give
        assert gguf_view(hf, "llama", heads=HEADS, kv_heads=KV) is not None
    folder = make_hf_model(tmp_path / "bare")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4)}, str(tmp_path / "bare.safetensors"))
    with open_checkpoint(tmp_path / "bare.safetensors") as ck:
        assert gguf_view(ck, "llama") is None  # a lone file: no config.json of its own
    (folder / "config.json").write_text("{not json")
    with open_checkpoint(folder) as hf:
        assert gguf_view(hf, "llama") is None
    assert conversion_of({"architectures": ["LlamaForCausalLM"], "num_attention_heads": True}) == (
        CONVERSIONS["LlamaForCausalLM"], None, None)  # a boolean is no head count


def test_a_name_the_converter_does_not_know_leaves_the_model_unmapped(tmp_path):
    folder = make_hf_model(tmp_path / "x")
    extra = {"model.layers.0.self_attn.q_proj.weight": torch.ones(E, E), "adapter.secret.weight": torch.ones(2, 2)}
    save_file(extra, str(folder / "model.safetensors"))
    with open_checkpoint(folder) as hf:
        assert gguf_view(hf, "llama") is None
        assert gguf_attempt(hf, "llama") == "tensor adapter.secret.weight has no GGUF name of its own"


def test_a_depth_no_transformer_has_is_not_mapped(tmp_path, monkeypatch):
    """gguf's name table holds ~270 names per block, built in ~1 ms per block: a config.json saying 10**6 layers,
    or one tensor named model.layers.1000000..., made gguf_view build 270 million names (minutes, tens of GB)."""
    asked = []

    def make_table(arch, blocks):
        asked.append(blocks)
        assert blocks <= 4096, "a table this deep takes minutes to build"
        return table(arch, blocks)

    table = gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "get_tensor_name_map", make_table)
    gguf_names._name_table.cache_clear()
    deep = make_hf_model(tmp_path / "deep", num_hidden_layers=10**6)
    far = make_named_model(tmp_path / "far", {"model.layers.1000000.self_attn.q_proj.weight": torch.ones(E, E)},
                           "LlamaForCausalLM", num_attention_heads=HEADS, num_hidden_layers=1)
    for folder in (deep, far):
        with open_checkpoint(folder) as hf:
            assert gguf_view(hf, "llama") is None
            assert gguf_attempt(hf, "llama") in ("1000000 blocks, more than the 1024 mapped", "1000001 blocks, more than the 1024 mapped")
    with open_checkpoint(make_hf_model(tmp_path / "m", num_hidden_layers=126)) as hf:  # Llama 3.1 405B's depth
        assert gguf_view(hf, "llama") is not None and asked == [126]
    gguf_names._name_table.cache_clear()


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


def test_gemma_norms_are_stored_plus_one_as_the_converter_adds(tmp_path):
    norm = torch.full((E,), 0.01, dtype=torch.bfloat16)  # 0.010009765625 in bfloat16
    folder = make_hf_model(tmp_path / "g", arch="GemmaForCausalLM")
    with open_checkpoint(folder) as hf:
        tensors = {k: hf.read(k) for k in hf.keys()} | {"model.norm.weight": norm}
    save_file(tensors, str(folder / "model.safetensors"))
    with open_checkpoint(folder) as hf:
        view = gguf_view(hf, "gemma")
        assert "output.weight" not in view.keys()  # lm_head is skipped (tied to the embedding)
        # bfloat16 is made float32 before the + 1: 1.010009765625, not bfloat16's 1.0078125
        assert torch.equal(view.read("output_norm.weight"), torch.full((E,), 1.010009765625))
        assert view.info("output_norm.weight").dtype == "float32"
        w = hf.read("model.layers.0.input_layernorm.weight")
        assert torch.equal(view.read("blk.0.attn_norm.weight"), w + 1)
        assert torch.equal(view.read("blk.0.attn_q.weight"), hf.read("model.layers.0.self_attn.q_proj.weight"))


def test_a_float16_norm_gets_its_one_added_in_float16(tmp_path):
    folder = make_named_model(tmp_path / "h", {"model.norm.weight": torch.full((4,), 1e-4, dtype=torch.float16),
                                               "model.embed_tokens.weight": torch.ones(8, 4)},
                              "Gemma2ForCausalLM", num_attention_heads=1, num_hidden_layers=0)
    with open_checkpoint(folder) as hf:
        x = gguf_view(hf, "gemma2").read("output_norm.weight")
        assert x.dtype == torch.float16 and torch.equal(x, torch.ones(4, dtype=torch.float16))  # 1 + 1e-4 rounds to 1


def test_gemma2_feed_forward_norms(tmp_path):
    names = {"model.layers.0.pre_feedforward_layernorm.weight": "blk.0.ffn_norm.weight",
             "model.layers.0.post_feedforward_layernorm.weight": "blk.0.post_ffw_norm.weight",
             "model.layers.0.post_attention_layernorm.weight": "blk.0.post_attention_norm.weight"}
    tensors = {k: torch.full((4,), float(i)) for i, k in enumerate(names)}
    with open_checkpoint(make_named_model(tmp_path / "g2", tensors, "Gemma2ForCausalLM", num_hidden_layers=1)) as hf:
        view = gguf_view(hf, "gemma2")
        assert sorted(view.keys()) == sorted(names.values())
        assert [view.read(names[k])[0].item() for k in tensors] == [1.0, 2.0, 3.0]


def make_gemma3(folder, **config):
    """A Gemma 3 model whose embedding has 32 rows."""
    tensors = {"model.embed_tokens.weight": torch.arange(32.0)[:, None].repeat(1, 4),
               "model.layers.0.self_attn.q_norm.weight": torch.zeros(4)}
    return make_named_model(folder, tensors, "Gemma3ForCausalLM", num_hidden_layers=1, **config)


def test_gemma3_embedding_is_cut_to_the_tokenizer(tmp_path):
    folder = make_gemma3(tmp_path / "g3")
    with open_checkpoint(folder) as hf:
        assert gguf_view(hf, "gemma3") is None  # no tokenizer: the converter cannot convert it either
    tokenizer = {"model": {"vocab": {f"t{i}": i for i in range(20)}}, "added_tokens": [{"id": 20}, {"id": 21}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with open_checkpoint(folder) as hf:
        view = gguf_view(hf, "gemma3")
        assert view.info("token_embd.weight").shape == (22, 4)  # 20 entries + 2 added tokens
        assert view.read("token_embd.weight")[:, 0].tolist() == list(range(22))
        assert torch.equal(view.read("blk.0.attn_q_norm.weight"), torch.ones(4))  # + 1 as Gemma
    folder = make_gemma3(tmp_path / "sp", vocab_size=30)
    (folder / "tokenizer.model").write_bytes(b"")  # SentencePiece: padded to the config's vocab_size
    with open_checkpoint(folder) as hf:
        assert gguf_view(hf, "gemma3").info("token_embd.weight").shape == (30, 4)


def test_fused_and_renamed_weights_of_phi3_stablelm_starcoder2_olmo2(tmp_path):
    cases = {"Phi3ForCausalLM": ("phi3", {"model.layers.0.self_attn.qkv_proj.weight": "blk.0.attn_qkv.weight",
                                          "model.layers.0.mlp.gate_up_proj.weight": "blk.0.ffn_up.weight"}),
             "StableLmForCausalLM": ("stablelm", {"model.layers.0.input_layernorm.bias": "blk.0.attn_norm.bias",
                                                  "model.norm.bias": "output_norm.bias"}),
             "Starcoder2ForCausalLM": ("starcoder2", {"model.layers.0.mlp.c_fc.weight": "blk.0.ffn_up.weight",
                                                      "model.layers.0.mlp.c_proj.weight": "blk.0.ffn_down.weight",
                                                      "model.layers.0.self_attn.q_proj.bias": "blk.0.attn_q.bias"}),
             "Olmo2ForCausalLM": ("olmo2", {"model.layers.0.post_attention_layernorm.weight":
                                            "blk.0.post_attention_norm.weight",
                                            "model.layers.0.self_attn.k_norm.weight": "blk.0.attn_k_norm.weight"}),
             "Olmo3ForCausalLM": ("olmo2", {"model.layers.0.post_feedforward_layernorm.weight":
                                            "blk.0.post_ffw_norm.weight"})}
    for arch, (gguf_arch, names) in cases.items():
        tensors = {k: torch.randn(6, 4) for k in names}
        with open_checkpoint(make_named_model(tmp_path / arch, tensors, arch, num_hidden_layers=1)) as hf:
            view = gguf_view(hf, gguf_arch)
            assert sorted(view.keys()) == sorted(names.values()), arch
            assert all(torch.equal(view.read(names[k]), t) for k, t in tensors.items()), arch  # values kept


def test_stablelm_with_per_head_norms_is_not_mapped(tmp_path):
    tensors = {"model.layers.0.self_attn.q_layernorm.norms.0.weight": torch.ones(4)}  # stacked by the converter
    with open_checkpoint(make_named_model(tmp_path / "s", tensors, "StableLmForCausalLM", num_hidden_layers=1)) as hf:
        assert gguf_view(hf, "stablelm") is None


def test_olmo_permutes_like_llama(tmp_path):
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.arange(8.0)[:, None].repeat(1, 8),
               "model.layers.0.self_attn.k_proj.weight": torch.arange(4.0)[:, None].repeat(1, 8)}
    folder = make_named_model(tmp_path / "o", tensors, "OlmoForCausalLM", num_attention_heads=2,
                              num_key_value_heads=1, num_hidden_layers=1)
    with open_checkpoint(folder) as hf:
        view = gguf_view(hf, "olmo")
        assert view.read("blk.0.attn_q.weight")[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
        assert view.read("blk.0.attn_k.weight")[:, 0].tolist() == [0, 2, 1, 3]  # one key head of 4 rows


def test_gpt2_conv1d_weights_are_transposed(tmp_path):
    c_attn = torch.arange(4.0 * 12).reshape(4, 12)  # Conv1D stores (in, out)
    tensors = {"transformer.h.0.attn.c_attn.weight": c_attn, "transformer.h.0.attn.c_attn.bias": torch.ones(12),
               "transformer.h.0.mlp.c_proj.weight": torch.ones(16, 4), "transformer.h.0.ln_1.weight": torch.ones(4),
               "transformer.h.0.attn.bias": torch.ones(1, 1, 8, 8), "transformer.wte.weight": torch.ones(10, 4)}
    folder = make_named_model(tmp_path / "gpt2", tensors, "GPT2LMHeadModel", n_head=2, n_layer=1)  # GPT-2's keys
    with open_checkpoint(folder) as hf:
        view = gguf_view(hf, "gpt2", heads=2)
        assert sorted(view.keys()) == ["blk.0.attn_norm.weight", "blk.0.attn_qkv.bias", "blk.0.attn_qkv.weight",
                                       "blk.0.ffn_down.weight", "token_embd.weight"]  # the mask buffer left out
        qkv = view.read("blk.0.attn_qkv.weight")
        assert view.info("blk.0.attn_qkv.weight").shape == qkv.shape == (12, 4)
        assert qkv[0, 1].item() == 12.0 and qkv[1, 0].item() == 1.0  # (out, in): [i, j] is c_attn[j, i]
        assert view.info("blk.0.ffn_down.weight").shape == (4, 16)
        assert gguf_view(hf, "gpt2", heads=4) is None


def test_falcon_qkv_rows_regrouped_by_hand():
    w = torch.arange(8.0)[:, None]  # 2 groups of (2 query heads, 1 key head, 1 value head), head size 1
    assert regroup_qkv(w, 4, 2)[:, 0].tolist() == [0, 1, 4, 5, 2, 6, 3, 7]  # q0 q1 q2 q3, k0 k1, v0 v1
    w = torch.arange(12.0)[:, None]  # one group (multi-query), head size 2: already q.., k, v
    assert regroup_qkv(w, 4, 1)[:, 0].tolist() == list(range(12))
    assert regroup_qkv(torch.ones(7, 2), 4, 2).shape == (7, 2)  # rows do not split so: unchanged


def test_falcon_view(tmp_path):
    tensors = {"transformer.h.0.self_attention.query_key_value.weight": torch.arange(16.0).reshape(8, 2),
               "transformer.h.0.self_attention.dense.weight": torch.ones(4, 4)}
    folder = make_named_model(tmp_path / "f", tensors, "FalconForCausalLM", num_attention_heads=4,
                              num_kv_heads=2, num_hidden_layers=1)
    with open_checkpoint(folder) as hf:
        view = gguf_view(hf, "falcon", heads=4, kv_heads=2)
        assert view.read("blk.0.attn_qkv.weight")[:, 0].tolist() == [0, 2, 8, 10, 4, 12, 6, 14]
    config = {"architectures": ["FalconForCausalLM"], "num_attention_heads": 4}
    assert conversion_of(config)[1:] == (4, 1)  # no key/value head count: one, as Falcon's converter takes


def test_a_model_in_the_hub_cache_is_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # "org/tiny" must not be a local path
    source = make_hf_model(tmp_path / "src")
    repo, commit = tmp_path / "hub" / "models--org--tiny", "c" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):  # the files are links into blobs/, as huggingface_hub makes
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes((source / name).read_bytes())
        (repo / "snapshots" / commit / name).symlink_to(blob)
    with open_checkpoint("org/tiny") as hf:
        view = gguf_view(hf, "llama", HEADS, KV)
        assert view is not None and view.name == "org/tiny"
        assert torch.equal(view.read("blk.0.attn_q.weight"),
                           hf.read("model.layers.0.self_attn.q_proj.weight")[check_rows(HEADS, E // HEADS)])


def test_a_config_json_nested_too_deeply_is_no_config(tmp_path):
    """json.loads raised RecursionError on 100,000 nested brackets (a few hundred KB): with a GGUF file among
    the models, lineage recovery ended with a traceback instead of comparing the model under its own names."""
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert gguf_names.hf_config(open_checkpoint(tmp_path)) is None


def check_view_rows(view, name, rows, whole: bool, got: dict, file="model.safetensors"):
    """``view.read_rows(name, rows)`` is ``view.read(name)``'s rows; it read the whole tensor's bytes (``whole``)
    or only as many rows as it gave (float32 rows)."""
    got.clear()
    y = view.read_rows(name, torch.tensor(rows))
    bytes_read = got.get(file, 0)
    x = view.read(name)
    assert torch.equal(y, x.reshape(-1, x.shape[-1])[rows])
    assert bytes_read == (x.numel() * 4 if whole else len(set(rows)) * x.shape[-1] * 4)


def test_view_rows_are_read_as_rows_of_the_file_where_they_are_some(tmp_path, monkeypatch):
    with open_checkpoint(make_hf_model(tmp_path / "m")) as hf:
        view, got = gguf_view(hf, "llama"), make_byte_counter(monkeypatch)
        check_view_rows(view, "blk.0.attn_q.weight", [1, 8, 3], False, got)  # permuted per head: still rows
        check_view_rows(view, "blk.0.attn_k.weight", [7, 0], False, got)
        check_view_rows(view, "blk.0.ffn_up.weight", [23, 5], False, got)
        check_view_rows(view, "blk.0.attn_norm.weight", [0], True, got)  # 1-D: its one row, the whole tensor


def test_a_transposed_view_reads_the_whole_tensor_for_its_rows(tmp_path, monkeypatch):
    tensors = {"transformer.h.0.attn.c_attn.weight": torch.arange(4.0 * 12).reshape(4, 12),
               "transformer.h.0.ln_1.weight": torch.ones(4)}
    folder = make_named_model(tmp_path / "gpt2", tensors, "GPT2LMHeadModel", n_head=2, n_layer=1)
    with open_checkpoint(folder) as hf:
        view, got = gguf_view(hf, "gpt2", heads=2), make_byte_counter(monkeypatch)
        check_view_rows(view, "blk.0.attn_qkv.weight", [11, 0], True, got)  # a row of the view: a column of the file


def test_falcon_and_gemma3_view_rows(tmp_path, monkeypatch):
    tensors = {"transformer.h.0.self_attention.query_key_value.weight": torch.arange(16.0).reshape(8, 2)}
    falcon = make_named_model(tmp_path / "f", tensors, "FalconForCausalLM", num_attention_heads=4,
                              num_kv_heads=2, num_hidden_layers=1)
    with open_checkpoint(falcon) as hf:
        view, got = gguf_view(hf, "falcon", heads=4, kv_heads=2), make_byte_counter(monkeypatch)
        check_view_rows(view, "blk.0.attn_qkv.weight", [2, 7, 2], False, got)  # regrouped rows
    gemma = make_gemma3(tmp_path / "g", vocab_size=30)
    (gemma / "tokenizer.model").write_bytes(b"")  # the embedding cut to 30 of its 32 rows
    with open_checkpoint(gemma) as hf:
        view = gguf_view(hf, "gemma3")
        check_view_rows(view, "token_embd.weight", [29, 0], False, got)
        with pytest.raises(IndexError):  # a row the converter cut off
            view.read_rows("token_embd.weight", torch.tensor([30]))


def test_view_rows_of_an_unknown_tensor_name_the_model(tmp_path):
    # read names the file for a tensor the view lacks; read_rows raised a bare KeyError('blk.9.attn_q.weight')
    from modelatlas.errors import TensorNotFoundError

    with open_checkpoint(make_hf_model(tmp_path / "m")) as hf:
        view = gguf_view(hf, "llama")
        name = "blk.9.attn_q.weight"
        for call in (lambda: view.read(name), lambda: view.read_rows(name, torch.tensor([0]))):
            with pytest.raises(TensorNotFoundError, match=f"^{tmp_path / 'm'}"):
                call()
