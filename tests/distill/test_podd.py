import itertools
import json

import numpy as np
import pytest
import torch

from modelatlas.cli.main import main
from modelatlas.data import load_dataset
from modelatlas.distill import distill
from modelatlas.distill.methods import get
from modelatlas.distill.methods.podd import poster as P
from modelatlas.distill.methods.podd.method import compact, expand
from modelatlas.distill.methods.podd.poco import antidiagonal_cells, greedy_order, grid_cost, informative
from modelatlas.distill.result import load_result
from modelatlas.errors import ConfigError

TINY = {"iterations": 2, "total": 4, "window": 2, "batch_real": 32, "width": 8, "checkpoint_every": 1}


def test_paper_cifar10_layout_and_ipc_arithmetic():
    lay = P.make_layout(0.9, 10, 32, 32)
    assert (lay.height, lay.width, lay.n_x, lay.n_y, lay.num_crops) == (60, 153, 16, 6, 96)
    assert lay.ipc(10) == pytest.approx(60 * 153 / (10 * 32 * 32))
    for ipc, shape in ((0.3, (8, 24)), (0.5, (11, 29)), (1.0, (16, 40))):  # 8x8 digits, 2 x 5 class grid
        lay = P.make_layout(ipc, 10, 8, 8)
        assert (lay.height, lay.width) == shape and lay.ipc(10) == pytest.approx(ipc, abs=0.01)


def test_crop_grid_counts_positions_and_overlap():
    lay = P.make_layout(0.5, 10, 8, 8)  # 11 x 29 poster, 11 x 4 crops
    pos = P.crop_positions(lay)
    assert pos.shape == (44, 2) and pos[0].tolist() == [0, 0] and pos[-1].tolist() == [11 - 8, 29 - 8]
    xs = sorted(set(pos[:, 1].tolist()))
    assert xs == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21]  # round(linspace(0, 21, 11))
    assert min(8 - (b - a) for a, b in zip(xs, xs[1:])) == 5  # neighbours share >= 5 of 8 columns
    poster = torch.arange(11 * 29, dtype=torch.float32).view(1, 11, 29)
    crops = P.extract_crops(poster, lay)
    assert crops.shape == (44, 1, 8, 8) and torch.equal(crops[1], poster[:, 0:8, 2:10])


def make_two_class_layout():
    # a 8 x 16 poster, class grid 1 x 2 (class 0 left, class 1 right), crops at x = 0, 4, 8; label grid 2 x 4
    return P.Layout(height=8, width=16, crop_h=8, crop_w=8, n_x=3, n_y=1, rows=1, cols=2, refine=2, shrink=0.25)


def test_poddl_label_of_a_crop_by_hand():
    lay, classes = make_two_class_layout(), torch.tensor([[0, 1]])
    grid = P.init_label_grid(lay, classes, 2)  # (2, 4, 2): columns 0-1 class 0, columns 2-3 class 1
    assert grid[:, :2, 0].eq(1).all() and grid[:, 2:, 1].eq(1).all()
    w = P.label_weights(lay)
    # middle crop x in [4, 12), shrunk by 1 px per side -> [5, 11]: cell centres x = 6, 10 (columns 1, 2), both rows
    assert w[1].view(2, 4).tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]
    grid[0, 1] = torch.tensor([0.5, -3.0])  # negative cells are clipped to 0
    labels = P.grid_labels(grid, w)
    # middle crop: sum = [0.5, 0] + [1, 0] + [0, 1] + [0, 1] = [1.5, 2] -> [3/7, 4/7]
    assert torch.allclose(labels[1], torch.tensor([1.5, 2.0]) / 3.5)
    assert torch.allclose(labels[0], torch.tensor([1.0, 0.0]))  # first crop: cells (., 0) and (., 1) -> class 0 only


def test_pixel_count_labels_by_hand():
    lay = make_two_class_layout()
    labels = P.count_labels(lay, torch.tensor([[0, 1]]), 2)
    assert torch.allclose(labels[1], torch.tensor([0.5, 0.5]))  # 32 pixels of each class
    assert torch.allclose(labels[0], torch.softmax(torch.tensor([64.0, 0.0]), 0))


def brute_force_min(dist, rows, cols):
    k = rows * cols
    return min(grid_cost(np.array(p).reshape(rows, cols), dist) for p in itertools.permutations(range(k)))


@pytest.mark.parametrize("points,rows,cols", [
    ([[3.0], [0.0], [4.0], [1.0], [2.0]], 1, 5),  # a permuted chain: greedy must start at an end
    ([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], 2, 2),  # square corners: diagonals apart
    ([[0.0, 0.0], [2.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], 2, 3),  # a shuffled 2 x 3 lattice
])
def test_poco_greedy_order_matches_brute_force(points, rows, cols):
    pts = np.array(points)
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    grid = greedy_order(dist, rows, cols)
    assert sorted(grid.reshape(-1).tolist()) == list(range(rows * cols))
    assert grid_cost(grid, dist) == pytest.approx(brute_force_min(dist, rows, cols))


def test_poco_fill_order_and_informative_names():
    assert antidiagonal_cells(2, 3) == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (1, 2)]
    assert not informative(["0", "1", "class_2"]) and informative(["T-shirt/top", "Trouser"])


def test_poster_run_labels_storage_and_resume(tmp_path):
    tr = load_dataset("digits", "train")
    cfg = {**TINY, "poster_ipc": 0.5}
    syn = distill("podd", tr, 1, cfg, seed=4)
    assert syn.images.shape == (44, 1, 8, 8) and syn.extras["poster"].shape == (1, 11, 29)
    assert torch.allclose(syn.targets().sum(1), torch.ones(44)) and syn.extras["label_grid"].min() >= 0
    assert sorted(syn.extras["class_grid"].reshape(-1).tolist()) == list(range(10))
    back = expand(compact(syn))
    assert torch.equal(back.images, syn.images) and torch.allclose(back.targets(), syn.targets(), atol=1e-6)
    distill("podd", tr, 1, {**cfg, "iterations": 1}, seed=4, checkpoint_dir=tmp_path)
    resumed = distill("podd", tr, 1, cfg, seed=4, checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(resumed.extras["poster"], syn.extras["poster"])


def test_cli_poster_writes_poster_not_crops(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "p"
    args = ["distill", "poster", "--dataset", "digits", "--ipc", "0.3", "--out", str(out), "--iterations", "1",
            "--eval-nets", "1", "--eval-epochs", "1", "--no-learn-labels", "--set", "total=2", "--set", "window=1",
            "--set", "batch_real=16", "--set", "width=8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "podd poster 8x24 (0.3 IPC, 9x1 crops) on digits" in text and "random real subset, 1 per class" in text
    stored = load_file(str(out / "synthetic.safetensors"))
    assert stored["images"].shape[0] == 0 and stored["extra.poster"].shape == (1, 8, 24)
    assert (out / "poster.png").stat().st_size > 0
    assert json.loads((out / "result.json").read_text())["ipc"] == 0.3
    syn, _, _ = load_result(out)
    assert syn.images.shape == (9, 1, 8, 8)
    assert main(["distill", "eval", str(out)]) == 0


def test_engine_defaults_are_ratbptts():
    cfg, rat = get("podd").make_config({}), get("ratbptt").make_config({})
    assert (cfg.window, cfg.batch_real, cfg.total) == (60, 1024, 150)  # tuned on a validation split
    assert (rat.window, rat.batch_real, rat.total) == (60, 1024, 150)
    with pytest.raises(ConfigError, match=r"window \(60\) must be <= total \(40\)"):
        get("podd").make_config({"total": 40})


def test_config_errors_name_the_field():
    spec = get("podd")
    for field, value, msg in (("fade", 2.0, "fade must be in"), ("class_order", "x", "class_order must be"),
                              ("init", "noise", "init must be 'real' or 'gaussian'"),
                              ("poster_ipc", 0.0, "poster_ipc must be > 0"), ("window", 500, "window (500)")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            spec.make_config({field: value})
    with pytest.raises(ConfigError, match="crops_x/crops_y"):
        P.make_layout(0.3, 10, 8, 8, crops=(None, 3))  # the 0.3-IPC poster is one image high


def test_poster_figure_keeps_the_aspect_and_a_readable_size():
    from modelatlas.distill.methods.podd.render import poster_figsize

    w, h = poster_figsize(11, 29)  # the digits 0.5-IPC poster: long side 8 in
    assert w == pytest.approx(29 * 8 / 29 + 0.4) and h == pytest.approx(11 * 8 / 29 + 0.6)
    assert poster_figsize(4, 4) == pytest.approx((4 * 0.3 + 0.4, 4 * 0.3 + 0.6))  # tiny: capped at 0.3 in a pixel
    assert poster_figsize(1000, 2000)[0] == pytest.approx(2000 * 0.015 + 0.4)  # large: >= 1.5 screen px a pixel


def test_poster_png_of_two_channel_images():
    """The poster figure raised TypeError for 2-channel data, after the run, leaving no poster.png."""
    from modelatlas.data.registry import ArrayDataset
    from modelatlas.distill.methods.podd.render import render_poster

    data = ArrayDataset("two", torch.rand(8, 2, 4, 4), torch.arange(2).repeat(4), ["a", "b"])
    syn = distill("podd", data, 1, config={**TINY, "iterations": 1, "class_order": "natural", "batch_real": 4})
    assert render_poster(syn).startswith(b"\x89PNG")


def make_stored_poster(folder, tensors=None, layout=None):
    """A tiny poster result folder (2 classes of 4x4 images, 1 iteration), its stored tensors / layout edited."""
    from safetensors.torch import load_file, save_file

    from modelatlas.data.registry import ArrayDataset
    from modelatlas.distill.result import write_result

    data = ArrayDataset("toy", torch.rand(8, 1, 4, 4), torch.arange(2).repeat(4), ["a", "b"])
    syn = distill("podd", data, 1, config={**TINY, "iterations": 1, "class_order": "natural", "batch_real": 4})
    write_result(folder, syn, None, {"method": "podd", "dataset": "toy"}, losses=[])
    state = load_file(str(folder / "synthetic.safetensors"))
    for key, value in (tensors or {}).items():
        state.pop(key) if value is None else state.__setitem__(key, value)
    save_file(state, str(folder / "synthetic.safetensors"))
    info = json.loads((folder / "synthetic.json").read_text())
    info["meta"]["poster"] = layout(info["meta"]["poster"]) if layout else info["meta"]["poster"]
    (folder / "synthetic.json").write_text(json.dumps(info))
    return folder


@pytest.mark.parametrize("tensors,layout,file,message", [
    ({"extra.poster": None}, None, "synthetic.safetensors", "has no tensor 'extra.poster'"),
    ({"extra.class_grid": None}, None, "synthetic.safetensors", "has no tensor 'extra.class_grid'"),
    ({"extra.poster": torch.zeros(1, 2, 2)}, None, "synthetic.safetensors", r"extra.poster must be \(C, 4, 8\)"),
    ({"extra.class_grid": torch.tensor([[0, 7]])}, None, "synthetic.safetensors", r"class indices in \[0, 2\)"),
    ({"extra.label_grid": torch.zeros(2, 2, 3)}, None, "synthetic.safetensors", "extra.label_grid must be"),
    (None, lambda lay: "x", "synthetic.json", "meta poster must be an object"),
    (None, lambda lay: {**lay, "zzz": 1}, "synthetic.json", "meta poster has the unknown key 'zzz'"),
    (None, lambda lay: {k: v for k, v in lay.items() if k != "n_x"}, "synthetic.json", "meta poster lacks 'n_x'"),
    (None, lambda lay: {**lay, "n_x": -1}, "synthetic.json", "meta poster n_x must be an integer >= 1, got -1"),
    (None, lambda lay: {**lay, "width": 2}, "synthetic.json", r"crops \(4 x 4\) are larger than the poster"),
    # an absurd crop count ended in a MemoryError traceback while cutting the crops
    (None, lambda lay: {**lay, "n_x": 10**9}, "synthetic.json", "1000000000 x .* crops would take .* GiB to cut"),
])
def test_hand_edited_poster_result_names_the_file(tmp_path, tensors, layout, file, message):
    """These raised KeyError / TypeError / RuntimeError tracebacks from expand() in `atlas distill eval`."""
    from modelatlas.errors import CheckpointError

    make_stored_poster(tmp_path, tensors, layout)
    with pytest.raises(CheckpointError, match=message) as e:
        load_result(tmp_path)
    assert str(e.value).startswith(str(tmp_path / file))


def test_stored_poster_loads_unedited(tmp_path):
    syn, _, _ = load_result(make_stored_poster(tmp_path))
    assert syn.images.shape[1:] == (1, 4, 4) and len(syn) == P.Layout(**syn.meta["poster"]).num_crops


def test_infinite_poster_ipc_is_a_config_error():
    """`atlas distill run --method podd --set poster_ipc=Infinity` raised OverflowError sizing the poster."""
    with pytest.raises(ConfigError, match=r"poster ipc must be a finite number > 0 \(--ipc / --set poster_ipc=\)"):
        P.make_layout(float("inf"), 10, 8, 8)


def test_a_poster_above_the_smallest_class_is_refused_before_it_is_built():
    # --ipc 1000000 --no-baseline hung in crossfade_init building a poster of a million images' pixels
    from modelatlas.data.registry import ArrayDataset
    from modelatlas.distill.methods.podd.method import plan

    data = ArrayDataset("toy", torch.rand(7, 1, 4, 4), torch.tensor([0, 0, 0, 1, 1, 1, 1]), ["a", "b"])
    cfg = get("podd").make_config({"class_order": "natural"})
    assert plan(data, 3.0, cfg)[0].num_crops >= 1  # the smallest class's 3 images: allowed
    with pytest.raises(ConfigError, match=r"poster ipc 3.5 \(--ipc / --set poster_ipc=\) is above the 3 training"):
        plan(data, 3.5, cfg)


def test_crop_and_label_grids_beyond_the_poster_pixels_are_refused():
    """crops_x 10**6 stacked 10**6 (mostly identical) crops for minutes; label_refine 10**6 asked the allocator
    for 2 TB. The 0.5-IPC poster of 8x8 digits is 11 x 29: 22 x 4 distinct crop positions, and its 2 x 5 class
    grid refines at most 5 times (11 // 2, 29 // 5) before a label cell is smaller than a pixel."""
    assert (P.make_layout(0.5, 10, 8, 8, crops=(22, 4)).n_x, P.make_layout(0.5, 10, 8, 8, refine=5).refine) == (22, 5)
    with pytest.raises(ConfigError, match=r"crops_x 23 is more than the 22 distinct crop positions across the "
                                          r"11 x 29 poster; lower crops_x"):
        P.make_layout(0.5, 10, 8, 8, crops=(23, None))
    with pytest.raises(ConfigError, match=r"crops_y 5 is more than the 4 distinct crop positions down"):
        P.make_layout(0.5, 10, 8, 8, crops=(None, 5))
    with pytest.raises(ConfigError, match=r"label_refine 6 makes label cells smaller than a pixel .* at most 5"):
        P.make_layout(0.5, 10, 8, 8, refine=6)


def test_a_poster_ipc_set_beside_the_poster_ipc_argument_is_refused(tmp_path):
    """run_poster(ipc=1, {"poster_ipc": 2}) (atlas distill poster --ipc 1 --set poster_ipc=2) silently made the
    1-IPC poster."""
    from modelatlas.data.registry import ArrayDataset
    from modelatlas.distill.methods.podd.api import run_poster

    data = ArrayDataset("toy", torch.rand(8, 1, 4, 4), torch.arange(2).repeat(4), ["a", "b"])
    with pytest.raises(ConfigError, match=r"--set poster_ipc=2 differs from --ipc 1; give the poster's ipc once"):
        run_poster(data, 1, tmp_path / "p", {**TINY, "poster_ipc": 2.0}, dataset_test=data)
    assert not (tmp_path / "p").exists()


def test_a_run_whose_ipc_is_not_its_posters_is_refused(tmp_path, capsys, monkeypatch):
    """atlas distill run --method podd --ipc 3 --set poster_ipc=0.3 made a 0.3-IPC poster but printed and recorded
    ipc 3 (result.json "ipc": 3) and scored the random baseline at 3 images per class."""
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    out = tmp_path / "p"
    args = ["distill", "run", "--method", "podd", "--dataset", "digits", "--ipc", "3", "--out", str(out),
            "--set", "poster_ipc=0.3", "--iterations", "1", "--eval-nets", "1", "--eval-epochs", "1"]
    assert main(args) == 1
    assert capsys.readouterr().err == ("error: --ipc 3 is not the 1 image per class of a poster of poster_ipc 0.3 "
                                       "(ceil(poster_ipc): the run's and its baseline's); make posters with "
                                       "`atlas distill poster --ipc 0.3` (run_poster)\n")
    assert not out.exists()


def test_distill_run_of_podd_records_and_shows_its_poster_as_distill_poster_does(tmp_path, capsys):
    """`distill run --method podd` wrote no poster fields (ipc, poster_ipc_target, poster, baseline_ipc) in
    result.json and printed 'podd ipc 1', where `distill poster --ipc 1` wrote and printed the poster's."""
    tiny = ["--iterations", "1", "--eval-nets", "1", "--eval-epochs", "1", "--no-baseline", "--set", "total=2",
            "--set", "window=1", "--set", "batch_real=16", "--set", "width=8"]
    assert main(["distill", "run", "--method", "podd", "--dataset", "digits", "--ipc", "1",
                 "--out", str(tmp_path / "run"), *tiny]) == 0
    ran = capsys.readouterr().out
    assert main(["distill", "poster", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "poster"), *tiny]) == 0
    assert ran.splitlines()[0].startswith("podd poster 16x40 (1 IPC, ") and "(poster.png)" in ran
    assert ran.splitlines()[0].split(":")[0] == capsys.readouterr().out.splitlines()[0].split(":")[0]
    run, poster = (json.loads((tmp_path / f / "result.json").read_text()) for f in ("run", "poster"))
    fields = ("ipc", "poster_ipc_target", "poster", "baseline_ipc")
    assert {k: run.get(k) for k in fields} == {k: poster[k] for k in fields} and run["baseline_ipc"] == 1
