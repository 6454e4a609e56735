"""HeLlO's image-to-label projector (Yu et al., "Heavy Labels Out", 2024/2025) and label-storage arithmetic.

projector(x) = s * normalize(f(x) P) (W0 + B A)^T + b, where
- f: a frozen feature extractor (here the teacher's penultimate layer; assumed shared, not stored);
- P (D, E): a frozen random projection into the text-embedding width E, regenerated from a seed (not stored);
- W0 (K, E): the head initialised from the class names' unit-norm text embeddings (regenerated from the names),
  or from class-mean features (then stored);
- B (K, r) zeros and A (r, E) small random: the LoRA update, so the projector starts at W0;
- s = exp(log_scale), b (K,): temperature and bias.
Trainable (stored) floats: r (K + E) + K + 1 (+ K E with a class-mean head). A forward costs one backbone pass
plus O(N (D E + K E)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelatlas.seeding import torch_generator

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_prompts(names: list[str]) -> list[str]:
    """One prompt per class; digit names ("0".."9") become "the digit zero" since "0" says little."""
    out = []
    for n in names:
        out.append(f"the digit {_WORDS[int(n)]}" if n.isdigit() and int(n) < 10 else f"a photo of a {n}")
    return out


def text_head(names: list[str], encode=None) -> torch.Tensor:
    """(K, E) unit-norm text embeddings of :func:`class_prompts` (offline MiniLM unless ``encode`` is given)."""
    if encode is None:
        from modelatlas.probex.text_encoder import encode_texts as encode
    emb = torch.as_tensor(encode(class_prompts(names)), dtype=torch.float32)  # (K, E)
    return F.normalize(emb, dim=1)


class LabelProjector(nn.Module):
    """The projector above; only ``A``, ``B``, ``log_scale``, ``bias`` (and ``W0`` when ``store_head``) train."""

    def __init__(self, backbone: nn.Module, feature_dim: int, head: torch.Tensor, rank: int, proj_seed: int,
                 store_head: bool = False):
        super().__init__()
        k, e = head.shape
        self.backbone = backbone.requires_grad_(False)
        proj = torch.randn(feature_dim, e, generator=torch_generator(proj_seed)) / math.sqrt(feature_dim)
        self.register_buffer("proj", proj)  # (D, E), regenerated from proj_seed
        if store_head:
            self.W0 = nn.Parameter(head.clone())
        else:
            self.register_buffer("W0", head.clone())  # (K, E), regenerated from the class names
        self.A = nn.Parameter(torch.randn(rank, e, generator=torch_generator(proj_seed + 1)) / math.sqrt(e))
        self.B = nn.Parameter(torch.zeros(k, rank))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.zeros(k))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.embed(x)  # (N, D); frozen weights, but differentiable w.r.t. x (image nudging)
        return F.normalize(f @ self.proj, dim=1)  # (N, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.W0 + self.B @ self.A  # (K, E)
        return self.log_scale.exp() * self.features(x) @ w.T + self.bias  # (N, K)

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What must be stored beyond the shared backbone and the class names."""
        return {n: p.detach() for n, p in self.named_parameters() if not n.startswith("backbone.")}


def lora_param_count(num_classes: int, text_dim: int, rank: int, store_head: bool = False) -> int:
    """r (K + E) + K + 1 (+ K E with a stored class-mean head)."""
    return rank * (num_classes + text_dim) + num_classes + 1 + (num_classes * text_dim if store_head else 0)


def stored_label_bytes(num_images: int, num_classes: int, epochs: int, bytes_per_value: int = 4) -> int:
    """Decoupled (SRe2L/RDED-style) storage: one K-vector per augmented crop per epoch: E x N x K values."""
    return epochs * num_images * num_classes * bytes_per_value


def param_bytes(module_or_tensors, bytes_per_value: int = 4) -> int:
    tensors = module_or_tensors.parameters() if isinstance(module_or_tensors, nn.Module) else module_or_tensors
    return sum(t.numel() for t in tensors) * bytes_per_value
