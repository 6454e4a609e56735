"""A local HTTP server for the tests of reading checkpoints over HTTP (tests/weights/test_remote.py): serves a
folder on 127.0.0.1 with ``Range`` support, counting the body bytes it sends and recording each request's
headers. ``mode`` makes it misbehave: "ignore" (answers 200 with the whole file, as a server without ranges;
"page": as a web page),
"stall" (waits ``stall`` seconds before answering), "short" (sends half of a range's bytes, then closes),
"redirect" (302 to ``target`` + ``/to`` + the same path; any server serves ``/to/x`` as ``x``), an HTTP status code to answer every request with,
or a callable ``mode(handler, data, first, last)`` that writes the raw answer to the file's bytes ``data`` (``first``,
``last``: the range asked for, None without one) itself.
It speaks HTTP/1.1 and keeps a connection open for the next request (``connections`` counts those it accepted);
"drop" closes each connection after one answer without saying so (as a server whose keep-alive timed out).
``tls`` (a server context: :func:`make_tls`) serves https."""

import re
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from modelatlas.weights.http_connections import close_idle

_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send its next request on the same connection
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle held the body ~40 ms a request

    def log_message(self, *args):  # quiet: the tests read their own output
        pass

    def do_GET(self):  # noqa: N802 - the name http.server calls
        srv = self.server
        srv.seen.append((self.path, dict(self.headers)))
        path = re.sub(r"^https?://[^/]*", "", self.path)  # (as a proxy: the absolute URL)
        if srv.mode == "stall":
            time.sleep(srv.stall)
        moved = path.startswith("/to/")  # where a redirect sends a file: served as the file itself
        if srv.mode == "redirect" and not moved:
            return self._answer(302, {"Location": srv.target + "/to" + path})
        if isinstance(srv.mode, int):
            return self._answer(srv.mode, {}, b"denied")
        file = srv.root / path.removeprefix("/to").lstrip("/").split("?")[0]
        if not file.is_file():
            return self._answer(404, {}, b"no such file")
        data = file.read_bytes()
        m = _RANGE.match(self.headers.get("Range", ""))
        if callable(srv.mode):
            self.close_connection = True  # (what it wrote may not end where its headers say)
            return srv.mode(self, data, *((int(m[1]), int(m[2])) if m else (None, None)))
        if m is None or srv.mode in ("ignore", "page"):
            return self._answer(200, {"Content-Type": "text/html"} if srv.mode == "page" else {}, data)
        first, last = int(m[1]), min(int(m[2]), len(data) - 1)
        if first >= len(data):
            return self._answer(416, {"Content-Range": f"bytes */{len(data)}"})
        body = data[first:last + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}", "Content-Length": str(len(body))}
        self._answer(206, headers, body[: len(body) // 2] if srv.mode == "short" else body, length=False)
        self.close_connection = self.close_connection or srv.mode in ("short", "drop")  # (short: the body ends)

    def _answer(self, code, headers, body=b"", length=True):
        self.send_response(code)
        for key, value in {**({"Content-Length": str(len(body))} if length else {}), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.server.served += len(body)  # before it is sent: after, the client may have read it and asked first
        try:
            self.wfile.write(body)
        except OSError:  # the client hung up on the body (a 200 it did not ask for)
            pass


class make_server(ThreadingHTTPServer):  # noqa: N801 - a test helper, named like the others
    """``with make_server(folder) as srv: srv.url("a.safetensors")``; ``srv.served`` counts body bytes sent."""

    daemon_threads = True

    def __init__(self, root: Path, mode="range", target: str = "", stall: float = 0.0,
                 tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scheme = "http" if tls is None else "https"
        if tls is not None:  # each connection's TLS handshake at its accept()
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.root, self.mode, self.target, self.stall = Path(root), mode, target, stall
        self.served, self.seen, self.connections = 0, [], 0
        self._thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)  # quick to shut
        self._thread.start()

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def verify_request(self, request, client_address):  # called once a connection is accepted
        self.connections += 1
        return True

    def handle_error(self, request, client_address):  # a client that hung up: no traceback on stderr
        pass

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        close_idle()  # the client's kept connections to it (a later server on its port must not get them)


def make_tls(folder: Path) -> tuple[ssl.SSLContext, Path] | None:
    """(a server context, its certificate file) for 127.0.0.1, self-signed, made in ``folder`` with the ``openssl``
    command, else the ``cryptography`` package; None when neither is here. A client trusts it through
    ``SSL_CERT_FILE`` (OpenSSL's default verify paths, which http.client's default context reads)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    elif not _certificate_by_cryptography(key, cert):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def _certificate_by_cryptography(key: Path, cert: Path) -> bool:
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return False
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    made = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(private, hashes.SHA256()))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    cert.write_bytes(made.public_bytes(serialization.Encoding.PEM))
    return True
