import pytest
import torch
from torch.func import functional_call

from modelatlas.data import load_dataset
from modelatlas.distill import distill
from modelatlas.distill.methods import get
from modelatlas.distill.methods.ratbptt.method import DiffAdam, GradClipper, inner_steps, outer_grads
from modelatlas.distill.nets import make_net
from modelatlas.errors import ConfigError

TINY = {"iterations": 3, "total": 6, "window": 2, "batch_real": 32, "width": 8, "checkpoint_every": 1}


def make_linear():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3), torch.randn(16, 5), torch.randint(3, (16,))


def test_diff_adam_matches_torch_adam_on_plain_steps():
    net, x, y = make_linear()
    ref = torch.nn.Linear(5, 3)
    ref.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    params = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
    mine = DiffAdam(params, lr=1e-2)
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss2 = torch.nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss2, list(params.values()))
        params = {k: v.detach().requires_grad_(True) for k, v in mine.step(params, dict(zip(params, grads))).items()}
    for k, v in ref.named_parameters():
        assert torch.allclose(params[k], v, atol=1e-6), k


def test_gradients_reach_images_through_the_window_only():
    net = make_net("convnet", (1, 8, 8), 3, width=4, depth=1, seed=0)
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    y = torch.arange(3).repeat(2)
    gen = torch.Generator().manual_seed(0)
    params = {k: v.detach() for k, v in net.named_parameters()}
    opt = DiffAdam(params, lr=1e-2)
    params = inner_steps(net, params, opt, x.detach(), y, 3, 6, gen, None, False)  # plain: no graph
    assert all(not v.requires_grad for v in params.values())
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    params = inner_steps(net, params, opt, x, y, 2, 6, gen, None, True)
    loss = torch.nn.functional.cross_entropy(functional_call(net, params, (torch.rand(4, 1, 8, 8),)), y[:4])
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def make_unrolled():
    """A 2-step differentiable unroll on learnable images x, and an augmented-looking real batch of 10."""
    net = make_net("convnet", (1, 8, 8), 3, width=4, depth=1, seed=0)
    torch.manual_seed(1)
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    params = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    params = inner_steps(net, params, DiffAdam(params, lr=1e-2), x, torch.arange(3).repeat(2), 2, 6, gen, None, True)
    return net, params, x, torch.rand(10, 1, 8, 8), torch.randint(3, (10,))


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
def test_chunked_real_batch_gives_the_one_pass_gradient(chunk):
    net, params, x, xr, yr = make_unrolled()
    loss, (g,) = outer_grads(net, params, xr, yr, [x], None)
    net, params, x2, xr, yr = make_unrolled()
    loss_c, (g_c,) = outer_grads(net, params, xr, yr, [x2], chunk)  # chunks of 3 leave a remainder of 1
    assert loss_c == pytest.approx(loss, rel=1e-6)
    assert g.abs().sum() > 0 and torch.allclose(g_c, g, rtol=1e-4, atol=1e-7)


def test_run_with_real_chunks_matches_the_one_pass_run():
    tr = load_dataset("digits", "train")
    one = distill("ratbptt", tr, 1, TINY, seed=2)
    chunked = distill("ratbptt", tr, 1, {**TINY, "real_chunk": 7}, seed=2)
    assert torch.allclose(one.images, chunked.images, atol=1e-4)


def test_grad_clipper_clips_to_twice_the_running_mean():
    clip = GradClipper(2.0, 0.9)
    g = [torch.tensor([3.0, 4.0])]  # norm 5: first call sets the mean
    assert clip.clip(g) == 5.0 and clip.mean == 5.0
    g = [torch.tensor([30.0, 40.0])]  # norm 50 > 2 x 5 -> scaled to norm 10
    clip.clip(g)
    assert torch.allclose(g[0], torch.tensor([6.0, 8.0]))
    assert clip.mean == pytest.approx(0.9 * 5 + 0.1 * 10)


def test_run_learns_labels_and_resume_equals_straight_run(tmp_path):
    tr = load_dataset("digits", "train")
    straight = distill("ratbptt", tr, 1, TINY, seed=2)
    assert straight.label_logits is not None and straight.images.shape == (10, 1, 8, 8)
    distill("ratbptt", tr, 1, {**TINY, "iterations": 2}, seed=2, checkpoint_dir=tmp_path)  # "killed" after 2
    resumed = distill("ratbptt", tr, 1, TINY, seed=2, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(straight.images, resumed.images) and torch.equal(straight.label_logits, resumed.label_logits)


def test_config_errors_name_the_field():
    spec = get("ratbptt")
    with pytest.raises(ConfigError, match=r"window \(60\) must be <= total \(5\)"):
        spec.make_config({"total": 5})
    with pytest.raises(ConfigError, match="clip_ema must be in"):
        spec.make_config({"clip_ema": 1.0})
    with pytest.raises(ConfigError, match="inner_lr must be > 0"):
        spec.make_config({"inner_lr": 0})
    with pytest.raises(ConfigError, match="inner_lr must be finite, got inf"):  # gave NaN images, scored ~10 %
        spec.make_config({"inner_lr": float("inf")})
    assert spec.make_config({"clip_factor": float("inf")}).clip_factor == float("inf")  # infinite: no clipping
    with pytest.raises(ConfigError, match="real_chunk must be > 0"):
        spec.make_config({"real_chunk": 0})
    assert spec.eval_kind == "adam"
