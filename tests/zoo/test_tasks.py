import torch

from modelatlas.zoo import TRANSFORMS, resize, task_data
from modelatlas.zoo.tasks import apply_transform, label_map_of


def test_transforms_keep_shape_and_rot90_rotates():
    x = torch.rand(2, 1, 8, 8)
    for name in TRANSFORMS:
        assert apply_transform(name, x).shape == x.shape
    assert torch.equal(apply_transform("rot90", x)[0, 0, 0, :], x[0, 0, :, -1])
    assert torch.equal(apply_transform("noise", x), apply_transform("noise", x))  # deterministic


def test_resize_to_28():
    assert resize(torch.rand(4, 1, 8, 8), (1, 28, 28)).shape == (4, 1, 28, 28)
    assert resize(torch.rand(4, 3, 8, 8), (1, 8, 8)).shape == (4, 1, 8, 8)


def test_task_data_filters_and_relabels():
    sub = {"kind": "class_subset", "dataset": "digits", "classes": [1, 7], "transform": "identity"}
    x, y = task_data(sub, "test", (1, 8, 8), limit=40)
    assert len(y) == 40 and set(y.tolist()) <= {1, 7}
    grp = {"kind": "new_head", "dataset": "digits", "label_map": [c % 2 for c in range(10)], "transform": "invert"}
    x2, y2 = task_data(grp, "test", (1, 28, 28), limit=30)
    assert x2.shape == (30, 1, 28, 28) and set(y2.tolist()) <= {0, 1}
    assert label_map_of(sub, 4) == [-1, 1, -1, -1]
