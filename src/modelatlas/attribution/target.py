"""The target model of DDM: an MLP trained by full-batch gradient descent on (optionally weighted) data.

Functional (``torch.func``) so that many models can be evaluated at once (``vmap`` over parameter sets).
Full-batch GD from a fixed seeded init makes training deterministic: the leave-one-cluster-out ground truth
then differs from the full model only by the removed data. Training costs O(train_steps x N x #params).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from modelatlas.distill.nets import make_net
from modelatlas.progress import Progress, resolve

Params = dict[str, torch.Tensor]


def make_model(in_shape: tuple[int, ...], num_classes: int, width: int, depth: int, seed: int) -> torch.nn.Module:
    return make_net("mlp", in_shape, num_classes, width, depth, seed=seed)


def n_params(in_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> int:
    """The parameter count of :func:`make_model`'s MLP, without building it."""
    d_in = math.prod(in_shape)
    return d_in * width + width + (depth - 1) * (width * width + width) + width * num_classes + num_classes


def init_params(model: torch.nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def losses(model, params: Params, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (N,) with hard (N,) or soft (N, K) targets."""
    logits = functional_call(model, params, (x,))  # (N, K)
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    return -(targets * F.log_softmax(logits, dim=1)).sum(1)


def train(model, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
          weights: torch.Tensor | None = None, checkpoints: int = 0,
          weight_decay: float = 0.0, progress: Progress | None = None) -> tuple[Params, list[Params]]:
    """Full-batch GD on the weighted mean loss + weight_decay / 2 x ||params||^2; returns (final params,
    ``checkpoints`` evenly spaced checkpoints starting at the init). ``weights`` (N,) 0/1 removes examples.
    ``progress``: a bar over the steps ('train target model')."""
    w = torch.ones(len(x)) if weights is None else weights.float()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    keep = set(checkpoint_steps(steps, checkpoints))
    saved: list[Params] = []
    for s in resolve(progress)(range(steps), total=steps, desc="train target model"):
        if s in keep:
            saved.append({k: v.detach().clone() for k, v in p.items()})
        loss = (losses(model, p, x, y) * w).sum() / w.sum()
        if weight_decay:
            loss = loss + 0.5 * weight_decay * sum((v ** 2).sum() for v in p.values())
        grads = torch.autograd.grad(loss, list(p.values()))
        with torch.no_grad():
            for v, g in zip(p.values(), grads):
                v -= lr * g
    return {k: v.detach() for k, v in p.items()}, saved


def checkpoint_steps(steps: int, checkpoints: int) -> list[int]:
    """The steps before which :func:`train` keeps a checkpoint: every ``steps // checkpoints``-th from 0, at most
    ``checkpoints`` of them (fewer when ``steps`` < ``checkpoints``)."""
    every = max(steps // max(checkpoints, 1), 1)
    return list(range(0, steps, every)[:checkpoints])
