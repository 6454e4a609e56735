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


@pytest.fixture
def planted():
    return make_planted()
