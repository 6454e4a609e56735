"""MLX-quantized models (mlx-lm's affine quantization; ``--mode mxfp4`` / ``mxfp8`` since session 36) read by
modelatlas.weights.dequantized and placed by lineage recovery (session 29).

For each Hugging Face model folder given (``model.safetensors`` + ``config.json``), every 2-D weight of a
linear layer or embedding (as mlx-lm's ``nn.quantize`` picks them: both sizes a multiple of the group size) is
quantized with ``mx.quantize`` (mode affine) at each of --bits, and saved as mlx-lm saves a quantized model:
``weight`` (uint32 codes), ``scales``, ``biases`` in the weights' dtype, and ``"quantization": {"group_size",
"bits"}`` in ``config.json`` (``--mode mxfp4`` / ``mxfp8``: 4 / 8 bits in groups of 32, uint8 exponent
``scales``, no ``biases``, the ``"mode"`` in the config; mlx's CPU quantizer). Then, per quantized model: the largest difference between modelatlas' weights
and ``mx.dequantize`` (ours rounded to the stored dtype, as mlx returns it); ``requantized_match`` of the first
query matrix against its own source and against the other models; and ``atlas lineage recover`` over all.

Needs ``pip install "mlx[cpu]"`` (Linux CPU wheels) and modelatlas in one venv:
``python bench/lineage_mlx.py --out /tmp/mlxq /tmp/packed/bfloat16/base /tmp/packed/bfloat16/ft`` (the
sources of bench/lineage_packed.py). Seconds on 2 cores.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

LAYER = "model.layers.0.self_attn.q_proj.weight"


def quantize_folder(src: Path, out: Path, bits: int, group: int, mode: str = "affine") -> None:
    """``src``'s model with its linear weights MLX-quantized, written to ``out`` as mlx-lm writes one."""
    import mlx.core as mx

    weights = mx.load(str(src / "model.safetensors"))
    saved = {}
    for name, w in weights.items():
        if w.ndim == 2 and name.endswith(".weight") and w.shape[1] % group == 0 and w.shape[0] % 8 == 0:
            q, s, *b = mx.quantize(w, group_size=group, bits=bits, mode=mode)  # (no biases but in affine)
            base = name.removesuffix(".weight")
            saved.update({name: q, f"{base}.scales": s, **({f"{base}.biases": b[0]} if b else {})})
        else:
            saved[name] = w
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), saved, metadata={"format": "mlx"})
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": group, "bits": bits,
                                                               **({"mode": mode} if mode != "affine" else {})}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def check(out: Path, sources: list[Path], bits: list[int], mode: str = "affine") -> list[str]:
    """One row per quantized model: type, max difference to mx.dequantize, match own / best other source."""
    import mlx.core as mx
    import numpy as np
    import torch

    from modelatlas.weights import open_checkpoint

    rows = []
    for src in sources:
        for b in bits:
            folder = out / folder_name(src, b, mode)
            ck, raw = open_checkpoint(folder), mx.load(str(folder / "model.safetensors"))
            diff = 0.0
            for name in ck.layers:
                base = name.removesuffix(".weight")
                ref = mx.dequantize(raw[name], raw[f"{base}.scales"], raw.get(f"{base}.biases"),
                                    group_size=ck.layers[name].group_size, bits=b, mode=mode)
                ours = ck.read(name).to(getattr(torch, str(ref.dtype).split(".")[-1]))
                diff = max(diff, float(np.abs(np.array(ref.astype(mx.float32)) - ours.float().numpy()).max()))
            own = ck.requantized_match(LAYER, open_checkpoint(src).read(LAYER))
            other = max(ck.requantized_match(LAYER, open_checkpoint(o).read(LAYER)) for o in sources if o != src)
            rows.append(f"| {folder.name} | {ck.quantization(LAYER)} | {diff:.3g} | {own:.4f} | {other:.4f} |")
    return rows


def folder_name(src: Path, bits: int, mode: str) -> str:
    """The quantized copy's folder: ``base-mlx4`` (affine, 4 bits), ``base-mlx-mxfp4``."""
    return f"{src.name}-mlx{bits}" if mode == "affine" else f"{src.name}-mlx-{mode}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", type=Path, nargs="+", help="Hugging Face model folders (model.safetensors)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--mode", choices=["affine", "mxfp4", "mxfp8"], default="affine")
    args = ap.parse_args()
    if args.mode != "affine":  # the mode's only settings
        args.bits, args.group_size = [4 if args.mode == "mxfp4" else 8], 32
    for src in args.sources:
        shutil.copytree(src, args.out / src.name, dirs_exist_ok=True)
        for b in args.bits:
            quantize_folder(src, args.out / folder_name(src, b, args.mode), b, args.group_size, args.mode)
    print("| model | type | max diff to mx.dequantize | match own source | match best other |")
    print("|---|---|---|---|---|")
    print("\n".join(check(args.out, [args.out / s.name for s in args.sources], args.bits, args.mode)))
    models = [str(p) for p in sorted(args.out.iterdir()) if p.is_dir()]
    subprocess.run([sys.executable, "-m", "modelatlas.cli.main", "lineage", "recover", *models], check=False)


if __name__ == "__main__":
    main()
