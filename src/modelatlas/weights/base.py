"""The checkpoint interface every format reader implements."""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError, TensorNotFoundError, error_line, same_form  # noqa: F401 (importable from here too)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape and dtype (as a torch dtype name such as ``"float32"``), read from a header."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint(ABC):
    """A model's weights on disk, read lazily.

    Subclasses implement :meth:`_infos` (the tensor list, from headers only) and :meth:`_read` (one tensor).
    ``name`` is the model's display name: its file or folder name without extension.
    Use as a context manager, or call :meth:`close`, to release file handles.
    """

    format: str = "?"
    #: ``"full"`` for plain weights; ``"lora_delta"`` when tensors are LoRA updates ``dW`` (see peft_lora).
    kind: str = "full"
    #: What the reader removed from the front of every stored tensor name (``"module."`` of a DDP save, a
    #: Lightning module's ``"model."``: see torch_pickle), so that nothing is hidden; ``""`` for names as stored.
    name_prefix: str = ""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name if name is not None else _stem(self.path)
        self._info_cache: dict[str, TensorInfo] | None = None

    @abstractmethod
    def _infos(self) -> list[TensorInfo]:
        """Every tensor's info, without reading tensor data."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor (its name is known to exist)."""

    def tensors(self) -> list[TensorInfo]:
        """Every tensor's name, shape and dtype, in file order, without reading data."""
        return list(self._index().values())

    def keys(self) -> list[str]:
        return list(self._index())

    def tensor_names(self) -> list[str]:
        """Every tensor's name, as cheaply as the format allows (a sharded folder: from its index, opening no
        shard); :meth:`keys` by default."""
        return self.keys()

    def info(self, name: str) -> TensorInfo:
        index = self._index()
        if name not in index:
            raise TensorNotFoundError(self.path, f"no tensor named {name!r} ({_count_and_close(name, index)})")
        return index[name]

    def read(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` as a CPU torch tensor in its stored dtype (dequantized for quantized formats)."""
        self.info(name)  # raises a clear error for unknown names
        return self._read(name)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (a 1-D integer tensor, any order) of tensor ``name`` seen as a matrix of rows of its
        last dimension (``read(name).reshape(-1, shape[-1])[rows]``: (r, m), dtype as :meth:`read`; a 0-d
        tensor is one row of one value). This default reads the whole tensor; formats that store rows as byte
        ranges (safetensors, GGUF) read only those rows' bytes. Time O(P) here, O(r m) there."""
        x = self.read(name)
        shape = (math.prod(x.shape[:-1]), x.shape[-1]) if x.ndim else (1, 1)  # not -1: rows of no value, (3, 0)
        return x.reshape(shape)[rows]  # (R, m) -> (r, m)

    def compared_rows(self, name: str, max_rows: int = 256) -> torch.Tensor | None:
        """The rows (as :meth:`read_rows` counts them, ascending) that :meth:`requantized_match` and
        :meth:`grid_position` compare when given the whole tensor, for a format that compares a sample of
        ``max_rows`` rows: those methods then take :meth:`read_rows` of another model's tensor at these rows
        in place of all of it (the copy test reads 256 rows of each source it tests, not its whole layers).
        None (this default) when they need the whole tensor. Header only."""
        return None

    def quantization(self, name: str) -> str | None:
        """The block-quantization type tensor ``name`` is stored in (a GGUF ``"Q8_0"``, ...), None for a
        tensor stored as plain numbers (whose dtype :meth:`info` gives). Header only."""
        return None

    def requantized_match(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        """For a block-quantized tensor: the share of its stored values that quantizing ``x`` (same shape)
        the same way gives exactly, so 1.0 when this tensor is ``x`` quantized. None when the tensor is not
        block-quantized or its type has no quantizer here. ``rows``: :meth:`compared_rows`, when ``x`` is
        only those rows (:meth:`read_rows` at them); any other ``x`` of another shape is refused (None)."""
        return None

    def grid_match(self, name: str, x: torch.Tensor, slack: float = 0.0,
                   rows: torch.Tensor | None = None) -> float | None:
        """For a layer stored as integer codes on a grid of its own scales and zeros (GPTQ, AWQ, compressed-tensors
        ``pack-quantized``, GGUF's legacy types and K-quants): the share of its codes that are a nearest rounding
        of ``x`` (same shape) on that grid, ``x`` known up to a relative error ``slack``; values beyond an end
        code count at it (clamped or clipped). 1.0 for the model rounded; None for other tensors. ``rows``: as
        for :meth:`requantized_match`. Time O(P)."""
        return None

    def grid_position(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        """For a quantized tensor: where ``x``'s values sit on its levels, ~0.5 when spread between them (the
        model it was quantized from), near 0 when on them (a model made from its dequantized values). None
        when the tensor is not quantized or its format has no such test. ``rows``: as for
        :meth:`requantized_match`."""
        return None

    def rounding_variance(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """For a quantized tensor: the variance of the error its rounding added to each value, float32 of the
        tensor's shape (``step**2 / 12`` where the levels around a value are ``step`` apart: the error of
        rounding to the nearest is uniform over one step). Lineage subtracts it from distances and moments, so
        a quantized copy of an absent model stands in for it (a 4-bit rounding moves weights ~8 % of their
        RMS, as far as a fine-tune). None when the tensor is not quantized or its format gives none.
        ``values``: the tensor as :meth:`read` gave it (any shape of its size, any float dtype that holds its
        values exactly), when the caller has it: a format whose variance needs the values (a GGUF block's
        exact codes, an IQ4 value's neighbours, a merged QLoRA model's blocks) takes them in place of
        reading and dequantizing the tensor again; the result is the same."""
        return None

    def rounding_moments(self, name: str) -> torch.Tensor | None:
        """For a quantized tensor whose rounding error depends on the values (not uniform over a step and
        independent of them: a value rounded to 0 has itself as its error): (4,) float64, the expected change
        the rounding made to the sums of the values' first four powers, ``sum E[x^m] - w^m`` for m = 1..4.
        None (the default) where the uniform model holds; lineage then corrects the moments from
        :meth:`rounding_variance` alone. Asked right after :meth:`rounding_variance` of the same tensor."""
        return None

    def least_squares(self, name: str) -> bool | None:
        """For a quantized tensor: whether its scales were fitted by least squares (so its rounding error is not
        independent of the values: each block's largest shrinks), not set by each block's extremes (round to
        nearest). None (this default) where the format does not tell."""
        return None

    def stored_tensors(self) -> list[TensorInfo]:
        """The tensors as its own files store them (header only): :meth:`tensors` for most formats; a LoRA
        adapter's A and B factors, not the updates it exposes (its parameter count)."""
        return self.tensors()

    def files(self) -> list[Path]:
        """The files its reader reads (their bytes are its size on disk): the file itself; for a folder, the
        regular files directly in it. Readers of several files (shards, external data) list theirs."""
        if not self.path.is_dir():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.is_file())

    def size_on_disk(self) -> int:
        """The bytes of :meth:`files`, links followed (a hub cache snapshot's files are links to its blobs)."""
        total = 0
        for f in self.files():
            try:
                total += f.stat().st_size
            except OSError as e:  # removed or unreadable since it was opened
                raise CheckpointError(self.path, f"cannot stat {f}: {e.strerror or e}") from e
        return total

    def prefetch(self, name: str) -> None:  # noqa: B027 - optional hook, a no-op for most formats
        """Hint that tensor ``name`` will be read soon, so its bytes can be fetched from storage while the
        caller computes (overlapping a cold read with work). Never reads, never raises; a no-op by default."""

    def __contains__(self, name: object) -> bool:
        return name in self._index()

    def close(self) -> None:  # noqa: B027 - optional hook, most readers hold no handle
        """Release file handles (the default reader holds none)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, name={self.name!r})"

    def _index(self) -> dict[str, TensorInfo]:
        if self._info_cache is None:
            self._info_cache = {t.name: t for t in self._infos()}
        return self._info_cache


def spaced_rows(n: int, max_rows: int) -> torch.Tensor:
    """Up to ``max_rows`` evenly spaced indices of ``n`` rows, first and last included, ascending: the rows a
    quantized layer's copy test samples (a copy matches on every row, a fine-tune on few). (r,) int64."""
    return torch.linspace(0, n - 1, min(max_rows, n)).round().long().unique()


def shared_first_component(names: Iterable[str]) -> str | None:
    """``"model."`` when every name is ``model.<something>`` (one first dotted component, more after it), else
    None (also for no names). Time O(names)."""
    names = iter(names)
    first = next(names, None)
    prefix = None if first is None else first.partition(".")[0] + "."
    if prefix is None or len(first) <= len(prefix) or not first.startswith(prefix):
        return None
    return prefix if all(n.startswith(prefix) and len(n) > len(prefix) for n in names) else None


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def lfs_pointer_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read when it is a text file standing in for the weights, else None: a Git LFS
    pointer (a repository cloned without Git LFS leaves a ~130-byte text file in place of the weights), or a web
    page saved under the weights' name (``wget`` of a Hugging Face ``/blob/`` link). Each reader's own error
    ("header length 2336927755350992246", "Unsupported operand 118", "Unsupported operand 60") hid that. Reads
    at most 512 bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(_LFS_POINTER):
        return ("a Git LFS pointer file, not the weights (the repository was cloned without Git LFS): run "
                "`git lfs pull` there, or download the file itself")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<!doctype html", b"<html")):
        return ("an HTML page, not the weights (a web page saved under the file's name, as a Hugging Face "
                "'/blob/' link gives): download the file itself ('/resolve/' link, or `huggingface-cli download`)")
    return None


def misnamed_reason(path: Path, read_as: str) -> str | None:
    """Why ``path``, read as ``read_as`` ("safetensors", "PyTorch") by its extension, failed when its bytes are
    another weights format's (a torch.save file named .safetensors, a safetensors file named .bin), with the
    rename that fixes it; else None. Each reader's error ("header length 578712552184433488", "Unsupported
    operand 64") hid that. Reads 9 bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    # safetensors before the pickle's PROTO byte: a truncated safetensors file whose header length starts with
    # 0x80 is one still (its byte 8 opens the JSON header; a zip's or a legacy pickle's is no "{")
    if head.startswith(b"GGUF"):
        found, ext = "a GGUF file", ".gguf"
    elif head.startswith(b"PK\x03\x04"):
        found, ext = "a PyTorch file (what torch.save writes)", ".pt"
    elif head[8:] == b"{":
        found, ext = "a safetensors file", ".safetensors"
    elif head.startswith(b"\x80"):
        found, ext = "a PyTorch file (what torch.save writes)", ".pt"
    else:
        return None
    if found.startswith(f"a {read_as}"):
        return None
    return f"{found}, not a {read_as} file as its extension says: rename it to end in {ext}"


@contextmanager
def utf8_path(path: Path) -> Iterator[str]:
    """``path`` as a name that libraries reading it in Rust or C++ accept (safetensors, torch's memory map): the
    path itself when it is valid UTF-8; else (a Linux file name of other bytes, which Python holds as surrogate
    escapes, e.g. ``b"m\\xe9"``) ``/proc/self/fd/N`` of the file opened here, an ASCII name for the same file.
    The descriptor is closed on exit; a library that opened or mapped the file by then keeps its own.
    Raises OSError when the file cannot be opened."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:  # (not in the try: a UnicodeEncodeError of the caller's block is no reason to open the file)
        yield str(path)
        return
    if not os.path.isdir("/proc/self/fd"):
        raise CheckpointError(path, "the file name is not valid UTF-8, which the reader needs on this system; "
                                    "rename the file")
    fd = os.open(path, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def folder_name(path: Path) -> str:
    """The last name in ``path``; for ``.`` and ``..`` (no name of their own) that of the folder they stand for;
    for a hub cache snapshot (``models--org--name/snapshots/<commit>``), ``org/name@<commit[:7]>``: the commit
    hash alone, the folder's own name, says nothing of which model it is."""
    if path.name not in ("", "..") and path.parent.name not in ("", "..", "snapshots"):
        return path.name  # (the common case without abspath: it was a third of opening 1,000 small files)
    full = Path(os.path.abspath(path))
    name = full.name if path.name in ("", "..") else path.name
    repo = hub_repo_id(full.parent.parent.name)
    if repo is not None and full.parent.name == "snapshots" and is_commit(name):
        return f"{repo}@{name[:7]}"
    return name


# The layout huggingface_hub writes (see modelatlas.weights.hub_cache): a model org/name is cached in the
# folder models--org--name, its files in models--org--name/snapshots/<commit>
_HUB_PREFIX = "models--"


def hub_folder_name(repo_id: str) -> str:
    """The hub cache's folder of hub id ``repo_id``: ``org/name`` -> ``models--org--name``."""
    return _HUB_PREFIX + repo_id.replace("/", "--")


def hub_repo_id(name: str) -> str | None:
    """The hub id ``org/name`` of a hub cache folder's name ``models--org--name``; None for another name."""
    return name.removeprefix(_HUB_PREFIX).replace("--", "/") if name.startswith(_HUB_PREFIX) else None


def is_commit(text: str) -> bool:
    """Whether ``text`` is a commit hash as the hub cache names a snapshot and writes a ref: 40 lowercase hex
    digits."""
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


# File names a saving library chose, not the user (transformers, PEFT, diffusers): such a file is named by the
# folder holding it, so that runA/model.safetensors and runB/model.safetensors are "runA" and "runB".
_LIBRARY_FILE_NAMES = {"model", "pytorch_model", "adapter_model", "diffusion_pytorch_model"}
_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".onnx", ".gguf", ".ckpt")


def _file_stem(name: str) -> str | None:
    """``name`` without a checkpoint extension, or None when it has none."""
    return next((name[: -len(ext)] for ext in _EXTENSIONS if name.endswith(ext)), None)


def variant_of(file_name: str, name: str) -> str | None:
    """The variant that ``file_name`` is of the library file ``name`` (``model.fp16.safetensors`` of
    ``model.safetensors``: "fp16"), None when it is none. transformers' _add_variant puts it before the last
    suffix (``model.safetensors.index.fp16.json``); no "-" in it, so that its shards
    (``model.fp16-00001-of-00002.safetensors``) are no variants."""
    head, _, ext = name.rpartition(".")
    m = re.fullmatch(re.escape(head) + r"\.(\w+)\." + re.escape(ext), file_name)
    return m[1] if m else None


def library_variant(name: str) -> str | None:
    """The variant of a file of a library's standard name (``diffusion_pytorch_model.fp16.safetensors``:
    "fp16"), None for the plain name (``model.safetensors``) or another one."""
    stem = _file_stem(name) or ""
    library = stem.partition(".")[0]
    return variant_of(name, library + name[len(stem):]) if library in _LIBRARY_FILE_NAMES else None


def named_by_folder(path: Path) -> bool:
    """Whether ``path`` is a file of a library's standard name (``model.safetensors``, ``pytorch_model.bin``,
    ...) in a folder with a name, and so is named after that folder; also a variant of one that the library
    saved beside its ``config.json`` (``unet/diffusion_pytorch_model.fp16.safetensors``; not a shard
    ``model-00001-of-...``, nor ``model.1.pt`` among epochs of a run, which keep their own names)."""
    name = folder_name(path)
    if folder_name(path.parent) == "":
        return False
    if _file_stem(name) in _LIBRARY_FILE_NAMES:
        return True
    return library_variant(name) is not None and (path.parent / "config.json").is_file()


def _stem(path: Path) -> str:
    """Model name from a path: the file or folder name without its extension(s); for a file of a library's
    standard name (:func:`named_by_folder`), the name of its folder."""
    if named_by_folder(path):
        return folder_name(path.parent)
    name = folder_name(path)
    stem = _file_stem(name)
    return name if stem is None else stem


def _count_and_close(name: str, names) -> str:
    """'8 tensors; closest: a, b' -- the size of a checkpoint (a file or a folder) and the names nearest ``name``."""
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    count = f"{len(names)} tensor" + ("" if len(names) == 1 else "s")
    return count + (f"; closest: {', '.join(close)}" if close else "")
