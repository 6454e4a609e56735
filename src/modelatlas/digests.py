"""Short digests of data, recorded beside resumable state so that a resume on other data is refused."""

from __future__ import annotations

import hashlib

import torch


def data_digest(*tensors: torch.Tensor) -> str:
    """A short SHA-256 of ``tensors`` (their shapes and float32 values): a resume on other data (a rebuilt
    zoo of the same counts, another dataset of the same size) is refused instead of continuing silently.
    O(data bytes): ~0.75 ms per MB; float32 CPU data is hashed in place (its buffer, not a ``tobytes`` copy,
    which doubled the time and the peak memory)."""
    h = hashlib.sha256()
    for t in tensors:
        t = torch.as_tensor(t).detach().to("cpu", torch.float32).contiguous()  # a copy only when it is not so
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().data)  # the same bytes as tobytes()
    return h.hexdigest()[:16]


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks. O(file bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file_sha256(path, recorded, saved_in: str, fix: str) -> None:
    """Refuse (CheckpointError naming ``path``) a file whose bytes are not those ``saved_in`` (the state file that
    names it) recorded: ``recorded`` its SHA-256, None in a state written before digests (not checked). A missing
    ``path`` passes: its reader names it. O(file bytes)."""
    from pathlib import Path

    from modelatlas.errors import CheckpointError

    if recorded is not None and Path(path).is_file() and file_sha256(path) != recorded:
        raise CheckpointError(path, f"is not the file {saved_in} was saved with (damaged since: its SHA-256 differs); "
                                    f"{fix}")


def files_sha256(folder, names) -> dict[str, str]:
    """{name: SHA-256} of the files ``names`` (paths relative to ``folder``, written with "/"): recorded in a
    folder's index so that a file damaged or edited since is refused by :func:`check_files_sha256`."""
    from pathlib import Path

    return {name: file_sha256(Path(folder) / name) for name in names}


def check_files_sha256(folder, recorded, index_path, fix: str) -> None:
    """Refuse (CheckpointError naming the file) a file of ``folder`` whose bytes are not those ``recorded``
    ({name: SHA-256}, from :func:`files_sha256`; None: an index written before digests, not checked). A
    recorded value that is not such an object, or a name that is no file of ``folder`` (the files were read
    before: a name edited), names ``index_path``."""
    from pathlib import Path

    from modelatlas.errors import CheckpointError

    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise CheckpointError(index_path, f"files_sha256 must be an object of file -> SHA-256; got {recorded!r:.60}; {fix}")
    for name, digest in recorded.items():
        path = Path(folder) / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not _is_file(path):  # (a name too long: OSError)
            raise CheckpointError(index_path, f"files_sha256 names {name!r:.60}, no file of {folder}; {fix}")
        if file_sha256(path) != digest:
            raise CheckpointError(path, f"is not the file {Path(index_path).name} records (damaged or edited since "
                                        f"it was written: its SHA-256 differs); {fix}")


def _is_file(path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name longer than the file system takes
        return False
