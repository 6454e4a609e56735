"""OpenMP threads that spin only briefly while they wait: ``GOMP_SPINCOUNT=1000`` for the command line.

PyTorch's CPU build for Linux runs its intra-op threads on GNU OpenMP (libgomp), whose idle threads spin up to
300,000 times before they sleep, so that the next parallel operation starts without a wake-up. Where the
cores are busy (two torch jobs on one machine, a shared CI runner) the spinning threads take the cores the
working ones need. Measured on the 2-core development machine (docs/benchmarks.md, "Session 31: OpenMP
threads that spin only briefly"), 30 DSA iterations on digits, seconds of distillation:

======================================  ============  ==================  ===================
setting                                 alone (idle)  two jobs at once    beside 2 busy loops
======================================  ============  ==================  ===================
libgomp's default                       2.5, 2.5      9.8-13.6 each       9.7-16.9
``OMP_WAIT_POLICY=PASSIVE`` (no spin)   4.0, 4.0      4.2-4.5 each        6.0, 6.7
``GOMP_SPINCOUNT=1000`` (set here)      2.8, 2.9      5.7-5.8 each        7.2, 8.2
======================================  ============  ==================  ===================

and with other helpers' torch jobs on the cores, 60 iterations took 62-81 s with the default against 7.7-7.9 s
without spinning. A short spin keeps most of the idle speed and loses most of the contention.
:func:`short_spin` sets ``GOMP_SPINCOUNT=1000`` unless the user has set it or ``OMP_WAIT_POLICY`` (whose
choice stands), and only before torch (and OpenMP) is first imported: the ``atlas`` command line calls it
before a command runs; the library never does on import (a process's threads are its owner's to set). Other
OpenMP runtimes (LLVM's libomp on macOS) ignore the variable.
"""

from __future__ import annotations

import os
import sys

SPIN = "1000"


def short_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN` unless the environment sets it or ``OMP_WAIT_POLICY``, or torch is
    already imported (too late: OpenMP read its settings when torch loaded it). True when set here."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN
    return True
