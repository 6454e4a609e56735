"""What the pass keeps of the values (lineage.value_formats): sampled values for the sparse-merge screens."""

import numpy as np
import torch

from modelatlas.lineage.value_formats import ValueSamples
from modelatlas.weights import TensorInfo


def test_value_samples_keep_evenly_spaced_values_of_2d_layers():
    layers = [TensorInfo("bias", (8,), "float32"), TensorInfo("w", (2, 3), "float32"), TensorInfo("v", (40, 2), "float32")]
    s = ValueSamples(2, layers)
    assert list(s.positions) == ["w", "v"] and s.values.shape == (2, 6 + 32)  # w: all 6 values; v: 32 of 80
    s.update(1, layers[1], torch.arange(6.0).view(1, 6))
    s.update(1, layers[0], torch.ones(1, 8))  # not a chosen layer: nothing kept
    s.update(0, layers[2], torch.arange(80.0).view(1, 80))
    assert s.values[1, :6].tolist() == [0, 1, 2, 3, 4, 5] and np.isnan(s.values[0, :6]).all()  # unread: NaN
    assert s.values[0, 6] == 0 and s.values[0, -1] == 79 and s.values[0, 7] == 3  # round(79 / 31) = 3


def test_the_pass_keeps_the_samples():
    from modelatlas.lineage.distances import stream_pair_stats
    from modelatlas.lineage.sources import as_checkpoints

    ckpts, _ = as_checkpoints({n: {"w": torch.full((4, 4), float(k))} for k, n in enumerate("abc")})
    st = stream_pair_stats(ckpts, [TensorInfo("w", (4, 4), "float32")])
    assert st.samples.shape == (3, 16) and st.samples[:, 0].tolist() == [0.0, 1.0, 2.0]
