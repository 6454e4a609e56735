"""``atlas probex`` on tiny zoos (hidden width 16): train, resume, predict, out-of-tree, search."""

import json
import re

import pytest
import torch

from modelatlas.atomic import atomic_save_tensors
from modelatlas.cli.main import main


@pytest.fixture(scope="module")
def make_tiny_zoo(tmp_path_factory):
    from modelatlas.probex.families import make_class_subset_zoo

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("zoo")
    make_class_subset_zoo(folder, children=(24, 12), hidden=16, ft_steps=(10, 20), batch_models=24)
    return folder


@pytest.fixture(scope="module")
def make_trained(make_tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    assert main(["probex", "train", str(make_tiny_zoo), "--layer", "layers.1.weight", "--epochs", "3",
                 "--rank", "4", "--out", str(out)]) == 0
    return out


def test_train_writes_experts_and_router(make_trained, capsys):
    assert (make_trained / "index.json").exists()
    assert {p.name for p in (make_trained / "experts").iterdir()} == {"t0", "t1"}
    assert (make_trained / "router" / "router.safetensors").exists()


def test_train_resume_and_auto_layer(make_tiny_zoo, make_trained, tmp_path, capsys):
    assert main(["probex", "train", str(make_tiny_zoo), "--layer", "layers.1.weight", "--epochs", "4",
                 "--rank", "4", "--out", str(make_trained), "--resume"]) == 0
    assert main(["probex", "train", str(make_tiny_zoo), "--epochs", "1", "--rank", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer embed.weight: validation per-label accuracy " in out and "layer: " in out  # the score named


def test_resume_with_other_settings_is_refused(make_tiny_zoo, make_trained, capsys):
    """A setting that differs is named by its flag, with the value that continues the run (it said 'rank_u was
    4', a field no flag of the command is called)."""
    base = ["probex", "train", str(make_tiny_zoo), "--out", str(make_trained), "--resume"]
    then = "to continue it, or train without --resume to start over\n"
    for extra, said in ((["--rank", "4", "--layer", "layers.1.weight", "--epochs", "4", "--seed", "9"],
                         f"--seed was 0 in the interrupted run, now 9; rerun with --seed 0 {then}"),
                        (["--rank", "8", "--layer", "layers.1.weight", "--epochs", "4"],
                         f"--rank was 4 in the interrupted run, now 8; rerun with --rank 4 {then}"),
                        (["--rank", "4", "--layer", "layers.0.weight", "--epochs", "4"],
                         "--layer was 'layers.1.weight' in the interrupted run, now 'layers.0.weight'; rerun with "
                         f"--layer layers.1.weight {then}"),
                        (["--rank", "4", "--layer", "layers.1.weight", "--epochs", "2"], "epochs is 2 now")):
        capsys.readouterr()
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {make_trained / 'checkpoints' / 't0' / 'train_state.json'}: cannot resume: ")
        assert said in err and err.count("\n") == 1


def test_predict_routes_and_rejects_stranger(make_tiny_zoo, make_trained, tmp_path, capsys):
    child = make_tiny_zoo / "t1-c0003.safetensors"
    from safetensors.torch import load_file

    stranger = {k: torch.randn_like(v) * 3 for k, v in load_file(str(child)).items()}
    atomic_save_tensors(tmp_path / "stranger.safetensors", stranger)
    assert main(["probex", "predict", str(child), str(tmp_path / "stranger.safetensors"),
                 "--experts", str(make_trained)]) == 0
    out = capsys.readouterr().out
    assert "t1-c0003 [tree t1]:" in out
    assert "stranger belongs to no known tree: nearest tree" in out and "beyond its radius" in out


def test_predict_reports_stray_models_and_goes_on(make_tiny_zoo, make_trained, tmp_path, capsys):
    child = make_tiny_zoo / "t1-c0003.safetensors"
    atomic_save_tensors(tmp_path / "odd.safetensors", {"layers.1.weight": torch.randn(16, 8)})  # another width
    atomic_save_tensors(tmp_path / "nolayer.safetensors", {"other.weight": torch.randn(16, 16)})
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    strays = [str(tmp_path / f"{n}.safetensors") for n in ("odd", "nolayer", "broken")]
    assert main(["probex", "predict", *strays, str(child), "--experts", str(make_trained)]) == 0
    out = capsys.readouterr().out
    assert "t1-c0003 [tree t1]:" in out  # the readable model after them is still predicted
    # it said "router expects 256 weights per model; got 128", naming neither the layer nor its shapes
    assert (f"odd: not routed ({tmp_path / 'odd.safetensors'}: layer 'layers.1.weight' has shape (16, 8); the experts "
            "were trained on (16, 16): another architecture); no prediction") in out
    assert "nolayer: not routed (" in out and "no tensor named 'layers.1.weight'" in out
    assert "broken: not routed (" in out and "broken.safetensors" in out
    assert main(["probex", "predict", *strays, "--experts", str(make_trained)]) == 1  # nothing predicted at all


def test_predict_skips_a_path_that_is_no_model_and_goes_on(make_tiny_zoo, make_trained, tmp_path, capsys):
    """A notes file among the models stopped the whole run ('error: notes.txt: unknown checkpoint format'),
    where `atlas index build` and `atlas lineage recover` report it as skipped and go on."""
    child = make_tiny_zoo / "t1-c0003.safetensors"
    (tmp_path / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["probex", "predict", str(tmp_path / "notes.txt"), str(child), "--experts", str(make_trained)]) == 0
    captured = capsys.readouterr()
    assert "t1-c0003 [tree t1]:" in captured.out
    known = " (known: safetensors, torch, hf-folder, peft-lora, onnx, gguf)"  # it said no more than the format
    assert captured.err == f"skipped: {tmp_path / 'notes.txt'}: unknown checkpoint format{known}\n"
    assert main(["probex", "predict", str(tmp_path / "notes.txt"), "--experts", str(make_trained)]) == 1  # alone
    assert capsys.readouterr().err == f"error: {tmp_path / 'notes.txt'}: unknown checkpoint format{known}\n"
    assert main(["probex", "predict", str(tmp_path / "typo"), str(child), "--experts", str(make_trained)]) == 1
    captured = capsys.readouterr()  # a path that does not exist is no "skipped:" line, among others too
    assert captured.err == f"error: {tmp_path / 'typo'}: no such file or folder\n" and captured.out == ""


def test_train_refuses_a_folder_that_holds_no_experts(make_tiny_zoo, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path, make_tiny_zoo, tmp_path / "notes.txt"):
        assert main(["probex", "train", str(make_tiny_zoo), "--epochs", "1", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is a ") and err.count("\n") == 1
        assert "non-empty folder that holds no experts (index.json)" in err or "is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_predict_errors_are_one_line(tmp_path, capsys, make_tiny_zoo):
    assert main(["probex", "predict", str(make_tiny_zoo / "t0.safetensors"), "--experts", str(tmp_path)]) == 1
    assert "not an experts folder" in capsys.readouterr().err
    assert main(["probex", "train", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no such manifest" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["probex", "predict"], ["probex", "search", "a seven"], ["index", "build"]])
def test_missing_experts_folder_is_named_as_missing(tmp_path, capsys, make_tiny_zoo, command):
    """It said 'nope: not an experts folder (no index.json; ...)', as if the folder were there."""
    missing = tmp_path / "nope"
    out = ["--out", str(tmp_path / "atlas")] if command[0] == "index" else []
    assert main([*command, str(make_tiny_zoo / "t0.safetensors"), "--experts", str(missing), *out]) == 1
    assert capsys.readouterr().err == (f"error: {missing}: no such folder; pass the folder `atlas probex train "
                                       "--out` wrote\n")


def test_text_train_and_search(tmp_path, capsys):
    from modelatlas.probex.families import make_named_class_zoo

    zoo = tmp_path / "named"
    make_named_class_zoo(zoo, models_per_class=2, hidden=16, ft_steps=(5, 10), batch_models=120)
    out = tmp_path / "tx"
    assert main(["probex", "train", str(zoo), "--task", "text", "--layer", "classifier.weight", "--epochs", "2",
                 "--rank", "4", "--out", str(out)]) == 0
    assert "tree root: 120 models, validation top-1 accuracy " in capsys.readouterr().out  # it said "validation 0.056"
    assert main(["probex", "search", "a handwritten seven, upside down", str(zoo), "--experts", str(out),
                 "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].strip().startswith("1. ") and "log p(query)" in lines[-1]
    # each hit says what its expert takes it for, as `atlas index search` does (it gave a name and a score only)
    records = json.loads((zoo / "manifest.json").read_text())["models"]
    prompts = {m["task"]["label"] for m in records if "label" in (m.get("task") or {})}
    for line in lines[-3:]:
        said = re.fullmatch(r'\s*\d\. \S+  log p\(query\) -?\d+\.\d{3}  "(.+)" \((\d\.\d\d)\)', line)
        assert said and said[1] in prompts and 0 <= float(said[2]) <= 1
    assert main(["probex", "search", "seven", str(zoo), "--experts", str(tmp_path / "missing")]) == 1
    check_search_sources(zoo, out, tmp_path, capsys)


def check_search_sources(zoo, experts, tmp_path, capsys):
    """An atlas folder stands for its models; a search that can rank no model is an error, not silence."""
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.lineage.forest import Forest

    names = sorted(p.stem for p in zoo.glob("*.safetensors"))[:3]
    models = [ModelEntry(n, str(zoo / f"{n}.safetensors")) for n in names]
    Atlas(models, Forest(names, [])).save(tmp_path / "atl")
    capsys.readouterr()
    assert main(["probex", "search", "a seven", str(tmp_path / "atl"), "--experts", str(experts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and {ln.split()[1] for ln in lines} == set(names)
    atomic_save_tensors(tmp_path / "other" / "odd.safetensors", {"classifier.weight": torch.randn(3, 3)})
    assert main(["probex", "search", "a seven", str(tmp_path / "other"), "--experts", str(experts)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "warning: odd: not routed" in captured.err
    # it could not be read at the experts' shape: it said "none in a tree", which pointed at the wrong cause
    assert captured.err.endswith("error: no model to rank: 1 model given, 1 not routed (unreadable, or no "
                                 "classifier.weight of the experts' shape) (see the warnings above)\n")
    # one warning a skipped model, at most 20, then how many more (as `atlas index build`): 1,000 models of another
    # architecture were 1,000 lines above the results
    for i in range(24):
        atomic_save_tensors(tmp_path / "other" / f"odd{i:02d}.safetensors", {"classifier.weight": torch.randn(3, 3)})
    assert main(["probex", "search", "a seven", str(tmp_path / "other"), str(zoo / f"{names[0]}.safetensors"),
                 "--experts", str(experts)]) == 0
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 21 and all(w.startswith("warning: odd") for w in warned[:20])
    assert warned[20] == ("warning: ... and 5 more models skipped (`atlas probex predict` with these models and "
                          "experts names each)")


def test_a_model_given_twice_is_predicted_once(make_tiny_zoo, make_trained, capsys):
    """A zoo and one of its models (or a model folder and its model.safetensors) listed that model twice."""
    child = make_tiny_zoo / "t1-c0003.safetensors"
    capsys.readouterr()
    assert main(["probex", "predict", str(child), str(make_tiny_zoo), f"{make_tiny_zoo}/../{make_tiny_zoo.name}/{child.name}", "--experts",
                 str(make_trained)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names[0] == "t1-c0003" and names.count("t1-c0003") == 1 and len(names) == len(set(names))


def test_search_needs_text_experts(make_tiny_zoo, make_trained, capsys):
    assert main(["probex", "search", "seven", str(make_tiny_zoo), "--experts", str(make_trained)]) == 1
    assert "search needs --task text" in capsys.readouterr().err


def test_train_help_shows_the_defaults_and_the_tree_minimum(capsys):
    from modelatlas.probex.experts import MIN_MODELS

    with pytest.raises(SystemExit):
        main(["probex", "train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"at least {MIN_MODELS} labelled fine-tuned models" in out
    for default in ("(default: 100)", "(default: 32;", "(default: 0)", "classes (default)", "(default: probex_experts)"):
        assert default in out


def test_search_refuses_an_empty_query(make_tiny_zoo, tmp_path, capsys):
    for query in ("", "   "):  # as `atlas index search` does: an empty query ranks nothing
        assert main(["probex", "search", query, str(make_tiny_zoo), "--experts", str(tmp_path)]) == 1
        assert capsys.readouterr().err == "error: empty search query\n"
    assert main(["probex", "search", "?!", str(make_tiny_zoo), "--experts", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: search query '?!' has no words to look up\n"


def test_unranked_says_which_models_were_unreadable_and_which_in_no_tree():
    from types import SimpleNamespace

    from modelatlas.cli.probex import _unranked
    from modelatlas.probex.router import RouteResult

    experts = SimpleNamespace(folder="ex", layer="w")
    far = RouteResult("a", None, "t0", 9.0, 1.0)
    bad = RouteResult("b", None, "", float("nan"), float("nan"), "unreadable")
    assert _unranked([far], experts) == "none in a tree that the experts in ex were trained on"
    assert _unranked([bad, far, far], experts) == ("1 not routed (unreadable, or no w of the experts' shape), the "
                                                   "other 2 in no tree that the experts in ex were trained on")


def test_train_names_the_trees_left_out_for_too_few_models(tmp_path, capsys):
    """A tree with fewer than 10 labelled models got no expert without a word (an unfinished zoo's, say); its
    models were then 'in no known tree'."""
    from tests.probex.test_experts import make_zoo

    from modelatlas.zoo.manifest import ModelRecord, load_manifest

    m = load_manifest(make_zoo(tmp_path))
    m.models += [ModelRecord("s", "r.safetensors", None, "s")] + [
        ModelRecord(f"s{i}", f"c{i}.safetensors", "s", "s", task={"classes": [1]}) for i in range(3)]
    m.save(tmp_path / "manifest.json")
    assert main(["probex", "train", str(tmp_path), "--layer", "w", "--epochs", "1", "--rank", "2",
                 "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "tree r: 12 models" in out and "tree s: 3 labelled models, fewer than 10: no expert" in out


def test_a_model_folder_with_someone_elses_manifest_json_is_a_model(make_tiny_zoo, make_trained, tmp_path, capsys):
    """A folder holding a manifest.json was always read as a zoo: an exporter's manifest beside the weights
    stopped predict with "manifest.json: missing key 'models'", where `atlas index build` read the model."""
    import shutil

    folder = tmp_path / "exported"
    folder.mkdir()
    shutil.copy(make_tiny_zoo / "t1-c0003.safetensors", folder / "model.safetensors")
    (folder / "manifest.json").write_text('{"files": ["model.safetensors"]}')
    capsys.readouterr()
    assert main(["probex", "predict", str(folder), "--experts", str(make_trained)]) == 0
    assert capsys.readouterr().out.startswith("exported [tree t1]: ")


def test_a_hand_written_manifest_of_another_name_is_read_as_train_reads_it(make_tiny_zoo, make_trained, tmp_path,
                                                                            capsys):
    """`probex train labels.json` took a manifest of one's own models under any name; `probex predict labels.json`
    said 'labels.json: unknown checkpoint format'."""
    child = make_tiny_zoo / "t1-c0003.safetensors"
    record = {"name": "mine", "path": str(child), "parent": None, "tree": "x"}
    (tmp_path / "labels.json").write_text(json.dumps({"models": [record]}))
    capsys.readouterr()
    assert main(["probex", "predict", str(tmp_path / "labels.json"), "--experts", str(make_trained)]) == 0
    assert capsys.readouterr().out.startswith("t1-c0003 [tree t1]: ")


def test_a_model_in_a_zoo_folder_but_not_in_its_manifest_is_named(make_tiny_zoo, make_trained, tmp_path, capsys):
    """A model of one's own dropped into the folder of a hand-written manifest was left out by predict without a
    word (`atlas index build FOLDER` read it)."""
    import shutil

    zoo = tmp_path / "mine"
    shutil.copytree(make_tiny_zoo, zoo)
    shutil.copy(zoo / "t1-c0003.safetensors", zoo / "newcomer.safetensors")
    capsys.readouterr()
    assert main(["probex", "predict", str(zoo), "--experts", str(make_trained)]) == 0
    captured = capsys.readouterr()
    assert "newcomer" not in captured.out
    assert captured.err == (f"note: 1 model in {zoo} not in its manifest, not read (newcomer.safetensors): give them "
                            "as paths of their own, or add them to the manifest\n")
    assert main(["probex", "predict", str(zoo / "manifest.json"), "--experts", str(make_trained)]) == 0
    assert capsys.readouterr().err == ""  # the manifest itself given: its models only, as asked


def test_a_model_a_zoo_or_an_atlas_lists_but_that_is_gone_is_skipped_saying_so(make_tiny_zoo, make_trained, tmp_path,
                                                                                 capsys):
    """A zoo model deleted since (`atlas probex predict tinyd` with tinyd/t0.1 gone) was read as a hub id: "not
    routed (tinyd/t0.1: no such file or folder, and hub id 'tinyd/t0.1' is not in the local Hugging Face cache
    ... `huggingface-cli download tinyd/t0.1`)". It is skipped, naming the manifest (or atlas) that lists it."""
    import shutil

    zoo = tmp_path / "mine"
    shutil.copytree(make_tiny_zoo, zoo)
    assert main(["index", "build", str(zoo), "--out", str(tmp_path / "atlas")]) == 0
    (zoo / "t1-c0003.safetensors").unlink()
    for given, fix in ((zoo, f"; `atlas zoo verify {zoo}` lists what is missing"),
                       (tmp_path / "atlas", "; rebuild the atlas")):
        capsys.readouterr()
        assert main(["probex", "predict", str(given), "--experts", str(make_trained)]) == 0
        captured = capsys.readouterr()
        listed = zoo / "manifest.json" if given == zoo else given
        assert "t1-c0003" not in captured.out and "Hugging Face" not in captured.out + captured.err
        assert captured.err == (f"skipped: {zoo / 't1-c0003.safetensors'}: listed in {listed}, but not there (moved "
                                f"or deleted{fix})\n")


def test_a_folder_without_models_is_named(make_trained, tmp_path, capsys):
    """It said 'no models given' of the folder given (search reads the models as predict does)."""
    (tmp_path / "labels.txt").write_text("mine")
    assert main(["probex", "predict", str(tmp_path), "--experts", str(make_trained)]) == 1
    assert capsys.readouterr().err == (f"error: no models found in {tmp_path} (give model files, folders holding "
                                       "them, a zoo manifest or an atlas)\n")


def test_ctrl_c_of_a_retrain_says_whether_this_run_saved_anything(make_trained, tmp_path, monkeypatch, capsys):
    """A retrain into an experts folder stopped before it saved a state said 'progress is kept ...; rerun with
    --resume', which would continue (or refuse) the earlier run."""
    import shutil

    import modelatlas.probex.experts as experts

    out = tmp_path / "experts"
    shutil.copytree(make_trained, out)
    import os

    (out / "checkpoints" / "t0").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "t0" / "train_state.json").touch()
    for old in (out / "checkpoints").glob("*/train_state.*"):
        os.utime(old, (1_000_000_000, 1_000_000_000))  # the earlier run's states, from long ago

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    def saved_then_stopped(manifest, where, *args, **kwargs):
        (out / "checkpoints" / "t1").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "t1" / "train_state.json").write_text("{}")
        raise KeyboardInterrupt

    train = ["probex", "train", "zoo", "--out", str(out), "--rank", "4"]
    monkeypatch.setattr(experts, "train_tree_experts", stopped)
    assert main(train) == 130
    assert capsys.readouterr().err == (f"error: interrupted (stopped before this run saved anything in {out}: run the "
                                       "command again, without --resume)\n")
    assert main(train + ["--resume"]) == 130  # a resume stopped early: the state it resumes is still there
    assert f"progress is kept in {out}; rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(experts, "train_tree_experts", saved_then_stopped)
    assert main(train) == 130
    assert f"progress is kept in {out}; rerun with --resume" in capsys.readouterr().err


def test_train_resume_on_a_new_folder_says_it_starts_from_the_beginning(make_tiny_zoo, make_trained, tmp_path, capsys):
    """--resume with a mistyped --out trained from scratch without a word; a real resume says nothing of it."""
    base = ["probex", "train", str(make_tiny_zoo), "--layer", "layers.1.weight", "--epochs", "1", "--rank", "4"]
    assert main([*base, "--out", str(tmp_path / "typo"), "--resume"]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to resume in {tmp_path / 'typo'}: starting from the beginning\n")
    assert main([*base, "--epochs", "4", "--out", str(make_trained), "--resume"]) == 0
    assert "nothing to resume" not in capsys.readouterr().out


def test_a_search_query_starting_with_a_dash_is_told_to_follow_double_dash(capsys):
    """argparse read the query "-v2" as an option and said only what was missing, not the fix (as for
    `atlas index search`)."""
    with pytest.raises(SystemExit) as e:
        main(["probex", "search", "-v2", "MODELS"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'-v2' was read as an option: put -- before" in err
    assert "atlas probex search -- -v2 ..." in err


def test_train_on_models_without_a_manifest_points_to_writing_one(make_tiny_zoo, tmp_path, capsys):
    """A folder of one's own checkpoints (no manifest.json) was told 'no such manifest (...; build one with `atlas
    zoo make`)', which trains a synthetic zoo: it names the models found and where writing a manifest is shown."""
    import shutil

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("t0.safetensors", "t1-c0003.safetensors"):
        shutil.copy(make_tiny_zoo / name, mine / name)
    assert main(["probex", "train", str(mine), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {mine}: 2 models but no manifest.json, which `atlas probex train` learns from (each "
                   "model's parent, tree and training classes); write one by hand as docs/probex.md shows (\"Your "
                   "own models and labels\"), or build a zoo with `atlas zoo make`\n")
    assert not (tmp_path / "o").exists()


def test_a_base_with_no_adapter_among_the_models_is_warned(make_tiny_zoo, make_trained, capsys):
    """--base merged nothing (no model was an adapter) and said nothing, as if it had been used; `atlas index
    build --base` warns so. (`probex search` reads its models through the same code.)"""
    child, base = make_tiny_zoo / "t1-c0003.safetensors", make_tiny_zoo / "t1.safetensors"
    assert main(["probex", "predict", str(child), "--experts", str(make_trained), "--base", str(base)]) == 0
    assert (f"warning: --base {base}: no PEFT adapter among the models, so none is merged onto it; the models are "
            "read as they are\n") in capsys.readouterr().err


@pytest.mark.parametrize("command, said", [
    (["train"], "or a manifest written by hand for models of your own (docs/probex.md)"),
    (["predict"], "the classes above probability 0.5, most likely first (text experts: the best-matching seen "
                  "prompts). Exit 1 when no model got a prediction."),
    (["predict"], "--top TOP most classes to show per model (default 10); class experts show only those above "
                  "probability 0.5"),
    (["search"], "best first, each with log p(query) and the seen prompt it matches best.")])
def test_help_says_what_the_command_prints(capsys, command, said):
    """predict and search had no description; --top said only classes above 0.5 are shown, which text experts'
    prompts are not held to; train's ZOO_MANIFEST named no manifest of one's own models."""
    with pytest.raises(SystemExit):
        main(["probex", *command, "--help"])
    assert said in " ".join(capsys.readouterr().out.split())


def make_small_atlas(zoo, folder, experts):
    """An atlas of one zoo model built with class experts ``experts``, holding text embeddings (as
    `atlas index build --text-experts` writes them: embeddings.safetensors beside atlas.json and atlas.html)."""
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.lineage.forest import Forest

    entry = ModelEntry("t1-c0003", str(zoo / "t1-c0003.safetensors"), tree=1)
    Atlas([entry], Forest(["t1-c0003"], []), {"classes": {"folder": str(experts), "layer": "layers.1.weight"}},
          {"t1": (["t1-c0003"], torch.ones(1, 4))}).save(folder)
    return folder


def test_an_atlas_file_given_as_a_model_names_the_atlas_folder(make_tiny_zoo, make_trained, tmp_path, capsys):
    """`atlas probex predict my-atlas/atlas.html` said 'unknown checkpoint format'; its embeddings.safetensors
    was read as a model ('not routed ... no tensor named'). The atlas folder itself is read (its models)."""
    atlas = make_small_atlas(make_tiny_zoo, tmp_path / "atl", make_trained)
    for name in ("atlas.html", "embeddings.safetensors"):
        assert main(["probex", "predict", str(atlas / name), "--experts", str(make_trained)]) == 1
        assert capsys.readouterr().err == (f"error: {atlas / name}: a file of the atlas {atlas}, not a model; give the "
                                           f"atlas folder {atlas} (the models it lists are read)\n")
    assert main(["probex", "predict", str(atlas), "--experts", str(make_trained)]) == 0
    assert capsys.readouterr().out.startswith("t1-c0003 [tree t1]: ")


@pytest.mark.parametrize("command", [["predict"], ["search", "digits"]])
def test_an_atlas_given_as_experts_names_the_experts_it_was_built_with(make_tiny_zoo, make_trained, tmp_path, capsys,
                                                                     command):
    """`--experts my-atlas` said 'not an experts folder (no index.json; train one with `atlas probex train`)',
    as of any folder, though the atlas records the experts it used."""
    atlas = make_small_atlas(make_tiny_zoo, tmp_path / "atl", make_trained)
    assert main(["probex", *command, str(make_tiny_zoo), "--experts", str(atlas)]) == 1
    assert capsys.readouterr().err == (f"error: {atlas}: an atlas (`atlas index build`), not an experts folder; pass "
                                       f"the folder `atlas probex train --out` wrote: this atlas used {make_trained} "
                                       "(classes)\n")
