"""Known, user-facing errors.

Every error a user can cause (a bad file, a bad value, a missing dataset) is raised as a subclass of
:class:`AtlasError` with a one-line message that names the file, key or value and, where there is one,
the fix. The CLI's error mapper prints ``error: <message>`` and exits with code 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

# A URL as ``Path`` keeps it: "https://host/a" becomes "https:/host/a" (see modelatlas.weights.remote)
_URL = re.compile(r"^(https?|hf):(/+)(?=[^/])", re.IGNORECASE)
# Each URL given as text, under the form ``Path`` folds it to (its "//" made "/"): a path that held a URL gives
# it back as given (None: two URLs given fold to one, which then names neither). One entry a URL seen.
_GIVEN: dict[str, str | None] = {}


def as_url(text: str | Path) -> str | None:
    """``text`` as a URL (``http://``, ``https://``, ``hf://``), also one that went through ``Path``, which folds
    its ``//`` into ``/``: given that way, the URL as it was first written (``https://h/a//b``, whose ``//`` a
    server may read as a part of the path) when one was seen as text, else as folded; None for anything else.
    Time O(len(text))."""
    plain = _plain(text)
    if plain is None:
        return None
    url, slashes = plain
    if isinstance(text, str) and slashes == "//":  # as written: the URL itself
        folded = _plain(Path(url))[0]
        if _GIVEN.setdefault(folded, url) not in (url, None):
            _GIVEN[folded] = None
        return url
    return _GIVEN.get(url) or url


def _plain(text: str | Path) -> tuple[str, str] | None:
    """(``text`` as a URL with ``://``, the slashes written after its scheme), None for no URL."""
    written = str(text).replace("\\", "/")  # (Path on Windows writes the URL's slashes as backslashes)
    m = _URL.match(written)
    return None if m is None else (f"{m[1].lower()}://{written[m.end():]}", m[2])


def folds_two_urls(text: str | Path) -> bool:
    """Whether ``text`` is a URL as ``Path`` folds it that two URLs given differ from in their ``//`` only
    (``h/a//b`` and ``h/a/b``): which one it stands for cannot be told."""
    plain = _plain(text)
    folded = plain is not None and (plain[1] != "//" or not isinstance(text, str))
    return folded and plain[0] in _GIVEN and _GIVEN[plain[0]] is None


def given_path(text: str | Path) -> Path:
    """``Path(text)``, a URL written in ``text`` remembered as written first (:func:`as_url` gives it back for the
    path, whose ``//`` are folded)."""
    as_url(text)
    return Path(text)


def shown_path(path: str | Path) -> str:
    """``path`` as an error names it: a URL as a URL (:func:`as_url`) with its credentials hidden
    (:func:`redacted`), anything else as ``Path`` writes it."""
    url = as_url(path)
    return redacted(url) if url else str(Path(path))


# query parameters that carry a credential: tokens, presigned URLs' signatures (S3, Azure SAS, GCS)
_SECRET_KEYS = ("token", "access_token", "api_key", "apikey", "key", "password", "sig", "signature",
                "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential")


def redacted(url: str) -> str:
    """``url`` fit for an error line or a log: a password in its user info (``https://user:pass@host``) and the
    values of credential query parameters (:data:`_SECRET_KEYS`) shown as ``***``; the rest as written. O(len)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.partition(':')[0]}:***@{host}"
    path, q, query = tail.partition("?")
    if q:
        query = "&".join(_hidden_value(pair) for pair in query.split("&"))
    return f"{scheme}{sep}{netloc}{slash}{path}{q}{query}"


def _hidden_value(pair: str) -> str:
    """One ``key=value`` of a query, its value ``***`` where the key names a credential. O(len)."""
    key, eq, value = pair.partition("=")
    return f"{key}=***" if eq and value and key.lower() in _SECRET_KEYS else pair


def error_line(e: BaseException) -> str:
    """An exception as one line for a CheckpointError reason: its first non-empty line, else its type."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def same_form(name: str) -> str:
    """``name`` in Unicode NFC form, the form model names are compared in (not shown in: names stay as the file
    system gives them). macOS writes file names decomposed (NFD: e + U+0301, also in its zips), typed text and
    most Linux tools composed: the two spell one name. (Here, not in modelatlas.weights, which imports torch:
    reading an atlas or a forest JSON needs neither.)"""
    return unicodedata.normalize("NFC", name)


class AtlasError(Exception):
    """Base class of every error the CLI reports as one line (exit code 1)."""


class ConfigError(AtlasError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class CheckpointError(AtlasError):
    """A checkpoint cannot be read. The message always starts with the file's path."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{shown_path(path)}: {reason}")


class SettingsMismatchError(CheckpointError):
    """A saved training state was made with another value of a setting than this run's: ``key`` (the
    config field or run key), ``saved`` and ``now`` (its JSON values); ``shown`` writes a value in the
    message. The message names the key; the CLI names the flag that sets it instead (:meth:`with_flag`),
    with the value to pass to continue (a field name alone does not say which flag to change)."""

    def __init__(self, path: str | Path, key: str, saved, now, restart: str, shown=json.dumps):
        self.key, self.saved, self.now, self.restart, self._shown = key, saved, now, restart, shown
        super().__init__(path, self._reason(key, "rerun with the same settings"))

    def _reason(self, name: str, rerun: str) -> str:
        return (f"cannot resume: {name} was {self._shown(self.saved)} in the interrupted run, "
                f"now {self._shown(self.now)}; {rerun}, or {self.restart}")

    def with_flag(self, flag: str) -> str:
        """The message with ``flag`` for the key and the fix: "cannot resume: --rank was 32 in the interrupted
        run, now 8; rerun with --rank 32 to continue it, or train without --resume to start over". No value
        for a setting the saved state does not record (``saved`` None: "--rank null" is none the flag takes)."""
        import shlex

        if self.saved is None:
            return f"{self.path}: {self._reason(flag, 'rerun with the same settings')}"
        value = self.saved if isinstance(self.saved, str) else json.dumps(self.saved)
        rerun = f"rerun with {flag} {shlex.quote(value)} to continue it"
        return f"{self.path}: {self._reason(flag, rerun)}"


class UnknownFormatError(CheckpointError):
    """No reader recognises the file or folder."""


class UnsafeCheckpointError(CheckpointError):
    """The file would execute code when loaded (a pickle with non-tensor globals) and was refused."""


class TensorNotFoundError(CheckpointError, KeyError):
    """A checkpoint has no tensor of the requested name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return f"{shown_path(self.path)}: {self.reason}"


class DatasetNotFoundError(AtlasError):
    """A dataset is not installed; the message says how to install it."""


class ManifestError(AtlasError):
    """A zoo manifest is missing, malformed or inconsistent; the message names the file and key."""


class DivergedError(AtlasError):
    """An optimisation's loss became NaN or infinite; the message says at which step and what to lower."""


class AtlasWarning(UserWarning):
    """Base class of the warnings the library issues (``warnings.warn``; it prints nothing itself): the CLI shows
    each as one ``warning: <message>`` line on stderr (:func:`modelatlas.cli.output.warnings_as_lines`)."""


class DeviceChangeWarning(AtlasWarning):
    """A run checkpointed on one device type resumes on another: it goes on, but is not bit-identical to a run
    kept on the first (the message names both devices)."""


class CacheWarning(AtlasWarning):
    """A kept unit of an unfinished pre-training (an MTT expert, a Teddy pool model) cannot be read or is not one
    of this config: it is trained again (the message names the file)."""


class InterruptWarning(AtlasWarning):
    """Ctrl-C during a checkpointed distillation: the iteration in progress is finished and saved before the run
    stops (:mod:`modelatlas.distill.interrupt`)."""
