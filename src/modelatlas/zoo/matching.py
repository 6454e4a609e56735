"""Which given models a zoo manifest holds under another name, so that ``--truth`` scores them too.

A model's name comes from its file or folder (``modelatlas.weights.registry.unique_names``); the manifest
names it as it was built. The two part when a zoo model is given beside another model of the same name
(``zoo/t0`` beside ``other/t0``: both get their folder in their name) or when a zoo model was copied
or renamed (``checkpoints/bert-ft-3`` holding the files of ``t0.2``). Such models were left out of the
score and their edges marked "not in truth". :func:`match_models` finds them again, by name in another
Unicode form first (``café`` as macOS writes it, NFD, and as typed, NFC), by path next (the
same folder or file as a manifest record: no file read), then by the SHA-256 of the weights file that the
manifest records (``atlas zoo verify``'s digest: a byte-identical copy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from modelatlas.weights.base import same_form
from modelatlas.zoo.manifest import Manifest
from modelatlas.zoo.store import weights_digest, weights_file


def match_models(manifest: Manifest, given: Mapping[str, str | Path]) -> dict[str, str]:
    """Manifest name -> given name, for each given model (name -> path) that the manifest does not name but
    holds: its name in another Unicode form (NFC/NFD), the same path as a record (its folder or weights file),
    else the same weights-file digest.
    A manifest model given under its own name is never matched again (a renamed copy of it is a copy,
    which scoring already reads as the named one); of two given models with one digest, the first is
    matched. Time O(N) path checks plus one read of each unnamed given model whose file size is a
    recorded model's (only those can have its digest)."""
    names = set(manifest.names)
    left = {n: Path(p) for n, p in given.items() if n not in names}
    free = [m for m in manifest.models if m.name not in given]
    if not left or not free:
        return {}
    out = _by_form(free, left)
    for match in (_by_path, _by_digest):
        rest = {n: p for n, p in left.items() if n not in out.values()}
        out.update(match(manifest, [m for m in free if m.name not in out], rest))
    return out


def _by_form(free: list, left: Mapping[str, Path]) -> dict[str, str]:
    """Records whose name is a given model's in another Unicode form (a file name macOS wrote NFD, a manifest
    written NFC, or the reverse): the same name, no file read."""
    forms: dict[str, list[str]] = {}
    for n in left:
        forms.setdefault(same_form(n), []).append(n)
    out: dict[str, str] = {}
    for m in free:  # twins (one name spelt two ways) pair up in order, each given model once
        if forms.get(same_form(m.name)):
            out[m.name] = forms[same_form(m.name)].pop(0)
    return out


def _by_path(manifest: Manifest, free: list, left: dict[str, Path]) -> dict[str, str]:
    """Records whose folder or weights file is a given model's path (symbolic links resolved)."""
    where = {}
    for m in free:
        path = manifest.root / m.path
        for p in (path, weights_file(path, m.storage)):
            where[os.path.realpath(p)] = m.name
    out = {}
    for name, p in left.items():
        hit = where.get(os.path.realpath(p))
        if hit is not None and hit not in out:
            out[hit] = name
    return out


def _by_digest(manifest: Manifest, free: list, left: dict[str, Path]) -> dict[str, str]:
    """Records whose recorded digest is a given model's weights-file digest. A file is hashed only when its
    size is a recorded model's own file size (read from the zoo folder's file), so that a folder of
    unrelated checkpoints costs a stat each, not a read; every file is hashed when a recorded model's file is
    missing from the zoo (moved out: its size is unknown, and its new path may be among the given ones)."""
    digests = {m.sha256: m.name for m in free if m.sha256}
    known = [_size(_weights_of(manifest.root / m.path, m.storage)) for m in free if m.sha256]
    sizes = None if None in known else set(known)  # a model moved out of the zoo: its size is unknown
    if not digests:
        return {}
    out = {}
    for name, p in left.items():
        path = _weights_of(p)
        size = _size(path)
        if size is None or (sizes is not None and size not in sizes):
            continue
        hit = digests.get(weights_digest(path))
        if hit is not None and hit not in out:
            out[hit] = name
    return out


def other_weights(manifest: Manifest, given: Mapping[str, str | Path]) -> dict[str, bool]:
    """The given models (name -> path) that the manifest names but whose weights are not the ones it records,
    each with whether its tensors were compared (True: they differ from the zoo's own model's, names, dtypes,
    shapes or values) or only its file (False: the zoo's model file is not there to compare, and the file's
    size or SHA-256 differs from the recorded one, so the same tensors re-saved cannot be told from others).
    A manifest of another zoo whose model names overlap these would score them by name alone. A model at the
    recorded path is the recorded one (``atlas zoo verify`` checks its bytes); one elsewhere is the same when
    its file size and digest are; when they are not, the tensors of both files are compared (a model re-saved
    without its safetensors metadata is no other model). Time O(N) stats plus a read of each model kept
    elsewhere at the recorded size, and of each differing model and its zoo copy up to their first differing
    tensor."""
    out = {}
    for m in manifest.models:
        if m.name not in given or not m.sha256:
            continue
        path, recorded = _weights_of(Path(given[m.name])), _weights_of(manifest.root / m.path, m.storage)
        if os.path.realpath(path) == os.path.realpath(recorded):
            continue
        size, want = _size(path), _size(recorded)
        if size is None or (want is None or size == want) and weights_digest(path) == m.sha256:
            continue
        same = _same_tensors(Path(given[m.name]), manifest.root / m.path) if want is not None else None
        if not same:
            out[m.name] = same is not None
    return out


def _same_tensors(path: Path, recorded: Path) -> bool | None:
    """Whether two models hold the same tensors (names, dtypes, shapes and bytes), whatever else their files
    hold (safetensors metadata, order); None when either cannot be read. Headers first, then tensor by
    tensor, stopping at the first that differs (another zoo's model: its first tensor read, not its file)."""
    from modelatlas.errors import AtlasError
    from modelatlas.weights import open_checkpoint

    try:
        with open_checkpoint(path) as mine, open_checkpoint(recorded) as theirs:
            infos = sorted((t.name, t.dtype, tuple(t.shape)) for t in mine.tensors())
            if infos != sorted((t.name, t.dtype, tuple(t.shape)) for t in theirs.tensors()):
                return False
            return all(_same_bytes(mine.read(name), theirs.read(name)) for name, _, _ in infos)
    except AtlasError:
        return None


def _same_bytes(a, b) -> bool:
    """Whether two tensors of one dtype and shape hold the same bytes (NaNs and -0.0 as stored)."""
    import torch

    a, b = (t.detach().contiguous().reshape(-1) for t in (a, b))
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _weights_of(path: Path, storage: str | None = None) -> Path:
    """The weights file of a model path: the file itself, else the folder's full or adapter weights file."""
    if path.is_file() or storage is not None:
        return path if path.is_file() else weights_file(path, storage)
    full = weights_file(path, "full")
    return full if full.is_file() else weights_file(path, "adapter")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None
