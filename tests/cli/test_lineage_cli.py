import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelatlas.cli.main import main
from modelatlas.lineage.synthetic import make_synthetic_forest
from modelatlas.zoo.manifest import Manifest, ModelRecord, load_manifest
from modelatlas.zoo.store import weights_digest


def make_tiny_zoo(folder, broken=False, digests=False):
    """A synthetic zoo on disk: 2 trees x 2 children x depth 1, safetensors files and a manifest (recording each
    weights file's digest, as a built zoo does, with ``digests``)."""
    weights, parents = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    records = []
    for name, tensors in weights.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
        root = name.split("_")[0]
        records.append(ModelRecord(name, f"{name}.safetensors", parents[name], root))
        if digests:
            records[-1].sha256 = weights_digest(folder / f"{name}.safetensors")
    Manifest(records).save(folder / "manifest.json")
    if broken:
        (folder / "broken.safetensors").write_bytes(b"\xff" * 4)
    return parents


def test_recover_with_truth_and_outputs(tmp_path, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    make_tiny_zoo(zoo, broken=True)
    out = tmp_path / "forest.json"
    code = main(["lineage", "recover", str(zoo), "--truth", str(zoo), "--out", str(out),
                 "--dot", str(tmp_path / "f.dot"), "--mermaid", str(tmp_path / "f.mmd"), "--png", str(tmp_path / "f.png"),
                 "--stage", "specialize"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("skipped broken:") == 1 and "broken.safetensors" in captured.err
    assert "directed-edge accuracy 100.0% (4/4)" in captured.out
    assert "├── t0_0  (" in captured.out and "✓" in captured.out and "✗" not in captured.out
    data = json.loads(out.read_text())
    assert {"parent": "t0", "child": "t0_0"} == {k: v for k, v in data["edges"][0].items() if k in ("parent", "child")}
    assert data["decisions"]["stage"] == "specialize" and data["decisions"]["n_trees"] == 2
    assert data["scores"]["directed_accuracy"] == 1.0
    assert all(0 <= e["score"] <= 1 for e in data["edges"])
    assert (tmp_path / "f.dot").read_text().startswith("digraph")
    assert (tmp_path / "f.mmd").read_text().startswith("graph TD")
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG") and f"wrote {tmp_path / 'f.png'}" in captured.out


def test_files_as_paths_and_options(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    files = sorted(str(p) for p in tmp_path.glob("*.safetensors"))
    code = main(["lineage", "recover", *files, "--trees", "2", "--lambda", "0.5", "--layers", "attn",
                 "--distance", "l2", "--stage", "generalize"])
    out = capsys.readouterr().out
    assert code == 0 and "2 trees (given); stage: generalize (given); distance: l2" in out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["lineage", "recover", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err  # one line: the path's own error (was "skipped: ..." then "error: no models")
    assert err == f"error: {tmp_path / 'nope'}: no such file or folder\n"
    assert main(["lineage", "recover", str(tmp_path / "nope"), str(tmp_path / "gone")]) == 1
    err = capsys.readouterr().err  # several: the first missing one, alone (was two "skipped:" lines, then a summary)
    assert err == f"error: {tmp_path / 'nope'}: no such file or folder\n"
    make_tiny_zoo(tmp_path)
    with pytest.raises(SystemExit) as e:  # a count below 1 is a usage error, found before any weight is read
        main(["lineage", "recover", str(tmp_path), "--trees", "0"])
    assert e.value.code == 2 and "argument --trees: invalid positive integer value: '0'" in capsys.readouterr().err
    assert main(["lineage", "recover", str(tmp_path), "--method", "mother-paper", "--trees", "2"]) == 1
    assert "error: --stage: the mother-paper recipe must be told the stage" in capsys.readouterr().err
    assert main(["lineage", "recover", str(tmp_path), "--lambda", "-1"]) == 1  # the options typed, not fields alone
    assert "error: --lambda must be >= 0" in capsys.readouterr().err
    assert main(["lineage", "recover", str(tmp_path), "--truth", str(tmp_path / "missing.json")]) == 1
    assert "no such manifest" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["lineage", "recover"], ["index", "build", "--out", "ATLAS"]])
def test_a_missing_path_among_good_ones_is_an_error_before_any_model_is_read(tmp_path, capsys, monkeypatch, command):
    """A typo among the paths was a "skipped:" line among the others' output; the run compared the rest, exit 0."""
    import modelatlas.weights.registry as registry

    (tmp_path / "zoo").mkdir()
    make_tiny_zoo(tmp_path / "zoo")
    monkeypatch.setattr(registry, "open_checkpoint", lambda *a, **k: pytest.fail("a model was read"))
    argv = [str(tmp_path / "atlas") if a == "ATLAS" else a for a in command]
    assert main([*argv, str(tmp_path / "zoo"), str(tmp_path / "zoo" / "t0_9.safetensors")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {tmp_path / 'zoo' / 't0_9.safetensors'}: no such file or folder\n"
    assert captured.out == "" and not (tmp_path / "atlas").exists()
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a link whose target is gone: no model given either
    assert main([*argv, str(tmp_path / "zoo"), str(tmp_path / "link")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'link'}: a link to {tmp_path / 'gone'}, which does not exist\n"


def test_empty_folder_beside_models_is_reported(tmp_path, capsys):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "empty").mkdir()
    make_tiny_zoo(tmp_path / "zoo")
    assert main(["lineage", "recover", str(tmp_path / "zoo"), str(tmp_path / "empty")]) == 0
    assert f"skipped: {tmp_path / 'empty'}: no models found there" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "zoo"), "--preset", "tiny", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "directed-edge accuracy" in out and "tree ARI" in out and "\ntrained in " in out
    assert main(["demo", "--out", str(tmp_path / "zoo"), "--preset", "tiny", "--workers", "1"]) == 0
    assert "\nreused (built before) in " in capsys.readouterr().out  # a second run trains nothing



def make_chain_forest(stage_confidence: float, given: bool = False):
    from modelatlas.lineage.forest import Edge, Forest

    decisions = {"stage": "specialize", "stage_confidence": stage_confidence, "stage_given": given,
                 "n_trees": 1, "n_trees_given": False, "distance": "l2"}
    return Forest(["a", "b", "c"], [Edge("a", "b", 0.5), Edge("b", "c", 0.5)], decisions, [["a", "b", "c"]])


def test_show_forest_warns_when_stage_is_a_guess(capsys):
    from modelatlas.cli.lineage import show_forest

    show_forest(make_chain_forest(0.5))
    err = capsys.readouterr().err
    assert "no evidence of the training stage" in err and "--stage" in err
    for forest in (make_chain_forest(0.9), make_chain_forest(0.5, given=True)):
        show_forest(forest)
        assert "no evidence" not in capsys.readouterr().err


def test_show_forest_warns_when_the_stage_rests_on_least_squares_stand_ins(capsys):
    """lineage.stage counted stand-ins' biased kurtosis (too few models read as they are): say so, name --stage."""
    from modelatlas.cli.lineage import show_forest

    forest = make_chain_forest(0.9)
    forest.decisions["stage_from_stand_ins"] = 1
    show_forest(forest)
    err = capsys.readouterr().err
    assert "stage of 1 tree was read from quantized files" in err and "--stage specialize|generalize" in err
    show_forest(make_chain_forest(0.9))
    assert "least squares" not in capsys.readouterr().err


def test_summary_counts_agree_in_number(capsys):
    from modelatlas.cli.lineage import show_forest

    show_forest(make_chain_forest(0.9))
    assert "\n3 models, 1 tree (found from the data); stage" in capsys.readouterr().out


def test_truth_of_other_models_is_an_error_before_recovery(tmp_path, capsys):
    (tmp_path / "zoo").mkdir()
    make_tiny_zoo(tmp_path / "zoo")
    Manifest([ModelRecord("u", "u.safetensors", None, "u")]).save(tmp_path / "other.json")
    assert main(["lineage", "recover", str(tmp_path / "zoo"), "--truth", str(tmp_path / "other.json")]) == 1
    err = capsys.readouterr().err
    assert "error: none of the 6 models" in err and "other.json" in err and err.count("\n") == 1


def test_a_subset_of_a_zoo_is_scored_on_its_own_edges(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    files = [str(tmp_path / f"{n}.safetensors") for n in ("t0", "t0_0", "t0_1", "t1_0")]
    assert main(["lineage", "recover", *files, "--truth", str(tmp_path), "--stage", "specialize", "--trees", "2"]) == 0
    out = capsys.readouterr().out
    assert "(2/2)" in out and "2 true edges not scored (a model not given)" in out, out
    assert "t1_0  [tree 2, 1 model" in out


def test_an_identical_copy_sorting_first_keeps_the_true_model_in_place(tmp_path, capsys):
    import shutil

    make_tiny_zoo(tmp_path)
    shutil.copy(tmp_path / "t0_0.safetensors", tmp_path / "a-copy.safetensors")  # sorts before t0_0
    assert main(["lineage", "recover", str(tmp_path), "--truth", str(tmp_path), "--stage", "specialize"]) == 0
    out = capsys.readouterr().out
    assert "directed-edge accuracy 100.0% (4/4)" in out
    assert "a-copy  (identical weights to t0_0)" in out and "t0_0  (" in out


def test_demo_on_an_adapter_preset_merges_adapters_onto_their_parents(tmp_path, capsys, monkeypatch):
    from modelatlas.zoo import config

    monkeypatch.setitem(config._PRESETS, "tiny-adapter", dict(
        arch_kwargs={"hidden": 8, "n_hidden": 2}, trees=1, children=2, depth=2, method="lora", storage="adapter",
        root_steps=(5, 8), ft_steps=(3, 5), eval_samples=50))
    assert main(["demo", "--preset", "tiny-adapter", "--workers", "1", "--out", str(tmp_path / "zoo")]) == 0
    captured = capsys.readouterr()
    assert "skipped" not in captured.err and "/6)" in captured.out and "7 models" in captured.out


def test_demo_into_a_folder_of_another_zoo_names_real_options(tmp_path, capsys):
    """The message used to suggest `--no-resume`, which `atlas demo` does not have."""
    t0 = tmp_path / "zoo" / "t0"
    t0.mkdir(parents=True)
    (t0 / "model.safetensors").write_bytes(b"")
    (t0 / "zoo_record.json").write_text(json.dumps({"fingerprint": "other", "record": {"storage": "full"}}))
    assert main(["demo", "--preset", "tiny", "--workers", "1", "--out", str(tmp_path / "zoo")]) == 1
    err = capsys.readouterr().err
    assert "t0: built from a different zoo config" in err and "choose another output folder (--out)" in err
    assert "pass resume=False (--no-resume)" not in err


def test_no_stage_warning_for_a_single_model(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    assert main(["lineage", "recover", str(tmp_path / "t0.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "1 model, 1 tree" in captured.out and "warning" not in captured.err


def test_no_true_edge_to_score_says_so_and_no_accuracy(tmp_path, capsys):
    """Two roots given, no true edge between them: the line read "100.0% (0/0)" and the JSON 1.0."""
    make_tiny_zoo(tmp_path)
    out = tmp_path / "f.json"
    assert main(["lineage", "recover", str(tmp_path / "t0.safetensors"), "--truth", str(tmp_path),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "directed-edge accuracy: nothing to score (no true edge between the models given), tree ARI" in printed
    assert "100.0%" not in printed and "(0/0)" not in printed
    scores = json.loads(out.read_text())["scores"]
    assert scores["directed_accuracy"] is None and scores["undirected_accuracy"] is None
    assert scores["true_edges"] == 0


def test_bad_output_paths_are_refused_before_recovery(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["lineage", "recover", str(tmp_path), "--out", ""])
    assert e.value.code == 2 and "invalid output file value: ''" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # it wrote a file named '-'
        main(["lineage", "recover", str(tmp_path), "--mermaid", "-"])
    assert e.value.code == 2 and "'-' (standard output is not supported: name a file)" in capsys.readouterr().err
    for opt, path, said in (("--out", tmp_path / "sub", "is a folder; name a file to write"),
                            ("--dot", tmp_path / "manifest.json" / "x.dot", "lies below the file")):
        assert main(["lineage", "recover", str(tmp_path), opt, str(path)]) == 1
        out, err = capsys.readouterr()
        assert err.startswith(f"error: {opt} {path} ") and said in err and err.count("\n") == 1
        assert out == ""  # refused before the recovery drew anything


def test_an_output_that_would_overwrite_an_input_is_refused_before_recovery(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    (tmp_path / "hf").mkdir()
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    model = tmp_path / "t0.safetensors"
    before = model.read_bytes()
    for opts, said in ((["--out", str(model)], f"--out {model} would overwrite the model {model};"),
                       (["--out", str(tmp_path / "manifest.json")], "would overwrite the --truth manifest;"),
                       (["--dot", str(tmp_path / "hf" / "config.json")], f"the model {tmp_path / 'hf'};"),
                       (["--dot", str(tmp_path / "f"), "--mermaid", str(tmp_path / "f")], "would overwrite the --dot file;")):
        assert main(["lineage", "recover", str(tmp_path), "--truth", str(tmp_path), *opts]) == 1
        out, err = capsys.readouterr()
        assert said in err and err.count("\n") == 1 and out == ""  # refused before the recovery drew anything
    assert model.read_bytes() == before  # the model was replaced by the forest's JSON


def test_an_output_over_the_manifest_of_a_given_zoo_is_refused(tmp_path, capsys):
    """Without --truth, `--out zoo/manifest.json` replaced the zoo's manifest (its true lineage, tasks and
    config) with the recovered forest."""
    make_tiny_zoo(tmp_path)
    before = (tmp_path / "manifest.json").read_bytes()
    for given in ([str(tmp_path)], [str(tmp_path / "t0.safetensors"), str(tmp_path / "t1.safetensors")]):
        assert main(["lineage", "recover", *given, "--out", str(tmp_path / "manifest.json")]) == 1
        out, err = capsys.readouterr()
        assert f"would overwrite the zoo manifest {tmp_path / 'manifest.json'};" in err and out == ""
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_a_model_reached_from_two_arguments_is_one_model(tmp_path, capsys, monkeypatch):
    make_tiny_zoo(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["lineage", "recover", ".", "t0.safetensors", "./t0.safetensors", str(tmp_path / "t1.safetensors")]) == 0
    out, err = capsys.readouterr()  # was: "model names must be unique; ['t0'] appear more than once"
    assert "6 models, 2 trees" in out and err == ""


def test_a_model_folder_without_weights_is_reported_as_skipped(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    (tmp_path / "t9").mkdir()
    (tmp_path / "t9" / "config.json").write_text("{}")  # an unfinished download: was left out without a word
    assert main(["lineage", "recover", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "6 models" in out and f"skipped t9: {tmp_path / 't9'}: has config.json but no weights file" in err


def test_hub_ids_are_matched_to_a_truth_naming_them(tmp_path, capsys, monkeypatch):
    weights, parents = make_synthetic_forest(n_trees=1, children=1, depth=1, seed=3)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    for name, tensors in weights.items():  # huggingface_hub's layout: refs/main -> snapshots/<commit>/
        repo = tmp_path / "hub" / f"models--org--{name}"
        (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
        save_file(tensors, str(repo / "snapshots" / ("a" * 40) / "model.safetensors"))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("a" * 40)
    Manifest([ModelRecord(f"org/{n}", n, p and f"org/{p}", "t") for n, p in parents.items()]).save(tmp_path / "m.json")
    ids = [f"org/{n}" for n in weights]
    assert main(["lineage", "recover", *ids, "--truth", str(tmp_path / "m.json"), "--stage", "specialize"]) == 0
    out = capsys.readouterr().out  # was "none of the 2 models (t0, t0_0) are named in m.json"
    assert "directed-edge accuracy 100.0% (1/1)" in out


def test_base_merges_adapters_onto_it_and_joins_the_models(tmp_path, capsys, make_adapter_family):
    fam = make_adapter_family(tmp_path / "fam")
    assert main(["lineage", "recover", str(fam / "a0"), str(fam / "a1"), str(fam / "a2"), "--stage", "specialize",
                 "--base", str(fam / "base.safetensors"), "--out", str(tmp_path / "f.json")]) == 0
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["nodes"][0] == "base" and sorted(data["nodes"]) == ["a0", "a1", "a2", "base"] and not data["skipped"]
    assert {(e["parent"], e["child"]) for e in data["edges"]} == {("base", "a0"), ("base", "a1"), ("base", "a2")}
    assert main(["lineage", "recover", str(fam)]) == 0  # without --base: the adapters hold no model
    assert capsys.readouterr().err.count("give the base model it was trained on (--base MODEL on the command line") == 3


def test_base_is_the_root_whatever_the_kurtosis_says(tmp_path, capsys, make_adapter_family):
    fam = make_adapter_family(tmp_path / "fam")  # generalize (auto's stage until the known descents voted, which
    # now make it specialize): the kurtosis votes chose a2, and drew base below it
    assert main(["lineage", "recover", str(fam / "a0"), str(fam / "a1"), str(fam / "a2"), "--stage", "generalize",
                 "--base", str(fam / "base.safetensors"), "--out", str(tmp_path / "f.json")]) == 0
    assert capsys.readouterr().out.startswith("base  [tree 1, 4 models; root confidence 1.00]\n")
    data = json.loads((tmp_path / "f.json").read_text())
    assert {(e["parent"], e["child"]) for e in data["edges"]} == {("base", "a0"), ("base", "a1"), ("base", "a2")}
    assert data["decisions"]["adapter_base"] == {"base": "base", "merged": ["a0", "a1", "a2"],
                                                 "root_by_weights": "a2", "apart": []}
    assert main(["lineage", "recover", str(fam / "a0"), "--base", str(fam / "base.safetensors")]) == 0
    out, err = capsys.readouterr()
    assert "edge directions are a guess" not in err  # base -> a0: known
    assert "(from the weights, 1 known descent among them, confidence" in out  # and it voted on the stage
    assert main(["lineage", "recover", str(fam), "--base", str(fam / "base.safetensors"), "--trees", "2"]) == 0
    assert "a1: merged onto base (--base), but placed in another tree: --trees split them" in capsys.readouterr().err
    from modelatlas.weights import open_checkpoint

    with open_checkpoint(fam / "a0", base=fam / "base.safetensors") as merged:  # the same models, stored merged
        save_file({t.name: merged.read(t.name) for t in merged.tensors()}, str(tmp_path / "a0.safetensors"))
    assert main(["lineage", "recover", str(fam / "base.safetensors"), str(tmp_path / "a0.safetensors")]) == 0
    assert "edge directions are a guess" in capsys.readouterr().err  # no base given: the direction is a guess


@pytest.mark.parametrize("base, words", [("a0", ": a lora delta (an adapter), not a full model"),
                                         (".", ": give one base model (a file, model folder or hub id), not a folder of 4")])
def test_base_must_be_one_full_model(tmp_path, capsys, base, words, make_adapter_family):
    fam = make_adapter_family(tmp_path / "fam")
    assert main(["lineage", "recover", str(fam), "--base", str(fam / base)]) == 1
    err = capsys.readouterr().err
    assert f"error: --base {fam / base}" in err and words in err


def test_truth_scores_models_given_under_other_names(tmp_path, capsys):
    zoo, other = tmp_path / "zoo", tmp_path / "other"
    zoo.mkdir()
    other.mkdir()
    make_tiny_zoo(zoo, digests=True)
    (other / "t0.safetensors").write_bytes((zoo / "t1.safetensors").read_bytes())  # "t0" now names two models
    (zoo / "t1_0.safetensors").rename(other / "mine.safetensors")  # a renamed copy
    assert main(["lineage", "recover", str(zoo), str(other), "--truth", str(zoo), "--stage", "specialize"]) == 0
    captured = capsys.readouterr()
    assert "under another name: mine = t1_0, zoo/t0 = t0\n" in captured.err  # other/t0: a copy of t1, given
    assert "directed-edge accuracy 100.0% (4/4)" in captured.out and "not in truth" not in captured.out


def test_an_output_below_a_symbolic_link_to_nothing_is_refused_before_the_recovery(tmp_path, capsys):
    """'error: zz: File exists' came after the whole recovery."""
    make_tiny_zoo(tmp_path)
    (tmp_path / "zz").symlink_to(tmp_path / "unmounted" / "disk")
    assert main(["lineage", "recover", str(tmp_path), "--out", str(tmp_path / "zz" / "f.json")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: --out {tmp_path / 'zz' / 'f.json'} lies below the "
                                                          f"symbolic link {tmp_path / 'zz'} to the missing ")


def test_truth_names_a_model_whose_file_name_is_spelt_in_another_unicode_form(tmp_path, capsys):
    """The manifest names t1_\u00e9 composed (NFC, no digests); its file, unzipped from macOS, is decomposed
    (NFD, e + U+0301): the same name, scored, and the note says why the two look alike."""
    make_tiny_zoo(tmp_path)
    load_manifest(tmp_path).renamed({"t1_0": "t1_\u00e9"}).save(tmp_path / "manifest.json")
    (tmp_path / "t1_0.safetensors").rename(tmp_path / "t1_e\u0301.safetensors")
    assert main(["lineage", "recover", str(tmp_path), "--truth", str(tmp_path), "--stage", "specialize"]) == 0
    captured = capsys.readouterr()
    assert "under another name: t1_e\u0301 = t1_\u00e9 (one name in two Unicode forms)\n" in captured.err
    assert "directed-edge accuracy 100.0% (4/4)" in captured.out and "not in truth" not in captured.out


def test_a_model_named_by_bytes_that_are_not_utf8_is_recovered_shown_and_saved(tmp_path, capsys, non_utf8_name):
    """Such a model was skipped (safetensors refused its path); once read, its name ended the UTF-8 print, the
    DOT/Mermaid write (UnicodeEncodeError) and the PNG (TypeError). The terminal and text files show the byte as
    \\xe9; the JSON keeps the name itself (\\udce9), which reads back as the model's name."""
    from modelatlas.lineage.forest import Forest

    make_tiny_zoo(tmp_path)
    (tmp_path / "t0_0.safetensors").rename(tmp_path / f"{non_utf8_name}.safetensors")
    out = {ext: tmp_path / f"f.{ext}" for ext in ("json", "dot", "mmd", "png")}
    code = main(["lineage", "recover", str(tmp_path), "--stage", "specialize", "--out", str(out["json"]),
                 "--dot", str(out["dot"]), "--mermaid", str(out["mmd"]), "--png", str(out["png"])])
    captured = capsys.readouterr()
    assert code == 0 and "skipped" not in captured.err
    assert "t0  [tree 1, 3 models" in captured.out and "├── m\\xe9  (" in captured.out  # in its true place
    assert non_utf8_name in Forest.load(out["json"]).nodes and "\\udce9" in out["json"].read_text()
    assert '"m\\xe9"' in out["dot"].read_text() and '["m\\xe9"]' in out["mmd"].read_text()
    assert out["png"].read_bytes().startswith(b"\x89PNG")


def test_a_model_named_with_a_newline_is_reported_on_one_line(tmp_path, capsys):
    """'skipped bad<newline>name: ...' was two lines: note / warn / error keep every message on its line."""
    make_tiny_zoo(tmp_path)
    (tmp_path / "bad\nname.safetensors").write_bytes(b"\xff" * 4)
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize"]) == 0
    err = capsys.readouterr().err
    assert "skipped bad\\nname: " in err and "\nname" not in err


@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="needs Linux's /proc")
@pytest.mark.parametrize("option", ["--out", "--dot", "--mermaid", "--png"])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_recovery(tmp_path, capsys, option):
    """`--out /proc/version` failed with '/proc/version: No such file or directory' after the whole recovery."""
    make_tiny_zoo(tmp_path)
    assert main(["lineage", "recover", str(tmp_path), option, "/proc/version"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {option} /proc/version cannot be written: no file can be made in /proc (it "
                                 "takes no new files); choose another path\n")


def test_truth_of_another_zoo_with_the_same_names_says_the_weights_differ(tmp_path, capsys):
    """Scored by name alone, the models of zoo B against zoo A's manifest read 0 % with no hint why."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_tiny_zoo(a, digests=True)
    for r in load_manifest(a).models:  # zoo B: the same names, other weights (one of them at the recorded size)
        w = {k: v + 1 for k, v in load_file(a / r.path).items()}
        save_file(w, str(b / r.path))
    assert main(["lineage", "recover", str(b), "--truth", str(a), "--stage", "specialize"]) == 0
    err = capsys.readouterr().err
    assert "--truth: t0, t0_0, t0_1, ... (6 in all): named in the manifest, but with other weights than it " \
           "records (another zoo's manifest?); edges are scored by name" in err
    assert main(["lineage", "recover", str(a), "--truth", str(a), "--stage", "specialize"]) == 0
    assert "other weights" not in capsys.readouterr().err  # the zoo's own models


def test_truth_of_models_saved_again_with_other_metadata_says_no_other_weights(tmp_path, capsys):
    """The same tensors re-saved without (or with other) safetensors metadata were called "other weights than it
    records (another zoo's manifest?)": the recorded digest covers the file's bytes, not its tensors."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_tiny_zoo(a, digests=True)
    for r in load_manifest(a).models:
        save_file(dict(reversed(load_file(a / r.path).items())), str(b / r.path), metadata={"format": "pt"})
    assert main(["lineage", "recover", str(b), "--truth", str(a), "--stage", "specialize"]) == 0
    assert "--truth:" not in capsys.readouterr().err
    (a / "t0.safetensors").unlink()  # the zoo's own file gone: only the file's digest can be compared
    assert main(["lineage", "recover", str(b), "--truth", str(a), "--stage", "specialize"]) == 0
    assert ("--truth: t0: named in the manifest, but with another weights file than the digest it records (another "
            "zoo's manifest, or the same model saved again? the zoo's own file is not there to compare tensors); "
            "edges are scored by name") in capsys.readouterr().err


def test_an_out_file_of_another_kind_is_not_replaced(tmp_path, capsys):
    """`--out runs/dm10/result.json` replaced a distillation's result with the forest, silently; a forest an
    earlier recovery wrote, or an empty file, is rewritten."""
    zoo, out = tmp_path / "zoo", tmp_path / "result.json"
    zoo.mkdir()
    make_tiny_zoo(zoo)
    out.write_text('{"method": "dm", "evaluation": {"mean": 88.6}}')
    assert main(["lineage", "recover", str(zoo), "--out", str(out)]) == 1
    stdout, err = capsys.readouterr()
    assert err == (f"error: --out {out} holds another file than a lineage forest (JSON with 'nodes' and 'edges'), "
                   "which it would replace; choose another file, or delete it first\n") and stdout == ""
    assert json.loads(out.read_text())["method"] == "dm"
    for before in ("", None):  # empty, then the forest just written
        if before is not None:
            out.write_text(before)
        assert main(["lineage", "recover", str(zoo), "--out", str(out)]) == 0
        assert set(json.loads(out.read_text())) >= {"nodes", "edges"}


@pytest.mark.parametrize("command", [["lineage", "recover"], ["index", "build"]])
def test_a_missing_base_is_named_before_the_adapter_zoo_note(tmp_path, capsys, command):
    """`--base nope` on adapters of a zoo printed the zoo's note ('not all on --base: t0.0 is on t0') before
    the error that --base does not exist (`index build`'s error did not name --base)."""
    from tests.zoo.conftest import _config

    from modelatlas.zoo import make_zoo

    zoo = tmp_path / "az"
    make_zoo(_config(trees=1, depth=1, method="lora", storage="adapter", lora_ranks=(2,)), zoo, workers=1)
    assert main([*command, str(zoo / "t0.0"), str(zoo / "t0.1"), "--base", "nope",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --base nope: no such file or folder") and err.count("\n") == 1, err


def test_a_base_with_no_adapter_among_the_models_changes_nothing_and_says_so(tmp_path, capsys):
    """--base with no adapter among the paths rooted the base's tree and dropped that tree's stage evidence
    (a tiny zoo's stage confidence 0.88 -> 0.73, its root confidence -> 1.0), without a word."""
    import json

    from tests.zoo.conftest import _config

    from modelatlas.zoo import make_zoo

    zoo = tmp_path / "zoo"
    make_zoo(_config(trees=2, depth=1, method="full"), zoo, workers=1)
    assert main(["lineage", "recover", str(zoo), "--out", str(tmp_path / "plain.json")]) == 0
    assert "--base" not in capsys.readouterr().err
    assert main(["lineage", "recover", str(zoo), "--base", str(zoo / "t0"), "--out", str(tmp_path / "base.json")]) == 0
    err = capsys.readouterr().err
    assert f"warning: --base {zoo / 't0'}: no PEFT adapter among the models, so none is merged onto it" in err
    plain, based = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "base.json"))
    assert based == plain and "adapter_base" not in based["decisions"]


@pytest.mark.parametrize("opts, said", [
    (["--png", "forest.mmd"], "error: --png forest.mmd: --png writes a PNG image; name it forest.png (--mermaid writes "
                              "the .mmd file)\n"),
    (["--png", "forest"], "error: --png forest: --png writes a PNG image; name it forest.png\n"),
    (["--mermaid", "forest.png"], "error: --mermaid forest.png: --mermaid writes a Mermaid graph, not an image; name "
                                  "it forest.mmd (--png draws the forest as a PNG image)\n"),
    (["--out", "f.PNG"], "error: --out f.PNG: --out writes the forest as JSON, not an image; name it f.json (--png "
                         "draws the forest as a PNG image)\n")])
def test_an_output_named_for_another_format_is_refused_before_the_recovery(tmp_path, capsys, monkeypatch, opts, said):
    """`--png forest.mmd` wrote the PNG image under the Mermaid file's name without a word."""
    make_tiny_zoo(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["lineage", "recover", str(tmp_path), *opts]) == 1
    assert capsys.readouterr() == ("", said) and not (tmp_path / opts[1]).exists()


def test_other_suffixes_of_the_text_outputs_and_an_upper_case_png_are_written(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    files = {"--dot": tmp_path / "f.gv", "--mermaid": tmp_path / "f.md", "--png": tmp_path / "f.PNG"}
    assert main(["lineage", "recover", str(tmp_path), *(str(x) for kv in files.items() for x in kv)]) == 0
    assert all(f.is_file() for f in files.values()) and files["--png"].read_bytes()[:4] == b"\x89PNG"


def test_a_merged_model_is_drawn_with_its_parents_unless_no_merges(tmp_path, capsys):
    make_tiny_zoo(tmp_path)
    a, b = load_file(str(tmp_path / "t0_0.safetensors")), load_file(str(tmp_path / "t0_1.safetensors"))
    save_file({k: 0.25 * a[k] + 0.75 * b[k] for k in a}, str(tmp_path / "soup.safetensors"))
    out = tmp_path / "forest.json"
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "└── soup  (merge: 0.75 t0_1 + 0.25 t0_0)" in text or "├── soup  (merge: 0.75 t0_1 + 0.25 t0_0)" in text
    assert "7 models, 1 of them a merge of others (each beside its most weighted parent), 2 trees" in text
    data = json.loads(out.read_text())
    assert data["decisions"]["model_merges"]["soup"]["parents"] == ["t0_1", "t0_0"]
    assert [e["kind"] for e in data["edges"] if e["child"] == "soup"] == ["merge"]
    assert main(["lineage", "recover", str(tmp_path), "--stage", "specialize", "--no-merges"]) == 0
    assert "merge:" not in capsys.readouterr().out
