"""FP4 checkpoints written by the real writers, read by modelatlas.weights.fp4 (session 32; not in CI).

1. A small Llama (hidden 256, 2 layers, bfloat16) and a fine-tune of it (bench/lineage_packed.py's
   ``make_sources``), each quantized by llm-compressor (``QuantizationModifier``, schemes NVFP4A16 and
   MXFP4A16, CPU, no calibration data) and saved compressed. For every FP4 layer: the largest difference
   between modelatlas' float32 values and compressed-tensors' own ``decompress`` of the layer's stored tensors
   (which returns bfloat16: shown both as is and with ours rounded to bfloat16), and ``requantized_match`` of
   its first query matrix against its own source and against the other model, and the mean squared
   difference to its source over the mean ``rounding_variance`` (lowest..highest over the layers).
2. gpt-oss MXFP4 experts: random ``*_blocks`` / ``*_scales`` (4 experts, 64 x 96) saved as safetensors,
   read by modelatlas against transformers' ``convert_moe_packed_tensors`` (float32).

Needs the /tmp/qv venv of bench/lineage_packed.py (llmcompressor, transformers): ``PYTHONPATH=src
/tmp/qv/bin/python bench/fp4_check.py --out /tmp/fp4``. CPU, about a minute.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import shutil
from pathlib import Path

import torch
from lineage_packed import make_sources
from safetensors.torch import load_file, save_file

LAYER = "model.layers.0.self_attn.q_proj.weight"
SCHEMES = ("NVFP4A16", "MXFP4A16")


def quantize(folder: Path) -> None:
    """base and ft of ``folder`` quantized with each of :data:`SCHEMES`, saved compressed beside them."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from loguru import logger
    from transformers import LlamaForCausalLM

    logger.disable("llmcompressor")
    for src in ("base", "ft"):
        for scheme in SCHEMES:
            m = LlamaForCausalLM.from_pretrained(folder / src, torch_dtype=torch.bfloat16)
            oneshot(model=m, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
            m.save_pretrained(folder / f"{src}-{scheme.lower()}", save_compressed=True)


def their_values(d: Path) -> dict:
    """compressed-tensors' ``decompress`` of each FP4 layer's stored tensors: layer name -> bfloat16 weight."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    mx = "mxfp4" in cfg["format"]
    compressor = MXFP4PackedCompressor if mx else NVFP4PackedCompressor
    scheme = preset_name_to_scheme("MXFP4A16" if mx else "NVFP4A16", ["Linear"])
    sd = load_file(d / "model.safetensors")
    out = {}
    for name in (n for n in sd if n.endswith(".weight_packed")):
        base = name.removesuffix("_packed")
        parts = {k.removeprefix(base.removesuffix("weight")): v for k, v in sd.items()
                 if k.startswith(base + "_")}
        out[base] = compressor.decompress(parts, scheme)["weight"]
    return out


def check_compressed(folder: Path) -> list[str]:
    from modelatlas.weights import open_checkpoint

    rows = []
    for d in sorted(p for p in folder.iterdir() if "-" in p.name):
        src = d.name.split("-")[0]
        other = "ft" if src == "base" else "base"
        ck, ref = open_checkpoint(d), their_values(d)
        diff = max((ck.read(k) - v.float()).abs().max().item() for k, v in ref.items())
        diff16 = max((ck.read(k).bfloat16().float() - v.float()).abs().max().item() for k, v in ref.items())
        source = open_checkpoint(folder / src)
        match = [ck.requantized_match(LAYER, open_checkpoint(folder / m).read(LAYER)) for m in (src, other)]
        ratio = [float((ck.read(k) - source.read(k).float()).square().mean() / ck.rounding_variance(k).mean())
                 for k in ref]
        rows.append(f"| {d.name} | {ck.quantization(LAYER)} | {len(ref)} | {diff:.3g} | {diff16:.3g} | "
                    f"{match[0]:.4f} | {match[1]:.4f} | {min(ratio):.3f}..{max(ratio):.3f} |")
    return rows


def check_gpt_oss(folder: Path) -> str:
    """modelatlas against transformers' ``convert_moe_packed_tensors`` on random gpt-oss MXFP4 experts."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from modelatlas.weights import open_checkpoint

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 96, 2, 16), generator=g, dtype=torch.uint8)  # (experts, out, in / 32, 16)
    scales = torch.randint(110, 135, (4, 96, 2), generator=g, dtype=torch.uint8)
    d = folder / "gpt-oss"
    d.mkdir(exist_ok=True)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    save_file({f"{name}_blocks": blocks, f"{name}_scales": scales}, d / "model.safetensors")
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (experts, in, out)
    with open_checkpoint(d) as ck:
        ours = ck.read(name)
        return (f"gpt-oss {name}: ours {tuple(ours.shape)} {ck.quantization(name)}, transformers "
                f"{tuple(theirs.shape)}; max |difference| {(ours - theirs).abs().max().item():.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    make_sources(args.out)
    folder = args.out / "bfloat16"
    quantize(folder)
    print("| model | type | FP4 layers | max diff (float32) | max diff (ours in bfloat16) | match own | match other "
          "| error^2 / rounding_variance |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(check_compressed(folder)))
    print(check_gpt_oss(args.out))


if __name__ == "__main__":
    main()
