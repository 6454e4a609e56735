"""Data attribution: which groups of training data matter for which test predictions.

:func:`ddm_attribution` (DDM, Ye et al. CVPR 2024: reverse gradient matching + unlearning) and
:func:`loo_attribution` (ground truth by leave-one-cluster-out retraining), :func:`spearman_scores`,
:func:`within_class_spearman`; :func:`attribute_to_folder` runs them into a folder, resumable.
"""

from modelatlas.attribution.config import DDMConfig
from modelatlas.attribution.ddm import Attribution, ddm_attribution
from modelatlas.attribution.folder import attribute_to_folder
from modelatlas.attribution.validate import loo_attribution, spearman_scores, within_class_spearman

__all__ = ["Attribution", "DDMConfig", "attribute_to_folder", "ddm_attribution", "loo_attribution", "spearman_scores",
           "within_class_spearman"]
