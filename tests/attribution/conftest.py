"""Shared inputs of the attribution tests."""

import pytest
import torch


def make_planted(n=30, seed=0):
    """Two classes, each two well-separated blobs (clusters) in 4 pixels; test points from every blob."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2., 0, 0, 0], [0, 2., 0, 0], [0, 0, 2., 0], [0, 0, 0, 2.]])  # blobs 0,1 -> class 0
    def draw(m):
        xs = torch.cat([c + 0.2 * torch.randn(m, 4, generator=g) for c in centres])
        return xs.reshape(-1, 1, 2, 2), torch.tensor([0, 0, 1, 1]).repeat_interleave(m)
    (x, y), (xt, yt) = draw(n), draw(5)
    return x, y, xt, yt


class _Bar:
    """A progress bar that raises ``error`` (Ctrl-C by default) before item ``stop`` (None: never)."""

    def __init__(self, iterable, stop, error, totals):
        self.iterable, self.stop, self.error, self.totals = iterable, stop, error, totals

    def __iter__(self):
        for i, item in enumerate(self.iterable):
            if i == self.stop:
                raise self.error()
            yield item

    def set_postfix(self, **values):
        pass


def make_stop(stop, error=KeyboardInterrupt, at="reverse gradient matching"):
    """A progress that stops the bar named ``at`` before its step ``stop``; ``.totals`` records its lengths."""
    totals = []

    def progress(iterable, *, total=None, desc=""):
        if desc == at:
            totals.append(total)
        return _Bar(iterable, stop if desc == at else None, error, totals)
    progress.totals = totals
    return progress


@pytest.fixture
def planted():
    return make_planted()
