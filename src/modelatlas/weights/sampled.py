"""The values a quantized layer's copy test is handed: the whole layer, or only the evenly spaced rows the
test compares (a source read just those: :meth:`~modelatlas.weights.Checkpoint.compared_rows`, then
:meth:`~modelatlas.weights.Checkpoint.read_rows`). GGUF's and FP4's tests take either; both tell them apart
here, explicitly: by shape alone, another model's whole (256, m) layer passed for a larger one read as its
sample and got a share. Rows are those of the layer's last dimension (a (-1, m) view). Time in each docstring.
"""

from __future__ import annotations

import torch


def holds_sample(x: torch.Tensor, shape: tuple[int, ...], pick: torch.Tensor, rows: torch.Tensor | None) -> bool:
    """Whether ``x`` is the whole layer of ``shape`` (``rows`` None) or its sampled rows ``pick`` (r,) as
    (r, m), ``rows`` (what the caller says ``x`` holds) being those. Time O(r)."""
    if rows is None:
        return tuple(x.shape) == tuple(shape)
    return torch.equal(rows.long(), pick.long()) and tuple(x.shape) == (len(pick), shape[-1])


def sample_values(x: torch.Tensor, shape: tuple[int, ...], pick: torch.Tensor) -> torch.Tensor:
    """Rows ``pick`` of ``x`` as (r, m), ``x`` the whole layer of ``shape`` or those rows already
    (:func:`holds_sample`), detached. Time O(r m)."""
    if tuple(x.shape) == tuple(shape):
        return x.detach().reshape(-1, shape[-1])[pick]  # (rows of the last dimension, m) -> (r, m)
    return x.detach()
