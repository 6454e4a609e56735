"""AWQ copies of a model, written in AutoAWQ's GEMM layout without AutoAWQ: a quantized model whose source is
known, for tests and benchmarks of lineage on AWQ files (``tests/lineage/test_awq_copies.py``,
``bench/lineage_awq_standin.py``). The reader is :mod:`modelatlas.weights.awq`.

Written as AutoAWQ does, from its description: per decoder block of a Llama-named model, factors c > 0
(``exp(U(-spread, spread))``) multiply the input channels of the layers a norm feeds (q, k, v; gate, up) and
divide the norm; v_proj's and up_proj's rows are divided by o_proj's and down_proj's input factors, which
multiply those (:func:`smooth`); every weight and norm is rounded to float16; the projections are then rounded
to 4 bits in groups (:func:`awq_layer`), each group's range clipped first except for q_proj and k_proj
(:func:`awq_model`). AutoAWQ searches its factors and clipping on calibration data; here they are random, which
is what lineage sees of them. Time O(P) for P weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelatlas.weights.awq import AWQ_ORDER
from modelatlas.weights.packed_ints import pack

GROUP = 32  # inputs per group of :func:`awq_model` (AutoAWQ's default is 128; the fixtures' layers are small)
CONFIG = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True}
CLIP = 0.9  # the range kept of each group of a clipped projection (AWQ's auto_clip shrinks it)


def awq_words(codes: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM words of (rows, cols) 4-bit ``codes``: 8 columns a word, nibble i holding column AWQ_ORDER[i]."""
    rows, cols = codes.shape
    perm = (torch.arange(0, cols, 8)[:, None] + torch.tensor(AWQ_ORDER)).reshape(-1)  # (cols,): nibble order
    return pack(codes[:, perm], 4, 1)  # (rows, cols / 8)


def awq_layer(w: torch.Tensor, group: int = 16, name: str = "layer", clip: float = 1.0) -> dict:
    """AutoAWQ GEMM tensors of an (out, in) weight rounded to nearest, asymmetric: per (row, group of ``group``
    inputs) the range [min, max] (both first clipped to ``clip`` times the group's largest |value|, as AWQ's
    auto_clip does), scale (max - min) / 15 stored in float16, zero -round(min / scale); ``qweight`` (in, out / 8),
    ``qzeros`` (groups, out / 8), ``scales`` (groups, out)."""
    out, inp = w.shape
    g = w.reshape(out, -1, group)  # (out, groups, group)
    edge = g.abs().amax(-1, keepdim=True) * clip
    g = torch.maximum(torch.minimum(g, edge), -edge)  # clipped, as AWQ clips before rounding
    hi, lo = g.amax(-1), g.amin(-1)  # (out, groups)
    scale = ((hi - lo).clamp(min=1e-5) / 15).half()  # stored, and rounded with, in float16
    zero = (-torch.round(lo / scale.float())).clamp(0, 15)
    codes = (torch.round(g / scale.float()[..., None]) + zero[..., None]).clamp(0, 15).reshape(out, inp)
    return {f"{name}.qweight": awq_words(codes.T), f"{name}.qzeros": awq_words(zero.T),
            f"{name}.scales": scale.T.contiguous()}


def factors(n: int, gen: torch.Generator, spread: float = 1.4) -> torch.Tensor:
    """(n,) ``exp(U(-spread, spread))``: 1.4 gives 0.25 .. 4, AWQ's spread."""
    return torch.exp(torch.empty(n).uniform_(-spread, spread, generator=gen))


def smooth(model: dict, seed: int, spread: float = 1.4) -> dict:
    """``model`` (Llama names, any sizes) with AWQ's rescaling applied (float16): input factors
    :func:`factors` per norm and pair; the function the model computes is unchanged (up to float16)."""
    gen, w = torch.Generator().manual_seed(seed), {k: v.float().clone() for k, v in model.items()}
    for b in range(sum(k.endswith("input_layernorm.weight") for k in model)):
        p = f"model.layers.{b}."
        h, inter = w[p + "mlp.down_proj.weight"].shape  # (hidden, MLP width)
        c1, c2, c3, c4 = (factors(n, gen, spread) for n in (h, h, h, inter))
        w[p + "input_layernorm.weight"] /= c1
        for n in "qkv":
            w[p + f"self_attn.{n}_proj.weight"] *= c1  # (out, in) times (in,): input channel j by c_j
        w[p + "self_attn.v_proj.weight"] /= c2[:, None]  # its rows: o_proj's inputs
        w[p + "self_attn.o_proj.weight"] *= c2
        w[p + "post_attention_layernorm.weight"] /= c3
        for n in ("gate", "up"):
            w[p + f"mlp.{n}_proj.weight"] *= c3
        w[p + "mlp.up_proj.weight"] /= c4[:, None]
        w[p + "mlp.down_proj.weight"] *= c4
    return {k: v.half() for k, v in w.items()}


def awq_model(model: dict, seed: int = 7, spread: float = 1.4) -> dict:
    """The AWQ tensors of ``model`` (Llama names): :func:`smooth`, then every ``*_proj.weight`` as
    :func:`awq_layer` in groups of :data:`GROUP`, clipped to :data:`CLIP` but q_proj and k_proj (AutoAWQ leaves
    them unclipped); the other tensors as float16."""
    out = {}
    for k, v in smooth(model, seed, spread).items():
        clip = 1.0 if "q_proj" in k or "k_proj" in k else CLIP
        out.update(awq_layer(v.float(), GROUP, k.removesuffix(".weight"), clip) if k.endswith("_proj.weight")
                   else {k: v})
    return out


def save_folder(folder: str | Path, tensors: dict, quantization: dict | None = None) -> Path:
    """``folder`` (made, with its parents) holding ``model.safetensors`` and, given ``quantization`` (such as
    :data:`CONFIG`), a ``config.json`` of ``{"quantization_config": quantization}``: what the weights readers
    take for a Hugging Face folder."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    if quantization is not None:
        (folder / "config.json").write_text(json.dumps({"quantization_config": quantization}))
    return folder


def llama_shapes(hidden: int = 128, inter: int = 256, blocks: int = 2, vocab: int = 64) -> dict[str, tuple]:
    """Tensor name -> shape of a small Llama-named model: embeddings, final norm, and per block the two norms,
    q/k/v/o (hidden x hidden) and gate/up (inter x hidden), down (hidden x inter)."""
    out = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        out.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                    **{p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"},
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter)})
    return out


def llama_model(seed: int, base: dict | None = None, step: float = 0.0, only: str = "", **shape) -> dict:
    """A float16 Llama-named model of :func:`llama_shapes` (``shape``: its arguments): fresh (matrices
    N(0, 0.05^2), norms 1 + N(0, 0.1^2)), or ``base`` with the tensors whose names hold ``only`` moved by
    ``step`` of their spread (a fine-tune)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in llama_shapes(**shape).items():
        fresh = torch.randn(s, generator=gen) * 0.05 if len(s) == 2 else 1 + 0.1 * torch.randn(s, generator=gen)
        out[k] = fresh if base is None else base[k] + (step * fresh.std() * torch.randn(s, generator=gen)
                                                       if only in k else 0)
    return {k: v.half() for k, v in out.items()}
