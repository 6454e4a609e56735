"""Quantized checkpoints written by real quantization libraries, read by modelatlas.weights.dequantized and
placed by lineage recovery (session 29).

Builds a small Llama (hidden 256, 2 layers) and a fine-tune of it (20 Adam steps), in float32 and bfloat16,
and quantizes each with llm-compressor: GPTQ W4A16 (activation order static and weight), round-to-nearest
W4A16 / W8A16 / W8A8, FP8 per channel, FP8 in 128 x 128 blocks, AWQ (``AWQModifier`` then W4A16_ASYM, groups
of 128; session 30). Then, for each quantized model:
1. the largest difference between modelatlas' dequantized weights and compressed-tensors' own decompression
   (transformers with ``run_compressed=False``);
2. ``requantized_match`` of its first query matrix against its own source and against the other model, and
   the AWQ test (:func:`modelatlas.lineage.smoothed.smoothed_score`: the lowest share of codes over the
   norm-fed layers, the rescaling read off the norms) against both;
3. ``atlas lineage recover`` over all of them (float32 and bfloat16 sets apart).
``--schemes awq`` quantizes only those named (into a fresh ``--out``).
With ``--llama-cpp DIR`` (a llama.cpp checkout, or llama-cpp-python's sdist ``vendor/llama.cpp``) it also
compares the GPTQ ``qweight`` unpacking with llama.cpp's ``dequant_gptq`` on random words, 2/4/8 bits,
``gptq`` and ``gptq_v2``. With ``--autoawq DIR`` (AutoAWQ's unpacked sdist: ``pip download autoawq --no-deps``)
it compares the AWQ GEMM unpacking with AutoAWQ's ``dequantize_gemm`` on random words (the oracle only: its
file is loaded by path, no package installed).

Needs a venv with ``llmcompressor`` (pulls transformers, compressed-tensors, datasets) and modelatlas:
``python -m venv /tmp/qv && /tmp/qv/bin/pip install torch==2.13.0 llmcompressor -e .``, then
``/tmp/qv/bin/python bench/lineage_packed.py --out /tmp/packed [--llama-cpp DIR] [--bnb]``. CPU, about 2
minutes. ``--bnb`` (``pip install bitsandbytes``) adds the bfloat16 models loaded with bitsandbytes NF4 (double
quantization), FP4 and LLM.int8 by transformers and saved, checked against bitsandbytes' own dequantization.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import copy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCHEMES = {  # name -> (modifier, scheme, extra kwargs); the GPTQ ones need calibration data
    "gptq4": ("GPTQModifier", "W4A16", {}), "gptq4w": ("GPTQModifier", "W4A16", {"actorder": "weight"}),
    "rtn4": ("QuantizationModifier", "W4A16", {}), "rtn8": ("QuantizationModifier", "W8A16", {}),
    "w8a8": ("QuantizationModifier", "W8A8", {}), "fp8chan": ("QuantizationModifier", "FP8_DYNAMIC", {}),
    "fp8block": ("QuantizationModifier", "FP8_BLOCK", {}), "awq": ("AWQModifier", "W4A16_ASYM", {}),
}
CALIBRATED = ("GPTQModifier", "AWQModifier")
LAYER = "model.layers.0.self_attn.q_proj.weight"


def make_sources(out: Path) -> None:
    """base and ft (20 Adam steps on random tokens) in float32, and both cast to bfloat16 (base16, ft16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=128)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    ft = copy.deepcopy(base)
    opt = torch.optim.Adam(ft.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = torch.randint(0, 256, (8, 32), generator=g)
        ft(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, m in (("base", base), ("ft", ft)):
        m.save_pretrained(out / "float32" / name)
        m.to(torch.bfloat16).save_pretrained(out / "bfloat16" / name)


def make_calibration():
    """A word-level tokenizer of 512 tokens and 16 random sequences of 64 (llm-compressor needs both for GPTQ)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3")
    ids = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(2))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return tok, ds


def make_recipe(modifier: str, scheme: str, kw: dict):
    """llm-compressor's recipe for one scheme: AWQ is a smoothing step followed by a quantization."""
    from llmcompressor.modifiers import quantization as Q

    if modifier == "AWQModifier":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():  # AWQ pins its cached activations for GPU copies: "Cannot access
            IntermediatesCache.pin_memory = lambda self, *a, **k: None  # accelerator device" on a CPU

        return [AWQModifier(**kw), Q.QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])]
    return getattr(Q, modifier)(targets="Linear", scheme=scheme, ignore=["lm_head"], **kw)


def quantize_all(folder: Path, dtype: torch.dtype, schemes: list[str]) -> None:
    """The ``schemes`` of :data:`SCHEMES` applied to base and ft of ``folder``, saved compressed beside them."""
    from llmcompressor import oneshot
    from loguru import logger
    from transformers import LlamaForCausalLM

    logger.disable("llmcompressor")  # a line per layer and step otherwise
    tok, ds = make_calibration()
    for src in ("base", "ft"):
        for name in schemes:
            modifier, scheme, kw = SCHEMES[name]
            m = LlamaForCausalLM.from_pretrained(folder / src, torch_dtype=dtype)
            recipe = make_recipe(modifier, scheme, kw)
            calib = (dict(dataset=ds, num_calibration_samples=16, max_seq_length=64, processor=tok)
                     if modifier in CALIBRATED else {})
            oneshot(model=m, recipe=recipe, **calib)
            m.save_pretrained(folder / f"{src}-{name}", save_compressed=True)


def reference(path: Path) -> dict:
    """compressed-tensors' own decompression of a quantized model: its float state dict."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False),
                                             torch_dtype=torch.float32)
    return {k: v.detach().float() for k, v in m.state_dict().items() if v.is_floating_point()}


def check_models(folder: Path) -> list[str]:
    """One table row per quantized model of ``folder``: type, largest difference to the reference, match on
    its own source and on the other model, the AWQ test on both (the lowest share over the norm-fed layers)."""
    from modelatlas.lineage.smoothed import smoothed_score
    from modelatlas.weights import open_checkpoint

    rows = []
    for d in sorted(p for p in folder.iterdir() if "-" in p.name):
        src = d.name.split("-")[0]
        other = "ft" if src == "base" else "base"
        ck, ref = open_checkpoint(d), reference(d)
        diff = max((ck.read(t.name).float() - ref[t.name]).abs().max().item() for t in ck.tensors())
        mine, theirs = open_checkpoint(folder / src), open_checkpoint(folder / other)
        match = [ck.requantized_match(LAYER, m.read(LAYER)) for m in (mine, theirs)]
        awq = [smoothed_score(ck, m, 0.0, plain=False) for m in (mine, theirs)]
        rows.append(f"| {folder.name} | {d.name} | {ck.quantization(LAYER)} | {diff:.3g} | {match[0]:.4f} | "
                    f"{match[1]:.4f} | {awq[0]:.4f} | {awq[1]:.4f} |")
    return rows


BNB = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
       "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "int8": {"load_in_8bit": True}}


def make_bnb(folder: Path) -> None:
    """The bfloat16 base and ft loaded with bitsandbytes quantization (transformers, CPU) and saved: NF4 with
    double quantization, FP4, LLM.int8; beside each, bitsandbytes' own dequantization (``*.ref.safetensors``)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    for src in ("base", "ft"):
        for name, kw in BNB.items():
            m = AutoModelForCausalLM.from_pretrained(folder / src, quantization_config=BitsAndBytesConfig(**kw),
                                                     device_map="cpu")
            m.save_pretrained(folder / f"{src}-{name}")
            ref = {}
            for mod_name, mod in m.named_modules():
                if isinstance(mod, bnb.nn.Linear4bit):
                    ref[mod_name + ".weight"] = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                elif isinstance(mod, bnb.nn.Linear8bitLt):
                    ref[mod_name + ".weight"] = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB)
            save_file({k: v.contiguous() for k, v in ref.items()}, folder / f"{src}-{name}.ref.safetensors")


def check_bnb(folder: Path) -> list[str]:
    """One row per bitsandbytes model: type, largest difference to bitsandbytes' dequantization (ours rounded
    to its dtype first), match on its own source and on the other model."""
    from safetensors.torch import load_file

    from modelatlas.weights import open_checkpoint

    rows = []
    for src, name in ((s, n) for s in ("base", "ft") for n in BNB):
        ck, ref = open_checkpoint(folder / f"{src}-{name}"), load_file(folder / f"{src}-{name}.ref.safetensors")
        diff = max((ck.read(k).to(v.dtype).float() - v.float()).abs().max().item() for k, v in ref.items())
        other = "ft" if src == "base" else "base"
        own = ck.requantized_match(LAYER, open_checkpoint(folder / src).read(LAYER))
        theirs = ck.requantized_match(LAYER, open_checkpoint(folder / other).read(LAYER))
        rows.append(f"| bitsandbytes | {src}-{name} | {ck.quantization(LAYER)} | {diff:.3g} | {own:.4f} | {theirs:.4f} "
                    "| - | - |")
    return rows


def check_llama_cpp(llama_cpp: Path) -> list[str]:
    """modelatlas' GPTQ unpacking against llama.cpp's dequant_gptq (taken from its converter's source) on
    random int32 words and a random g_idx."""
    from modelatlas.weights.packed_ints import gptq_weight

    src = (llama_cpp / "conversion" / "base.py").read_text()
    body = textwrap.dedent(src[src.index("            def dequant_gptq("):src.index("            def dequant_packed(")])
    rows = []
    for fmt in ("gptq", "gptq_v2"):
        for bits in (2, 4, 8):
            ns = {"torch": torch, "Tensor": torch.Tensor, "quant_config": {"bits": bits, "checkpoint_format": fmt},
                  "self": argparse.Namespace(lazy=False)}
            exec(body, ns)  # noqa: S102 - llama.cpp's function, the oracle, from the checkout given
            g = torch.Generator().manual_seed(bits)
            qweight = torch.randint(-2**31, 2**31 - 1, (256 * bits // 32, 96), dtype=torch.int32, generator=g)
            qzeros = torch.randint(-2**31, 2**31 - 1, (4, 96 * bits // 32), dtype=torch.int32, generator=g)
            scales, g_idx = torch.rand(4, 96, generator=g).half(), torch.randperm(256, generator=g).int() % 4
            ref = ns["dequant_gptq"](g_idx, qweight, qzeros, scales)
            ours = gptq_weight(qweight, qzeros, scales, g_idx, bits, 1 if fmt == "gptq" else 0)
            rows.append(f"| {fmt} | {bits} | {(ours - ref.float()).abs().max().item():.3g} |")
    return rows


def check_autoawq(autoawq: Path) -> list[str]:
    """modelatlas' AWQ GEMM unpacking against AutoAWQ's ``dequantize_gemm`` (its packing_utils.py, loaded by
    path from the unpacked sdist) on random int32 words, float16 scales, three shapes and group sizes."""
    import importlib.util

    from modelatlas.weights.awq import awq_weight

    spec = importlib.util.spec_from_file_location("awq_packing", autoawq / "awq" / "utils" / "packing_utils.py")
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)  # AutoAWQ's own functions, the oracle, from the sdist given
    rows, g = [], torch.Generator().manual_seed(0)
    for n_in, n_out, group in ((256, 96, 128), (64, 8, 64), (512, 1024, 32)):
        qweight = torch.randint(-2**31, 2**31 - 1, (n_in, n_out // 8), dtype=torch.int32, generator=g)
        qzeros = torch.randint(-2**31, 2**31 - 1, (n_in // group, n_out // 8), dtype=torch.int32, generator=g)
        scales = (torch.rand(n_in // group, n_out, generator=g) * 0.02).half()
        ref = oracle.dequantize_gemm(qweight, qzeros, scales, 4, group)  # (in, out) float16
        ours = awq_weight(qweight, qzeros, scales, group).T  # (out, in) -> (in, out) float32
        rows.append(f"| {n_in} x {n_out}, groups of {group} | {(ours.half().float() - ref.float()).abs().max().item():.3g} "
                    f"| {(ours - ref.float()).abs().max().item():.3g} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llama-cpp", type=Path)
    ap.add_argument("--autoawq", type=Path, help="AutoAWQ's unpacked sdist, the oracle of the AWQ unpacking")
    ap.add_argument("--bnb", action="store_true", help="also bitsandbytes NF4 / FP4 / int8 (pip install bitsandbytes)")
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    args = ap.parse_args()
    if not (args.out / "float32" / "base").exists():
        make_sources(args.out)
        quantize_all(args.out / "float32", torch.float32, args.schemes)
        quantize_all(args.out / "bfloat16", torch.bfloat16, args.schemes)
    if args.bnb and not (args.out / "bitsandbytes" / "base").exists():
        for src in ("base", "ft"):
            shutil.copytree(args.out / "bfloat16" / src, args.out / "bitsandbytes" / src)
        make_bnb(args.out / "bitsandbytes")
    print("| set | model | type | max diff to the library's own | match own source | match other | AWQ test own "
          "| AWQ test other |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        print("\n".join(check_models(args.out / dtype)))
    if args.bnb:
        print("\n".join(check_bnb(args.out / "bitsandbytes")))
    if args.autoawq is not None:
        print("\n| shape | max diff to AutoAWQ dequantize_gemm (ours in float16) | (ours in float32) |\n|---|---|---|")
        print("\n".join(check_autoawq(args.autoawq)))
    if args.llama_cpp is not None:
        print("\n| GPTQ format | bits | max diff to llama.cpp dequant_gptq |\n|---|---|---|")
        print("\n".join(check_llama_cpp(args.llama_cpp)))
    for dtype in ("float32", "bfloat16") + (("bitsandbytes",) if args.bnb else ()):
        folder = args.out / dtype
        models = [str(p) for p in sorted(folder.iterdir()) if p.is_dir()]  # not the .ref.safetensors
        print(f"\natlas lineage recover {folder}/*/", flush=True)
        subprocess.run([sys.executable, "-m", "modelatlas.cli.main", "lineage", "recover", *models], check=False)


if __name__ == "__main__":
    main()
