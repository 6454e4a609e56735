"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

Experts: networks trained on the real data with per-epoch snapshots theta*_0..theta*_E (cached buffer, see
:mod:`.buffer`). Each outer step:
  (1) pick an expert and a start epoch t <= ``max_start_epoch``; theta_0 = theta*_t;
  (2) take N = ``syn_steps`` differentiable SGD steps on minibatches of S (DSA) with the learnable lr alpha:
      theta_{i+1} = theta_i - alpha grad CE(S; theta_i), the parameters a flat vector run through
      ``torch.func.functional_call``;
  (3) loss = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2;
  (4) SGD steps on the images (lr ``lr_img``, momentum 0.5) and on alpha (lr ``lr_lr``, kept >= 1e-4).
Time per outer step O(N x batch_syn) net passes (x2 for the double backward); memory O(N x (P + activations)).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.cache import trained_on
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.methods.base import DistillContext, init_synthetic
from modelatlas.distill.methods.mtt.buffer import load_or_train
from modelatlas.distill.methods.mtt.config import MTTConfig
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet


def unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Views of a flat (P,) vector as named parameters (differentiable)."""
    out, i = {}, 0
    for name, shape in shapes.items():
        n = shape.numel()
        out[name] = flat[i:i + n].view(shape)
        i += n
    return out


def trajectory_loss(net, shapes, start: torch.Tensor, target: torch.Tensor, syn: SyntheticSet, steps: int,
                    batch: int, gen: torch.Generator, dsa: DSA | None) -> torch.Tensor:
    """Steps (2)-(3): the normalised distance after ``steps`` differentiable SGD steps from ``start``."""
    flat = start.clone().requires_grad_(True)
    x, y, n = syn.images, syn.targets(), len(syn)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch].to(x.device)
        xb = x[idx] if dsa is None else dsa.sample(gen, batch=len(idx)).apply(x[idx])
        ce = soft_cross_entropy(functional_call(net, unflatten(flat, shapes), (xb,)), y[idx])
        (g,) = torch.autograd.grad(ce, flat, create_graph=True)
        flat = flat - syn.lr * g
    # floor: an expert that did not move (e.g. one class, CE = 0) would make 0 / 0 = NaN images
    return ((flat - target) ** 2).sum() / ((start - target) ** 2).sum().clamp(min=1e-12)


def run(train: ArrayDataset, ipc: int, config: MTTConfig, ctx: DistillContext) -> SyntheticSet:
    dsa = DSA.for_dataset(train.input_shape) if config.dsa and len(train.input_shape) == 3 else None
    buffer, path = load_or_train(train, config, ctx.seed, ctx.device, dsa, ctx.progress)
    buffer = buffer.to(ctx.device)  # (E, epochs + 1, P)
    syn = init_synthetic(train, ipc, config.init, ctx)
    syn.lr = torch.tensor(float(config.lr_init or config.lr_teacher)).requires_grad_(True)
    syn = syn.to(ctx.device)
    spec = config.net_spec(train.input_shape)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"], seed=0,
                   device=ctx.device)
    shapes = {k: v.shape for k, v in net.named_parameters()}
    opt_img = torch.optim.SGD([syn.images], lr=config.lr_img, momentum=config.momentum_img)
    opt_lr = torch.optim.SGD([syn.lr], lr=config.lr_lr, momentum=0.5)
    batch = config.batch_syn or len(syn)

    def step(it: int, gen: torch.Generator) -> float:
        e = int(torch.randint(buffer.shape[0], (1,), generator=gen))  # (1)
        t = int(torch.randint(config.max_start_epoch + 1, (1,), generator=gen))
        loss = trajectory_loss(net, shapes, buffer[e, t], buffer[e, t + config.expert_step], syn,
                               config.syn_steps, batch, gen, dsa)
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()  # (4)
        opt_lr.step()
        with torch.no_grad():
            syn.lr.clamp_(min=1e-4)  # a negative step size would un-train the net
        return float(loss.detach())

    ctx.run_loop(config.iterations, config.checkpoint_every, step,
                 {"synthetic": syn, "optimizer": opt_img, "optimizer_lr": opt_lr}, "mtt")
    syn.meta.update({"expert_buffer": path.name, "expert_buffer_device": trained_on(path)})
    return syn.to("cpu")
