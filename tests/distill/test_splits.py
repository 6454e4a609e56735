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
