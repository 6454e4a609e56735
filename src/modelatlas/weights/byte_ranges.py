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


def memory_limit() -> tuple[int, str] | None:
    """(bytes, what they are): the most that one buffer can hold on this machine, its memory and swap
    (``MemTotal`` + ``SwapTotal`` of /proc/meminfo), else its memory (``sysconf``, where there is no
    /proc/meminfo: macOS); None where the system says neither. Swap counts: this bounds a size that could never
    be held (a header served may state any), not what is free now. Linux's default overcommit refuses one
    allocation over memory and swap only, so a local read (``np.empty``) takes a tensor under that, and the
    same tensor over HTTP was refused on a machine with swap; what is free changes while a lineage runs (and
    evicts the page cache), and the body's memory already follows the bytes received. Time O(1)."""
    try:
        with open(_MEMINFO) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        memory, swap = (int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
        return memory + swap, "memory and swap" if swap else "memory"
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"
    except (AttributeError, ValueError, OSError):
        return None


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
