"""AWQ models whose source is not given, read with the rescaling undone (:mod:`modelatlas.lineage.unsmoothed`).

The AWQ files are :mod:`modelatlas.zoo.awq`'s: factors 0.25-4 on each norm's inputs and on the
v/o and up/down pairs, 4-bit groups of 32, AutoAWQ's clipping.
"""

import numpy as np
import pytest
import torch

from modelatlas.lineage import recover_lineage
from modelatlas.lineage import unsmoothed as U
from modelatlas.lineage.distances import stream_pair_stats
from modelatlas.lineage.sources import MemoryCheckpoint
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.awq import CONFIG, awq_layer, awq_model, save_folder, smooth
from modelatlas.zoo.awq import llama_model as make_llama

O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def test_an_awq_model_stands_in_for_its_absent_source(tmp_path):
    """base -> ft -> (c1, c2), ft given only as its AWQ file: before, a tree of its own (its columns rescaled by
    0.25-4 put it as far from all as another model); now in its source's place, between base and c1, c2."""
    base = make_llama(0)
    ft = make_llama(1, base, 0.05)
    models = {"base": base, "c1": make_llama(2, ft, 0.05), "c2": make_llama(3, ft, 0.05), "other": make_llama(4)}
    paths = [save_folder(tmp_path / n, m) for n, m in models.items()] + [save_folder(tmp_path / "ft-awq", awq_model(ft), CONFIG)]
    forest = recover_lineage(paths)
    tree = next(t for t in forest.trees if "ft-awq" in t)
    assert sorted(tree) == ["base", "c1", "c2", "ft-awq"]
    assert {frozenset((e.parent, e.child)) for e in forest.edges if "other" not in (e.parent, e.child)} == {
        frozenset(("base", "ft-awq")), frozenset(("ft-awq", "c1")), frozenset(("ft-awq", "c2"))}
    assert forest.decisions["awq_unsmoothed"]["ft-awq"] in {"base", "c1", "c2"}


def test_an_awq_stand_ins_rescaled_distances_are_computed_once(tmp_path, monkeypatch):
    """Choosing the view's relative and the copy test's AWQ pass rank the same models by the same distance; the
    second computed it again (two layers and their norms of each model read again)."""
    from modelatlas.lineage import smoothed as S

    calls = []
    real = S.rescaled_distance
    monkeypatch.setattr(S, "rescaled_distance", lambda a, b: (calls.append((a.name, b.name)), real(a, b))[1])
    base = make_llama(0)
    ft = make_llama(1, base, 0.05)
    models = {"base": base, "c1": make_llama(2, ft, 0.05), "other": make_llama(4)}
    paths = [save_folder(tmp_path / n, m) for n, m in models.items()] + [save_folder(tmp_path / "ft-awq", awq_model(ft), CONFIG)]
    forest = recover_lineage(paths)
    assert forest.decisions["awq_unsmoothed"]["ft-awq"] in {"base", "c1"}
    assert sorted(calls) == [("ft-awq", "base"), ("ft-awq", "c1"), ("ft-awq", "other")]


def test_an_awq_copy_of_a_given_source_is_still_its_copy(tmp_path):
    base = make_llama(0)
    paths = [save_folder(tmp_path / "base", base), save_folder(tmp_path / "ft", make_llama(1, base, 0.05)),
             save_folder(tmp_path / "base-awq", awq_model(base), CONFIG)]
    forest = recover_lineage(paths)
    assert forest.decisions["duplicates"] == {"base-awq": "base"}
    assert "awq_unsmoothed" not in forest.decisions  # (read so for the pass, but placed as its source)


def test_the_pair_factors_come_back_from_the_column_and_row_norms(tmp_path):
    """o_proj's input factors (v_proj's rows divided by them) are in no stored tensor: the norms of o_proj's
    columns and v_proj's rows against the relative give them, to ~2 % (at most ~10 %: the 4-bit rounding of a column scaled down)."""
    base = make_llama(0)
    awq = open_checkpoint(save_folder(tmp_path / "q", awq_model(base), CONFIG))
    true = smooth(base, 7)[O_PROJ].float().norm(dim=0) / base[O_PROJ].float().norm(dim=0)  # (in,): o's input factors
    got = U.pair_factors(awq, MemoryCheckpoint("base", base), "model.layers.0.", "self_attn.v_proj.weight",
                         "self_attn.o_proj.weight", "input_layernorm.weight")
    assert float(true.max() / true.min()) > 10  # spread: 0.25 .. 4
    off = ((got / true) - 1).abs()
    assert float(off.median()) < 0.03 and float(off.max()) < 0.15


def test_only_a_rescaled_model_is_read_unsmoothed(tmp_path):
    """awq_slope: its columns follow its norms' factors (slope ~1); a plain 4-bit rounding of a model whose norms a
    fine-tune moved does not (~0), and keeps its distances."""
    base = make_llama(0)
    ft = MemoryCheckpoint("ft", make_llama(1, base, 0.05))
    awq = open_checkpoint(save_folder(tmp_path / "q", awq_model(base), CONFIG))
    plain = {k: v for k, v in base.items() if not k.endswith("_proj.weight")}
    for k in (k for k in base if k.endswith("_proj.weight")):
        plain.update(awq_layer(base[k].float(), 32, k.removesuffix(".weight")))
    rtn = open_checkpoint(save_folder(tmp_path / "rtn", plain, CONFIG))
    assert U.awq_slope(awq, ft) > 0.9
    assert abs(U.awq_slope(rtn, ft)) < 0.2
    layers = [t for t in rtn.tensors() if t.name == O_PROJ]
    members, relatives = U.unsmoothed([ft, rtn, awq], layers)
    assert relatives == {"q": "ft"} and members[1] is rtn and isinstance(members[2], U.UnsmoothedView)


@pytest.mark.parametrize("moments", [True, False])  # the view's path, and the variance alone
def test_column_errors_variance_is_the_columns_own_error_on_each_step(moments):
    w = torch.tensor([[0.1, 1.0], [-0.3, 2.0], [0.6, 3.0], [0.2, 4.0]], dtype=torch.float64)
    step = torch.ones(4, 2, dtype=torch.float64)
    got, _ = U.column_errors(w, step, moments=moments)
    # column 0 to the integers: errors 0.1, -0.3, -0.4, 0.2 -> (0.01 + 0.09 + 0.16 + 0.04) / 4; column 1 on them
    assert torch.allclose(got[:, 0], torch.full((4,), 0.075, dtype=torch.float64))
    assert torch.allclose(got[:, 1], torch.zeros(4, dtype=torch.float64))


def test_column_errors_sum_the_change_of_each_power():
    """Column 0 (0.1, -0.3, 0.6, 0.2) rounds to (0, 0, 1, 0): the column means of q^m - w^m are 0.25 less
    0.15, 0.125, 0.0495, 0.03485, each over its 4 entries; column 1 is on the integers (no change)."""
    w = torch.tensor([[0.1, 1.0], [-0.3, 2.0], [0.6, 3.0], [0.2, 4.0]], dtype=torch.float64)
    _, moments = U.column_errors(w, torch.ones(4, 2, dtype=torch.float64))
    assert moments.tolist() == pytest.approx([0.4, 0.5, 0.802, 0.8606])


def test_the_views_kurtosis_is_its_sources(tmp_path):
    """base -> ft -> c1, ft given as AWQ: in a column AWQ scaled down most values round to 0, an error that is
    the value itself; corrected as a uniform error independent of the value, the view's kurtosis read 0.02-0.40
    above ft's a layer (1.71 against 0.16 over the compared layers); with the error's moments read off the
    relative's columns and, on the layers clipped to 90 %, the clipped values taken as the relative's, within
    0.05 on each of the 14 projections (0.049 at most)."""
    base = make_llama(0)
    ft = make_llama(1, base, 0.05)
    cks = [MemoryCheckpoint("base", base), MemoryCheckpoint("c1", make_llama(2, ft, 0.05))]
    awq = open_checkpoint(save_folder(tmp_path / "ft-awq", awq_model(ft), CONFIG))
    layers = [t for t in awq.tensors() if t.name.endswith("_proj.weight")]
    members, _ = U.unsmoothed(cks + [awq], layers)
    view = stream_pair_stats(members, layers, gram_sketch=None).layer_kurtosis[2]
    source = stream_pair_stats(cks + [MemoryCheckpoint("ft", ft)], layers, gram_sketch=None).layer_kurtosis[2]
    assert isinstance(members[2], U.UnsmoothedView) and len(layers) == 14
    assert np.abs(view - source).max() < 0.06


def test_a_group_is_clipped_where_the_relative_goes_beyond_its_end_levels():
    """Three groups (runs of one variance along a row): row 0's first (the relative 1.5 steps above its top level
    3), row 1's whole row (0.5 below its lowest, -1: within a step, its rounding) not; then row 1's too
    (1.5 below). Steps of 2: the values 2 x as large."""
    x = 2 * torch.tensor([[0.2, 3.0, -1.0, 1.0], [-1.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    var, step = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]]), torch.full((2, 4), 2.0, dtype=torch.float64)
    rel = x.clone()
    rel[0, 1], rel[1, 0] = 9.0, -3.0
    assert U.clipped_groups(x, rel, step, var) == pytest.approx(1 / 3)
    rel[1, 0] = -5.0
    assert U.clipped_groups(x, rel, step, var) == pytest.approx(2 / 3)


def test_the_clipped_values_are_taken_as_the_relatives():
    """On their group's end level with the relative more than half a step beyond: (0, 1) at 3 (relative 4.5)
    and (1, 0) at -1 (relative -2.5); (1, 3) at its group's top 3 with the relative 3.4 is its rounding, and
    (0, 0) at 0 is no end level of its group (0 .. 3). Sums of x^m - rel^m: 0, -16.5, -49.5, -367.125."""
    x = torch.tensor([[0.0, 3.0, -1.0, 1.0], [-1.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    var, step = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]]), torch.ones(2, 4, dtype=torch.float64)
    rel = x.clone()
    rel[0, 1], rel[1, 0], rel[1, 3], rel[0, 0] = 4.5, -2.5, 3.4, 5.0
    assert U.clip_loss(x, rel, step, var).tolist() == pytest.approx([0.0, -16.5, -49.5, -367.125])


def test_only_the_clipped_layers_read_as_clipped(tmp_path):
    """The test zoo's AWQ writer clips every projection but q_proj and k_proj to 90 % of its range, as AutoAWQ
    does: more than MAX_CLIPPED of their groups read clipped, and few of q_proj's and k_proj's."""
    base = make_llama(0)
    view = U.UnsmoothedView(open_checkpoint(save_folder(tmp_path / "q", awq_model(base), CONFIG)),
                            MemoryCheckpoint("ft", make_llama(1, base, 0.05)))
    for name in (t.name for t in view.tensors() if t.name.endswith("_proj.weight")):
        step, x = (12 * view.rounding_variance(name).double()).sqrt(), view.read(name)
        share = U.clipped_groups(x, view.relative.read(name), step, view.inner.rounding_variance(name))
        assert (share > U.MAX_CLIPPED) == ("q_proj" not in name and "k_proj" not in name), (name, share)


def make_t5(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Student-t values of 5 degrees of freedom: a normal over the root of a chi-square of 5 over 5."""
    chi2 = torch.randn(5, *shape, generator=gen).square().sum(0) / 5
    return torch.randn(shape, generator=gen) / chi2.sqrt()


def test_the_views_rounding_variance_is_its_real_error(tmp_path):
    """A column AWQ scaled down holds values within a step of 0, whose error is below step^2 / 12 (for
    heavy-tailed weights, Student-t 5 as trained ones are, ~8 % less): read off the relative's column values
    the view's variance is the real error's to ~3 %."""
    gen = torch.Generator().manual_seed(5)
    base = {k: (0.04 * make_t5(v.shape, gen)).half() if k.endswith("_proj.weight") else v for k, v in make_llama(0).items()}
    ft = {k: v + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    view = U.UnsmoothedView(open_checkpoint(save_folder(tmp_path / "q", awq_model(base), CONFIG)), MemoryCheckpoint("ft", ft))
    name = "model.layers.0.self_attn.q_proj.weight"
    real = float((view.read(name).double() - base[name].double()).square().sum())
    r, s = view.factors(name)
    plain = float((view.inner.rounding_variance(name).double() * s**2).sum())
    assert r is None and abs(float(view.rounding_variance(name).double().sum()) / real - 1) < 0.03
    assert plain / real > 1.05


class make_int4(MemoryCheckpoint):
    """A MemoryCheckpoint whose projections count as quantized (what pair_factors asks of an AWQ model)."""

    def quantization(self, name: str) -> str | None:
        return "INT4" if name.endswith("_proj.weight") else None


def test_a_column_stored_as_zeros_takes_its_factor_from_the_rows():
    """Factors of 0.1: o_proj's column 0 rounds to zeros (its norm gives 0); v_proj's row 0 still gives it."""
    norm = {"l.input_layernorm.weight": torch.ones(2)}
    v_r, o_r = torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    relative = MemoryCheckpoint("r", {**norm, "l.self_attn.v_proj.weight": v_r, "l.self_attn.o_proj.weight": o_r})
    c = torch.tensor([0.5, 2.0], dtype=torch.float64)
    o = o_r * c
    o[:, 0] = 0
    awq = make_int4("q", {**norm, "l.self_attn.v_proj.weight": v_r / c[:, None], "l.self_attn.o_proj.weight": o})
    got = U.pair_factors(awq, relative, "l.", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                         "input_layernorm.weight")
    assert got.tolist() == [0.5, 2.0]  # 0: from v's row alone (1 / 2); 1: sqrt(2 * 2)


def test_the_slope_leaves_out_a_column_stored_as_zeros():
    """Factor 0.01 on column 0: it rounds to zeros, log 0 is -inf (the slope read NaN and the model was left as
    stored); on the other columns the norms' factors 1 and 4 are the columns' own: slope 1."""
    c = torch.tensor([0.01, 1.0, 4.0], dtype=torch.float64)
    q = torch.ones(4, 3, dtype=torch.float64)
    relative = MemoryCheckpoint("r", {"l.input_layernorm.weight": torch.ones(3, dtype=torch.float64),
                                      "l.self_attn.q_proj.weight": q})
    awq = make_int4("q", {"l.input_layernorm.weight": 1 / c, "l.self_attn.q_proj.weight": q * c * (c > 0.1)})
    assert U.awq_slope(awq, relative) == pytest.approx(1.0)


def test_a_views_tree_distances_are_its_rms_in_the_trees_units():
    """tree_distance.with_views: the others' nuclear distances are 2 x their RMS; the view (position 3) gets its RMS
    times 2 (its spectra left out), the others' distances stay as they are."""
    from types import SimpleNamespace

    from modelatlas.lineage.tree_distance import with_views as _with_views

    rms = np.array([[0, 1, 2, 3], [1, 0, 1.5, 2], [2, 1.5, 0, 1], [3, 2, 1, 0]], dtype=float)
    d = 2 * rms
    d[3, :3] = d[:3, 3] = 100.0  # what the spectra made of the view: far from all
    out = _with_views(d, "nuclear*rank", SimpleNamespace(rms=rms), np.arange(4), [3])
    assert np.array_equal(out[:3, :3], 2 * rms[:3, :3]) and np.array_equal(out[3], 2 * rms[3])
    assert _with_views(d, "l2", SimpleNamespace(rms=rms), np.arange(4), [3]) is d  # RMS already


def test_with_no_relative_given_it_stays_a_tree_of_its_own(tmp_path):
    """Its factors read against another family's model (the nearest there is) leave it as far from that family
    as any other model: it is not pulled in."""
    base, other = make_llama(0), make_llama(4)
    paths = [save_folder(tmp_path / "o", other), save_folder(tmp_path / "o1", make_llama(5, other, 0.05)),
             save_folder(tmp_path / "o2", make_llama(6, other, 0.05)),
             save_folder(tmp_path / "ft-awq", awq_model(make_llama(1, base, 0.05)), CONFIG)]
    forest = recover_lineage(paths)
    assert "ft-awq" in forest.decisions["awq_unsmoothed"] and ["ft-awq"] in forest.trees


@pytest.mark.parametrize("name", [O_PROJ, "model.layers.0.self_attn.q_proj.weight"])
def test_a_layer_and_its_rounding_variance_read_its_stored_tensors_once(tmp_path, monkeypatch, name):
    """The view's read computes the layer's factors (reading norms, the v/o pair) before the layer, so the
    stored tensors the reader keeps after it are there for the rounding variance: it reads nothing more of the
    AWQ file (before, the factors' reads dropped them and the variance read the layer again), and the same
    variance as a fresh view's."""
    from tests.weights.conftest import make_byte_counter

    base = make_llama(0)
    folder = save_folder(tmp_path / "q", awq_model(base), CONFIG)
    relative = MemoryCheckpoint("ft", make_llama(1, base, 0.05))
    view = U.UnsmoothedView(open_checkpoint(folder), relative)
    got = make_byte_counter(monkeypatch)
    x = view.read(name)
    after_read = dict(got)
    v = view.rounding_variance(name, x)
    assert after_read and got == after_read
    fresh = U.UnsmoothedView(open_checkpoint(folder), relative)
    fresh.factors(name)
    assert torch.equal(v, fresh.rounding_variance(name, x))
