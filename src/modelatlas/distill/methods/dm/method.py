"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023).

Each iteration samples a fresh randomly initialised ConvNet (never trained) and, per class c, matches the
mean embeddings: loss = sum_c ||mean phi(A(T_c)) - mean phi(A(S_c))||^2, with one shared DSA draw A per
class. Image SGD lr 1, momentum 0.5. Time per iteration O(K (batch_real + ipc) x net cost); memory O(net
activations of one class batch).
"""

from __future__ import annotations

import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.matching import ClassSampler, mean_embedding_distance
from modelatlas.distill.methods.base import DistillContext, init_synthetic
from modelatlas.distill.methods.dm.config import DMConfig
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet


def run(train: ArrayDataset, ipc: int, config: DMConfig, ctx: DistillContext) -> SyntheticSet:
    syn = init_synthetic(train, ipc, config.init, ctx).to(ctx.device)
    opt = torch.optim.SGD([syn.images], lr=config.lr_img, momentum=config.momentum_img)
    sampler = ClassSampler(train, ctx.device)
    dsa = DSA.for_dataset(train.input_shape) if config.dsa and len(train.input_shape) == 3 else None  # images only
    spec = config.net_spec(train.input_shape)

    def step(it: int, gen: torch.Generator) -> float:
        net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                       seed=int(torch.randint(2**31 - 1, (1,), generator=gen)), device=ctx.device)
        for p in net.parameters():
            p.requires_grad_(False)  # the embedding network is never trained
        loss = syn.images.new_zeros(())
        for c in range(train.num_classes):
            xr, xs = sampler.batch(c, config.batch_real, gen), syn.images[syn.classes == c]
            if dsa is not None:
                aug = dsa.sample(gen)  # siamese: one draw for both batches
                xr, xs = aug.apply(xr), aug.apply(xs)
            with torch.no_grad():
                er = net.embed(xr)  # (B, D)
            loss = loss + mean_embedding_distance(net.embed(xs), er)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach()) / train.num_classes

    ctx.run_loop(config.iterations, config.checkpoint_every, step, {"synthetic": syn, "optimizer": opt}, "dm")
    return syn.to("cpu")
