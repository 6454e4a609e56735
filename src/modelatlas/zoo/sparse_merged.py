"""mergekit's sparse merges of one tensor (``ties``, ``dare_ties``, ``dare_linear``) for zoo merges
(:mod:`modelatlas.zoo.merged`): task vectors trimmed to their largest magnitudes (TIES) or dropped at random
and rescaled (DARE), then summed, over the values whose sign agrees with the elected one for the ``*ties``
kinds. Written from mergekit's documented semantics (generalized task arithmetic: ``ties`` normalizes by the
agreeing weights and does not rescale; the DARE kinds rescale by 1/density and do not normalize).
Time O(models x n log n) per tensor of n values (the top-k), memory O(models x n).
"""

from __future__ import annotations

import torch


def sparse_merge(merge: dict, base: torch.Tensor, tuned: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """The merge ``merge`` (kind, weights [base's, model's, ...], density) of the tensors ``tuned`` on ``base``
    (float64), DARE's drops drawn from ``gen``. O(models x n log n)."""
    kind, density = merge["kind"], merge["density"]
    weights = torch.tensor(merge["weights"][1:], dtype=base.dtype).view(-1, *[1] * base.dim())  # (K, 1, ...)
    if kind == "ties":
        deltas = [trim(t - base, density) for t in tuned]
    else:
        deltas = [drop(t - base, density, gen) for t in tuned]
    weighted = torch.stack(deltas) * weights  # (K, *shape)
    if kind == "dare_linear":
        return base + weighted.sum(0)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(base.dtype)  # mergekit: a zero sum elects +
    agree = (weighted.sign() == elected).to(base.dtype)  # (K, *shape); a trimmed (zero) value agrees with none
    mixed = (weighted * agree).sum(0)
    if kind == "ties":  # the agreeing values' weighted mean
        divisor = (weights * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + mixed


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density n)`` largest magnitudes (at least one) set to 0. O(n log n)."""
    flat = delta.flatten()  # (n,)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k).indices] = 1
    return (flat * keep).view(delta.shape)


def drop(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """``delta`` with each value kept with probability ``density`` (drawn from ``gen``) and rescaled by
    1/density, the others 0. O(n)."""
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float64) < density
    return delta * keep / density
