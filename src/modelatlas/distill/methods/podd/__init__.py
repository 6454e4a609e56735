"""``podd``: poster dataset distillation, less than one image per class (Shul, Horwitz & Hoshen, TMLR 2025)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.podd.config import PoDDConfig
from modelatlas.distill.methods.podd.method import run

register(MethodSpec("podd", PoDDConfig, run, "one overlapping-crop poster per dataset on RaT-BPTT (PoDD)",
                    eval_kind="adam", eval_dsa=lambda cfg: cfg.dsa))
