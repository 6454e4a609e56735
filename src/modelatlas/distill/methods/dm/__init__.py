"""``dm``: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.dm.config import DMConfig
from modelatlas.distill.methods.dm.method import run

register(MethodSpec("dm", DMConfig, run, "distribution matching with random networks (DM)",
                    eval_dsa=lambda cfg: cfg.dsa, accepts_init=True))
