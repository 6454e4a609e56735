import pytest
import torch

from modelatlas.attribution import DDMConfig, ddm_attribution, loo_attribution, spearman_scores
from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.errors import ConfigError


def tiny_model():
    model = T.make_model((1, 2, 2), 2, 3, 1, seed=0)
    return model, T.init_params(model)


def test_damped_cholesky_doubles_until_positive_definite():
    h = torch.diag(torch.tensor([-0.5, 1.0, 2.0]))
    factor, d = N.damped_cholesky(h, 0.1)
    assert d == pytest.approx(0.8)  # 0.1, 0.2, 0.4 leave a negative eigenvalue
    assert torch.allclose(factor @ factor.T, h + d * torch.eye(3), atol=1e-6)


def test_damped_cholesky_refuses_a_non_finite_hessian():
    h = torch.eye(3)
    h[1, 1] = float("nan")
    with pytest.raises(ConfigError, match="Hessian has NaN/inf entries .*lower its learning rate, train_steps or weight_decay"):
        N.damped_cholesky(h, 0.1)


def test_damped_cholesky_gives_up_naming_the_damping():
    with pytest.raises(ConfigError, match=r"not positive definite even with damping .*raise the damping \(--damping"):
        N.damped_cholesky(-1e6 * torch.eye(2), 0.1, max_tries=3)


def test_newton_steps_solve_the_damped_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g)
    h = a @ a.T
    factor, d = N.damped_cholesky(h, 0.5)
    grads, shares = torch.randn(3, 5, generator=g), torch.tensor([0.1, 0.2, 0.3])
    want = torch.linalg.solve(h + d * torch.eye(5), (grads * shares[:, None]).T).T
    assert torch.allclose(N.newton_steps(factor, grads, shares), want, atol=1e-5)


def test_flatten_roundtrip_and_stacked_params():
    _, p = tiny_model()
    flat = N.flatten(p)
    back = N.unflattener(p)(flat)
    assert all(torch.equal(back[k], p[k]) for k in p)
    stacked = N.stacked_params(p, torch.stack([torch.zeros_like(flat), torch.ones_like(flat)]))
    assert all(v.shape == (2, *p[k].shape) for k, v in stacked.items())
    assert torch.equal(stacked["classifier.bias"][1], p["classifier.bias"] + 1)


def test_distilled_hessian_matches_finite_differences_of_the_gradient():
    model, p = tiny_model()
    g = torch.Generator().manual_seed(1)
    xs, soft, w = torch.randn(4, 1, 2, 2, generator=g), torch.softmax(torch.randn(4, 2, generator=g), 1), \
        torch.tensor([1.0, 2.0, 3.0, 4.0])
    h = N.distilled_hessian(model, p, xs, soft, w)
    assert h.shape == (N.flatten(p).numel(),) * 2 and torch.allclose(h, h.T, atol=1e-5)
    unflat, theta = N.unflattener(p), N.flatten(p).double()
    model = model.double()

    def gradient(u):
        u = u.clone().requires_grad_(True)
        loss = (T.losses(model, unflat(u), xs.double(), soft.double()) * w.double() / w.sum()).sum()
        return torch.autograd.grad(loss, u)[0]
    v = torch.randn(len(theta), generator=g, dtype=torch.float64)
    fd = (gradient(theta + 1e-5 * v) - gradient(theta - 1e-5 * v)) / 2e-5
    assert torch.allclose(h.double() @ v, fd, atol=1e-3)


def test_newton_ddm_ranks_planted_clusters_like_retraining(planted):
    x, y, xt, yt = planted
    cfg = DDMConfig(clusters_per_class=2, width=8, lr=0.5, train_steps=40, checkpoints=4, match_steps=20)
    attr = ddm_attribution(x, y, xt, yt, 2, cfg, seed=0)
    true, seconds = loo_attribution(x, y, xt, yt, 2, attr.assign, cfg, seed=0)
    assert spearman_scores(attr.matrix, true)["flattened"] > 0.8 and seconds > 0
    assert attr.timings["offline_hessian_s"] > 0 and attr.timings["damping_used"] >= cfg.damping
    noisy, _ = loo_attribution(x, y, xt, yt, 2, attr.assign, cfg, seed=0, init_noise=1e-6)
    assert spearman_scores(noisy, true)["flattened"] > 0.99  # the truth is stable under tiny perturbations


def test_newton_with_weight_decay_matches_retraining_of_a_regularised_target(planted):
    x, y, xt, yt = planted
    cfg = DDMConfig(clusters_per_class=2, width=8, lr=0.5, train_steps=60, checkpoints=4, match_steps=20,
                    weight_decay=1e-2)
    model = T.make_model((1, 2, 2), 2, 8, 1, seed=0)
    plain, _ = T.train(model, T.init_params(model), x, y, 60, 0.5)
    decayed, _ = T.train(model, T.init_params(model), x, y, 60, 0.5, weight_decay=1e-2)
    assert N.flatten(decayed).norm() < N.flatten(plain).norm()
    attr = ddm_attribution(x, y, xt, yt, 2, cfg, seed=0)
    true, _ = loo_attribution(x, y, xt, yt, 2, attr.assign, cfg, seed=0)
    assert spearman_scores(attr.matrix, true)["flattened"] > 0.8


def test_several_samples_per_cluster(planted):
    from modelatlas.attribution.ddm import initial_samples
    x, y, xt, yt = planted
    assign = torch.arange(4).repeat_interleave(30)
    init = initial_samples(x, assign, 4, 3, seed=0)
    assert init.shape == (4, 3, 1, 2, 2)
    assert torch.allclose(init[1, 0], x[30:60].mean(0))  # first sample: the cluster mean
    assert all((x[assign == 2] == init[2, j]).all((1, 2, 3)).any() for j in (1, 2))  # then real members
    cfg = DDMConfig(clusters_per_class=2, width=8, lr=0.5, train_steps=40, checkpoints=4, match_steps=20,
                    samples_per_cluster=3)
    attr = ddm_attribution(x, y, xt, yt, 2, cfg, seed=0)
    assert attr.synthetic.shape == (12, 1, 2, 2) and attr.synthetic_labels.shape == (12, 2)
    true, _ = loo_attribution(x, y, xt, yt, 2, attr.assign, cfg, seed=0)
    assert spearman_scores(attr.matrix, true)["flattened"] > 0.8


def test_unlearn_config_errors():
    with pytest.raises(ConfigError, match="unlearn must be one of auto, newton, cg, ascent"):
        DDMConfig(unlearn="retrain")
    with pytest.raises(ConfigError, match="damping must be > 0"):
        DDMConfig(damping=0)
    with pytest.raises(ConfigError, match="samples_per_cluster must be >= 1"):
        DDMConfig(samples_per_cluster=0)
    with pytest.raises(ConfigError, match="weight_decay must be >= 0"):
        DDMConfig(weight_decay=-1.0)


def check_doubling_oracle(h: torch.Tensor, damping: float) -> float:
    """The d of plain doubling: the smallest damping x 2^j with h + d I positive definite (eigenvalues)."""
    lam, d = float(torch.linalg.eigvalsh(h.double())[0]), damping
    while lam + d <= 0:
        d *= 2.0
    return d


@pytest.mark.parametrize("seed", range(5))
def test_damped_cholesky_returns_the_damping_of_plain_doubling(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(80, 80, generator=g)
    h = a @ a.T / 80 - (0.3 + seed) * torch.eye(80)  # indefinite by a seeded margin: several doublings
    factor, d = N.damped_cholesky(h, 0.01)
    assert d == check_doubling_oracle(h, 0.01)
    assert torch.allclose(factor @ factor.T, h + d * torch.eye(80), atol=1e-4)
