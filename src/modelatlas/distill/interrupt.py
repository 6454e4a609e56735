"""Ctrl-C during a checkpointed distillation: finish the iteration, save it, then stop.

Until session 37 a Ctrl-C ended :class:`~modelatlas.distill.loop.OuterLoop` where it was, and the run kept its
last regular checkpoint: up to ``checkpoint_every - 1`` iterations (49 by default) were lost. While a
checkpointed run loops, SIGINT now only marks the run as stopping (with an
:class:`~modelatlas.errors.InterruptWarning` saying so); the loop saves a checkpoint after the iteration in
progress and raises ``KeyboardInterrupt`` then, so a resume goes on from there and yields the tensors of an
uninterrupted run. A second Ctrl-C stops at once (the last checkpoint written is kept, as before). Only where
SIGINT still has Python's default handler, in the main thread: a program with a handler of its own keeps it.
The pre-training a method caches (MTT's experts, Teddy's pool, HeLlO's teacher) defers it alike, with its own
``message``: the unit in progress is finished and kept (:class:`~modelatlas.distill.cache.UnitStore`).
O(1).
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from modelatlas.errors import InterruptWarning

ITERATION = ("interrupted: finishing this iteration and saving a checkpoint (Ctrl-C again to stop at once, keeping "
             "the last checkpoint)")


@contextmanager
def deferred_interrupt(active: bool = True, message: str = ITERATION) -> Iterator[Callable[[], bool]]:
    """Within the block, the first SIGINT sets the flag the yielded function reads (and warns); a second raises
    KeyboardInterrupt at once; ``message``: the warning's text. Inactive (``active`` False, another thread, or SIGINT not Python's default
    handler): the function always says False and Ctrl-C raises as usual."""
    usable = (active and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if not usable:
        yield lambda: False
        return
    hit: list[bool] = []

    def on_sigint(signum, frame) -> None:
        if hit:
            raise KeyboardInterrupt
        hit.append(True)
        warnings.warn(message, InterruptWarning, stacklevel=2)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
