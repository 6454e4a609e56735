"""IQ1-IQ3 files standing in for models not given: is the tree still recovered? (``lineage.rounding`` with the
IQ rounding variance of ``weights.gguf_grid.SHARE_IQ``)

    python bench/lineage_iq.py --quantize /tmp/llcpp/.../build/bin/llama-quantize --work /tmp/iq --seeds 0,1,2

Per seed, ``bench/lineage_read_once.py``'s tree of llama-architecture models (a base, a and b from it, a1 from a,
b1 from b; each 2-D weight moved ``--step`` of its standard deviation; width ``--width``) is written with the
base, a1 and b1 as F32 and a and b only as ``kind`` files (llama-quantize with a random importance matrix,
``bench/gguf_imatrix.py``: IQ1-IQ3 need one; ``--pure``: every tensor of that type), for each of ``--kinds``. Printed: the directed edges right of 4,
per kind and seed, and their wrong edges' kinds.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import gguf_imatrix as G  # noqa: E402  (importance matrix, llama-quantize)
import lineage_llamacpp as L  # noqa: E402  (the F32 writer)
import lineage_read_once as R  # noqa: E402  (the tree of models)

from modelatlas.lineage import recover_lineage  # noqa: E402
from modelatlas.lineage.scoring import edge_errors, score_forest  # noqa: E402

QUANTIZED = ("a", "b")  # the models given only quantized


def make_folder(args, seed: int, kind: str, models: dict) -> dict[str, str | None]:
    """The folder of one seed and kind; returns its truth, child -> parent, as file stems."""
    folder = args.work / f"s{seed}-{kind.lower()}"
    folder.mkdir(parents=True)
    stem = {n: f"{n}-{kind.lower()}" if n in QUANTIZED else n for n in models}
    rng = np.random.default_rng(seed + 1000)
    for name, tensors in models.items():
        f32 = folder / f"{name}.gguf"
        L.write_llama(f32, tensors)
        if name in QUANTIZED:
            flags = ("--pure",) if args.pure else ()
            if not G.quantize_random(args.quantize, f32, folder / f"{stem[name]}.gguf", kind, tensors, rng, flags):
                raise SystemExit(f"llama-quantize failed: {kind}")
            f32.unlink()
    truth = {stem[c]: stem[p] for c, p in R.TREE.items()}
    return {**truth, "base": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", type=Path, required=True, help="llama.cpp's llama-quantize binary")
    ap.add_argument("--work", type=Path, required=True, help="new folder for the GGUF files")
    ap.add_argument("--kinds", default="IQ2_XXS,IQ2_XS,IQ3_XXS,IQ3_S,IQ1_M")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--step", type=float, default=0.02, help="a fine-tune's move, in standard deviations")
    ap.add_argument("--pure", action="store_true", help="llama-quantize --pure: every tensor the one type (a legacy "
                    "type's file then has no K-quant layer: its least-squares scales told by its blocks)")
    args = ap.parse_args()
    R.STEP = args.step
    print("| kind | seed | directed right of 4 | wrong edges |\n|---|---|---|---|")
    total = Counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        models = R.make_models(args.width, seed)
        for kind in args.kinds.split(","):
            truth = make_folder(args, seed, kind, models)
            forest = recover_lineage(sorted((args.work / f"s{seed}-{kind.lower()}").glob("*.gguf")))
            score = score_forest(forest, truth)
            wrong = dict(Counter(edge_errors(forest, truth).values()))
            total[kind] += score.n_correct
            print(f"| {kind} | {seed} | {score.n_correct} | {wrong} |")
    print(f"\nright per kind: {dict(total)}")


if __name__ == "__main__":
    main()
