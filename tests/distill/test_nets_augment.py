import pytest
import torch

from modelatlas.distill.augment import DSA
from modelatlas.distill.nets import ConvNet, default_net, make_net
from modelatlas.errors import ConfigError


@pytest.mark.parametrize("shape,depth", [((1, 28, 28), 3), ((3, 32, 32), 3), ((1, 8, 8), 2), ((1, 8, 8), 3), ((1, 40), 3)])
def test_convnet_shapes(shape, depth):
    net = make_net("convnet", shape, 10, width=8, depth=depth, seed=0)
    x = torch.rand(2, *shape)
    assert net(x).shape == (2, 10) and net.embed(x).shape == (2, net.feature_dim)
    if shape == (1, 28, 28):
        assert net.feature_dim == 8 * 4 * 4  # padded to 32x32, three pools


def test_convnet_uses_instance_norm_and_seed_is_reproducible():
    a, b = make_net("convnet", (1, 8, 8), 10, 8, 2, seed=3), make_net("convnet", (1, 8, 8), 10, 8, 2, seed=3)
    assert isinstance(a.features[1], torch.nn.GroupNorm) and a.features[1].num_groups == 8
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = torch.get_rng_state()
    make_net("mlp", (1, 8, 8), 10, 16, 2, seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_net_errors():
    with pytest.raises(ConfigError, match="ConvNet depth 4 is invalid for input size \\(8, 8\\)"):
        ConvNet((1, 8, 8), 10, 8, 4)
    with pytest.raises(ConfigError, match="net must be one of"):
        make_net("resnet", (1, 8, 8), 10)
    assert default_net((1, 8, 8))["depth"] == 2 and default_net((3, 32, 32))["width"] == 128
    with pytest.raises(ConfigError, match=r"\(2, 2\); use --set depth=N \(depth=\) with N between 1 and 1$"):
        ConvNet((1, 2, 2), 10, 8, 2)


def test_one_pixel_inputs_point_to_the_mlp():
    """The message was "use depth between 1 and 0": no ConvNet fits a 1-pixel input."""
    with pytest.raises(ConfigError, match=r"input size \(1, 1\) is too small for a ConvNet.*--set net=mlp"):
        ConvNet((1, 1, 1), 10, 8, 1)


def test_flat_vectors_point_to_the_mlp():
    """(D,) inputs (no channel and spatial axes) failed with "min() arg is an empty sequence"."""
    with pytest.raises(ConfigError, match=r"inputs of shape \(16,\) have no channel and spatial axes for a "
                                          r"ConvNet; use --set net=mlp"):
        ConvNet((16,), 10, 8, 1)


def test_dsa_is_siamese_deterministic_and_differentiable():
    dsa = DSA(mode="multiple")
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    p1, p2 = dsa.sample(torch.Generator().manual_seed(0)), dsa.sample(torch.Generator().manual_seed(0))
    a, b = p1.apply(x), p2.apply(x)
    assert torch.equal(a, b) and a.shape == x.shape
    # siamese: one draw is applied identically to every image of any batch
    same = p1.apply(x[:1].expand(3, -1, -1, -1))
    assert torch.allclose(same[0], same[1]) and torch.allclose(same[0], a[0])
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_each_family_changes_images(family):
    dsa = DSA(families=(family,), flip_prob=1.0)
    x = torch.rand(3, 3, 8, 8)
    out = dsa.sample(torch.Generator().manual_seed(1), batch=3).apply(x)
    assert out.shape == x.shape and not torch.equal(out, x)


def test_dsa_errors():
    with pytest.raises(ConfigError, match="unknown \\['blur'\\]"):
        DSA(families=("blur",))
    with pytest.raises(ConfigError, match="turn DSA off for 1-D data"):
        DSA().sample(torch.Generator()).apply(torch.rand(2, 1, 40))
    assert "flip" not in DSA.for_dataset((1, 28, 28)).families and "flip" in DSA.for_dataset((3, 32, 32)).families


def test_a_seeded_net_leaves_the_gpus_random_streams_alone(monkeypatch):
    """The net is built on the CPU: torch.manual_seed also reseeded every GPU's stream (torch.cuda.manual_seed_all,
    which fork_rng(devices=[]) does not restore), so on a GPU machine each evaluation net reset the caller's."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    a = make_net("convnet", (1, 8, 8), 10, 8, 2, seed=3)
    assert reseeded == []
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(3)  # the CPU stream make_net draws from: the same weights
        b = ConvNet((1, 8, 8), 10, 8, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
