"""Bounds of the settings: a meaningless, aliased or runaway value is refused naming the field."""

import json

import pytest
import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import (
    EvalProtocol,
    distill,
    evaluate_result,
    evaluate_synthetic,
    methods,
    run_distillation,
)
from modelatlas.errors import CheckpointError, ConfigError


def make_toy(k=2, n=3, shape=(1, 8, 8)):
    x = torch.rand(k * n, *shape, generator=torch.Generator().manual_seed(0))
    return ArrayDataset("toy", x, torch.arange(k).repeat_interleave(n), [f"c{i}" for i in range(k)])

OPTIMISING = ("dc", "dsa", "dm", "mtt", "ratbptt", "podd", "teddy")


@pytest.mark.parametrize("name", OPTIMISING)
def test_zero_iterations_are_refused_where_they_would_only_return_the_start(name):
    # iterations=0 scored the untouched real start as this method's result
    with pytest.raises(ConfigError, match="iterations must be >= 1.*got 0"):
        methods.get(name).make_config({"iterations": 0})


@pytest.mark.parametrize("name", ["random", "herding", "hello"])
def test_zero_iterations_stay_allowed_where_they_mean_something(name):
    # random/herding ignore iterations; hello with 0 still fits its label projector (docs: the controls)
    assert methods.get(name).make_config({"iterations": 0}).iterations == 0


def test_depth_is_capped_naming_the_field():
    from modelatlas.distill.nets import MAX_DEPTH

    # an MLP of depth 10**6 spent minutes building its layers before any error (a ConvNet's depth is bounded
    # by the input size, but only once the net was built)
    assert methods.get("dm").make_config({"net": "mlp", "depth": MAX_DEPTH}).depth == MAX_DEPTH
    with pytest.raises(ConfigError, match=f"depth must be at most {MAX_DEPTH}, got 1,000,000"):
        methods.get("dm").make_config({"net": "mlp", "depth": 10**6})


def test_eval_protocol_depth_is_capped():
    from modelatlas.distill.evaluate import EvalProtocol
    from modelatlas.distill.nets import MAX_DEPTH

    with pytest.raises(ConfigError, match=f"eval depth must be at most {MAX_DEPTH}, got 1,000,000"):
        EvalProtocol(net="mlp", depth=10**6)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 1.5, True])
def test_out_of_range_seeds_are_refused(tmp_path, seed):
    # 2**64 ran as seed 0 (derive_seed keeps 64 bits), 1.5 as seed 1
    data = make_toy()
    with pytest.raises(ConfigError, match=r"seed must be an integer from -2\*\*63 to 2\*\*63 - 1, got "):
        distill("random", data, 1, seed=seed)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        run_distillation("random", data, 1, tmp_path / "out", seed=seed, dataset_test=data, eval_nets=1, eval_epochs=1)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="seed must be an integer"):
        evaluate_synthetic(distill("random", data, 1), data, EvalProtocol(num_nets=1, epochs=1, width=8), seed=seed)


def test_reevaluation_seeds_are_checked(tmp_path):
    data = make_toy()
    run_distillation("random", data, 1, tmp_path, dataset_test=data, eval_nets=1, eval_epochs=1)
    with pytest.raises(ConfigError, match="seed must be an integer from"):
        evaluate_result(tmp_path, seed=2**64, dataset_test=data)
    info = json.loads((tmp_path / "result.json").read_text())
    (tmp_path / "result.json").write_text(json.dumps({**info, "seed": 2**64}))
    with pytest.raises(CheckpointError, match=r"result.json.*seed must be an integer from .*got 18446744073709551616"):
        evaluate_result(tmp_path, dataset_test=data)


@pytest.mark.parametrize("kw,message", [({"eval_nets": 0}, "eval num_nets must be >= 1, got 0"),
                                        ({"eval_epochs": 0}, "eval epochs must be >= 1, got 0")])
def test_an_invalid_evaluation_is_refused_before_distilling(tmp_path, kw, message):
    # it was checked only once the set was distilled (hours, for a real run), and the set was lost
    data = make_toy()
    with pytest.raises(ConfigError, match=message):
        run_distillation("dm", data, 1, tmp_path / "out", {"iterations": 1, "width": 8}, dataset_test=data,
                         **{"eval_nets": 1, "eval_epochs": 1, **kw})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ipc", [1.5, 2.0, True, "2"])
def test_ipc_must_be_an_integer(ipc):
    # 1.5 failed in slicing with a TypeError traceback; True ran as ipc 1
    with pytest.raises(ConfigError, match=f"ipc must be an integer >= 1, got {ipc!r}"):
        distill("random", make_toy(), ipc)


def test_a_numpy_integer_ipc_is_fine(tmp_path):
    import numpy as np

    data = make_toy()
    info = run_distillation("random", data, np.int64(1), tmp_path, dataset_test=data, eval_nets=1, eval_epochs=1)
    assert info["ipc"] == 1 and type(info["ipc"]) is int


def test_hello_rank_and_text_dim_are_bounded():
    # rank 10**9 asked the allocator for a (10**9, 384) matrix once the teacher was trained
    spec = methods.get("hello")
    assert spec.make_config({"rank": 384}).rank == 384
    with pytest.raises(ConfigError, match=r"rank \(385\) must be <= text_dim \(384\)"):
        spec.make_config({"rank": 385})
    with pytest.raises(ConfigError, match="text_dim must be at most 16,384, got 1,000,000,000"):
        spec.make_config({"text_dim": 10**9, "rank": 4})


@pytest.mark.parametrize("field,value", [("dsa", "no"), ("batch_real", 2.5), ("iterations", 1.5), ("width", 8.0),
                                         ("init", None)])
def test_a_config_instance_of_the_wrong_types_is_refused(field, value):
    # only dicts (--set) were type-checked: DMConfig(dsa="no") turned DSA on, batch_real=2.5 failed in slicing,
    # iterations=1.5 ran 1 iteration recorded as 1.5
    from dataclasses import replace

    from modelatlas.distill.methods.dm.config import DMConfig

    with pytest.raises(ConfigError, match=f"{field} must be .*, got {value!r}"):
        DMConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"{field} must be "):
        replace(DMConfig(), **{field: value})


def test_a_protocol_of_another_type_is_refused_before_distilling(tmp_path):
    # protocol="sgd" failed with AttributeError once the set was distilled, leaving a checkpoint and no result
    data = make_toy()
    with pytest.raises(ConfigError, match="protocol must be an EvalProtocol, got str"):
        run_distillation("dm", data, 1, tmp_path / "out", {"iterations": 1, "width": 8}, dataset_test=data,
                         protocol="sgd")
    assert not (tmp_path / "out").exists()
