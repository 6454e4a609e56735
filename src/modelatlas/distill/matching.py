"""Matching losses shared by the methods (DC/DSA gradient matching, DM distribution matching) and real-data
sampling by class.

Gradient matching (Zhao, Mopuri & Bilen, ICLR 2021, eq. 9-10): per layer, each weight gradient is reshaped
to (out, rest) and the distance is sum over output neurons of (1 - cosine); 1-D parameters (biases, norm
affines) contribute 0, as in the reference code. Cost O(#parameters).

Distribution matching (Zhao & Bilen, WACV 2023): ||mean embed(real_c) - mean embed(syn_c)||^2.
"""

from __future__ import annotations

import torch

from modelatlas.data.registry import ArrayDataset


def layer_distance(gs: torch.Tensor, gr: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sum over output neurons of (1 - cos) between two gradients of one weight; 0 for 1-D tensors."""
    if gs.dim() == 1:
        return gs.new_zeros(())
    gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)  # (out, rest)
    cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + eps)  # (out,)
    return (1 - cos).sum()


def gradient_match_distance(g_syn: list[torch.Tensor], g_real: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of :func:`layer_distance` (the DC "ours" distance)."""
    return sum((layer_distance(s, r) for s, r in zip(g_syn, g_real)), g_syn[0].new_zeros(()))


def mean_embedding_distance(e_syn: torch.Tensor, e_real: torch.Tensor) -> torch.Tensor:
    """Squared distance between the mean embeddings (N, D) of two batches."""
    return ((e_real.mean(0) - e_syn.mean(0)) ** 2).sum()


class ClassSampler:
    """Random real batches of one class, drawn with an explicit generator. Data live on ``device``."""

    def __init__(self, data: ArrayDataset, device: torch.device):
        self.x = data.x.to(device)
        self.num_classes = data.num_classes
        self.by_class = [torch.nonzero(data.y == c).flatten() for c in range(data.num_classes)]

    def batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` random images of class ``c`` (N, C, H, W)."""
        pool = self.by_class[c]
        idx = pool[torch.randperm(len(pool), generator=generator)[:n]]
        return self.x[idx.to(self.x.device)]
