"""atlas attribute --validate --resume: Ctrl-C during the leave-one-cluster-out retraining says what was kept
and how to continue; --resume (same settings) finishes with the files of an uninterrupted run."""

import pytest
import torch

from modelatlas.atomic import read_tensors
from modelatlas.attribution import target as T
from modelatlas.cli.main import main

TINY = ["attribute", "--clusters-per-class", "2", "--max-train", "200", "--max-test", "20", "--train-steps", "2",
        "--match-steps", "1", "--validate"]


def _interrupt_loo_after(monkeypatch, k):
    real, calls = T.train, []

    def train(*a, **kw):
        if kw.get("weights") is not None:  # a leave-one-cluster-out retraining
            calls.append(1)
            if len(calls) == k + 1:
                raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(T, "train", train)


def test_ctrl_c_during_validation_keeps_ddm_and_progress_and_resume_finishes(tmp_path, capsys, monkeypatch):
    assert main([*TINY, "--out", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as m:
        _interrupt_loo_after(m, 3)
        assert main([*TINY, "--out", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: interrupted (the DDM attribution is written to {tmp_path / 'cut'} " \
        f"(validation pending) and kept, with 3 of 20 leave-one-cluster-out retrainings, in " \
        f"{tmp_path / 'cut' / 'checkpoint'}; rerun with --resume to continue)" in err
    assert main([*TINY, "--out", str(tmp_path / "cut")]) == 1  # without --resume: refused, the state kept
    assert "holds an interrupted attribution; pass --resume" in capsys.readouterr().err
    assert main([*TINY, "--train-steps", "3", "--resume", "--out", str(tmp_path / "cut")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume: --train-steps was 2 in the interrupted run, now 3; " \
        "rerun with --train-steps 2 to continue it, or delete" in err
    assert main([*TINY, "--resume", "--out", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "the DDM attribution and 3 of 20 leave-one-cluster-out retrainings are kept" in out
    assert "vs leave-one-cluster-out retraining" in out
    a, b = (read_tensors(tmp_path / d / "attribution.safetensors") for d in ("straight", "cut"))
    assert a.keys() == b.keys() and "loo_matrix" in a and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "checkpoint").exists()


def test_ctrl_c_before_ddm_finished_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    import modelatlas.attribution.folder as folder_mod

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(folder_mod, "ddm_attribution", stop)
    assert main([*TINY, "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert f"stopped before anything was saved in {tmp_path / 'o'}: run the command again" in err
    assert "--resume to continue" not in err


def test_resume_with_nothing_kept_runs_from_the_start(tmp_path, capsys):
    assert main([*TINY, "--resume", "--out", str(tmp_path / "o")]) == 0
    assert "nothing to resume in" in capsys.readouterr().out and (tmp_path / "o" / "attribution.json").is_file()


def test_help_names_resume(capsys):
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_ctrl_c_during_ddm_keeps_its_units_and_resume_finishes(tmp_path, capsys, monkeypatch):
    """Without --validate too: Ctrl-C in the matching keeps the clusters, the target model and the steps done."""
    from tests.attribution.conftest import make_stop

    import modelatlas.cli.attribute as cli_attribute

    args = [a for a in TINY if a != "--validate"] + ["--match-steps", "5"]  # the last --match-steps wins
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    with monkeypatch.context() as m:
        m.setattr(cli_attribute, "tqdm_progress", make_stop(2))
        assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: interrupted (DDM's clustering, target model and 2 of 5 matching " \
        f"steps are kept in {tmp_path / 'cut' / 'checkpoint'}; rerun with --resume to continue)" in err
    assert main([*args, "--resume", "--out", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'cut' / 'checkpoint'}: DDM's clustering, target model and 2 of 5 " \
        "matching steps are kept" in out and "the total adds up the parts before and after" in out
    a, b = (read_tensors(tmp_path / d / "attribution.safetensors") for d in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "checkpoint").exists()


def test_a_resume_refused_for_its_new_settings_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    """--max-train 15 leaves fewer training examples than 20 synthetic samples, which DDM refuses: that refusal
    dropped the interrupted run's units; the settings are compared first now."""
    from tests.attribution.conftest import make_stop

    import modelatlas.cli.attribute as cli_attribute

    args = [a for a in TINY if a != "--validate"] + ["--match-steps", "5", "--out", str(tmp_path)]
    with monkeypatch.context() as m:
        m.setattr(cli_attribute, "tqdm_progress", make_stop(2))
        assert main(args) == 130
    capsys.readouterr()
    assert main([*args, "--max-train", "15", "--resume"]) == 1
    said = capsys.readouterr()
    assert "resuming from" not in said.out  # it printed 'resuming from ... kept' before refusing to
    err = said.err.splitlines()[-1]
    assert err.startswith("error: ") and "cannot resume: n_train was 200 in the interrupted run, now 15" in err
    assert main([*args, "--resume"]) == 0 and "2 of 5 matching steps are kept" in capsys.readouterr().out


def make_interrupted(tmp_path, capsys, monkeypatch):
    """An --out holding a run stopped after 2 of 5 matching steps; returns the command's arguments."""
    from tests.attribution.conftest import make_stop

    import modelatlas.cli.attribute as cli_attribute

    args = [a for a in TINY if a != "--validate"] + ["--match-steps", "5", "--out", str(tmp_path)]
    with monkeypatch.context() as m:
        m.setattr(cli_attribute, "tqdm_progress", make_stop(2))
        assert main(args) == 130
    capsys.readouterr()
    return args


def test_a_resume_from_an_unreadable_state_does_not_say_it_starts_over(tmp_path, capsys, monkeypatch):
    """offline.json damaged: it printed 'nothing to resume ...: starting from the beginning', then refused."""
    args = make_interrupted(tmp_path, capsys, monkeypatch)
    (tmp_path / "checkpoint" / "offline.json").write_text("{garbage")
    assert main([*args, "--resume"]) == 1
    said = capsys.readouterr()
    assert "nothing to resume" not in said.out and said.err.count("\n") == 1
    assert "offline.json: cannot read" in said.err and (tmp_path / "checkpoint" / "offline.json").exists()


def test_a_damaged_unit_names_the_checkpoint_folder_to_delete(tmp_path, capsys, monkeypatch):
    """'delete the folder to start over' could be read as --out itself, the results in it."""
    args = make_interrupted(tmp_path, capsys, monkeypatch)
    for f in (tmp_path / "checkpoint").glob("offline-match-*.safetensors"):
        f.unlink()
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"missing; delete {tmp_path / 'checkpoint'} to start over" in err


class _Touch:
    """Unpickled by a plain pickle.load, it would create ``path`` (code run by reading a data file)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_cifar_batch_holding_code_is_one_line_and_runs_nothing(tmp_path, capsys):
    """atlas attribute --dataset cifar10 over a test_batch that pickles a call: refused naming the file and the
    global, before anything is called (the marker file is never created)."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    marker = tmp_path / "RAN"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Touch(marker), b"labels": [0]}, protocol=4))
    args = ["attribute", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "att")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {folder / 'test_batch'}: refused global pathlib.Path.touch (only NumPy arrays and plain "
                   "containers are allowed in a CIFAR batch)\n")
    assert not marker.exists() and not (tmp_path / "att").exists()


def test_max_train_keeps_every_class_of_an_image_folder_read_class_by_class(tmp_path, capsys):
    """An image folder is read class by class: --max-train 6 of a/, b/, c/ kept 6 images of a/ alone and
    failed ('class 1 has 0 of the 6 training examples'); it is now a seeded stratified subset, 2 of each."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b", "c"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((8, 8)) * 255).astype("uint8")).save(tmp_path / "imgs" / split / c / f"{i}.png")
    out = tmp_path / "o"
    assert main(["attribute", "--dataset", "image-folder", "--data-root", str(tmp_path / "imgs"), "--out", str(out),
                 "--clusters-per-class", "2", "--max-train", "6", "--max-test", "3", "--train-steps", "2",
                 "--match-steps", "1", "--unlearn", "ascent"]) == 0
    assert "attribution matrix 6 clusters x 3 test samples" in capsys.readouterr().out
    info = json.loads((out / "attribution.json").read_text())
    assert (info["n_train"], info["n_test"]) == (6, 3)
