"""Format dispatch: which reader opens a path, and which paths inside a folder are models.

Readers register a ``detect(path) -> bool`` and an ``open(path, **kw) -> Checkpoint``; the first that
detects the path wins, in registration order (most specific first). Other modules in this package add
their formats with :func:`register_format` at import time.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modelatlas.errors import CheckpointError, UnknownFormatError, given_path
from modelatlas.plugins import load_plugins_once
from modelatlas.weights.base import (
    Checkpoint,
    _file_stem,
    _stem,
    library_variant,
    named_by_folder,
)
from modelatlas.weights.dequantized import dequantized
from modelatlas.weights.folder_problems import folder_in_place, folder_problem
from modelatlas.weights.folder_problems import orphan_shard as _orphan_shard
from modelatlas.weights.safetensors_format import SafetensorsCheckpoint, is_safetensors
from modelatlas.weights.tool_outputs import refuse_tool_file, refuse_tool_output, tool_file_hint


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., Checkpoint]


_FORMATS: list[Format] = []


def register_format(name: str, detect: Callable[[Path], bool], open: Callable[..., Checkpoint],
                    *, first: bool = False) -> None:
    """Add a reader. ``first=True`` puts it before the existing ones (for more specific layouts)."""
    fmt = Format(name, detect, open)
    _FORMATS[:] = [f for f in _FORMATS if f.name != name]
    _FORMATS.insert(0, fmt) if first else _FORMATS.append(fmt)


def formats() -> list[str]:
    """Names of the registered formats, in dispatch order."""
    _load_plugins()
    return [f.name for f in _FORMATS]


def open_checkpoint(path: str | Path, **kwargs) -> Checkpoint:
    """Open a model file or folder with the first reader that recognises it.

    Raises :class:`~modelatlas.errors.CheckpointError` (naming the path) when it does not exist or no
    reader recognises it. ``kwargs`` go to the reader (e.g. ``base=`` for a LoRA adapter).
    """
    _load_plugins()
    text, path = _as_written(path), Path(path)
    if not path.exists():
        if path.is_symlink():  # a local path wins over a hub id of the same spelling ('zoo/run-c')
            raise missing_error(path)
        return _resolve_missing(path, text, **kwargs)
    try:
        fmt = next((f for f in _FORMATS if f.detect(path)), None)
        unknown = None if fmt is not None else _unknown(path)
    except OSError as e:  # a folder or file that cannot be listed or read (permissions): named, as any bad model
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e
    if unknown is not None:
        raise unknown
    return dequantized(fmt.open(path, **_options_for(fmt, path, kwargs)))


def _unknown(path: Path) -> UnknownFormatError:
    """No reader opens the file or folder ``path``: why (a folder's problem), else what it is instead (a file of a
    model folder, a zoo manifest, one of modelatlas's own outputs), else the formats known."""
    problem = folder_problem(path)
    if problem:
        return UnknownFormatError(path, problem)
    hint = _folder_hint(path)
    return UnknownFormatError(path, "unknown checkpoint format" + (hint or f" (known: {', '.join(formats())})"))


def _folder_hint(path: Path) -> str:
    """For a file of a model folder that is no model itself (``model.safetensors.index.json``, ``config.json``,
    ``adapter_config.json``): that the folder is the model to give; for a zoo's manifest, the zoo; for a file
    modelatlas wrote (an atlas's page, a forest JSON), what it is (:func:`tool_file_hint`)."""
    if not path.is_file():
        return ""
    if path.parent.name and is_model(path.parent):
        return f"; {path.name} is part of the model folder {path.parent}: give the folder"
    if path.name == "manifest.json":
        return f"; {path.name} is a zoo's manifest, not a model: give the zoo folder {path.parent}"
    return tool_file_hint(path)


def _options_for(fmt: Format, path: Path, kwargs: dict) -> dict:
    """The reader options given (None means not given); an option this reader does not take is an error."""
    options = {k: v for k, v in kwargs.items() if v is not None}
    try:
        if options:  # (inspect.signature per model was a fifth of opening 1,000 small files)
            inspect.signature(fmt.open).bind(path, **options)
    except TypeError as e:
        raise CheckpointError(path, f"option(s) {', '.join(sorted(options))} do not apply to a {fmt.name} "
                                    "checkpoint (base= is for LoRA adapter folders)") from e
    return options


# Resolvers open a name that is not a local path (a hub id, a URL): each returns a Checkpoint, None when the name
# is not theirs, or raises CheckpointError when it is theirs but unavailable; with each, its model namer.
_RESOLVERS: list[tuple[Callable[..., Checkpoint | None], Callable[[str], str | None]]] = []


def register_resolver(resolve: Callable[..., Checkpoint | None], name: Callable[[str], str | None] | None = None
                      ) -> None:
    """Add a resolver for names that do not exist as local paths (see hub_cache, remote); ``name(text)`` is the
    model name of a name it claims, None for one it does not (what :func:`discover_models` keeps unexpanded)."""
    if all(r is not resolve for r, _ in _RESOLVERS):
        _RESOLVERS.append((resolve, name or (lambda text: None)))


def _resolve_missing(path: Path, text: str, **kwargs) -> Checkpoint:
    """``text`` (the name as written) opened by the first resolver that claims it, else ``path``'s missing error."""
    for resolve, _ in _RESOLVERS:
        ck = resolve(text, **kwargs)
        if ck is not None:
            return ck
    raise missing_error(path)


def missing_error(path: Path) -> CheckpointError:
    """Why a path that does not exist cannot be opened; for a broken link, where it points."""
    if path.is_symlink():
        return CheckpointError(path, f"a link to {os.readlink(path)}, which does not exist")
    return CheckpointError(path, "no such file or folder")


def _as_written(path: str | Path) -> str:
    """``path`` as the caller wrote it, in ``/`` form: ``./gpt2`` and ``gpt2/`` say a local folder, where
    ``Path`` keeps only ``gpt2``, a hub id (a missing ``./gpt2`` opened the cached gpt2, or was named as an id
    to download)."""
    return path.replace(os.sep, "/") if isinstance(path, str) else Path(path).as_posix()


def _resolved_name(path: str | Path) -> str | None:
    """The model name of a missing ``path`` (as written) that some resolver claims (an ``org/name`` hub id, a
    URL), None when none does."""
    _load_plugins()
    text = _as_written(path)
    return next((n for _, name in _RESOLVERS if (n := name(text)) is not None), None)


def is_model(path: Path) -> bool:
    """Whether some reader recognises ``path`` as one model."""
    _load_plugins()
    return any(fmt.detect(path) for fmt in _FORMATS)


def discover_models(paths: Iterable[str | Path]) -> list[Path]:
    """Expand ``paths`` into model paths: a model file or model folder stays itself; any other folder is
    expanded to the models directly inside it (sorted by name). A missing path raises CheckpointError, except
    a hub id (``org/name[@rev]``), which is kept for :func:`open_checkpoint` to resolve from the local cache.
    A model reached twice (``models/`` and ``models/a.safetensors``, ``./a`` and ``a``, a symlink, a model
    folder and its ``model.safetensors``) is kept once, where it first appears: one model, not two of one name."""
    return distinct_models(_expand(paths))


def distinct_models(paths: Iterable[Path]) -> list[Path]:
    """Model ``paths`` with a model reached twice kept once, where it first appears (see :func:`discover_models`;
    for paths already expanded, which a second expansion could not take: a skipped folder is no folder of models)."""
    seen: set[str] = set()
    kept = []
    for p in paths:
        key = _model_key(p)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def _model_key(path: Path) -> str:
    """What identifies a model: its real path; for a file of a library's standard name inside a model folder
    (``run/model.safetensors`` of the folder ``run``), the folder's: both name one model."""
    if not path.exists():
        return str(path)
    if path.is_file() and named_by_folder(path) and is_model(path.parent):
        return os.path.realpath(path.parent)
    return os.path.realpath(path)


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    """Each path as itself (a model, or a hub id) or the models directly inside it (a folder)."""
    _load_plugins()
    found: list[Path] = []
    for written in paths:
        p = given_path(written)
        if not p.exists() and _resolved_name(written) is not None:
            found.append(p)
            continue
        if not p.exists():
            raise missing_error(p)
        try:
            if is_model(p):
                if p.is_file():
                    refuse_tool_file(p)  # an atlas's embeddings.safetensors: no model of its own
                found.append(p)
            elif p.is_dir():
                refuse_tool_output(p)
                models = _models_in(p)  # a model folder no reader opens: itself, reported when opened
                found.extend(models if models or not folder_problem(p) else [p])
            else:
                raise _unknown(p)
        except OSError as e:  # a folder without read permission: named as open_checkpoint names it (was an OSError)
            raise CheckpointError(p, f"cannot read: {e.strerror or e}") from e
    return found


def _models_in(folder: Path) -> list[Path]:
    """The models directly inside ``folder``; for a sub-folder that is no model, its library-named model files
    (``run/model.onnx``, named ``run``: what ``run`` given alone expands to), else the sub-folder itself when it
    looks like one model no reader opens (:func:`folder_problem`), to be reported when opened. Both were left
    out without a word."""
    found: list[Path] = []
    for c in sorted(folder.iterdir()):
        if c.name.startswith("."):
            continue
        try:
            found.extend(_child_models(c))
        except OSError:  # unreadable (permissions, a dangling link): kept, so that opening it reports why
            found.append(c)  # and skips it, not one bad entry ending the run over a folder of a hundred
    return found


def _child_models(c: Path) -> list[Path]:
    from modelatlas.weights.nested import holds_models

    if c.is_symlink() and not c.exists():  # a model file or folder whose target is gone: reported when opened
        return [c] if _file_stem(c.name) is not None or "." not in c.name else []  # (README.md: no model)
    if is_model(c) and not _orphan_shard(c):
        return [c]
    if c.is_dir() and folder_in_place(c):  # run/adapter_config.json/: run, reported, not its adapter_model alone
        return [c]
    if c.is_dir():
        named = sorted(f for f in c.iterdir() if named_by_folder(f) and is_model(f))
        plain = [f for f in named if library_variant(f.name) is None]  # a variant (.fp16) beside it: its copy
        return plain or named or ([c] if folder_problem(c) and not holds_models(c) else [])
    return []


class OpenMany:
    """Iterate opened checkpoints, reporting and skipping the ones that cannot be opened.

    ``for ck in (models := open_many(paths)): ...`` yields each model that opens and lists its tensors;
    a bad one (missing, corrupt, unsafe, unknown format) is appended to ``models.skipped`` as
    ``(path, one-line message)`` and passed to ``on_error(path, message)`` if given, and the run goes on.
    The caller closes each checkpoint (``with ck:``). Time O(models * header size).
    """

    def __init__(self, paths: Iterable[str | Path], on_error: Callable[[Path, str], None] | None = None,
                 **kwargs):
        self.paths = [given_path(p) for p in paths]  # (a URL's '//' kept: as_url)
        self.on_error = on_error
        self.kwargs = kwargs
        self.skipped: list[tuple[Path, str]] = []

    def __iter__(self) -> Iterator[Checkpoint]:
        for path in self.paths:
            ck = None
            try:
                ck = open_checkpoint(path, **self.kwargs)
                ck.tensors()  # headers of every shard: fail here, not halfway through the caller's loop
            except CheckpointError as e:
                if ck is not None:
                    ck.close()
                self.skipped.append((path, str(e)))
                if self.on_error is not None:
                    self.on_error(path, str(e))
                continue
            yield ck


def open_many(paths: Iterable[str | Path], on_error: Callable[[Path, str], None] | None = None,
              **kwargs) -> OpenMany:
    """Open many models, skipping bad ones; see :class:`OpenMany` (``.skipped`` lists what was skipped)."""
    return OpenMany(paths, on_error, **kwargs)


def model_name(path: str | Path) -> str:
    """A model's display name: its file or folder name without extension (see :func:`unique_names` for many);
    for a hub id that is no local path, the name opening it gives (``org/name``, ``org/name@rev``)."""
    path = Path(path)
    # "Llama-2-7b-hf" alone matched no --truth naming the id; a broken link (zoo/run-c) is a local path
    resolved = None if path.exists() or path.is_symlink() else _resolved_name(path)
    return _stem(path) if resolved is None else resolved


def unique_names(paths: Iterable[str | Path]) -> list[str]:
    """Model names of ``paths``: the file or folder name without extension (:func:`model_name`), and for a name that more than one
    path has, as many parent folders as it takes to tell them apart (``runA/checkpoint-500`` and
    ``runB/checkpoint-500``). Two files of one folder that differ only in extension keep it (``a.pt``,
    ``a.safetensors``). The same path given twice keeps its plain name twice. Time O(N depth)."""
    full = [Path(os.path.abspath(p)) for p in paths]
    leaves = _leaf_names([model_name(p) for p in paths], full)
    names = list(leaves)
    for depth in range(1, 1 + max((len(p.parts) for p in full), default=0)):
        counts = Counter(n for n, _ in set(zip(names, full)))  # distinct paths per name
        clash = [i for i, n in enumerate(names) if counts[n] > 1]
        if not clash:
            break
        for i in clash:
            above = full[i].parent.parent if named_by_folder(full[i]) else full[i].parent
            names[i] = "/".join([*above.parts[1:][-depth:], leaves[i]])  # (the root "/" is no name)
    return names


def _leaf_names(stems: list[str], full: list[Path]) -> list[str]:
    """``stems``, except where two paths in one folder share one (``a.pt`` and ``a.safetensors``): no parent
    folder tells those apart (their names went up to the file system's root, then were refused as the same),
    so they keep their file names (``run/model.safetensors`` for a file named by its folder ``run``)."""
    per_folder = Counter((n, f.parent) for n, f in set(zip(stems, full)))  # distinct paths per (stem, folder)
    return [(f"{n}/{f.name}" if named_by_folder(f) else f.name) if per_folder[(n, f.parent)] > 1 else n
            for n, f in zip(stems, full)]


register_format("safetensors", is_safetensors, SafetensorsCheckpoint)

def _load_plugins() -> None:
    """Import the optional format modules (they call register_format); a missing one is skipped."""
    load_plugins_once("modelatlas.weights", _PLUGIN_MODULES)


# Format modules, most specific first; each registers itself on import. Optional dependencies
# (onnx, gguf) are imported lazily inside their readers, so listing them here costs nothing.
_PLUGIN_MODULES = ["hf_folder", "peft_lora", "torch_pickle", "onnx_format", "gguf_format", "hub_cache", "remote"]
