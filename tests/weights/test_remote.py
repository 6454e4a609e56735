"""Safetensors read over HTTP range requests (modelatlas.weights.remote), from a server on 127.0.0.1 only."""

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.weights.http_server import make_server

from modelatlas.errors import CheckpointError
from modelatlas.weights import model_name, open_checkpoint, open_many, unique_names
from modelatlas.weights.remote import hub_base, url_name


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("ATLAS_HTTP_TIMEOUT", raising=False)
    monkeypatch.delenv("ATLAS_HTTP_MIN_RATE", raising=False)


def make_tensors():
    return {"big": torch.arange(4096.0).reshape(64, 64), "small": torch.arange(6, dtype=torch.float16).reshape(2, 3),
            "rows": torch.arange(40, dtype=torch.int32).reshape(10, 4)}


def make_file(folder: Path, name="a.safetensors", tensors=None) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors or make_tensors(), str(path))
    return path


def header_bytes(path: Path) -> int:
    """8 + the JSON header's length: what opening a safetensors file reads."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_tensors_equal_the_local_read_and_only_their_bytes_are_fetched(tmp_path):
    path = make_file(tmp_path)
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck, open_checkpoint(path) as local:
        assert ck.tensors() == local.tensors() and ck.name == "a"
        assert srv.served == header_bytes(path)  # the header and nothing of the 16 KB of "big"
        assert torch.equal(ck.read("small"), local.read("small"))
        assert srv.served == header_bytes(path) + 12 and ck.fetched == srv.served
        rows = torch.tensor([7, 1, 2, 7])
        assert torch.equal(ck.read_rows("rows", rows), local.read_rows("rows", rows))
        assert srv.served == header_bytes(path) + 12 + 7 * 16  # rows 1 to 7 in one request, 16 bytes a row
        assert torch.equal(ck.read("big"), local.read("big")) and ck.size_on_disk() == path.stat().st_size


def test_a_sharded_index_reads_its_shards_beside_it(tmp_path):
    model = tmp_path / "org" / "run"
    tensors = make_tensors()
    make_file(model, "model-00001-of-00002.safetensors", {"big": tensors["big"]})
    make_file(model, "model-00002-of-00002.safetensors", {"small": tensors["small"], "rows": tensors["rows"]})
    weight_map = {"big": "model-00001-of-00002.safetensors", "small": "model-00002-of-00002.safetensors",
                  "rows": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("org/run/model.safetensors.index.json")) as ck:
        assert ck.name == "run" and sorted(ck.tensor_names()) == ["big", "rows", "small"]
        assert torch.equal(ck.read("small"), tensors["small"]) and torch.equal(ck.read("big"), tensors["big"])
        assert torch.equal(ck.read_rows("rows", torch.tensor([3])), tensors["rows"][3:4])
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"big": "model.bin"}}))
    with make_server(tmp_path) as srv, pytest.raises(CheckpointError, match="only .safetensors shards"):
        open_checkpoint(srv.url("org/run/model.safetensors.index.json"))


def test_names_of_urls():
    hub = "https://huggingface.co/org/name/resolve/{}/model.safetensors"
    assert url_name(hub.format("main")) == "org/name" and url_name(hub.format("v2")) == "org/name@v2"
    assert url_name(hub.format("main").replace("model.safetensors", "model.safetensors.index.json")) == "org/name"
    assert url_name("http://h:1/zoo/t0_1.safetensors") == "t0_1" and url_name("http://h/zoo/run/model.safetensors") == "run"
    assert url_name("hf://org/name@v1") == "org/name@v1" and url_name("zoo/a.safetensors") is None
    assert url_name("http://h/x.bin") == "x" and url_name("http://h:8/") == "h:8"
    assert model_name(Path(hub.format("main"))) == "org/name"  # folded to https:/ by Path, still a URL
    assert unique_names(["http://h/x/a.safetensors", "http://h/y/a.safetensors"]) == ["x/a", "y/a"]
    assert str(CheckpointError(Path("https://h/a.safetensors"), "bad")) == "https://h/a.safetensors: bad"


def check_refused(url: str, *words: str) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(url)
    message = str(e.value)
    assert message.startswith(url + ": ") and "\n" not in message, message
    assert all(w in message for w in words), message
    return message


def check_message(ck, name: str, words: str) -> None:
    with pytest.raises(CheckpointError) as e:
        ck.read(name)
    assert str(e.value).startswith(ck.url + ": ") and words in str(e.value), str(e.value)


def test_a_server_that_ignores_range_is_refused_not_downloaded(tmp_path):
    make_file(tmp_path)
    with make_server(tmp_path, mode="ignore") as srv:
        check_refused(srv.url("a.safetensors"), "ignored the Range request", "HTTP 200", "refused rather than download")
    with make_server(tmp_path, mode="page") as srv:  # a hub's /blob/ page in place of the file
        check_refused(srv.url("a.safetensors"), "a web page", "/resolve/ URL")


@pytest.mark.parametrize(("status", "token", "hub", "words"), [
    (404, None, True, ["not found (HTTP 404)"]), (401, None, True, ["HTTP 401", "set HF_TOKEN"]),
    (403, "hf_x", True, ["HTTP 403", "HF_TOKEN sent was refused"]),
    (401, "hf_x", False, ["HTTP 401", "HF_TOKEN is sent to the hub only"]), (500, None, True, ["HTTP 500"])])
def test_http_errors_are_one_line_naming_the_url(tmp_path, monkeypatch, status, token, hub, words):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with make_server(tmp_path, mode=status) as srv:
        if hub:
            monkeypatch.setenv("HF_ENDPOINT", srv.base)
        check_refused(srv.url("a.safetensors"), *words)


def test_timeouts_truncation_and_lying_headers(tmp_path, monkeypatch):
    path = make_file(tmp_path)
    monkeypatch.setenv("ATLAS_HTTP_TIMEOUT", "0.2")
    with make_server(tmp_path, mode="stall", stall=1.0) as srv:
        check_refused(srv.url("a.safetensors"), "timed out", "ATLAS_HTTP_TIMEOUT")
    with make_server(tmp_path, mode="short") as srv:
        check_refused(srv.url("a.safetensors"), "cannot read the header length")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])  # the header says more than the file holds
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "page.safetensors").write_bytes(b"<!doctype html><html>" + b" " * 64)
    with make_server(tmp_path) as srv:
        check_refused(srv.url("cut.safetensors"), "truncated file: tensor")
        check_refused(srv.url("tiny.safetensors"), "truncated safetensors file (no header length)")
        check_refused(srv.url("empty.safetensors"), "truncated safetensors file (no header length)", "HTTP 416")
        check_refused(srv.url("page.safetensors"), "a web page", "/resolve/")
        check_refused(srv.url("gone.safetensors"), "HTTP 404")
        with open_checkpoint(srv.url("a.safetensors")) as ck:
            make_file(tmp_path, tensors={**make_tensors(), "more": torch.ones(3)})  # replaced after it was opened
            check_message(ck, "big", "the file changed while read")
            make_file(tmp_path)
            srv.mode = "short"  # cut after the header was read
            with pytest.raises(CheckpointError, match=r"cannot read tensor 'big': got 8192 of its 16384 bytes"):
                ck.read("big")


def test_pickles_and_other_formats_are_refused_without_a_request(tmp_path):
    with make_server(tmp_path) as srv:
        for name in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json"):
            check_refused(srv.url(name), "pickle", "never unpickled")
        check_refused(srv.url("model.gguf"), "GGUF", "not read over HTTP")
        check_refused(srv.url("config.json"), "only safetensors is read over HTTP")
        assert srv.seen == []


def test_the_token_goes_to_the_hub_given_only(tmp_path, monkeypatch):
    make_file(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with make_server(tmp_path) as cdn, make_server(tmp_path, mode="redirect") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        hub.target = cdn.base  # a hub's file redirects to another host (here another port)
        for url in (cdn.url("a.safetensors"), hub.url("a.safetensors")):
            with open_checkpoint(url) as ck:
                assert torch.equal(ck.read("small"), make_tensors()["small"])
        assert len(hub.seen) == 1 and hub.seen[0][1].get("Authorization") == "Bearer hf_secret"  # then the CDN
        direct, redirected = cdn.seen[:3], cdn.seen[3:]  # opening reads 2 ranges, then one tensor
        assert all("Authorization" not in h for _, h in direct)  # a server that is not the hub: no token
        assert len(redirected) == 3 and all("Authorization" not in h for _, h in redirected)


def test_the_token_is_for_hub_hosts_only(monkeypatch):
    from modelatlas.weights.http_ranges import hub_token

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub_token("https://huggingface.co/org/m/resolve/main/model.safetensors") == "hf_x"
    assert hub_token("https://cdn-lfs.huggingface.co/x") == "hf_x"
    for url in ("http://huggingface.co/x", "https://huggingface.co.evil.example/x", "https://example.org/x"):
        assert hub_token(url) is None
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8080/")
    assert hub_token("http://127.0.0.1:8080/org/m") == "hf_x" and hub_token("http://127.0.0.1:9090/x") is None


def test_an_expired_redirect_goes_back_to_the_url_given(tmp_path):
    make_file(tmp_path)
    with make_server(tmp_path) as cdn, make_server(tmp_path) as cdn2, make_server(tmp_path, mode="redirect") as hub:
        hub.target = cdn.base
        with open_checkpoint(hub.url("a.safetensors")) as ck:
            cdn.mode, hub.target = 403, cdn2.base  # the signed link expired; the hub now sends elsewhere
            assert torch.equal(ck.read("small"), make_tensors()["small"])
            assert [len(s.seen) for s in (hub, cdn, cdn2)] == [2, 3, 1]
            cdn2.mode = 404
            check_message(ck, "big", "not found (HTTP 404)")


def test_a_same_host_redirect_keeps_the_token(tmp_path, monkeypatch):
    make_file(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with make_server(tmp_path, mode="redirect") as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.base)
        srv.target = srv.base
        with open_checkpoint(srv.url("a.safetensors")) as ck:
            assert ck.tensors()
        assert [p for p, _ in srv.seen][:2] == ["/a.safetensors", "/to/a.safetensors"]
        assert all(h.get("Authorization") == "Bearer hf_secret" for _, h in srv.seen)


def test_open_many_reports_and_skips_a_bad_url(tmp_path):
    make_file(tmp_path)
    with make_server(tmp_path) as srv:
        models = open_many([srv.url("a.safetensors"), srv.url("gone.safetensors")])
        opened = [ck.name for ck in models]
        assert opened == ["a"] and len(models.skipped) == 1
        assert models.skipped[0][1].startswith(srv.url("gone.safetensors") + ": cannot read")


def test_hf_urls_try_the_index_then_the_single_file(tmp_path, monkeypatch):
    make_file(tmp_path / "org" / "name" / "resolve" / "main", "model.safetensors")
    with make_server(tmp_path) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.base + "/")
        assert hub_base("hf://org/name@v1") == srv.base + "/org/name/resolve/v1/"
        with open_checkpoint("hf://org/name") as ck:
            assert ck.name == "org/name" and torch.equal(ck.read("small"), make_tensors()["small"])
        assert [p for p, _ in srv.seen][:2] == ["/org/name/resolve/main/model.safetensors.index.json",
                                                "/org/name/resolve/main/model.safetensors"]
        check_refused("hf://org/name@v9", "HTTP 404")


def test_lineage_recover_on_urls_gives_the_forest_of_the_local_files(tmp_path, capsys):
    from modelatlas.cli.main import main
    from modelatlas.lineage.synthetic import make_synthetic_forest

    weights, _ = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    for name, tensors in weights.items():  # with a matrix that is not square, which lineage does not compare
        make_file(tmp_path / "zoo", f"{name}.safetensors", {**tensors, "embed": torch.ones(64, 8)})
    files = sorted((tmp_path / "zoo").glob("*.safetensors"))
    assert main(["lineage", "recover", *map(str, files), "--out", str(tmp_path / "local.json")]) == 0
    with make_server(tmp_path) as srv:
        given = [srv.url(f"zoo/{f.name}") for f in files[:4]] + [str(f) for f in files[4:]]
        code = main(["lineage", "recover", *given, srv.url("zoo/gone.safetensors"), "--out", str(tmp_path / "remote.json")])
        err = capsys.readouterr().err
        # each header once and each square layer once, nothing of "embed" (2 KB a model); 12: the 404's body
        assert srv.served - 12 == sum(f.stat().st_size - 64 * 8 * 4 for f in files[:4])
    assert code == 0 and f"{srv.url('zoo/gone.safetensors')}: cannot read the header length: not found" in err
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert remote.pop("skipped") == {"gone": err.split("skipped gone: ")[1].split("\n")[0]} and local.pop("skipped") == {}
    assert remote == local and len(local["edges"]) == 4


def test_a_prefetched_tensor_is_fetched_in_the_background_once(tmp_path):
    path = make_file(tmp_path)
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        ck.prefetch("big")
        ck.prefetch("big")
        for _ in range(500):  # fetched before any read asks for it (waited for, up to 5 s)
            if srv.served == header_bytes(path) + 16384:
                break
            time.sleep(0.01)
        assert srv.served == header_bytes(path) + 16384
        assert torch.equal(ck.read("big"), make_tensors()["big"]) and len(srv.seen) == 3  # 2 for the header
        srv.mode = 404
        ck.prefetch("small")
        check_message(ck, "small", "cannot read tensor 'small': not found (HTTP 404)")  # the read's own error


def test_a_model_lineage_skips_is_named_by_its_url(tmp_path):
    from modelatlas.lineage import recover_lineage
    from modelatlas.lineage.synthetic import make_synthetic_forest

    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=3)
    weights["t0_0"]["attn.q"] = weights["t0_0"]["attn.q"].clone()
    weights["t0_0"]["attn.q"][0, 0] = float("nan")  # a diverged model: skipped, named (it read "http:/127.0.0.1...")
    for name, tensors in weights.items():
        make_file(tmp_path / "zoo", f"{name}.safetensors", tensors)
    with make_server(tmp_path) as srv:
        forest = recover_lineage([srv.url(f"zoo/{n}.safetensors") for n in weights])
    assert forest.skipped["t0_0"].startswith(srv.url("zoo/t0_0.safetensors") + ": tensor 'attn.q' holds NaN")


def test_a_double_slash_in_a_url_path_is_kept_verbatim(tmp_path, capsys):
    from modelatlas.cli.main import main
    from modelatlas.weights import discover_models

    make_file(tmp_path / "x")
    with make_server(tmp_path) as srv:
        url = srv.base + "/x//a.safetensors"  # an S3 key with an empty part, a signed link: "//" is no "/"
        for ck in (open_checkpoint(url), *open_many([url]), open_checkpoint(discover_models([url])[0])):
            with ck:
                assert torch.equal(ck.read("small"), make_tensors()["small"]) and ck.url == url
        assert {p for p, _ in srv.seen} == {"/x//a.safetensors"}  # (Path had folded it to /x/a.safetensors)
        assert main(["lineage", "recover", url, url.replace("//a", "//b"), "--out", str(tmp_path / "o.json")]) == 0
        assert url.replace("//a", "//b") + ": cannot read the header length: not found" in capsys.readouterr().err
        assert {p for p, _ in srv.seen} == {"/x//a.safetensors", "/x//b.safetensors"}
        make_file(tmp_path / "x" / "s", "model-00001-of-00001.safetensors")
        (tmp_path / "x" / "s" / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: "model-00001-of-00001.safetensors" for n in make_tensors()}}))
        with open_checkpoint(srv.base + "/x//s/model.safetensors.index.json") as ck:  # its shard beside it: "//" kept
            assert torch.equal(ck.read("small"), make_tensors()["small"])
        assert srv.seen[-1][0] == "/x//s/model-00001-of-00001.safetensors"  # (urljoin had folded it)
        folded = url.replace("//a", "/a")  # a second URL that differs in its "//" only: a Path cannot tell which
        models = open_many([url, folded])
        assert list(models) == [] and all("differ only in a '//'" in why for _, why in models.skipped)


def test_a_tensor_announced_again_while_held_is_kept_not_fetched_again(tmp_path):
    make_file(tmp_path)
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck:
        held = ck.read("big")
        ck.prefetch("big")  # read again soon (lineage's merge test, then its pass): a copy kept, no request
        held[0, 0] = -1.0  # the caller's own tensor: the copy kept does not change with it
        assert len(srv.seen) == 3 and torch.equal(ck.read("big"), make_tensors()["big"]) and len(srv.seen) == 3
        assert torch.equal(ck.read("big"), make_tensors()["big"]) and len(srv.seen) == 4  # kept for one read only
        ck.read("small")  # not held by anyone: announcing it fetches it (in the background), as before
        ck.prefetch("small")
        assert torch.equal(ck.read("small"), make_tensors()["small"]) and len(srv.seen) == 6


def test_spaced_rows_are_one_request_where_they_are_near(tmp_path, monkeypatch):
    import modelatlas.weights.http_ranges as H

    path = make_file(tmp_path, tensors={"w": torch.arange(512 * 64, dtype=torch.float32).reshape(512, 64)})
    rows = torch.linspace(0, 511, 64).round().long()  # the merge check's sampled rows: 8 rows (2 KB) apart
    with make_server(tmp_path) as srv, open_checkpoint(srv.url("a.safetensors")) as ck, open_checkpoint(path) as local:
        before = len(srv.seen)
        assert torch.equal(ck.read_rows("w", rows), local.read_rows("w", rows))
        assert len(srv.seen) - before == 1  # was 64: one a row
        monkeypatch.setattr(H.HttpRanges, "gap_bytes", 1024)  # rows 2 KB apart: each its own request again
        before = len(srv.seen)
        assert torch.equal(ck.read_rows("w", rows[:5]), local.read_rows("w", rows[:5]))
        assert len(srv.seen) - before == 5


def test_failures_before_any_answer_are_one_line(tmp_path, monkeypatch):
    import socket

    check_refused("hf://gpt2", "not a hub model URL", "hf://org/name")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_refused(f"http://127.0.0.1:{port}/a.safetensors", "cannot connect")
    monkeypatch.setenv("ATLAS_HTTP_TIMEOUT", "soon")
    with pytest.raises(CheckpointError, match="^ATLAS_HTTP_TIMEOUT: must be a number of seconds over 0, not 'soon'$"):
        open_checkpoint(f"http://127.0.0.1:{port}/a.safetensors")
    monkeypatch.delenv("ATLAS_HTTP_TIMEOUT")
    make_file(tmp_path)
    with make_server(tmp_path) as srv, pytest.raises(CheckpointError) as e:
        open_checkpoint(srv.url("a.safetensors"), base="x")
    assert "option(s) base do not apply to a checkpoint read over HTTP" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("name", "value", "what"), [
    ("ATLAS_HTTP_MIN_RATE", "fast", "a number of bytes a second, 0 or more"),
    ("ATLAS_HTTP_MIN_RATE", "-1", "a number of bytes a second, 0 or more"),
    ("ATLAS_HTTP_MIN_RATE", "nan", "a number of bytes a second, 0 or more"),
    ("ATLAS_HTTP_MIN_RATE", "1e999", "a number of bytes a second, 0 or more"),
    ("ATLAS_HTTP_TIMEOUT", "0", "a number of seconds over 0"),  # (was a non-blocking socket: 'cannot connect')
    ("ATLAS_HTTP_TIMEOUT", "-5", "a number of seconds over 0"),
])
def test_a_bad_http_setting_is_one_line_naming_it_and_its_value(tmp_path, monkeypatch, name, value, what):
    make_file(tmp_path)
    monkeypatch.setenv(name, value)
    with make_server(tmp_path) as srv, pytest.raises(CheckpointError) as e:
        open_checkpoint(srv.url("a.safetensors"))
    assert str(e.value) == f"{name}: must be {what}, not {value!r}"
    assert not srv.seen  # refused before any request


def test_read_into_receives_the_body_in_the_buffer_given(tmp_path):
    # it received the body into a buffer of its own, then copied it into the one given (16 MiB: 24 MiB traced)
    import tracemalloc

    import numpy as np

    from modelatlas.weights.http_ranges import HttpRanges

    data = bytes(range(256)) * (1 << 16)  # 16 MiB, served from memory (the server's allocations are traced too)

    def serve(handler, _, first, last):
        head = f"Content-Range: bytes {first}-{last}/{len(data)}\r\nContent-Length: {last - first + 1}\r\n\r\n"
        handler.wfile.write(f"HTTP/1.1 206 Partial Content\r\n{head}".encode())
        handler.wfile.write(memoryview(data)[first:last + 1])

    (tmp_path / "a.bin").write_bytes(b"")
    buf = np.zeros(len(data) - 1, dtype=np.uint8)
    with make_server(tmp_path, mode=serve) as srv:
        ranges = HttpRanges(srv.url("a.bin"))
        tracemalloc.start()
        try:
            ranges.read_into(1, memoryview(buf), "the bytes")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert buf.tobytes() == data[1:] and ranges.fetched == len(buf)
    assert peak < 1 << 20, peak
