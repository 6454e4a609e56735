"""The models ``atlas lineage recover`` and ``atlas index build`` read: their PATH arguments expanded, paths that
are no models reported and skipped (a path that does not exist: an error), and notes on what was not read
(models one folder down, a zoo stored as adapters). Not a command module: ``main`` does not register it."""

from __future__ import annotations

import os
from pathlib import Path

from modelatlas.cli.output import counted, note
from modelatlas.errors import AtlasError, ConfigError


def expand_paths(paths: list[str], base: str | Path | None = None) -> list[Path]:
    """Model paths from the arguments; a path that is neither a model nor a folder of models is reported
    on stderr and skipped. ``base``: the --base adapters are merged onto (for the note on adapter zoos)."""
    from modelatlas.weights.nested import models_below
    from modelatlas.weights.registry import distinct_models

    found: list[Path] = []
    below: dict[Path, int] = {}
    for p in paths:
        models = discover_or_skip(p, alone=len(paths) == 1)
        found.extend(models)
        below.update(models_below(p, models))
    # once more over all of them: a model reached from two arguments (`zoo/` and `zoo/a.safetensors`) is one
    # model (each argument alone was kept apart, and the run refused "a" as a name given twice)
    found = distinct_models(found)
    _note_below(below, bool(found), paths)
    note_zoo_adapters(found, base)
    return found


def _note_below(below: dict[Path, int], found: bool, paths: list[str]) -> None:
    """Name the sub-folders of the folders given that hold models, which are not read: an error when no model
    was found (it said "no models found"), else a note (a model at the top was compared alone, silently)."""
    if not below:
        return
    where = ", ".join(map(str, list(below)[:3])) + (", ..." if len(below) > 3 else "")
    what = (f"{where} {'holds' if len(below) == 1 else 'hold'} {counted(sum(below.values()), 'model')} one folder "
            f"down (a folder's models are read only directly inside it)")
    eg = f"e.g. {os.path.join(Path(next(iter(below))).parent, '*')}"  # "./*", not a bare "*", for the folder "."
    if not found:
        raise ConfigError(f"no models found in {' '.join(paths)}; {what}: give those folders, {eg}")
    note(f"note: {what}, not read; give those folders too to compare them, {eg}")


def discover_or_skip(path: str | Path, alone: bool) -> list[Path]:
    """The models at ``path``. Among other arguments (not ``alone``), a path that is neither a model nor a folder
    of models is reported on stderr as skipped and gives none; alone, its own error is the one line to print
    (not "skipped" + "no models"), and finding no models is left to the caller's "no models found" error.
    A path that does not exist (a typo, a dangling link) is that error among others too: it was a "skipped:"
    line among the others' output, and the run compared the rest and exited 0."""
    from modelatlas.weights import discover_models

    try:
        models = discover_models([path])
    except AtlasError as e:
        if alone or not os.path.exists(path):  # (a hub id not on disk raises nothing here)
            raise
        note(f"skipped: {' '.join(str(e).split())}")
        return []
    if not models and not alone:
        note(f"skipped: {path}: no models found there")
    return models


def note_zoo_adapters(models: list[Path], base: str | Path | None = None) -> None:
    """On stderr, how to compare the models of a zoo stored as adapters: each holds only its update on its
    parent, which may itself be an adapter (one --base cannot serve them). With ``base``, only for a zoo with
    an adapter whose parent is not that model: a zoo whose adapters all sit on it is compared as it is."""
    zoos: dict[Path, list[Path]] = {}
    for p in map(Path, models):
        if _in_adapter_zoo(p):
            zoos.setdefault(p.parent, []).append(p)
    off = {zoo: _off_base(zoo, adapters, base) for zoo, adapters in sorted(zoos.items())}
    shown = [zoo for zoo, why in off.items() if why is not None]
    if shown:
        why = f", not all on --base: {off[shown[0]]}" if off[shown[0]] else ""
        note(f"note: {', '.join(map(str, shown[:3]))} stores models as LoRA adapters on their parents{why}; "
             f"`atlas zoo merge {shown[0]} --out DIR` writes their full weights to compare")


def _in_adapter_zoo(path: Path) -> bool:
    """Whether ``path`` is an adapter folder inside a zoo; False where it cannot be looked at (no read permission:
    that ended the whole run in a PermissionError; opening the model skips it, saying why)."""
    try:
        return (path / "adapter_config.json").is_file() and (path.parent / "manifest.json").is_file()
    except OSError:
        return False


def _off_base(zoo: Path, adapters: list[Path], base: str | Path | None) -> str | None:
    """None when ``base`` is given and the zoo's manifest puts every one of ``adapters`` on it; else why the
    note applies: "t0.0.0 is on t0.0" for the first adapter on another parent, "" without ``base`` or when
    the manifest cannot say (unreadable, or the adapter or its parent not in it)."""
    from modelatlas.weights.registry import distinct_models
    from modelatlas.zoo.manifest import load_manifest

    if base is None:
        return ""
    try:
        manifest = load_manifest(zoo)
    except AtlasError:
        return ""
    record = {os.path.realpath(manifest.root / m.path): m for m in manifest.models}
    for path in adapters:
        m = record.get(os.path.realpath(path))
        try:
            parent = manifest.root / manifest[m.parent].path
        except (AttributeError, KeyError):  # not in the manifest, or its parent not (a root has none)
            return ""
        if len(distinct_models([Path(base), parent])) > 1:  # (zoo/t0 and zoo/t0/model.safetensors: one model)
            return f"{m.name} is on {m.parent}"
    return None
