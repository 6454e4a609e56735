"""Keep freed memory in the process: glibc ``malloc`` settings for CPU training loops.

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB) with a fresh ``mmap`` and returns
it to the kernel at ``free``. A training step on a batch of images allocates activations of tens to hundreds
of MiB and frees them at the end of the step, so the next step page-faults every 4 KiB page back in: on the
Fashion-MNIST RaT-BPTT run of ``docs/benchmarks.md`` (ConvNet-3 width 128, 1 thread) that was 71 s of kernel
time out of 160 s. With large blocks served from the heap and the heap never trimmed, the pages stay mapped
and are reused: 137 s -> 91 s for the same run, bit-identical results.

The cost: the process keeps its peak memory until it exits instead of handing freed blocks back. That is
the right trade for a process that trains (it will need the same memory at the next step), which is why
the ``atlas`` command line and the benchmarks call :func:`keep_freed_memory` and the library never does on
import. ``ATLAS_MALLOC=default`` turns it off. A no-op where the C library is not glibc (macOS, musl,
Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # bytes of free memory at the heap top before glibc trims it (the int maximum)


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it (glibc ``mallopt``); True when applied.

    Process-wide and irreversible for the blocks already allocated; call it once at the start of a
    program that trains. Skipped (False) when ``ATLAS_MALLOC=default``, off Linux, or without glibc.
    """
    if os.environ.get("ATLAS_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux ``MemAvailable``; else free physical pages),
    or None where neither can be read. For refusing, before the work, a run that would be killed for memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
