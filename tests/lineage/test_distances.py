import numpy as np
import pytest
import torch
from scipy.stats import kurtosis

from modelatlas.lineage.distances import stream_pair_stats
from modelatlas.lineage.rounding import debiased_singular_values
from modelatlas.lineage.sources import MemoryCheckpoint
from modelatlas.lineage.spectra import _batch_terms, _detection_edge, spectral_distances


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


@pytest.mark.parametrize("sketch", [None, 64])  # exact, and streamed one model at a time
def test_a_constant_layer_adds_no_kurtosis(sketch):
    # A zero-initialised layer (a gate, ControlNet's zero convolutions) in the base, trained in the children:
    # its float32 moments are rounding noise, which divided by a variance of ~0 gave kurtosis of 1e282.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 40, generator=g)
    gate = [torch.zeros(40, 40), 0.05 * torch.randn(40, 40, generator=g), torch.full((40, 40), 0.3)]
    ckpts = [MemoryCheckpoint(f"m{i}", {"w": w + 0.01 * i, "gate": z}) for i, z in enumerate(gate)]
    st = stream_pair_stats(ckpts, ckpts[0].tensors(), sketch=sketch)
    for i, ck in enumerate(ckpts):
        want = sum(kurtosis(ck.read(t).double().flatten().numpy(), fisher=True) if i == 1 or t == "w" else 0.0
                   for t in ("w", "gate"))
        assert st.kurtosis[i] == pytest.approx(want, rel=1e-4, abs=1e-6)  # float32 powers


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


def test_streamed_large_layers_equal_the_stacked_path():
    # layers of 96 x 96 = 9216 > 4 x 1024 weights are reduced one model at a time (no (N, P) block); the result
    # must be the stacked (N, P) computation's, bit for bit, rank sketches included; one failed read
    class Broken(MemoryCheckpoint):
        def _read(self, name):
            raise OSError("gone")

    ckpts = make_models(n=5, seed=4, shapes=((96, 96), (8, 8), (96, 96)))
    ckpts.insert(2, Broken("bad", {t.name: torch.zeros(t.shape) for t in ckpts[0].tensors()}))
    layers = ckpts[0].tensors()
    a = stream_pair_stats(ckpts, layers, sketch=16, gram_sketch=1024, seed=3)
    b = stream_pair_stats(ckpts, layers, sketch=16, gram_sketch=1024, seed=3, stream=False)
    assert list(a.failed) == list(b.failed) == [2]
    ok = [0, 1, 3, 4, 5]
    for f in ("rms", "rel"):
        np.testing.assert_array_equal(getattr(a, f)[np.ix_(ok, ok)], getattr(b, f)[np.ix_(ok, ok)])
    np.testing.assert_array_equal(a.kurtosis[ok], b.kurtosis[ok])
    np.testing.assert_array_equal(a.layer_kurtosis[ok], b.layer_kurtosis[ok])
    assert len(a.sketches) == len(b.sketches) == 3
    for x, y in zip(a.sketches, b.sketches):
        np.testing.assert_allclose(x[ok], y[ok], rtol=1e-5, atol=1e-6)  # per-model vs batched matmul


def test_power_sums_with_workspace_equal_fresh_powers():
    from modelatlas.lineage.distances import _power_sums
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3000, generator=g) * 0.1 + 0.3
    e = x - 0.25
    want = torch.stack([e.sum(1), (e * e).sum(1), (e * e * e).sum(1), (e * e).square().sum(1)], 1).double()
    torch.testing.assert_close(_power_sums(x, 0.25), want, rtol=0, atol=0)  # the same float32 reductions
    work = torch.empty(3, 7, 3000)
    torch.testing.assert_close(_power_sums(x, 0.25, work), want, rtol=0, atol=0)
    torch.testing.assert_close(_power_sums(x[:3], 0.25, work), want[:3], rtol=0, atol=0)  # reused, partly


def test_spectra_with_reused_buffers_equal_one_fresh_batch():
    from modelatlas.lineage import spectra
    g = torch.Generator().manual_seed(6)
    y = torch.randn(9, 12, 6, generator=g)  # (N, n, s)
    pairs = np.stack(np.triu_indices(9, 1), 1)  # 36 pairs, 5 batches of 8
    old = spectra._PAIRS
    try:
        spectra._PAIRS = 8
        ranks, nuc, cap = spectral_distances([y.numpy()], pairs, 1e-2)
    finally:
        spectra._PAIRS = old
    diff = y[pairs[:, 0]] - y[pairs[:, 1]]  # (36, 12, 6), all at once, fresh tensors
    sv = torch.linalg.eigvalsh(diff.transpose(1, 2) @ diff).double().clamp_min(0).sqrt().flip(1)
    norms = torch.linalg.matrix_norm(y, ord="fro")
    floor = torch.maximum(1e-2 * sv[:, :1], 1e-6 * torch.maximum(norms[pairs[:, 0]], norms[pairs[:, 1]])[:, None])
    np.testing.assert_array_equal(ranks, (sv > floor).sum(1).numpy())
    np.testing.assert_allclose(nuc, (sv.sum(1) / (12 * 6) ** 0.5).numpy(), rtol=1e-6)
    assert cap == 6


def make_explicit_count(rs, n):
    """The (n, 2s) count-sketch matrix Psi of a ``RankSketch``: row perm[t] -> bucket t mod 2s."""
    psi = torch.zeros(n, rs.buckets)
    for t, i in enumerate(rs.perm.tolist()):
        psi[i, t % rs.buckets] = rs.slot_signs[t, 0]
    return psi


@pytest.mark.parametrize("shape", [(300, 40), (256, 24)])  # 300 rows: a partial last block of buckets
def test_count_rank_sketch_is_psi_t_w_omega(shape):
    from modelatlas.lineage.spectra import RankSketch
    from modelatlas.weights import TensorInfo
    rs = RankSketch(TensorInfo("w", shape, "float32"), 16, seed=5, kind="count")
    assert rs.perm is not None and rs.buckets == 32
    x = torch.randn(3, shape[0] * shape[1], generator=torch.Generator().manual_seed(0))
    psi = make_explicit_count(rs, shape[0])
    want = psi.T @ x.view(3, *shape) @ rs.omega  # (3, 32, 16)
    torch.testing.assert_close(rs(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rs(x[:1] - x[1:2]), rs(x[:1]) - rs(x[1:2]), rtol=1e-5, atol=1e-5)  # linear
    assert sorted(rs.perm.tolist()) == list(range(shape[0]))  # every row lands in exactly one bucket


def test_count_sketch_keeps_low_ranks_and_agrees_with_gaussian():
    # differences of rank 1, 3 and 6 in a 300 x 40 layer (rows > 2s: two-sided sketch); both sketch kinds
    # count the same ranks, and a full-rank difference saturates at s
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 40, generator=g)
    ckpts = [MemoryCheckpoint("base", {"w": base})]
    for r in (1, 3, 6):
        ckpts.append(MemoryCheckpoint(f"r{r}", {"w": base + torch.randn(300, r, generator=g) @ torch.randn(r, 40, generator=g)}))
    ckpts.append(MemoryCheckpoint("full", {"w": base + 0.1 * torch.randn(300, 40, generator=g)}))
    pairs = np.array([[0, 1], [0, 2], [0, 3], [0, 4]])
    got = {}
    for kind in ("count", "gaussian"):
        st = stream_pair_stats(ckpts, ckpts[0].tensors(), sketch=16, rank_sketch=kind)
        got[kind] = spectral_distances(st.sketches, pairs, rtol=1e-3)[0].tolist()
    assert got["count"] == got["gaussian"] == [1, 3, 6, 16]


def test_rank_sketch_must_be_known():
    from modelatlas.errors import ConfigError
    from modelatlas.lineage.config import LineageConfig
    with pytest.raises(ConfigError, match="rank_sketch"):
        LineageConfig(rank_sketch="sparse")


def test_spectra_split_over_threads_equal_one_call():
    from modelatlas.lineage.spectra import _eigvalsh_split
    g = torch.randn(100, 20, 12, generator=torch.Generator().manual_seed(0))
    gram = g.transpose(1, 2) @ g  # (100, 12, 12)
    want = torch.linalg.eigvalsh(gram)
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            got = torch.empty(100, 12)
            _eigvalsh_split(gram, got)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)


def test_detection_edge_is_where_the_shrinkage_starts():
    """A value just over the Marchenko-Pastur edge ``1 + sqrt(b)`` noise units shrinks to ``b^(1/4)`` units:
    rows 64, s 4 (b = 1/16), pair energy 16 (a unit of sqrt(16 / 4) = 2): edge 1.25 x 2 = 2.5, shrunk to
    0.5 x 2 = 1; one under it to 0."""
    assert _detection_edge(16.0, 64, 4) == pytest.approx(1.0)
    shrunk = debiased_singular_values(torch.tensor([[2.50001, 2.4, 0.0, 0.0]], dtype=torch.float64),
                                      torch.tensor([16.0], dtype=torch.float64), 64)
    assert shrunk[0, 0].item() == pytest.approx(1.0, abs=0.02)
    assert shrunk[0, 1].item() == 0.0


def test_a_common_edge_drops_values_from_signal_rank_and_nuclear_norm():
    """Values 3, 1, 0.5 (unquantized: nothing shrunk), floor 0.1, 4 rows x 3: rank 3; over an edge of 0.8 the
    signal rank is 2 and the nuclear norm (3 + 1) / sqrt(12), not 4.5 / sqrt(12); the rank stays 3."""
    sv, floor, pr = torch.tensor([[3.0, 1.0, 0.5]], dtype=torch.float64), torch.tensor([[0.1]]), torch.tensor([[0, 1]])
    rank, signal, _, _, nuc = _batch_terms(sv, floor, None, pr, 4)[:, 0]
    assert (rank, signal, nuc) == (3, 3, pytest.approx(4.5 / 12**0.5))
    rank, signal, _, _, nuc = _batch_terms(sv, floor, None, pr, 4, edge=0.8)[:, 0]
    assert (rank, signal, nuc) == (3, 2, pytest.approx(4.0 / 12**0.5))


def test_a_common_edge_counts_the_shown_energy_over_it_too():
    """The update's share over the noise (``shown``: l2 for a tree whose updates are hidden) is counted over the
    common edge like the signal rank: values 3, 1, 0.5 over an edge of 0.8 keep 9 + 1 of 10.25, not all of it.
    Over each pair's own edge, a tree of two types read a one-grid Q4_0 pair's iid update (its rounding
    noise far under two independent ones') as shown and took nuclear x rank: 14 of 33 edges against 32."""
    sv, floor, pr = torch.tensor([[3.0, 1.0, 0.5]], dtype=torch.float64), torch.tensor([[0.1]]), torch.tensor([[0, 1]])
    _, _, kept, total, _ = _batch_terms(sv, floor, None, pr, 4, edge=0.8)[:, 0]
    assert (kept, total) == (pytest.approx(10.0), pytest.approx(10.25))
    _, _, kept, _, _ = _batch_terms(sv, floor, None, pr, 4)[:, 0]
    assert kept == pytest.approx(10.25)
