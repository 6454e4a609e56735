"""Learning on weights: ProbeX tree experts (Horwitz et al., "Learning on Model Weights using Tree Experts",
arXiv 2410.13569).

- :class:`ProbeXClassifier` predicts what a model was trained on (a multi-hot class set) from one layer.
- :class:`ProbeXTextAligner` maps weights into a frozen text encoder's space: zero-shot classification of
  models of unseen classes and free-text search over models.
- :class:`DenseExpert` and :class:`StatNNClassifier` are the paper's baselines in the same interface.
- :class:`TreeRouter` sends a model to its Model Tree's expert and refuses models that belong to no known tree.
"""

from modelatlas.probex.config import ProbeXConfig
from modelatlas.probex.estimator import (
    DenseExpert,
    ProbeXClassifier,
    fit_probex,
    load_expert,
)
from modelatlas.probex.fitted import NotFittedError
from modelatlas.probex.layers import as_matrix, candidate_layers, load_layer, load_layers
from modelatlas.probex.model import DenseNet, ProbeXNet, count_parameters
from modelatlas.probex.router import NotInAnyTreeError, RouteResult, TreeRouter
from modelatlas.probex.statnn import StatNNClassifier, layer_statistics
from modelatlas.probex.text_aligner import ProbeXTextAligner

__all__ = [
    "DenseExpert", "DenseNet", "NotFittedError", "NotInAnyTreeError", "ProbeXClassifier", "ProbeXConfig", "ProbeXNet",
    "ProbeXTextAligner", "RouteResult", "StatNNClassifier", "TreeRouter", "as_matrix", "candidate_layers",
    "count_parameters", "fit_probex", "layer_statistics", "load_expert", "load_layer", "load_layers",
]
