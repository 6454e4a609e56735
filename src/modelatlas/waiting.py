"""OpenMP threads that sleep while they wait: ``OMP_WAIT_POLICY=PASSIVE`` for the command line.

PyTorch's CPU build runs its intra-op threads on OpenMP, whose idle threads spin for a while before they sleep,
so that the next parallel operation starts without a wake-up. On a machine whose cores are all busy (a shared
CI runner, a laptop compiling, two jobs on two cores) the spinning threads take the cores the working ones
need. On the 2-core development machine at a load of ~3.5 (docs/benchmarks.md, "Session 31: OpenMP threads
that wait without spinning"), 60 iterations of DSA distillation on digits took 62-81 s with the default and
7.7-7.9 s passive, and a lineage recovery of seven 1B models 5.7-22 s against 6.3-7.1 s.

:func:`passive_waits` sets ``OMP_WAIT_POLICY=PASSIVE`` where the user has not set it, which only takes effect
before torch (and its OpenMP runtime) is first imported: the ``atlas`` command line calls it before a command
runs; the library never does on import (a process's threads are its owner's to set). ``OMP_WAIT_POLICY=ACTIVE``
keeps the spinning.
"""

from __future__ import annotations

import os
import sys


def passive_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it or torch is already imported (too late:
    OpenMP read its settings when torch loaded it). True when set here."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
