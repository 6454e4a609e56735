"""Models one folder down: what :func:`~modelatlas.weights.discover_models` does not read.

A folder is expanded to the models directly inside it, so a folder of runs (``runs/a/epoch1.safetensors``,
``output/run1/checkpoint-500/``) gave "no models found", or, beside one model at its top, that model alone,
without a word of the others. :func:`models_below` finds them, for the command line to name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from modelatlas.errors import AtlasError


def models_below(folder: str | Path, found: Iterable[Path]) -> dict[Path, int]:
    """The sub-folders of ``folder`` that hold models directly inside them which are not among ``found`` (the
    models ``folder`` expanded to), each with how many; {} for a model, a path that is no folder or one that
    cannot be listed. Hidden sub-folders are not looked into; links whose target is gone are not counted.
    Time O(entries of ``folder`` and of its sub-folders)."""
    from modelatlas.weights.registry import discover_models, is_model

    folder = Path(folder)
    try:
        if not folder.is_dir() or is_model(folder):
            return {}
        children = sorted(c for c in folder.iterdir() if not c.name.startswith("."))
    except OSError:
        return {}
    taken = {os.path.realpath(p) for p in found}
    out = {}
    for child in children:
        try:
            if child.is_symlink() or not child.is_dir() or os.path.realpath(child) in taken:
                continue
            n = sum(os.path.realpath(m) not in taken and not _dangling(m) for m in discover_models([child]))
        except (AtlasError, OSError):  # an atlas, a folder that cannot be listed: not a folder of models to name
            continue
        if n:
            out[child] = n
    return out


def _dangling(path: Path) -> bool:
    """A link whose target is gone: no model to count (opening it reports it and skips it)."""
    return path.is_symlink() and not path.exists()


def holds_models(folder: Path) -> bool:
    """Whether a model is directly inside ``folder`` (there, not a dangling link): a folder of models, whatever
    else it holds (a dangling link made it one broken model, which recovery then read as a folder of models)."""
    from modelatlas.weights.registry import _orphan_shard, is_model

    return any(not c.name.startswith(".") and c.exists() and is_model(c) and not _orphan_shard(c)
               for c in folder.iterdir())
