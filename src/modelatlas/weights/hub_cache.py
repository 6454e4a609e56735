"""Hugging Face hub ids (``org/name``, a bare ``name`` such as ``gpt2``, either with ``@revision``) resolved
from the LOCAL hub cache only.

modelatlas never downloads. The cache is found as huggingface_hub finds it (:func:`hub_cache_dir`), in the
layout ``huggingface_hub`` writes: ``models--org--name/refs/<branch>`` holds a commit hash and
``models--org--name/snapshots/<hash>/`` holds the files (usually links into ``blobs/``). The snapshot folder
is then opened like any model folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, hub_folder_name, is_commit
from modelatlas.weights.registry import open_checkpoint, register_resolver

# org/name, or a bare name (the hub's older ids: gpt2, bert-base-uncased, cached as models--gpt2)
_HUB_ID = re.compile(r"^(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".gguf", ".json")
_SHORT = re.compile(r"^[0-9a-f]{7,39}$")  # a commit shortened as git and model names do


def hub_cache_dir() -> Path:
    """The local hub cache folder, from the environment variables huggingface_hub reads, in its order:
    ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE`` (its older name), ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``; ``~`` and ``$VAR`` expanded."""
    for var, below in (("HF_HUB_CACHE", ()), ("HUGGINGFACE_HUB_CACHE", ()), ("HF_HOME", ("hub",)),
                       ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var]))).joinpath(*below)
    return Path.home() / ".cache" / "huggingface" / "hub"


def parse_hub_id(text: str) -> tuple[str, str] | None:
    """``(repo_id, revision)`` if ``text`` looks like ``[org/]name[@rev]`` (not a model file path), else None."""
    m = _HUB_ID.match(text)
    if not m or m["repo"].endswith(_MODEL_SUFFIXES) or ".." in text or (m["rev"] or "").startswith("/"):
        return None
    return m["repo"], m["rev"] or "main"


def resolve_hub_id(text: str) -> Path:
    """The snapshot folder of hub id ``text`` in the local cache; CheckpointError when it is not cached."""
    parsed = parse_hub_id(text)
    if parsed is None:
        raise CheckpointError(text, "not a Hugging Face hub id (expected org/name or org/name@revision)")
    repo_id, rev = parsed
    cache = hub_cache_dir()
    repo = cache / hub_folder_name(repo_id)
    hint = (f"modelatlas does not download; fetch it first (`huggingface-cli download {repo_id}`) "
            "or set HF_HUB_CACHE")
    if not repo.is_dir():
        raise CheckpointError(text, f"no such file or folder, and hub id {repo_id!r} is not in the local "
                                    f"Hugging Face cache at {cache} ({hint})")
    commit = rev if is_commit(rev) else _read_ref(repo / "refs" / rev) or _short_commit(repo, rev, text)
    snapshot = repo / "snapshots" / (commit or "")
    if not commit or not snapshot.is_dir():
        raise CheckpointError(text, f"revision {rev!r} of {repo_id!r} is not in the local Hugging Face cache at "
                                    f"{cache} ({hint}){_cached_revisions(repo, repo_id)}")
    return snapshot


def _cached_revisions(repo: Path, repo_id: str) -> str:
    """'; it holds org/name@abc1234 (give that)' for the snapshots cached (a download by commit writes no
    ``refs/main``, so the plain id found nothing though the model is there); '' when none is."""
    found = _snapshots(repo)
    if not found:
        return ""
    shown = ", ".join(f"{repo_id}@{c[:7]}" for c in found[:3]) + (", ..." if len(found) > 3 else "")
    return f"; it holds {shown} (give {'that' if len(found) == 1 else 'one of them'})"


def _short_commit(repo: Path, rev: str, text: str) -> str | None:
    """The cached commit that hex ``rev`` (7+ digits) starts: a snapshot given as a path is named
    ``org/name@<first 7 digits>``, so that name given back must open it. None when no snapshot matches."""
    if not _SHORT.match(rev):
        return None
    found = [c for c in _snapshots(repo) if c.startswith(rev)]
    if len(found) > 1:
        raise CheckpointError(text, f"revision {rev!r} is the start of {len(found)} cached commits "
                                    f"({', '.join(found)}); give more of the commit hash")
    return found[0] if found else None


def _snapshots(repo: Path) -> list[str]:
    """The commits whose snapshot folders the cached ``repo`` holds, sorted; none when it has no snapshots."""
    try:
        return sorted(p.name for p in (repo / "snapshots").iterdir() if is_commit(p.name) and p.is_dir())
    except OSError:
        return []


def _read_ref(ref: Path) -> str | None:
    """The commit hash in ``refs/<branch>``, None when the ref is absent. huggingface_hub writes exactly 40 hex
    digits there; anything else (``../../elsewhere``, an absolute path) would name a folder outside the cache
    once joined to ``snapshots/``, so it is refused, naming the ref file."""
    try:
        text = ref.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not is_commit(text):
        raise CheckpointError(ref, f"corrupt Hugging Face cache ref: holds {text[:80]!r}, not a commit hash "
                                   "(40 hex digits)")
    return text


def open_hub_id(text: str, **kwargs) -> Checkpoint | None:
    """Open a cached hub model by id, named ``org/name`` (``org/name@rev`` when a revision is given: two
    revisions of one model, both named ``org/name``, were refused as one name); None when ``text`` is not a
    hub id at all."""
    if parse_hub_id(text) is None:
        return None
    snapshot = resolve_hub_id(text)
    ck = open_checkpoint(snapshot, **kwargs)
    ck.name = hub_name(text)
    return ck


def hub_name(text: str) -> str | None:
    """The model name of hub id ``text``: ``org/name``, with ``@rev`` when a revision is given; None when ``text``
    is no hub id (an absolute path is none)."""
    parsed = None if Path(text).is_absolute() else parse_hub_id(text)
    return None if parsed is None else parsed[0] + (text[text.index("@"):] if "@" in text else "")


register_resolver(open_hub_id, hub_name)
