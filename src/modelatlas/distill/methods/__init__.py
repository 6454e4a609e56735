"""The method registry: ``get(name)`` -> :class:`MethodSpec`.

Built in: ``random`` (random real subset), ``herding``, ``dc`` and ``dsa`` (gradient matching without /
with differentiable siamese augmentation), ``dm`` (distribution matching). A new method lives in
``methods/<name>/`` (``config.py``, ``method.py``, and an ``__init__.py`` that calls :func:`register`);
:func:`get` imports ``modelatlas.distill.methods.<name>`` on first use, so no list needs editing (aliases
such as ``dsa`` -> ``dc`` live in ``_MODULES``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

from modelatlas.config_types import misfit
from modelatlas.errors import ConfigError

# Method name -> package under modelatlas.distill.methods (when they differ, or to list it in available()).
_MODULES = {"random": "random_subset", "herding": "herding", "dc": "dc", "dsa": "dc", "dm": "dm",
            "mtt": "mtt", "ratbptt": "ratbptt", "podd": "podd", "teddy": "teddy", "hello": "hello"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``run(train, ipc, config, ctx) -> SyntheticSet``; ``eval_kind`` ("sgd" or "adam") and
    ``eval_dsa(config) -> bool`` give the evaluation protocol the method's papers use. ``accepts_init``: the
    method can start from a given synthetic set (``distill(..., init=...)``) instead of real images.
    """

    name: str
    config_cls: type
    run: Callable
    description: str = ""
    eval_kind: str = "sgd"
    eval_dsa: Callable = lambda config: False
    accepts_init: bool = False

    def make_config(self, config=None, **overrides):
        """A config instance from None (defaults), a dict of fields, or an instance (+ overrides)."""
        if config is None:
            config = {}
        if isinstance(config, dict):
            fields = {**config, **overrides}
            known = {f.name for f in dataclass_fields(self.config_cls)}  # not ClassVars (min_iterations)
            bad = sorted(set(fields) - known)
            if bad:
                raise ConfigError(f"method {self.name!r} has no config field {bad[0]!r}; fields: {', '.join(sorted(known))}")
            self._check_types(fields)
            return self.config_cls(**fields)
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"method {self.name!r} expects a {self.config_cls.__name__}, got {type(config).__name__}")
        if overrides:
            from dataclasses import replace

            return replace(config, **overrides)
        return config


    def _check_types(self, fields: dict) -> None:
        """Refuse a value of another type than its config field's annotation (``lr_img="abc"``), naming both."""
        bad = misfit(fields, self.config_cls)
        if bad is not None:
            json_hint = " (--set values are JSON: 0.5, 10, true, null, or plain text)"
            hint = json_hint if isinstance(bad.value, str) else ""
            raise ConfigError(f"method {self.name!r}: config field {bad.key!r} must be {bad.names}, "
                              f"got {bad.value!r}{hint}")


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> None:
    """Add (or replace) a method."""
    _REGISTRY[spec.name] = spec


def _try_import(name: str) -> None:
    if name in _REGISTRY:
        return
    module = _MODULES.get(name, name)
    try:
        importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            raise


def get(name: str) -> MethodSpec:
    """The method called ``name``; imports its package on first use."""
    _try_import(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown distillation method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the methods that can be loaded."""
    for name in _MODULES:
        _try_import(name)
    return sorted(_REGISTRY)
