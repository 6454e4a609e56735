"""A llama-shaped tree of models given as real llama-quantize K-quant files: is the tree recovered, and its stage?

    python bench/lineage_kquant_tree.py --quantize /tmp/llcpp/.../build/bin/llama-quantize --work /tmp/kq \\
        --kinds Q4_K_M,Q5_K_M,Q6_K,Q4_0,Q4_0/pure,Q4_K_M+Q6_K --imatrix both --seeds 0,1,2

Per seed, :data:`TREE`: a base, three fine-tunes of it and two or three fine-tunes of each (12 models, 11
edges), made by ``bench/lineage_read_once.py``'s recipe (each 2-D weight of the parent moved ``--step`` of its
standard deviation; t(5) weights; llama names, width ``--width``, ``--blocks`` blocks: rows of 256 and more, so
llama-quantize writes real K-quant blocks and applies its own Q6_K rules: output, attn_v / ffn_down of
``use_more_bits`` blocks). Each run of ``--kinds`` gives a ``--share`` of the models (seeded; 1.0: all) only as
llama-quantize files, the others as F32: one type ("Q4_K_M"), or a mix cycled over the models ("Q4_K_M+Q6_K");
"/pure" adds ``--pure`` (every tensor the one type). ``--imatrix``: none, random (a random importance matrix per
file, ``bench/gguf_imatrix.py``) or both. Printed per run and seed: the directed edges right of 11, the wrong
edges' kinds, the stage found (its confidence), the stage's edges right when forced to "specialize" (the
recipe's stage: noise added lowers the kurtosis), and the seconds ``recover_lineage`` took (one torch thread).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import gguf_imatrix as G  # noqa: E402  (importance matrix, llama-quantize)
import lineage_llamacpp as L  # noqa: E402  (the F32 writer)
import lineage_read_once as R  # noqa: E402  (the fine-tune recipe)

from modelatlas.lineage import recover_lineage  # noqa: E402
from modelatlas.lineage.scoring import edge_errors, score_forest  # noqa: E402

TREE = {"a": "base", "b": "base", "c": "base", "a1": "a", "a2": "a", "b1": "b", "b2": "b", "b3": "b",
        "c1": "c", "c2": "c", "c3": "c"}  # child -> parent, parents first


def given_quantized(seed: int, share: float) -> set[str]:
    """The models given only quantized: a seeded ``share`` of all (the same for every run of a seed)."""
    names = ["base", *TREE]
    n = round(share * len(names))
    return set(np.random.default_rng(seed + 2000).permutation(names)[:n].tolist())


def run_types(run: str) -> tuple[list[str], tuple[str, ...]]:
    """("Q4_K_M+Q6_K/pure") -> (["Q4_K_M", "Q6_K"], ("--pure",))."""
    types, _, opt = run.partition("/")
    return types.split("+"), (("--pure",) if opt == "pure" else ())


def make_folder(args, folder: Path, models: dict, run: str, imatrix: bool, seed: int) -> dict[str, str | None]:
    """Write one run's folder; returns its truth, child -> parent, as file stems."""
    folder.mkdir(parents=True)
    types, flags = run_types(run)
    chosen = given_quantized(seed, args.share)
    rng = np.random.default_rng(seed + 1000)
    stem = {}
    for i, (name, tensors) in enumerate(models.items()):
        f32 = folder / f"{name}.gguf"
        L.write_llama(f32, tensors, embed=args.width, blocks=args.blocks, ff=2 * args.width, vocab=args.width)
        stem[name] = name
        if name in chosen:
            kind = types[i % len(types)]
            stem[name] = f"{name}-{kind.lower()}"
            out = folder / f"{stem[name]}.gguf"
            ok = (G.quantize_random(args.quantize, f32, out, kind, tensors, rng, flags) if imatrix
                  else G.quantize(args.quantize, f32, out, kind, None, flags))
            if not ok:
                raise SystemExit(f"llama-quantize failed: {kind} {flags}")
            f32.unlink()
    return {**{stem[c]: stem[p] for c, p in TREE.items()}, stem["base"]: None}


def score_run(folder: Path, truth: dict) -> dict:
    """Recover the folder (auto stage, then forced "specialize"): scores, stage and time."""
    import torch

    torch.set_num_threads(1)
    files = sorted(folder.glob("*.gguf"))
    start = time.perf_counter()
    forest = recover_lineage(files)
    took = time.perf_counter() - start
    forced = recover_lineage(files, stage="specialize")
    d = forest.decisions
    return {"right": score_forest(forest, truth).n_correct, "forced": score_forest(forced, truth).n_correct,
            "wrong": dict(Counter(edge_errors(forest, truth).values())), "stage": d.get("stage"),
            "confidence": d.get("stage_confidence", 1.0), "seconds": took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", type=Path, required=True, help="llama.cpp's llama-quantize binary")
    ap.add_argument("--work", type=Path, required=True, help="new folder for the GGUF files")
    ap.add_argument("--kinds", default="Q4_K_M,Q5_K_M,Q6_K,Q4_0,Q4_0/pure,Q4_K_M+Q6_K")
    ap.add_argument("--imatrix", choices=("none", "random", "both"), default="both")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--share", type=float, default=1.0, help="share of the models given only quantized")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--step", type=float, default=0.02, help="a fine-tune's move, in standard deviations")
    ap.add_argument("--keep", action="store_true", help="keep the folders (else each is removed once scored)")
    args = ap.parse_args()
    R.STEP = args.step
    imx = {"none": (False,), "random": (True,), "both": (False, True)}[args.imatrix]
    print("| kinds | imatrix | seed | directed right of 11 | wrong edges | stage (confidence) | forced specialize | s |")
    print("|---|---|---|---|---|---|---|---|")
    total, forced = Counter(), Counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        models = R.make_models(args.width, seed, TREE, args.blocks)
        for run in args.kinds.split(","):
            for use in imx:
                folder = args.work / f"s{seed}-{run.lower().replace('/', '-')}{'-imx' if use else ''}"
                r = score_run(folder, make_folder(args, folder, models, run, use, seed))
                key = f"{run}{' imatrix' if use else ''}"
                total[key] += r["right"]
                forced[key] += r["forced"]
                print(f"| {run} | {'random' if use else '-'} | {seed} | {r['right']} | {r['wrong']} | {r['stage']} "
                      f"({r['confidence']:.2f}) | {r['forced']} | {r['seconds']:.1f} |", flush=True)
                if not args.keep:
                    shutil.rmtree(folder)
    print(f"\nright per run: {dict(total)}\nforced specialize: {dict(forced)}")


if __name__ == "__main__":
    main()
