import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.distill import distill, methods
from modelatlas.distill.matching import gradient_match_distance, layer_distance
from modelatlas.distill.methods.herding.method import herd
from modelatlas.errors import ConfigError

TINY = {"random": {}, "herding": {"train_steps": 5, "width": 8},
        "dc": {"iterations": 2, "width": 8, "batch_real": 16},
        "dsa": {"iterations": 2, "width": 8, "batch_real": 16},
        "dm": {"iterations": 2, "width": 8, "batch_real": 16}}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_method_tiny_shapes_and_determinism(digits, name):
    a = distill(name, digits, 1, TINY[name], seed=0)
    b = distill(name, digits, 1, TINY[name], seed=0)
    assert a.images.shape == (10, 1, 8, 8) and a.classes.tolist() == list(range(10))
    assert torch.equal(a.images, b.images) and a.meta["method"] == name


def test_dc_ipc10_uses_10_50_loops_and_changes_images(digits):
    from modelatlas.distill.methods.dc.config import DCConfig

    assert DCConfig().loops(1) == (1, 1) and DCConfig().loops(10) == (10, 50) and DCConfig().loops(50) == (50, 10)
    from modelatlas.distill.methods.base import DistillContext, init_synthetic

    init = init_synthetic(digits, 2, "real", DistillContext(seed=0))
    out = distill("dc", digits, 2, {"iterations": 1, "outer_loop": 2, "inner_loop": 1, "width": 8, "batch_real": 8})
    assert out.images.shape == init.images.shape and not torch.equal(out.images, init.images)


@pytest.mark.parametrize("name", ["dm", "hello"])
def test_init_from_a_given_set_starts_there(digits, name):
    start = distill("random", digits, 2, seed=5)
    # DM takes >= 1 iteration: one of lr 1e-30 leaves the images as they started (to 1e-20) (hello may take 0)
    cfg = {"iterations": 1, "width": 8, "batch_real": 8, "lr_img": 1e-30} if name == "dm" else {
        "iterations": 0, "width": 8, "teacher_steps": 1, "projector_steps": 1, "head_init": "class_mean"}
    out = distill(name, digits, 2, cfg, init=start)
    # the given images come back unchanged, not a fresh real draw (seed 0 picks others)
    assert torch.allclose(out.images, start.images, atol=1e-20) and out.meta["init"] == "random"
    fresh = distill(name, digits, 2, cfg)
    assert not torch.equal(fresh.images, start.images)


def test_init_set_errors_name_the_mismatch(digits):
    start = distill("random", digits, 2)
    with pytest.raises(ConfigError, match="init set: 20 images of 10 classes \\(2 per class\\), but this run wants 3 per class"):
        distill("dm", digits, 3, {"iterations": 1}, init=start)
    with pytest.raises(ConfigError, match="'herding' cannot start from a given set.*dm"):
        distill("herding", digits, 2, init=start)


def test_registry_and_config_errors():
    assert {"random", "herding", "dc", "dsa", "dm"} <= set(methods.available())
    with pytest.raises(ConfigError, match="unknown distillation method 'nope'; available: .*dm"):
        methods.get("nope")
    with pytest.raises(ConfigError, match="has no config field 'lr'"):
        methods.get("dm").make_config({"lr": 1})
    with pytest.raises(ConfigError, match="has no config field 'min_iterations'") as err:  # a ClassVar, was listed
        methods.get("dm").make_config({"min_iterations": 0})  # and then passed on: a TypeError traceback
    assert "min_iterations" not in str(err.value).split("fields:")[1]
    with pytest.raises(ConfigError, match="lr_img must be > 0, got -1"):
        methods.get("dc").make_config({"lr_img": -1})
    with pytest.raises(ConfigError, match="lr_img must be finite, got inf"):
        methods.get("dm").make_config({"lr_img": float("inf")})
    with pytest.raises(ConfigError, match="embed must be 'trained', 'random' or 'pixels'"):
        methods.get("herding").make_config({"embed": "clip"})
    with pytest.raises(ConfigError, match="iterations must be >= 1"):
        methods.get("dm").make_config({"iterations": -1})


def test_distill_errors(digits):
    with pytest.raises(ConfigError, match="ipc must be an integer >= 1"):
        distill("dm", digits, 0)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint_dir"):
        distill("dm", digits, 1, resume=True)


def test_gradient_distance_hand_values():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(layer_distance(g, g)) == pytest.approx(0.0, abs=1e-5)
    assert float(layer_distance(g, -g)) == pytest.approx(4.0, abs=1e-5)  # two neurons, cos -1 each
    assert float(gradient_match_distance([g, torch.ones(3)], [g.flip(0), -torch.ones(3)])) == pytest.approx(2.0, abs=1e-5)


def test_herding_oracle():
    feats = torch.tensor([[0.0], [10.0], [4.0], [6.0]])  # mean 5: first pick closest (4 or 6), then balance
    picks = herd(feats, 2)
    assert picks[0] in (2, 3) and set(picks) == {2, 3}


def test_dsa_on_inputs_that_are_no_images_is_refused():
    """--method dsa on MNIST-1D ran without augmentation and without a word: DC under another name."""
    from modelatlas.data.registry import ArrayDataset

    x = torch.randn(40, 1, 16)  # (N, 1, L): a 1-D signal per sample, as MNIST-1D
    data = ArrayDataset("signals", x, torch.arange(40) % 2, ["a", "b"], {})
    with pytest.raises(ConfigError, match=r"DSA \(dsa=true\) augments images, and 'signals' holds inputs of shape "
                                          r"\(1, 16\), not images: use method dc"):
        distill("dsa", data, 1, TINY["dsa"])
    tr = load_dataset("mnist1d", "train").subset(list(range(200)))  # before: 'turned off' for 1-D signals
    with pytest.raises(ConfigError, match="'mnist1d' holds inputs of shape \\(1, 40\\), not images"):
        distill("dsa", tr, 1, {"iterations": 1, "width": 8, "batch_real": 8})
    assert distill("dc", tr, 1, {"iterations": 1, "width": 8, "batch_real": 8}).images.shape == (10, 1, 40)


def test_a_poster_as_starting_set_is_named_as_one(digits):
    """--init-from a poster said '44 images of 10 classes (4 per class)' of its overlapping crops."""
    poster = distill("podd", digits, 1, {"iterations": 1, "total": 4, "window": 2, "batch_real": 32, "width": 8,
                                         "poster_ipc": 1.0})
    with pytest.raises(ConfigError, match=r"a poster's \d+ overlapping crops, not images per class; start from a "
                                          r"set of images per class"):
        distill("dm", digits, 1, {"iterations": 1}, init=poster)
