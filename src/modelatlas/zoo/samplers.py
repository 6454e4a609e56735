"""Task samplers: how a zoo picks its children's tasks, as a registry other modules extend.

A sampler is ``sampler(ctx: SamplerContext) -> list[dict]``: one task dict per child (see
:mod:`modelatlas.zoo.tasks` for the format), drawn only from ``ctx.rng`` so the same seed gives the same
zoo. Register new families with :func:`register_sampler`; select one with ``ZooConfig(task_sampler=...)``.

Built in:
- ``mixed``: each child draws a kind from ``config.task_kinds`` (``new_head`` only for full fine-tunes),
  and tasks differ from the parent's and from each sibling's where possible.
- ``class_subset`` / ``transform`` / ``new_head``: one kind only.
- ``random_class_subset``: each child sees a random ``subset_size`` of the classes (multi-hot targets for
  ProbeX live in ``task["classes"]``); repeats allowed (1,000 children of a 10-class root).
- ``named_class``: each child learns one class versus the rest (labels 1 / 0, label-balanced minibatches),
  cycling over the classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from modelatlas.errors import ConfigError


@dataclass
class SamplerContext:
    """What a sampler may use: the zoo config, the parent's task, the children's methods and the data."""

    config: object  # ZooConfig
    parent: dict
    methods: list[str]  # per child: "full" or "lora"
    num_classes: int
    class_names: list[str]
    rng: np.random.Generator
    datasets: dict = field(default_factory=dict)  # other dataset name -> num_classes

    @property
    def n(self) -> int:
        return len(self.methods)


Sampler = Callable[[SamplerContext], list]
_SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, sampler: Sampler) -> None:
    """Make ``sampler`` selectable as ``ZooConfig(task_sampler=name)``."""
    _SAMPLERS[name] = sampler


def available_samplers() -> list[str]:
    return sorted(_SAMPLERS)


def get_sampler(name: str) -> Sampler:
    if name not in _SAMPLERS:
        raise ConfigError(f"task_sampler: unknown sampler {name!r}; choose one of {available_samplers()}")
    return _SAMPLERS[name]


def task_key(task: dict) -> tuple:
    """What makes two tasks the same (for 'different from parent and siblings')."""
    lmap = task.get("label_map")
    return (task["dataset"], tuple(task.get("classes") or ()), task.get("transform", "identity"),
            tuple(lmap) if lmap is not None else None)


def _names(ctx: SamplerContext, classes) -> str:
    return ",".join(ctx.class_names[c] for c in classes)


def root_task(dataset: str, num_classes: int) -> dict:
    return {"kind": "full", "dataset": dataset, "classes": list(range(num_classes)), "transform": "identity",
            "label_map": None, "head": "new", "label": f"{dataset}, all {num_classes} classes"}


def class_subset_task(ctx: SamplerContext, classes) -> dict:
    classes = sorted(int(c) for c in classes)
    return {"kind": "class_subset", "dataset": ctx.config.dataset, "classes": classes, "transform": "identity",
            "label_map": None, "head": "keep", "label": f"{ctx.config.dataset} classes {_names(ctx, classes)}"}


def transform_task(ctx: SamplerContext, transform: str) -> dict:
    return {"kind": "transform", "dataset": ctx.config.dataset, "classes": list(range(ctx.num_classes)),
            "transform": transform, "label_map": None, "head": "keep",
            "label": f"{ctx.config.dataset}, {transform} inputs"}


def dataset_task(ctx: SamplerContext, name: str) -> dict:
    k = ctx.datasets[name]
    return {"kind": "dataset", "dataset": name, "classes": list(range(k)), "transform": "identity",
            "label_map": None, "head": "keep", "label": f"{name}, all {k} classes"}


def new_head_task(ctx: SamplerContext, groups: int) -> dict:
    """Classes partitioned at random into ``groups`` new labels; the head is re-initialised."""
    lmap = [int(g) for g in ctx.rng.permutation(np.arange(ctx.num_classes) % groups)]
    desc = "; ".join(f"{g}={_names(ctx, [c for c in range(ctx.num_classes) if lmap[c] == g])}" for g in range(groups))
    return {"kind": "new_head", "dataset": ctx.config.dataset, "classes": list(range(ctx.num_classes)),
            "transform": "identity", "label_map": lmap, "head": "new",
            "label": f"{ctx.config.dataset} regrouped into {groups} labels ({desc})"}


def _draw(ctx: SamplerContext, kind: str) -> dict:
    c = ctx.num_classes
    if kind == "class_subset":
        k = int(ctx.rng.integers(2, max(3, c)))  # 2 .. c-1 classes
        return class_subset_task(ctx, ctx.rng.choice(c, size=min(k, c), replace=False))
    if kind == "transform":
        return transform_task(ctx, str(ctx.rng.choice(list(ctx.config.transforms))))
    if kind == "dataset":
        return dataset_task(ctx, str(ctx.rng.choice(list(ctx.datasets))))
    if kind == "new_head":
        return new_head_task(ctx, int(ctx.rng.integers(2, max(3, c // 2 + 1))))
    raise ConfigError(f"task_kinds: unknown task kind {kind!r}")


def _distinct(ctx: SamplerContext, kinds_for: Callable[[str], list]) -> list[dict]:
    """One task per child, each differing from the parent's and the earlier siblings' (50 tries)."""
    seen = {task_key(ctx.parent)}
    tasks = []
    for method in ctx.methods:
        kinds = kinds_for(method)
        for _ in range(50):
            task = _draw(ctx, str(ctx.rng.choice(kinds)))
            if task_key(task) not in seen:
                break
        seen.add(task_key(task))
        tasks.append(task)
    return tasks


def _mixed(ctx: SamplerContext) -> list[dict]:
    kinds = list(ctx.config.task_kinds)

    def kinds_for(method: str) -> list:
        # LoRA children keep the head (a re-initialised head is no low-rank update of the parent's).
        allowed = [k for k in kinds if method == "full" or k != "new_head"]
        return allowed or ["class_subset"]

    return _distinct(ctx, kinds_for)


def _one_kind(kind: str) -> Sampler:
    return lambda ctx: _distinct(ctx, lambda method: [kind if method == "full" or kind != "new_head" else "class_subset"])


def _random_class_subset(ctx: SamplerContext) -> list[dict]:
    k = ctx.config.subset_size or max(1, ctx.num_classes // 2)
    if not 1 <= k <= ctx.num_classes:
        raise ConfigError(f"subset_size: {k} is not in 1..{ctx.num_classes} (the dataset's classes)")
    return [class_subset_task(ctx, ctx.rng.choice(ctx.num_classes, size=k, replace=False)) for _ in ctx.methods]


def _named_class(ctx: SamplerContext) -> list[dict]:
    order = ctx.rng.permutation(ctx.num_classes)
    tasks = []
    for i in range(ctx.n):
        c = int(order[i % ctx.num_classes])
        lmap = [int(j == c) for j in range(ctx.num_classes)]
        tasks.append({"kind": "named_class", "dataset": ctx.config.dataset, "classes": [c],
                      "transform": "identity", "label_map": lmap, "head": "keep", "balance": True,
                      "label": f"{ctx.config.dataset}: {ctx.class_names[c]} vs rest"})
    return tasks


register_sampler("mixed", _mixed)
for _kind in ("class_subset", "transform", "new_head"):
    register_sampler(_kind, _one_kind(_kind))
register_sampler("random_class_subset", _random_class_subset)
register_sampler("named_class", _named_class)
