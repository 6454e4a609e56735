"""``unlearn="cg"``: the Newton removal step by conjugate gradients on Hessian-vector products, never forming H.

Oracles: the dense Hessian and Cholesky path of :mod:`modelatlas.attribution.newton` on models small enough for
it, and hand-solved diagonal systems."""

import pytest
import torch

from modelatlas.attribution import DDMConfig, ddm_attribution
from modelatlas.attribution import cg as C
from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.cli.main import main
from modelatlas.errors import ConfigError


def make_distilled(seed: int = 1, width: int = 3):
    """A tiny MLP (4 inputs, ``width`` hidden, 2 classes) and a size-weighted distilled set of 4 samples."""
    model = T.make_model((1, 2, 2), 2, width, 1, seed=0)
    g = torch.Generator().manual_seed(seed)
    xs, soft = torch.randn(4, 1, 2, 2, generator=g), torch.softmax(torch.randn(4, 2, generator=g), 1)
    return model, T.init_params(model), xs, soft, torch.tensor([1.0, 2.0, 3.0, 4.0])


def diagonal(values):
    d = torch.tensor(values)
    return lambda v: v * d  # rows v (B, P) -> v diag(values)


def test_hvp_operator_equals_the_dense_hessian_times_the_vectors():
    model, p, xs, soft, w = make_distilled()
    h = N.distilled_hessian(model, p, xs, soft, w)
    v = torch.randn(5, len(h), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(C.hvp_operator(model, p, xs, soft, w, shift=0.3)(v), v @ h + 0.3 * v, atol=1e-5)


def test_lanczos_smallest_eigenvalue_is_exact_once_its_steps_reach_p():
    model, p, xs, soft, w = make_distilled()
    h = N.distilled_hessian(model, p, xs, soft, w)  # 23 x 23
    want = float(torch.linalg.eigvalsh(h.double())[0])
    got = C.smallest_eigenvalue(C.hvp_operator(model, p, xs, soft, w), len(h), 60, seed=0)
    assert got == pytest.approx(want, abs=1e-5)
    assert C.smallest_eigenvalue(diagonal([3.0, -0.5, 1.0, 2.0]), 4, 60, seed=0) == pytest.approx(-0.5, abs=1e-6)


def test_batched_cg_solves_each_column_of_a_hand_checked_system():
    b = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    x, its, negative, converged = C.batched_cg(diagonal([1.0, 2.0, 4.0]), b, 50, 1e-6)
    want = torch.tensor([[1.0, 0.5, 0.25], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # b / diag; a zero b stays 0
    assert torch.allclose(x, want, atol=1e-5) and not negative and converged
    assert its <= 3  # at most one iteration per distinct eigenvalue
    _, its, _, converged = C.batched_cg(diagonal([1.0, 2.0, 4.0]), b, 1, 1e-6)
    assert its == 1 and not converged


def test_solve_doubles_the_damping_where_cg_meets_negative_curvature():
    """diag(-0.5, 1, 2) + d I: d = 0.1, 0.2, 0.4 leave a negative eigenvalue, 0.8 does not (as damped_cholesky)."""
    s = C.solve(diagonal([-0.5, 1.0, 2.0]), torch.ones(1, 3), 0.1, 50, 1e-6)
    assert s.damping == pytest.approx(0.8) and s.converged and s.residual <= 1e-5
    assert torch.allclose(s.x[0], torch.tensor([1 / 0.3, 1 / 1.8, 1 / 2.8]), atol=1e-4)
    assert C.damping_for(-0.5, 0.1) == pytest.approx(0.8) and C.damping_for(-0.05, 0.1) == 0.1


@pytest.mark.parametrize("weight_decay, damping", [(0.0, 0.1), (0.05, 0.01), (0.0, 1e-3)])
def test_cg_newton_agrees_with_the_dense_newton_step(weight_decay, damping):
    """The oracle: same damping as the dense path's Cholesky doubling, same steps to the CG tolerance."""
    model, p, xs, soft, w = make_distilled(width=6)
    h = N.distilled_hessian(model, p, xs, soft, w)
    h.diagonal().add_(weight_decay)
    factor, d_dense = N.damped_cholesky(h, damping)
    grads = torch.randn(3, len(h), generator=torch.Generator().manual_seed(3))
    shares = torch.tensor([0.1, 0.5, 2.0])
    want = N.newton_steps(factor, grads, shares)
    hvp, d = C.prepare(model, p, xs, soft, w, weight_decay, damping, seed=0)
    s = C.solve(hvp, grads * shares[:, None], d, 500, 1e-6)
    assert s.damping == d_dense and s.converged and s.residual <= 1e-5
    assert 1 <= s.iterations <= 200
    assert torch.allclose(s.x, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_ddm_with_cg_matches_newton_and_is_seeded(planted):
    x, y, xt, yt = planted
    cfg = dict(clusters_per_class=2, width=8, lr=0.5, train_steps=40, checkpoints=4, match_steps=20)
    newton = ddm_attribution(x, y, xt, yt, 2, DDMConfig(**cfg, unlearn="newton"), seed=0)
    cg = ddm_attribution(x, y, xt, yt, 2, DDMConfig(**cfg, unlearn="cg", cg_tolerance=1e-6), seed=0)
    assert cg.timings["damping_used"] == newton.timings["damping_used"]
    assert cg.timings["cg_converged"] is True and cg.timings["cg_relative_residual"] <= 1e-5
    scale = float(newton.matrix.abs().max())
    assert torch.allclose(cg.matrix, newton.matrix, atol=1e-3 * scale)
    again = ddm_attribution(x, y, xt, yt, 2, DDMConfig(**cfg, unlearn="cg", cg_tolerance=1e-6), seed=0)
    assert torch.equal(cg.matrix, again.matrix)


def test_cg_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="cg_iterations must be >= 1"):
        DDMConfig(cg_iterations=0)
    with pytest.raises(ConfigError, match="cg_iterations must be at most 1,000,000"):
        DDMConfig(cg_iterations=10**7)
    for bad in (0.0, 1.0, float("nan"), -1e-3):
        with pytest.raises(ConfigError, match=r"cg_tolerance must be > 0 and < 1 \(the relative residual at which "
                                              r"conjugate gradients stop, e\.g\. 1e-5\)"):
            DDMConfig(cg_tolerance=bad)


def test_the_cli_names_the_cg_flags(tmp_path, capsys):
    tiny = ["attribute", "--clusters-per-class", "2", "--max-train", "200", "--max-test", "20", "--unlearn", "cg",
            "--out", str(tmp_path / "o")]
    assert main([*tiny, "--cg-tolerance", "0"]) == 1
    assert "error: --cg-tolerance must be > 0 and < 1" in capsys.readouterr().err
    assert main([*tiny, "--cg-iterations", "0"]) == 1
    assert "error: --cg-iterations must be >= 1" in capsys.readouterr().err


def test_too_few_iterations_are_reported_with_the_fix(tmp_path, capsys):
    assert main(["attribute", "--clusters-per-class", "2", "--max-train", "200", "--max-test", "20", "--train-steps",
                 "5", "--match-steps", "1", "--unlearn", "cg", "--cg-iterations", "1", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "conjugate gradients: 1 iterations" in out and "not converged: raise --cg-iterations or --cg-tolerance" in out
