"""Kept-alive connections for reading over HTTP (modelatlas.weights.http_connections), from a server on
127.0.0.1 only (tests/weights/http_server.py counts the connections it accepts)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tests.weights.http_server import make_server
from tests.weights.test_remote import make_file, make_tensors

from modelatlas.errors import CheckpointError
from modelatlas.weights import open_checkpoint


@pytest.fixture(autouse=True)
def _no_token_nor_proxy(monkeypatch):
    for name in ("HF_TOKEN", "ATLAS_HTTP_TIMEOUT", "ATLAS_HTTP_MIN_RATE", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def check_read(ck) -> None:
    expected = make_tensors()
    for name in ("small", "big", "rows"):
        assert torch.equal(ck.read(name), expected[name])
    assert torch.equal(ck.read_rows("rows", torch.tensor([1, 2, 7])), expected["rows"][[1, 2, 7]])


def test_a_model_read_tensor_by_tensor_takes_one_connection(tmp_path):
    make_file(tmp_path)
    make_file(tmp_path, "b.safetensors")
    with make_server(tmp_path) as srv:
        with open_checkpoint(srv.url("a.safetensors")) as ck:
            check_read(ck)  # 2 requests to open, 3 tensors, 1 for the rows (1 to 7: 112 bytes, no second request)
        assert len(srv.seen) == 6 and srv.connections == 1  # (urllib: one connection a request, 6)
        with open_checkpoint(srv.url("b.safetensors")) as ck:  # another file of the host: the same connection
            check_read(ck)
        assert len(srv.seen) == 12 and srv.connections == 1


def test_a_connection_the_server_closed_is_opened_again_once(tmp_path):
    make_file(tmp_path)
    with make_server(tmp_path, mode="drop") as srv:  # closes every connection after one answer, unannounced
        with open_checkpoint(srv.url("a.safetensors")) as ck:
            check_read(ck)
        assert srv.connections == len(srv.seen) == 6  # each request found its kept connection closed


def test_threads_reading_at_once_each_get_their_own_bytes(tmp_path):
    tensors = {f"t{i}": torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(24)}
    make_file(tmp_path, tensors=tensors)
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(tensors, pool.map(ck.read, tensors)))
        assert all(torch.equal(got[n], t) for n, t in tensors.items())
        assert 1 <= srv.connections <= 4  # a connection a thread at most, each request on one at a time


def test_a_redirect_keeps_its_connections_and_the_token_off_another_host(tmp_path, monkeypatch):
    make_file(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with make_server(tmp_path) as cdn, make_server(tmp_path, mode="redirect") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        hub.target = cdn.base
        with open_checkpoint(hub.url("a.safetensors")) as ck:
            check_read(ck)
            cdn.mode = 403  # the signed link expired: back to the hub, on its kept connection
            with pytest.raises(CheckpointError, match="HTTP 403"):
                ck.read("small")
        assert hub.connections == cdn.connections == 1
        assert all(h.get("Authorization") == "Bearer hf_secret" for _, h in hub.seen)
        assert len(hub.seen) == 2 and len(cdn.seen) == 8  # 6 read, then the 403 twice (its link, then the hub's)
        assert all("Authorization" not in h for _, h in cdn.seen)


def test_an_http_proxy_from_the_environment_is_asked(tmp_path, monkeypatch):
    make_file(tmp_path)
    with make_server(tmp_path) as proxy:
        monkeypatch.setenv("http_proxy", proxy.base)
        url = "http://models.invalid/zoo/a.safetensors"  # no such host: only the proxy can answer
        (tmp_path / "zoo").mkdir()
        make_file(tmp_path / "zoo")
        with open_checkpoint(url) as ck:
            check_read(ck)
        assert proxy.seen[0][0] == url and proxy.connections == 1  # the absolute URL, as to a proxy


def test_too_many_redirects_is_one_line(tmp_path):
    with make_server(tmp_path, mode="redirect") as srv:
        srv.target = srv.base + "/loop"  # /x -> /to/x -> /to/to/x ...: never the file
        with pytest.raises(CheckpointError, match=r"cannot read the header length: over 10 redirects"):
            open_checkpoint(srv.url("a.safetensors"))
