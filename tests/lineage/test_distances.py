import numpy as np
import pytest
import torch
from scipy.stats import kurtosis

from modelatlas.lineage.distances import spectral_distances, stream_pair_stats
from modelatlas.lineage.sources import MemoryCheckpoint


def make_models(n=5, seed=0, shapes=((6, 6), (4, 8))):
    g = torch.Generator().manual_seed(seed)
    base = {f"w{i}": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}
    return [MemoryCheckpoint(f"m{k}", {name: w + 0.01 * k * torch.randn(*w.shape, generator=g)
                                       for name, w in base.items()}) for k in range(n)]


def test_gram_distances_match_naive_loop():
    ckpts = make_models()
    layers = ckpts[0].tensors()
    st = stream_pair_stats(ckpts, layers)
    n = len(ckpts)
    rms, rel = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):  # naive: one pair at a time
        for j in range(n):
            for t in layers:
                a, b = ckpts[i].read(t.name).double(), ckpts[j].read(t.name).double()
                rms[i, j] += float((a - b).pow(2).mean().sqrt()) / len(layers)
                rel[i, j] += float((a - b).norm() / ((a.norm() ** 2 + b.norm() ** 2) / 2).sqrt()) / len(layers)
    np.testing.assert_allclose(st.rms, rms, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.rel, rel, rtol=1e-6, atol=1e-9)


def test_kurtosis_matches_scipy_sum_over_layers():
    ckpts = make_models(n=3)
    st = stream_pair_stats(ckpts, ckpts[0].tensors())
    for i, ck in enumerate(ckpts):
        want = sum(kurtosis(ck.read(t.name).double().flatten().numpy(), fisher=True) for t in ck.tensors())
        assert st.kurtosis[i] == pytest.approx(want, rel=1e-9)


def test_tiny_differences_survive_float_cancellation():
    # Weights of size 1e3 differing by 1e-4: the centred Gram keeps the difference exact.
    base = torch.full((8, 8), 1000.0)
    step = torch.zeros(8, 8)
    step[0, 0] = 1e-2
    ckpts = [MemoryCheckpoint("a", {"w": base}), MemoryCheckpoint("b", {"w": base + step})]
    st = stream_pair_stats(ckpts, ckpts[0].tensors())
    assert st.rms[0, 1] == pytest.approx(float(step.pow(2).mean().sqrt()), rel=1e-3)


def test_rank_from_sketch_matches_exact_rank():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 16, generator=g)
    low = torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g)  # rank 3
    ckpts = [MemoryCheckpoint("a", {"w": w}), MemoryCheckpoint("b", {"w": w + 0.1 * low}),
             MemoryCheckpoint("c", {"w": w + 0.1 * torch.randn(16, 16, generator=g)})]
    st = stream_pair_stats(ckpts, ckpts[0].tensors(), sketch=8)
    ranks, nuc, cap = spectral_distances(st.sketches, np.array([[0, 1], [0, 2], [1, 1]]), rtol=1e-3)
    assert cap == 8
    assert ranks.tolist() == [3, 8, 0]  # exact rank 3; full rank saturates at the sketch size; identical = 0
    assert nuc[2] == 0 and nuc[1] > nuc[0] > 0


def test_failed_read_is_recorded_not_raised():
    class Broken(MemoryCheckpoint):
        def _read(self, name):
            raise OSError("disk on fire")

    ckpts = make_models(n=3)
    ckpts.append(Broken("bad", {t.name: torch.zeros(t.shape) for t in ckpts[0].tensors()}))
    st = stream_pair_stats(ckpts, ckpts[0].tensors())
    assert list(st.failed) == [3] and "disk on fire" in st.failed[3]
    assert np.isfinite(st.rms[:3, :3]).all()
