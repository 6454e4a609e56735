"""Small architectures for model zoos, built from a JSON-able config dict.

Every model takes images (N, C, H, W) and returns logits (N, num_classes). Tensor names follow Hugging
Face conventions where one exists (the ViT matches ``ViTForImageClassification``), so lineage and
learning-on-weights code written for real checkpoints runs unchanged on a zoo. MLPs and CNNs carry square
hidden matrices (``layers.{i}.weight``, hidden x hidden) because lineage recovery uses square matrices.

Config dict (stored in each model's ``config.json`` and in the manifest)::

    {"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": 64, "n_hidden": 3}
    {"arch": "cnn", ..., "channels": [8, 16], "hidden": 64, "n_hidden": 1}
    {"arch": "vit", ..., "patch_size": 2, "hidden": 32, "n_layers": 2, "n_heads": 2, "intermediate": 64}
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelatlas.errors import ConfigError

ARCH_DEFAULTS: dict[str, dict] = {
    "mlp": {"hidden": 64, "n_hidden": 3},
    "cnn": {"channels": [8, 16], "hidden": 64, "n_hidden": 1},
    "vit": {"patch_size": 2, "hidden": 32, "n_layers": 2, "n_heads": 2, "intermediate": 64},
}


def arch_config(arch: str, input_shape, num_classes: int, **sizes) -> dict:
    """A complete config dict: ``arch``'s defaults overridden by ``sizes``; errors name the bad key."""
    if arch not in ARCH_DEFAULTS:
        raise ConfigError(f"arch: unknown architecture {arch!r}; choose one of {sorted(ARCH_DEFAULTS)}")
    unknown = set(sizes) - set(ARCH_DEFAULTS[arch])
    if unknown:
        raise ConfigError(f"arch_kwargs: unknown key(s) {sorted(unknown)} for {arch!r}; known: {sorted(ARCH_DEFAULTS[arch])}")
    cfg = {"arch": arch, "input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes)}
    cfg.update(ARCH_DEFAULTS[arch])
    cfg.update(sizes)
    if arch == "vit":
        _, h, w = cfg["input_shape"]
        if h % cfg["patch_size"] or w % cfg["patch_size"]:
            raise ConfigError(f"arch_kwargs.patch_size: {cfg['patch_size']} does not divide the input {h}x{w}; pick a divisor")
        if cfg["hidden"] % cfg["n_heads"]:
            raise ConfigError(f"arch_kwargs.n_heads: {cfg['n_heads']} does not divide hidden={cfg['hidden']}")
    return cfg


def build_model(config: dict) -> nn.Module:
    """Instantiate the model described by ``config`` (see module docstring); uses torch's global RNG."""
    builders = {"mlp": MLP, "cnn": CNN, "vit": ViTForImageClassification}
    if config.get("arch") not in builders:
        raise ConfigError(f"arch: unknown architecture {config.get('arch')!r}; choose one of {sorted(builders)}")
    return builders[config["arch"]](config)


def head_name(config: dict) -> str:
    """The module name of the classification head (re-initialised by ``new_head`` tasks)."""
    return "classifier"


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the modules LoRA adapts: every ``nn.Linear`` (ViT: attention, MLP and head)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


class MLP(nn.Module):
    """Flatten -> embed (in -> hidden) -> n_hidden square layers (hidden x hidden) -> classifier; ReLU."""

    def __init__(self, config: dict):
        super().__init__()
        n_in = math.prod(config["input_shape"])
        h = config["hidden"]
        self.embed = nn.Linear(n_in, h)
        self.layers = nn.ModuleList(nn.Linear(h, h) for _ in range(config["n_hidden"]))
        self.classifier = nn.Linear(h, config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.embed(x.flatten(1)))  # (N, C*H*W) -> (N, hidden)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.classifier(x)


class CNN(nn.Module):
    """3x3 conv blocks (conv -> ReLU -> 2x2 max-pool when the map is >= 4 wide), then an MLP head."""

    def __init__(self, config: dict):
        super().__init__()
        c, h, w = config["input_shape"]
        convs, pools = [], []
        for ch in config["channels"]:
            convs.append(nn.Conv2d(c, ch, 3, padding=1))
            pools.append(h >= 4 and w >= 4)
            c, h, w = ch, (h // 2 if pools[-1] else h), (w // 2 if pools[-1] else w)
        self.conv = nn.ModuleList(convs)
        self._pools = pools
        hid = config["hidden"]
        self.fc = nn.Linear(c * h * w, hid)
        self.layers = nn.ModuleList(nn.Linear(hid, hid) for _ in range(config["n_hidden"]))
        self.classifier = nn.Linear(hid, config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip(self.conv, self._pools):
            x = torch.relu(conv(x))
            if pool:
                x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.fc(x.flatten(1)))  # (N, C'*H'*W') -> (N, hidden)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.classifier(x)


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        heads = [f(x).view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (N, heads, T, d/heads)
                 for f in (self.query, self.key, self.value)]
        out = nn.functional.scaled_dot_product_attention(*heads)  # (N, heads, T, d/heads)
        return out.transpose(1, 2).reshape(n, t, d)  # (N, T, D)


class _Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.attention = _SelfAttention(hidden, n_heads)
        self.output = _Dense(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class _Layer(nn.Module):
    """A pre-norm transformer block with HF ViT names."""

    def __init__(self, hidden: int, n_heads: int, intermediate: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(hidden)
        self.attention = _Attention(hidden, n_heads)
        self.layernorm_after = nn.LayerNorm(hidden)
        self.intermediate = _Dense(hidden, intermediate)
        self.output = _Dense(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(nn.functional.gelu(self.intermediate.dense(self.layernorm_after(x))))


class _PatchEmbeddings(nn.Module):
    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.projection = nn.Conv2d(channels, hidden, patch, stride=patch)


class _Embeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c, h, w = config["input_shape"]
        d, p = config["hidden"], config["patch_size"]
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.position_embeddings = nn.Parameter(torch.randn(1, (h // p) * (w // p) + 1, d) * 0.02)
        self.patch_embeddings = _PatchEmbeddings(c, d, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings.projection(x).flatten(2).transpose(1, 2)  # (N, patches, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (N, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embeddings  # (N, patches + 1, D)


class _Encoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.layer = nn.ModuleList(
            _Layer(config["hidden"], config["n_heads"], config["intermediate"]) for _ in range(config["n_layers"])
        )


class _ViT(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.layernorm = nn.LayerNorm(config["hidden"])


class ViTForImageClassification(nn.Module):
    """A tiny ViT with the tensor names of Hugging Face's ``ViTForImageClassification`` (CLS-token head)."""

    def __init__(self, config: dict):
        super().__init__()
        self.vit = _ViT(config)
        self.classifier = nn.Linear(config["hidden"], config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vit.embeddings(x)
        for layer in self.vit.encoder.layer:
            h = layer(h)
        return self.classifier(self.vit.layernorm(h)[:, 0])  # CLS token -> (N, num_classes)
