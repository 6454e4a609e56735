"""Tiny synthetic weights with planted signals, for the ProbeX tests."""

import pytest
import torch


def make_planted(n=240, d_h=12, d_w=10, labels=4, noise=0.3, seed=0):
    """Weights X = base + sum_k y_k P_k + noise, where P_k is a rank-1 pattern per label."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_h, d_w, generator=g)
    patterns = torch.randn(labels, d_h, 1, generator=g) @ torch.randn(labels, 1, d_w, generator=g)  # (L, d_H, d_W)
    y = (torch.rand(n, labels, generator=g) < 0.5).float()
    x = base + torch.einsum("nl,lhw->nhw", y, patterns) * 0.5 + noise * torch.randn(n, d_h, d_w, generator=g)
    return x, y.numpy().astype(int)


def make_text_problem(n_classes=24, per_class=12, d_text=8, d_h=10, d_w=8, seed=0):
    """Each class c has a text vector t_c; its models' weights are a fixed linear map of t_c plus noise."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n_classes, d_text, generator=g)
    mix = torch.randn(d_h * d_w, d_text, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = (text[labels] @ mix.T).reshape(-1, d_h, d_w) + 0.3 * torch.randn(len(labels), d_h, d_w, generator=g)
    return x, labels.numpy(), text.numpy()


@pytest.fixture
def planted():
    return make_planted()


@pytest.fixture
def small_config():
    from modelatlas.probex import ProbeXConfig

    return ProbeXConfig(rank_u=6, rank_v=6, rank_t=8, epochs=40, batch_size=32, checkpoint_every=5)


@pytest.fixture
def text_problem():
    return make_text_problem()
