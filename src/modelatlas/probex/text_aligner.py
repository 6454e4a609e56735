"""Weights and language: map a layer into a frozen text encoder's space (ProbeX Task B).

Paper step labels: a text embedding t_c of each class's prompt, a learned linear G maps it to r_T; the logit
of model X for class c is cos(e(X), G t_c) / temperature; cross-entropy over the seen classes' prompts. At
test time the same cosine ranks unseen classes' prompts (zero-shot) or models for a free-text query.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelatlas.digests import data_digest
from modelatlas.errors import ConfigError
from modelatlas.probex.estimator import WeightExpert
from modelatlas.probex.fitted import check_fitted
from modelatlas.probex.model import check_train_memory
from modelatlas.probex.train import train_loop


class _Aligner(nn.Module):
    """The weight encoder (ProbeX or dense, no head) and G: text space -> r_T."""

    def __init__(self, encoder: nn.Module, d_text: int, rank_t: int):
        super().__init__()
        self.encoder = encoder
        self.text_map = nn.Linear(d_text, rank_t, bias=False)  # G

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(x)


def _other_prompts(reference, query: torch.Tensor) -> torch.Tensor:
    """The (C', d_text) reference prompts other than the query itself: a query that is one of them word for
    word (the same embedding) split the softmax with its twin, and a perfect match scored log(1/2)."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32).reshape(-1, query.shape[1])  # (C, d_text)
    same = F.cosine_similarity(ref, query, dim=1) > 1 - 1e-6  # (C,)
    return ref[~same]


class ProbeXTextAligner(WeightExpert):
    """Contrastive weight-text alignment. ``fit(X, labels, text_embeddings)``: ``labels[b]`` indexes the row
    of ``text_embeddings`` (C, d_text) that describes model b's class.

    Time per epoch O(B (ProbeX cost + C r_T)); memory O(params + C d_text).
    Fitted attributes: ``module_``, ``mean_``, ``scale_``, ``classes_``, ``text_`` (seen prompts' embeddings).
    """

    kind = "text"

    def fit(self, x, labels, text_embeddings, classes: list[str] | None = None, progress=None,
            checkpoint_dir=None, resume: bool = False) -> ProbeXTextAligner:
        check_train_memory(self.config)  # before the layers are read and normalised
        x = self._models(x, "ProbeXTextAligner.fit")
        text = torch.as_tensor(np.asarray(text_embeddings), dtype=torch.float32)
        labels = _indices(labels, text.shape[0] if text.ndim else 0)
        if labels.ndim != 1 or labels.shape[0] != x.shape[0] or text.ndim != 2 or not (
                labels.numel() and 0 <= int(labels.min()) and int(labels.max()) < text.shape[0]):
            raise ConfigError(f"labels must be (B,) indices into {text.shape[0]} text embeddings (C, d_text), "
                              f"from 0 to {text.shape[0] - 1}, with B={x.shape[0]}; got labels {tuple(labels.shape)} "
                              f"(range {_range(labels)}) and text embeddings {tuple(text.shape)}")
        bad = (~torch.isfinite(text)).any(1).nonzero().flatten().tolist()
        if bad:  # every loss would be NaN, and the untrained start kept as the best state
            raise ConfigError(f"text embedding {bad[0]} holds NaN or inf values; embed its prompt again")
        if classes is not None and len(classes) != text.shape[0]:  # saved with the expert, one per prompt
            raise ConfigError(f"classes names {len(classes)} prompts but there are {text.shape[0]} text embeddings")
        train, val = self._split(x.shape[0])
        self._fit_normaliser(x[train])
        xn = self._normalise(x)
        self.text_ = text
        self.classes_ = list(classes) if classes is not None else [str(i) for i in range(text.shape[0])]
        self.module_ = self._build(x.shape[1], x.shape[2], 0)

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(xb, text), yb)

        def score() -> tuple[float, float]:  # (top-1 over the seen classes, CE) on validation models
            logits = self._logits(xn[val], text)
            return float((logits.argmax(1) == labels[val]).float().mean()), float(F.cross_entropy(logits, labels[val]))

        self.history_ = train_loop(self.module_, loss, xn[train], labels[train], score, self.config,
                                   progress, checkpoint_dir, resume,
                                   {"task": "text", "layer": self.layer, "models": x.shape[0], "prompts": self.classes_,
                                    **({"data": data_digest(x, labels, text)} if checkpoint_dir is not None else {})})
        return self

    def _network(self, d_h: int, d_w: int, d_y: int) -> nn.Module:
        # Built inside _build's seeded RNG, G included, so the same seed gives the same start.
        return _Aligner(super()._network(d_h, d_w, d_y), self.text_.shape[1], self.config.rank_t)

    def _logits(self, xn: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        e = F.normalize(self.module_.embed(xn), dim=1)  # (B, r_T)
        t = F.normalize(self.module_.text_map(text), dim=1)  # (C, r_T)
        return e @ t.T / self.config.temperature  # (B, C)

    def embed_models(self, x) -> np.ndarray:
        """Unit-norm embeddings of models in the shared space, shape (B, r_T): what an index stores so that
        later queries need no weights (:meth:`scores_from_embeddings`)."""
        check_fitted(self, "module_")
        with torch.no_grad():
            return F.normalize(self.module_.embed(self._normalise(x)), dim=1).numpy()

    def scores_from_embeddings(self, embeddings, query_embedding, reference=None) -> np.ndarray:
        """:meth:`search_scores` for models already embedded by :meth:`embed_models`, shape (B,)."""
        check_fitted(self, "module_")
        e = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)  # (B, r_T)
        query = torch.as_tensor(np.asarray(query_embedding), dtype=torch.float32).reshape(1, -1)  # (1, d_text)
        d_text, r_t = self.module_.text_map.in_features, self.module_.text_map.out_features
        if e.ndim != 2 or e.shape[1] != r_t:
            raise ConfigError(f"model embeddings must be (B, {r_t}) from this expert's embed_models; got "
                              f"{tuple(e.shape)}")
        if query.shape[1] != d_text:
            raise ConfigError(f"the query embedding has width {query.shape[1]}, but this expert was trained on text "
                              f"embeddings of width {d_text} (another text encoder?)")
        text = query if reference is None else torch.cat([query, _other_prompts(reference, query)])
        with torch.no_grad():
            cos = e @ F.normalize(self.module_.text_map(text), dim=1).T  # (B, 1 + C)
        if reference is None:
            return cos[:, 0].numpy()
        return torch.log_softmax(cos / self.config.temperature, 1)[:, 0].numpy()  # (B,)

    def similarity(self, x, text_embeddings=None) -> np.ndarray:
        """Cosine between every model and every prompt, shape (B, C); default prompts: the seen classes."""
        check_fitted(self, "module_")
        text = self.text_ if text_embeddings is None else torch.as_tensor(np.asarray(text_embeddings), dtype=torch.float32)
        if text.ndim == 1:
            text = text.unsqueeze(0)  # one query: (1, d_text)
        d_text = self.module_.text_map.in_features
        if text.ndim != 2 or text.shape[1] != d_text:  # else a matmul RuntimeError
            raise ConfigError(f"the text embeddings have width {text.shape[-1] if text.ndim else 0}, but this expert "
                              f"was trained on text embeddings of width {d_text} (another text encoder?)")
        with torch.no_grad():
            return (self._logits(self._normalise(x), text) * self.config.temperature).numpy()

    def predict(self, x, text_embeddings=None) -> np.ndarray:
        """Index of the best-matching prompt per model (zero-shot when given unseen classes' embeddings)."""
        return self.similarity(x, text_embeddings).argmax(1)

    def predict_proba(self, x, text_embeddings=None) -> np.ndarray:
        """Softmax over the prompts of the temperature-scaled cosines, shape (B, C)."""
        return torch.softmax(torch.as_tensor(self.similarity(x, text_embeddings)) / self.config.temperature, 1).numpy()

    def search_scores(self, x, query_embedding, reference=None) -> np.ndarray:
        """Score of every model for one text query, shape (B,).

        Without ``reference``: the cosine to the query. With ``reference`` (C, d_text) prompts, e.g. the seen
        classes': the log-probability of the query against query + references, log softmax_q(cos / T). This
        normalises away models whose embedding is close to every prompt ("hubs"), so the top model is one
        that matches the query better than any other description. Time O(B (C + 1) r_T).
        """
        return self.scores_from_embeddings(self.embed_models(x), query_embedding, reference)

    def search(self, x, query_embedding, reference=None) -> np.ndarray:
        """Model indices ranked for one text query (best first); see :meth:`search_scores`."""
        return np.argsort(-self.search_scores(x, query_embedding, reference), kind="stable")

    def _extra_tensors(self) -> dict:
        return {"text": self.text_}

    def _extra_meta(self) -> dict:
        return {"classes": self.classes_, "d_text": int(self.text_.shape[1])}

    def _restore(self, meta: dict, tensors: dict) -> None:
        self.classes_ = list(meta["classes"])
        self.text_ = tensors["text"]
        if self.text_.ndim != 2 or self.text_.shape[1] != int(meta["d_text"]):
            raise ValueError(f"text embeddings {tuple(self.text_.shape)} do not have d_text={meta['d_text']}")
        # one name per prompt: a missing one was an IndexError when a model was described by it
        if not isinstance(meta["classes"], list) or len(self.classes_) != self.text_.shape[0]:
            raise ValueError(f"{len(self.classes_)} prompt names for {self.text_.shape[0]} text embeddings")
        self.module_ = self._build(*meta["shape"], 0)
        self.module_.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("module.")})


def _indices(labels, n_text: int) -> torch.Tensor:
    """Labels as a long tensor, refusing what is not integer indices: prompts given as labels (the natural
    mistake) were a numpy.str_ TypeError, and 0.5 was truncated to class 0."""
    arr = np.asarray(labels)
    if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        odd = repr(arr[np.mod(arr, 1) != 0].flat[0].item())  # NaN included
    elif arr.dtype.kind not in "biuf":
        odd = "strings" if arr.dtype.kind in "USO" else f"values of type {arr.dtype}"
    else:
        odd = None
    if odd is not None:
        raise ConfigError(f"labels must be integer indices into the {n_text} text embeddings (the row describing "
                          f"each model's class); got {odd}")
    return torch.as_tensor(arr, dtype=torch.long)


def _range(labels: torch.Tensor) -> str:
    return f"{int(labels.min())}..{int(labels.max())}" if labels.numel() else "empty"
