import pytest

from modelatlas.errors import ConfigError
from modelatlas.zoo import make_zoo, plan_zoo


def test_square_only_transforms_on_a_non_square_input_shape_are_refused_before_training(make_config, tmp_path):
    """--input-shape 1,8,12 with transform tasks trained the roots and some children, then failed on the first
    rot90 child ('needs square images'), leaving half a zoo."""
    cfg = make_config(trees=1, depth=1, children=6, input_shape=(1, 8, 12), task_sampler="transform")
    with pytest.raises(ConfigError, match=r"transforms: \['rot90'.*\] need square images.*\(1, 8, 12\)"):
        plan_zoo(cfg)
    with pytest.raises(ConfigError):
        make_zoo(cfg, tmp_path / "zoo", workers=1)
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())
    plan_zoo(make_config(input_shape=(1, 8, 12), task_kinds=("class_subset",)))  # no transform tasks: fine
    plan_zoo(make_config(input_shape=(1, 8, 12), transforms=("hflip", "noise"), task_sampler="transform"))
