"""The dataset registry.

A dataset is an :class:`ArrayDataset`: images as a float32 tensor (N, C, H, W) scaled to [0, 1] (1-D
signals as (N, C, L)), integer labels (N,), and class names. Loaders are registered by name and take the
split (``"train"`` or ``"test"``) plus loader-specific keyword arguments (``root=`` for a folder).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modelatlas.config_types import fits
from modelatlas.errors import ConfigError
from modelatlas.plugins import load_plugins_once
from modelatlas.seeding import SEED_RANGE, is_seed, torch_generator


@dataclass
class ArrayDataset:
    """An in-memory labelled dataset."""

    name: str
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1], or (N, C, L) for 1-D signals
    y: torch.Tensor  # (N,) int64 in [0, num_classes)
    classes: list[str]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("x", "y"):  # a NumPy array failed with "'numpy.ndarray' object has no attribute 'dim'"
            if not isinstance(getattr(self, key), torch.Tensor):
                raise ConfigError(f"dataset {self.name!r}: {key} must be a torch tensor, got "
                                  f"{type(getattr(self, key)).__name__}; wrap NumPy arrays with torch.from_numpy")
        if self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(f"dataset {self.name!r}: {self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.y.dim() != 1 or self.y.dtype.is_floating_point or self.y.is_complex():
            raise ConfigError(f"dataset {self.name!r}: labels must be a 1-D integer tensor, got shape "
                              f"{tuple(self.y.shape)} of {self.y.dtype}")
        if self.y.numel() and int(self.y.min()) < 0:
            raise ConfigError(f"dataset {self.name!r}: label {int(self.y.min())} is negative; labels are class "
                              f"indices 0..{len(self.classes) - 1}")
        if self.y.numel() and int(self.y.max()) >= len(self.classes):
            raise ConfigError(f"dataset {self.name!r}: label {int(self.y.max())} but only {len(self.classes)} classes")
        self.y = self.y.long()  # int32 / int16 labels: torch's losses take int64 only (failed after distilling)
        if not self.x.dtype.is_floating_point:
            raise ConfigError(f"dataset {self.name!r}: inputs must be floating point (images in [0, 1]), got "
                              f"{self.x.dtype}; divide uint8 pixels by 255")
        self.x = self.x.float()  # float64 (NumPy's default) / float16: the networks are float32

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, index: torch.Tensor | list[int]) -> ArrayDataset:
        """The examples at ``index`` (integer indices) or where a boolean mask of ``len(self)`` is true."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:  # cast to long, ds.y == 3 picked examples 0 and 1 N times
            if idx.shape != (len(self),):
                raise ConfigError(f"dataset {self.name!r}: a boolean mask for subset needs {len(self)} entries, "
                                  f"got shape {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        elif idx.numel() and (idx.dtype.is_floating_point or idx.is_complex()):  # 1.7 became example 1
            raise ConfigError(f"dataset {self.name!r}: subset indices must be integers (or a boolean mask), got "
                              f"{idx.dtype}")
        idx = idx.long()  # [] is float32 to torch
        return ArrayDataset(self.name, self.x[idx], self.y[idx], list(self.classes), dict(self.meta))

    def stratified(self, n: int, seed: int) -> ArrayDataset:
        """A seeded subset of ``n`` examples in which every class keeps its share of them (n x its fraction,
        whole numbers by largest remainder: equal counts for balanced classes), in their order here; itself when
        ``n`` >= len(self). The first n examples of a dataset read class by class (an image folder) held its
        first classes only. O(N)."""
        if not fits(n, int) or n < 1:
            raise ConfigError(f"dataset {self.name!r}: a subset needs a positive number of examples, got {n!r}")
        if n >= len(self):
            return self
        exact = torch.bincount(self.y, minlength=self.num_classes).double() * (n / len(self))  # (K,)
        take = exact.floor().long()
        take[torch.argsort(exact - take, descending=True, stable=True)[:n - int(take.sum())]] += 1
        gen = torch_generator(seed)
        kept = [members[torch.randperm(len(members), generator=gen)[:k]]
                for members, k in zip(((self.y == c).nonzero().flatten() for c in range(self.num_classes)), take)]
        return self.subset(torch.cat(kept).sort().values)

    def holdout(self, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
        """(rest, held out): a seeded random ``fraction`` of the examples set aside, e.g. a validation split
        carved from a training split so settings are tuned without reading the test split. O(N)."""
        if not 0 < fraction < 1:
            raise ConfigError(f"dataset {self.name!r}: holdout fraction must be in (0, 1), got {fraction}")
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seed = int(seed)  # np.int64: is_seed takes Python ints
        if not is_seed(seed):  # torch reduces mod 2**64 (2**64 - 1 held out what -1 did); int(1.5) is 1
            raise ConfigError(f"dataset {self.name!r}: holdout seed must be {SEED_RANGE}, got {seed!r}")
        n_held = int(round(fraction * len(self)))
        if n_held in (0, len(self)):  # an empty validation part (or rest) gave no error until far later
            raise ConfigError(f"dataset {self.name!r}: holdout fraction {fraction} of {len(self)} examples sets aside "
                              f"{n_held}, leaving one part empty")
        perm = torch.randperm(len(self), generator=torch_generator(seed))
        return self.subset(perm[n_held:]), self.subset(perm[:n_held])


Loader = Callable[..., ArrayDataset]
_LOADERS: dict[str, Loader] = {}
_DESCRIPTIONS: dict[str, str] = {}
_CHECKS: dict[str, Callable[[], str]] = {}


def register_dataset(name: str, loader: Loader, description: str = "", check: Callable[[], str] | None = None) -> None:
    """Register ``loader(split, **kwargs) -> ArrayDataset`` under ``name``; ``check()`` says, without loading it,
    whether it can be loaded on this machine ("ready", or what it needs: :func:`dataset_status`)."""
    _LOADERS[name] = loader
    _DESCRIPTIONS[name] = description
    if check is not None:
        _CHECKS[name] = check


def dataset_status(name: str) -> str:
    """"ready" when dataset ``name`` loads here with its defaults, else what it needs ("missing: ...",
    "needs root="); "unknown" for a loader registered without a check. Reads no data."""
    _load_plugins()
    check = _CHECKS.get(name)
    return "unknown" if check is None else check()


def module_status(module: str, extra: str = "data") -> str:
    """"ready" when Python package ``module`` is installed, else how to install it (a dataset's check)."""
    import importlib.util

    return "ready" if importlib.util.find_spec(module) is not None else f"missing: pip install modelatlas[{extra}]"


def available_datasets() -> dict[str, str]:
    """Registered dataset names with a one-line description each."""
    _load_plugins()
    return dict(_DESCRIPTIONS)


def load_dataset(name: str, split: str = "train", **kwargs) -> ArrayDataset:
    """Load dataset ``name`` (see :func:`available_datasets`) for ``split`` ("train" or "test")."""
    _load_plugins()
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if name not in _LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(sorted(_LOADERS))}")
    _check_options(name, _LOADERS[name], kwargs)
    return _LOADERS[name](split, **{k: _plain(v) for k, v in kwargs.items()})


def _plain(value: object) -> object:
    """A NumPy integer or float scalar as the Python number (np.int64(3) as 3), as ``holdout`` takes it: the
    option checks refused seed=np.int64(3) as 'not an integer'. Booleans stay (no integer, no fraction)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float, numbers.Integral)):
        return float(value)
    return value


def _check_options(name: str, loader: Loader, kwargs: dict) -> None:
    """Refuse a keyword the loader does not take, naming it and the ones it does (``root``: say so plainly)."""
    params = list(inspect.signature(loader).parameters.values())[1:]  # after ``split``
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    options = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key in options:
            continue
        if key == "root":
            raise ConfigError(f"dataset {name!r} takes no data root (--data-root / root=): it is built in")
        raise ConfigError(f"dataset {name!r} has no option {key!r}; its options: {', '.join(options) or 'none'}")


def check_fraction(dataset: str, key: str, value: object, allow_zero: bool = False) -> None:
    """A loader option that must be a number in (0, 1) (``[0, 1)`` with ``allow_zero``), e.g. ``test_fraction``."""
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if not fits(value, float) or not (low_ok(value) and value < 1):
        span = "[0, 1)" if allow_zero else "(0, 1)"
        raise ConfigError(f"dataset {dataset!r}: {key} must be a number in {span}, got {value!r}")


def check_int(dataset: str, key: str, value: object, minimum: int | None = None) -> None:
    """A loader option that must be an integer (``>= minimum`` when given), e.g. ``size`` or ``seed``."""
    if not fits(value, int) or (minimum is not None and value < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"dataset {dataset!r}: {key} must be an integer{at_least}, got {value!r}")


def check_seed(dataset: str, value: object) -> None:
    """A loader's ``seed`` option (:func:`modelatlas.seeding.is_seed`): torch reduces seeds mod 2**64, so
    2**64 - 1 split exactly as -1 did and 2**64 as 0; seeds outside [-2**63, 2**63) are refused."""
    check_int(dataset, "seed", value)
    if not is_seed(value):
        raise ConfigError(f"dataset {dataset!r}: seed must be {SEED_RANGE}, got {value}")


def _load_digits(split: str, test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn), split by a seeded permutation."""
    from sklearn.datasets import load_digits

    check_fraction("digits", "test_fraction", test_fraction)
    check_seed("digits", seed)
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch_generator(seed))
    n_test = int(round(len(y) * test_fraction))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return ArrayDataset("digits", x[idx], y[idx], [str(i) for i in range(10)], {"source": "sklearn.load_digits"})


register_dataset("digits", _load_digits, "scikit-learn 8x8 digits, 10 classes, 1,797 images (always available)",
                 lambda: "ready")

# Loader modules in this package; each calls register_dataset on import.
_PLUGIN_MODULES = ["idx", "mnist5k", "mnist1d_data", "cifar", "image_folder"]


def _load_plugins() -> None:
    load_plugins_once("modelatlas.data", _PLUGIN_MODULES)
