"""``ZooConfig``: everything that decides a zoo (same config and seed, bit-identical weights), and presets.

Shapes: ``"tree"`` builds ``trees`` roots, each non-leaf node with ``children`` children, down to ``depth``
levels below the root (``trees * (children**(depth+1) - 1) / (children - 1)`` models); ``"star"`` builds
``trees`` roots with ``children`` direct children each (depth 1; another depth is an error), e.g. 1 root x
1,000 fine-tunes for ProbeX.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from modelatlas.config_types import fits
from modelatlas.errors import ConfigError
from modelatlas.seeding import SEED_RANGE, is_seed

ARCHS = ("mlp", "cnn", "vit")
SHAPES = ("tree", "star")
METHODS = ("full", "lora", "mixed")
STORAGES = ("merged", "adapter")
MERGE_DTYPES = ("float32", "bfloat16")
WEIGHTED_MERGE_KINDS = ("linear", "task_arithmetic", "slerp")  # weighted sums of their parents: the default kinds
SPARSE_MERGE_KINDS = ("ties", "dare_ties", "dare_linear")  # trim or drop values: no weighted sum of their parents
MERGE_KINDS = (*WEIGHTED_MERGE_KINDS, *SPARSE_MERGE_KINDS)  # modelatlas.zoo.merged
# fields added after zoos were first built: a manifest written before lacks them, and at their defaults they are
# left out of the config fingerprint (zoos built then resume)
ADDED_FIELDS = ("merges", "merge_dtype", "merge_kinds")
TASK_KINDS = ("class_subset", "transform", "dataset", "new_head")
_RANGES = ("root_steps", "root_lr", "ft_steps", "ft_lr", "lora_lr")
MAX_MODELS = 100_000  # a zoo of this many models takes days to train on a few cores


@dataclass
class ZooConfig:
    """A zoo: architecture, data, family shape, fine-tuning method and per-model hyperparameter ranges.

    ``*_steps`` / ``*_lr`` are (low, high) ranges; each model draws its own value (steps uniform, lr
    log-uniform) from a seed derived from ``seed`` and its name. ``lora_ranks`` lists the ranks LoRA
    children draw from (several = mixed ranks); ``lora_alpha`` None means alpha = 2 r.
    ``task_sampler`` names a registered sampler (:mod:`modelatlas.zoo.samplers`); the ``"mixed"`` sampler
    draws child tasks of the kinds in ``task_kinds``. ``merges`` adds that many merged models to each tree
    once its models are trained (weighted sums of two or three of them, as mergekit writes: linear, task
    arithmetic, SLERP; :mod:`modelatlas.zoo.merged`), stored in ``merge_dtype``; they cycle through
    ``merge_kinds`` (also mergekit's ``ties``, ``dare_ties`` and ``dare_linear``, which trim or drop values).
    """

    arch: str = "mlp"
    dataset: str = "digits"
    arch_kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # None: the dataset's own (C, H, W)
    shape: str = "tree"
    trees: int = 3
    children: int = 2
    depth: int | None = None  # None: 2 for a tree, 1 for a star (a star has no other depth)
    method: str = "full"
    storage: str = "merged"
    lora_ranks: tuple[int, ...] = (4,)
    lora_alpha: float | None = None
    task_sampler: str = "mixed"
    task_kinds: tuple[str, ...] = ("class_subset", "transform", "new_head")
    transforms: tuple[str, ...] = ("rot90", "hflip", "vflip", "noise", "blur", "shift")
    other_datasets: tuple[str, ...] = ()
    subset_size: int | None = None  # classes per model for "random_class_subset" (None: half)
    root_steps: tuple[int, int] = (250, 350)
    root_lr: tuple[float, float] = (2e-3, 5e-3)
    ft_steps: tuple[int, int] = (60, 120)
    ft_lr: tuple[float, float] = (5e-4, 2e-3)
    lora_lr: tuple[float, float] = (3e-3, 1e-2)
    batch_size: int = 128
    eval_samples: int = 500
    seed: int = 0
    merges: int = 0  # merged models per tree, written after training (modelatlas.zoo.merged)
    merge_dtype: str = "float32"
    merge_kinds: tuple[str, ...] = WEIGHTED_MERGE_KINDS  # the kinds merges cycle through

    def __post_init__(self) -> None:
        for name in ("input_shape", "lora_ranks", "task_kinds", "transforms", "other_datasets", "merge_kinds", *_RANGES):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):  # root_steps=5, not (5, 5)
                    raise ConfigError(f"{name}: must be a list or tuple, got {value!r}")
                setattr(self, name, tuple(value))
        _choice("arch", self.arch, ARCHS)
        _choice("shape", self.shape, SHAPES)
        _choice("method", self.method, METHODS)
        _choice("storage", self.storage, STORAGES)
        _choice("merge_dtype", self.merge_dtype, MERGE_DTYPES)
        if not self.merge_kinds or len(set(self.merge_kinds)) != len(self.merge_kinds):
            raise ConfigError(f"merge_kinds: must be one or more distinct kinds, got {list(self.merge_kinds)!r}")
        for kind in self.merge_kinds:
            _choice("merge_kinds", kind, MERGE_KINDS)
        if self.depth is None:
            self.depth = 1 if self.shape == "star" else 2
        elif self.shape == "star" and self.depth != 1:  # was silently set to 1
            raise ConfigError(f"depth: a star is roots with direct children only (depth 1), got {self.depth!r}; "
                              "use shape 'tree' for deeper families")
        self._check_counts()
        for name in _RANGES:
            _check_range(name, getattr(self, name))
        if not self.lora_ranks or any(not _is_count(r) for r in self.lora_ranks):
            raise ConfigError(f"lora_ranks: must be positive integers, got {self.lora_ranks!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:  # alpha 0: a LoRA child equal to its parent
            raise ConfigError(f"lora_alpha: must be > 0 or None (alpha = 2 r), got {self.lora_alpha!r}")
        if self.subset_size is not None and not _is_count(self.subset_size):
            # 0 used to be read as None (half the classes) by the sampler's `or`
            raise ConfigError(f"subset_size: must be a positive integer or None (half the classes), got {self.subset_size!r}")
        if self.storage == "adapter" and self.method == "full":
            raise ConfigError("storage: 'adapter' needs method 'lora' or 'mixed' (full fine-tunes have no adapter)")
        self._check_tasks()
        _check_arch_kwargs(self.arch, self.arch_kwargs)
        if self.input_shape is not None and (len(self.input_shape) != 3 or min(self.input_shape) < 1):
            raise ConfigError(f"input_shape: must be (C, H, W) with positive sizes, got {self.input_shape!r}")

    def _check_counts(self) -> None:
        """Counts are whole numbers in range and the zoo is of a plannable size (MAX_MODELS)."""
        for name in ("trees", "children", "depth", "batch_size", "eval_samples", "merges"):
            low = 0 if name in ("depth", "merges") else 1  # depth 0: roots only
            value = getattr(self, name)
            if not _is_count(value, low):
                what = "a non-negative" if low == 0 else "a positive"
                raise ConfigError(f"{name}: must be {what} integer, got {getattr(self, name)!r}")
        if not is_seed(self.seed):  # 2**64 built seed 0's zoo, 1.5 seed 1's
            raise ConfigError(f"seed: must be {SEED_RANGE}, got {self.seed!r}")
        if self.merges:
            _check_merges(self.merges, self.children, self.depth)
        if _count_models(self.trees, self.children, self.depth, MAX_MODELS) > MAX_MODELS:
            # planning alone would run for hours and fill the memory: surely a typo
            raise ConfigError(f"trees {self.trees}, children {self.children}, depth {self.depth}: more than "
                              f"{MAX_MODELS:,} models; lower them")
        if self.n_models > MAX_MODELS:  # the merged models too (--merges 300000 planned for hours)
            raise ConfigError(f"merges: {self.merges} merged models a tree make {self.n_models:,} models with trees "
                              f"{self.trees}, more than {MAX_MODELS:,}; lower merges or trees")

    def _check_tasks(self) -> None:
        from modelatlas.zoo.samplers import available_samplers
        from modelatlas.zoo.tasks import TRANSFORMS

        if self.task_sampler not in available_samplers():
            raise ConfigError(f"task_sampler: unknown sampler {self.task_sampler!r}; choose one of {sorted(available_samplers())}")
        for kind in self.task_kinds:
            _choice("task_kinds", kind, TASK_KINDS)
        for t in self.transforms:
            _choice("transforms", t, tuple(TRANSFORMS))
        if not self.task_kinds:
            raise ConfigError(f"task_kinds: must not be empty; choose from {TASK_KINDS}")
        if "dataset" in self.task_kinds and not self.other_datasets:
            raise ConfigError("other_datasets: task kind 'dataset' needs at least one other dataset (e.g. ('mnist5k',))")
        if self.dataset in self.other_datasets:  # its 'dataset' children got their root's task
            raise ConfigError(f"other_datasets: {self.dataset!r} is the zoo's own dataset; 'dataset' tasks train on "
                              "another one (e.g. ('mnist5k',))")
        if "transform" in self.task_kinds and not self.transforms:
            raise ConfigError("transforms: task kind 'transform' needs at least one transform")
        only = "task_sampler" if self.task_sampler == "new_head" else "task_kinds"
        if self.method == "lora" and (self.task_sampler == "new_head" or (
                self.task_sampler == "mixed" and set(self.task_kinds) == {"new_head"})):
            # LoRA children keep the head: every child silently got a class_subset task instead
            raise ConfigError(f"{only}: new_head tasks need full fine-tunes (method 'full' or 'mixed'); LoRA "
                              "children keep their head, so choose another task kind for method 'lora'")

    @property
    def n_models(self) -> int:
        """Number of models this config builds (merged models included)."""
        per_tree = sum(self.children**k for k in range(self.depth + 1))
        return self.trees * (per_tree + self.merges)

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples as lists); :meth:`from_dict` inverts it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ZooConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys (e.g. ``arch_config``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _count_models(trees: int, children: int, depth: int, limit: int) -> int:
    """trees x (1 + children + ... + children**depth), stopping once above ``limit`` (a huge depth would
    otherwise take forever). O(min(depth, limit))."""
    total, level = 0, trees
    for _ in range(depth + 1):
        total += level
        if total > limit:
            break
        level *= children
    return total


def _check_merges(merges: int, children: int, depth: int) -> None:
    """A merge takes two different fine-tuned models of one tree, and no two merges of a tree the same pair
    (two merges of one pair lie on one line: each would be a merge of the other and a parent)."""
    tuned = _count_models(1, children, depth, MAX_MODELS) - 1
    pairs = tuned * (tuned - 1) // 2
    if merges > pairs:
        raise ConfigError(f"merges: {merges} merged models a tree need {merges} pairs of its fine-tuned models, and a "
                          f"tree of children {children}, depth {depth} has {tuned} ({pairs} pairs); lower merges to "
                          f"<= {pairs}" + (" or raise children or depth" if pairs < 3 else ""))


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{name}: unknown value {value!r}; choose one of {list(options)}")


_SIZE_MINIMUM = {"hidden": 1, "n_hidden": 0, "patch_size": 1, "n_layers": 0, "n_heads": 1, "intermediate": 1}


def _check_arch_kwargs(arch: str, kwargs) -> None:
    """Known keys for ``arch``, each an integer in range (``channels`` a list of them), before anything is
    written: a negative or string width used to fail deep in torch, halfway through building a zoo."""
    from modelatlas.zoo.architectures import ARCH_DEFAULTS

    if not isinstance(kwargs, dict):
        raise ConfigError(f"arch_kwargs: must be a dict of sizes, e.g. {ARCH_DEFAULTS[arch]}; got {kwargs!r}")
    unknown = sorted(set(kwargs) - set(ARCH_DEFAULTS[arch]))
    if unknown:
        raise ConfigError(f"arch_kwargs: unknown key(s) {unknown} for {arch!r}; known: {sorted(ARCH_DEFAULTS[arch])}")
    for key, value in kwargs.items():
        if key == "channels":
            ok, what = isinstance(value, (list, tuple)) and all(map(_is_count, value)), "a list of positive integers"
        else:
            low = _SIZE_MINIMUM[key]
            ok, what = _is_count(value, low), "a positive integer" if low else "a non-negative integer"
        if not ok:
            raise ConfigError(f"arch_kwargs.{key}: must be {what}, got {value!r}")


def _is_count(value, low: int = 1) -> bool:
    return fits(value, int) and value >= low  # True is an int, but no count


def _check_range(name: str, value) -> None:
    import math

    if len(value) != 2 or not all(fits(v, float) for v in value) \
            or not 0 < value[0] <= value[1] < math.inf:  # an lr of inf trained NaN weights
        raise ConfigError(f"{name}: must be a (low, high) pair with 0 < low <= high, finite, got {value!r}")


_PRESETS: dict[str, dict] = {
    "tiny": dict(arch_kwargs={"hidden": 16, "n_hidden": 2}, trees=2, children=2, depth=1, method="mixed",
                 root_steps=(30, 40), ft_steps=(10, 15), eval_samples=100),
    "demo": dict(trees=3, children=2, depth=2, method="mixed"),
    "lineage-full": dict(trees=3, children=3, depth=2, method="full"),
    "lineage-lora": dict(trees=3, children=3, depth=2, method="lora", lora_ranks=(4,)),
    "lineage-lora-mixed": dict(trees=3, children=3, depth=2, method="lora", lora_ranks=(2, 4, 8)),
    "lineage-adapter": dict(trees=3, children=3, depth=2, method="lora", storage="adapter", lora_ranks=(4,)),
    "cnn-small": dict(arch="cnn", trees=2, children=2, depth=2, method="mixed"),
    "vit-small": dict(arch="vit", trees=2, children=2, depth=2, method="mixed", root_steps=(300, 400),
                      root_lr=(1e-3, 3e-3), lora_ranks=(4,)),
    "vit-mnist": dict(arch="vit", dataset="mnist5k", arch_kwargs={"patch_size": 7}, trees=2, children=2, depth=2,
                      method="mixed", root_lr=(1e-3, 3e-3), lora_ranks=(4,)),
    "cross-dataset": dict(dataset="mnist5k", other_datasets=("digits", "fashion-mnist"), trees=2, children=3,
                          depth=2, method="mixed", task_kinds=("class_subset", "transform", "dataset", "new_head")),
    "probex-named": dict(shape="star", trees=1, children=500, task_sampler="named_class", method="lora",
                         lora_ranks=(4,), ft_steps=(40, 60), eval_samples=200),
    "probex-digits": dict(shape="star", trees=1, children=1000, task_sampler="random_class_subset",
                          method="full", ft_steps=(40, 60), eval_samples=200),
}


def presets() -> list[str]:
    """Names of the preset zoos."""
    return sorted(_PRESETS)


def preset(name: str, **overrides) -> ZooConfig:
    """The preset config ``name`` with ``overrides`` applied (e.g. ``preset("demo", seed=3)``); another
    ``arch`` without ``arch_kwargs`` drops the preset's sizes (that architecture's defaults apply)."""
    if name not in _PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {presets()}")
    base = dict(_PRESETS[name])
    if overrides.get("arch", base.get("arch", "mlp")) != base.get("arch", "mlp") and "arch_kwargs" not in overrides:
        base.pop("arch_kwargs", None)  # the preset's sizes are another architecture's ('n_hidden' for a ViT)
    return replace(ZooConfig(**base), **overrides)
