"""Rounding error taken out of distances, moments and spectra (lineage.rounding)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage import rounding as R
from modelatlas.lineage.distances import _kurtosis_from_moments, stream_pair_stats
from modelatlas.lineage.export import copy_formats, copy_text
from modelatlas.lineage.rounding import (
    debiased_moments,
    debiased_singular_values,
    debiased_squared,
    least_squares_models,
    least_squares_scales,
    rounding_excess,
    same_grid_noise,
    same_model_pairs,
)
from modelatlas.lineage.sources import group_by_architecture
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.gguf import quantized, save_gguf

gguf = pytest.importorskip("gguf")


def make_noisy(p=1_000_000, step=1.0, seed=0):
    """Heavy-tailed x and x plus a uniform rounding error of one ``step``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(6.0).sample((p,)).double()
    u = (torch.rand(p, generator=gen, dtype=torch.float64) - 0.5) * step
    return x, x + u, torch.full((p,), step**2 / 12, dtype=torch.float64)


def check_sums(row, v):
    e = row
    sums = torch.stack([v.sum(), (e * v).sum(), (e * e * v).sum(), (v * v).sum()])
    return torch.cat([sums, R.moment_bias(sums, None, 0.0)])


def test_debiased_moments_give_the_kurtosis_of_the_values_before_rounding():
    x, noisy, v = make_noisy()
    powers = lambda t: torch.stack([t.sum(), (t**2).sum(), (t**3).sum(), (t**4).sum()])[None]  # noqa: E731
    true = float(_kurtosis_from_moments(powers(x), len(x))[0])
    raw = float(_kurtosis_from_moments(powers(noisy), len(x))[0])
    fixed = float(_kurtosis_from_moments(debiased_moments(powers(noisy), check_sums(noisy, v)[None]), len(x))[0])
    assert abs(raw - true) > 0.1  # a step of 0.8 sigma lowers it visibly
    assert fixed == pytest.approx(true, abs=0.02)


def test_a_checkpoints_own_moments_are_shifted_to_the_sums_of_e():
    """moment_bias: sums of x^m - w^m (about 0) give those of (x - c)^n - (w - c)^n (about the layer's shift c)
    binomially; the uniform error's by hand: [0, sum v, 3 sum e v, 6 sum e^2 v - 4.2 sum v^2]."""
    w = torch.tensor([0.1, -0.3, 0.6, 0.2, 1.4], dtype=torch.float64)
    x = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # w rounded to the integers
    raw = torch.stack([(x**m - w**m).sum() for m in range(1, 5)])
    want = torch.stack([((x - 0.3) ** n - (w - 0.3) ** n).sum() for n in range(1, 5)])
    assert torch.allclose(R.moment_bias(None, raw, 0.3), want)
    sums = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert R.moment_bias(sums, None, 0.3).tolist() == pytest.approx([0.0, 1.0, 6.0, 18 - 4.2 * 4])


def test_debiased_squared_by_hand():
    d2 = torch.tensor([[0.0, 5.0, 2.0], [5.0, 0.0, 4.0], [2.0, 4.0, 0.0]], dtype=torch.float64)
    out = debiased_squared(d2, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    assert out.tolist() == [[0.0, 4.0, 0.0], [4.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # 2 - 1 - 3 < 0: floored


def test_shrinkage_removes_pure_noise_and_recovers_a_spike():
    gen = torch.Generator().manual_seed(0)
    rows, s = 256, 64
    noise = torch.randn(8, rows, s, generator=gen, dtype=torch.float64) * 0.1  # energy rows * s * 0.01
    energy = torch.full((8,), rows * s * 0.01, dtype=torch.float64)
    pure = torch.linalg.svdvals(noise)
    assert float(debiased_singular_values(pure, energy, rows).max()) == 0.0
    a = torch.randn(rows, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(1, s, generator=gen, dtype=torch.float64)
    spike = a / a.norm() @ (b / b.norm()) * 5.0  # one singular value of 5 (noise edge ~ 0.1 (16 + 8) = 2.4)
    sv = debiased_singular_values(torch.linalg.svdvals(spike + noise), energy, rows)
    assert float(sv[:, 0].mean()) == pytest.approx(5.0, rel=0.03)
    assert float(sv[:, 1:].max()) == 0.0
    assert torch.equal(debiased_singular_values(pure, torch.zeros(8, dtype=torch.float64), rows), pure)


def write_gguf(path, weights, kind):
    write_mixed(path, weights, dict.fromkeys(weights, kind))


def make_family(folder, seed=0):
    """A base and three fine-tunes 5 % away (64 x 64 layers), and the second fine-tune as a Q4_0 file only:
    Q4_0 rounding moves the weights ~8 % of their RMS."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(64, 64, generator=gen) for k in ("a.weight", "b.weight")}
    models = {"base": base, **{f"ft{i}": {k: v + 0.05 * torch.randn(64, 64, generator=gen) for k, v in base.items()}
                               for i in range(3)}}
    for name, w in models.items():
        save_file(w, str(folder / f"{name}.safetensors"))
    write_gguf(folder / "ft1-q4_0.gguf", models["ft1"], "Q4_0")
    return folder


def family_stats(folder, names):
    ckpts = [open_checkpoint(folder / n) for n in names]
    (members, layers), = group_by_architecture(ckpts, None)[0]
    return stream_pair_stats(members, layers)


def test_a_quantized_stand_in_is_as_far_from_its_relatives_as_its_source(tmp_path, monkeypatch):
    folder = make_family(tmp_path)
    plain = family_stats(folder, ["base.safetensors", "ft0.safetensors", "ft1.safetensors", "ft2.safetensors"])
    names = ["base.safetensors", "ft0.safetensors", "ft1-q4_0.gguf", "ft2.safetensors"]
    fixed = family_stats(folder, names)
    # the summed variance is within ~3 % of the real error, 2.5x the fine-tunes' energy here: ~8 % on a distance
    assert np.allclose(fixed.rms[2], plain.rms[2], rtol=0.08)
    assert fixed.kurtosis[2] == pytest.approx(plain.kurtosis[2], abs=0.05)
    monkeypatch.setattr(R, "rounding_sums", lambda *a: None)  # as before: the rounding error left in
    raw = family_stats(folder, names)
    assert np.all(raw.rms[2, [0, 1, 3]] > 1.2 * plain.rms[2, [0, 1, 3]])


def test_same_model_pairs_by_hand():
    # 0 finest, 1 within rounding of 0, 2 too far from both, 3 within rounding of 0 and of 2
    energy = np.array([1.0, 4.0, 4.0, 9.0])
    excess = np.array([[0, 0.1, 3.0, 0.2], [0.1, 0, 3.0, 5.0], [3.0, 3.0, 0, 0.1], [0.2, 5.0, 0.1, 0]])
    spread = np.full((4, 4), 0.01)
    # 3 joins the nearest kept one relative to their energies: 0.1 / 13 (model 2) < 0.2 / 10 (model 0)
    assert same_model_pairs(excess, spread, energy, [3, 2, 1, 0]) == {1: 0, 3: 2}
    assert same_model_pairs(excess, spread, energy, [0, 1, 2, 3], z=0.0, rel=0.0) == {}


def test_rounding_excess_of_a_pair_on_one_grid_is_its_distance():
    # two models, energies 1 and 2 (v2 0.5, 1.0), 3 apart: excess 3 - 1 - 2 = 0, spread 0.8 x 1.5; on one grid
    # the roundings of one model are equal, so the whole 3 is the weights' and nothing varies (was: inf)
    d2 = torch.tensor([[0.0, 3.0], [3.0, 0.0]], dtype=torch.float64)
    sums = torch.tensor([[1.0, 0, 0, 0.5], [2.0, 0, 0, 1.0]], dtype=torch.float64)
    excess, spread = rounding_excess(d2, sums)
    assert excess[0, 1] == pytest.approx(0.0) and spread[0, 1] == pytest.approx(0.8 * 1.5)
    excess, spread = rounding_excess(d2, sums, np.array([[False, True], [True, False]]))
    assert excess[0, 1] == pytest.approx(3.0) and spread[0, 1] == 0.0
    assert excess[0, 0] == pytest.approx(-2.0)  # the diagonal still reads minus twice the energy


def write_mixed(path, weights, kinds):
    """A GGUF file of ``weights`` with each tensor's own type ``kinds[name]`` (a K_M file's mix)."""
    save_gguf(path, {k: quantized(v, kinds[k]) for k, v in weights.items()})


def test_a_mixed_file_and_a_q8_0_file_of_one_model_are_one_model(tmp_path):
    """base not given: as a Q8_0 file and as a mix (Q4_0 on two layers, Q8_0 on the third, as a Q4_K_M file of
    short rows types them). The shared Q8_0 layer made the pair's excess infinite: never one model, and the mix
    was placed as a model. The mix of a fine-tune 5 % away stays a model."""
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}
    ft = {k: v + 0.05 * torch.randn(64, 256, generator=gen) for k, v in base.items()}
    mix = {"a.weight": "Q4_0", "b.weight": "Q4_0", "c.weight": "Q8_0"}
    write_gguf(tmp_path / "base-q8_0.gguf", base, "Q8_0")
    write_mixed(tmp_path / "base-mix.gguf", base, mix)
    write_mixed(tmp_path / "ft-mix.gguf", ft, mix)
    forest = recover_lineage(sorted(tmp_path.iterdir()))
    assert forest.decisions["same_model_roundings"] == {"base-mix": "base-q8_0"}
    assert next(e for e in forest.edges if e.child == "base-mix").kind == "precision"


def make_roundings(folder, seed, step):
    """A base (not written) as base-q8_0.gguf and base-q4_0.gguf, and a fine-tune ``step`` x its RMS away as
    ft-q4_0.gguf (three 64 x 256 layers); returns the base and the generator."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}
    ft = {k: v + step * torch.randn(64, 256, generator=gen) for k, v in base.items()}
    write_gguf(folder / "base-q8_0.gguf", base, "Q8_0")
    write_gguf(folder / "base-q4_0.gguf", base, "Q4_0")
    write_gguf(folder / "ft-q4_0.gguf", ft, "Q4_0")
    return base, gen


def test_two_roundings_of_an_absent_model_are_drawn_as_one_model(tmp_path):
    """base is not given, only its Q8_0 and Q4_0 files: they were joined by a 'trained' edge, either way
    round; now the Q4_0 one is drawn beside the Q8_0 one. The Q4_0 file of a fine-tune 5 % away stays a model."""
    base, gen = make_roundings(tmp_path, seed=3, step=0.05)
    save_file({k: v + 0.05 * torch.randn(64, 256, generator=gen) for k, v in base.items()},
              str(tmp_path / "ft2.safetensors"))
    forest = recover_lineage(sorted(tmp_path.iterdir()))
    assert forest.decisions["same_model_roundings"] == {"base-q4_0": "base-q8_0"}
    edge = next(e for e in forest.edges if e.child == "base-q4_0")
    assert (edge.parent, edge.kind) == ("base-q8_0", "precision")
    assert copy_text(edge, copy_formats(forest)) == "q4_0 rounding of the model behind base-q8_0"
    assert next(e for e in forest.edges if e.child == "ft-q4_0" or e.parent == "ft-q4_0").kind == "trained"
    assert set(forest.decisions["quantized_models"]) == {"base-q8_0", "ft-q4_0"}


def test_same_grid_noise_by_hand():
    # p = 1000 weights, energy 1 each: mean step^2 = 12 / 1000; a difference of RMS 0.1 step reads
    # (0.01 + h(0.1)) p step^2 with h(0.1) = E f (1 - f) = 0.06979 (quadrature), of which h is the rounding's
    p, step2 = 1000, 12 / 1000
    d2 = p * step2 * (0.01 + 0.06979)
    assert same_grid_noise(d2, 1.0, p) == pytest.approx(p * step2 * 0.06979, rel=1e-3)
    far = p * step2 * (25 + 1 / 6)  # 5 steps apart: the two roundings independent, s^2 / 6
    assert same_grid_noise(far, 1.0, p) == pytest.approx(2.0, rel=1e-6)


def test_two_files_of_one_type_are_never_roundings_of_one_model(tmp_path):
    """Q4_0 files of a model and of its fine-tune 1 % away agree on most codes: with both roundings'
    energies subtracted they read nothing apart, and both were drawn as roundings of the model behind the
    Q8_0 file. Only the model's own Q4_0 file is; the fine-tune's stays a model."""
    make_roundings(tmp_path, seed=4, step=0.01)
    forest = recover_lineage(sorted(tmp_path.iterdir()))
    assert forest.decisions["same_model_roundings"] == {"base-q4_0": "base-q8_0"}


def test_a_lora_tree_with_a_quantized_stand_in_still_reads_low_rank(tmp_path):
    """A base and four rank-2 updates of it, one of them only as a Q4_0 file: its rounding noise made every
    pair of it full rank, so the tree read as full fine-tuning (nuclear x rank). Counted above the noise, its
    updates' ranks are the LoRA tree's again."""
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(4):
        kid = {k: v + torch.randn(64, 2, generator=gen) @ torch.randn(2, 256, generator=gen) * 0.3
               for k, v in base.items()}
        if i == 1:
            write_gguf(tmp_path / "lora1-q4_0.gguf", kid, "Q4_0")
        else:
            save_file(kid, str(tmp_path / f"lora{i}.safetensors"))
    forest = recover_lineage(sorted(tmp_path.iterdir()), stage="generalize")
    assert forest.decisions["distance"] == "rank"
    assert {(e.parent, e.child) for e in forest.edges} == {("base", c) for c in ("lora0", "lora1-q4_0", "lora2", "lora3")}


def test_rounding_sums_hand_the_row_read_to_the_variance_and_reuse_their_scratch():
    """The layer's values go to rounding_variance (not dequantized again); sums in a reused RoundingWork equal
    those of fresh tensors, model after model (the former formula written out, in its order)."""
    from modelatlas.lineage.sources import MemoryCheckpoint

    class Quantized(MemoryCheckpoint):
        def quantization(self, name):
            return "Q4_0"

        def rounding_variance(self, name, values=None):
            seen.append(values)
            return torch.full((3, 5), 0.25) + values.reshape(3, 5).abs()  # depends on the values given

    seen = []
    work = R.RoundingWork(15)
    for seed in range(3):
        row = torch.randn(1, 15, generator=torch.Generator().manual_seed(seed))
        got = R.rounding_sums(Quantized("q", {"w": row.reshape(3, 5)}), "w", row, 0.5, work)
        assert seen[-1] is row
        v, e = (0.25 + row.abs()).reshape(-1).double(), row.reshape(-1).double() - 0.5
        assert torch.equal(got[:4], torch.stack([v.sum(), (e * v).sum(), (e * v * e).sum(), (v * v).sum()]))


@pytest.mark.parametrize("gram_sketch", [None, 64])  # the stacked path, then the streamed (one model at a time)
def test_a_pass_reads_each_gguf_tensor_once(tmp_path, monkeypatch, gram_sketch):
    """read() keeps a quantized tensor's bytes for the rounding variance that follows it (it read them again)."""
    from modelatlas.weights.byte_ranges import ByteRanges

    reads = []
    read_into = ByteRanges.read_into
    monkeypatch.setattr(ByteRanges, "read_into", lambda self, offset, buf, what: (
        reads.append((self.path.name, offset)), read_into(self, offset, buf, what))[1])
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        write_gguf(tmp_path / f"m{i}.gguf", {k: torch.randn(64, 256, generator=gen) for k in "ab"}, "Q4_0")
    ckpts = [open_checkpoint(tmp_path / f"m{i}.gguf") for i in range(2)]
    st = stream_pair_stats(ckpts, ckpts[0].tensors(), sketch=8, gram_sketch=gram_sketch)
    assert len(reads) == 4 and len(set(reads)) == 4  # two layers of two models, each once
    assert len(st.rounding) == 2 and all((r.energy > 0).all() for r in st.rounding)  # the variance was read


@pytest.mark.parametrize("kind, want", [("q4_k+q6_k", True), ("q4_0+q6_k", True), ("q6_k", True),
                                        ("q4_0", False), ("q8_0+q5_1", False), ("", False), ("iq4_nl", False)])
def test_least_squares_scales_are_the_k_quants(kind, want):
    """llama.cpp fits a K-quant's scales by least squares (its stand-in's kurtosis reads low); a file with one
    such layer (llama-quantize's Q6_K output of a Q4_0 file) counts."""
    assert least_squares_scales(kind) is want
    assert least_squares_models({"m": kind, "f": ""}) == ({"m"} if want else set())
