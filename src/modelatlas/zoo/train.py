"""Training one zoo model: Adam on in-memory tensors (no DataLoader), seeded minibatches, CPU-fast.

A root MLP on digits (300 steps, batch 128) takes well under a second on one core.
"""

from __future__ import annotations

import torch
from torch import nn

from modelatlas.seeding import torch_generator


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int, batch_size: int,
        seed: int, balance: bool = False) -> float:
    """Train the parameters of ``model`` that require grad with Adam + cross-entropy on minibatches drawn
    with replacement by a generator seeded with ``seed``; returns the last minibatch loss. ``balance``
    draws every label equally often (for one-vs-rest tasks).
    Time O(steps * batch_size * cost of one forward/backward); memory O(batch activations)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch_generator(seed)
    n = x.shape[0]
    weights = 1.0 / torch.bincount(y)[y].double() if balance else None  # (N,) inverse label frequency
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        if weights is None:
            idx = torch.randint(n, (min(batch_size, n),), generator=g)  # (B,)
        else:
            idx = torch.multinomial(weights, min(batch_size, n), replacement=True, generator=g)  # (B,)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x, y). O(N forward)."""
    if len(y) == 0:
        return float("nan")
    return float((model(x).argmax(1) == y).float().mean())
