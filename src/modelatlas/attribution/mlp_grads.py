"""Closed-form loss gradients of DDM's target MLP, batched over checkpoints, clusters and samples.

DDM differentiates through gradients: reverse gradient matching (step 3) minimises the distance between a
synthetic sample's loss gradient and its cluster's, so every Adam step needs per-cluster gradients at every
checkpoint and then a backward pass through them. Written with ``torch.func`` (``vmap(grad(...))`` under
``vmap`` over checkpoints) that is a double backward through a transformed graph, dominated on this small MLP
by per-operator overhead. The MLP's gradient has a closed form (backpropagation written out), so it is
computed here with a handful of batched products, and ordinary autograd differentiates it once more.

For the MLP ``Flatten -> depth x (Linear -> ReLU) -> Linear`` (:class:`modelatlas.distill.nets.MLP`) and a
cross-entropy with soft targets t, for one sample with activations a_0 = x, u_l = W_l a_{l-1} + b_l,
a_l = relu(u_l), logits z = u_L:

    delta_L = softmax(z) sum(t) - t,   delta_{l-1} = (W_l^T delta_l) * [u_{l-1} > 0],
    dW_l = delta_l a_{l-1}^T,          db_l = delta_l,

the ReLU's derivative taken as [u > 0], as torch's autograd does. The values equal ``torch.func``'s to float
rounding (tested against it). Time O(B x P) for B samples and P parameters, memory O(B x P) for per-sample
gradients, O(G x P) for G group means.
"""

from __future__ import annotations

import torch

from modelatlas.distill.nets import MLP
from modelatlas.errors import ConfigError


def checked(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params``, after checking that ``model`` is the MLP whose gradients this module writes out (a ConvNet's
    parameters also alternate weight and bias, and would give wrong gradients silently)."""
    if not isinstance(model, MLP):
        raise ConfigError(f"DDM's closed-form gradients need the MLP target, got {type(model).__name__}")
    return params


def mlp_layers(params: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(W, b), ...] of an MLP's parameter dict in forward order (any leading batch dims on each tensor). The
    dict's order is the flattening order of gradients, so it must alternate weight, bias."""
    names = list(params)
    if len(names) % 2 or not all(a.endswith(".weight") and b.endswith(".bias") for a, b in zip(names[::2], names[1::2])):
        raise ConfigError(f"closed-form MLP gradients need alternating weight/bias parameters, got {names}")
    return [(params[w], params[b]) for w, b in zip(names[::2], names[1::2])]


def group_gradients(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(*lead, G, P): the gradient of each group's mean loss, flattened in the parameters' order.

    ``params``: each tensor with leading dims ``lead`` (e.g. (T,) checkpoints, or none); ``x`` (G, m, ...) the
    groups' inputs (m samples each), ``t`` (G, m, K) soft targets. Differentiable in x, t and the params."""
    grads = []
    for delta, a_in in _backprop(params, x, t):
        grads.append(delta.transpose(-1, -2) @ a_in)  # dW: (*lead, G, out, m) @ ([*lead,] G, m, in)
        grads.append(delta.sum(-2))  # db (*lead, G, out)
    lead_g = grads[-1].shape[:-1]  # (*lead, G)
    return torch.cat([v.reshape(*lead_g, -1) for v in grads], dim=-1)  # (*lead, G, P)


def split_target(params: dict[str, torch.Tensor], target: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Flat gradients (*lead, G, P) as contiguous per-layer blocks [(dW^T (*lead, G, in, out), db (*lead, G, out))],
    for :func:`gradient_distances` (made once: a strided block would be copied at every product)."""
    layers = mlp_layers(params)
    sizes = [n for w, _ in layers for n in (w.shape[-2] * w.shape[-1], w.shape[-2])]
    parts = torch.split(target, sizes, dim=-1)
    return [(parts[2 * i].reshape(*target.shape[:-1], *w.shape[-2:]).transpose(-1, -2).contiguous(),
             parts[2 * i + 1].contiguous()) for i, (w, _) in enumerate(layers)]  # (*lead, G, in, out), (*lead, G, out)


def gradient_distances(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                       blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(*lead, G): ||g - target||^2 - ||target||^2 for the groups' gradients g (as in :func:`group_gradients`)
    and a target given as :func:`split_target` blocks, without forming g. A group's weight gradient is
    Delta^T A (out x m times m x in), so ||Delta^T A||^2 = <Delta Delta^T, A A^T> (m x m Grams) and
    <Delta^T A, T> = <Delta, A T^T>: one product with the target per layer, O(G m P) instead of the several
    O(G P) passes of forming and subtracting g. Add ||target||^2 for the distance itself."""
    out = 0.0
    for (delta, a_in), (tw, tb) in zip(_backprop(params, x, t), blocks):
        gram_d = delta @ delta.transpose(-1, -2)  # (*lead, G, m, m)
        gram_a = a_in @ a_in.transpose(-1, -2)  # ([*lead,] G, m, m)
        cross = (delta * (a_in @ tw)).sum((-1, -2))  # ([*lead,] G, m, in) @ (*lead, G, in, out) -> (*lead, G)
        db = delta.sum(-2)  # (*lead, G, out)
        out = out + (gram_d * gram_a).sum((-1, -2)) - 2 * cross + (db * db - 2 * db * tb).sum(-1)
    return out


def _backprop(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor):
    """[(delta_l (*lead, G, m, out), a_{l-1} ([*lead,] G, m, in))] in forward order: each layer's backpropagated
    error (already divided by m: the group's mean loss) and its input."""
    layers = mlp_layers(params)
    acts, masks = _forward(layers, x.flatten(2))  # a_0 (G, m, D_in), ..., z (*lead, G, m, K)
    delta = (torch.softmax(acts[-1], dim=-1) * t.sum(-1, keepdim=True) - t) / x.shape[1]  # (*lead, G, m, K)
    pairs = []
    for i in range(len(layers) - 1, -1, -1):
        pairs.append((delta, acts[i]))
        if i:
            delta = _per_group(delta, layers[i][0]) * masks[i - 1]  # (*lead, G, m, out) @ W -> (*lead, G, m, in)
    return pairs[::-1]


def sample_gradients(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(N, P) per-sample loss gradients for inputs x (N, ...) and hard (N,) or soft (N, K) targets."""
    return group_gradients(params, x.unsqueeze(1), soft_targets(params, t, x.dtype).unsqueeze(1))  # groups of one: (N, 1, ...) -> (N, P)


def soft_targets(params: dict[str, torch.Tensor], t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Hard labels (N,) as one-hot rows (N, K), K the MLP's output size; soft targets (N, K) as they are."""
    if t.dim() != 1:
        return t
    return torch.nn.functional.one_hot(t, mlp_layers(params)[-1][1].shape[-1]).to(dtype)  # (N, K)


def _forward(layers, x: torch.Tensor):
    """Activations [a_0, a_1, ..., z] and ReLU masks [u_l > 0] for hidden layers; x (G, m, D)."""
    acts, masks = [x], []
    a = x
    for i, (w, b) in enumerate(layers):
        u = _per_group(a, w.transpose(-1, -2)) + b.unsqueeze(-2).unsqueeze(-2)  # (*lead, G, m, out)
        if i == len(layers) - 1:
            acts.append(u)
            break
        masks.append((u > 0).to(u.dtype))
        a = torch.relu(u)
        acts.append(a)
    return acts, masks


def _per_group(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a (*lead?, G, m, i) @ w (*lead, i, o) -> (*lead, G, m, o): one product per leading index over all G m
    rows (a matmul broadcasting w over the groups would copy it G times)."""
    g, m = a.shape[-3:-1]
    return (a.reshape(*a.shape[:-3], g * m, a.shape[-1]) @ w).view(*w.shape[:-2], g, m, w.shape[-1])
