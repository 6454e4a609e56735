"""Planning a zoo: every model's name, parent, task, method and hyperparameters, before any training.

The plan depends only on the config (and the datasets' class counts), and every random choice draws from
a seed derived from ``config.seed`` and the model's name (:func:`modelatlas.seeding.derive_seed`), so
plans and weights are reproducible and do not depend on the number of workers or the build order.
Names: roots ``t0``, ``t1``...; the j-th child of ``t0.1`` is ``t0.1.j``.
"""

from __future__ import annotations

import math

import numpy as np

from modelatlas.errors import ConfigError, DatasetNotFoundError
from modelatlas.seeding import derive_seed
from modelatlas.zoo.architectures import arch_config
from modelatlas.zoo.config import ADDED_FIELDS, ZooConfig
from modelatlas.zoo.samplers import SamplerContext, get_sampler, root_task
from modelatlas.zoo.tasks import dataset_info as task_dataset_info


def zoo_arch_config(config: ZooConfig) -> dict:
    """The architecture config dict every model of the zoo shares."""
    num_classes, _, shape = dataset_info("dataset", config.dataset)
    if len(shape) != 3:
        raise ConfigError(f"dataset: {config.dataset!r} has inputs of shape {shape}; zoos need images (C, H, W)")
    input_shape = config.input_shape or shape
    arch = arch_config(config.arch, input_shape, num_classes, **config.arch_kwargs)
    if config.method != "full":
        _check_ranks(config.lora_ranks, arch)
    return arch


def _check_ranks(ranks: tuple[int, ...], arch: dict) -> None:
    """A LoRA rank above every adapted layer's smaller side is no low-rank update (rank 100000 on a
    hidden-16 MLP trained full-rank factors for minutes). Builds the model once: O(parameters)."""
    import torch

    from modelatlas.zoo.architectures import build_model, lora_targets

    with torch.device("meta"):  # shapes only, no memory
        model = build_model(arch)
    most = max(min(model.get_submodule(t).weight.shape) for t in lora_targets(model))
    if max(ranks) > most:
        raise ConfigError(f"lora_ranks: rank {max(ranks)} is above every adapted layer's smaller side (at most "
                          f"{most} for this {arch['arch']}); choose ranks <= {most}")


def dataset_info(key: str, name: str) -> tuple[int, list[str], tuple[int, ...]]:
    """:func:`~modelatlas.zoo.tasks.dataset_info`, errors naming the config key (``dataset`` or
    ``other_datasets``). Zoo tasks name datasets only: a dataset's folder comes from its environment
    variable or default location, never from a --data-root."""
    if name == "image-folder":
        raise ConfigError(f"{key}: 'image-folder' needs a folder (root=), which zoo tasks cannot carry; "
                          "choose a registered dataset (`atlas data list`)")
    try:
        return task_dataset_info(name)
    except (ConfigError, DatasetNotFoundError) as e:
        note = " (`atlas zoo make` takes no --data-root: use the environment variable)" if "--data-root" in str(e) else ""
        raise type(e)(f"{key}: {e}{note}") from e


def _rng(config: ZooConfig, name: str, what: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(config.seed, name, what))


def _method(config: ZooConfig, name: str) -> str:
    if config.method != "mixed":
        return config.method
    return "lora" if _rng(config, name, "method").random() < 0.5 else "full"


def _train_spec(config: ZooConfig, name: str, method: str) -> dict:
    rng = _rng(config, name, "hparams")
    steps, lr = {"root": (config.root_steps, config.root_lr), "full": (config.ft_steps, config.ft_lr),
                 "lora": (config.ft_steps, config.lora_lr)}[method]
    spec = {"lr": float(math.exp(rng.uniform(math.log(lr[0]), math.log(lr[1])))),
            "steps": int(rng.integers(int(steps[0]), int(steps[1]) + 1)),
            "batch_size": config.batch_size,
            "seed": derive_seed(config.seed, name, "train"),
            "init_seed": derive_seed(config.seed, name, "init")}
    if method == "lora":
        r = int(rng.choice(list(config.lora_ranks)))
        spec.update(lora_r=r, lora_alpha=float(config.lora_alpha if config.lora_alpha is not None else 2 * r))
    return spec


def _node(config: ZooConfig, name: str, parent: str | None, tree: str, level: int, method: str, task: dict) -> dict:
    storage = "adapter" if method == "lora" and config.storage == "adapter" else "full"
    return {"name": name, "parent": parent, "tree": tree, "level": level, "method": method,
            "storage": storage, "task": task, "train": _train_spec(config, name, method)}


def _other_datasets(config: ZooConfig, num_classes: int) -> dict:
    out = {}
    for name in config.other_datasets:
        k = dataset_info("other_datasets", name)[0]
        if k > num_classes:
            raise ConfigError(f"other_datasets: {name!r} has {k} classes, more than {config.dataset!r}'s {num_classes} (the head size)")
        out[name] = k
    return out


def model_names(config: ZooConfig) -> list[str]:
    """The names of every model ``config`` builds, in :func:`plan_zoo`'s order, without planning tasks (no
    dataset is read). O(number of models)."""
    from modelatlas.zoo.merged import merge_names

    levels = [[f"t{t}" for t in range(config.trees)]]
    for _ in range(config.depth):
        levels.append([f"{parent}.{j}" for parent in levels[-1] for j in range(config.children)])
    return [name for level in levels for name in level] + merge_names(config)


def planned_names(config: dict) -> list[str] | None:
    """:func:`model_names` of a manifest's ``config`` when ``make_zoo`` wrote it (it holds every
    :class:`ZooConfig` field and ``arch_config``); None for other manifests (probex families, hand-written)."""
    from dataclasses import fields

    if "arch_config" not in config or any(f.name not in config and f.name not in ADDED_FIELDS for f in fields(ZooConfig)):
        return None
    try:
        return model_names(ZooConfig.from_dict(config))
    except (ConfigError, TypeError, ValueError):
        return None


def plan_zoo(config: ZooConfig) -> list[dict]:
    """All nodes of the zoo, parents before children (level by level). Each node: ``name, parent, tree,
    level, method ("root"|"full"|"lora"|"merge"), storage ("full"|"adapter"), task, train`` (hyperparameters);
    merged models (``config.merges``) last, one level below the rest (:func:`~modelatlas.zoo.merged.plan_merges`).
    O(number of models)."""
    from modelatlas.zoo.merged import plan_merges

    num_classes, class_names, _ = dataset_info("dataset", config.dataset)
    others = _other_datasets(config, num_classes) if "dataset" in config.task_kinds else {}
    sampler = get_sampler(config.task_sampler)
    levels: list[list[dict]] = [[] for _ in range(config.depth + 1)]
    for t in range(config.trees):
        levels[0].append(_node(config, f"t{t}", None, f"t{t}", 0, "root", root_task(config.dataset, num_classes)))
    for level in range(1, config.depth + 1):
        for parent in levels[level - 1]:
            names = [f"{parent['name']}.{j}" for j in range(config.children)]
            methods = [_method(config, n) for n in names]
            ctx = SamplerContext(config, parent["task"], methods, num_classes, class_names,
                                 _rng(config, parent["name"], "tasks"), others)
            tasks = sampler(ctx)
            if len(tasks) != len(names):
                raise ConfigError(f"task_sampler: {config.task_sampler!r} returned {len(tasks)} tasks for {len(names)} children")
            for n, m, task in zip(names, methods, tasks):
                levels[level].append(_node(config, n, parent["name"], parent["tree"], level, m, task))
    nodes = [node for lv in levels for node in lv]
    _check_square(config, nodes)
    return nodes + (plan_merges(config, nodes) if config.merges else [])


_SQUARE_ONLY = {"rot90", "rot270", "transpose"}


def _check_square(config: ZooConfig, nodes: list[dict]) -> None:
    """Rotations by 90 degrees and transposes need square images: on an H x W input shape the build failed at
    the first such child, after the models before it were trained. O(number of models)."""
    shape = config.input_shape or dataset_info("dataset", config.dataset)[2]
    if shape[-1] == shape[-2]:
        return
    bad = sorted({str(n["task"].get("transform")) for n in nodes} & _SQUARE_ONLY)
    if bad:
        raise ConfigError(f"transforms: {bad} need square images, and the input shape {tuple(shape)} is not; give a "
                          "square input shape (--input-shape), leave transform tasks out (--task-kinds "
                          "class_subset,new_head), or choose other transforms (ZooConfig(transforms=...))")
