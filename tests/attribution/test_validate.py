"""validation_scores: the ``validation`` object of attribution.json is strict JSON."""

import json

import torch

from modelatlas.attribution.validate import validation_scores


def test_undefined_spearman_scores_are_null_not_nan():
    """One cluster and one test sample (a one-class image folder): 'flattened' and 'per_test_mean' were NaN,
    which attribution.json wrote as a bare NaN, not JSON; they are null now, as 'within_class' was."""
    one = torch.tensor([[0.5]])
    v = validation_scores(one, one, torch.tensor([0]), torch.tensor([0]), 1.0, {"total_s": 1.0, "online_s": 0.1})
    assert v["flattened"] is None and v["per_test_mean"] is None and v["within_class"] is None
    json.dumps(v, allow_nan=False)
