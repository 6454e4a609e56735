import pytest
import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import run_distillation
from modelatlas.errors import ConfigError


def make_toy(labels, classes=("a", "b", "c")):
    return ArrayDataset("toy", torch.rand(len(labels), 1, 4, 4), torch.tensor(labels), list(classes))


@pytest.mark.parametrize("baseline", [True, False])
def test_class_without_training_examples_is_named_not_told_to_lower_the_ipc(tmp_path, baseline):
    """A small image-folder class whose images all went to the test split was refused with "has only 0;
    lower the ipc", which no ipc >= 1 can satisfy; with ROOT/train/ + ROOT/test/ it blamed the seeded split."""
    train, test = make_toy([0, 0, 1, 1]), make_toy([0, 1, 2])
    with pytest.raises(ConfigError, match="class 'c' of 'toy' has no training examples.*ROOT/train/c/ holds no images.*add training"):
        run_distillation("dm", train, 1, tmp_path / "out", {"iterations": 1, "width": 8}, dataset_test=test,
                         eval_nets=1, eval_epochs=1, baseline=baseline)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,cfg", [("dm", {"init": "noise"}), ("ratbptt", {"init": "noise", "total": 2,
                                                                                 "window": 1, "batch_real": 4})])
def test_distill_refuses_a_class_without_training_examples(method, cfg):
    """distill() in Python: DM with noise images failed in a pooling layer ("Expected non-zero, positive output
    size"), RaT-BPTT returned noise for a class no real image ever shaped."""
    from modelatlas.distill import distill

    with pytest.raises(ConfigError, match="class 'c' of 'toy' has no training examples"):
        distill(method, make_toy([0, 0, 1, 1]), 1, {"iterations": 1, "width": 8, **cfg})
