"""Lineage over HTTP range requests vs local files: bytes fetched and wall time (docs/benchmarks.md, "Session 35:
safetensors over HTTP range requests").

    python bench/lineage_remote.py --work /tmp/remote_zoo --width 512 --blocks 4 --repeats 3

writes (once) a zoo of llama-shaped bfloat16 models (per block four square attention matrices, which lineage
compares, and three width x 2.75 width MLP matrices plus an embedding, which it does not): two trees, a base
with two fine-tunes each fine-tuned again (5 models) and a base with one (2 models); each fine-tune moves every
tensor by 2 % of its spread. The folder is served from 127.0.0.1 by a threaded ``http.server`` that answers
``Range`` requests and counts the body bytes it sends; :func:`~modelatlas.lineage.recover_lineage` is timed on
the models' URLs and on their paths, alternately, ``--repeats`` times (the server speaks HTTP/1.1 and counts the
connections it accepts) (the files stay in the page cache: the
comparison is the HTTP overhead on loopback, not a network), and the two forests are checked equal.
``--latency-ms 20`` makes the server wait that long before each answer, as a network's round trip would.
``--slerp-merge`` adds ``m-slerp``, a bfloat16 per-tensor SLERP of ``a1`` and ``b`` at t = 0.4 (session 36's
merge: the value checks of merges then read sampled rows over HTTP), and prints the merges found.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import os
import re
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage

TREE = {"a": "base", "b": "base", "a1": "a", "b1": "b", "c": "base2"}  # child -> parent
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")


def make_model(width: int, blocks: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A llama-shaped state dict of t(5)-like weights (heavy tails, as trained weights have)."""
    mlp, out = int(width * 2.75), {}
    out["embed_tokens.weight"] = torch.randn(4 * width, width, generator=gen)  # (vocab, width)
    for b in range(blocks):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"layers.{b}.self_attn.{m}.weight"] = torch.randn(width, width, generator=gen)
        out[f"layers.{b}.mlp.gate_proj.weight"] = torch.randn(mlp, width, generator=gen)
        out[f"layers.{b}.mlp.up_proj.weight"] = torch.randn(mlp, width, generator=gen)
        out[f"layers.{b}.mlp.down_proj.weight"] = torch.randn(width, mlp, generator=gen)
    return {k: v * torch.rsqrt(torch.distributions.Gamma(2.5, 2.5).sample(v.shape)) for k, v in out.items()}


def make_zoo(work: Path, width: int, blocks: int, seed: int = 0) -> list[Path]:
    """The zoo's files (written when absent), in name order."""
    names = ["base", "base2", *TREE]
    files = [work / f"{n}.safetensors" for n in sorted(names)]
    if all(f.is_file() for f in files):
        return files
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    weights = {"base": make_model(width, blocks, gen), "base2": make_model(width, blocks, gen)}
    for child, parent in TREE.items():  # parents first in TREE's order
        weights[child] = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=gen)
                          for k, v in weights[parent].items()}
    for name, tensors in weights.items():
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(work / f"{name}.safetensors"))
    return files


def add_slerp_merge(work: Path, files: list[Path], t: float = 0.4) -> list[Path]:
    """``files`` and ``work/m-slerp.safetensors`` (written when absent): per tensor, SLERP of a1's and b's tensors as
    flat vectors at ``t`` (the weight of b), in float64, stored bfloat16."""
    target = work / "m-slerp.safetensors"
    if not target.is_file():
        from safetensors.torch import load_file

        a, b = (load_file(str(work / f"{n}.safetensors")) for n in ("a1", "b"))
        out = {}
        for k in a:
            fa, fb = a[k].double().flatten(), b[k].double().flatten()  # (n,) each
            theta = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
            mixed = (torch.sin((1 - t) * theta) * fa + torch.sin(t * theta) * fb) / torch.sin(theta)
            out[k] = mixed.view(a[k].shape).to(torch.bfloat16)
        save_file(out, str(target))
    return [*files, target]


class RangeHandler(BaseHTTPRequestHandler):
    """Serves the server's ``root`` folder, a ``Range`` of a file as 206 (read with seek + read, not the whole
    file), counting the body bytes sent in ``server.served``; HTTP/1.1, a connection kept open for the next
    request (``server.connections`` counts those accepted)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle would hold the body ~40 ms

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        time.sleep(self.server.latency)  # a network's round trip, simulated
        file = self.server.root / self.path.lstrip("/")
        m = _RANGE.match(self.headers.get("Range", ""))
        if not file.is_file() or m is None:
            self.send_error(404 if not file.is_file() else 400)
            return
        size = file.stat().st_size
        first, last = int(m[1]), min(int(m[2]), size - 1)
        with open(file, "rb") as f:
            f.seek(first)
            body = f.read(last - first + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with self.server.lock:
            self.server.served += len(body)
            self.server.requests += 1
        self.wfile.write(body)


class CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def verify_request(self, request, client_address):  # once per connection accepted
        with self.lock:
            self.connections += 1
        return True


def tls_context(work: Path) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1 (made with openssl in ``work``), which the
    client trusts through ``SSL_CERT_FILE`` (read by OpenSSL's default verify paths, urllib's and http.client's)."""
    key, cert = work / "tls_key.pem", work / "tls_cert.pem"
    if not cert.is_file():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
    os.environ["SSL_CERT_FILE"] = str(cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def serve(root: Path, latency: float = 0.0, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    srv = CountingServer(("127.0.0.1", 0), RangeHandler)
    if tls is not None:  # each connection's TLS handshake runs at its accept()
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    srv.root, srv.served, srv.requests, srv.lock, srv.latency = root, 0, 0, threading.Lock(), latency
    srv.connections = 0
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    return srv


def timed(models: list[str]):
    start = time.perf_counter()
    forest = recover_lineage(models)
    return time.perf_counter() - start, forest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="the server waits this long before each answer")
    ap.add_argument("--tls", action="store_true", help="https, with a self-signed certificate the client trusts")
    ap.add_argument("--slerp-merge", action="store_true", help="add a bfloat16 SLERP merge of a1 and b")
    args = ap.parse_args()
    files = make_zoo(args.work, args.width, args.blocks)
    files = add_slerp_merge(args.work, files) if args.slerp_merge else files
    srv = serve(args.work, args.latency_ms / 1000, tls_context(args.work) if args.tls else None)
    urls = [f"{'https' if args.tls else 'http'}://127.0.0.1:{srv.server_port}/{f.name}" for f in files]
    total = sum(f.stat().st_size for f in files)
    times = {"http": [], "local": []}
    for _ in range(args.repeats):
        before = srv.served, srv.requests
        t_http, remote = timed(urls)
        fetched, requests = srv.served - before[0], srv.requests - before[1]
        t_local, local = timed([str(f) for f in files])
        times["http"].append(t_http)
        times["local"].append(t_local)
    same = remote.to_dict() == local.to_dict()
    print(f"{len(files)} models, {total / 1e6:.1f} MB of files; fetched over HTTP {fetched / 1e6:.2f} MB "
          f"({100 * fetched / total:.1f} % of the files) in {requests} requests a run; {srv.connections} "
          f"connections in all {args.repeats} runs; forests equal: {same}")
    for kind, ts in times.items():
        print(f"{kind:>5}: recover_lineage {min(ts):.2f} s best of {len(ts)} ({', '.join(f'{t:.2f}' for t in ts)})")
    print("edges:", sorted((e["parent"], e["child"]) for e in local.to_dict()["edges"]))
    for name, rec in (remote.decisions.get("model_merges") or {}).items():
        print(f"merge {name}: parents {rec['parents']}, weights {rec['weights']}")
    srv.shutdown()


if __name__ == "__main__":
    main()
