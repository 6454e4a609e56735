"""Safetensors checkpoints read over HTTP(S), the bytes of the tensors read and no others.

``open_checkpoint("https://host/.../model.safetensors")`` reads the 8-byte header length and the JSON header
with two ``Range`` requests, checks the header as the local reader does (:func:`.safetensors_format.
header_length`, :func:`~.safetensors_format.parse_header`, against the size the server's ``Content-Range``
gives), then reads each tensor (and each run of rows :meth:`~.base.Checkpoint.read_rows` asks for) as one
request of exactly its bytes (:class:`.http_ranges.HttpRanges`). A ``model.safetensors.index.json`` URL is a
sharded model: its shards are the files the index names, beside it (resolved against the index's URL), each
opened at its first use. ``hf://org/name[@rev]`` is ``$HF_ENDPOINT/org/name/resolve/REV/`` (default endpoint
``https://huggingface.co``, REV ``main``): its ``model.safetensors.index.json``, else its ``model.safetensors``.

Lineage of fine-tunes of a large model compares some square matrices of each: read this way, a model's bytes
that lineage does not compare never cross the network (docs/weights.md, "Over HTTP"). Only safetensors is
read remotely: a ``.bin``/``.pt`` is a pickle, never unpickled from the network; GGUF and ONNX are refused too.
The model's name: ``org/name`` for a hub ``.../org/name/resolve/REV/FILE`` URL (``org/name@REV`` for a REV
other than ``main``), else the file's stem (the folder's name for ``model.safetensors``), as a local copy of it
is named. This module registers :func:`open_url` as a resolver, so :func:`~.registry.open_checkpoint`,
``open_many`` and ``atlas lineage recover URL ...`` take URLs. Time: one round trip per header, per tensor.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import torch

from modelatlas.errors import CheckpointError, as_url, folds_two_urls
from modelatlas.weights.base import Checkpoint, _file_stem, library_variant
from modelatlas.weights.dequantized import dequantized
from modelatlas.weights.hf_folder import HFFolderCheckpoint, parse_weight_map
from modelatlas.weights.http_ranges import HttpError, HttpRanges
from modelatlas.weights.packed_layers import config_of
from modelatlas.weights.registry import register_resolver
from modelatlas.weights.safetensors_format import SafetensorsCheckpoint, header_length, parse_header

_HUB_FILE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/")  # huggingface.co/org/name/resolve/REV/
_HF_ID = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^/?#\s]+))?/?$")
_INDEX = ".safetensors.index.json"
_LIBRARY_STEMS = {"model", "pytorch_model", "adapter_model", "diffusion_pytorch_model"}  # named by their folder
_AGAIN = 8  # tensors a file kept for a read announced again (lineage's merge test: 4)
_REFUSED = {".bin": "a pickle (PyTorch)", ".pt": "a pickle (PyTorch)", ".pth": "a pickle (PyTorch)",
            ".ckpt": "a pickle (PyTorch)", ".pkl": "a pickle", ".gguf": "GGUF", ".onnx": "ONNX"}


class RemoteSafetensorsCheckpoint(SafetensorsCheckpoint):
    """One ``.safetensors`` file at an ``http(s)://`` URL, its header read at open (two requests), each tensor
    one request of its bytes. ``url`` is the URL as given; ``path`` is ``Path(url)``, which folds its ``//`` (an
    error names the URL as given: :func:`~modelatlas.errors.as_url`)."""

    def __init__(self, url: str, name: str | None = None):
        Checkpoint.__init__(self, url, name if name is not None else url_name(url))
        self.url = url
        self._ranges = HttpRanges(url)
        head = self._ranges.fetch(0, 8, "the header length", exact=False).tobytes()  # a file under 8 bytes: what
        n = header_length(url, head, self._ranges.size, lambda: _text_reason(head))  # there is
        raw = self._ranges.fetch(8, n, "the header").tobytes() if n else b""
        self._header, self._data_start = parse_header(url, raw, self._ranges.size), 8 + n
        self._recent: dict[str, weakref.ref] = {}  # the last tensors read, while their reader holds them
        self._again: dict[str, torch.Tensor] = {}  # copies of some, for their next read (:meth:`prefetch`)
        self._keeping = threading.Lock()  # (threads may read one file at once)

    def _read(self, name: str) -> torch.Tensor:
        with self._keeping:
            kept = self._again.pop(name, None)
        if kept is not None:
            return kept
        t = super()._read(name)
        with self._keeping:
            self._recent.pop(name, None)
            self._recent[name] = weakref.ref(t)
            if len(self._recent) > _AGAIN:  # (a dict keeps its order: the oldest first)
                del self._recent[next(iter(self._recent))]
        return t

    def prefetch(self, name: str) -> None:
        """Fetch tensor ``name`` in the background for its next read; or, when it was one of the last tensors read
        and its reader still holds it, keep a copy of it for that read (at most :data:`_AGAIN` a file, until read
        or closed): lineage's merge test reads 4 matrices of a model before its pass reads them again, which over
        HTTP fetched their bytes twice. Time O(its bytes) for a copy."""
        with self._keeping:
            ref = None if name in self._again else self._recent.pop(name, None)
            t = None if ref is None or len(self._again) >= _AGAIN else ref()
            if t is not None:
                self._again[name] = t.clone()
            if name in self._again:
                return
        super().prefetch(name)

    def close(self) -> None:
        with self._keeping:
            self._again.clear()
        super().close()

    @property
    def fetched(self) -> int:
        """Bytes received from the server so far (header and tensors)."""
        return self._ranges.fetched

    def files(self) -> list[Path]:
        return []  # nothing on this machine

    def size_on_disk(self) -> int:
        """The size of the file on the server (from ``Content-Range``)."""
        return self._ranges.size


class RemoteShardedCheckpoint(HFFolderCheckpoint):
    """A sharded model at the URL of its ``model.safetensors.index.json``: the index read at open (one GET), each
    shard (a :class:`RemoteSafetensorsCheckpoint` at the shard's name resolved against the index's URL) opened
    at its first use, as :class:`~.hf_folder.HFFolderCheckpoint` opens local shards."""

    def __init__(self, url: str, name: str | None = None):
        Checkpoint.__init__(self, url, name if name is not None else url_name(url))
        self.url, self.weight_file, self._shards = url, Path(url), {}
        self._weight_map = parse_weight_map(url, HttpRanges(url).get_json_bytes("the shard index"))
        other = next((s for s in self._weight_map.values() if not s.endswith(".safetensors")), None)
        if other is not None:
            raise CheckpointError(url, f"the index lists shard {other!r}: only .safetensors shards are read over "
                                       "HTTP (a .bin shard is a pickle, never unpickled from the network)")

    def _shard(self, file_name: str) -> Checkpoint:
        if file_name not in self._shards:
            self._shards[file_name] = RemoteSafetensorsCheckpoint(beside(self.url, file_name))
        return self._shards[file_name]

    @property
    def fetched(self) -> int:
        """Bytes received from the server so far by the shards opened (not counting the index)."""
        return sum(s.fetched for s in self._shards.values())

    def files(self) -> list[Path]:
        return []

    def size_on_disk(self) -> int:
        """The shards' sizes on the server (each shard's header is read)."""
        return sum(self._shard(s).size_on_disk() for s in dict.fromkeys(self._weight_map.values()))


def _text_reason(head: bytes) -> str | None:
    """What a file's first bytes say it is when they are text, not safetensors: a Git LFS pointer or a web page."""
    if head.startswith(b"version "):
        return "a Git LFS pointer file, not the weights: give the URL of the file itself (a hub's /resolve/ URL)"
    if head.lstrip().startswith(b"<"):
        return "a web page, not the weights (a hub's /blob/ URL gives one): give its /resolve/ URL"
    return None


def open_url(text: str, **kwargs) -> Checkpoint | None:
    """The checkpoint at URL ``text`` (also one folded by ``Path``), None when ``text`` is no URL. Reader options
    (``base=``) do not apply over HTTP."""
    url = as_url(text)
    if url is None:
        return None
    if folds_two_urls(text):
        raise CheckpointError(url, "two URLs given differ only in a '//' of their paths, and this one went through a "
                                   "file path, which folds '//' to '/': open each alone")
    options = sorted(k for k, v in kwargs.items() if v is not None)
    if options:
        raise CheckpointError(url, f"option(s) {', '.join(options)} do not apply to a checkpoint read over HTTP")
    ck = _open(url)
    return dequantized(ck, lambda: remote_quantization_config(ck))


def beside(url: str, file_name: str) -> str:
    """The URL of ``file_name`` in the folder of the file at ``url``: its path up to its last ``/``, verbatim
    (``urljoin`` drops the empty parts of a path, folding ``//``), without ``url``'s query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rpartition("/")[0] + "/" + quote(file_name), "", ""))


def remote_quantization_config(ck: Checkpoint) -> dict:
    """The ``quantization_config`` of a model read over HTTP, from the files beside it that a local copy reads
    (:func:`~.packed_layers.quantization_config`: ``config.json``, then AutoGPTQ's ``quantize_config.json``...;
    one GET each, until one has settings; a 404 is no such file) when it is a model folder's: a shard index, a
    ``model.safetensors`` (or a variant: ``model.fp16.safetensors``), an ``hf://`` model. {} for a lone file,
    as for a local one. Time: a round trip a file asked for."""
    file = unquote(urlsplit(ck.url).path).rpartition("/")[2]
    folder_model = isinstance(ck, RemoteShardedCheckpoint) or _file_stem(file) in _LIBRARY_STEMS
    if not folder_model and library_variant(file) is None:
        return {}
    return config_of(lambda name: _small_file(beside(ck.url, name), name), lambda name: beside(ck.url, name))


def _small_file(url: str, name: str) -> bytes | None:
    """The bytes of the (small, JSON) file at ``url``; None when the server has none (HTTP 404)."""
    try:
        return HttpRanges(url).get_json_bytes(name)
    except HttpError as e:
        if e.code == 404:
            return None
        raise


def _open(url: str) -> Checkpoint:
    if url.startswith("hf://"):
        return _open_hub(url)
    path = unquote(urlsplit(url).path)
    if path.endswith(".safetensors"):
        return RemoteSafetensorsCheckpoint(url)
    if path.endswith(_INDEX):
        return RemoteShardedCheckpoint(url)
    kind = next((what for ext, what in _REFUSED.items() if path.endswith((ext, ext + ".index.json"))), None)
    if kind is not None:
        return _refuse(url, kind)
    raise CheckpointError(url, "not a .safetensors file or a model.safetensors.index.json: only safetensors is "
                               "read over HTTP")


def _refuse(url: str, kind: str) -> Checkpoint:
    why = "never unpickled from the network" if "pickle" in kind else "not read over HTTP"
    raise CheckpointError(url, f"this URL is {kind}, {why}: only safetensors is read over HTTP (download the file "
                               "and give its path, or give the model's .safetensors URL)")


def _open_hub(url: str) -> Checkpoint:
    """``hf://org/name[@rev]``: its shard index, else (HTTP 404) its ``model.safetensors``, named ``org/name``."""
    base = hub_base(url)
    try:
        return RemoteShardedCheckpoint(base + "model.safetensors.index.json", url_name(url))
    except HttpError as e:
        if e.code != 404:
            raise
    try:
        return RemoteSafetensorsCheckpoint(base + "model.safetensors", url_name(url))
    except HttpError as e:
        if e.code != 404:
            raise
        raise CheckpointError(url, f"neither model.safetensors.index.json nor model.safetensors at {base} (HTTP "
                                   "404): check the model's id and revision (HF_ENDPOINT sets the server)") from None


def hub_base(url: str) -> str:
    """The folder URL of ``hf://org/name[@rev]``: ``${HF_ENDPOINT:-https://huggingface.co}/org/name/resolve/REV/``."""
    m = _HF_ID.match(url)
    if m is None:
        raise CheckpointError(url, "not a hub model URL: expected hf://org/name or hf://org/name@revision")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{m['repo']}/resolve/{quote(m['rev'] or 'main', safe='')}/"


def url_name(text: str) -> str | None:
    """The model name of URL ``text`` (see the module's docstring), None when ``text`` is no URL."""
    url = as_url(text)
    if url is None:
        return None
    if url.startswith("hf://"):
        m = _HF_ID.match(url)
        return url.removeprefix("hf://").rstrip("/") if m is None else m["repo"] + (f"@{m['rev']}" if m["rev"] else "")
    parts = urlsplit(url)
    m = _HUB_FILE.match(parts.path)
    if m is not None:
        rev = unquote(m["rev"])
        return unquote(m["repo"]) + ("" if rev == "main" else f"@{rev}")
    names = [unquote(s) for s in parts.path.split("/") if s] or [parts.netloc]
    file = names[-1].removesuffix(_INDEX)
    stem = _file_stem(file) or file  # (x.bin: named x, as a local x.bin is)
    return names[-2] if stem in _LIBRARY_STEMS and len(names) > 1 else stem


register_resolver(open_url, url_name)
