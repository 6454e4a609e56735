"""Tasks: what one zoo model is trained on, as a self-describing JSON dict, and the data it implies.

A task dict (stored as ``task`` in the manifest)::

    {"kind": "class_subset", "dataset": "digits", "classes": [1, 4, 7], "transform": "identity",
     "label_map": null, "head": "keep", "label": "digits classes 1,4,7"}

- ``classes``: the dataset classes the model saw (its training data is filtered to them).
- ``label_map``: optional list, dataset class -> training label (-1 drops the class); absent or null means
  each kept class keeps its own index, so the head stays the full size and weights stay comparable.
- ``transform``: an input transform name from :data:`TRANSFORMS` (applied after resizing to the zoo's
  input shape).
- ``head``: ``"keep"`` (fine-tune the parent's head) or ``"new"`` (re-initialise it first).
- ``balance`` (optional): draw every training label equally often (one-vs-rest tasks).

Child tasks come from task samplers (:mod:`modelatlas.zoo.samplers`).
"""

from __future__ import annotations

import torch

from modelatlas.errors import ConfigError


def _noise(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # fixed: the same task always sees the same noisy images
    return (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1 / 9)  # depthwise 3x3 box blur
    return torch.nn.functional.conv2d(x, kernel, padding=1, groups=c)


def _shift(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, shifts=(max(1, x.shape[-2] // 8), max(1, x.shape[-1] // 8)), dims=(-2, -1))


TRANSFORMS = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "transpose": lambda x: x.transpose(-2, -1),
    "invert": lambda x: 1.0 - x,
    "noise": _noise,
    "blur": _blur,
    "shift": _shift,
}


def apply_transform(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply input transform ``name`` to images (N, C, H, W); deterministic."""
    if name not in TRANSFORMS:
        raise ConfigError(f"transform: unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}")
    if name in ("rot90", "rot270", "transpose") and x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"transform: {name!r} needs square images, got {tuple(x.shape[-2:])}")
    return TRANSFORMS[name](x)


def resize(x: torch.Tensor, input_shape) -> torch.Tensor:
    """Resize images (N, C, H, W) to ``input_shape`` (C', H', W'): bilinear in space; 1 <-> 3 channels by
    averaging or repeating. O(N C' H' W')."""
    c, h, w = (int(s) for s in input_shape)
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        else:
            raise ConfigError(f"input_shape: cannot map {x.shape[1]} channels to {c}; set input_shape to match the dataset")
    if tuple(x.shape[-2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.contiguous()


def label_map_of(task: dict, num_classes: int) -> list[int]:
    """The task's dataset-class -> training-label map (-1 = class not used)."""
    if task.get("label_map") is not None:
        return [int(v) for v in task["label_map"]]
    keep = set(task.get("classes") or range(num_classes))
    return [c if c in keep else -1 for c in range(num_classes)]


_CACHE: dict[tuple, object] = {}


def _load(name: str, split: str):
    from modelatlas.data import load_dataset

    key = (name, split)
    if key not in _CACHE:
        _CACHE[key] = load_dataset(name, split)
    return _CACHE[key]


def task_data(task: dict, split: str, input_shape, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, C, H, W) and labels (N,) for ``task`` from ``split``; at most ``limit`` samples (the
    first ones, so evaluation is deterministic). Datasets are cached per process. O(N C H W)."""
    ds = _load(task["dataset"], split)
    lmap = torch.tensor(label_map_of(task, ds.num_classes), dtype=torch.long)
    y = lmap[ds.y]  # (N,) training labels, -1 = dropped
    keep = torch.nonzero(y >= 0).squeeze(1)
    if limit is not None:
        keep = keep[:limit]
    x = resize(ds.x[keep], input_shape)
    x = apply_transform(task.get("transform", "identity"), x)
    return x, y[keep]


def dataset_info(name: str) -> tuple[int, list[str], tuple[int, ...]]:
    """(num_classes, class names, input shape) of a dataset's train split."""
    ds = _load(name, "train")
    return ds.num_classes, list(ds.classes), tuple(ds.input_shape)
