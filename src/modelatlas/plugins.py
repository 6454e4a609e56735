"""Self-registering modules: a registry lists its plugin modules and imports them on first use.

Both the checkpoint-format registry (:mod:`modelatlas.weights.registry`) and the dataset registry
(:mod:`modelatlas.data.registry`) keep built-in readers in modules that register themselves on import;
importing them lazily keeps ``import modelatlas`` cheap and lets a module be absent (a trimmed install).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def import_plugins(package: str, modules: Iterable[str]) -> None:
    """Import ``package.<module>`` for each module; a module that does not exist is skipped, but an
    import error inside an existing module (a missing dependency, a bug) propagates."""
    for mod in modules:
        name = f"{package}.{mod}"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


_DONE: set[str] = set()  # packages whose plugins all imported
_BUSY: set[str] = set()  # packages importing now (a plugin that uses its registry on import)


def load_plugins_once(package: str, modules: Iterable[str]) -> None:
    """:func:`import_plugins` on the first call for ``package``, then nothing; a failed import is tried
    again on the next call, so its error repeats (a registry marked loaded before a failed import read as
    empty afterwards: "unknown dataset" for every dataset). A call made while ``package`` is being loaded
    (from a plugin's own import) returns at once."""
    if package in _DONE or package in _BUSY:
        return
    _BUSY.add(package)
    try:
        import_plugins(package, modules)
        _DONE.add(package)
    finally:
        _BUSY.discard(package)
