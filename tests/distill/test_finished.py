"""A resume of a finished run with nothing to redo returns the stored result (modelatlas.distill.finished)."""

import json

import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.distill import api, run_distillation
from modelatlas.distill.methods.podd.api import run_poster

CFG = {"iterations": 1, "width": 8, "batch_real": 8}
POSTER = {"iterations": 1, "total": 2, "window": 1, "batch_real": 16, "width": 8, "learn_labels": False}


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "train").subset(torch.arange(100))


def finish(folder, data, **kw):
    return run_distillation("dm", data, 1, folder, CFG, dataset_test=data, eval_nets=1, eval_epochs=1, **kw)


def finish_named(folder, **kw):
    """A registered dataset: its test split is known by name (a given ArrayDataset's is not)."""
    return run_distillation("dm", "digits", 1, folder, CFG, eval_nets=1, eval_epochs=1, **kw)


def finish_poster(folder, **kw):
    """A tiny 0.3-IPC poster of the registered digits."""
    return run_poster("digits", 0.3, folder, POSTER, **{"eval_nets": 1, "eval_epochs": 1, **kw})


def make_stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def no_evaluation(*a, **k):
    raise AssertionError("evaluated again")


def test_resume_of_a_finished_run_returns_the_stored_result(tmp_path, monkeypatch):
    first = finish_named(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    monkeypatch.setattr(api, "evaluate_synthetic", no_evaluation)  # it rebuilt the method and scored the set
    monkeypatch.setattr(api, "evaluate_random_baseline", no_evaluation)
    again = finish_named(tmp_path, resume=True)
    assert again.pop("reused") is True and "reused" not in first
    assert again == json.loads((tmp_path / "result.json").read_text())
    assert again["evaluation"] == first["evaluation"] and again["baseline_random"] == first["baseline_random"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()} == stamps  # nothing rewritten


@pytest.mark.parametrize("change", ["eval_nets", "no_baseline", "missing_figure", "seed_edit"])
def test_anything_to_redo_goes_the_full_way(tmp_path, change):
    finish_named(tmp_path)
    kw = {"resume": True}
    if change == "eval_nets":
        kw = {**kw, "eval_nets": 2}
    if change == "no_baseline":
        kw["baseline"] = False
    if change == "missing_figure":
        (tmp_path / "loss.png").unlink()
    if change == "seed_edit":  # result.json no longer describes the checkpoint's run: rewritten from it
        path = tmp_path / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "seed": 7}))
    info = run_distillation("dm", "digits", 1, tmp_path, CFG, **{"eval_nets": 1, "eval_epochs": 1, **kw})
    assert len(info["evaluation"]["accuracies"]) == (2 if change == "eval_nets" else 1)
    assert ("baseline_random" in info) == (change != "no_baseline")
    assert (tmp_path / "loss.png").is_file() and info["seed"] == 0


def test_a_given_test_split_is_scored_again(tmp_path, data):
    """A test split passed as an ArrayDataset is not recorded: another one on a resume must be scored."""
    first = finish(tmp_path, data)
    other = load_dataset("digits", "test").subset(torch.arange(50))
    again = run_distillation("dm", data, 1, tmp_path, CFG, dataset_test=other, eval_nets=1, eval_epochs=1, resume=True)
    assert again["evaluation"]["accuracies"] != first["evaluation"]["accuracies"]


def test_a_given_test_split_beside_a_named_dataset_is_scored_again(tmp_path):
    first = finish_named(tmp_path)
    other = load_dataset("digits", "test").subset(torch.arange(50))
    again = finish_named(tmp_path, resume=True, dataset_test=other)
    assert again["evaluation"]["accuracies"] != first["evaluation"]["accuracies"]


def test_cli_says_nothing_was_written(tmp_path, capsys):
    from modelatlas.cli.main import main

    args = ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "r"),
            "--set", "iterations=1", "--set", "width=8", "--set", "batch_real=8", "--eval-nets", "1", "--eval-epochs", "1"]
    assert main(args) == 0 and "; wrote " in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0
    assert "already held this finished result (nothing written)" in capsys.readouterr().out


def test_resume_of_a_finished_poster_returns_the_stored_result(tmp_path, monkeypatch):
    """`atlas distill poster --resume` on a finished poster rebuilt, scored and rewrote it (its own loading of
    the data hid the dataset's name, and its fractional ipc was not the run's)."""
    first = finish_poster(tmp_path)
    assert first["ipc"] == 0.3 and first["baseline_ipc"] == 1 and "reused" not in first
    stamps = make_stamps(tmp_path)
    monkeypatch.setattr(api, "evaluate_synthetic", no_evaluation)
    monkeypatch.setattr(api, "evaluate_random_baseline", no_evaluation)
    again = finish_poster(tmp_path, resume=True)
    assert again.pop("reused") is True
    assert again == first == json.loads((tmp_path / "result.json").read_text())
    assert make_stamps(tmp_path) == stamps and "poster.png" in stamps  # nothing rewritten


def test_a_poster_resumed_with_other_settings_goes_the_full_way(tmp_path):
    first = finish_poster(tmp_path)
    stamps = make_stamps(tmp_path)
    again = finish_poster(tmp_path, resume=True, eval_nets=2)
    assert "reused" not in again and len(again["evaluation"]["accuracies"]) == 2
    assert again["ipc"] == first["ipc"] and again["poster"] == first["poster"]  # the poster's fields rewritten
    assert make_stamps(tmp_path)["result.json"] != stamps["result.json"]


def test_cli_poster_says_nothing_was_written(tmp_path, capsys):
    from modelatlas.cli.main import main

    args = ["distill", "poster", "--dataset", "digits", "--ipc", "0.3", "--out", str(tmp_path / "p"),
            "--iterations", "1", "--eval-nets", "1", "--eval-epochs", "1", "--no-learn-labels", "--set", "total=2",
            "--set", "window=1", "--set", "batch_real=16", "--set", "width=8"]
    assert main(args) == 0 and "; wrote " in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "podd poster 8x24 (0.3 IPC" in out and "already held this finished result (nothing written)" in out


def test_resume_of_a_result_whose_checkpoint_folder_was_removed_is_refused(tmp_path):
    """With OUT/checkpoint/ deleted (to save space), --resume started the run over with the method's default
    iteration count (DM's 500, not the result's 1) and unchecked settings, then overwrote the finished result."""
    import shutil

    from modelatlas.errors import ConfigError

    finish_named(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint")
    stamps = make_stamps(tmp_path)
    with pytest.raises(ConfigError, match=r"no .*checkpoint.*atlas distill eval"):
        run_distillation("dm", "digits", 1, tmp_path, CFG, eval_nets=2, eval_epochs=1, resume=True)
    assert make_stamps(tmp_path) == stamps and not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("method", ["random", "herding"])
def test_resume_with_another_seed_of_a_method_without_checkpoints_is_refused(tmp_path, method):
    """random and herding write no checkpoint.json, whose seed check refuses another seed for the other methods:
    --resume --seed 5 drew another set and overwrote the finished result with it."""
    from modelatlas.errors import ConfigError

    kw = {"config": {"embed": "pixels"} if method == "herding" else None, "eval_nets": 1, "eval_epochs": 1}
    run_distillation(method, "digits", 1, tmp_path, **kw)
    stamps = make_stamps(tmp_path)
    with pytest.raises(ConfigError, match=r"run\.json: the checkpointed run used seed 0, not 5"):
        run_distillation(method, "digits", 1, tmp_path, seed=5, resume=True, **kw)
    assert make_stamps(tmp_path) == stamps
    assert run_distillation(method, "digits", 1, tmp_path, resume=True, **kw)["seed"] == 0


def test_a_poster_stopped_between_its_two_writes_is_finished_by_a_resume(tmp_path):
    """run_poster adds the poster's fields to result.json after run_distillation wrote it: a Ctrl-C between the two
    left a result.json without them, which a resume returned as finished ('atlas distill poster' then raised
    KeyError: 'poster')."""
    first = finish_poster(tmp_path)
    path = tmp_path / "result.json"
    cut = {k: v for k, v in first.items() if k not in ("poster", "poster_ipc_target", "baseline_ipc")}
    path.write_text(json.dumps({**cut, "ipc": 1}))
    again = finish_poster(tmp_path, resume=True)
    assert "reused" not in again and again["poster"] == first["poster"] and again["ipc"] == first["ipc"]
    assert json.loads(path.read_text())["poster_ipc_target"] == 0.3


def test_a_run_stopped_while_drawing_its_figures_is_not_taken_as_finished(tmp_path, monkeypatch):
    """write_result drew images.png and loss.png after writing result.json: a Ctrl-C while drawing (a second or two)
    left the new result.json beside the figures of the set before, and a resume returned that folder as finished."""
    from modelatlas.distill import result

    finish_named(tmp_path)
    stamps = make_stamps(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(result, "render_losses", interrupted)
    no_count = {k: v for k, v in CFG.items() if k != "iterations"}
    with pytest.raises(KeyboardInterrupt):  # extended to 2 iterations, stopped while drawing
        run_distillation("dm", "digits", 1, tmp_path, {**CFG, "iterations": 2}, eval_nets=1, eval_epochs=1, resume=True)
    assert make_stamps(tmp_path) == stamps  # the figures are drawn first: nothing was written
    monkeypatch.undo()
    again = run_distillation("dm", "digits", 1, tmp_path, no_count, eval_nets=1, eval_epochs=1, resume=True)
    assert "reused" not in again and len(json.loads((tmp_path / "result.json").read_text())["losses"]) == 2
    assert make_stamps(tmp_path)["loss.png"] != stamps["loss.png"]


def test_a_rerun_without_resume_calls_a_finished_run_finished(tmp_path, data):
    from modelatlas.errors import ConfigError

    finish(tmp_path, data)  # a method that checkpoints: checkpoint.json and result.json both there
    with pytest.raises(ConfigError, match=r"result.json exists: .* holds a finished result"):
        finish(tmp_path, data)  # was "checkpoint.json exists: pass --resume to continue that run", as if unfinished
