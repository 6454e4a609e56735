"""User-facing errors of distillation runs: checked before any work, one line, naming the value and the fix."""

import pytest
import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import run_distillation
from modelatlas.distill.methods.podd.api import run_poster
from modelatlas.errors import ConfigError

TINY_PODD = {"iterations": 1, "total": 2, "window": 1, "batch_real": 4, "width": 8, "checkpoint_every": 1}


def make_small(per_class=3, k=2, shape=(1, 8, 8), name="toy"):
    x = torch.rand(k * per_class, *shape, generator=torch.Generator().manual_seed(0))
    return ArrayDataset(name, x, torch.arange(k).repeat_interleave(per_class), [f"c{i}" for i in range(k)])


def test_poster_ipc_above_the_smallest_class_is_refused_before_distilling(tmp_path):
    data = make_small()
    with pytest.raises(ConfigError, match=r"--ipc 3.5 \(a poster\) needs 4 real examples.*'c0'.*only 3"):
        run_poster(data, 3.5, tmp_path / "out", TINY_PODD, eval_nets=1, eval_epochs=1, dataset_test=data)
    assert not (tmp_path / "out").exists()  # nothing was distilled


@pytest.mark.parametrize("ipc", [float("inf"), float("nan"), 0.0])
def test_poster_ipc_must_be_finite_and_positive(tmp_path, ipc):
    data = make_small()
    with pytest.raises(ConfigError, match="--ipc must be a finite number > 0"):
        run_poster(data, ipc, tmp_path / "out", TINY_PODD, dataset_test=data)


def test_run_ipc_above_the_smallest_class_is_refused_before_distilling(tmp_path):
    data = make_small()
    with pytest.raises(ConfigError, match="ipc 4 needs 4 real examples per class.*--no-baseline"):
        run_distillation("dm", data, 4, tmp_path / "out", {"iterations": 1, "init": "noise", "width": 8},
                         dataset_test=data, eval_nets=1, eval_epochs=1)
    assert not (tmp_path / "out").exists()
