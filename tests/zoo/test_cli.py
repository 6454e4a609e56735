import pytest

from modelatlas.cli.main import main
from modelatlas.zoo import load_manifest


def test_zoo_make_and_show(tmp_path, capsys):
    out = tmp_path / "zoo"
    code = main(["zoo", "make", "--preset", "tiny", "--trees", "1", "--children", "2", "--depth", "1",
                 "--method", "lora", "--storage", "adapter", "--seed", "4", "--workers", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "zoo: 3 models (1 root, 0 full fine-tunes, 2 LoRA)" in text
    manifest = load_manifest(out)
    assert manifest.config["seed"] == 4 and manifest["t0.1"].storage == "adapter"
    assert main(["zoo", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "t0  [root]" in shown and "  t0.1  [lora r=4 adapter]" in shown


def test_zoo_make_says_how_many_models_it_trained_and_reused(tmp_path, capsys):
    """A rerun over a zoo with a damaged model trained it again without a word (`atlas demo` said so)."""
    out = tmp_path / "zoo"
    argv = ["zoo", "make", "--preset", "tiny", "--trees", "1", "--children", "2", "--depth", "1", "--method", "lora",
            "--storage", "adapter", "--seed", "4", "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    assert f"in {out}; trained\n" in capsys.readouterr().out
    adapter = out / "t0.0" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:500])
    assert main(argv) == 0
    assert f"in {out}; trained 1 model, reused 2 (built before)\n" in capsys.readouterr().out
    assert main(argv) == 0
    assert f"in {out}; reused (built before)\n" in capsys.readouterr().out


def test_zoo_verify_finds_changed_and_missing_weights(tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main(["zoo", "make", "--preset", "tiny", "--trees", "1", "--children", "2", "--depth", "1", "--method", "lora",
                 "--storage", "adapter", "--seed", "4", "--workers", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["zoo", "verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("3 models; 3 ok")
    assert main(["zoo", "verify", str(out), "--against", str(out / "manifest.json")]) == 0
    assert "3 same" in capsys.readouterr().out
    adapter = out / "t0.0" / "adapter_model.safetensors"  # adapter storage: the adapter is what is hashed
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last weight
    adapter.write_bytes(bytes(data))
    (out / "t0.1" / "adapter_model.safetensors").unlink()
    assert main(["zoo", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "t0.0: changed" in text and "t0.1: missing" in text and "1 ok, 1 changed, 1 missing" in text
    other = tmp_path / "other"
    assert main(["zoo", "make", "--preset", "tiny", "--trees", "1", "--children", "2", "--depth", "1", "--method", "lora",
                 "--storage", "adapter", "--seed", "5", "--workers", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["zoo", "verify", str(out), "--against", str(other)]) == 1
    assert "t0: different" in capsys.readouterr().out


def test_zoo_errors_are_one_line(tmp_path, capsys):
    assert main(["zoo", "make", "--trees", "0", "--out", str(tmp_path)]) == 1
    assert "error: --trees: must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["zoo", "show", str(tmp_path / "none")]) == 1
    assert "no such manifest" in capsys.readouterr().err
    assert main(["zoo", "presets"]) == 0
    assert "lineage-lora" in capsys.readouterr().out


def test_zoo_make_options_reach_the_config(tmp_path, capsys):
    out = tmp_path / "zoo"
    code = main(["zoo", "make", "--preset", "tiny", "--arch", "vit", "--arch-kwargs", '{"hidden": 8, "n_heads": 2, "intermediate": 8}',
                 "--input-shape", "1,4,4", "--trees", "1", "--children", "1", "--depth", "1",
                 "--task-kinds", "transform", "--workers", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    m = load_manifest(out)
    assert m.config["arch_config"]["input_shape"] == [1, 4, 4] and m.config["arch_config"]["hidden"] == 8
    assert m["t0.0"].task["kind"] == "transform"
    with pytest.raises(SystemExit):
        main(["zoo", "make", "--arch-kwargs", "[1]", "--out", str(out)])
    assert "--arch-kwargs: must be a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", ['{"hidden": -1}', '{"hidden": 0}', '{"hidden": "32"}'])
def test_bad_arch_kwargs_are_one_line_and_write_nothing(tmp_path, capsys, kwargs):
    out = tmp_path / "zoo"
    assert main(["zoo", "make", "--preset", "tiny", "--arch-kwargs", kwargs, "--workers", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --arch-kwargs hidden: must be a positive integer") and err.count("\n") == 1
    assert not out.exists()


def test_a_vit_patch_that_does_not_divide_the_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main(["zoo", "make", "--arch", "vit", "--arch-kwargs", '{"patch_size": 3}', "--out", str(out)]) == 1
    assert "error: --arch-kwargs patch_size: 3 does not divide" in capsys.readouterr().err and not out.exists()


def test_one_fine_tune_is_singular(tmp_path, capsys):
    assert main(["zoo", "make", "--preset", "tiny", "--method", "full", "--trees", "1", "--children", "1",
                 "--depth", "1", "--workers", "1", "--out", str(tmp_path / "zoo")]) == 0
    assert "zoo: 2 models (1 root, 1 full fine-tune, 0 LoRA)" in capsys.readouterr().out


def test_a_star_of_another_depth_is_refused_and_a_tree_preset_becomes_a_star(tmp_path, capsys):
    import argparse

    from modelatlas.cli.zoo import _OPTIONS, _config

    out = tmp_path / "zoo"
    assert main(["zoo", "make", "--shape", "star", "--depth", "3", "--out", str(out)]) == 1
    assert "error: --depth: a star is roots with direct children only (depth 1), got 3" in capsys.readouterr().err
    assert not out.exists()
    args = argparse.Namespace(preset="demo", **{k: None for k in _OPTIONS} | {"shape": "star"})
    assert _config(args).depth == 1  # the preset's depth 2 was not the user's


@pytest.fixture
def small_zoo(tmp_path, make_config):
    """A built 1 root + 2 children zoo folder (a few steps each)."""
    from modelatlas.zoo import make_zoo

    out = tmp_path / "zoo"
    make_zoo(make_config(trees=1, children=2, depth=1), out, workers=1)
    return out


def test_verify_lists_extra_files_and_folders(small_zoo, capsys):
    (small_zoo / "notes.txt").write_text("hi")
    (small_zoo / "stray").mkdir()
    (small_zoo / "t0.1" / "model.bin").write_bytes(b"x")
    assert main(["zoo", "verify", str(small_zoo)]) == 1
    text = capsys.readouterr().out
    assert "notes.txt: extra (not in the manifest)" in text and "stray/: extra" in text
    assert "t0.1/model.bin: extra" in text and text.strip().endswith("3 models; 3 ok, 3 extra files")


def test_verify_and_show_report_an_interrupted_build(small_zoo, capsys):
    import json

    path = small_zoo / "manifest.json"
    data = json.loads(path.read_text())
    data["models"] = data["models"][:1]  # as written after level 0, before the children finished
    path.write_text(json.dumps(data))
    assert main(["zoo", "verify", str(small_zoo)]) == 1
    text = capsys.readouterr().out
    assert "t0.0: not built" in text and "3 models; 1 ok, 2 not built" in text and "extra" not in text
    assert "rerun the same `atlas zoo make` command" in text
    assert main(["zoo", "show", str(small_zoo)]) == 0
    assert "1 of 3 models (unfinished build" in capsys.readouterr().out


def test_verify_against_names_models_only_there_and_another_config(small_zoo, tmp_path, make_config, capsys):
    import json

    from modelatlas.zoo import make_zoo

    part = tmp_path / "part.json"
    data = json.loads((small_zoo / "manifest.json").read_text())
    part.write_text(json.dumps({**data, "models": data["models"][:1]}))
    assert main(["zoo", "verify", str(part), "--against", str(small_zoo)]) == 1
    text = capsys.readouterr().out
    assert "t0.1: only there" in text and "1 same, 2 only there" in text
    other = tmp_path / "other"
    make_zoo(make_config(trees=1, children=2, depth=1, seed=12), other, workers=1)
    assert main(["zoo", "verify", str(small_zoo), "--against", str(other)]) == 1
    assert "was built from another config (seed 11 here, 12 there)" in capsys.readouterr().out


def test_verify_singular_and_empty_manifests(tmp_path, capsys):
    from modelatlas.zoo import Manifest, ModelRecord

    Manifest([ModelRecord("a", "a", None, "a")], {}, tmp_path).save(tmp_path / "manifest.json")
    assert main(["zoo", "verify", str(tmp_path)]) == 1
    assert "1 model; 1 missing" in capsys.readouterr().out
    Manifest([], {}, tmp_path).save(tmp_path / "manifest.json")
    assert main(["zoo", "verify", str(tmp_path)]) == 1
    assert "the manifest lists no models" in capsys.readouterr().err


def test_zoo_make_help_states_every_default():
    from modelatlas.cli.main import build_parser
    from modelatlas.zoo import ZooConfig

    zoo = build_parser()._subparsers._group_actions[0].choices["zoo"]
    make = zoo._subparsers._group_actions[0].choices["make"]
    helps = {a.dest: a.help or "" for a in make._actions}
    for dest in ("arch", "dataset", "arch_kwargs", "input_shape", "shape", "trees", "children", "depth", "method",
                 "storage", "lora_ranks", "task_sampler", "task_kinds", "other_datasets", "seed", "workers"):
        assert "default" in helps[dest], dest  # --trees, --seed, --method... said nothing
    c = ZooConfig()
    assert f"(default {c.trees})" in helps["trees"] and f"(default {c.seed})" in helps["seed"]
    assert f"(default {c.method})" in helps["method"] and ",".join(c.task_kinds) in helps["task_kinds"]


def test_verify_reads_a_model_path_that_is_the_weights_file(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from modelatlas.zoo import Manifest, ModelRecord
    from modelatlas.zoo.store import weights_digest

    save_file({"w": torch.ones(2)}, str(tmp_path / "root.safetensors"))  # as probex families store models
    digest = weights_digest(tmp_path / "root.safetensors")
    Manifest([ModelRecord("root", "root.safetensors", None, "root", sha256=digest)], {}, tmp_path).save(
        tmp_path / "manifest.json")
    assert main(["zoo", "verify", str(tmp_path)]) == 0  # was 'root: missing'
    assert "1 model; 1 ok" in capsys.readouterr().out


@pytest.mark.parametrize("text, said", [("[" * 100_000, "not valid JSON (nested too deeply)"),
                                        ('{"hidden": ' + "1" * 5000 + "}", "not valid JSON (Exceeds the limit")])
def test_arch_kwargs_nested_deeply_or_with_a_huge_integer_are_an_argument_error(tmp_path, capsys, text, said):
    """--arch-kwargs '[[[...' ended in a RecursionError traceback; a 5,000-digit integer was 'invalid
    _json_dict value' followed by the whole 5,000 characters."""
    with pytest.raises(SystemExit) as e:
        main(["zoo", "make", "--arch-kwargs", text, "--out", str(tmp_path / "zoo")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --arch-kwargs: {said}" in err and "_json_dict" not in err
    assert len(err.splitlines()[-1]) < 300


@pytest.mark.parametrize("command", [["zoo", "show"], ["zoo", "verify"], ["probex", "train"]])
def test_a_truth_file_given_for_a_zoo_is_one_line(tmp_path, capsys, command):
    """A plain {"model": "its parent"} file (README's --truth) given where a zoo is needed: zoo show drew
    every model a root, zoo verify listed the folder's files as extra, probex train named 'manifest.json'."""
    truth = tmp_path / "truth.json"
    truth.write_text('{"b": "a", "a": null}')
    out = ["--out", str(tmp_path / "experts")] if command[0] == "probex" else []
    assert main([*command, str(truth), *out]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {truth}: a plain ") and "not a zoo manifest" in err and err.count("\n") == 1


def test_zoo_with_merges_made_shown_verified_and_scored(tmp_path, capsys):
    out = tmp_path / "z"
    assert main(["zoo", "make", "--preset", "tiny", "--trees", "1", "--children", "3", "--depth", "1", "--method", "full",
                 "--merges", "3", "--workers", "1", "--out", str(out)]) == 0
    assert "zoo: 7 models (1 root, 3 full fine-tunes, 0 LoRA, 3 merges)" in capsys.readouterr().out
    assert main(["zoo", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "t0.merge1  [merge]" in shown and "task_arithmetic: -" in shown and " t0.1 + " in shown
    assert shown.startswith(f"{out}: 7 models (3 merged models), arch mlp")
    assert main(["zoo", "verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["lineage", "recover", str(out), "--truth", str(out / "manifest.json")]) == 0
    assert "merges: 3 of 3 found with exactly their parents" in capsys.readouterr().out
    assert main(["lineage", "recover", str(out), "--no-merges", "--truth", str(out / "manifest.json")]) == 0
    assert "merges: 0 of 3 found" in capsys.readouterr().out
