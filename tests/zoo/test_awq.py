"""modelatlas.zoo.awq: AWQ copies in AutoAWQ's GEMM layout, checked by hand and read back by weights.awq."""

import json

import pytest
import torch

from modelatlas.weights import awq as A
from modelatlas.weights import open_checkpoint
from modelatlas.weights import packed_ints as P
from modelatlas.zoo import awq as Z

H, INTER = 32, 64  # multiples of the copies' groups of 32


def make_block(seed: int = 0) -> dict:
    """One Llama decoder block's weights and norms (float32)."""
    gen = torch.Generator().manual_seed(seed)
    p = "model.layers.0."
    shapes = {**{f"self_attn.{n}_proj.weight": (H, H) for n in "qkvo"}, "mlp.gate_proj.weight": (INTER, H),
              "mlp.up_proj.weight": (INTER, H), "mlp.down_proj.weight": (H, INTER)}
    out = {p + k: 0.05 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    out.update({p + n: 1 + 0.1 * torch.randn(H, generator=gen) for n in ("input_layernorm.weight",
                                                                        "post_attention_layernorm.weight")})
    return out


def test_words_hold_columns_in_awq_order():
    words = Z.awq_words(torch.arange(8)[None, :])  # (1, 8) codes 0..7: column c holds code c
    assert P.unpack(words, 4, 1).tolist() == [[0, 2, 4, 6, 1, 3, 5, 7]]  # nibble i holds column AWQ_ORDER[i]
    assert A.unpack_columns(words).tolist() == [list(range(8))]


def test_a_layer_by_hand():
    w = ((torch.arange(16.0) - 5) * 0.5).repeat(8, 1)  # (8, 16): -2.5 .. 5.0 on every row
    t = Z.awq_layer(w, group=16)
    assert t["layer.scales"].tolist() == [[0.5] * 8]  # (5.0 + 2.5) / 15, exact in float16
    assert A.unpack_columns(t["layer.qzeros"]).tolist() == [[5] * 8]  # -round(-2.5 / 0.5)
    assert A.unpack_columns(t["layer.qweight"]).T.tolist() == [list(range(16))] * 8  # (x + 2.5) / 0.5
    clipped = Z.awq_layer(w, group=16, clip=0.5)  # the range: +-0.5 x 5.0
    assert clipped["layer.scales"].tolist() == [[torch.tensor(5.0 / 15).half().item()] * 8]


def test_smoothing_leaves_what_the_block_computes():
    """Each norm times the layers it feeds, and o after v, down after up (their pair factors cancel): the same
    products, up to float16 rounding."""
    w, p = make_block(), "model.layers.0."
    s = {k: v.float() for k, v in Z.smooth(w, seed=3).items()}
    assert not torch.allclose(s[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.weight"], rtol=0.1)
    for norm, fed in (("input_layernorm", "self_attn.q_proj"), ("post_attention_layernorm", "mlp.gate_proj")):
        folded = s[p + fed + ".weight"] * s[p + norm + ".weight"]  # (out, in) times (in,): input j by g_j
        assert torch.allclose(folded, w[p + fed + ".weight"] * w[p + norm + ".weight"], rtol=3e-3, atol=1e-6)
    for norm, first, then in (("input_layernorm", "self_attn.v_proj", "self_attn.o_proj"),
                              ("post_attention_layernorm", "mlp.up_proj", "mlp.down_proj")):
        got = s[p + then + ".weight"] @ s[p + first + ".weight"] * s[p + norm + ".weight"]  # (out, in) by (in,)
        want = w[p + then + ".weight"] @ w[p + first + ".weight"] * w[p + norm + ".weight"]
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-4)


def test_a_copy_saved_reads_back_within_half_a_step(tmp_path):
    w = make_block()
    folder = Z.save_folder(tmp_path / "m" / "awq", Z.awq_model(w, seed=3), Z.CONFIG)
    assert json.loads((folder / "config.json").read_text()) == {"quantization_config": Z.CONFIG}
    smoothed, name = Z.smooth(w, seed=3), "model.layers.0.self_attn.q_proj.weight"
    with open_checkpoint(folder) as ck:
        assert ck.quantization(name) == "AWQ-INT4"
        step = ck.inner.read(name.replace("weight", "scales")).float().T.repeat_interleave(Z.GROUP, 1)  # (out, in)
        assert ((ck.read(name) - smoothed[name].float()).abs() <= step * 0.505).all()  # q_proj: not clipped
        assert torch.equal(ck.read("model.layers.0.input_layernorm.weight"), smoothed["model.layers.0.input_layernorm.weight"])
    with pytest.raises(FileExistsError):
        Z.save_folder(folder, {})
