"""Config of PoDD (posters, trained with the RaT-BPTT engine)."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import check_positive
from modelatlas.distill.methods.ratbptt.config import RaTBPTTConfig
from modelatlas.errors import ConfigError


@dataclass
class PoDDConfig(RaTBPTTConfig):
    """RaT-BPTT fields plus the poster. ``poster_ipc``: images per class of the poster (may be < 1; None:
    the integer ``ipc`` of the run); ``crops_x``/``crops_y`` None: the automatic grid (poster.py);
    ``learn_labels``: PoDDL label grid (``label_refine`` cells per class cell and axis, None: automatic;
    ``label_shrink``: window shrink); otherwise softmax(class pixel counts / ``label_temperature``);
    ``class_order``: "poco" or "natural"; ``init``: "real" or "gaussian" areas cross-faded over
    ``fade`` x the cell size. Outer Adam lr 3e-2 on poster and label grid (CPU scale; paper 1e-3).
    Engine defaults are RaT-BPTT's: ``window`` 60 differentiable steps (of ``total`` 150) and a real batch of
    1024, first tuned for posters on a held-out 20% of the digits training split (+20 points at 0.5 IPC over
    window 10 and batch 256, see docs/benchmarks.md)."""

    poster_ipc: float | None = None
    crops_x: int | None = None
    crops_y: int | None = None
    label_refine: int | None = None
    label_shrink: float = 0.25
    label_temperature: float = 1.0
    lr_img: float = 3e-2
    lr_label: float = 3e-2
    class_order: str = "poco"
    init: str = "real"
    fade: float = 0.25

    def __post_init__(self) -> None:
        self._check_init()
        check_positive(self, "poster_ipc", "crops_x", "crops_y", "label_refine", "label_temperature")
        if not 0 <= self.label_shrink < 1:
            raise ConfigError(f"label_shrink must be in [0, 1), got {self.label_shrink}")
        if not 0 <= self.fade <= 1:
            raise ConfigError(f"fade must be in [0, 1], got {self.fade}")
        if self.class_order not in ("poco", "natural"):
            raise ConfigError(f"class_order must be 'poco' or 'natural', got {self.class_order!r}")

    def _check_init(self) -> None:
        init = self.init
        if init not in ("real", "gaussian"):
            raise ConfigError(f"init must be 'real' or 'gaussian', got {init!r}")
        self.init = "real"  # the RaT-BPTT checks know 'real' / 'noise' only
        try:
            super().__post_init__()
        finally:
            self.init = init
