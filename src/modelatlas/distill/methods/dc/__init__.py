"""``dc`` and ``dsa``: dataset condensation by gradient matching (Zhao et al. ICLR 2021), without and with
differentiable siamese augmentation (Zhao & Bilen ICML 2021)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.dc.config import DCConfig, DSAConfig
from modelatlas.distill.methods.dc.method import run

register(MethodSpec("dc", DCConfig, run, "gradient matching (DC)", eval_dsa=lambda cfg: cfg.dsa, accepts_init=True))
register(MethodSpec("dsa", DSAConfig, run, "gradient matching with siamese augmentation (DSA)",
                    eval_dsa=lambda cfg: cfg.dsa, accepts_init=True))
