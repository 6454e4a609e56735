"""Measure the memory an autograd graph holds: bytes of the tensors saved for backward that are alive.

:class:`SavedTensorMeter` installs ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves
is wrapped in a small holder that adds its bytes to ``live`` and subtracts them when the graph that owns it is
freed, so ``peak`` is the largest graph memory alive at once (device independent, unlike ru_maxrss). An
unrolled method's peak grows with the number of unrolled steps; Teddy's does not. O(1) per saved tensor.
Caveat: in double backward a few tiny saved views of parameters are pinned by the hook itself (a reference
cycle through the pack hook), so ``live`` may stay a few hundred bytes above zero after the graph is gone.
"""

from __future__ import annotations

import torch


class _Held:
    __slots__ = ("tensor", "meter", "nbytes")

    def __init__(self, tensor: torch.Tensor, meter: SavedTensorMeter):
        self.tensor, self.meter, self.nbytes = tensor, meter, tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


class SavedTensorMeter:
    """Context manager: ``peak`` = most bytes of saved-for-backward tensors alive at once inside it."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda h: h.tensor)

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
