"""Exact byte ranges of a file served over HTTP(S): one ``Range`` request a range, and no more bytes than it.

The remote twin of :mod:`.byte_ranges` (:class:`HttpRanges` is a :class:`~.byte_ranges.ByteRanges`; its
``read_rows`` reads rows up to :data:`GAP_BYTES` apart as one range, one request, dropping the rows between).
The standard library only (``http.client``, one connection kept open a host: :mod:`.http_connections`):
modelatlas takes no HTTP dependency.

Every answer is checked before its body is read: ``206 Partial Content`` with a ``Content-Range`` of exactly the
bytes asked for, of a file of the size the first answer gave (the file's size is known only from it); a server
that ignores ``Range`` answers ``200`` with the whole file, and is refused before the body is read (lineage of
two 15 GB models reads a ninth of them: a server without ranges would download all 30 GB). Failures are one-line
:class:`~modelatlas.errors.CheckpointError` naming the URL: the HTTP status (401/403 with the ``HF_TOKEN``
hint; 429 with its wait, after a 429 or 503 was asked again twice: :data:`RETRIES`), a timeout
(``ATLAS_HTTP_TIMEOUT`` seconds, 60 by default, also for a body that comes under 1 MiB in that time, or under
``ATLAS_HTTP_MIN_RATE`` bytes a second times that when set: :func:`.http_connections.http_progress`), a body cut
short or of another length than its range, a body sent encoded (gzip: refused, never decoded). A body's memory
follows the bytes received, never a size the server stated before them (:meth:`HttpRanges._read`).

``HF_TOKEN``, when set, is sent as ``Authorization: Bearer`` only to a URL on the hub (``huggingface.co`` or
``$HF_ENDPOINT``: :func:`hub_token`), and there to the scheme, host and port of the URL given only, also after a
redirect (:func:`.http_connections.get`: a hub's file redirects to a CDN, which must not see the token).
Time O(bytes) a read, one round trip a range.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np

from modelatlas.errors import AtlasWarning, CheckpointError, shown_path
from modelatlas.weights.byte_ranges import ByteRanges, memory_limit
from modelatlas.weights.http_connections import (
    PROGRESS,
    Answer,
    RedirectError,
    SurplusError,
    get,
    http_progress,
    http_timeout,
    not_http,
    origin_key,
    shown,
)

_CONTENT_RANGE = re.compile(r"^bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)$")  # (int() of 5,000 digits raises)
_MAX_JSON = 64 * 1024 * 1024  # a shard index is ~100 KB for a 400B model; more is no index
_STEP = 64 * 1024  # a body's first piece: the next ones double with the bytes received
# unwanted bytes read between two wanted rows rather than a second request: a round trip (~10 ms to a hub's CDN)
# takes about as long as 1 MiB arriving at ~100 MB/s
GAP_BYTES = 1 << 20
RETRIES = 2  # a 429 / 503 answer (the server busy) is asked again this many times
RETRY_WAIT = 10.0  # seconds: the longest Retry-After waited for; a longer one is the error (say when to run again)


class HttpError(CheckpointError):
    """The server answered with an HTTP error status ``code`` (404, 403, ...)."""

    def __init__(self, url: str, reason: str, code: int):
        super().__init__(url, reason)
        self.code = code


def hub_token(url: str) -> str | None:
    """``$HF_TOKEN`` for a URL on the Hugging Face hub (``huggingface.co`` or a subdomain, over https) or on
    ``$HF_ENDPOINT``'s scheme, host and port; None for any other host, which must not see a hub token (a URL of
    someone else's server given on the command line would otherwise collect it)."""
    token = os.environ.get("HF_TOKEN") or None
    if token is None:
        return None
    parts, endpoint = urlsplit(url), os.environ.get("HF_ENDPOINT")
    host = (parts.hostname or "").lower()
    on_hub = parts.scheme == "https" and (host == "huggingface.co" or host.endswith(".huggingface.co"))
    return token if on_hub or (endpoint and _origin(endpoint) == _origin(url)) else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{(parts.netloc or '').lower()}"


class HttpRanges(ByteRanges):
    """Byte ranges of the file at ``url``; ``size`` (bytes) is known after the first read. ``fetched`` counts the
    body bytes received (what a benchmark compares with the file's size). Rows less than :data:`GAP_BYTES`
    apart are one request (``read_rows``): 64 evenly spaced rows of a layer were 64 round trips."""

    gap_bytes = GAP_BYTES

    def __init__(self, url: str):
        super().__init__(url)
        self.url, self.size, self.fetched = url, None, 0
        self._token = hub_token(url)
        self._target = url  # where the last request's redirects ended
        self._pending: dict[tuple[int, int], Future] = {}  # (offset, length) -> its prefetch

    def fetch(self, offset: int, length: int, what: str, exact: bool = True,
              into: memoryview | None = None) -> np.ndarray:
        """The ``length`` bytes at ``offset`` (length > 0), from one ``Range`` request; sets :attr:`size` at the
        first. A CheckpointError naming the URL and ``what`` for any answer but exactly those bytes (not
        ``exact``: fewer where the file ends, for the caller to judge). Memory follows the bytes received
        (:meth:`_read`), not ``length``: a header length or a tensor's size comes from the server too; or the
        body is received straight into ``into`` (bytes, ``length`` of them), and its bytes are returned."""
        with self._open_range(offset, length, what) as answer:
            self._check_range(answer, offset, length, what)
            # not exact: the file may end first (its size is known now); a body cut shorter than that is an error
            body = self._body(answer, length if exact else min(length, self.size - offset), what, into)
        with self._lock:  # (a prefetch thread may count at the same time)
            self.fetched += len(body)
        return body

    def take(self, offset: int, length: int, what: str) -> np.ndarray:
        """:meth:`fetch` of the range, or the one :meth:`prefetch` started for it (:meth:`_prefetched`)."""
        body = self._prefetched(offset, length)
        return body if body is not None else self.fetch(offset, length, what)

    def _prefetched(self, offset: int, length: int) -> np.ndarray | None:
        """The bytes :meth:`prefetch` fetched for that range (waited for), None when none was started or it
        failed (the range is asked for again, so that the error names it)."""
        with self._lock:
            started = self._pending.pop((offset, length), None)
        try:
            return None if started is None else started.result()
        except CheckpointError:
            return None

    def read(self, offset: int, length: int, what: str) -> np.ndarray:
        """:meth:`~.byte_ranges.ByteRanges.read` over HTTP: no buffer of ``length`` made before its bytes come
        (:meth:`take`); over this machine's memory and swap, or its container's limit (:func:`.byte_ranges.memory_limit`), the one-line
        error before any request."""
        limit = memory_limit()
        if limit is not None and length > limit[0]:
            raise CheckpointError(self.url, f"{what} is {length} bytes, more than this {limit[1]} "
                                            f"({limit[0]} bytes) can hold")
        return self.take(offset, length, what) if length else np.empty(0, dtype=np.uint8)

    def read_into(self, offset: int, buf: memoryview, what: str) -> None:
        """:meth:`~.byte_ranges.ByteRanges.read_into` over HTTP (``buf`` of bytes): one request whose body is
        received in ``buf`` (no buffer of its own, no copy), or the range :meth:`prefetch` fetched, copied."""
        if not buf.nbytes:
            return
        body = self._prefetched(offset, buf.nbytes)
        if body is None:
            self.fetch(offset, buf.nbytes, what, into=buf)
        else:
            buf[:] = body

    def read_rows(self, offset: int, width: int, rows: np.ndarray, what: str) -> np.ndarray:
        """:meth:`~.byte_ranges.ByteRanges.read_rows` over HTTP, each run of rows received (:meth:`read`) before
        the result is made: a header may state rows of any width. Time O(span) a run."""
        parts = [np.empty((0, width), dtype=np.uint8)]
        for a, b in self._runs(width, rows):
            first, last = int(rows[a]), int(rows[b - 1])
            span = self.read(offset + first * width, (last - first + 1) * width, what).reshape(-1, width)
            parts.append(span if last - first + 1 == b - a else span[rows[a:b] - first])
        return np.concatenate(parts)

    def get_json_bytes(self, what: str) -> bytes:
        """The whole (small) file, by a plain GET: a shard index or a ``config.json``, read before any size is
        known; a body of another length than its ``Content-Length`` is refused."""
        with self._open(self.url, {"Accept-Encoding": "identity"}, what) as answer:
            length = answer.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > _MAX_JSON:
                raise CheckpointError(self.url, f"{what} is {int(length)} bytes, too large for a JSON index or config")
            body = self._read(answer, _MAX_JSON + 1, what)
        if len(body) > _MAX_JSON:
            raise CheckpointError(self.url, f"{what} is over {_MAX_JSON} bytes, too large for a JSON index or config")
        if length is not None and length.strip() != str(len(body)):
            raise CheckpointError(self.url, f"cannot read {what}: the server announced Content-Length "
                                            f"{shown(length)} and sent {len(body)} bytes")
        return body.tobytes()

    def _open_range(self, offset: int, length: int, what: str):
        """The answer to a ``Range`` request of those bytes, sent where the last one's redirects ended (a hub
        file's CDN link: one round trip a range, not two); an HTTP error there (a signed link expired) sends
        it to the URL given again."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
        target = self._target
        try:
            answer = self._open(target, headers, what)
        except HttpError:
            if target == self.url:
                raise
            answer = self._open(self.url, headers, what)
        self._target = answer.url  # (threads may set it at once: each to a place the URL redirects to)
        return answer

    def _open(self, url: str, headers: dict[str, str], what: str) -> Answer:
        """The server's answer to a GET of ``url`` (2xx), or a CheckpointError saying why not. A 429 or 503 is
        asked again up to :data:`RETRIES` times after the wait it names (at most :data:`RETRY_WAIT` s; 1 s when it
        names none), saying so (an :class:`~modelatlas.errors.AtlasWarning`): a hub limits the rate of requests,
        and one answer of that kind ended a lineage over hundreds of them."""
        for attempt in range(RETRIES + 1):
            answer = self._request(url, headers, what)
            if 200 <= answer.status < 300:
                _check_encoding(self.url, answer, what)
                return answer
            answer.close()
            wait = retry_wait(answer.status, answer.headers.get("Retry-After")) if attempt < RETRIES else None
            if wait is None:
                break
            warnings.warn(f"{shown_path(self.url)}: HTTP {answer.status} for {what}; asking again in {wait:g} s",
                          AtlasWarning, stacklevel=2)
            time.sleep(wait)
        if answer.status == 416 and self.size is None:  # bytes 0-7 of a file of under 8 bytes
            raise CheckpointError(self.url, "truncated safetensors file (no header length): the server has no "
                                            f"bytes to give for {what} (HTTP 416)")
        reason = status_reason(answer.status, answer.reason, self._token, answer.headers.get("Retry-After"))
        raise HttpError(self.url, f"cannot read {what}: {reason}", answer.status)

    def _request(self, url: str, headers: dict[str, str], what: str) -> Answer:
        """The server's answer to a GET of ``url``, whatever its status; a CheckpointError where none came."""
        try:
            timeout = http_timeout()
            answer = get(url, {"User-Agent": "modelatlas", **headers}, timeout, origin_key(self.url), self._token,
                         http_progress(timeout))
        except (RedirectError, SurplusError) as e:
            raise CheckpointError(self.url, f"cannot read {what}: {e}") from None
        except (OSError, http.client.HTTPException) as e:  # TimeoutError is an OSError
            if isinstance(e, TimeoutError):
                raise CheckpointError(self.url, f"cannot read {what}: no answer in {http_timeout():g} s (timed "
                                                "out; set ATLAS_HTTP_TIMEOUT to wait longer)") from None
            if isinstance(e, (http.client.BadStatusLine, http.client.LineTooLong)) and not isinstance(e, OSError):
                raise CheckpointError(self.url, f"cannot read {what}: {not_http(e)}") from None  # (RemoteDisconnected:
            raise CheckpointError(self.url, f"cannot read {what}: cannot connect ({e})") from None  # no answer at all)
        return answer

    def _check_range(self, answer, offset: int, length: int, what: str) -> None:
        """An answer of exactly bytes ``offset..offset+length-1``, of a file of the size known (set if not yet)."""
        if answer.status != 206 and "html" in answer.headers.get("Content-Type", ""):
            raise CheckpointError(self.url, "the server sent a web page, not the file (a hub's /blob/ URL gives "
                                            "one): give the file's /resolve/ URL")
        if answer.status != 206:
            raise CheckpointError(self.url, f"the server ignored the Range request for {what} (HTTP "
                                            f"{answer.status}, the whole file{_length_of(answer)}): refused "
                                            "rather than download the whole file; serve it with range requests")
        m = _CONTENT_RANGE.match(answer.headers.get("Content-Range", "").strip())
        if m is None or m[3] == "*":
            raise CheckpointError(self.url, f"the server answered {what} with Content-Range "
                                            f"{shown(repr(answer.headers.get('Content-Range')))}, not 'bytes A-B/SIZE'")
        first, last, total = int(m[1]), int(m[2]), int(m[3])
        if self.size is not None and total != self.size:
            raise CheckpointError(self.url, f"the file changed while read: {total} bytes now, {self.size} when "
                                            "opened")
        self.size = total
        if first != offset or (last != offset + length - 1 and last != total - 1) or not first <= last < total:
            raise CheckpointError(self.url, f"the server sent bytes {first}-{last} for {what}, not the bytes "
                                            f"{offset}-{offset + length - 1} asked for")
        n = answer.headers.get("Content-Length")
        if n is not None and n.strip() != str(last - first + 1):  # (a body that says two sizes: which is wrong?)
            raise CheckpointError(self.url, f"the server answered {what} with Content-Length {shown(n)} for "
                                            f"Content-Range bytes {first}-{last} ({last - first + 1} bytes)")

    def _body(self, answer, length: int, what: str, into: memoryview | None = None) -> np.ndarray:
        """The body, ``length`` bytes exactly (:meth:`_read`, or received in ``into``: :meth:`_readinto`)."""
        body = (self._read(answer, length, what) if into is None
                else np.frombuffer(into, dtype=np.uint8)[:self._readinto(answer, into, what)])
        if len(body) != length:  # the file ends before the range (a header that lies), or the connection broke
            raise CheckpointError(self.url, f"cannot read {what}: got {len(body)} of its {length} bytes (the file "
                                            f"is {self.size} bytes: truncated, or the connection was cut)")
        return body

    def _read(self, answer, limit: int, what: str) -> np.ndarray:
        """Up to ``limit`` bytes of the body (uint8), fewer only where it ends, memory following the bytes that
        came, never a size the server stated before them (a Content-Length, a header length, a tensor's size: a
        server that sent 100 bytes of the 90 MiB it announced had the reader hold 90 MiB): pieces doubling from
        :data:`_STEP` until half the bytes came, only then one buffer of ``limit`` (held: 3 times the bytes
        received at most). Time O(bytes); half of them copied once."""
        parts, got, ended = [np.empty(0, dtype=np.uint8)], 0, False
        while not ended and got < limit and 2 * got < limit:
            piece = self._buffer(min(limit - got, max(_STEP, got)), what)
            n = self._readinto(answer, memoryview(piece), what)
            parts.append(piece if n == len(piece) else piece[:n])
            got, ended = got + n, n < len(piece)
        if ended or got == limit:
            return parts[-1] if len(parts) == 2 else np.concatenate(parts)
        out = self._buffer(limit, what)
        np.concatenate(parts, out=out[:got])
        parts = piece = None  # (freed before the rest comes)
        return out[:got + self._readinto(answer, memoryview(out)[got:], what)]

    def _buffer(self, n: int, what: str) -> np.ndarray:
        try:
            return np.empty(n, dtype=np.uint8)
        except MemoryError:
            raise CheckpointError(self.url, f"cannot read {what}: {n} bytes are more than this machine's memory "
                                            "can hold") from None

    def _readinto(self, answer, view: memoryview, what: str) -> int:
        """Bytes of the body read into ``view``: all of it, fewer only where the body ends."""
        got = 0
        try:
            with view:
                while got < view.nbytes and (n := answer.readinto(view[got:])):
                    got += n
        except TimeoutError:
            raise CheckpointError(self.url, f"cannot read {what}: {_too_slow()}") from None
        except (OSError, http.client.HTTPException) as e:  # IncompleteRead of a chunked body is no OSError
            raise CheckpointError(self.url, f"cannot read {what}: connection broken ({e!r})") from None
        if answer.surplus:  # (found as the body ended: http_connections.Answer.surplus)
            length = answer.headers.get("Content-Length")
            raise CheckpointError(self.url, f"cannot read {what}: the server sent more bytes than the "
                                            f"{shown(length) if length else 'chunks'} its answer announced "
                                            f"({'Content-Length' if length else 'chunked'}): refused, as which "
                                            "bytes are the file's cannot be told")
        return got

    def prefetch(self, offset: int, length: int) -> None:
        """Start fetching the range in one of a few threads shared by all remote files, so that its round trip
        overlaps the caller's work and other requests (lineage announces the next models' layer while it reduces
        one); :meth:`take` (:meth:`read`) or :meth:`read_into` of exactly that range takes it. At most :data:`_PENDING` ranges a file are held;
        never raises."""
        if length <= 0:
            return
        with self._lock:
            if (offset, length) in self._pending or len(self._pending) >= _PENDING:
                return
            self._pending[(offset, length)] = _pool().submit(self.fetch, offset, length, "a prefetched range")

    def close(self) -> None:
        """Drops the prefetched ranges not read (the connections are the pool's: :mod:`.http_connections`)."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for started in pending:
            started.cancel()


_PENDING = 4  # prefetched ranges held a file
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """The threads that fetch prefetched ranges (4: lineage announces at most 3 at a time)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="atlas-http"))
    return _POOL[0]


def _too_slow() -> str:
    """Why a body timed out, and the settings that allow a slower server."""
    timeout = http_timeout()
    progress = http_progress(timeout)
    if not progress:
        return f"the server sent nothing for {timeout:g} s (timed out; set ATLAS_HTTP_TIMEOUT to wait longer)"
    amount = "1 MiB" if progress == PROGRESS else f"{progress} bytes"
    return (f"the server stopped sending, or sent under {amount} in {timeout:g} s (timed out; set "
            "ATLAS_HTTP_TIMEOUT to wait longer, or ATLAS_HTTP_MIN_RATE to a lower number of bytes a second for a "
            "slow link)")


def _length_of(answer) -> str:
    length = answer.headers.get("Content-Length")
    return f" of {length} bytes" if length else ""


def _check_encoding(url: str, answer: Answer, what: str) -> None:
    """Refuses a body sent encoded (``Content-Encoding: gzip``, though ``identity`` was asked for): its bytes are
    not the file's, and decoding them could give any amount (a few KB of gzip make GBs): never decoded."""
    encoding = answer.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        answer.close()
        raise CheckpointError(url, f"cannot read {what}: the server sent it with Content-Encoding "
                                   f"{shown(encoding)}, not decoded here (refused: modelatlas asks for the bytes as "
                                   "they are, Accept-Encoding: identity)")


def retry_wait(code: int, retry_after: str | None) -> float | None:
    """Seconds to wait before asking again after an answer ``code`` (429, 503: the server is busy), from its
    ``Retry-After`` (seconds; 1 s when it gives none or a date); None for another status or a wait over
    :data:`RETRY_WAIT`. O(1)."""
    if code not in (429, 503):
        return None
    text = (retry_after or "").strip()
    wait = float(text) if text.isdigit() and len(text) < 6 else 1.0
    return wait if wait <= RETRY_WAIT else None


def status_reason(code: int, reason: str, token: str | None, retry_after: str | None = None) -> str:
    """An HTTP error status as a reason: 404 not found; 401/403 with what to do about ``HF_TOKEN``; 429 with the
    wait the server asks for; another with the server's reason phrase (:func:`.http_connections.shown`)."""
    if code == 404:
        return "not found (HTTP 404): check the URL (a hub file's URL is .../resolve/REVISION/FILE)"
    if code in (401, 403):
        hint = ("the HF_TOKEN sent was refused: check that it grants access to this model" if token else
                "HF_TOKEN is sent to the hub only (huggingface.co, or the server HF_ENDPOINT names)"
                if os.environ.get("HF_TOKEN") else "a private or gated model needs a token: set HF_TOKEN")
        return f"access denied (HTTP {code}): {hint}"
    if code == 429:
        wait = f"wait {shown(retry_after.strip())} s" if retry_after and retry_after.strip().isdigit() else "wait"
        return f"too many requests (HTTP 429): the server limits the rate of requests; {wait} and run again"
    return f"HTTP {code} {shown(reason)}".rstrip()
