"""``ratbptt``: random truncated backpropagation through time (Feng, Vedantam & Kempe, ICLR 2024)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.ratbptt.config import RaTBPTTConfig
from modelatlas.distill.methods.ratbptt.method import run

register(MethodSpec("ratbptt", RaTBPTTConfig, run, "unrolled Adam with a random truncation window (RaT-BPTT)",
                    eval_kind="adam", eval_dsa=lambda cfg: cfg.dsa))
