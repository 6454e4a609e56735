"""https end to end, on 127.0.0.1 only: a server with a self-signed certificate made for the test
(tests/weights/http_server.py ``make_tls``), trusted through ``SSL_CERT_FILE`` and through nothing else: the
reader verifies certificates (http.client's default context), and a redirect from https to plain http is
refused before the plain server is asked anything."""

import pytest
import torch
from tests.weights.http_server import make_server, make_tls
from tests.weights.test_http_adversarial import answer, ranged
from tests.weights.test_remote import check_refused, make_file, make_tensors

from modelatlas.weights import open_checkpoint


@pytest.fixture
def tls(tmp_path_factory, monkeypatch):
    for name in ("HF_TOKEN", "HF_ENDPOINT", "ATLAS_HTTP_TIMEOUT", "ATLAS_HTTP_MIN_RATE", "SSL_CERT_FILE",
                 "SSL_CERT_DIR", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    made = make_tls(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("no openssl command and no cryptography package to make a test certificate")
    return made


def test_https_is_read_only_with_a_certificate_the_client_trusts(tmp_path, tls, monkeypatch):
    context, cert = tls
    make_file(tmp_path)
    with make_server(tmp_path, tls=context) as srv:
        check_refused(srv.url("a.safetensors"), "cannot connect", "CERTIFICATE_VERIFY_FAILED")  # not trusted
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with open_checkpoint(srv.url("a.safetensors")) as ck:
            assert ck.url.startswith("https://")
            assert all(torch.equal(ck.read(n), t) for n, t in make_tensors().items())
        assert srv.connections == 1, srv.connections  # kept (nothing taken for bytes past an answer's end)


def test_an_https_redirect_to_plain_http_is_refused_before_asking_it(tmp_path, tls, monkeypatch):
    # next_hop's refusal was tested as a function only: here a real https server redirects to a real http one
    context, cert = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    make_file(tmp_path)
    with make_server(tmp_path) as plain, make_server(tmp_path, mode="redirect", target=plain.base,
                                                     tls=context) as secure:
        message = check_refused(secure.url("a.safetensors"), "cannot read the header length",
                                f"redirected from https to http ({plain.base}/to/a.safetensors)", "unencrypted")
        assert len(secure.seen) == 1, message  # asked once, answered with the redirect
        assert plain.seen == [] and plain.connections == 0  # never contacted


def test_bytes_past_an_answers_length_over_https_are_refused(tmp_path, tls, monkeypatch):
    # (tests/weights/test_http_surplus.py over plain http: a TLS socket says "nothing yet" otherwise)
    context, cert = tls
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    make_file(tmp_path)

    def extra(handler, data, first, last):
        answer(handler, "206 Partial Content", ranged(data, first, last), data[first:last + 1] + b"EXTRA", keep=True)

    with make_server(tmp_path, mode=extra, tls=context) as srv:
        check_refused(srv.url("a.safetensors"), "cannot read the header length: the server sent more bytes than "
                      "the 8 its answer announced")
