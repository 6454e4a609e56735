"""``teddy``: Taylor-approximated distillation with a pool of weak models (Yu et al., ECCV 2024)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.teddy.config import TeddyConfig
from modelatlas.distill.methods.teddy.method import run

register(MethodSpec("teddy", TeddyConfig, run, "first-order Taylor gradient agreement over a cached model pool (Teddy)",
                    eval_dsa=lambda cfg: cfg.dsa, accepts_init=True))
