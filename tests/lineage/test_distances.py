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
        assert st.kurtosis[i] == pytest.approx(want, rel=1e-5)  # float32 powers, float64 sums


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


def test_sketched_distances_approximate_exact_within_5_percent():
    # 4 layers of 128 x 128 = 16384 > 4 x 1024 weights: sketched with k = 1024 buckets; the relative spread of
    # one squared distance is ~sqrt(2/1024) = 4.4%, of a distance half that, and averaging 4 layers halves it
    ckpts = make_models(n=6, seed=3, shapes=((128, 128),) * 4)
    layers = ckpts[0].tensors()
    exact = stream_pair_stats(ckpts, layers, gram_sketch=None)
    sk = stream_pair_stats(ckpts, layers, gram_sketch=1024, seed=1)
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(sk.rms[off], exact.rms[off], rtol=0.05)
    np.testing.assert_allclose(sk.rel[off], exact.rel[off], rtol=0.05)
    np.testing.assert_allclose(sk.kurtosis, exact.kurtosis, atol=1e-5)  # never sketched; float32 powers
    assert np.array_equal(sk.rms, stream_pair_stats(ckpts, layers, gram_sketch=1024, seed=1).rms)  # seeded
    small = stream_pair_stats(ckpts, layers, gram_sketch=8192)  # layer <= 4k weights: exact path
    np.testing.assert_allclose(small.rms, exact.rms, rtol=1e-12)


def test_sign_bucket_sketch_is_linear_and_unbiased():
    from modelatlas.lineage.distances import sign_bucket_sketch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5000, generator=g)
    y = sign_bucket_sketch(x, 64, seed=7)
    d = sign_bucket_sketch(x[:1] - x[1:], 64, seed=7)
    torch.testing.assert_close(y[0] - y[1], d[0], rtol=1e-5, atol=1e-4)
    est = np.mean([float(sign_bucket_sketch(x[:1] - x[1:], 64, seed=s).pow(2).sum()) for s in range(200)])
    assert abs(est / float((x[0] - x[1]).double().pow(2).sum()) - 1) < 0.03


def test_spectra_of_sketched_differences_equal_differences_of_sketches():
    ckpts = make_models(n=4, seed=5, shapes=((16, 16),))
    layers = ckpts[0].tensors()
    st = stream_pair_stats(ckpts, layers, sketch=8, seed=2)
    pairs = np.array([[0, 1], [1, 3], [0, 2]])
    ranks, nuc, cap = spectral_distances(st.sketches, pairs, 1e-2)
    # sketch the differences directly with the same Omega: a fresh pass over "models" that are the differences
    w = [ck.read("w0") for ck in ckpts]
    diffs = [MemoryCheckpoint(f"d{i}", {"w0": w[a] - w[b]}) for i, (a, b) in enumerate(pairs)]
    zero = MemoryCheckpoint("z", {"w0": torch.zeros(16, 16)})
    sd = stream_pair_stats(diffs + [zero], layers, sketch=8, seed=2)
    np.testing.assert_allclose(sd.sketches[0][:3], st.sketches[0][pairs[:, 0]] - st.sketches[0][pairs[:, 1]],
                               rtol=1e-4, atol=1e-5)
    r2, n2, _ = spectral_distances(sd.sketches, np.array([[0, 3], [1, 3], [2, 3]]), 1e-2)
    np.testing.assert_allclose(n2, nuc, rtol=1e-4)
    np.testing.assert_array_equal(r2, ranks)
    assert cap == 8
