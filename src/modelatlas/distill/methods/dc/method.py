"""DC / DSA: dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021; Zhao & Bilen,
ICML 2021).

Algorithm 1 of the DC paper, per outer iteration (a fresh randomly initialised network theta):
  for each of ``outer_loop`` steps:
    (1) per class c: real batch T_c, synthetic S_c (the same DSA parameters for both when ``dsa``);
    (2) loss = sum_c D(grad_theta CE(S_c), grad_theta CE(T_c)), D = :func:`gradient_match_distance`;
    (3) one SGD step on S (lr 0.1, momentum 0.5);
    (4) unless last: ``inner_loop`` epochs of SGD on theta over the (detached) synthetic set.
Time per outer iteration O(outer_loop x (K x (batch_real + ipc) + inner_loop x K ipc) x net cost); memory
O(network + second-order graph of one class batch).
"""

from __future__ import annotations

import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.matching import ClassSampler, gradient_match_distance
from modelatlas.distill.methods.base import DistillContext, init_synthetic
from modelatlas.distill.methods.dc.config import DCConfig
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import ConfigError


def _match_loss(net, syn: SyntheticSet, sampler: ClassSampler, cfg: DCConfig, dsa: DSA | None, gen) -> torch.Tensor:
    params = [p for p in net.parameters()]
    targets = syn.targets()
    total = syn.images.new_zeros(())
    for c in range(sampler.num_classes):
        xr = sampler.batch(c, cfg.batch_real, gen)
        mask = syn.classes == c
        xs = syn.images[mask]
        if dsa is not None:  # step (1): siamese -- one draw for both batches
            aug = dsa.sample(gen)
            xr, xs = aug.apply(xr), aug.apply(xs)
        yr = torch.full((len(xr),), c, dtype=torch.long, device=xr.device)
        g_real = [g.detach() for g in torch.autograd.grad(soft_cross_entropy(net(xr), yr), params)]
        g_syn = torch.autograd.grad(soft_cross_entropy(net(xs), targets[mask]), params, create_graph=True)
        total = total + gradient_match_distance(list(g_syn), g_real)  # step (2)
    return total


def _train_net(net, opt, syn: SyntheticSet, cfg: DCConfig, dsa: DSA | None, epochs: int, gen) -> None:
    """Step (4): ``epochs`` epochs of SGD on the network over the detached synthetic set."""
    x, t = syn.images.detach(), syn.targets().detach()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for b in range(0, len(x), cfg.batch_train):
            idx = order[b:b + cfg.batch_train]
            xb = dsa.sample(gen, batch=len(idx)).apply(x[idx]) if dsa is not None else x[idx]
            loss = soft_cross_entropy(net(xb), t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run(train: ArrayDataset, ipc: int, config: DCConfig, ctx: DistillContext) -> SyntheticSet:
    if config.dsa and len(train.input_shape) != 3:  # it ran as DC without a word
        raise ConfigError(f"DSA (dsa=true) augments images, and {train.name!r} holds inputs of shape "
                          f"{tuple(train.input_shape)}, not images: use method dc (gradient matching without it)")
    syn = init_synthetic(train, ipc, config.init, ctx).to(ctx.device)
    img_opt = torch.optim.SGD([syn.images], lr=config.lr_img, momentum=config.momentum_img)
    sampler = ClassSampler(train, ctx.device)
    dsa = DSA.for_dataset(train.input_shape) if config.dsa else None
    spec, (outer, inner) = config.net_spec(train.input_shape), config.loops(ipc)

    def step(it: int, gen: torch.Generator) -> float:
        net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                       seed=int(torch.randint(2**31 - 1, (1,), generator=gen)), device=ctx.device)
        net_opt = torch.optim.SGD(net.parameters(), lr=config.lr_net)
        total = 0.0
        for ol in range(outer):
            loss = _match_loss(net, syn, sampler, config, dsa, gen)
            img_opt.zero_grad(set_to_none=True)
            loss.backward()
            img_opt.step()  # step (3)
            total += float(loss.detach())
            if ol < outer - 1:
                _train_net(net, net_opt, syn, config, dsa, inner, gen)
        return total / (outer * train.num_classes)

    ctx.run_loop(config.iterations, config.checkpoint_every, step, {"synthetic": syn, "optimizer": img_opt},
                 "dsa" if config.dsa else "dc")
    return syn.to("cpu")
