import json

import pytest
import torch

from modelatlas.cli.main import main
from modelatlas.distill import run_distillation
from modelatlas.distill.synthetic import SyntheticSet

TINY = ["--dataset", "digits", "--ipc", "1", "--eval-nets", "1", "--eval-epochs", "2", "--set", "width=8",
        "--set", "batch_real=16"]


def test_cli_run_and_eval(tmp_path, capsys):
    out = tmp_path / "dm"
    assert main(["distill", "run", "--method", "dm", "--out", str(out), "--iterations", "2", *TINY]) == 0
    text = capsys.readouterr().out
    assert "dm ipc 1 on digits:" in text and "random real subset, same protocol" in text and "protocol: 1 x convnet-2 w8" in text
    info = json.loads((out / "result.json").read_text())
    assert info["config"]["iterations"] == 2 and len(info["losses"]) == 2 and info["evaluation"]["protocol"]["epochs"] == 2
    assert main(["distill", "eval", str(out), "--eval-epochs", "1"]) == 0
    assert "protocol:" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["reevaluation"]["protocol"]["epochs"] == 1


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main(["distill", "run", "--method", "nope", "--out", str(tmp_path), *TINY]) == 1
    assert capsys.readouterr().err.startswith("error: unknown distillation method 'nope'")
    assert main(["distill", "run", "--method", "dm", "--out", str(tmp_path), "--set", "lr_img", *TINY]) == 1
    assert "--set expects FIELD=VALUE" in capsys.readouterr().err
    assert main(["distill", "eval", str(tmp_path / "missing")]) == 1
    assert "missing: no such folder; give a result folder" in capsys.readouterr().err


def interrupting_progress(after):
    """A progress wrapper that raises KeyboardInterrupt (a user's Ctrl-C) after ``after`` items."""
    class Bar:
        def __init__(self, it):
            self.it = it

        def __iter__(self):
            for i, x in enumerate(self.it):
                if i == after:
                    raise KeyboardInterrupt
                yield x

        def set_postfix(self, **kw):
            pass
    return lambda iterable, total=None, desc="": Bar(iterable)


def test_interrupted_run_resumes_and_loses_nothing(tmp_path, capsys, monkeypatch):
    kw = dict(config={"iterations": 4, "checkpoint_every": 2, "width": 8, "batch_real": 16}, seed=1,
              eval_nets=1, eval_epochs=1, baseline=False)
    run_distillation("dc", "digits", 1, tmp_path / "straight", **kw)
    with pytest.raises(KeyboardInterrupt):
        run_distillation("dc", "digits", 1, tmp_path / "killed", progress=interrupting_progress(3), **kw)
    assert not (tmp_path / "killed" / "result.json").exists()
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main(["distill", "run", "--method", "dc", "--out", str(tmp_path / "killed"), *TINY]) == 1
    assert "pass --resume" in capsys.readouterr().err
    info = run_distillation("dc", "digits", 1, tmp_path / "killed", resume=True, **kw)
    a, b = SyntheticSet.load(tmp_path / "straight"), SyntheticSet.load(tmp_path / "killed")
    assert torch.equal(a.images, b.images) and info["resumed"]
    assert json.loads((tmp_path / "killed" / "result.json").read_text())["losses"] == \
        json.loads((tmp_path / "straight" / "result.json").read_text())["losses"]


def test_resume_with_other_settings_is_refused_naming_the_setting(tmp_path):
    from modelatlas.errors import ConfigError

    kw = dict(seed=1, eval_nets=1, eval_epochs=1, baseline=False)
    cfg = {"iterations": 2, "checkpoint_every": 1, "width": 8, "batch_real": 16}
    run_distillation("dm", "digits", 1, tmp_path / "r", config=cfg, **kw)
    # a width change leaves the checkpoint's tensors loadable: only the recorded run can tell
    with pytest.raises(ConfigError, match=r"run.json: the checkpointed run used config.width 8, not 16"):
        run_distillation("dm", "digits", 1, tmp_path / "r", config={**cfg, "width": 16}, resume=True, **kw)
    with pytest.raises(ConfigError, match=r"used transform 'identity', not 'standardize'"):
        run_distillation("dm", "digits", 1, tmp_path / "r", config=cfg, transform="standardize", resume=True, **kw)
    info = run_distillation("dm", "digits", 1, tmp_path / "r", config={**cfg, "iterations": 3}, resume=True, **kw)
    assert info["resumed"] and info["config"]["iterations"] == 3  # extending a run is allowed


def test_resume_may_chunk_the_real_batch(tmp_path):
    kw = dict(seed=1, eval_nets=1, eval_epochs=1, baseline=False)
    cfg = {"iterations": 1, "checkpoint_every": 1, "width": 8, "batch_real": 16, "total": 4, "window": 2}
    run_distillation("ratbptt", "digits", 1, tmp_path, config=cfg, **kw)
    info = run_distillation("ratbptt", "digits", 1, tmp_path, config={**cfg, "iterations": 2, "real_chunk": 4},
                            resume=True, **kw)  # what a run that ran out of memory resumes with
    assert info["resumed"] and info["config"]["real_chunk"] == 4


@pytest.mark.parametrize("transform", ["standardize", "zca"])
def test_saved_transform_is_reapplied_on_eval(tmp_path, transform):
    from modelatlas.distill import evaluate_result

    info = run_distillation("random", "digits", 2, tmp_path, config={"width": 8}, eval_nets=1, eval_epochs=3,
                            transform=transform)
    again = evaluate_result(tmp_path, save=False)
    assert again["accuracies"] == info["evaluation"]["accuracies"]
    assert json.loads((tmp_path / "result.json").read_text())["transform"] == transform


def test_cli_init_from_starts_where_the_folder_ended(tmp_path, capsys, monkeypatch):
    first = tmp_path / "dm"
    assert main(["distill", "run", "--method", "dm", "--out", str(first), "--iterations", "2", "--no-baseline",
                 "--transform", "standardize", *TINY]) == 0
    then = tmp_path / "dm0"
    # one iteration at lr 1e-30 (0 is refused for dm) leaves the images where they started
    assert main(["distill", "run", "--method", "dm", "--out", str(then), "--iterations", "1", "--no-baseline",
                 "--set", "lr_img=1e-30", "--transform", "standardize", "--init-from", str(first), *TINY]) == 0
    assert torch.allclose(SyntheticSet.load(then).images, SyntheticSet.load(first).images, atol=1e-20)
    assert json.loads((then / "result.json").read_text())["init_from"] == str(first)
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    capsys.readouterr()
    assert main(["distill", "run", "--method", "dm", "--out", str(tmp_path / "x"), "--iterations", "1",
                 "--init-from", str(first), *TINY]) == 1
    assert capsys.readouterr().err.strip().endswith("in transform 'standardize' space, this run uses 'identity'; "
                                                    "pass --transform standardize")
    assert main(["distill", "run", "--method", "dm", "--out", str(tmp_path / "y"), "--iterations", "1",
                 "--ipc", "2", "--transform", "standardize", "--init-from", str(first), *TINY[:2], *TINY[4:]]) == 1
    assert capsys.readouterr().err.startswith(f"error: {first}: 10 images of 10 classes (1 per class), but this run "
                                              "wants 2 per class")


def test_init_from_another_dataset_is_refused(tmp_path):
    from modelatlas.errors import ConfigError

    run_distillation("random", "digits", 1, tmp_path / "r", config={"width": 8}, eval_nets=1, eval_epochs=1)
    info = json.loads((tmp_path / "r" / "result.json").read_text())
    (tmp_path / "r" / "result.json").write_text(json.dumps({**info, "dataset": "fashion-mnist"}))
    with pytest.raises(ConfigError, match=r"r: its set distils 'fashion-mnist', but this run distils 'digits'"):
        run_distillation("dm", "digits", 1, tmp_path / "x", config={"iterations": 1, "width": 8},
                         init_from=tmp_path / "r", eval_nets=1, eval_epochs=1)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_empty_test_split_is_refused_not_scored_0_percent(tmp_path, capsys, monkeypatch):
    """An image folder of one image per class has a 20 % test split of none: 'test accuracy 0.00 %' was printed."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(torch.full((4, 4), 40.0).byte().numpy()).save(tmp_path / "imgs" / c / "0.png")
    check_image_folder_refused(tmp_path, capsys, monkeypatch, "the test split of dataset 'image-folder' is empty")


def check_image_folder_refused(tmp_path, capsys, monkeypatch, message: str) -> None:
    """`atlas distill run` on the image folder tmp_path/imgs exits 1 with ``message`` and writes nothing."""
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    argv = ["distill", "run", "--method", "random", "--dataset", "image-folder", "--data-root", str(tmp_path / "imgs"),
            "--ipc", "1", "--eval-nets", "1", "--eval-epochs", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("test_shape,k", [((1, 6, 6), 2), ((1, 4, 4), 3)])
def test_test_split_of_other_inputs_is_refused_before_distilling(tmp_path, test_shape, k):
    """Train 4x4 and test 6x6 images (IDX files of two sources) failed with a shape error after the whole run."""
    from modelatlas.data.registry import ArrayDataset
    from modelatlas.errors import ConfigError

    train = ArrayDataset("toy", torch.rand(4, 1, 4, 4), torch.tensor([0, 0, 1, 1]), ["a", "b"])
    test = ArrayDataset("toy", torch.rand(3, *test_shape), torch.arange(3) % k, ["a", "b", "c"][:k])
    with pytest.raises(ConfigError, match=r"the training split has 2 classes of inputs \(1, 4, 4\), the test split"):
        run_distillation("dm", train, 1, tmp_path / "out", {"iterations": 1, "width": 8}, dataset_test=test,
                         eval_nets=1, eval_epochs=1)
    assert not (tmp_path / "out").exists()


def test_init_from_a_set_standardised_on_other_data_names_the_data(tmp_path):
    """The error said "in transform 'standardize' space, this run uses 'standardize'; pass --transform standardize"."""
    from modelatlas.data.registry import ArrayDataset
    from modelatlas.errors import ConfigError

    def make(scale):
        return ArrayDataset("toy", torch.rand(8, 1, 4, 4) * scale, torch.arange(2).repeat(4), ["a", "b"])
    quick = dict(config={"iterations": 1, "width": 8}, transform="standardize", eval_nets=1, eval_epochs=1,
                 baseline=False)
    first, other = make(1.0), make(0.5)
    run_distillation("dm", first, 1, tmp_path / "a", dataset_test=first, **quick)
    with pytest.raises(ConfigError, match="its 'standardize' transform was fitted on other training data"):
        run_distillation("dm", other, 1, tmp_path / "b", dataset_test=other, init_from=tmp_path / "a", **quick)


@pytest.mark.parametrize("key,value", [("config", 5), ("config", None), ("classes", 5), ("dataset_kwargs", [1]),
                                       ("init_from", 3)])
def test_a_hand_edited_run_json_is_named(tmp_path, key, value):
    """A run.json whose config was not an object stopped a resume with AttributeError ('int' object has no
    attribute 'items'); classes, dataset_kwargs or init_from of another type with a TypeError."""
    from modelatlas.errors import CheckpointError

    kw = dict(config={"iterations": 1, "width": 8, "batch_real": 8}, eval_nets=1, eval_epochs=1, baseline=False)
    run_distillation("dm", "digits", 1, tmp_path, **kw)
    path = tmp_path / "checkpoint" / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(CheckpointError, match=f"run.json: {key} must be "):
        run_distillation("dm", "digits", 1, tmp_path, resume=True, **kw)


def test_an_out_folder_under_a_file_is_refused_naming_the_file(tmp_path):
    """--out afile/sub failed with the OS's 'afile/sub/checkpoint/run.json: Not a directory' once the data was
    loaded and the transform fitted."""
    from modelatlas.errors import ConfigError

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*afile/sub: .*afile is a file, not a folder; choose another --out"):
        run_distillation("random", "no-such-dataset", 1, tmp_path / "afile" / "sub")


def test_a_run_scans_its_training_split_once_and_a_resume_reads_checkpoint_json_once(tmp_path, monkeypatch):
    """The split was scanned for NaN 3 times (its check, the transform's fit, the method's start) and a resume
    read checkpoint.json 3-4 times (iterations, stored result, wall time, the loop)."""
    import pathlib

    from modelatlas.data import transforms
    from modelatlas.distill import splits

    counts = {"scans": 0, "reads": 0}
    check, fit_check, read = splits.check_finite, transforms._check_finite, pathlib.Path.read_text

    def counted_check(data, split):
        counts["scans"] += split == "train"
        return check(data, split)

    def counted_fit_check(kind, x):
        counts["scans"] += 1
        return fit_check(kind, x)

    def counted_read(path, *a, **kw):
        counts["reads"] += path.name == "checkpoint.json"
        return read(path, *a, **kw)

    monkeypatch.setattr(splits, "check_finite", counted_check)
    monkeypatch.setattr(transforms, "_check_finite", counted_fit_check)
    monkeypatch.setattr(pathlib.Path, "read_text", counted_read)
    kw = dict(config={"iterations": 1, "width": 8}, eval_nets=1, eval_epochs=1, transform="standardize",
              baseline=False)
    run_distillation("dm", "digits", 1, tmp_path / "r", **kw)
    assert counts == {"scans": 1, "reads": 0}
    # another protocol: not the stored result but the full way (iterations, wall time, the loop's state)
    run_distillation("dm", "digits", 1, tmp_path / "r", resume=True, **{**kw, "eval_epochs": 2})
    assert counts == {"scans": 2, "reads": 1}


def test_cli_resume_without_or_with_another_init_from_names_the_flag_and_folders(tmp_path, capsys, monkeypatch):
    """A run started with --init-from, resumed without it, was refused as "used init_digest '<64 hex>', not
    None", which named neither the flag nor the folder to pass."""
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    start, other, out = tmp_path / "start", tmp_path / "other", tmp_path / "out"
    for folder, seed in ((start, "0"), (other, "5")):
        assert main(["distill", "run", "--method", "random", "--out", str(folder), "--seed", seed, *TINY[:-2]]) == 0
    run = ["distill", "run", "--method", "dm", "--out", str(out), "--iterations", "1", "--no-baseline", *TINY]
    assert main([*run, "--init-from", str(start)]) == 0
    capsys.readouterr()
    assert main([*run, "--resume"]) == 1
    assert capsys.readouterr().err == (f"error: {out / 'checkpoint' / 'run.json'}: the checkpointed run started from "
                                       f"the set of {start} (--init-from), this one from real images; pass "
                                       f"--init-from {start} (or the folder it moved to), or use a new --out\n")
    assert main([*run, "--resume", "--init-from", str(other)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {out / 'checkpoint' / 'run.json'}: the checkpointed run "
                                              f"started from the set of {start} (--init-from), this one from the "
                                              f"set of {other}, whose images differ; pass --init-from {start}")


def test_out_inside_the_image_folder_it_distils_is_refused(tmp_path, capsys, monkeypatch, make_two_class_images):
    """--out DATA/run1 wrote images.png and loss.png into a subfolder of the image folder: every later run on that
    data read 'run1' as a third class whose images were the figures."""
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    data = make_two_class_images(tmp_path / "data")
    args = ["distill", "run", "--method", "random", "--dataset", "image-folder", "--data-root", str(data), "--ipc",
            "1", "--eval-nets", "1", "--eval-epochs", "1"]
    assert main([*args, "--out", str(data / "run1")]) == 1
    assert capsys.readouterr().err == (f"error: --out {data / 'run1'} is inside --data-root {data}: its PNG figures "
                                       "would be read as a class of images by every later run on that data; choose "
                                       "an output folder outside it\n")
    assert not (data / "run1").exists()
    assert main([*args, "--out", str(tmp_path / "run1")]) == 0  # beside the data: fine


def test_attribute_out_inside_the_image_folder_it_reads_is_refused(tmp_path, capsys, monkeypatch, make_two_class_images):
    """The same for `atlas attribute`: its attribution.png landed in a subfolder of the data (found, not fixed,
    by the distill walk)."""
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    data = make_two_class_images(tmp_path / "data")
    assert main(["attribute", "--dataset", "image-folder", "--data-root", str(data), "--out", str(data / "att")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --out {data / 'att'} is inside --data-root {data}: ")
    assert not (data / "att").exists()


def test_eval_of_a_folder_that_takes_no_file_is_refused_before_training(tmp_path, monkeypatch):
    """`atlas distill eval DIR` stores its evaluation in DIR: a read-only DIR failed only after training the
    evaluation nets."""
    import errno

    from modelatlas import atomic
    from modelatlas.distill import evaluate_result, reevaluate
    from modelatlas.errors import ConfigError

    run_distillation("random", "digits", 1, tmp_path, config={"width": 8}, eval_nets=1, eval_epochs=1)
    monkeypatch.setattr(atomic, "unwritable", lambda p: (tmp_path, OSError(errno.EROFS, "Read-only file system")))
    monkeypatch.setattr(reevaluate, "evaluate_synthetic", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ConfigError, match=r"the result folder .* cannot be written: no file can be made in .* "
                                          r"\(Read-only file system\); copy it somewhere writable"):
        evaluate_result(tmp_path)
    monkeypatch.undo()
    assert len(evaluate_result(tmp_path, save=False, eval_nets=1, eval_epochs=1)["accuracies"]) == 1  # not saving: fine


def test_resume_on_a_new_folder_says_it_starts_from_the_beginning(tmp_path, capsys):
    """--resume with a mistyped --out trained from scratch without a word (atlas attribute says so); a real
    resume says nothing of the kind."""
    out = tmp_path / "dm-typo"
    argv = ["distill", "run", "--method", "dm", "--out", str(out), "--iterations", "1", "--resume", *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"nothing to resume in {out / 'checkpoint'}: starting from the beginning\n")
    assert main(argv) == 0
    assert "nothing to resume" not in capsys.readouterr().out
