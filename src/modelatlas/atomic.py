"""Atomic file output: write to a temporary file in the same folder, then rename (and
:func:`read_tensors`, the checked reader of what :func:`atomic_save_tensors` writes).

A crash or Ctrl-C mid-write leaves either the old file or the new one, never a truncated mix, so a user's
results and resumable checkpoints are never lost. ``os.replace`` is atomic on POSIX and Windows when source
and destination are on the same file system, which writing the temporary file beside the target ensures.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from modelatlas.errors import AtlasError, ConfigError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; returns ``path``.

    ``write`` receives a fresh temporary path in the target's folder. On any exception the temporary file
    is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_path(path)
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: never reuse a file
    except OSError as e:
        _raise_about(e, path, tmp_path)
    # the mode open() gives, 0666 less the umask (mkstemp's 0600 would survive the rename: an atlas.html or
    # result folder others cannot read)
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        write(tmp_path)
        os.chmod(tmp_path, mode)  # a writer may replace the file with its own (safetensors' is 0600)
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        _raise_about(e, path, tmp_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _temp_path(path: Path) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: a hidden file beside it that names its writer (a hash of
    this machine's name and the process id), so that :func:`remove_stale_temp_files` tells a killed writer's
    file from one still being written."""
    return path.parent / f".{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _host() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


# a temporary file of atomic_write: ".<name>.<host>-<pid>-<hex>.tmp" (before session 40: ".<name>.<hex>.tmp")
_TEMP = re.compile(r"^\..+\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]+\.tmp$")
STALE_AFTER_S = (60, 3600)  # untouched this long: of a gone process of this machine; of any other writer


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when its process was killed (SIGTERM,
    as a scheduler's time limit or ``timeout`` sends, SIGKILL, a crash: no clean-up ran), and return them: those
    of a process of this machine that is gone, untouched for a minute, and any other untouched for an hour.
    Another run's write in progress is kept (its file changes as it is written and is renamed at once).
    O(files in the folder)."""
    import time

    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no folder yet
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        try:
            same = m is not None and m["host"] == _host() and os.name != "nt"  # (Windows: os.kill(pid, 0) is Ctrl-C)
            if m is None or same and _alive(int(m["pid"])):
                continue
            if time.time() - p.stat().st_mtime > STALE_AFTER_S[0 if same else 1]:
                p.unlink()
                removed.append(p)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine exists (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists
        return True
    return True


def _raise_about(e: OSError, path: Path, tmp_path: Path) -> NoReturn:
    """Raise ``e`` naming the destination the user asked for, not the hidden temporary file (or no file: a
    full disk); an error about another file (one the writer reads) is raised as it is."""
    if e.filename not in (None, str(tmp_path), tmp_path) or e.errno is None:
        raise e
    raise type(e)(e.errno, e.strerror or str(e), str(path)) from e


def file_in_the_way(path: str | Path) -> Path | None:
    """``path`` itself or the nearest folder above it that exists but is not a folder (a file), or is a symbolic
    link to nothing (a folder cannot be made through it), or None: an output folder there fails as 'Not a
    directory' or 'File exists' only when the first file is written."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()
                 or p.exists() and not p.is_dir()), None)


def check_out_folder(path: str | Path, name: str, fix: str, error: type[AtlasError] = ConfigError) -> None:
    """Refuse, before any work, an output folder ``path`` that is a file or lies below one, or where no file can
    be made (:func:`unwritable`): ``error`` says "``name`` is a file" or "``name`` lies below the file ...", then
    "not a folder; ``fix``", or "``name`` cannot be written: no file can be made in F (why); ``fix``"."""
    file = file_in_the_way(path)
    if file is not None:
        where = f"is {not_a_folder(file, False)}" if file == Path(path) else f"lies below {not_a_folder(file)}"
        raise error(f"{name} {where}, not a folder; {fix}")
    denied = unwritable(path)
    if denied is not None:
        raise error(f"{cannot_write(name, denied)}; {fix}")


def unwritable(path: str | Path) -> tuple[Path, OSError] | None:
    """The nearest existing folder at or above ``path`` (an output folder, or the folder of an output file) with
    the error of making a file in it (a read-only mount, no permission, ``/proc``), or None where one can be
    made: a command writing there failed only after its whole work. Tried, not asked: a hidden empty file is
    made and removed (``os.access`` says yes to root everywhere, ``/proc`` too). Call after
    :func:`file_in_the_way`."""
    folder = next((p for p in (Path(path), *Path(path).parents) if p.is_dir()), Path("."))
    probe = folder / f".atlas-write-check.{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        return folder, e
    probe.unlink(missing_ok=True)
    return None


def cannot_write(what: str, denied: tuple[Path, OSError]) -> str:
    """'``what`` cannot be written: no file can be made in F (Permission denied)', for :func:`unwritable`."""
    folder, e = denied
    why = "it takes no new files" if e.errno == errno.ENOENT else e.strerror or e  # /proc: 'No such file'
    return f"{what} cannot be written: no file can be made in {folder} ({why})"


def not_a_folder(path: Path, named: bool = True) -> str:
    """What :func:`file_in_the_way` found: 'the file P' or 'the symbolic link P to the missing T'; not
    ``named``, 'a file' or 'a symbolic link to the missing T'."""
    if path.is_symlink() and not path.exists():
        return f"{'the' if named else 'a'} symbolic link{f' {path}' if named else ''} to the missing {os.readlink(path)}"
    return f"the file {path}" if named else "a file"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


# A file name's bytes that are not UTF-8 reach Python as lone surrogates (b"m\xe9" is "m\udce9"), which UTF-8
# cannot encode: text shows them as the escape of the byte they stand for (\xe9), other lone surrogates as \ud800
SURROGATE_ESCAPES = {c: f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c < 0xDD00 else f"\\u{c:04x}" for c in range(0xD800, 0xE000)}


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; a lone surrogate (a model named by a file name that is not
    UTF-8, in a DOT graph or HTML page) is written as its escape (``\\xe9``, :data:`SURROGATE_ESCAPES`): it
    ended the write in a UnicodeEncodeError after the whole command."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = text.translate(SURROGATE_ESCAPES).encode("utf-8")
    return atomic_write_bytes(path, data)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Serialise ``obj`` as JSON and write it atomically (serialisation errors leave no file behind). Text is
    ASCII with ``\\u`` escapes, so a lone surrogate (a file name that is not UTF-8) is kept as ``\\udce9`` and
    reads back as the same name."""
    text = json.dumps(obj, indent=indent, sort_keys=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def atomic_save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a dict of torch tensors as safetensors, atomically. Tensors are made contiguous on the CPU."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def read_tensors(path: str | Path, hint: str = "") -> dict:
    """The tensors of a safetensors file the project wrote (a cache, a checkpoint of a run, a saved set).

    A missing or unreadable file raises :class:`~modelatlas.errors.CheckpointError` naming it, with ``hint``
    (what to do about it) appended."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from modelatlas.errors import CheckpointError
    from modelatlas.weights.base import error_line, utf8_path

    tail = f"; {hint}" if hint else ""
    if not Path(path).is_file():
        raise CheckpointError(path, f"missing{tail}")
    try:
        with utf8_path(Path(path)) as readable:  # an output folder named by bytes that are not UTF-8
            return load_file(readable)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"unreadable ({error_line(e)}){tail}") from None


def peek_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``, None when it is missing, unreadable, not JSON or another JSON value: for
    telling whose file a path holds (a forest, a zoo manifest, another command's state) without failing."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_json_object(path: str | Path, missing: str, what: str) -> dict:
    """The JSON object in ``path`` (a settings or index file the project wrote), for a loader. Every failure
    is a :class:`~modelatlas.errors.CheckpointError`: ``missing``, said of the folder, when the file is
    absent; "cannot read: ..." naming the file when it is unreadable or not JSON; "not ``what`` (a JSON
    list, not an object)" when it holds another JSON value."""
    from modelatlas.errors import CheckpointError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(path.parent, missing) from e
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot read: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(path, f"not {what} (a JSON {type(data).__name__}, not an object)")
    return data


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy scalars/arrays, paths and tensors."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")
