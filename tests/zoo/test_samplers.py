import numpy as np
import pytest

from modelatlas.errors import ConfigError
from modelatlas.zoo import SamplerContext, ZooConfig, plan_zoo, register_sampler
from modelatlas.zoo.samplers import get_sampler, root_task, task_key


def make_ctx(n=4, methods=None, **cfg):
    config = ZooConfig(**cfg)
    return SamplerContext(config, root_task("digits", 10), methods or ["full"] * n, 10,
                          [str(i) for i in range(10)], np.random.default_rng(0))


def test_mixed_children_differ_from_parent_and_siblings():
    tasks = get_sampler("mixed")(make_ctx(6))
    keys = [task_key(t) for t in tasks]
    assert len(set(keys)) == 6 and task_key(root_task("digits", 10)) not in keys
    for t in tasks:
        assert {"kind", "classes", "transform", "dataset", "label"} <= set(t)


def test_lora_children_never_get_a_new_head():
    tasks = get_sampler("new_head")(make_ctx(methods=["lora"] * 5))
    assert all(t["head"] == "keep" for t in tasks)


def test_random_class_subset_and_named_class():
    tasks = get_sampler("random_class_subset")(make_ctx(20, subset_size=3))
    assert all(len(t["classes"]) == 3 for t in tasks)
    named = get_sampler("named_class")(make_ctx(10))
    assert sorted(t["classes"][0] for t in named) == list(range(10))
    assert named[0]["label_map"][named[0]["classes"][0]] == 1
    with pytest.raises(ConfigError, match="subset_size: 11 is not in 1..10"):
        get_sampler("random_class_subset")(make_ctx(2, subset_size=11))


def test_registered_sampler_is_used_by_plans():
    def only_ones(ctx):
        return [{"kind": "class_subset", "dataset": "digits", "classes": [1], "transform": "identity",
                 "label": "ones"} for _ in ctx.methods]

    register_sampler("test-only-ones", only_ones)
    nodes = plan_zoo(ZooConfig(shape="star", trees=1, children=3, task_sampler="test-only-ones"))
    assert [n["task"]["label"] for n in nodes] == ["digits, all 10 classes", "ones", "ones", "ones"]
    assert [n["name"] for n in nodes] == ["t0", "t0.0", "t0.1", "t0.2"]


def test_balanced_minibatches_draw_rare_labels():
    import torch

    from modelatlas.zoo.train import fit

    x = torch.rand(100, 1, 2, 2)
    y = torch.tensor([1] * 5 + [0] * 95)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    fit(model, x, y, lr=0.1, steps=50, batch_size=32, seed=0, balance=True)
    assert (model(x).argmax(1) == 1).any()  # unbalanced training would predict only the majority
