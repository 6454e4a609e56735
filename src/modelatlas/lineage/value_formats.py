"""What the one pass over the weights (:mod:`.distances`) learns of the values themselves, as it reads them: the
low-precision format a model's values fit (:class:`ValueFormats`) and a few values of each model at the same
positions (:class:`ValueSamples`, for the screens of :mod:`.sparse_merges`, which so read no file again).
"""

from __future__ import annotations

import numpy as np
import torch

from modelatlas.lineage.merge_values import verify_grid
from modelatlas.weights import TensorInfo


class ValueSamples:
    """:data:`PER_LAYER` evenly spaced values of each layer a value check samples (:func:`.merge_values.verify_grid`), per model,
    kept as the pass reads them (NaN where a read failed): ``values`` (N, S). Time O(S) a model and layer."""

    PER_LAYER = 32

    def __init__(self, n: int, layers: list[TensorInfo]):
        chosen = verify_grid(layers)
        self.positions = {t.name: torch.linspace(0, t.numel - 1, min(self.PER_LAYER, t.numel)).round().long()
                          for t in chosen}
        starts = np.cumsum([0] + [len(p) for p in self.positions.values()])
        self.starts = dict(zip(self.positions, starts[:-1].tolist()))
        self.values = np.full((n, int(starts[-1])), np.nan)  # (N, S)

    def update(self, i: int, info: TensorInfo, row: torch.Tensor) -> None:
        """Keep model ``i``'s sampled values of layer ``info`` (its (1, P) ``row``), if a chosen layer."""
        pos = self.positions.get(info.name)
        if pos is not None:
            self.values[i, self.starts[info.name]:self.starts[info.name] + len(pos)] = row[0, pos].double().numpy()


class ValueFormats:
    """Which low-precision float format all of a model's values fit exactly, whatever the stored dtype: a
    model rounded to float16 or bfloat16 and saved as float32 (an up-cast copy) holds only values of that
    format, which a trained float32 model never does. Checked on each layer read while a model still fits
    some format (its first 256 values first), so a float32 model costs O(1) per layer; a model
    needs ``min_values`` values other than 0 and +-1 (an untrained zero or one layer fits every format) to
    count. Time O(P) per model that fits, O(1) per layer for the others."""

    FORMATS = (("bfloat16", torch.bfloat16), ("float16", torch.float16))  # coarser first: bf16 ⊂ fp16 in range
    SAMPLE = 256  # values checked first, so that a model which fits no format costs no pass over its layer

    def __init__(self, n: int, min_values: int = 64, samples: ValueSamples | None = None):
        self.samples = samples  # kept beside: both look at every layer row the pass reads (distances._rows)
        self.fits = {name: np.ones(n, dtype=bool) for name, _ in self.FORMATS}
        self.informative = np.zeros(n, dtype=np.int64)
        self.min_values = min_values

    def update(self, i: int, row: torch.Tensor, stored: torch.dtype = torch.float32) -> None:
        """Check model ``i``'s layer ``row`` (read as float32 from a tensor stored as ``stored``). A tensor stored
        as bfloat16 or float16 fits its own format by construction: only the coarser formats are checked (a
        bfloat16 model saved as float16 still shows), so a bfloat16 model costs nothing (before: four
        conversions and two comparisons of every value, half of a bfloat16 1B model's recovery time)."""
        coarser = self.FORMATS[:next((j for j, (_, dt) in enumerate(self.FORMATS) if dt == stored), None)]
        for part in (row[..., :self.SAMPLE], row):  # a trained float32 model fails on the first values: O(1)
            if not any(f[i] for f in self.fits.values()):
                return
            for name, dt in coarser:
                if self.fits[name][i]:
                    self.fits[name][i] = torch.equal(part.to(dt).to(part.dtype), part)
        if self.informative[i] < self.min_values:  # counted until there are enough
            self.informative[i] += int((row.abs() != 1).logical_and_(row != 0).sum())

    def formats(self) -> list[str]:
        """Per model: the coarsest format its values fit, or "" (none, or too few informative values)."""
        return [next((name for name, _ in self.FORMATS if self.fits[name][i]), "")
                if self.informative[i] >= self.min_values else "" for i in range(len(self.informative))]
