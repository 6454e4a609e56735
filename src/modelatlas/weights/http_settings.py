"""The HTTP reader's settings from the environment (``ATLAS_HTTP_TIMEOUT``, ``ATLAS_HTTP_MIN_RATE``), and what
of a server's text an error shows (:func:`shown`). Split from :mod:`.http_connections`, which uses both."""

from __future__ import annotations

import math
import os

from modelatlas.errors import CheckpointError, redacted

PROGRESS = 1 << 20  # bytes an answer must send in the timeout by default (60 s: 17 KiB/s at least)
_SHOWN = 100  # characters of what a server says (a reason, a Location) shown in an error


def http_timeout() -> float:
    """Seconds one request may wait for the server: ``$ATLAS_HTTP_TIMEOUT``, 60 by default."""
    return _setting("ATLAS_HTTP_TIMEOUT", "a number of seconds over 0", positive=True) or 60.0


def http_progress(timeout: float) -> int:
    """Bytes an answer must bring in each ``timeout`` seconds (:class:`_Paced`):
    ``$ATLAS_HTTP_MIN_RATE`` (bytes a second, for a slow link) times the timeout, rounded up; 0 for a rate of 0
    (no pace: only ``timeout`` seconds of silence time out); :data:`PROGRESS` (1 MiB: 17 KiB/s at the default
    timeout) when unset."""
    rate = _setting("ATLAS_HTTP_MIN_RATE", "a number of bytes a second, 0 or more")
    return PROGRESS if rate is None else math.ceil(rate * timeout)


def _setting(name: str, what: str, positive: bool = False) -> float | None:
    """The number environment variable ``name`` holds (None when unset or empty); a one-line CheckpointError
    naming it and its value when that is not ``what`` (a finite number, 0 or more; over 0 if ``positive``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise CheckpointError(name, f"must be {what}, not {shown(repr(text))}")
    return value


def shown(text: str) -> str:
    """What a server sent (a reason phrase, a URL), fit for a one-line error: a URL's credentials hidden
    (:func:`~modelatlas.errors.redacted`: a redirect to a presigned CDN link carries its signature), printable
    ASCII only (no terminal escape sequences), at most :data:`_SHOWN` characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in redacted(text))
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."
