"""The closed-form MLP gradients of DDM against torch.func's autograd (the oracle)."""

import pytest
import torch
from torch.func import grad, vmap

from modelatlas.attribution import mlp_grads as G
from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.distill.nets import make_net
from modelatlas.errors import ConfigError


def make_case(depth: int, ckpts: int = 3, groups: int = 5, m: int = 2):
    """A depth-`depth` MLP, `ckpts` perturbed copies stacked, and `groups` groups of m soft-labelled inputs."""
    gen = torch.Generator().manual_seed(depth)
    model = T.make_model((1, 4, 4), 5, 6, depth, seed=0)
    p = T.init_params(model)
    stacked = {k: v + 0.3 * torch.randn(ckpts, *v.shape, generator=gen) for k, v in p.items()}  # each (T, ...)
    xs = torch.randn(groups, m, 1, 4, 4, generator=gen)
    soft = torch.softmax(2 * torch.randn(groups, m, 5, generator=gen), -1)
    return model, p, stacked, xs, soft


def check_oracle(model, stacked, xs, soft) -> torch.Tensor:
    """(T, G, P) gradients of each group's mean loss by torch.func (a double backward when differentiated)."""
    def group(params, x, t):
        g = grad(lambda q: T.losses(model, q, x, t).mean())(params)
        return torch.cat([v.reshape(-1) for v in g.values()])  # (P,)
    return vmap(lambda q: vmap(group, in_dims=(None, 0, 0))(q, xs, soft))(stacked)


@pytest.mark.parametrize("depth", [1, 2])
def test_group_gradients_equal_autograd(depth):
    model, _, stacked, xs, soft = make_case(depth)
    got, want = G.group_gradients(stacked, xs, soft), check_oracle(model, stacked, xs, soft)
    assert got.shape == want.shape == (3, 5, N.flatten(T.init_params(model)).numel())
    assert torch.allclose(got, want, atol=1e-6)


def test_sample_gradients_with_hard_labels_equal_autograd():
    model, p, _, xs, _ = make_case(1)
    x, y = xs.flatten(0, 1), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])

    def one(i: int) -> torch.Tensor:
        g = grad(lambda q: T.losses(model, q, x[i:i + 1], y[i:i + 1])[0])(p)
        return torch.cat([v.reshape(-1) for v in g.values()])  # (P,)
    want = torch.stack([one(i) for i in range(len(x))])
    assert torch.allclose(G.sample_gradients(p, x, y), want, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_gradient_distances_and_their_derivatives_equal_the_formed_difference(depth):
    model, _, stacked, xs, soft = make_case(depth)
    target = torch.randn(3, 5, check_oracle(model, stacked, xs, soft).shape[-1], generator=torch.Generator().manual_seed(9))

    def via(fn):
        x, s = xs.clone().requires_grad_(True), soft.clone().requires_grad_(True)
        d = fn(x, s)
        d.sum().backward()
        return d.detach(), x.grad, s.grad
    blocks = G.split_target(stacked, target)
    got = via(lambda x, s: G.gradient_distances(stacked, x, s, blocks) + (target ** 2).sum(-1))
    want = via(lambda x, s: ((check_oracle(model, stacked, x, s) - target) ** 2).sum(-1))
    assert got[0].shape == (3, 5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_other_networks_are_refused():
    net = make_net("convnet", (1, 8, 8), 3, width=4, depth=1, seed=0)
    with pytest.raises(ConfigError, match="need the MLP target, got ConvNet"):
        G.checked(net, dict(net.named_parameters()))
    with pytest.raises(ConfigError, match="alternating weight/bias"):
        G.mlp_layers({"a.weight": torch.zeros(2, 2)})


def test_damped_cholesky_leaves_the_hessian_as_it_was():
    h = torch.diag(torch.tensor([-0.5, 1.0, 2.0])) + 0.01
    before = h.clone()
    factor, d = N.damped_cholesky(h, 0.1)
    assert d == pytest.approx(0.8) and torch.equal(h, before)
    assert torch.equal(factor, torch.linalg.cholesky(before + d * torch.eye(3)))  # bit for bit the damped copy
    with pytest.raises(ConfigError):
        N.damped_cholesky(h, 0.1, max_tries=2)
    assert torch.equal(h, before)  # restored on failure too


@pytest.mark.parametrize("balanced", [True, False])  # padded groups / per-sample fallback (one giant cluster)
def test_cluster_gradients_are_the_mean_per_sample_gradient(balanced):
    from modelatlas.attribution.ddm import cluster_gradients

    model, p, _, _, _ = make_case(2)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 1, 4, 4, generator=gen), torch.randint(0, 5, (60,), generator=gen)
    k = 20
    assign = torch.randint(0, k, (60,), generator=gen) if balanced else torch.zeros(60, dtype=torch.long)
    if not balanced:
        assign[:10] = torch.arange(1, 11)  # 20 clusters x 50 padded rows = 1,000 > 8 x 60
    assign[assign == 7] = 8  # cluster 7 left empty: a zero gradient, not NaN
    per = G.sample_gradients(p, x, y)  # (N, P)
    want = torch.zeros(k, per.shape[1]).index_add_(0, assign, per) / torch.bincount(assign, minlength=k).clamp(min=1)[:, None]
    got = cluster_gradients(model, p, x, y, assign, k)
    assert torch.allclose(got, want, atol=1e-6) and not got[7].any()
