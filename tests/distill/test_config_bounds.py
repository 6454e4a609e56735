"""Bounds of the method config fields: a meaningless or runaway value is refused naming the field."""

import pytest

from modelatlas.distill import methods
from modelatlas.errors import ConfigError

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
