"""Config of RaT-BPTT (random truncated backpropagation through time)."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import MethodConfig, check_choice, check_positive
from modelatlas.errors import ConfigError


@dataclass
class RaTBPTTConfig(MethodConfig):
    """Defaults are scaled for a CPU; the paper's values in brackets are reachable by config.

    ``total`` inner Adam steps per unroll (the Adam evaluation protocol trains 300 on a small set); a window
    of ``window`` of them, at a random offset, is differentiated [window 60-100, total ~ 2-3 x window];
    ``batch_real`` real images score the unrolled net [2000-5000]; ``batch_syn`` synthetic images per inner
    step [256]; outer Adam lr ``lr_img``/``lr_label`` 1e-2 for a few hundred CPU iterations [1e-3 over
    thousands]. ``learn_labels``: learnable soft labels (softmax of logits).

    Window 60 and real batch 1024 were chosen on a held-out 20% of the digits training split (IPC 1, 100
    iterations, 5 nets: 90.9 against 85.3 for window 10 / batch 256; docs/benchmarks.md). Graph memory grows
    linearly in ``window`` (about 21 MB per step at digits IPC 10, far more at 28x28 and width 128): lower
    ``window`` or ``batch_syn`` on a small machine. ``real_chunk``: score the real batch in chunks of this
    many images (the same outer gradient up to float rounding, with the real batch's activations held for
    one chunk only; None: one pass), so that the paper's 2000-5000 real images fit beside the unrolled graph."""

    iterations: int = 200
    window: int = 60
    total: int = 150
    batch_real: int = 1024
    batch_syn: int = 256
    inner_lr: float = 1e-3
    lr_img: float = 1e-2
    lr_label: float = 1e-2
    learn_labels: bool = True
    label_scale: float = 3.0
    clip_factor: float = 2.0
    clip_ema: float = 0.9
    dsa: bool = True
    init: str = "real"
    real_chunk: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "window", "total", "batch_real", "batch_syn", "inner_lr", "lr_img", "lr_label",
                       "label_scale", "clip_factor", "real_chunk", unbounded=("clip_factor",))  # inf: no clipping
        if self.window > self.total:
            raise ConfigError(f"window ({self.window}) must be <= total ({self.total}); raise total or lower window")
        if not 0 <= self.clip_ema < 1:
            raise ConfigError(f"clip_ema must be in [0, 1), got {self.clip_ema}")
        check_choice(self, "init")
