"""Type checks of config values: the one rule of what fits a type (:func:`fits`: a bool is no int, an int is a
fine float) and the check of a dataclass's fields against their annotations (:func:`misfit`). Shared by every
config (distill's method configs, evaluation protocol and saved results; attribution, zoo, lineage, ProbeX and
dataset options): each caller words the error (its option, file or key), the rule is one. Here, not in a
subpackage, because those must not import each other."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, NamedTuple


class Misfit(NamedTuple):
    """A field's value that is none of the types its annotation allows."""

    key: str
    value: Any
    allowed: tuple  # the annotation's types: (int, NoneType) for ``int | None``

    @property
    def names(self) -> str:
        """The allowed types as words: "int or None"."""
        return " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t))
                           for t in self.allowed)


def misfit(values: Mapping[str, Any], cls: type) -> Misfit | None:
    """The first of ``values`` (field name -> value) that is not of the type dataclass ``cls`` annotates for
    that field (see :func:`fits`), or None when all fit."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if not any(fits(value, t) for t in allowed):
            return Misfit(key, value, allowed)
    return None


def fits(value: object, t: object) -> bool:
    """Whether ``value`` is of type ``t`` (an int is a fine float; a bool is no int)."""
    if t is type(None):
        return value is None
    if t is float:  # an integer is a fine float (JSON writes 1.0 as 1)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(t) or t
    return not isinstance(origin, type) or isinstance(value, origin)
