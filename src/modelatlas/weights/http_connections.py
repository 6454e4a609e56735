"""Persistent HTTP(S) connections for :mod:`.http_ranges`: one kept open per (scheme, host, port) and reused by
the next request; redirects followed here.

``urllib`` opened a connection for every request (a TCP and, over https, a TLS handshake each; lineage of 7
models makes 154 range requests). :func:`get` takes an idle connection to the URL's scheme, host and port from
a process-wide pool (or opens one), sends the GET, and the :class:`Answer` gives the connection back once its
body has been read to the end (a body left unread, as a ``200`` refused before its body, closes it instead). A
request sent on a kept connection that the server has closed meanwhile (its keep-alive timed out:
``RemoteDisconnected``, a broken pipe, a reset) is sent once more on a new connection: a GET of a range can be
repeated; one seen closed as it is taken (a receive that does not wait) is not sent on. Bytes past the end of
an answer (more than its ``Content-Length``) are never read as the next answer: found received with the body
(:attr:`Answer.surplus`), on the kept connection as it is taken, or in place of the next status line, they are a
:class:`SurplusError`, the connection closed. Threads (the prefetch threads of :mod:`.http_ranges` and the
reading one) each take a connection of their own from the pool, which is shared under a lock: one connection
to a host while reads run one after another, at most one per thread reading at once.

Redirects (301, 302, 303, 307, 308; at most 10) are followed with the same headers, as urllib did, except
``Authorization``: the token is put on a hop only when the hop's URL is on ``token_origin`` (scheme, host and
port), so a hub file's redirect to its CDN never carries it; a redirect to a URL that is not http(s) (``file:``)
or from https to plain http is refused (:func:`next_hop`). An answer (its head, then its body) must come at
``progress`` bytes at least per ``timeout`` seconds (:class:`_Paced`; the settings: :func:`http_timeout`,
``ATLAS_HTTP_TIMEOUT``, and :func:`http_progress`, ``ATLAS_HTTP_MIN_RATE``): the socket's timeout alone restarts at each byte received, and a server
sending a byte at a time would hold a read for ever. Proxies come from the environment as urllib took
them (:func:`urllib.request.getproxies`, ``no_proxy``): an https URL through a ``CONNECT`` tunnel, an http one
sent to the proxy by its absolute URL. Time: one round trip a request (a redirect: one more).
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

from modelatlas.weights.http_settings import PROGRESS, http_progress, http_timeout, shown  # noqa: F401  (re-exported)

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10  # as urllib
_MAX_IDLE = 8  # idle connections kept a host: the reading thread and the 4 prefetch threads use at most 5
_DRAINED = 64 * 1024  # an unread body up to this size (an error page, a redirect's) is read off to keep its connection
_DROPPED = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class RedirectError(http.client.HTTPException):
    """Too many redirects, or one to a URL that is not http(s), or from https to http."""


class SurplusError(http.client.HTTPException):
    """Bytes on a kept connection past the end of its last answer (the server sent more than it announced)."""


@dataclass
class _Link:
    """An HTTP connection and how requests are sent on it: by path, or (to an http proxy) by absolute URL."""

    conn: http.client.HTTPConnection
    absolute: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # Proxy-Authorization for an http proxy
    last: str = ""  # the URL of the last answer read on it (named if bytes past its end come)

    def target(self, url: str) -> str:
        parts = urlsplit(url)
        if self.absolute:
            return url.partition("#")[0]
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")  # the path verbatim, "//" kept


_IDLE: dict[tuple[str, str], list[_Link]] = {}
_LOCK = threading.Lock()


def origin_key(url: str) -> tuple[str, str]:
    """(scheme, host[:port]) in lower case: what one connection serves (user info left out)."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.rpartition("@")[2].lower()


def _proxy(scheme: str, netloc: str) -> str | None:
    """The proxy URL the environment gives for ``scheme`` (None when none, or ``no_proxy`` names the host)."""
    proxy = urllib.request.getproxies().get(scheme)
    return None if not proxy or urllib.request.proxy_bypass(netloc) else proxy


def _connect(key: tuple[str, str], timeout: float) -> _Link:
    """A new (not yet opened: it connects at its first request) connection to ``key``, through the proxy the
    environment names for it."""
    scheme, netloc = key
    proxy = _proxy(scheme, netloc)
    if proxy is None:
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return _Link(kind(netloc, timeout=timeout))
    p = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    auth = {}
    if p.username is not None:  # http://user:pass@proxy:3128, as urllib's ProxyHandler reads it
        pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode()}
    host = p.netloc.rpartition("@")[2]
    if scheme == "https":  # a tunnel: the proxy sees the host only, and TLS runs through it to the host
        conn = http.client.HTTPSConnection(host, timeout=timeout)
        conn.set_tunnel(netloc, headers=auth)
        return _Link(conn)
    return _Link(http.client.HTTPConnection(host, timeout=timeout), absolute=True, headers=auth)


def _lease(key: tuple[str, str], timeout: float, fresh: bool) -> tuple[_Link, bool]:
    """(an idle connection to ``key``, True), or (a new one, False) when there is none or ``fresh``."""
    with _LOCK:
        idle = _IDLE.get(key)
        link = idle.pop() if idle and not fresh else None
    if link is None:
        return _connect(key, timeout), False
    link.conn.timeout = timeout  # ATLAS_HTTP_TIMEOUT as it is now
    if link.conn.sock is not None:
        link.conn.sock.settimeout(timeout)
    return link, True


def _give_back(key: tuple[str, str], link: _Link) -> None:
    with _LOCK:
        idle = _IDLE.setdefault(key, [])
        if len(idle) < _MAX_IDLE:
            idle.append(link)
            return
    link.conn.close()


def close_idle() -> None:
    """Close the idle connections kept (they are closed at exit otherwise)."""
    with _LOCK:
        links = [link for idle in _IDLE.values() for link in idle]
        _IDLE.clear()
    for link in links:
        link.conn.close()


class _Paced(io.RawIOBase):
    """A socket's bytes as an answer reads them (its status line, headers and body), ``progress`` bytes at least
    in each ``timeout`` seconds: each receive waits at most what is left of that time, and a TimeoutError says
    when none is left (the socket's timeout alone restarts at each byte: a server sending a byte at a time would
    hold a read for ever). ``progress`` 0: no pace, the socket's timeout alone (the head still in one timeout).
    Time O(1) a receive."""

    def __init__(self, sock, timeout: float, progress: int = PROGRESS):
        self._sock, self._raw, self._timeout = sock, sock.makefile("rb", buffering=0), timeout
        self._progress = progress
        self._start, self._got = time.monotonic(), 0  # the bytes received since ``_start``
        self.head = False  # while the head is read: all of it in one timeout, however fast it comes
        self._looking = False  # (:meth:`waiting`: a receive that does not wait)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        if self._looking:  # None: nothing has come (the reader then has nothing more to give)
            self._sock.settimeout(0)
            try:
                return self._raw.readinto(b)
            except ssl.SSLWantReadError:  # (no whole TLS record yet)
                return None
        now = time.monotonic()
        if self._got >= self._progress and not self.head:  # those came in time: the next ones have the timeout again
            self._start, self._got = now, 0
        left = self._start + self._timeout - now
        if left <= 0:
            raise TimeoutError(f"under {self._progress} bytes in {self._timeout:g} s")
        self._sock.settimeout(left)
        n = self._raw.readinto(b)
        self._got += n or 0
        return n

    def waiting(self, reader: io.BufferedReader) -> int:
        """Bytes ``reader`` (reading this) holds, or the socket has received, that the answer has not read,
        looked at without waiting: 0 when none (or the server closed the connection). Time O(1)."""
        self._looking = True
        try:
            return len(reader.peek(1))
        except OSError:  # (a reset: nothing more will come)
            return 0
        finally:
            self._looking = False
            self._sock.settimeout(self._timeout)

    def close(self) -> None:
        self._raw.close()  # (the socket is closed once the connection and this have let it go)
        super().close()


class _Response(http.client.HTTPResponse):
    """An answer read through :class:`_Paced`, its head (status line and headers, after any number of ``100
    Continue``: a server may send those without end) in one timeout, its body ``progress`` bytes a timeout."""

    def __init__(self, sock, *args, timeout: float, progress: int = PROGRESS, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain reader HTTPResponse made
        self._paced = _Paced(sock, timeout, progress)
        self.fp = io.BufferedReader(self._paced)

    surplus = 0  # bytes received past the body's end (:meth:`_close_conn`)

    def begin(self) -> None:
        self._paced.head = True
        try:
            super().begin()
        finally:
            self._paced.head = False

    def _close_conn(self) -> None:
        """(http.client's, as the body ends or is dropped) Where the body ended where its head said and the
        connection is to be used again, first :attr:`surplus`: the bytes already received past that end
        (:meth:`_Paced.waiting`, no wait), which the reader dropped here holds or the socket has."""
        if self.fp is not None and not self.will_close and not self.length:
            self.surplus = self._paced.waiting(self.fp)
        super()._close_conn()


class Answer:
    """The server's answer to a GET: ``status``, ``reason``, ``headers``, ``url`` (where the redirects ended) and
    :meth:`readinto`. Closing it gives its connection back to the pool when the body was read to its end (or is
    short enough to read off), and closes the connection otherwise."""

    def __init__(self, url: str, key: tuple[str, str], link: _Link, response: http.client.HTTPResponse):
        self.url, self._key, self._link, self._response = url, key, link, response
        self.status, self.reason, self.headers = response.status, response.reason, response.headers

    def readinto(self, b) -> int:
        """Bytes of the body read into buffer ``b`` (fewer only where it ends; 0 at its end), no buffer of the
        server's making; TimeoutError when they come too slowly (:class:`_Paced`)."""
        return self._response.readinto(b)

    @property
    def surplus(self) -> int:
        """Over 0 when bytes came past the body's end with it: the server sent more than it announced (which
        bytes are the body's then?); the connection is closed, never read on."""
        return self._response.surplus

    def close(self) -> None:
        link, r, self._link = self._link, self._response, None
        if link is None:
            return
        try:
            if not r.isclosed() and r.length is not None and r.length <= _DRAINED:
                r.read()
        except (OSError, http.client.HTTPException):
            pass
        # reused only when the whole body came (length 0: a short body read off leaves what is missing), and
        # nothing past it
        if r.isclosed() and not r.will_close and not r.length and not r.surplus:
            link.last = self.url
            _give_back(self._key, link)
        else:
            link.conn.close()

    def __enter__(self) -> Answer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _send(url: str, headers: dict[str, str], timeout: float, progress: int) -> Answer:
    """One GET of ``url`` on a kept connection, sent once more on a new one when the kept one was closed by the
    server (the new one's own failure is raised)."""
    key = origin_key(url)
    for fresh in (False, True):
        link, reused = _lease(key, timeout, fresh)
        try:
            if reused and _stale(link):
                continue  # (closed by the server: sent on a new one)
            link.conn.response_class = functools.partial(_Response, timeout=timeout, progress=progress)
            link.conn.request("GET", link.target(url), headers={**link.headers, **headers})
            return Answer(url, key, link, link.conn.getresponse())
        except _DROPPED:
            link.conn.close()
            if not reused:
                raise
        except (http.client.BadStatusLine, http.client.LineTooLong) as e:  # (RemoteDisconnected is _DROPPED)
            link.conn.close()
            if reused and (isinstance(e, http.client.BadStatusLine) or str(e).endswith("status line")):
                raise _garbled(e, link) from None
            raise
        except BaseException:
            link.conn.close()
            raise
    raise AssertionError("unreachable: the second try opens a new connection")


def _stale(link: _Link) -> bool:
    """True (the connection closed) when the server closed the idle kept connection ``link``; SurplusError when
    it sent bytes on it after its last answer (they would be read as the next answer's); False when neither. Looked
    at without waiting (one receive of at most a byte). Time O(1)."""
    sock = link.conn.sock
    if sock is None:
        return False
    try:
        sock.settimeout(0)
        got = sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):  # nothing came: the connection is as its last answer left it
        return False
    except OSError:  # (a reset)
        got = b""
    finally:
        sock.settimeout(link.conn.timeout)
    link.conn.close()
    if got:
        raise SurplusError(f"the server sent more bytes than it announced in its answer to {shown(link.last)} "
                           "(they came after it on the connection): refused, not read as the next answer")
    return True


def _garbled(e: http.client.HTTPException, link: _Link) -> SurplusError:
    """The error for a kept connection's answer that does not begin with a status line (``e``): the bytes there
    came after the end of the answer before."""
    return SurplusError(f"the server's answer on a kept connection began with {began_with(e)}, not a "
                        f"status line: it sent more bytes than it announced in its answer to {shown(link.last)} "
                        "(refused, not read as the next answer)")


def began_with(e: http.client.HTTPException) -> str:
    """What an answer that is no HTTP answer (``e``: BadStatusLine or LineTooLong) began with, shown tamely."""
    if isinstance(e, http.client.BadStatusLine):
        return shown(repr(e.args[0].strip()))
    return f"{http.client._MAXLINE} bytes without a line end"


def not_http(e: http.client.HTTPException) -> str:
    """The reason for a new connection's answer that does not begin with a status line: another protocol on that
    port (an SSH or SMTP greeting, TLS answering plain http), not a refused connection."""
    return (f"the server's answer is not HTTP (it began with {began_with(e)}, not a status line): is the URL's "
            "scheme (http / https) or port right?")


def next_hop(url: str, location: str) -> str:
    """Where a redirect from ``url`` to ``location`` (its Location header) goes; RedirectError when that is not
    an http(s) URL (``file:``, which would read a local file) or is plain http after https (the bytes could then
    be changed on their way, unseen)."""
    to = urljoin(url, location.strip().replace(" ", "%20"))  # (urllib's leniency for a space)
    scheme = urlsplit(to).scheme.lower()
    if scheme not in ("http", "https"):
        raise RedirectError(f"redirected to {shown(to)}, which is not an http(s) URL")
    if scheme == "http" and urlsplit(url).scheme.lower() == "https":
        raise RedirectError(f"redirected from https to http ({shown(to)}): refused, the file would come unencrypted "
                            "and could be altered on its way")
    return to


def get(url: str, headers: dict[str, str], timeout: float, token_origin: str = "", token: str | None = None,
        progress: int = PROGRESS) -> Answer:
    """The answer to a GET of ``url`` after its redirects (an error status is the caller's to judge), with
    ``Authorization: Bearer token`` on each hop to ``token_origin`` (:func:`origin_key` of a URL) only. Raises
    OSError (``TimeoutError`` after ``timeout`` seconds of silence, or under ``progress`` bytes in that time),
    ``http.client.HTTPException`` (:class:`RedirectError`)."""
    for _ in range(MAX_REDIRECTS + 1):
        own = token is not None and origin_key(url) == token_origin
        answer = _send(url, {**headers, **({"Authorization": f"Bearer {token}"} if own else {})}, timeout, progress)
        location = answer.headers.get("Location")
        if answer.status not in REDIRECTS or not location:
            return answer
        answer.close()
        url = next_hop(url, location)
    raise RedirectError(f"over {MAX_REDIRECTS} redirects (a redirect loop)")
