"""atlas attribute --out: a file or another command's folder is refused before any work; a sample asked for
twice is plotted once."""

import io
from types import SimpleNamespace

import pytest
import torch

from modelatlas.attribution.report import check_out, render_top_clusters
from modelatlas.cli.main import main
from modelatlas.errors import ConfigError

TINY = ["attribute", "--clusters-per-class", "2", "--max-train", "200", "--max-test", "20", "--train-steps", "2",
        "--match-steps", "1"]


def test_an_out_that_is_a_file_or_a_folder_of_other_results_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import modelatlas.attribution as attribution

    monkeypatch.setattr(attribution, "ddm_attribution", lambda *a, **k: pytest.fail("attributed before refusing"))
    (tmp_path / "file").write_text("x")
    assert main([*TINY, "--out", str(tmp_path / "file")]) == 1
    assert "file: is a file, not a folder; choose another output folder (--out)" in capsys.readouterr().err
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "manifest.json").write_text("{}")
    assert main([*TINY, "--out", str(zoo)]) == 1  # was filled with attribution files
    assert "a non-empty folder holding no attribution (e.g. 'manifest.json')" in capsys.readouterr().err
    assert [p.name for p in zoo.iterdir()] == ["manifest.json"]


def test_an_out_below_a_file_is_refused_before_work(tmp_path, capsys, monkeypatch):
    """--out file/sub was reported ('Not a directory') only when saving, after the whole attribution."""
    import modelatlas.attribution as attribution

    monkeypatch.setattr(attribution, "ddm_attribution", lambda *a, **k: pytest.fail("attributed before refusing"))
    (tmp_path / "file").write_text("x")
    assert main([*TINY, "--out", str(tmp_path / "file" / "sub" / "out")]) == 1
    assert f"lies below the file {tmp_path / 'file'}, not a folder" in capsys.readouterr().err


def test_a_previous_attribution_or_an_empty_folder_is_accepted(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "attribution.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "old") == tmp_path / "old" and check_out(tmp_path / "empty")
    with pytest.raises(ConfigError):
        check_out(tmp_path / "old" / "attribution.json")


def test_a_test_sample_given_twice_is_one_row():
    from PIL import Image

    attr = SimpleNamespace(matrix=torch.tensor([[0.2, 0.1], [-0.4, 0.3]]), assign=torch.tensor([0, 1, 1]),
                           cluster_class=torch.tensor([0, 1]))
    x, xt, yt = torch.rand(3, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.tensor([0, 1])

    def height(index):
        return Image.open(io.BytesIO(render_top_clusters(attr, x, xt, yt, index, top=1))).size[1]

    assert height([0, 0]) == height([0]) < height([0, 1])


def test_damping_with_gradient_ascent_is_refused(tmp_path, capsys):
    assert main([*TINY, "--unlearn", "ascent", "--damping", "5", "--out", str(tmp_path / "o")]) == 1
    assert "error: --damping 5.0 applies to --unlearn newton and cg only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_distillation_folder_is_no_interrupted_attribution(tmp_path, capsys, monkeypatch, resume):
    """A distillation's OUT/checkpoint/run.json was taken for an interrupted attribution: the refusal said to
    pass --resume, then to delete the distillation's checkpoint folder to start over."""
    import modelatlas.attribution as attribution

    monkeypatch.setattr(attribution, "ddm_attribution", lambda *a, **k: pytest.fail("attributed before refusing"))
    run = tmp_path / "dm10" / "checkpoint" / "run.json"
    run.parent.mkdir(parents=True)
    run.write_text('{"method": "dm", "dataset": "digits", "ipc": 10, "seed": 0, "config": {}}')
    (run.parent.parent / "result.json").write_text('{"method": "dm"}')
    assert main([*TINY, "--out", str(run.parent.parent), *resume]) == 1
    err = capsys.readouterr().err
    assert f"error: {run.parent.parent}: a non-empty folder holding no attribution" in err and "delete" not in err
    assert run.read_text().startswith('{"method": "dm"')
