"""Dataset distillation: compress a dataset into a few learnable synthetic examples.

Building blocks (stable API for every method): :mod:`~modelatlas.distill.nets` (ConvNet-d, MLP,
``make_net``), :mod:`~modelatlas.distill.augment` (DSA), :mod:`~modelatlas.distill.synthetic`
(``SyntheticSet``), :mod:`~modelatlas.distill.evaluate` (protocols, random baseline),
:mod:`~modelatlas.distill.loop` (seeded, resumable outer loop), :mod:`~modelatlas.distill.matching`,
:mod:`~modelatlas.distill.result` (result folder). Methods: :mod:`modelatlas.distill.methods`.
"""

from modelatlas.distill.api import default_protocol, distill, run_distillation
from modelatlas.distill.evaluate import EvalProtocol, EvalResult, evaluate_random_baseline, evaluate_synthetic
from modelatlas.distill.reevaluate import evaluate_result
from modelatlas.distill.synthetic import SyntheticSet

__all__ = ["EvalProtocol", "EvalResult", "SyntheticSet", "default_protocol", "distill", "evaluate_random_baseline",
           "evaluate_result", "evaluate_synthetic", "run_distillation"]
