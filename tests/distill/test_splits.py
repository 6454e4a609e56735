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


@pytest.mark.parametrize("where", ["train", "test"])
def test_non_finite_inputs_are_refused_naming_the_split_and_example(tmp_path, where):
    """A NaN pixel reached training: DM stopped with 'diverged ... smaller learning rates', the random subset
    and the evaluation scored chance as a result."""
    train, test = make_toy([0, 0, 1, 1, 2, 2]), make_toy([0, 1, 2])
    (train if where == "train" else test).x[1, 0, 2, 3] = float("nan")
    with pytest.raises(ConfigError, match=f"the {where} split of 'toy' holds NaN or infinite values \\(example 1\\)"):
        run_distillation("random", train, 1, tmp_path / "out", dataset_test=test, eval_nets=1, eval_epochs=1)
    assert not (tmp_path / "out").exists()
    if where == "train":
        from modelatlas.distill import distill

        with pytest.raises(ConfigError, match="the train split of 'toy' holds NaN"):
            distill("random", train, 1)
