"""RaT-BPTT: dataset distillation by random truncated backpropagation through time (Feng, Vedantam & Kempe,
ICLR 2024).

Performance matching: the synthetic set S is scored by how well a network *trained on S* does on real data.
Each outer step (paper, Algorithm 1):
  (1) a fresh ConvNet theta_0 and a fresh inner Adam (lr 1e-3, hand-written below so that its update is
      differentiable; ``torch.func.functional_call`` runs the net on explicit parameter tensors, replacing
      the unmaintained ``higher`` library);
  (2) draw an offset c uniformly in [0, total - window];
  (3) run c plain (non-differentiable) inner Adam steps on random batches of S;
  (4) run ``window`` differentiable inner steps (the graph keeps every update);
  (5) outer loss = CE of the unrolled net theta_{c+window} on a large augmented real batch;
  (6) back-propagate into S (pixels, and labels when learned), clip the gradient norm to ``clip_factor`` x
      its running mean (EMA ``clip_ema``), and take an outer Adam step (lr 1e-3).
The engine (:func:`train_unrolled`) only needs a function returning the current (images, targets), so PoDD
reuses it for crops of a poster.

Time per outer step O((c + window) x batch_syn + batch_real) net passes (about 2x for the window's
double backward); memory O(window x (parameters + activations of batch_syn)), independent of c.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.methods.base import DistillContext
from modelatlas.distill.methods.ratbptt.config import RaTBPTTConfig
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.seeding import derive_seed, torch_generator

Params = dict[str, torch.Tensor]


class DiffAdam:
    """Adam (Kingma & Ba) on a dict of tensors, written out so that the update is differentiable.

    Same arithmetic as ``torch.optim.Adam`` (bias-corrected moments, ``eps`` added to sqrt(v_hat)); the
    square root gets a 1e-20 floor so that its derivative stays finite where a gradient is exactly 0.
    O(#parameters) time and memory per step (times the window when differentiated)."""

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params) -> Params:
        """New parameters (graph-connected to ``params``/``grads`` when those carry graphs)."""
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        out = {}
        for k, p in params.items():
            self.m[k] = b1 * self.m[k] + (1 - b1) * grads[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * grads[k] * grads[k]
            denom = torch.sqrt(self.v[k] / bc2 + 1e-20) + self.eps
            out[k] = p - self.lr * (self.m[k] / bc1) / denom
        return out

    def detach(self) -> None:
        """Cut the moments' graphs (after the plain steps)."""
        self.m = {k: v.detach() for k, v in self.m.items()}
        self.v = {k: v.detach() for k, v in self.v.items()}


def inner_steps(net: torch.nn.Module, params: Params, opt: DiffAdam, x: torch.Tensor, y: torch.Tensor, steps: int,
                batch: int, gen: torch.Generator, dsa: DSA | None, differentiable: bool) -> Params:
    """``steps`` Adam steps of ``net`` (run with ``params``) on random batches of (x, y). Differentiable
    steps keep the graph through every update (create_graph); plain steps detach after each."""
    n = x.shape[0]
    for _ in range(steps):
        if not differentiable:
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        idx = torch.randint(n, (min(batch, n),), generator=gen).to(x.device)
        xb, yb = x[idx], y[idx]
        if dsa is not None:
            xb = dsa.sample(gen, batch=len(xb)).apply(xb)
        loss = soft_cross_entropy(functional_call(net, params, (xb,)), yb)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
        params = opt.step(params, dict(zip(params, grads)))
        if not differentiable:
            opt.detach()
    return params if differentiable else {k: v.detach() for k, v in params.items()}


class GradClipper:
    """Clips a gradient norm to ``factor`` x its running mean (EMA ``decay`` of the clipped norms); Stateful."""

    def __init__(self, factor: float = 2.0, decay: float = 0.9):
        self.factor, self.decay, self.mean = factor, decay, 0.0

    def clip(self, grads: list[torch.Tensor]) -> float:
        """Scale ``grads`` in place; returns the norm before clipping."""
        norm = float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))
        limit = self.factor * self.mean
        if self.mean > 0 and norm > limit:
            for g in grads:
                g.mul_(limit / norm)
        used = min(norm, limit) if self.mean > 0 else norm
        self.mean = used if self.mean == 0 else self.decay * self.mean + (1 - self.decay) * used
        return norm

    def state_dict(self) -> dict:
        return {"mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.mean = float(state["mean"])


def train_unrolled(train: ArrayDataset, cfg: RaTBPTTConfig, ctx: DistillContext, groups: list[dict],
                   materialise: Callable[[], tuple[torch.Tensor, torch.Tensor]], states: dict,
                   after_step: Callable[[], None] | None = None, desc: str = "ratbptt") -> list[float]:
    """The RaT-BPTT outer loop over learnable tensors ``groups`` (Adam param groups); ``materialise()``
    returns the current synthetic (images, targets) as functions of them. Returns the loss history."""
    opt = torch.optim.Adam(groups)
    clipper = GradClipper(cfg.clip_factor, cfg.clip_ema)
    dsa = DSA.for_dataset(train.input_shape) if cfg.dsa and len(train.input_shape) == 3 else None
    spec = cfg.net_spec(train.input_shape)
    x_real, y_real = train.x.to(ctx.device), train.y.to(ctx.device)
    learnables = [p for g in groups for p in g["params"]]

    def step(it: int, gen: torch.Generator) -> float:
        net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                       seed=int(torch.randint(2**31 - 1, (1,), generator=gen)), device=ctx.device)
        params = {k: v.detach() for k, v in net.named_parameters()}
        inner = DiffAdam(params, cfg.inner_lr)
        c = int(torch.randint(cfg.total - cfg.window + 1, (1,), generator=gen))  # (2) offset
        x, y = materialise()
        params = inner_steps(net, params, inner, x.detach(), y.detach(), c, cfg.batch_syn, gen, dsa, False)  # (3)
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        params = inner_steps(net, params, inner, x, y, cfg.window, cfg.batch_syn, gen, dsa, True)  # (4)
        idx = torch.randint(len(x_real), (cfg.batch_real,), generator=gen).to(ctx.device)
        xr = x_real[idx] if dsa is None else dsa.sample(gen, batch=len(idx)).apply(x_real[idx])
        loss, grads = outer_grads(net, params, xr, y_real[idx], learnables, cfg.real_chunk)  # (5)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(learnables, grads)]
        clipper.clip(grads)  # (6)
        for p, g in zip(learnables, grads):
            p.grad = g
        opt.step()
        if after_step is not None:
            after_step()
        return loss

    all_states = {**states, "optimizer": opt, "clipper": clipper}
    return ctx.run_loop(cfg.iterations, cfg.checkpoint_every, step, all_states, desc)


def outer_grads(net: torch.nn.Module, params: Params, xr: torch.Tensor, yr: torch.Tensor,
                learnables: list[torch.Tensor], chunk: int | None) -> tuple[float, list[torch.Tensor | None]]:
    """(outer loss, its gradients w.r.t. ``learnables``): mean CE of the unrolled net on the real batch.

    With ``chunk``, the gradient w.r.t. the unrolled parameters is summed over chunks of the real batch on
    detached copies (each chunk's activations freed before the next), then sent back through the unrolled
    graph in one ``autograd.grad`` with those grad_outputs: by the chain rule the same gradient as one pass,
    with the real batch's memory cut from O(batch_real) to O(chunk) activations."""
    if chunk is None or chunk >= len(xr):
        loss = soft_cross_entropy(functional_call(net, params, (xr,)), yr)
        return float(loss.detach()), list(torch.autograd.grad(loss, learnables, allow_unused=True))
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    total, acc = 0.0, [torch.zeros_like(v) for v in leaves.values()]
    for xc, yc in zip(xr.split(chunk), yr.split(chunk)):
        part = soft_cross_entropy(functional_call(net, leaves, (xc,)), yc) * (len(xc) / len(xr))  # weighted means
        for g_sum, g in zip(acc, torch.autograd.grad(part, list(leaves.values()))):
            g_sum.add_(g)
        total += float(part.detach())
    return total, list(torch.autograd.grad(list(params.values()), learnables, grad_outputs=acc, allow_unused=True))


def init_set(train: ArrayDataset, ipc: int, cfg: RaTBPTTConfig, seed: int) -> SyntheticSet:
    """Real (default) or noise images, with learnable one-hot x ``label_scale`` logits when ``learn_labels``."""
    gen = torch_generator(derive_seed(seed, "init"))
    if cfg.init == "real":
        return SyntheticSet.from_real(train, ipc, gen, soft_labels=cfg.learn_labels, label_scale=cfg.label_scale)
    syn = SyntheticSet.from_noise(train.input_shape, train.num_classes, ipc, gen, soft_labels=cfg.learn_labels,
                                  class_names=train.classes)
    if syn.label_logits is not None:
        syn.label_logits.data.mul_(cfg.label_scale / 10.0)  # from_noise uses scale 10
    return syn


def run(train: ArrayDataset, ipc: int, config: RaTBPTTConfig, ctx: DistillContext) -> SyntheticSet:
    syn = init_set(train, ipc, config, ctx.seed).to(ctx.device)
    groups = [{"params": [syn.images], "lr": config.lr_img}]
    if syn.label_logits is not None:
        groups.append({"params": [syn.label_logits], "lr": config.lr_label})
    train_unrolled(train, config, ctx, groups, lambda: (syn.images, syn.targets()), {"synthetic": syn})
    syn.meta.update({"inner_lr": config.inner_lr, "unroll_total": config.total, "window": config.window})
    return syn.to("cpu")

