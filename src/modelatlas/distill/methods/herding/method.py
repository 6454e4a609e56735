"""Herding selection (Welling, ICML 2009; used as a coreset baseline by Zhao et al. ICLR 2021).

Per class: embed every real example (phi), then greedily pick the example that brings the mean of the picked
set closest to the class mean: at step t choose argmin_i ||mu - (s + phi_i) / t|| over unpicked i, with s the
sum of the picked features. Time O(N D) to embed plus O(ipc * N_c * D) per class; memory O(N D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.methods.base import DistillContext
from modelatlas.distill.methods.herding.config import HerdingConfig
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet, check_class_sizes
from modelatlas.progress import resolve
from modelatlas.seeding import derive_seed, torch_generator


def herd(features: torch.Tensor, k: int) -> list[int]:
    """Indices of ``k`` rows of ``features`` (N, D) chosen by herding, in order of selection."""
    mu = features.mean(0)  # (D,)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    for t in range(1, k + 1):
        dist = ((mu - (total + features) / t) ** 2).sum(1)  # (N,)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        total = total + features[i]
    return chosen


def _embedder(train: ArrayDataset, config: HerdingConfig, ctx: DistillContext):
    if config.embed == "pixels":
        return lambda x: x.flatten(1)
    spec = config.net_spec(train.input_shape)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                   seed=derive_seed(ctx.seed, "herding-net"), device=ctx.device)
    if config.embed == "trained":
        gen = torch_generator(derive_seed(ctx.seed, "herding-batches"))
        opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
        bar = resolve(ctx.progress)(range(config.train_steps), total=config.train_steps, desc="herding: train embedder")
        for _ in bar:
            idx = torch.randint(len(train), (config.batch_size,), generator=gen)
            loss = F.cross_entropy(net(train.x[idx].to(ctx.device)), train.y[idx].to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    net.eval()
    return lambda x: net.embed(x)


@torch.no_grad()
def _features(embed, x: torch.Tensor, device: torch.device, batch: int = 1024) -> torch.Tensor:
    return torch.cat([embed(x[i:i + batch].to(device)) for i in range(0, len(x), batch)])  # (N, D)


def run(train: ArrayDataset, ipc: int, config: HerdingConfig, ctx: DistillContext) -> SyntheticSet:
    check_class_sizes(train, ipc)  # before training the embedding net
    embed = _embedder(train, config, ctx)
    picks = []
    for c in range(train.num_classes):
        pool = torch.nonzero(train.y == c).flatten()
        feats = _features(embed, train.x[pool], ctx.device)
        picks.append(pool[torch.tensor(herd(feats, ipc), dtype=torch.long)])
    idx = torch.cat(picks)
    return SyntheticSet(train.x[idx], train.y[idx], train.num_classes, class_names=train.classes,
                        meta={"init": f"herding ({config.embed} embedding)"})
