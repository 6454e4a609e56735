"""The ProbeX network and the dense linear expert, batched over models.

Paper: Horwitz, Cavia, Kahana, Hoshen, "Learning on Model Weights using Tree Experts" (arXiv 2410.13569),
Sec. "ProbeX". Both networks take X of shape (B, d_H, d_W): one layer's weight matrix per model.
"""

from __future__ import annotations

import torch
from torch import nn

from modelatlas.errors import ConfigError


class ProbeXNet(nn.Module):
    """ProbeX: probes U, shared projection V, ReLU, per-probe encoders, head T.

    Parameters: d_W r_U + d_H r_V + r_U r_V r_T + r_T (the encoders' bias) + r_T d_Y + d_Y (the head).
    Time per model O(d_H d_W r_U + d_H r_U r_V + r_U r_V r_T); memory O(B (d_H r_U + r_U r_V)).
    ``d_y=0`` builds the encoder only (text alignment uses the representation e directly).
    """

    def __init__(self, d_h: int, d_w: int, d_y: int, rank_u: int, rank_v: int, rank_t: int, relu: bool = True):
        super().__init__()
        self.relu = relu
        # Step 1: probes u_l (columns of U), scaled so X u_l keeps X's entry scale.
        self.probes = nn.Parameter(torch.randn(d_w, rank_u) / d_w**0.5)  # U: (d_W, r_U)
        # Step 2: shared projection of each probe response.
        self.projection = nn.Parameter(torch.randn(d_h, rank_v) / d_h**0.5)  # V: (d_H, r_V)
        # Step 3: per-probe encoders M_l, all at once as one Linear over the flattened (r_U * r_V).
        self.encoder = nn.Linear(rank_u * rank_v, rank_t)
        # Step 4: head T.
        self.head = nn.Linear(rank_t, d_y) if d_y > 0 else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation e, shape (B, r_T)."""
        responses = x @ self.probes  # R = X U: (B, d_H, r_U)
        z = self.projection.T @ responses  # V^T X u_l for every l: (B, r_V, r_U)
        if self.relu:
            z = torch.relu(z)
        z = z.transpose(1, 2).flatten(1)  # Z_l stacked by probe: (B, r_U * r_V)
        return self.encoder(z)  # e = sum_l M_l Z_l + b: (B, r_T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        return self.head(e) if self.head is not None else e


class DenseNet(nn.Module):
    """The dense linear expert y_k = sum_ij W_ijk X_ij + b_k (the paper's untied baseline).

    Parameters: d_H d_W d_Y + d_Y. Time and memory O(B d_H d_W d_Y). For text alignment (``d_y=0``) it maps
    to a ``rank_t``-dimensional representation instead: d_H d_W r_T + r_T parameters.
    """

    def __init__(self, d_h: int, d_w: int, d_y: int, rank_t: int = 32):
        super().__init__()
        self.out = nn.Linear(d_h * d_w, d_y if d_y > 0 else rank_t)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x.flatten(1))  # (B, d_H * d_W) -> (B, d_Y or r_T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


# r_U r_V r_T encoder weights at most (8 GiB of float32 before Adam's two copies): --rank 100000 asked
# for 10**15 and ended in an allocator traceback
MAX_ENCODER_WEIGHTS = 2**31


def build_network(kind: str, d_h: int, d_w: int, d_y: int, cfg) -> nn.Module:
    """The network named by ``cfg.model`` ("probex" or "dense") for one layer shape and output size."""
    if kind == "dense":
        return DenseNet(d_h, d_w, d_y, cfg.rank_t)
    weights = cfg.rank_u * cfg.rank_v * cfg.rank_t
    if weights > MAX_ENCODER_WEIGHTS:
        raise ConfigError(f"ProbeX ranks r_U={cfg.rank_u}, r_V={cfg.rank_v}, r_T={cfg.rank_t} need {weights:,} encoder "
                          f"weights (r_U r_V r_T), more than {MAX_ENCODER_WEIGHTS:,}; lower them (--rank; the paper "
                          "used 128)")
    return ProbeXNet(d_h, d_w, d_y, cfg.rank_u, cfg.rank_v, cfg.rank_t, relu=cfg.relu)


TRAIN_COPIES = 4  # float32 weights, gradients and Adam's two moments: bytes per encoder weight / 4 in training


def check_train_memory(cfg) -> None:
    """Refuse, before training, ProbeX ranks whose encoder cannot be trained in the memory available
    (--rank 1290: ~34 GB on a 23 GB machine; the process was killed by the system without a word). Loading a
    trained expert needs a quarter of it and is not checked."""
    from modelatlas.allocator import available_memory

    if cfg.model != "probex":
        return
    weights = cfg.rank_u * cfg.rank_v * cfg.rank_t
    need, have = 4 * TRAIN_COPIES * weights, available_memory()
    if have is not None and need > have:
        raise ConfigError(f"ProbeX ranks r_U={cfg.rank_u}, r_V={cfg.rank_v}, r_T={cfg.rank_t} need {weights:,} encoder "
                          f"weights, about {need / 2**30:.1f} GiB to train (weights, gradients, Adam's moments), "
                          f"more than the {have / 2**30:.1f} GiB of memory available; lower them (--rank)")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
