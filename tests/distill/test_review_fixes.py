"""Regression tests: invalid eval protocols, resume past the asked iterations, degenerate MTT experts,
the Adam protocol's inner lr, one-example classes in PoDD's Gaussian init."""

import math

import pytest
import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import default_protocol, distill
from modelatlas.distill.evaluate import EvalProtocol
from modelatlas.distill.loop import OuterLoop
from modelatlas.distill.methods.mtt.method import trajectory_loss
from modelatlas.distill.methods.podd import poster as P
from modelatlas.distill.methods.podd.method import crossfade_init
from modelatlas.distill.nets import make_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import CheckpointError, ConfigError


def make_toy(k=2, n=4, shape=(1, 8, 8)):
    x = torch.rand(k * n, *shape, generator=torch.Generator().manual_seed(0))
    return ArrayDataset("toy", x, torch.arange(k).repeat_interleave(n), [f"c{i}" for i in range(k)])


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", -0.1), ("lr", 0.0),
                                         ("weight_decay", -1e-4), ("weight_decay", float("nan")),
                                         ("momentum", 1.0), ("momentum", float("nan")),
                                         ("width", 0), ("depth", 0),
                                         # inf scored a net trained at lr inf (chance) as the set's accuracy;
                                         # 1.5 nets failed in range(), True ran 1 net; 'yes' turned DSA on
                                         ("lr", float("inf")), ("weight_decay", float("inf")),
                                         ("num_nets", 1.5), ("num_nets", True), ("epochs", 2.5),
                                         ("batch_size", 8.0), ("dsa", "yes"), ("net", "foo")])
def test_eval_protocol_rejects_invalid_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"eval {field} must be"):
        EvalProtocol(**{field: value})


def check_simple_loop(tmp_path, iterations, resume):
    x = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)

    def step(it, gen):
        opt.zero_grad()
        ((x - 1) ** 2).sum().backward()
        opt.step()
        return float(x.detach().sum())
    return OuterLoop(iterations, seed=0, checkpoint_dir=tmp_path, checkpoint_every=1, resume=resume).run(
        step, {"x": opt})


def test_resume_of_a_longer_run_is_refused(tmp_path):
    check_simple_loop(tmp_path, 4, resume=False)
    # 4 iterations are done: asking for 2 would silently return the 4-iteration state labelled as 2
    with pytest.raises(CheckpointError, match="4 iterations done, more than iterations=2"):
        check_simple_loop(tmp_path, 2, resume=True)
    assert len(check_simple_loop(tmp_path, 4, resume=True)) == 4  # the same length still resumes


def test_trajectory_loss_is_finite_when_the_expert_did_not_move():
    net = make_net("convnet", (1, 8, 8), 1, 4, 2, seed=0)
    shapes = {k: v.shape for k, v in net.named_parameters()}
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    syn = SyntheticSet.from_noise((1, 8, 8), 1, 2, torch.Generator().manual_seed(0), lr=0.01)
    # one class: CE is 0 everywhere, so the expert's epochs t and t + M are the same point
    loss = trajectory_loss(net, shapes, start, start.clone(), syn, 2, 2, torch.Generator().manual_seed(0), None)
    assert math.isfinite(float(loss.detach()))


def test_adam_protocol_evaluates_at_the_configured_inner_lr():
    proto = default_protocol("ratbptt", {"inner_lr": 0.02}, (1, 8, 8))
    assert proto.resolved().lr == pytest.approx(0.02)
    assert default_protocol("podd", {"inner_lr": 0.005}, (1, 8, 8)).resolved().lr == pytest.approx(0.005)
    assert default_protocol("ratbptt", None, (1, 8, 8)).resolved().lr == pytest.approx(1e-3)  # default unchanged
    assert default_protocol("dm", None, (1, 8, 8)).resolved().lr == pytest.approx(0.01)  # SGD untouched


def test_gaussian_poster_init_with_a_one_example_class_is_finite():
    train = make_toy(k=2, n=1)
    layout = P.make_layout(1.0, 2, 8, 8)
    poster = crossfade_init(train, layout, torch.tensor([[0, 1]]), "gaussian", 0.25, torch.Generator().manual_seed(0))
    assert torch.isfinite(poster).all()


def test_mtt_one_class_run_stays_finite(tmp_path):
    cfg = {"iterations": 2, "width": 4, "num_experts": 1, "expert_epochs": 2, "max_start_epoch": 0,
           "syn_steps": 2, "batch_expert": 4, "cache_dir": str(tmp_path)}
    syn = distill("mtt", make_toy(k=1), 1, cfg, seed=0)
    assert torch.isfinite(syn.images).all() and math.isfinite(float(syn.lr.detach()))


def test_an_absurd_width_is_refused_naming_the_field():
    """--set width=100000 built a ConvNet of 9e10 weights: an allocator traceback, now one line."""
    from modelatlas.distill.methods import get

    with pytest.raises(ConfigError, match=r"width must be at most 16,384.*got 100,000; lower --set width"):
        get("dm").make_config({"width": 100000})
    assert get("dm").make_config({"width": 16384}).width == 16384
    with pytest.raises(ConfigError, match=r"eval width must be at most 16,384, got 100,000"):
        EvalProtocol(width=100000)  # e.g. a hand-edited result.json read by `atlas distill eval`
