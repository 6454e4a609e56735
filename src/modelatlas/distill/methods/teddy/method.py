"""Teddy: Taylor-approximated dataset distillation with a pool of weak models (Yu et al., ECCV 2024).

The bi-level objective min_S L_T(theta_K(S)) is expanded to first order around each training step:
L_T(theta_{k+1}) ~ L_T(theta_k) - eta <grad L_T(theta_k), grad L_S(theta_k)>, and telescoping over k turns it
into **maximising the agreement of real and synthetic gradients along a training trajectory**. Per outer
iteration:
  (1) sample a model theta from the cached pool (:mod:`.pool`: early checkpoints / pruned fine-tuned copies
      of one base model);
  (2) for k = 1..traj_steps: per class c, agreement loss D(grad CE(S_c; theta_k), grad CE(T_c; theta_k))
      (1 - cos per output neuron, :func:`~modelatlas.distill.matching.gradient_match_distance`); its
      gradient w.r.t. S is **accumulated and the graph freed at once**; theta_{k+1} = one SGD step of theta_k
      on a real batch (detached: the trajectory is real, never unrolled through S);
  (3) one SGD step on S with the accumulated gradient.
Time per outer iteration O(traj_steps x K x (batch_real + ipc) x net cost); memory O(network + the
second-order graph of ONE class batch): constant in traj_steps (no unrolled graph, unlike BPTT).
"""

from __future__ import annotations

import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.cache import trained_on
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.matching import ClassSampler, gradient_match_distance
from modelatlas.distill.methods.base import DistillContext, init_synthetic
from modelatlas.distill.methods.teddy.config import TeddyConfig
from modelatlas.distill.methods.teddy.pool import POOL_JSON, load_or_build_pool
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet


def agreement_loss(net, syn: SyntheticSet, sampler: ClassSampler, batch_real: int, dsa: DSA | None,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (2) at one theta: (summed per-class gradient disagreement, its gradient w.r.t. the images).

    Each class's graph is freed right after its image gradient is taken, so memory is one class's graph."""
    params = list(net.parameters())
    targets = syn.targets()
    grad_img = torch.zeros_like(syn.images)
    total = syn.images.new_zeros(())
    for c in range(sampler.num_classes):
        xr = sampler.batch(c, batch_real, gen)
        mask = syn.classes == c
        xs = syn.images[mask]
        if dsa is not None:  # siamese: one draw for the real and the synthetic batch
            aug = dsa.sample(gen)
            xr, xs = aug.apply(xr), aug.apply(xs)
        yr = torch.full((len(xr),), c, dtype=torch.long, device=xr.device)
        g_real = [g.detach() for g in torch.autograd.grad(soft_cross_entropy(net(xr), yr), params)]
        g_syn = torch.autograd.grad(soft_cross_entropy(net(xs), targets[mask]), params, create_graph=True)
        loss = gradient_match_distance(list(g_syn), g_real)
        grad_img += torch.autograd.grad(loss, syn.images)[0]  # frees this class's graph
        total = total + loss.detach()
    return total, grad_img


def real_step(net, opt, x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator) -> None:
    """theta_{k+1}: one SGD step on a random real batch (no graph to S)."""
    idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen).to(x.device)
    loss = soft_cross_entropy(net(x[idx]), y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(train: ArrayDataset, ipc: int, config: TeddyConfig, ctx: DistillContext) -> SyntheticSet:
    spec = config.net_spec(train.input_shape)
    pool, folder, built = load_or_build_pool(train, config.pool_fields(), spec, ctx.seed, ctx.device,
                                             config.cache_dir, ctx.progress)
    syn = init_synthetic(train, ipc, config.init, ctx).to(ctx.device)
    syn.meta.update({"pool": str(folder), "pool_built_now": built, "pool_size": len(pool),
                     "pool_device": trained_on(folder / POOL_JSON)})
    img_opt = torch.optim.SGD([syn.images], lr=config.lr_img, momentum=config.momentum_img)
    sampler = ClassSampler(train, ctx.device)
    x_all, y_all = sampler.x, train.y.to(ctx.device)
    dsa = DSA.for_dataset(train.input_shape) if config.dsa and len(train.input_shape) == 3 else None
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"], seed=0,
                   device=ctx.device)

    def step(it: int, gen: torch.Generator) -> float:
        net.load_state_dict(pool[int(torch.randint(len(pool), (1,), generator=gen))])  # step (1)
        net_opt = torch.optim.SGD(net.parameters(), lr=config.lr_net)
        acc, total = torch.zeros_like(syn.images), 0.0
        for k in range(config.traj_steps):  # step (2)
            loss, g = agreement_loss(net, syn, sampler, config.batch_real, dsa, gen)
            acc += g
            total += float(loss)
            if k < config.traj_steps - 1:
                real_step(net, net_opt, x_all, y_all, config.batch_real, gen)
        img_opt.zero_grad(set_to_none=True)
        syn.images.grad = acc / config.traj_steps
        img_opt.step()  # step (3)
        return total / (config.traj_steps * train.num_classes)

    ctx.run_loop(config.iterations, config.checkpoint_every, step, {"synthetic": syn, "optimizer": img_opt}, "teddy")
    return syn.to("cpu")
