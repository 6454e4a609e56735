"""``mtt``: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.mtt.config import MTTConfig
from modelatlas.distill.methods.mtt.method import run

register(MethodSpec("mtt", MTTConfig, run, "matching training trajectories of expert networks (MTT)",
                    eval_dsa=lambda cfg: cfg.dsa, accepts_init=True))
