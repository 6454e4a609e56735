"""A server that sends more bytes than an answer's Content-Length on a kept connection
(modelatlas.weights.http_connections): the bytes past the body's end are found where that is cheap (already
received with the body, waiting on the connection when it is next used, or in place of the next answer's status
line) and refused in one line naming the URL; never read as the next answer, never a "cannot connect"."""

import select
import threading

import pytest
from tests.weights.http_server import make_server
from tests.weights.test_http_adversarial import answer, ranged
from tests.weights.test_remote import check_refused, make_file

from modelatlas.errors import CheckpointError
from modelatlas.weights import http_connections
from modelatlas.weights.http_ranges import HttpRanges


@pytest.fixture(autouse=True)
def _no_token_nor_proxy(monkeypatch):
    for name in ("HF_TOKEN", "ATLAS_HTTP_TIMEOUT", "ATLAS_HTTP_MIN_RATE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_bytes_sent_with_the_body_past_its_length_are_refused(tmp_path):
    # they were dropped unseen with the answer's read buffer, and the body taken
    make_file(tmp_path)

    def extra(handler, data, first, last):
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last + 1] + b"EXTRA", keep=True)

    with make_server(tmp_path, mode=extra) as srv:
        check_refused(srv.url("a.safetensors"), "cannot read the header length: the server sent more bytes than "
                      "the 8 its answer announced (Content-Length)")
        assert len(srv.seen) == 1


def fake_answer(data: bytes, first: int, last: int) -> bytes:
    """A whole answer of wrong bytes (zeros) for bytes first-last: what must never be read as an answer."""
    head = "".join(f"{k}: {v}\r\n" for k, v in ranged(data, first, last).items())
    return f"HTTP/1.1 206 Partial Content\r\n{head}\r\n".encode() + b"\0" * (last - first + 1)


def test_bytes_that_come_after_the_body_are_refused_at_the_next_request(tmp_path):
    # a whole answer sent after the body, once the client has read it, was taken as the answer to its next request
    make_file(tmp_path)
    sent = []

    def late(handler, data, first, last):
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last + 1], keep=True)
        if not sent:  # (wait for the client to have read the body and kept the connection)
            handler.server.go.wait(5)
            handler.wfile.write(fake_answer(data, 8, 11))
            sent.append(first)

    with make_server(tmp_path, mode=late) as srv:
        srv.go = threading.Event()
        url = srv.url("a.safetensors?token=s3cr3t")
        ranges = HttpRanges(url)
        assert ranges.fetch(0, 8, "the header length").tobytes() == (tmp_path / "a.safetensors").read_bytes()[:8]
        [link] = http_connections._IDLE[http_connections.origin_key(url)]
        srv.go.set()
        assert select.select([link.conn.sock], [], [], 5)[0]  # the fake answer waits on the kept connection
        with pytest.raises(CheckpointError) as e:
            ranges.fetch(8, 4, "the header")
        message = str(e.value)
        shown = srv.url("a.safetensors?token=***")
        assert message.startswith(shown + ": cannot read the header: the server sent more bytes than it announced "
                                  "in its answer to " + shown), message
        assert len(srv.seen) == 1  # not asked: the connection held the surplus


@pytest.mark.parametrize(("extra", "start"), [
    (b"EXTRA", "'EXTRAHTTP/1.1 206 Partial Content'"), (b"x" * 70000, "65536 bytes without a line end")])
def test_bytes_in_place_of_the_next_status_line_are_refused(tmp_path, extra, start):
    # "cannot connect (BadStatusLine('EXTRAHTTP/1.1 206 Partial Content'))": bytes past the last answer's end
    # that came after the next request was sent
    make_file(tmp_path)

    def after(handler, data, first, last):  # the second answer comes after 5 bytes, as if the first's
        handler.wfile.write(extra if first else b"")
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last + 1], keep=True)

    with make_server(tmp_path, mode=after) as srv:
        message = check_refused(srv.url("a.safetensors"), "cannot read the header: the server's answer on a kept "
                                f"connection began with {start}, not a status line: it sent more bytes than it "
                                "announced in its answer to")
        assert "cannot connect" not in message


@pytest.mark.parametrize("greeting, words", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", ("not HTTP", "'SSH-2.0-OpenSSH_9.6'", "scheme (http / https) or port")),
    (b"x" * 70000, ("not HTTP", "65536 bytes without a line end")),
    (b"", ("cannot connect",)),  # closed without a byte: no answer at all, as before
])
def test_another_protocol_on_the_port_is_named_not_cannot_connect(greeting, words):
    """A server speaking another protocol (an SSH greeting on the port given) read as 'cannot connect
    (BadStatusLine(...))', a message that also broke over two lines."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def greet():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(greeting)
    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    try:
        check_refused(f"http://127.0.0.1:{port}/a.safetensors", *words)
    finally:
        thread.join(5)
        listener.close()
