"""The networks of dataset distillation: ConvNet-d (DC/DSA/DM/MTT's "ConvNet") and an MLP.

ConvNet-d (Gidaris & Komodakis 2018, as used by Zhao et al. ICLR 2021): ``depth`` blocks of
conv3x3(width) -> instance norm (``GroupNorm(width, width, affine=True)``) -> ReLU -> AvgPool2, then one
linear head. 28x28 inputs are padded to 32x32 by the first convolution (padding 3, as in the DC code), so
ConvNet-3 ends at 4x4 for (Fashion-)MNIST and CIFAR alike. 8x8 digits work with depth <= 3. 1-D inputs
(N, C, L) get Conv1d/AvgPool1d. Every net exposes ``embed(x)`` (features before the head) for DM/herding.

A forward pass costs O(N * depth * width^2 * 9 * H * W) time; parameters O(depth * width^2 * 9 + head).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelatlas.errors import ConfigError
from modelatlas.seeding import torch_seed

NET_NAMES = ("convnet", "mlp")
MAX_WIDTH = 2**14  # 16,384: a ConvNet layer of ~2.4e9 weights (9.7 GB); the standard nets are 64-128 wide
MAX_DEPTH = 64  # an MLP of depth 10**6 spent minutes building layers; a ConvNet fits log2(side) (<= ~10)


def _norm(kind: str, width: int, one_d: bool = False) -> nn.Module:
    if kind == "instance":
        return nn.GroupNorm(width, width, affine=True)  # instance norm with a learnable affine, per channel
    if kind == "batch":
        return nn.BatchNorm1d(width) if one_d else nn.BatchNorm2d(width)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm must be 'instance', 'batch' or 'none', got {kind!r}")


def _depth_error(depth: int, spatial: list[int]) -> ConfigError:
    """Each layer halves the input: name the depths that fit, or the MLP when none does (1-pixel inputs)."""
    top = int(math.log2(max(min(spatial), 1)))
    if top < 1:
        return ConfigError(f"input size {tuple(spatial)} is too small for a ConvNet (each layer halves it); "
                           "use --set net=mlp (net='mlp')")
    return ConfigError(f"ConvNet depth {depth} is invalid for input size {tuple(spatial)}; use --set depth=N "
                       f"(depth=) with N between 1 and {top}")


class ConvNet(nn.Module):
    """ConvNet-``depth`` of ``width`` channels for (C, H, W) images or (C, L) signals."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 3,
                 norm: str = "instance", pad28: bool = True):
        super().__init__()
        if len(in_shape) < 2:  # (D,): "min() arg is an empty sequence" below
            raise ConfigError(f"inputs of shape {tuple(in_shape)} have no channel and spatial axes for a ConvNet; "
                              "use --set net=mlp (net='mlp')")
        channels, *spatial = in_shape
        one_d = len(spatial) == 1
        conv, pool = (nn.Conv1d, nn.AvgPool1d) if one_d else (nn.Conv2d, nn.AvgPool2d)
        layers: list[nn.Module] = []
        size, c = list(spatial), channels
        for d in range(depth):
            pad = 3 if (d == 0 and pad28 and spatial == [28, 28]) else 1  # 28 + 6 - 2 = 32
            layers += [conv(c, width, 3, padding=pad), _norm(norm, width, one_d),
                       nn.ReLU(inplace=False), pool(2)]
            size = [(s + 2 * pad - 2) // 2 for s in size]
            c = width
        if depth < 1 or min(size) < 1:
            raise _depth_error(depth, spatial)
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * math.prod(size)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))  # (N, num_classes)


class MLP(nn.Module):
    """Flatten -> ``depth`` x (Linear(width) -> ReLU) -> Linear(num_classes)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"MLP depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU(inplace=False)]
            d_in = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def default_net(in_shape: tuple[int, ...]) -> dict:
    """The standard architecture for an input shape: ConvNet-2 width 64 for small (<= 16 px) inputs such as
    8x8 digits, ConvNet-3 width 128 otherwise (ConvNet-4 from 64 px)."""
    side = min(in_shape[1:])
    if side <= 16:
        return {"net": "convnet", "width": 64, "depth": 2}
    return {"net": "convnet", "width": 128, "depth": 4 if side >= 64 else 3}


def make_net(name: str, in_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 3,
             seed: int | None = None, device: str | torch.device | None = None, **kwargs) -> nn.Module:
    """A fresh network by name ("convnet" or "mlp"), built on the CPU (then moved to ``device``). With ``seed``
    its initialisation is reproducible, the same on every device, and the global torch RNGs are left untouched."""
    if name not in NET_NAMES:
        raise ConfigError(f"net must be one of {', '.join(NET_NAMES)}, got {name!r}")
    cls = ConvNet if name == "convnet" else MLP
    if seed is None:
        net = cls(tuple(in_shape), num_classes, width, depth, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also reseeded every GPU's, which fork_rng does not restore
            torch.random.default_generator.manual_seed(torch_seed(int(seed)))
            net = cls(tuple(in_shape), num_classes, width, depth, **kwargs)
    return net.to(device) if device is not None else net


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked: "cpu", or "cuda"/"cuda:N" of a present GPU, or "mps" where available),
    else CUDA when present, else the CPU. A GPU is named with its index ("cuda" is the current one, "cuda:0"):
    a run recorded on "cuda" and asked again with "cuda:0" was not found finished, and was evaluated again."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(device)!r}; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {str(device)!r} is not supported; use cpu or cuda (cuda:N)")
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev
