"""Known, user-facing errors.

Every error a user can cause (a bad file, a bad value, a missing dataset) is raised as a subclass of
:class:`AtlasError` with a one-line message that names the file, key or value and, where there is one,
the fix. The CLI's error mapper prints ``error: <message>`` and exits with code 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class AtlasError(Exception):
    """Base class of every error the CLI reports as one line (exit code 1)."""


class ConfigError(AtlasError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class CheckpointError(AtlasError):
    """A checkpoint cannot be read. The message always starts with the file's path."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnknownFormatError(CheckpointError):
    """No reader recognises the file or folder."""


class UnsafeCheckpointError(CheckpointError):
    """The file would execute code when loaded (a pickle with non-tensor globals) and was refused."""


class TensorNotFoundError(CheckpointError, KeyError):
    """A checkpoint has no tensor of the requested name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return f"{self.path}: {self.reason}"


class DatasetNotFoundError(AtlasError):
    """A dataset is not installed; the message says how to install it."""


class ManifestError(AtlasError):
    """A zoo manifest is missing, malformed or inconsistent; the message names the file and key."""


class DivergedError(AtlasError):
    """An optimisation's loss became NaN or infinite; the message says at which step and what to lower."""
