"""evaluate_result / `atlas distill eval` on result folders distilled from data given in Python."""

import pytest
import torch

from modelatlas.cli.main import main
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import evaluate_result, run_distillation
from modelatlas.errors import ConfigError


def make_own_result(out, name="own"):
    """A result folder of the random method on a 2-class ArrayDataset ``name`` (4x4 inputs), scored on its
    own test split."""
    y = torch.tensor([0, 0, 1, 1])
    train, test = ArrayDataset(name, torch.rand(4, 1, 4, 4), y, ["a", "b"]), ArrayDataset(name, torch.rand(4, 1, 4, 4), y, ["a", "b"])
    run_distillation("random", train, 1, out, {"width": 8}, dataset_test=test, eval_nets=1, eval_epochs=1)
    return test


def test_eval_of_a_set_of_own_data_says_to_score_it_in_python(tmp_path, capsys, monkeypatch):
    """It said only "unknown dataset 'own'; available: cifar10, ...", naming neither the folder nor the way."""
    test = make_own_result(tmp_path / "out")
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main(["distill", "eval", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'out' / 'result.json'}: dataset 'own' is no registered dataset (cifar10, ")
    assert f"distilled from data given in Python; score it there: evaluate_result('{tmp_path / 'out'}', " \
           "dataset_test=<its test split>)" in err
    with pytest.raises(ConfigError, match="dataset 'own' is no registered dataset"):
        evaluate_result(tmp_path / "out", save=False)
    assert len(evaluate_result(tmp_path / "out", dataset_test=test, save=False)["accuracies"]) == 1  # the way it names
