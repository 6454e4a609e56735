"""User-facing errors of distillation runs: checked before any work, one line, naming the value and the fix."""

import json

import numpy as np
import pytest
import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import run_distillation
from modelatlas.distill.methods.podd.api import run_poster
from modelatlas.errors import ConfigError

TINY_PODD = {"iterations": 1, "total": 2, "window": 1, "batch_real": 4, "width": 8, "checkpoint_every": 1}


def make_small(per_class=3, k=2, shape=(1, 8, 8), name="toy"):
    x = torch.rand(k * per_class, *shape, generator=torch.Generator().manual_seed(0))
    return ArrayDataset(name, x, torch.arange(k).repeat_interleave(per_class), [f"c{i}" for i in range(k)])


def test_poster_ipc_above_the_smallest_class_is_refused_before_distilling(tmp_path):
    data = make_small()
    with pytest.raises(ConfigError, match=r"--ipc 3.5 \(a poster\) needs 4 real examples.*'c0'.*only 3"):
        run_poster(data, 3.5, tmp_path / "out", TINY_PODD, eval_nets=1, eval_epochs=1, dataset_test=data)
    assert not (tmp_path / "out").exists()  # nothing was distilled


@pytest.mark.parametrize("ipc", [float("inf"), float("nan"), 0.0])
def test_poster_ipc_must_be_finite_and_positive(tmp_path, ipc):
    data = make_small()
    with pytest.raises(ConfigError, match="--ipc must be a finite number > 0"):
        run_poster(data, ipc, tmp_path / "out", TINY_PODD, dataset_test=data)


def test_run_ipc_above_the_smallest_class_is_refused_before_distilling(tmp_path):
    data = make_small()
    with pytest.raises(ConfigError, match="ipc 4 needs 4 real examples per class.*--no-baseline"):
        run_distillation("dm", data, 4, tmp_path / "out", {"iterations": 1, "init": "noise", "width": 8},
                         dataset_test=data, eval_nets=1, eval_epochs=1)
    assert not (tmp_path / "out").exists()


TINY_DM = {"iterations": 1, "width": 8, "batch_real": 16, "checkpoint_every": 1}
QUICK = dict(seed=1, eval_nets=1, eval_epochs=1, baseline=False)


def test_resume_compares_resolved_settings(tmp_path):
    run_distillation("dm", "digits", 1, tmp_path, config={k: v for k, v in TINY_DM.items() if k != "width"}, **QUICK)
    # explicit identity transform and the default width (64 for 8x8 digits) are what the first part used
    info = run_distillation("dm", "digits", 1, tmp_path, config={**TINY_DM, "width": 64, "iterations": 2},
                            transform="identity", resume=True, **QUICK)
    assert info["resumed"] and len(json.loads((tmp_path / "result.json").read_text())["losses"]) == 2


def test_resume_on_a_fresh_folder_is_no_resumed_run(tmp_path):
    # --resume on a new --out starts from scratch; its result.json said "resumed": true
    info = run_distillation("dm", "digits", 1, tmp_path / "new", config=TINY_DM, resume=True, **QUICK)
    assert info["resumed"] is False


@pytest.mark.parametrize("field,value,saved", [("width", 8, 64), ("depth", 3, 2)])
def test_resume_refuses_a_width_or_depth_set_on_a_default_net_run(tmp_path, field, value, saved):
    """The saved None was resolved with the resumed run's own net, so any --set width=... matched it and the
    run went on with another net than its first part."""
    run_distillation("dm", "digits", 1, tmp_path, config={k: v for k, v in TINY_DM.items() if k != "width"}, **QUICK)
    with pytest.raises(ConfigError, match=f"the checkpointed run used config.{field} {saved}, not {value}"):
        run_distillation("dm", "digits", 1, tmp_path, config={**TINY_DM, "width": None, field: value, "iterations": 2},
                         resume=True, **QUICK)


def test_resume_names_another_method_first(tmp_path):
    run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, **QUICK)
    with pytest.raises(ConfigError, match="the checkpointed run used method 'dm', not 'dc'"):
        run_distillation("dc", "digits", 1, tmp_path, config={"iterations": 1, "width": 8}, resume=True, **QUICK)


def test_resume_adds_up_the_wall_time_of_its_parts(tmp_path):
    run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, **QUICK)
    ckpt = tmp_path / "checkpoint" / "checkpoint.json"
    meta = json.loads(ckpt.read_text())
    assert meta["wall_time_s"] > 0
    meta["wall_time_s"] = 1000.0  # as if the first part had taken 1000 s
    ckpt.write_text(json.dumps(meta))
    info = run_distillation("dm", "digits", 1, tmp_path, config={**TINY_DM, "iterations": 2}, resume=True, **QUICK)
    assert 1000 < info["wall_time_s"] < 1100


def test_out_folder_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"--out {tmp_path} is a non-empty folder that is not a distillation result"):
        run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, **QUICK)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_another_programs_result_json_is_no_finished_result(tmp_path, resume):
    """An --out holding another program's result.json was "a finished result" (pass --resume), and --resume sent
    to `atlas distill eval`, which then missed synthetic.safetensors. It is refused as another program's."""
    (tmp_path / "result.json").write_text('{"accuracy": 0.9, "model": "resnet"}')
    with pytest.raises(ConfigError, match=rf"^--out {tmp_path} holds a result\.json that names no distillation "
                                          r"method \(another program's result: its files would be overwritten\); "
                                          r"choose a new or empty --out$"):
        run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, resume=resume, **QUICK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_finished_result_is_not_overwritten_without_resume(tmp_path):
    from modelatlas.errors import ConfigError

    run_distillation("random", "digits", 1, tmp_path, config={"width": 8}, **QUICK)  # random keeps no checkpoint
    before = (tmp_path / "result.json").read_bytes()
    with pytest.raises(ConfigError, match=r"result.json exists: .* holds a finished result"):
        run_distillation("herding", "digits", 2, tmp_path, config={"width": 8}, **QUICK)
    assert (tmp_path / "result.json").read_bytes() == before
    with pytest.raises(ConfigError, match=r"used method 'random', not 'herding'"):  # resume checks the settings
        run_distillation("herding", "digits", 2, tmp_path, config={"width": 8}, resume=True, **QUICK)
    run_distillation("random", "digits", 1, tmp_path, config={"width": 8}, resume=True, **QUICK)


def test_a_refused_start_writes_nothing(tmp_path):
    from modelatlas.errors import ConfigError

    run_distillation("random", "digits", 1, tmp_path / "a", config={"width": 8}, **QUICK)
    with pytest.raises(ConfigError, match="cannot start from a given set"):
        run_distillation("herding", "digits", 1, tmp_path / "b", init_from=tmp_path / "a", **QUICK)
    assert not (tmp_path / "b").exists()


def test_relative_data_root_is_stored_absolute_and_eval_takes_a_new_root(tmp_path, monkeypatch, capsys, make_two_class_images):
    from modelatlas.cli.main import main

    make_two_class_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    kw = {"root": "imgs", "size": 8, "channels": 1, "test_fraction": 0.25}
    run_distillation("random", "image-folder", 1, "out", config={"width": 8}, dataset_kwargs=kw, **QUICK)
    saved = json.loads((tmp_path / "out" / "result.json").read_text())["dataset_kwargs"]
    assert saved["root"] == str((tmp_path / "imgs").resolve())
    (tmp_path / "imgs").rename(tmp_path / "moved")
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main(["distill", "eval", "out", "--eval-epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "imgs is not a folder" in err and "if the data moved" in err and "--data-root" in err
    assert main(["distill", "eval", "out", "--eval-epochs", "1", "--data-root", "moved"]) == 0


RUN = ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1",
       "--eval-nets", "1", "--eval-epochs", "1", "--no-baseline", "--set", "width=8"]
POSTER = ["distill", "poster", "--dataset", "digits", "--iterations", "1", "--eval-nets", "1", "--eval-epochs", "1"]


@pytest.mark.parametrize("argv,message", [
    (RUN + ["--data-root", "."], "dataset 'digits' takes no data root"),
    (RUN + ["--set", "lr_img=abc"], "config field 'lr_img' must be float, got 'abc'"),
    (RUN + ["--set", "batch_real=1.5"], "config field 'batch_real' must be int, got 1.5"),
    (RUN + ["--device", "tpu"], "unknown device 'tpu'; use cpu or cuda"),
    (POSTER + ["--ipc", "inf"], "--ipc must be a finite number > 0"),
    (POSTER + ["--ipc", "nan"], "--ipc must be a finite number > 0"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, argv, message):
    from modelatlas.cli.main import main

    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_a_config_error():
    from modelatlas.distill.nets import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="'cuda' asked for, but CUDA is not available here; use --device cpu"):
        pick_device("cuda")


def test_a_gpu_is_named_with_its_index(monkeypatch):
    """'cuda' and 'cuda:0' are one device: a run recorded as one and asked again as the other was not found
    finished (its result.json's device differed) and was evaluated again."""
    from modelatlas.distill.nets import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_device("cuda") == pick_device("cuda:0") == pick_device(None) == torch.device("cuda", 0)
    assert str(pick_device("cuda:1")) == "cuda:1" and str(pick_device("cpu")) == "cpu"


@pytest.fixture
def result_folder(tmp_path):
    run_distillation("random", "digits", 1, tmp_path / "r", config={"width": 8}, transform="standardize", **QUICK)
    return tmp_path / "r"


@pytest.mark.parametrize("damage,file,message", [
    (lambda f: (f / "result.json").write_text("{oops"), "result.json", "is not valid JSON"),
    (lambda f: (f / "synthetic.json").write_text("[1, 2"), "synthetic.json", "is not valid JSON"),
    (lambda f: (f / "result.json").write_text("{}"), "result.json", "has no 'dataset' name"),
    # another program's result.json (or atlas attribute's JSON) was scored under the default protocol
    (lambda f: drop_result_keys(f, "method"), "result.json", r"has no 'method' \(not a result\.json of `atlas "
                                                             r"distill`: another program's, or edited\)"),
    (lambda f: drop_result_keys(f, "evaluation"), "result.json", "has no 'evaluation' "),
    (lambda f: (f / "synthetic.json").write_text("{}"), "synthetic.json", "num_classes must be a positive integer"),
    (lambda f: (f / "transform.safetensors").unlink(), "transform.safetensors", "missing; the 'standardize'"),
    (lambda f: save_file({"mean": torch.zeros(3)}, str(f / "transform.safetensors")), "transform.safetensors",
     "has no tensor 'std'"),
    (lambda f: save_file({"mean": torch.zeros(3), "std": torch.ones(3)}, str(f / "transform.safetensors")),
     "transform.safetensors", "does not fit images of shape"),
    (lambda f: set_meta(f, label_generator="os:system"), "synthetic.json", "'os:system' is not a known label"),
    (lambda f: set_meta(f, label_generator="modelatlas.distill.api:run_distillation"), "synthetic.json",
     "is not a known label generator"),
    # hand edits of result.json once crashed in training (AttributeError, TypeError, ValueError)
    (lambda f: set_result(f, evaluation="x"), "result.json", "evaluation.protocol must be an object"),
    (lambda f: set_result(f, evaluation={"protocol": "x"}), "result.json", "evaluation.protocol must be an object"),
    (lambda f: set_protocol(f, width="big"), "result.json", r"evaluation.protocol.width must be a number \(integer\)"),
    (lambda f: set_protocol(f, epochs=2.5), "result.json", r"evaluation.protocol.epochs must be a number \(integer"),
    (lambda f: set_protocol(f, lr="x"), "result.json", "evaluation.protocol.lr must be a number, got 'x'"),
    (lambda f: set_protocol(f, kind="foo"), "result.json", "evaluation.protocol: eval protocol kind must be"),
    (lambda f: set_result(f, seed="x"), "result.json", r"seed must be an integer from -2\*\*63 to 2\*\*63 - 1, got 'x'"),
    (lambda f: set_result(f, dataset_kwargs=[1]), "result.json", r"dataset_kwargs must be an object, got \[1\]"),
])
def test_damaged_result_files_are_named(result_folder, damage, file, message):
    from modelatlas.distill import evaluate_result
    from modelatlas.errors import CheckpointError

    damage(result_folder)
    with pytest.raises(CheckpointError, match=message) as e:
        evaluate_result(result_folder, eval_epochs=1, save=False)
    assert str(e.value).startswith(str(result_folder / file))


def save_file(tensors, path):
    from safetensors.torch import save_file as save

    save(tensors, path)


def set_result(folder, **fields):
    path = folder / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def drop_result_keys(folder, *keys):
    path = folder / "result.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in keys}))


def set_protocol(folder, **fields):
    info = json.loads((folder / "result.json").read_text())
    set_result(folder, evaluation={**info["evaluation"], "protocol": {**info["evaluation"]["protocol"], **fields}})


def set_meta(folder, **fields):
    path = folder / "synthetic.json"
    info = json.loads(path.read_text())
    info["meta"].update(fields)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("name", ["checkpoint.json", "run.json"])
def test_corrupt_checkpoint_files_are_named(tmp_path, name):
    from modelatlas.errors import CheckpointError

    run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, **QUICK)
    (tmp_path / "checkpoint" / name).write_text('{"iteration": ')
    with pytest.raises(CheckpointError, match=f"{name}: is not valid JSON.*delete"):
        run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, resume=True, **QUICK)


def test_poster_ipc_below_one_image_is_refused_not_rounded():
    from modelatlas.distill.methods.podd import poster as P

    with pytest.raises(ConfigError, match=r"poster ipc 0.01 is below the smallest poster.*ipc >= 0.1"):
        P.make_layout(0.01, 10, 8, 8)
    assert P.make_layout(0.1, 10, 8, 8).ipc(10) == pytest.approx(0.1)


def test_protocol_says_1_epoch():
    from modelatlas.distill.evaluate import EvalProtocol, describe

    assert "1 epoch," in describe(EvalProtocol(epochs=1).resolved())
    assert "300 epochs" in describe(EvalProtocol().resolved())


def test_resume_accepts_the_data_root_in_another_spelling(tmp_path, monkeypatch, make_two_class_images):
    make_two_class_images(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    kw = {"size": 8, "channels": 1, "test_fraction": 0.25}
    cfg = {**TINY_DM, "batch_real": 4}
    run_distillation("dm", "image-folder", 1, "out", config=cfg, dataset_kwargs={"root": "imgs", **kw}, **QUICK)
    info = run_distillation("dm", "image-folder", 1, "out", config={**cfg, "iterations": 2}, resume=True,
                            dataset_kwargs={"root": str(tmp_path / "imgs" / ".." / "imgs"), **kw}, **QUICK)
    assert info["resumed"] and info["dataset_kwargs"]["root"] == str((tmp_path / "imgs").resolve())


def test_one_evaluation_net_is_singular(tmp_path, capsys):
    from modelatlas.cli.main import main

    assert main(["distill", "run", "--method", "random", "--dataset", "digits", "--ipc", "1", "--out",
                 str(tmp_path / "r"), "--eval-nets", "1", "--eval-epochs", "1", "--set", "width=8"]) == 0
    assert "(1 net: " in capsys.readouterr().out


def test_eval_on_data_of_another_class_count_is_a_one_line_error(tmp_path, monkeypatch, capsys, make_two_class_images):
    from PIL import Image

    from modelatlas.cli.main import main

    make_two_class_images(tmp_path / "imgs")
    (tmp_path / "three").mkdir()
    for c in ("a", "b", "c"):  # moved data that is not the data of the run: 3 classes, not 2
        (tmp_path / "three" / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "three" / c / f"{i}.png")
    kw = {"root": str(tmp_path / "imgs"), "size": 8, "channels": 1, "test_fraction": 0.25}
    run_distillation("random", "image-folder", 1, tmp_path / "out", config={"width": 8}, dataset_kwargs=kw, **QUICK)
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main(["distill", "eval", str(tmp_path / "out"), "--eval-epochs", "1", "--data-root",
                 str(tmp_path / "three")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the test set has 3 classes" in err and "the synthetic set (synthetic.safetensors) 2" in err


def test_eval_on_data_of_other_class_names_is_refused(tmp_path, monkeypatch, capsys, make_two_class_images):
    # same class count and shape, other classes: the set was scored against the wrong labels without a word
    from modelatlas.cli.main import main

    make_two_class_images(tmp_path / "imgs")
    make_two_class_images(tmp_path / "other")
    (tmp_path / "other" / "dog").rename(tmp_path / "other" / "emu")
    kw = {"root": str(tmp_path / "imgs"), "size": 8, "channels": 1, "test_fraction": 0.25}
    run_distillation("random", "image-folder", 1, tmp_path / "out", config={"width": 8}, dataset_kwargs=kw, **QUICK)
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main(["distill", "eval", str(tmp_path / "out"), "--eval-epochs", "1", "--data-root",
                 str(tmp_path / "other")]) == 1
    assert "the test set's class 1 is 'emu', the synthetic set's 'dog' (its synthetic.json's class_names: " in \
        capsys.readouterr().err  # the file that names 'dog' (fuzzed, session 40: it named the folder alone)
    with pytest.raises(ConfigError, match="this run's class 1 is 'emu', the synthetic set's 'dog'"):  # --init-from
        run_distillation("dm", "image-folder", 1, tmp_path / "dm", config={"width": 8, "iterations": 1},
                         dataset_kwargs={**kw, "root": str(tmp_path / "other")}, init_from=tmp_path / "out", **QUICK)


def test_ipc_above_a_class_without_baseline_names_the_class(tmp_path):
    data = make_small(per_class=3)
    data = ArrayDataset("toy", data.x[:5], data.y[:5], ["cat", "eel"])  # 'eel' has 2 examples
    with pytest.raises(ConfigError, match="class 'eel' of 'toy' has 2 examples, fewer than ipc=3"):
        run_distillation("dm", data, 3, tmp_path / "out", {"iterations": 1, "width": 8}, dataset_test=data,
                         eval_nets=1, eval_epochs=1, baseline=False)


def test_resume_of_a_finished_result_keeps_its_reevaluation(tmp_path):
    from modelatlas.distill import evaluate_result

    run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, **QUICK)
    ev = evaluate_result(tmp_path, eval_epochs=2)
    info = run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, resume=True, **QUICK)
    assert info["reevaluation"] == ev == json.loads((tmp_path / "result.json").read_text())["reevaluation"]
    info = run_distillation("dm", "digits", 1, tmp_path, config={**TINY_DM, "iterations": 2}, resume=True, **QUICK)
    assert "reevaluation" not in info  # another set: the old numbers no longer describe it


def test_a_refused_start_leaves_out_as_it_was_and_does_not_block_another(tmp_path):
    with pytest.raises(ConfigError, match="fewer than ipc=400"):  # herding's own refusal, after run.json was due
        run_distillation("herding", "digits", 400, tmp_path / "new", **QUICK)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="fewer than ipc=400"):
        run_distillation("herding", "digits", 400, tmp_path / "empty", **QUICK)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_run_json_without_a_checkpoint_does_not_refuse_a_resume(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "run.json").write_text(json.dumps({"method": "dm", "ipc": 7}))  # nothing to resume
    info = run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, resume=True, **QUICK)
    assert info["ipc"] == 1 and json.loads((tmp_path / "checkpoint" / "run.json").read_text())["ipc"] == 1


def test_a_run_started_from_a_set_resumes_after_that_folder_moves_but_not_from_another_set(tmp_path):
    run_distillation("random", "digits", 1, tmp_path / "a", config={"width": 8}, **QUICK)
    run_distillation("dm", "digits", 1, tmp_path / "run", config=TINY_DM, init_from=tmp_path / "a", **QUICK)
    (tmp_path / "a").rename(tmp_path / "moved")
    info = run_distillation("dm", "digits", 1, tmp_path / "run", config={**TINY_DM, "iterations": 2},
                            init_from=tmp_path / "moved", resume=True, **QUICK)
    assert info["init_from"] == str((tmp_path / "moved").resolve())
    assert len(json.loads((tmp_path / "run" / "result.json").read_text())["losses"]) == 2
    run_distillation("random", "digits", 1, tmp_path / "other", config={"width": 8}, **{**QUICK, "seed": 5})
    with pytest.raises(ConfigError, match=r"run.json: the checkpointed run started from the set of .*, whose images"):
        run_distillation("dm", "digits", 1, tmp_path / "run", config={**TINY_DM, "iterations": 3},
                         init_from=tmp_path / "other", resume=True, **QUICK)


def test_resume_refuses_renamed_classes(tmp_path):
    """An image folder's class renamed between the parts of a run (emu/ -> bird/ sorts first) shifted every label:
    the resumed run went on with its cat images called bird."""
    data = make_small(per_class=4, k=3)
    cfg = {**TINY_DM, "batch_real": 4}
    run_distillation("dm", data, 1, tmp_path, config=cfg, dataset_test=data, **QUICK)
    renamed = ArrayDataset("toy", data.x, data.y, ["a", "c1", "c2"])
    with pytest.raises(ConfigError, match=r"run.json: the checkpointed run's class 0 was 'c0', the data's is 'a'"):
        run_distillation("dm", renamed, 1, tmp_path, config={**cfg, "iterations": 2}, dataset_test=renamed,
                         resume=True, **QUICK)
    run_json = tmp_path / "checkpoint" / "run.json"
    run_json.write_text(json.dumps({k: v for k, v in json.loads(run_json.read_text()).items() if k != "classes"}))
    info = run_distillation("dm", data, 1, tmp_path, config={**cfg, "iterations": 2}, dataset_test=data,
                            resume=True, **QUICK)  # a run.json of an older version: not checked
    assert info["resumed"]


def test_resume_without_an_iteration_count_keeps_the_checkpointed_one(tmp_path):
    """Re-evaluating a finished 1-iteration run with --resume (no --iterations) went on to dm's default 500."""
    cfg = {k: v for k, v in TINY_DM.items() if k != "iterations"}
    run_distillation("dm", "digits", 1, tmp_path, config={**cfg, "iterations": 1}, **QUICK)
    info = run_distillation("dm", "digits", 1, tmp_path, config=cfg, resume=True, **QUICK)
    losses = json.loads((tmp_path / "result.json").read_text())["losses"]
    assert info["config"]["iterations"] == 1 and len(losses) == 1
    run_distillation("dm", "digits", 1, tmp_path, config={**cfg, "iterations": 2}, resume=True, **QUICK)
    assert len(json.loads((tmp_path / "result.json").read_text())["losses"]) == 2  # a given count still extends
    # run.json keeps the first start's 1: a plain --resume of the extended run was refused ("2 done, more than 1")
    info = run_distillation("dm", "digits", 1, tmp_path, config=cfg, resume=True, **QUICK)
    assert info["config"]["iterations"] == 2


def test_resume_names_another_data_root_by_its_flag(tmp_path, make_two_class_images):
    """A resume reading the data from another folder said 'used dataset_kwargs {'root': ...}, not {...}'."""
    for root in ("a", "b"):
        make_two_class_images(tmp_path / root)
    cfg = {**TINY_DM, "batch_real": 2}
    run_distillation("dm", "image-folder", 1, tmp_path / "out", config=cfg,
                     dataset_kwargs={"root": str(tmp_path / "a")}, **QUICK)
    with pytest.raises(ConfigError, match=f"the checkpointed run used --data-root {tmp_path / 'a'}, not "
                                          f"{tmp_path / 'b'} \\(dataset_kwargs root=\\); resume with the same"):
        run_distillation("dm", "image-folder", 1, tmp_path / "out", config={**cfg, "iterations": 2},
                         dataset_kwargs={"root": str(tmp_path / "b")}, resume=True, **QUICK)


@pytest.mark.parametrize("resume", [False, True])
def test_an_interrupted_attribution_is_not_taken_for_a_distillation(tmp_path, resume):
    """`atlas attribute` keeps its interrupted state in OUT/checkpoint/run.json too: a distillation into that
    folder was let in and replaced the attribution's run.json, losing its resume."""
    state = tmp_path / "checkpoint" / "run.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"settings": {"dataset": "digits"}, "timings": {}, "match_losses": [],
                                 "cluster_class": [0, 1]}))
    before = state.read_bytes()
    with pytest.raises(ConfigError, match=f"--out {tmp_path} is a non-empty folder that is not a distillation result"):
        run_distillation("dm", "digits", 1, tmp_path, config=TINY_DM, resume=resume, **QUICK)
    assert state.read_bytes() == before and sorted(p.name for p in state.parent.iterdir()) == ["run.json"]


def test_a_huge_poster_ipc_is_refused_in_a_short_line(tmp_path):
    # `atlas distill poster --ipc 1e308` printed ceil(1e308), 309 digits, in its error (the day-one review)
    with pytest.raises(ConfigError) as e:
        run_poster(make_small(), 1e308, tmp_path / "out", eval_nets=1, eval_epochs=1, dataset_test=make_small())
    assert "needs 1e+308 real examples per class" in str(e.value) and len(str(e.value)) < 300
