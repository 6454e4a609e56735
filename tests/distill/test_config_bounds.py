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
