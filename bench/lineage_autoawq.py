"""AutoAWQ's own GEMM checkpoints read by modelatlas.weights.awq and placed by lineage (session 30).

Builds the small Llama of bench/lineage_packed.py (hidden 256, 2 layers) and its fine-tune (20 Adam steps),
saved in float32 and cast to float16, and quantizes each with AutoAWQ (4 bits, groups of 128, zero point,
GEMM; calibration: 32 sequences of 32 random token ids). Then, for each AWQ model:
1. the largest difference between modelatlas' dequantized weights and AutoAWQ's ``dequantize_gemm`` of the
   tensors stored (in float16, AutoAWQ's arithmetic);
2. ``requantized_match`` of its first query matrix, and the AWQ test
   (:func:`modelatlas.lineage.smoothed.smoothed_score`: the lowest share of codes over the norm-fed layers),
   against its own source and the other model, float16 and float32 sources;
3. ``atlas lineage recover`` over the float16 set.

AutoAWQ on a CPU: its scale search backs the weights up with ``v.cpu()``, which copies only from a GPU; on a
CPU the backup is the weight itself, which the search multiplies in place by each candidate scale, so the
files it writes are not the rescaled model (the query weights come out scaled by about the square of the
factor the norm was divided by). This script patches the backup into a copy (``--unpatched`` keeps the bug).

Needs AutoAWQ's pins beside the torch of the llm-compressor venv (no CUDA wheel downloaded):
``python -m venv /tmp/awqv && echo /tmp/qv/lib/python3.11/site-packages > /tmp/awqv/lib/python3.11/site-packages/zz_qv.pth
&& /tmp/awqv/bin/pip install --no-deps autoawq==0.2.9 transformers==4.51.3 'tokenizers>=0.21,<0.22'
huggingface_hub==0.36.0 datasets==3.6.0``, then ``PYTHONPATH=src /tmp/awqv/bin/python bench/lineage_autoawq.py
--out /tmp/autoawq``. CPU, about 3 minutes.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

LAYER = "model.layers.0.self_attn.q_proj.weight"
QUANT = {"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}


def patch_backup() -> None:
    """AutoAWQ's ``_compute_best_scale`` with its weight backup a real copy (see the module docstring)."""
    import awq.quantize.quantizer as QZ

    src = textwrap.dedent(inspect.getsource(QZ.AwqQuantizer._compute_best_scale))
    if "v.cpu() for k, v" not in src:
        raise SystemExit("AutoAWQ's _compute_best_scale changed: its backup line was not found to patch")
    namespace = dict(vars(QZ))
    exec(src.replace("v.cpu() for k, v", "v.detach().clone() for k, v"), namespace)  # noqa: S102 - its own code
    QZ.AwqQuantizer._compute_best_scale = namespace["_compute_best_scale"]


def quantize(out: Path, patched: bool) -> None:
    """base and ft (float32 and float16) saved under ``out``, and AutoAWQ's GEMM model of each float16 one."""
    sys.path.insert(0, str(Path(__file__).parent))
    from awq import AutoAWQForCausalLM
    from lineage_packed import make_calibration, make_sources
    from transformers import LlamaForCausalLM

    make_sources(out)  # out/float32/{base,ft}, out/bfloat16/{base,ft}
    tok, _ = make_calibration()
    if patched:
        patch_backup()
    ids = torch.randint(4, 512, (32, 32), generator=torch.Generator().manual_seed(2)).tolist()
    for src in ("base", "ft"):
        LlamaForCausalLM.from_pretrained(out / "float32" / src).half().save_pretrained(out / "float16" / src)
        m = AutoAWQForCausalLM.from_pretrained(str(out / "float16" / src), torch_dtype=torch.float16)
        m.quantize(tok, quant_config=QUANT, calib_data=ids, max_calib_samples=32, max_calib_seq_len=32)
        m.save_quantized(str(out / "float16" / f"{src}-awq"))


def check(out: Path) -> list[str]:
    """One table row per AWQ model: largest difference to dequantize_gemm, match and AWQ test on each source."""
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    from modelatlas.lineage.smoothed import smoothed_score
    from modelatlas.weights import open_checkpoint

    rows = []
    for src in ("base", "ft"):
        folder = out / "float16" / f"{src}-awq"
        ck, raw = open_checkpoint(folder), load_file(folder / "model.safetensors")
        diff = 0.0
        for name, layer in ck.layers.items():
            b = name.removesuffix(".weight")
            ref = dequantize_gemm(raw[b + ".qweight"], raw[b + ".qzeros"], raw[b + ".scales"], 4, layer.group_size)
            diff = max(diff, (ck.read(name).T.half().float() - ref.float()).abs().max().item())  # (in, out)
        cells = []
        for dtype in ("float16", "float32"):
            for other in (src, "ft" if src == "base" else "base"):
                model = open_checkpoint(out / dtype / other)
                cells.append(f"{ck.requantized_match(LAYER, model.read(LAYER)):.4f} / "
                             f"{smoothed_score(ck, model, 0.0, plain=False):.4f}")
        rows.append(f"| {src}-awq | {ck.quantization(LAYER)} | {diff:.3g} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--unpatched", action="store_true", help="keep AutoAWQ's CPU backup bug (see the docstring)")
    args = ap.parse_args()
    if not (args.out / "float16" / "base-awq").exists():
        quantize(args.out, not args.unpatched)
    print("| model | type | max diff to dequantize_gemm | float16 own: match / AWQ test | float16 other | "
          "float32 own | float32 other |\n|---|---|---|---|---|---|---|")
    print("\n".join(check(args.out)))
    folder = args.out / "float16"
    print(f"\natlas lineage recover {folder}/*/", flush=True)
    subprocess.run([sys.executable, "-m", "modelatlas.cli.main", "lineage", "recover",
                    *map(str, sorted(p for p in folder.iterdir() if p.is_dir()))], check=False)


if __name__ == "__main__":
    main()
