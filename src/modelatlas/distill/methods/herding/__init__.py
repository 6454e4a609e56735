"""``herding``: greedy feature-mean matching of real examples in an embedding (Welling 2009; the DC baseline)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.herding.config import HerdingConfig
from modelatlas.distill.methods.herding.method import run

register(MethodSpec("herding", HerdingConfig, run, "real examples whose feature mean tracks the class mean"))
