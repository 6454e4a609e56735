"""Differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

Augmentations are differentiable functions of the images (affine_grid/grid_sample for scale, rotation and
crop-translation; masks for cutout; arithmetic for colour), so the loss of a matching step back-propagates
through them into the synthetic pixels. "Siamese": the real and the synthetic batch of one matching step
get the **same** random parameters. :meth:`DSA.sample` draws the parameters once from a seeded generator;
:meth:`DSAParams.apply` applies them to any number of batches::

    params = dsa.sample(gen)                 # one draw, shared by the whole batch (siamese)
    loss = match(net(params.apply(x_real)), net(params.apply(x_syn)))
    params = dsa.sample(gen, batch=len(x))   # per-image draws (training on the synthetic set)

As in the reference code, "single" mode applies one randomly chosen family per step (colour counts as one
family of brightness/saturation/contrast); "multiple" applies them all. Defaults: scale 1.2, rotate +-15
degrees, crop pad 0.125, cutout 0.5, brightness 1.0, saturation 2.0, contrast 0.5; flip off (digits).
Cost O(N * C * H * W) per batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from modelatlas.errors import ConfigError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSA:
    """DSA configuration; ``families`` lists the augmentations in use."""

    families: tuple[str, ...] = ("color", "crop", "cutout", "scale", "rotate")
    mode: str = "single"  # "single": one random family per step (DSA default); "multiple": all
    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ConfigError(f"DSA families: unknown {bad}; choose from {', '.join(FAMILIES)}")
        if self.mode not in ("single", "multiple"):
            raise ConfigError(f"DSA mode must be 'single' or 'multiple', got {self.mode!r}")

    @classmethod
    def for_dataset(cls, in_shape: tuple[int, ...], flip: bool | None = None) -> DSA:
        """The standard DSA for a dataset: flip only for 3-channel natural images unless told otherwise."""
        use_flip = (in_shape[0] == 3) if flip is None else flip
        fams = ("color", "crop", "cutout", "flip", "scale", "rotate") if use_flip else cls().families
        return cls(families=fams)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["families"] = list(self.families)
        return d

    def sample(self, generator: torch.Generator, batch: int = 1) -> DSAParams:
        """Draw parameters (``batch`` = 1: one draw for everything, i.e. siamese across batches)."""
        fams = self.families
        if self.mode == "single" and fams:
            fams = (fams[int(torch.randint(len(fams), (1,), generator=generator))],)
        def u() -> torch.Tensor:
            return torch.rand(batch, generator=generator)  # (B,)
        p: dict[str, torch.Tensor] = {}
        for f in fams:
            if f == "color":
                p["brightness"], p["saturation"], p["contrast"] = u(), u(), u()
            elif f == "crop":
                p["crop_x"], p["crop_y"] = u(), u()
            elif f == "cutout":
                p["cut_x"], p["cut_y"] = u(), u()
            elif f == "flip":
                p["flip"] = u()
            elif f == "scale":
                p["scale_x"], p["scale_y"] = u(), u()
            elif f == "rotate":
                p["rotate"] = u()
        return DSAParams(self, p)


class DSAParams:
    """Sampled DSA parameters (tensors of shape (B,), B = 1 or the batch size); apply with :meth:`apply`."""

    def __init__(self, cfg: DSA, values: dict[str, torch.Tensor]):
        self.cfg, self.values = cfg, values

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch (N, C, H, W); differentiable w.r.t. ``x``."""
        if x.dim() != 4:
            raise ConfigError(f"DSA needs images (N, C, H, W), got shape {tuple(x.shape)}; turn DSA off for 1-D data")
        v = {k: t.to(x.device, x.dtype).expand(x.shape[0]) if t.shape[0] == 1 else t.to(x.device, x.dtype)
             for k, t in self.values.items()}
        if "brightness" in v:
            x = _color(x, v, self.cfg)
        if "scale_x" in v:
            x = _scale(x, v, self.cfg)
        if "rotate" in v:
            x = _rotate(x, v, self.cfg)
        if "flip" in v:
            flip = (v["flip"] < self.cfg.flip_prob).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        if "crop_x" in v:
            x = _crop(x, v, self.cfg)
        if "cut_x" in v:
            x = _cutout(x, v, self.cfg)
        return x


def _color(x: torch.Tensor, v: dict, cfg: DSA) -> torch.Tensor:
    x = x + ((v["brightness"] - 0.5) * cfg.brightness).view(-1, 1, 1, 1)
    mean = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
    x = (x - mean) * (v["saturation"] * cfg.saturation).view(-1, 1, 1, 1) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x - mean) * (v["contrast"] + cfg.contrast).view(-1, 1, 1, 1) + mean


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)  # (N, H, W, 2)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: torch.Tensor, v: dict, cfg: DSA) -> torch.Tensor:
    lo = 1.0 / cfg.scale
    sx, sy = v["scale_x"] * (cfg.scale - lo) + lo, v["scale_y"] * (cfg.scale - lo) + lo
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)  # (N, 2, 3)
    return _warp(x, theta)


def _rotate(x: torch.Tensor, v: dict, cfg: DSA) -> torch.Tensor:
    a = (v["rotate"] - 0.5) * 2 * cfg.rotate / 180 * math.pi
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a.cos(), a.sin(), zero], 1),
                         torch.stack([-a.sin(), a.cos(), zero], 1)], 1)  # (N, 2, 3)
    return _warp(x, theta)


def _crop(x: torch.Tensor, v: dict, cfg: DSA) -> torch.Tensor:
    """Random translation by up to ``crop * size`` whole pixels with zero fill (pad-and-crop)."""
    h, w = x.shape[2], x.shape[3]
    sh, sw = int(h * cfg.crop + 0.5), int(w * cfg.crop + 0.5)
    ty = torch.floor(v["crop_y"] * (2 * sh + 1)).clamp(max=2 * sh) - sh  # integer shifts in [-sh, sh]
    tx = torch.floor(v["crop_x"] * (2 * sw + 1)).clamp(max=2 * sw) - sw
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    theta = torch.stack([torch.stack([one, zero, 2 * tx / max(w - 1, 1)], 1),
                         torch.stack([zero, one, 2 * ty / max(h - 1, 1)], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="nearest", align_corners=True)


def _cutout(x: torch.Tensor, v: dict, cfg: DSA) -> torch.Tensor:
    """Zero a square of side ``cutout * size`` at a random centre."""
    h, w = x.shape[2], x.shape[3]
    ch, cw = int(h * cfg.cutout + 0.5), int(w * cfg.cutout + 0.5)
    cy = torch.floor(v["cut_y"] * (h + (1 - ch % 2))).view(-1, 1, 1)  # (N, 1, 1) centre rows
    cx = torch.floor(v["cut_x"] * (w + (1 - cw % 2))).view(-1, 1, 1)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, -1, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, -1)
    inside = ((rows - cy + ch // 2) >= 0) & ((rows - cy + ch // 2) < ch) & \
             ((cols - cx + cw // 2) >= 0) & ((cols - cx + cw // 2) < cw)  # (N, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)
