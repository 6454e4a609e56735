"""``hello``: HeLlO, a label projector instead of stored soft labels (Yu et al. 2024/2025)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.hello.config import HelloConfig
from modelatlas.distill.methods.hello.method import run

register(MethodSpec("hello", HelloConfig, run, "images + LoRA label projector on a frozen backbone (HeLlO)",
                    eval_dsa=lambda cfg: True, accepts_init=True))
