"""Does an AWQ model whose source is not given stand in for it? (``lineage.unsmoothed``)

    python bench/lineage_awq_standin.py --seeds 0 1 2 3 4 --work /tmp/awq_standin

Per seed: a synthetic forest of Llama-named models (``lineage.synthetic``: 2 trees, 2 children a node, depth 2;
2 decoder blocks of 128 x 128 projections, heavy-tailed; the norms 1 + 0.1 N(0, 1), each fine-tune moving them
by ``--norm-step``), float32. One model (``--replace``: the root ``t0``, the middle ``t0_0`` or the leaf
``t0_0_0``) is given only as its AWQ file (AutoAWQ's GEMM layout, groups of 32, factors ``exp(U(-r, r))``,
``--spread`` r, clipping: :mod:`modelatlas.zoo.awq`). Printed: directed-edge accuracy with
the AWQ file in its source's place, and the AWQ model's recovered parent and children against its source's.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import math
import shutil
from pathlib import Path

import torch

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import score_forest
from modelatlas.lineage.synthetic import make_synthetic_forest
from modelatlas.zoo.awq import CONFIG, awq_model, save_folder

H, BLOCKS = 128, 2
PROJ = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn", "gate": "mlp", "up": "mlp",
        "down": "mlp"}


def make_zoo(seed: int, norm_step: float) -> tuple[dict, dict]:
    """(name -> Llama-named tensors, name -> parent) of the synthetic forest, norms added."""
    layers = tuple(f"model.layers.{b}.{m}.{p}_proj.weight" for b in range(BLOCKS) for p, m in PROJ.items())
    weights, parents = make_synthetic_forest(2, 2, 2, H, seed=seed, layers=layers)
    gen = torch.Generator().manual_seed(1000 + seed)
    norms = [f"model.layers.{b}.{n}.weight" for b in range(BLOCKS) for n in ("input_layernorm", "post_attention_layernorm")]
    for name, parent in parents.items():  # in creation order: a parent before its children
        for n in norms:
            base = 1 + 0.1 * torch.randn(H, generator=gen) if parent is None else weights[parent][n]
            weights[name][n] = base if parent is None else base + norm_step * torch.randn(H, generator=gen)
    return weights, parents


def run(seed: int, args) -> tuple[float, str]:
    weights, parents = make_zoo(seed, args.norm_step)
    work = Path(args.work) / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    gone, awq = args.replace, args.replace + "-awq"
    paths = [save_folder(work / n, w) for n, w in weights.items() if n != gone]
    paths.append(save_folder(work / awq, awq_model(weights[gone], seed + 7, args.spread), CONFIG))
    truth = {(awq if n == gone else n): (awq if p == gone else p) for n, p in parents.items()}
    forest = recover_lineage(paths)
    score = score_forest(forest, truth)
    up = [e.parent for e in forest.edges if e.child == awq]
    down = sorted(e.child for e in forest.edges if e.parent == awq)
    want = (truth[awq], sorted(c for c, p in truth.items() if p == awq))
    where = f"parent {up[0] if up else None} (true {want[0]}), children {down} (true {want[1]})"
    return score.directed, f"{where}; unsmoothed: {forest.decisions.get('awq_unsmoothed', {})}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--replace", default="t0_0")
    ap.add_argument("--spread", type=float, default=math.log(4))
    ap.add_argument("--norm-step", type=float, default=0.005)
    ap.add_argument("--work", default="/tmp/awq_standin")
    args = ap.parse_args()
    accs = []
    for seed in args.seeds:
        acc, where = run(seed, args)
        accs.append(acc)
        print(f"seed {seed}: directed {acc:.3f}; {where}", flush=True)
    print(f"mean directed {sum(accs) / len(accs):.3f} over {len(accs)} seeds")


if __name__ == "__main__":
    main()
