import pytest

from modelatlas.errors import ConfigError
from modelatlas.zoo import ZooConfig, arch_config, preset, presets


@pytest.mark.parametrize("kwargs, match", [
    ({"trees": 0}, "trees: must be a positive integer"),
    ({"arch": "resnet"}, "arch: unknown value 'resnet'"),
    ({"method": "qlora"}, "method: unknown value"),
    ({"storage": "adapter", "method": "full"}, "storage: 'adapter' needs method 'lora' or 'mixed'"),
    ({"lora_ranks": (0,)}, "lora_ranks: must be positive integers"),
    ({"ft_lr": (1e-2, 1e-3)}, r"ft_lr: must be a \(low, high\) pair"),
    ({"task_sampler": "nope"}, "task_sampler: unknown sampler 'nope'"),
    ({"task_kinds": ("dataset",)}, "other_datasets: task kind 'dataset' needs"),
    ({"transforms": ("spin",)}, "transforms: unknown value 'spin'"),
    ({"input_shape": (8, 8)}, r"input_shape: must be \(C, H, W\)"),
    ({"lora_alpha": 0.0}, r"lora_alpha: must be > 0 or None"),  # alpha 0 trained a LoRA child equal to its parent
    ({"lora_alpha": float("nan")}, r"lora_alpha: must be > 0 or None"),
    ({"subset_size": 0}, "subset_size: must be a positive integer or None"),  # 0 was silently read as None
    ({"subset_size": True}, "subset_size: must be a positive integer or None"),  # True passed as 1, as below
    ({"lora_ranks": (4, True)}, r"lora_ranks: must be positive integers, got \(4, True\)"),
    ({"root_steps": 5}, r"root_steps: must be a list or tuple, got 5"),  # was a TypeError from tuple(5)
    ({"batch_size": True}, "batch_size: must be a positive integer, got True"),  # True passed as 1
    # bad sizes used to fail deep in torch (or divide by zero in the sampler), after folders were written
    ({"arch_kwargs": {"hidden": -1}}, "arch_kwargs.hidden: must be a positive integer, got -1"),
    ({"arch_kwargs": {"hidden": 0}}, "arch_kwargs.hidden: must be a positive integer, got 0"),
    ({"arch_kwargs": {"hidden": "32"}}, "arch_kwargs.hidden: must be a positive integer, got '32'"),
    ({"arch_kwargs": {"n_hidden": 1.5}}, "arch_kwargs.n_hidden: must be a non-negative integer, got 1.5"),
    ({"arch_kwargs": {"width": 3}}, r"arch_kwargs: unknown key\(s\) \['width'\] for 'mlp'"),
    ({"arch": "cnn", "arch_kwargs": {"channels": [8, -1]}},
     r"arch_kwargs.channels: must be a list of positive integers, got \[8, -1\]"),
    ({"arch_kwargs": [64]}, r"arch_kwargs: must be a dict of sizes"),
    ({"shape": "star", "depth": 3}, r"depth: a star is roots with direct children only \(depth 1\), got 3"),
    ({"ft_lr": (1e-3, float("inf"))}, r"ft_lr: must be a \(low, high\) pair with 0 < low <= high, finite"),
    # planning these hung (and filled the memory) before anything was said
    ({"trees": 10**11, "children": 9999}, "trees 100000000000, children 9999, depth 2: more than 100,000 models"),
    ({"children": 1, "depth": 10**12}, "children 1, depth 1000000000000: more than 100,000 models"),
    ({"shape": "star", "children": 1000, "merges": 300_000}, "merges: 300000 merged models a tree make 903,003 "
     "models with trees 3, more than 100,000; lower merges or trees"),  # counted only the trained models
    # seeds are reduced to 64 bits: 2**64 built seed 0's zoo, 1.5 seed 1's, with no word (the CLI checked --seed)
    ({"seed": 2**64}, r"seed: must be an integer from -2\*\*63 to 2\*\*63 - 1, got 18446744073709551616"),
    ({"seed": 1.5}, "seed: must be an integer .*, got 1.5"),
    ({"seed": True}, "seed: must be an integer .*, got True"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ZooConfig(**kwargs)


def test_arch_and_preset_errors():
    with pytest.raises(ConfigError, match="arch_kwargs: unknown key"):
        arch_config("mlp", (1, 8, 8), 10, width=3)
    with pytest.raises(ConfigError, match="arch_kwargs.patch_size: 3 does not divide"):
        arch_config("vit", (1, 8, 8), 10, patch_size=3)
    with pytest.raises(ConfigError, match="preset: unknown preset 'huge'"):
        preset("huge")


def test_presets_and_sizes():
    assert {"demo", "lineage-full", "lineage-lora", "vit-small", "probex-digits"} <= set(presets())
    assert preset("demo").n_models == 21
    assert preset("lineage-lora").n_models == 3 * (1 + 3 + 9)
    star = preset("probex-digits")
    assert star.depth == 1 and star.n_models == 1001


def test_roundtrip_dict():
    c = preset("lineage-lora-mixed", seed=5)
    assert ZooConfig.from_dict({**c.to_dict(), "arch_config": {}}) == c


def test_depth_defaults_to_the_shape():
    assert ZooConfig().depth == 2 and ZooConfig(shape="star").depth == 1
    assert preset("probex-digits").depth == 1 and ZooConfig(shape="star", depth=1).n_models == 3 * 3


@pytest.mark.parametrize("kwargs, match", [
    ({"dataset": "nope"}, "^dataset: unknown dataset 'nope'"),
    ({"other_datasets": ("nope",), "task_kinds": ("dataset",)}, "^other_datasets: unknown dataset 'nope'"),
    ({"dataset": "image-folder"}, "^dataset: 'image-folder' needs a folder"),  # said 'pass --data-root'
])
def test_dataset_errors_name_the_key(kwargs, match):
    from modelatlas.zoo import plan_zoo

    with pytest.raises(ConfigError, match=match):
        plan_zoo(ZooConfig(**kwargs))


def test_a_dataset_not_installed_says_zoo_make_takes_no_data_root(monkeypatch):
    from modelatlas.errors import DatasetNotFoundError
    from modelatlas.zoo import plan_zoo

    monkeypatch.delenv("ATLAS_CIFAR10", raising=False)
    with pytest.raises(DatasetNotFoundError, match="^dataset: cifar10: .*takes no --data-root: use the environment"):
        plan_zoo(ZooConfig(dataset="cifar10"))


def test_a_lora_rank_above_every_layer_is_refused_before_training(make_config):
    from modelatlas.zoo.plan import zoo_arch_config

    # hidden 8: embed 64 -> 8, 8 x 8 layers, classifier 8 -> 10; rank 9 adapts no layer at low rank
    with pytest.raises(ConfigError, match=r"lora_ranks: rank 9 is above every adapted layer's smaller side "
                                          r"\(at most 8 for this mlp\); choose ranks <= 8"):
        zoo_arch_config(make_config(method="lora", lora_ranks=(2, 9)))
    assert zoo_arch_config(make_config(method="lora", lora_ranks=(8,)))["hidden"] == 8
    assert zoo_arch_config(make_config(method="full", lora_ranks=(9,)))  # no LoRA child: rank unused


def test_another_arch_drops_the_presets_sizes():
    # tiny's {"hidden": 16, "n_hidden": 2} are an MLP's: 'atlas zoo make --preset tiny --arch vit' said
    # "arch_kwargs: unknown key(s) ['n_hidden'] for 'vit'" about a flag the user never gave
    assert preset("tiny", arch="vit").arch_kwargs == {}
    assert preset("tiny", arch="vit", arch_kwargs={"hidden": 8}).arch_kwargs == {"hidden": 8}
    assert preset("tiny", arch="mlp").arch_kwargs == {"hidden": 16, "n_hidden": 2}


@pytest.mark.parametrize("overrides, key", [(dict(task_sampler="new_head"), "task_sampler"),
                                            (dict(task_kinds=("new_head",)), "task_kinds")])
def test_new_head_tasks_for_lora_children_only_are_refused(make_config, overrides, key):
    """LoRA children keep their head, so `--task-sampler new_head --method lora` (or new_head as the only
    task kind) silently gave every child a class_subset task instead."""
    with pytest.raises(ConfigError, match=f"{key}: .*new_head.* full fine-tunes"):
        make_config(method="lora", **overrides)
    make_config(method="mixed", **overrides)  # full children get new heads, LoRA ones another kind (documented)


def test_the_zoos_own_dataset_as_another_dataset_is_refused(make_config):
    """--other-datasets digits on a digits zoo gave 'dataset' children the task of their root (all 10 classes
    of digits), though children differ from their parent's task."""
    with pytest.raises(ConfigError, match="other_datasets: 'digits' is the zoo's own dataset"):
        make_config(dataset="digits", other_datasets=("mnist5k", "digits"), task_kinds=("dataset",))
