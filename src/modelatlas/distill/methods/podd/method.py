"""PoDD: poster dataset distillation (Shul, Horwitz & Hoshen, TMLR 2025), trained with the RaT-BPTT engine.

(1) Layout: poster size and crop grid for the target IPC (:mod:`.poster`); class grid ordered by PoCO
    (:mod:`.poco`).
(2) Init: per class cell an area from a random real image of that class (or the class Gaussian: per-pixel
    mean + std x noise), resized to the cell, replicated outwards and linearly cross-faded into the
    neighbouring cells over ``fade`` x the cell size.
(3) Train: RaT-BPTT (:func:`~modelatlas.distill.methods.ratbptt.method.train_unrolled`) on the learnable
    poster (and the PoDDL label grid, clipped at >= 0 after every step); the synthetic images are the crops,
    their targets the grid labels (or the fixed pixel-count labels).
(4) Result: a :class:`SyntheticSet` of all crops with their labels (so every evaluation protocol applies
    unchanged), the poster, label grid and class grid in ``extras`` and the layout in ``meta["poster"]``;
    result folders store the poster, not the crops (:func:`compact` / :func:`expand`).
Time: RaT-BPTT's per outer step with N = n_x n_y crops; memory O(C H_p W_p + window x activations).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.methods.base import DistillContext
from modelatlas.distill.methods.podd import poster as P
from modelatlas.distill.methods.podd.config import PoDDConfig
from modelatlas.distill.methods.podd.poco import class_distances, greedy_order
from modelatlas.distill.methods.ratbptt.method import train_unrolled
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import ConfigError
from modelatlas.seeding import derive_seed, torch_generator


def _area(train: ArrayDataset, k: int, size: tuple[int, int], init: str, gen: torch.Generator) -> torch.Tensor:
    """The (C, h_cell, w_cell) content of class ``k``'s cell: a real image or a class-Gaussian sample."""
    xk = train.x[train.y == k].float()  # (N_k, C, H, W)
    if init == "real":
        img = xk[int(torch.randint(len(xk), (1,), generator=gen))]
    else:
        std = xk.std(0) if len(xk) > 1 else torch.zeros_like(xk[0])  # one example: std is NaN, use the mean
        img = xk.mean(0) + std * torch.randn(xk.shape[1:], generator=gen)
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]


def crossfade_init(train: ArrayDataset, layout: P.Layout, class_grid: torch.Tensor, init: str, fade: float,
                   gen: torch.Generator) -> torch.Tensor:
    """Step (2): the initial poster (C, H_p, W_p)."""
    ry, rx = P.edges(layout.height, layout.rows), P.edges(layout.width, layout.cols)
    yy = torch.arange(layout.height, dtype=torch.float32)[:, None]  # (H_p, 1)
    xx = torch.arange(layout.width, dtype=torch.float32)[None, :]  # (1, W_p)
    num = torch.zeros(train.x.shape[1], layout.height, layout.width)
    den = torch.zeros(1, layout.height, layout.width)
    for r in range(layout.rows):
        for c in range(layout.cols):
            y0, y1, x0, x1 = ry[r], ry[r + 1], rx[c], rx[c + 1]
            area = _area(train, int(class_grid[r, c]), (y1 - y0, x1 - x0), init, gen)
            full = F.pad(area[None], (x0, layout.width - x1, y0, layout.height - y1), mode="replicate")[0]
            m = max(1.0, fade * min(y1 - y0, x1 - x0))
            d = torch.maximum((y0 - yy).clamp(min=0) + (yy - (y1 - 1)).clamp(min=0),
                              (x0 - xx).clamp(min=0) + (xx - (x1 - 1)).clamp(min=0))  # (H_p, W_p) outside distance
            wgt = (1 - d / m).clamp(min=0)
            num += wgt * full
            den += wgt
    return num / den


def plan(train: ArrayDataset, ipc: float, cfg: PoDDConfig) -> tuple[P.Layout, torch.Tensor, str]:
    """Step (1): (layout, (rows, cols) class grid, distance source)."""
    _, h, w = train.input_shape
    smallest = int(torch.bincount(train.y, minlength=train.num_classes).min())
    if ipc > max(smallest, 1):  # more pixels than the class's own images: --ipc 1000000 hung building the poster
        raise ConfigError(f"poster ipc {ipc:g} (--ipc / --set poster_ipc=) is above the {smallest} training images "
                          f"of the smallest class of {train.name!r}: a poster holds fewer pixels than the data it "
                          "distils; lower the ipc")
    layout = P.make_layout(ipc, train.num_classes, h, w, (cfg.crops_x, cfg.crops_y), cfg.label_refine,
                           cfg.label_shrink, cfg.label_temperature)
    if cfg.class_order == "natural":
        return layout, torch.arange(train.num_classes).view(layout.rows, layout.cols), "natural"
    dist, source = class_distances(list(train.classes), train.x, train.y, train.num_classes)
    return layout, torch.from_numpy(greedy_order(np.asarray(dist), layout.rows, layout.cols)), source


def crop_set(poster: torch.Tensor, layout: P.Layout, class_grid: torch.Tensor, labels: torch.Tensor,
             names: list[str], extras: dict, meta: dict) -> SyntheticSet:
    """Step (4): the crops as a SyntheticSet (label logits = log labels, so softmax gives the labels back)."""
    crops = P.extract_crops(poster.detach().cpu(), layout)  # (N, C, h, w)
    labels = labels.detach().cpu()
    return SyntheticSet(crops, labels.argmax(1), labels.shape[1], labels.clamp(min=1e-8).log(), None, names,
                        {"poster": poster.detach().cpu(), "class_grid": class_grid, **extras},
                        {**meta, "poster": layout.to_dict()})


def run(train: ArrayDataset, ipc: int, config: PoDDConfig, ctx: DistillContext) -> SyntheticSet:
    if len(train.input_shape) != 3:
        raise ConfigError(f"podd needs images (C, H, W), got input shape {tuple(train.input_shape)}")
    target = float(config.poster_ipc if config.poster_ipc is not None else ipc)
    layout, class_grid, source = plan(train, target, config)
    gen = torch_generator(derive_seed(ctx.seed, "init"))
    poster = crossfade_init(train, layout, class_grid, config.init, config.fade, gen).to(ctx.device).requires_grad_(True)
    k = train.num_classes
    weights = P.label_weights(layout).to(ctx.device)  # (N, cells)
    grid = P.init_label_grid(layout, class_grid, k).to(ctx.device).requires_grad_(config.learn_labels)
    fixed = P.count_labels(layout, class_grid, k).to(ctx.device)
    holder = _Holder(poster, grid)
    groups = [{"params": [poster], "lr": config.lr_img}]
    if config.learn_labels:
        groups.append({"params": [grid], "lr": config.lr_label})

    def materialise():
        return P.extract_crops(poster, layout), P.grid_labels(grid, weights) if config.learn_labels else fixed

    def clip_labels():
        with torch.no_grad():
            grid.clamp_(min=0)

    train_unrolled(train, config, ctx, groups, materialise, {"poster": holder}, clip_labels, "podd")
    labels = P.grid_labels(grid, weights) if config.learn_labels else fixed
    extras = {"label_grid": grid.detach().cpu()} if config.learn_labels else {}
    meta = {"poster_ipc": layout.ipc(k), "poster_ipc_target": target, "class_order_source": source,
            "inner_lr": config.inner_lr, "crops": layout.num_crops, "pixels_per_class": math.prod(poster.shape) / k}
    return crop_set(poster, layout, class_grid, labels, list(train.classes), extras, meta)


class _Holder:
    """The poster and label grid as one checkpointable state (in-place loads keep the optimiser valid)."""

    def __init__(self, poster: torch.Tensor, grid: torch.Tensor):
        self.poster, self.grid = poster, grid

    def state_dict(self) -> dict:
        return {"poster": self.poster.detach(), "grid": self.grid.detach()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.poster.copy_(state["poster"])
            self.grid.copy_(state["grid"])


def compact(syn: SyntheticSet) -> SyntheticSet:
    """The storable form of a poster set: poster, label grid, class grid and layout, without the crops."""
    x = syn.images.detach()
    return SyntheticSet(x[:0], syn.classes[:0], syn.num_classes, None, syn.lr, syn.class_names, syn.extras,
                        {**syn.meta, "stored": "poster"})


def expand(syn: SyntheticSet) -> SyntheticSet:
    """Inverse of :func:`compact`: rebuild the crops and their labels from the poster and the layout."""
    layout = P.Layout(**syn.meta["poster"])
    grid = syn.extras["class_grid"]
    if "label_grid" in syn.extras:
        labels = P.grid_labels(syn.extras["label_grid"], P.label_weights(layout))
    else:
        labels = P.count_labels(layout, grid, syn.num_classes)
    meta = {k: v for k, v in syn.meta.items() if k not in ("stored", "poster")}
    extras = {k: v for k, v in syn.extras.items() if k not in ("poster", "class_grid")}
    return crop_set(syn.extras["poster"], layout, grid, labels, syn.class_names, extras, meta)
