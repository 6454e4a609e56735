"""Synthetic model forests with known lineage, for tests and for benchmarks that need no training.

A root's matrices are heavy-tailed random weights (Student-t, as trained weights are). A child is its
parent plus a random step: a *full* fine-tune adds dense Gaussian noise and shrinks the outliers
("specialize": kurtosis falls) or grows them ("generalize": kurtosis rises); a *LoRA* child adds a rank-r
product ``B @ A``. Step sizes vary per edge. Real zoos (trained models) are built by :mod:`modelatlas.zoo`.

Time O(N L d^2) for N models of L d x d layers.
"""

from __future__ import annotations

import numpy as np
import torch

LAYERS = ("attn.q", "attn.k", "attn.v", "attn.o")


def make_synthetic_forest(n_trees: int = 3, children: int = 3, depth: int = 2, dim: int = 32, *,
                          method: str = "full", lora_rank: int = 4, stage: str = "specialize",
                          step: float = 0.05, seed: int = 0, layers: tuple[str, ...] = LAYERS):
    """Returns (weights: name -> {tensor name: tensor}, parents: name -> parent or None).

    Every node has ``children`` children down to ``depth`` levels (3 x 3 x depth 2 = 13 models a tree).
    ``method``: "full", "lora", or "mixed" (alternating by depth: full fine-tunes, then LoRA ones).
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    parents: dict[str, str | None] = {}
    for t in range(n_trees):
        root = f"t{t}"
        weights[root] = {name: _heavy_tailed(rng, dim) for name in layers}
        parents[root] = None
        frontier = [root]
        for level in range(depth):
            nxt = []
            for p in frontier:
                for c in range(children):
                    name = f"{p}_{c}"
                    lora = method == "lora" or (method == "mixed" and level % 2 == 1)
                    weights[name] = {k: _child(rng, w, lora, lora_rank, stage, step) for k, w in weights[p].items()}
                    parents[name] = p
                    nxt.append(name)
            frontier = nxt
    return weights, parents


def _heavy_tailed(rng: np.random.Generator, dim: int) -> torch.Tensor:
    w = rng.standard_t(df=5, size=(dim, dim)) / np.sqrt(dim)  # (d, d), excess kurtosis ~6
    return torch.tensor(w, dtype=torch.float32)


def _child(rng: np.random.Generator, w: torch.Tensor, lora: bool, rank: int, stage: str, step: float) -> torch.Tensor:
    x = w.double().numpy()
    scale = step * x.std() * rng.uniform(0.6, 1.4)
    if lora:
        d = x.shape[0]
        b = rng.normal(size=(d, rank))
        a = rng.normal(size=(rank, d))
        delta = b @ a  # (d, d), rank `rank`
        x = x + delta * (scale / delta.std())
    else:
        big = np.abs(x) > 2.5 * x.std()
        # Small, per-edge outlier change: a shared deterministic shrink would make siblings closer to
        # each other than to their parent.
        change = rng.uniform(0.01, 0.03)
        factor = 1 - change if stage == "specialize" else 1 + change
        x = np.where(big, x * factor, x) + rng.normal(scale=scale, size=x.shape)
    return torch.tensor(x, dtype=torch.float32)
