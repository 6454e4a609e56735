"""Lineage on one long training run: N checkpoints of a random walk (each step adds 1% noise), in memory.

    python bench/lineage_chain.py --models 1000 --threads 1

A chain is the deepest tree: it is where per-edge work proportional to the depth shows (session 19, 1,000
checkpoints, 1 thread: 11.6 s before the replacement-cost rewrite of the edge scores, 2.8 s after).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import time

import torch

from modelatlas.lineage import recover_lineage


def make_chain(n: int, width: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = {name: torch.randn(width, width, generator=g) for name in ("a", "b")}
    models = {}
    for i in range(n):
        w = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()}
        models[f"ckpt-{i:04d}"] = dict(w)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = make_chain(args.models, args.width, args.seed)
    t = time.perf_counter()
    forest = recover_lineage(models, stage="specialize")
    wall = time.perf_counter() - t
    index = {name: i for i, name in enumerate(models)}
    right = sum(index[e.child] == index[e.parent] + 1 for e in forest.edges)
    print(f"{args.models} checkpoints, {args.width} wide: {wall:.1f} s; {right} of {args.models - 1} edges right")


if __name__ == "__main__":
    main()
