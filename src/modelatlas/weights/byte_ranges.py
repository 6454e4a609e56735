"""Exact byte ranges of a checkpoint file: a tensor's bytes and no more.

Readers of formats whose tensors are raw byte ranges (safetensors, GGUF) used to read them through a memory
map. Each page fault of a map brings in the kernel's readahead around it, up to ``read_ahead_kb`` (8 MB on the
development machine's disk; 128 KB is common): lineage recovery of seven bfloat16 1B models, which compares a
ninth of their bytes, read 5.42 GB from a cold cache for 1.88 GB of layers (docs/benchmarks.md, "Session 31:
lineage at the scale users have"). Here a range is read with one ``readinto`` into the caller's buffer, the file
advised ``POSIX_FADV_RANDOM`` (no readahead), and :meth:`ByteRanges.prefetch` asks for exactly the range that
comes next. A file cut short after it was opened is reported at the read (a map read the missing bytes as
zeros, or raised SIGBUS). Time O(bytes) a read.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from modelatlas.errors import CheckpointError


class ByteRanges:
    """One file's byte ranges, read through one unbuffered handle (opened at the first use, kept until
    :meth:`close`; a read after it opens the file again)."""

    gap_bytes = 0  # unwanted bytes read between two wanted rows rather than a second read (a disk seeks cheaply)

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._lock = threading.Lock()  # opening the file; seek and read where there is no preadv

    def _file(self):
        """The open handle; opened under the lock, so two threads' first reads open the file once (each had
        opened it, and one's handle, replaced and closed, failed its read: "Bad file descriptor")."""
        with self._lock:
            if self._handle is None:
                try:
                    self._handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
                except OSError as e:
                    raise CheckpointError(self.path, f"cannot read file: {e.strerror or e}") from e
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            return self._handle

    def read_into(self, offset: int, buf: memoryview, what: str) -> None:
        """Fill ``buf`` (a writable buffer of the range's length) with the bytes at ``offset``; ``what`` names the
        range in errors (``"tensor 'a'"``)."""
        got = 0
        try:
            f = self._file()
            # one read(2) returns at most 0x7ffff000 bytes on Linux: a tensor over 2 GiB (a 70B model's
            # embedding) takes several; 0 is the end of the file
            while got < buf.nbytes and (n := self._read_at(f, buf[got:], offset + got)):
                got += n
        except OSError as e:
            raise CheckpointError(self.path, f"cannot read {what}: {e.strerror or e}") from e
        if got != buf.nbytes:  # the sizes were checked against the file at open: it changed since
            raise CheckpointError(self.path, f"cannot read {what}: the file ends {buf.nbytes - got} bytes short of "
                                             "it (changed or truncated after it was opened)")

    def read(self, offset: int, length: int, what: str) -> np.ndarray:
        """The ``length`` bytes at ``offset`` as a uint8 array of their own; a one-line CheckpointError when
        that is more than memory can hold (a header may state any size)."""
        try:
            buf = np.empty(length, dtype=np.uint8)
        except MemoryError:
            raise CheckpointError(self.path, f"{what} is {length} bytes, more than this machine's memory can "
                                             "hold") from None
        self.read_into(offset, memoryview(buf), what)
        return buf

    def read_rows(self, offset: int, width: int, rows: np.ndarray, what: str) -> np.ndarray:
        """Rows ``rows`` (ascending, distinct indices) of the rows of ``width`` bytes stored one after another
        from ``offset``, as (r, width) uint8: each run of rows at most :attr:`gap_bytes` apart one read (local
        files: consecutive rows only, so only those rows come off the disk: 256 rows of a 2048-row layer are an
        eighth of it; the rows between are read and dropped). Time O(r width), O(span) with gaps."""
        out = np.empty((len(rows), width), dtype=np.uint8)
        for a, b in self._runs(width, rows):
            first, last = int(rows[a]), int(rows[b - 1])
            if last - first + 1 == b - a:  # no gap: straight into out
                self.read_into(offset + first * width, memoryview(out[a:b].reshape(-1)), what)
                continue
            span = np.empty((last - first + 1, width), dtype=np.uint8)  # (rows of the span, width)
            self.read_into(offset + first * width, memoryview(span.reshape(-1)), what)
            out[a:b] = span[rows[a:b] - first]
        return out

    def _runs(self, width: int, rows: np.ndarray) -> list[tuple[int, int]]:
        """(a, b) for each run ``rows[a:b]`` of rows read as one range: none more than :attr:`gap_bytes` apart."""
        skip = self.gap_bytes // max(width, 1)  # rows between two wanted ones worth reading rather than a new read
        cuts = np.flatnonzero(np.diff(rows) > skip + 1) + 1  # where a read's run of rows ends
        return list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist())) if len(rows) else []

    def _read_at(self, f, view: memoryview, offset: int) -> int:
        """Bytes read into ``view`` from ``offset``: ``os.preadv``, which leaves the file position alone, so two
        threads reading one checkpoint cannot interleave a seek and a read; seek and read under a lock where
        the system has no ``preadv`` (Windows)."""
        if hasattr(os, "preadv"):
            return os.preadv(f.fileno(), [view], offset)
        with self._lock:
            f.seek(offset)
            return f.readinto(view)

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to read the range into the page cache in the background (``POSIX_FADV_WILLNEED``); a
        no-op for an empty range (length 0 would advise the rest of the file), where unsupported, or when the
        file cannot be opened."""
        if length <= 0 or not hasattr(os, "posix_fadvise"):
            return
        try:
            os.posix_fadvise(self._file().fileno(), offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, CheckpointError):
            pass

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None


_MEMINFO = Path("/proc/meminfo")
_SELF_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def memory_limit() -> tuple[int, str] | None:
    """(bytes, what they are): the most that one buffer can hold here: this machine's memory and swap
    (``MemTotal`` + ``SwapTotal`` of /proc/meminfo), else its memory (``sysconf``, where there is no
    /proc/meminfo: macOS), or this process's container limit where that is lower (:func:`container_limit`);
    None where the system says none of them. Swap counts: this bounds a size that could never be held (a header
    served may state any), not what is free now. Linux's default overcommit refuses one allocation over memory
    and swap only, so a local read (``np.empty``) takes a tensor under that, and the same tensor over HTTP was
    refused on a machine with swap; what is free changes while a lineage runs (and evicts the page cache), and
    the body's memory already follows the bytes received. Time O(1)."""
    machine = _machine_limit()
    swap = machine[2] if machine else 0
    box = container_limit(swap)
    if box is not None and (machine is None or box < machine[0]):
        return box, "container's memory limit (cgroup)"
    return None if machine is None else machine[:2]


def _machine_limit() -> tuple[int, str, int] | None:
    """(memory + swap, what they are, swap) of this machine (:func:`memory_limit`)."""
    try:
        with open(_MEMINFO) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        memory, swap = (int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
        return memory + swap, "machine's memory and swap" if swap else "machine's memory", swap
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine's memory", 0
    except (AttributeError, ValueError, OSError):
        return None


def container_limit(swap: int) -> int | None:
    """The memory this process's cgroup may use, swap included (at most ``swap``, the machine's), or None
    without a limit. Why: in a container (Docker's ``--memory``, a Kubernetes pod's limit) /proc/meminfo shows the
    host's memory, and a tensor over the container's limit gets the process killed, not an error. cgroup v2:
    ``memory.max`` + ``memory.swap.max``; v1: ``memory.memsw.limit_in_bytes`` (memory and swap), else
    ``memory.limit_in_bytes`` + ``swap``. The lowest limit of the process's cgroup (/proc/self/cgroup) and its
    ancestors': a pod's limit is often set on the parent of the container's own group, whose file says "max".
    Time O(depth)."""
    try:
        lines = _SELF_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" or "memory" in controllers.split(","):
            root = _CGROUP_ROOT if controllers == "" else _CGROUP_ROOT / "memory"
            found = [_level_limit(where, controllers == "", swap) for where in _levels(root, path)]
            found = [v for v in found if v is not None]
            if found:
                return min(found)
    return None


def _levels(root: Path, path: str) -> list[Path]:
    """The cgroup folder of ``path`` under ``root`` and each of its ancestors up to ``root``. O(depth)."""
    parts = [q for q in path.strip().split("/") if q]
    return [root.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]


def _level_limit(where: Path, v2: bool, swap: int) -> int | None:
    """One cgroup folder's limit, swap included (see :func:`container_limit`); None without one. O(1)."""
    if v2:
        memory, box_swap = _cgroup_value(where / "memory.max"), _cgroup_value(where / "memory.swap.max")
        return None if memory is None else memory + min(swap, swap if box_swap is None else box_swap)
    both, memory = (_cgroup_value(where / f"memory.{k}limit_in_bytes") for k in ("memsw.", ""))
    return both if both is not None else None if memory is None else memory + swap


def _cgroup_value(path: Path) -> int | None:
    """A cgroup limit file's bytes; None for no limit ("max", v1's ~2^63) or no such file."""
    try:
        text = path.read_text().strip()
        value = None if text == "max" else int(text)
    except (OSError, ValueError):
        return None
    return None if value is None or value >= _UNLIMITED else value


def distinct_rows(rows, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct indices of ``rows`` ascending, where each of ``rows`` is among them): what
    :meth:`ByteRanges.read_rows` reads for rows given in any order, repeated or not, a negative one counted from
    the end; an IndexError for an index outside ``-n..n-1`` or indices that are no integers (as indexing the
    tensor gives: this stood for it in safetensors and GGUF, whose rows -1 and True had read as errors and row 1).
    Time O(r log r)."""
    given = np.asarray(rows).reshape(-1)  # (r,)
    if len(given) and given.dtype.kind not in "iu":
        raise IndexError(f"row indices must be integers, not {given.dtype}")
    index = given.astype(np.int64)
    if len(index) and (index.min() < -n or index.max() >= n):
        raise IndexError(f"row index out of range for {n} rows: {index.min() if index.min() < -n else index.max()}")
    return np.unique(np.where(index < 0, index + n, index), return_inverse=True)
