"""An attribution run written to a folder, resumable (:func:`attribute_to_folder`).

DDM keeps the finished units of its offline phase (clusters, target model, matching as it goes) in
``out/checkpoint`` (:mod:`~modelatlas.attribution.checkpoint`). Its attribution is written to ``out`` as soon
as it is computed (``attribution.json`` then says ``"validation_pending": true`` when validation follows), and,
with validation, kept in ``out/checkpoint`` with the leave-one-cluster-out rows as they are retrained; a resume
(same settings) continues from what is kept and gives the tensors and scores of an uninterrupted run. Cost:
DDM's left to do, plus the retraining of the clusters not yet done (O(K_left x train_steps x N x #params)).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from modelatlas.attribution.checkpoint import RunCheckpoint, check_start
from modelatlas.attribution.config import DDMConfig
from modelatlas.attribution.ddm import Attribution, ddm_attribution, unlearn_choice
from modelatlas.attribution.report import check_out, render_top_clusters, save_attribution
from modelatlas.attribution.validate import loo_attribution, validation_scores
from modelatlas.digests import data_digest
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress


def attribute_to_folder(out: str | Path, data: tuple, num_classes: int, config: DDMConfig, seed: int = 0,
                        dataset: str = "", validate: bool = False, test_index: list[int] | None = None,
                        resume: bool = False, progress: Progress | None = None,
                        every_s: float = 5.0, on_resume: Callable[[], None] | None = None,
                        class_names: list[str] | None = None) -> tuple[Attribution, dict, torch.Tensor | None]:
    """DDM attribution of ``data`` = (x, y, x_test, y_test) written to ``out`` (report.save_attribution; the plot
    shows ``test_index``, default the first three, classes named by ``class_names``), with ``validate`` the LOO
    truth and its scores; returns (attribution, the ``attribution.json`` settings with ``unlearn_used``, the
    online step that ran, and ``unlearn_why``, the LOO matrix or None). Progress is kept in ``out/checkpoint``
    (DDM's offline units; with ``validate`` the LOO rows, saved every ``every_s`` seconds) and removed once the
    results are written; ``resume`` continues from it (none: a fresh start) and refuses one of other settings
    (dataset, sizes, seed, validate, config, data); without ``resume`` a folder holding one is refused.
    ``on_resume`` is called once a resume's settings are found equal (the CLI says what is kept then)."""
    out = check_out(out)
    check_start(out, resume)
    xtr, ytr, xte, yte = data
    info = {"dataset": dataset, "n_train": len(xtr), "n_test": len(xte), "seed": seed, "config": config.to_dict()}
    ckpt = RunCheckpoint(out, _settings(info, validate, config, data), every_s)
    if resume:  # before DDM's own checks: a refusal there (e.g. too many samples) would drop the kept state
        ckpt.check_settings()
        if on_resume is not None:
            on_resume()
    info["unlearn_used"], info["unlearn_why"] = unlearn_choice(config, tuple(xtr.shape[1:]), num_classes)  # not a setting
    attr = ckpt.load_ddm() if resume else None  # a state of a run with validation refused: 'validate was true'
    if attr is None:
        attr = _ddm(ckpt, data, num_classes, config, seed, progress)
        if validate:
            ckpt.save_ddm(attr)
    png = render_top_clusters(attr, xtr, xte, yte, list(range(min(3, len(xte)))) if test_index is None else test_index,
                              class_names=class_names)
    save_attribution(out, attr, {**info, "validation_pending": True} if validate else info, None, png)
    if not validate:
        ckpt.remove()
        return attr, info, None
    true, loo_s = loo_attribution(xtr, ytr, xte, yte, num_classes, attr.assign, config, seed, progress,
                                  checkpoint=ckpt)
    info["validation"] = validation_scores(attr.matrix, true, attr.cluster_class, yte.long(), loo_s, attr.timings)
    save_attribution(out, attr, info, true, png)
    ckpt.remove()
    return attr, info, true


def _settings(info: dict, validate: bool, config: DDMConfig, data: tuple) -> dict:
    """What a resume must find unchanged: the run's sizes, seed, validate, every config field, a data digest."""
    return {**{k: v for k, v in info.items() if k != "config"}, "validate": validate, **config.to_dict(),
            "data": data_digest(*data)}


def _ddm(ckpt: RunCheckpoint, data: tuple, num_classes: int, config: DDMConfig, seed: int,
         progress: Progress | None) -> Attribution:
    """DDM keeping its offline units in ``ckpt`` (and continuing from those it holds). A refusal of the settings
    (a Hessian not positive definite, a diverged target model) drops them: a resume would meet it again, and a
    rerun with other settings would be refused for the state."""
    try:
        return ddm_attribution(*data, num_classes, config, seed, progress, checkpoint=ckpt)
    except ConfigError:
        ckpt.remove()
        raise
