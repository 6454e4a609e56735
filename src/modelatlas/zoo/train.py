"""Training one zoo model: Adam on in-memory tensors (no DataLoader), seeded minibatches, CPU-fast.

A root MLP on digits (300 steps, batch 128) takes well under a second on one core.
"""

from __future__ import annotations

import torch
from torch import nn

from modelatlas.seeding import torch_generator


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int, batch_size: int,
        seed: int) -> float:
    """Train the parameters of ``model`` that require grad with Adam + cross-entropy on minibatches drawn
    with replacement by a generator seeded with ``seed``; returns the last minibatch loss.
    Time O(steps * batch_size * cost of one forward/backward); memory O(batch activations)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch_generator(seed)
    n = x.shape[0]
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=g)  # (B,)
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
