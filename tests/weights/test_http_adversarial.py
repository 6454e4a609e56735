"""Servers that misbehave on purpose (modelatlas.weights.http_ranges, http_connections): each answer is written
raw by a function of the test (tests/weights/http_server.py's callable mode), on 127.0.0.1 only. What must hold:
a one-line CheckpointError naming the URL, soon, with bounded memory and bytes received; never a hang, a
traceback or bytes other than the file's taken as the file's."""

import gzip
import json
import struct
import time
import warnings

import pytest
import torch
from tests.weights.http_server import make_server
from tests.weights.test_remote import check_refused, make_file, make_tensors

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint
from modelatlas.weights.http_connections import RedirectError, next_hop


@pytest.fixture(autouse=True)
def _no_token_nor_proxy(monkeypatch):
    for name in ("HF_TOKEN", "HF_ENDPOINT", "ATLAS_HTTP_TIMEOUT", "ATLAS_HTTP_MIN_RATE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)


def answer(handler, status: str, headers: dict, body: bytes = b"", keep=False) -> None:
    """Write a raw HTTP/1.1 answer: ``headers`` as given (no Content-Length unless given), then ``body``."""
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    handler.close_connection = not keep
    try:
        handler.wfile.write(head.encode("latin-1") + body)
        handler.wfile.flush()
    except OSError:  # the client hung up, as it should on what it refused
        pass


def ranged(data: bytes, first: int, last: int, **changes) -> dict:
    last = min(last, len(data) - 1)
    return {"Content-Range": f"bytes {first}-{last}/{len(data)}", "Content-Length": str(last - first + 1), **changes}


def endless(handler, chunk=b"\0" * 65536, limit=1 << 30) -> int:
    """Send ``chunk`` until the client hangs up (or ``limit`` bytes): the bytes sent."""
    sent = 0
    try:
        while sent < limit:
            handler.wfile.write(chunk)
            sent += len(chunk)
    except OSError:
        pass
    handler.server.served += sent
    return sent


# 1. a server that ignores Range: refused at its headers, its body never read (even one without an end)

def test_a_whole_file_without_a_length_is_refused_at_once(tmp_path):
    make_file(tmp_path)

    def whole(handler, data, first, last):
        answer(handler, "200 OK", {"Content-Type": "application/octet-stream"})  # no length: till the close
        endless(handler)

    with make_server(tmp_path, mode=whole) as srv:
        start = time.monotonic()
        check_refused(srv.url("a.safetensors"), "ignored the Range request", "HTTP 200")
        assert time.monotonic() - start < 5 and srv.served < 64 << 20  # not a GiB read off


# 2. a 206 of other bytes than those asked for, or a body that disagrees with its headers

@pytest.mark.parametrize(("change", "words"), [
    (lambda d, a, b: ranged(d, a + 1, b + 1), "the server sent bytes 1-8"),
    (lambda d, a, b: ranged(d, a, b, **{"Content-Range": f"bytes {a}-{b}/*"}), "not 'bytes A-B/SIZE'"),
    (lambda d, a, b: ranged(d, a, b, **{"Content-Range": f"bytes {a}-{b}/{'9' * 5000}"}), "not 'bytes A-B/SIZE'"),
    (lambda d, a, b: ranged(d, a, b, **{"Content-Range": f"bytes {a}-{b}/5"}), "the server sent bytes 0-7"),
    (lambda d, a, b: ranged(d, a, b, **{"Content-Length": "4"}), "Content-Length 4"),
    (lambda d, a, b: ranged(d, a, b, **{"Content-Length": "16"}), "Content-Length 16"),
])
def test_a_206_that_disagrees_with_the_range_is_refused(tmp_path, change, words):
    make_file(tmp_path)

    def lying(handler, data, first, last):
        headers = change(data, first, last)
        answer(handler, "206 Partial Content", headers, data[first:][: int(headers["Content-Length"])])

    with make_server(tmp_path, mode=lying) as srv:
        check_refused(srv.url("a.safetensors"), words)


def test_a_body_shorter_than_its_length_is_refused(tmp_path):
    make_file(tmp_path)

    def cut(handler, data, first, last):
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last - 3])

    with make_server(tmp_path, mode=cut) as srv:
        check_refused(srv.url("a.safetensors"), "cannot read the header length: got 4 of its 8 bytes")


def test_a_range_answered_with_the_rest_of_the_file_is_read_to_the_range_only(tmp_path):
    make_file(tmp_path, tensors={"big": torch.zeros(1 << 20), "small": torch.ones(3)})  # 4 MiB, then 12 bytes

    def rest(handler, data, first, last):  # bytes first-END/SIZE: a 206 that Range allows (RFC 9110 14.1.2)
        answer(handler, "206 Partial Content", ranged(data, first, len(data) - 1), data[first:])

    with make_server(tmp_path, mode=rest) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        assert torch.equal(ck.read("small"), torch.ones(3)) and torch.equal(ck.read("big"), torch.zeros(1 << 20))
        assert ck.fetched == 8 + (ck.size_on_disk() - 12 - (4 << 20) - 8) + 12 + (4 << 20)  # the ranges, no more


# 3. a header length past any header, or past the file

@pytest.mark.parametrize("n", [2**60, 2**64 - 1, 101 * 1024 * 1024, 200])
def test_an_absurd_header_length_is_refused_before_it_is_read(tmp_path, n):
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", n) + b"{}" + b" " * 100)
    with make_server(tmp_path) as srv:
        check_refused(srv.url("a.safetensors"), "header length" if n == 200 else "corrupt safetensors header")
        assert len(srv.seen) == 1  # the 8 bytes only


def test_a_tensor_larger_than_memory_is_one_line(tmp_path):
    header = json.dumps({"t": {"dtype": "F32", "shape": [2**45], "data_offsets": [0, 2**47]}}).encode()
    head = struct.pack("<Q", len(header)) + header
    size = len(head) + 2**47  # a 128 TiB file, as the server says

    def huge(handler, data, first, last):
        body = head[first:last + 1]
        answer(handler, "206 Partial Content", {"Content-Range": f"bytes {first}-{first + len(body) - 1}/{size}",
                                                "Content-Length": str(len(body))}, body)

    (tmp_path / "a.safetensors").write_bytes(b"")
    with make_server(tmp_path, mode=huge) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        with pytest.raises(CheckpointError, match="tensor 't'.*memory"):
            ck.read("t")


@pytest.mark.parametrize("swap", [True, False])
def test_a_tensor_over_memory_is_read_where_swap_can_hold_it(tmp_path, monkeypatch, swap):
    # the limit was physical memory alone: a tensor that a local read (and the kernel) would take was refused
    from modelatlas.weights import byte_ranges

    make_file(tmp_path, tensors={"a": torch.ones(1 << 19), "b": torch.ones(1 << 21)})  # 2 MiB, 8 MiB
    (tmp_path / "meminfo").write_text("MemTotal:        1024 kB\nMemFree:  512 kB\nSwapTotal:  3072 kB\n")
    monkeypatch.setattr(byte_ranges, "_MEMINFO", tmp_path / ("meminfo" if swap else "none"), raising=False)
    monkeypatch.setattr(byte_ranges, "_SELF_CGROUP", tmp_path / "none")  # not in a container with a lower limit
    if not swap:  # no /proc/meminfo: this machine's memory alone (sysconf), as before
        monkeypatch.setattr(byte_ranges.os, "sysconf", lambda name: 1024 if name == "SC_PAGE_SIZE" else 4096)
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        assert torch.equal(ck.read("a"), torch.ones(1 << 19))  # over 1 MiB of memory, under 4 MiB with swap
        with pytest.raises(CheckpointError) as e:
            ck.read("b")
    assert str(e.value) == f"{srv.url('a.safetensors')}: tensor 'b' is 8388608 bytes, more than this machine's " \
                           f"memory{' and swap' * swap} (4194304 bytes) can hold"


MiB = 1 << 20


def lying_sizes(where: str):
    """A server that announces far more than it sends (100 bytes, then it closes): a shard index's Content-Length,
    a header length in the first 8 bytes, or a tensor's size in the header (each within the file size it gives)."""
    header = json.dumps({"t": {"dtype": "U8", "shape": [500 * MiB], "data_offsets": [0, 500 * MiB]}}).encode()
    head = struct.pack("<Q", 90 * MiB if where == "header" else len(header)) + header
    size = len(head) + 500 * MiB

    def lying(handler, data, first, last):
        if first is None:  # the index: a 60 MiB body announced
            return answer(handler, "200 OK", {"Content-Length": str(60 * MiB)}, b" " * 100)
        body = head[first:last + 1] if first < 8 or (where != "header" and first < len(head)) else b" " * 100
        answer(handler, "206 Partial Content", {"Content-Range": f"bytes {first}-{last}/{size}",
                                                "Content-Length": str(last - first + 1)}, body)
    return lying


@pytest.mark.parametrize(("where", "words"), [
    ("index", "the server announced Content-Length 62914560 and sent 100 bytes"),
    ("header", "cannot read the header: got 100 of its 94371840 bytes"),
    ("tensor", "cannot read tensor 't': got 100 of its 524288000 bytes"),
    ("rows", "cannot read tensor 't': got 100 of its 524288000 bytes"),
])
def test_memory_follows_the_bytes_received_not_the_sizes_announced(tmp_path, where, words):
    # each size was reserved before a byte of it came: 60 MiB, 90 MiB, 500 MiB (twice: the body, then the tensor)
    import tracemalloc

    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_bytes(b"")
    with make_server(tmp_path, mode=lying_sizes(where)) as srv:
        tracemalloc.start()
        try:
            if where == "index":
                check_refused(srv.url("model.safetensors.index.json"), words)
            elif where == "header":
                check_refused(srv.url("a.safetensors"), words)
            else:
                with open_checkpoint(srv.url("a.safetensors")) as ck, pytest.raises(CheckpointError, match=words):
                    ck.read("t") if where == "tensor" else ck.read_rows("t", torch.tensor([0]))  # one row: all of it
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 * MiB, peak


# 4. redirects: bounded (tests/weights/test_http_connections.py), to http(s) only, never from https to http

@pytest.mark.parametrize(("url", "location", "words"), [
    ("https://hub.example/a", "file:///etc/passwd", "not an http(s) URL"),
    ("http://hub.example/a", "ftp://cdn.example/a", "not an http(s) URL"),
    ("https://hub.example/a", "http://cdn.example/a", "from https to http"),
    ("https://hub.example/a", "HTTP://hub.example/a", "from https to http"),
])
def test_a_redirect_to_another_scheme_is_refused(url, location, words):
    with pytest.raises(RedirectError, match=words.replace("(", r"\(").replace(")", r"\)")):
        next_hop(url, location)
    assert next_hop("http://hub.example/a/b", "https://cdn.example/x") == "https://cdn.example/x"
    assert next_hop("https://hub.example/a/b", "c d") == "https://hub.example/a/c%20d"


def test_a_refused_redirects_signed_url_is_shown_without_its_signature():
    # errors hid a given URL's credentials (errors.redacted) but printed a redirect's target as the server sent it
    with pytest.raises(RedirectError) as e:
        next_hop("https://hub.example/a", "http://cdn.example/a?X-Amz-Signature=s3cr3t&X-Amz-Expires=60")
    assert "X-Amz-Signature=***&X-Amz-Expires=60" in str(e.value) and "s3cr3t" not in str(e.value)


def test_a_redirect_to_a_file_url_is_one_line(tmp_path):
    make_file(tmp_path)

    def to_file(handler, data, first, last):
        answer(handler, "302 Found", {"Location": f"file://{tmp_path}/a.safetensors", "Content-Length": "0"})

    with make_server(tmp_path, mode=to_file) as srv:
        check_refused(srv.url("a.safetensors"), "not an http(s) URL")


# 5. a server that stops sending, or sends a byte at a time, in the middle of a body

def test_a_body_that_stops_or_drips_times_out(tmp_path, monkeypatch):
    make_file(tmp_path)
    monkeypatch.setenv("ATLAS_HTTP_TIMEOUT", "0.5")

    def drip(handler, data, first, last):
        body = data[first:last + 1]
        answer(handler, "206 Partial Content", ranged(data, first, last))
        try:
            for i in range(len(body)):
                handler.wfile.write(body[i:i + 1])
                handler.wfile.flush()
                time.sleep(0.1 if handler.server.target == "drip" else 3)
        except OSError:
            pass

    with make_server(tmp_path, mode=drip, target="drip") as srv:
        for how in ("drip", "stop"):
            srv.target = how
            start = time.monotonic()
            check_refused(srv.url("a.safetensors"), "cannot read the header length", "ATLAS_HTTP_TIMEOUT")
            assert time.monotonic() - start < 2, how  # 8 bytes at 0.1 s each: 0.8 s, over the 0.5 s allowed


@pytest.mark.parametrize("rate", [None, "4", "0"])
def test_a_slow_link_reads_at_the_pace_atlas_http_min_rate_allows(tmp_path, monkeypatch, rate):
    # the pace (1 MiB a timeout) could not be set for a slow link; ATLAS_HTTP_MIN_RATE is bytes a second (0: none)
    make_file(tmp_path)
    monkeypatch.setenv("ATLAS_HTTP_TIMEOUT", "0.5")
    if rate is not None:
        monkeypatch.setenv("ATLAS_HTTP_MIN_RATE", rate)  # 4: 2 bytes a 0.5 s at least

    def slow(handler, data, first, last):  # the header length at 10 bytes a second, the rest at once
        body = data[first:last + 1]
        answer(handler, "206 Partial Content", ranged(data, first, last), body if first else b"")
        try:
            for i in range(len(body) if not first else 0):
                handler.wfile.write(body[i:i + 1])
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    with make_server(tmp_path, mode=slow) as srv:
        if rate is None:
            check_refused(srv.url("a.safetensors"), "under 1 MiB in 0.5 s", "ATLAS_HTTP_MIN_RATE")
            return
        with open_checkpoint(srv.url("a.safetensors")) as ck:
            assert all(torch.equal(ck.read(n), t) for n, t in make_tensors().items())


def test_a_head_sent_a_byte_at_a_time_times_out(tmp_path, monkeypatch):
    make_file(tmp_path)
    monkeypatch.setenv("ATLAS_HTTP_TIMEOUT", "0.5")

    def drip_head(handler, data, first, last):
        handler.close_connection = True
        try:
            for c in b"HTTP/1.1 206 Partial Content\r\nX-Padding: " + b"x" * 1000:
                handler.wfile.write(bytes([c]))
                handler.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    with make_server(tmp_path, mode=drip_head) as srv:
        start = time.monotonic()
        check_refused(srv.url("a.safetensors"), "cannot read the header length", "timed out", "ATLAS_HTTP_TIMEOUT")
        assert time.monotonic() - start < 2


def test_an_endless_stream_of_100_continue_times_out(tmp_path, monkeypatch):
    make_file(tmp_path)
    monkeypatch.setenv("ATLAS_HTTP_TIMEOUT", "0.5")

    def go_on(handler, data, first, last):  # http.client skips each 100 and reads the next: for ever, at full speed
        endless(handler, b"HTTP/1.1 100 Continue\r\n\r\n" * 100)

    with make_server(tmp_path, mode=go_on) as srv:
        start = time.monotonic()
        check_refused(srv.url("a.safetensors"), "cannot read the header length", "timed out")
        assert time.monotonic() - start < 2


# 6. an encoded body (gzip: a decompression bomb, or bytes other than the file's) is refused, never decoded

@pytest.mark.parametrize("where", ["range", "json"])
def test_an_encoded_body_is_refused(tmp_path, where):
    make_file(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"big": "a.safetensors"}}))
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB in ~64 KB

    def encoded(handler, data, first, last):
        headers = {"Content-Encoding": "gzip", "Content-Length": str(len(bomb))}
        if first is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        answer(handler, "206 Partial Content" if first is not None else "200 OK", headers, bomb)

    with make_server(tmp_path, mode=encoded) as srv:
        name = "a.safetensors" if where == "range" else "model.safetensors.index.json"
        check_refused(srv.url(name), "Content-Encoding gzip", "not decoded")


# 7. error statuses: one line saying which, for which URL; what the server says is shown tamed

@pytest.mark.parametrize(("status", "headers", "words"), [
    ("429 Too Many Requests", {"Retry-After": "30"}, ["HTTP 429", "rate", "30 s"]),
    ("503 Service Unavailable", {}, ["HTTP 503 Service Unavailable"]),
    ("500 \x1b[2J\x1b]0;pwned\x07" + "x" * 500, {}, ["HTTP 500"]),
])
def test_error_statuses_are_one_tame_line(tmp_path, status, headers, words):
    make_file(tmp_path)

    def refuse(handler, data, first, last):
        answer(handler, status, {**headers, "Content-Length": "2"}, b"no")

    with make_server(tmp_path, mode=refuse) as srv, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        message = check_refused(srv.url("a.safetensors"), *words)
        assert "\x1b" not in message and "\x07" not in message and len(message) < 300, message
    busy = status.startswith("503")  # asked again twice, 1 s apart (no Retry-After), saying so; 429's 30 s is too long
    assert [str(w.message).endswith("asking again in 1 s") for w in said] == [True, True] * busy


def test_a_busy_server_is_asked_again_after_the_wait_it_names(tmp_path):
    # one 429 from a hub ended a lineage over hundreds of models: it is now asked again (at most twice, <= 10 s)
    from modelatlas.errors import AtlasWarning

    make_file(tmp_path)
    calls = []

    def busy_once(handler, data, first, last):
        calls.append(first)
        if len(calls) == 1:
            return answer(handler, "429 Too Many Requests", {"Retry-After": "0", "Content-Length": "2"}, b"no")
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last + 1])

    with make_server(tmp_path, mode=busy_once) as srv, pytest.warns(AtlasWarning, match="HTTP 429 .* asking again in 0 s"):
        ck = open_checkpoint(srv.url("a.safetensors"))
        assert [t.name for t in ck.tensors()] and len(calls) >= 2


def test_a_good_server_still_reads(tmp_path):
    make_file(tmp_path)

    def good(handler, data, first, last):
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last + 1])

    with make_server(tmp_path, mode=good) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        assert all(torch.equal(ck.read(n), t) for n, t in make_tensors().items())


def make_cgroup(tmp_path, files: dict[str, str], own: str) -> None:
    """A fake /sys/fs/cgroup under tmp_path/cg holding ``files`` and a /proc/self/cgroup saying ``own``."""
    for name, text in files.items():
        (tmp_path / "cg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / name).write_text(text + "\n")
    (tmp_path / "self").write_text(own)


@pytest.mark.parametrize("files, own, want", [
    ({"box/memory.max": "4096", "box/memory.swap.max": "1024"}, "0::/box\n", 4096 + 1024),  # v2
    ({"box/memory.max": "4096", "box/memory.swap.max": "max"}, "0::/box\n", 4096 + 3072),  # swap: the machine's
    ({"memory.max": "max"}, "0::/\n", None),  # v2 without a limit
    ({"memory/box/memory.limit_in_bytes": "4096"}, "4:memory:/box\n0::/\n", 4096 + 3072),  # v1, no swap accounting
    ({"memory/box/memory.limit_in_bytes": "4096", "memory/box/memory.memsw.limit_in_bytes": "6000"},
     "4:memory:/box\n", 6000),  # v1: memory and swap together
    ({"memory/box/memory.limit_in_bytes": "9223372036854771712"}, "4:memory:/box\n", None),  # v1's "no limit"
    ({}, "0::/\n", None),  # no cgroup files
    # the limit set on an ancestor (a pod's group), the process's own group saying "max": the lowest one counts
    ({"pod/memory.max": "4096", "pod/box/memory.max": "max"}, "0::/pod/box\n", 4096 + 3072),
    ({"memory.max": "2048", "pod/memory.max": "max", "pod/box/memory.max": "8192"}, "0::/pod/box\n", 2048 + 3072),
    ({"memory/pod/memory.limit_in_bytes": "4096", "memory/pod/box/memory.limit_in_bytes": "9223372036854771712"},
     "4:memory:/pod/box\n", 4096 + 3072),  # v1: the same
])
def test_container_limit_reads_the_process_cgroup(tmp_path, monkeypatch, files, own, want):
    from modelatlas.weights import byte_ranges

    make_cgroup(tmp_path, files, own)
    monkeypatch.setattr(byte_ranges, "_CGROUP_ROOT", tmp_path / "cg")
    monkeypatch.setattr(byte_ranges, "_SELF_CGROUP", tmp_path / "self")
    assert byte_ranges.container_limit(3072) == want


def test_a_tensor_over_the_container_limit_is_refused_naming_it(tmp_path, monkeypatch):
    # /proc/meminfo shows the host's memory in a container: a tensor over the container's limit got the process
    # killed (OOM), not the one-line error
    from modelatlas.weights import byte_ranges

    make_file(tmp_path, tensors={"a": torch.ones(1 << 10), "b": torch.ones(1 << 21)})  # 4 KiB, 8 MiB
    make_cgroup(tmp_path, {"box/memory.max": str(1 << 20), "box/memory.swap.max": "0"}, "0::/box\n")
    monkeypatch.setattr(byte_ranges, "_CGROUP_ROOT", tmp_path / "cg")
    monkeypatch.setattr(byte_ranges, "_SELF_CGROUP", tmp_path / "self")
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        assert torch.equal(ck.read("a"), torch.ones(1 << 10))
        with pytest.raises(CheckpointError) as e:
            ck.read("b")
    assert str(e.value) == f"{srv.url('a.safetensors')}: tensor 'b' is 8388608 bytes, more than this container's " \
                           f"memory limit (cgroup) ({1 << 20} bytes) can hold"
