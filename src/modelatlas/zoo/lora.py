"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for zoo fine-tuning.

A target ``nn.Linear`` with weight W (out, in) is frozen and learns A (r, in) and B (out, r); the update is
dW = (alpha / r) B A. B starts at zero so training starts at the parent. A finished LoRA child is saved
either merged (W + dW, a full state dict) or as a PEFT-style adapter folder:

- ``adapter_config.json``: ``{"peft_type": "LORA", "r", "lora_alpha", "target_modules": [...],
  "base_model_name_or_path": <parent name>}``
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``base_model.model.<module>.lora_B.weight`` (out, r).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``r`` update scaled by ``alpha / r``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = int(r), float(alpha)
        bound = 1 / math.sqrt(base.in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
        a = (torch.rand(r, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a)  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)

    def delta(self) -> torch.Tensor:
        """dW = (alpha / r) B A, shape (out, in). O(out r in)."""
        return self.scale * (self.lora_B @ self.lora_A)


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def add_lora(model: nn.Module, targets: list[str], r: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap each target linear in a :class:`LoRALinear`; returns name -> wrapper."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(int(seed))
    wrappers = {}
    for name in targets:
        parent, attr = _parent_and_attr(model, name)
        wrappers[name] = LoRALinear(getattr(parent, attr), r, alpha, g)
        setattr(parent, attr, wrappers[name])
    return wrappers


def merge_lora(model: nn.Module, wrappers: dict[str, LoRALinear]) -> None:
    """Fold each update into its base weight (W <- W + (alpha/r) B A) and unwrap, in place."""
    with torch.no_grad():
        for name, w in wrappers.items():
            w.base.weight.copy_(w.base.weight + w.delta())
            parent, attr = _parent_and_attr(model, name)
            setattr(parent, attr, w.base)


def adapter_tensors(wrappers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT key names -> A (r, in) and B (out, r)."""
    out = {}
    for name, w in wrappers.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = w.lora_A.detach().clone()
        out[f"{PREFIX}{name}.lora_B.weight"] = w.lora_B.detach().clone()
    return out


def adapter_config(targets: list[str], r: int, alpha: float, base: str) -> dict:
    return {"peft_type": "LORA", "r": int(r), "lora_alpha": float(alpha), "target_modules": list(targets),
            "base_model_name_or_path": base, "lora_dropout": 0.0, "bias": "none"}


def apply_adapter(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], r: int, alpha: float) -> dict:
    """A new state dict: ``state`` with every adapted ``<module>.weight`` replaced by W + (alpha/r) B A."""
    out = dict(state)
    scale = alpha / r
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        b = tensors[f"{PREFIX}{module}.lora_B.weight"]
        out[f"{module}.weight"] = state[f"{module}.weight"] + scale * (b @ a)
    return out
