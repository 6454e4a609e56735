"""``atlas index build | show | search`` on a synthetic forest (known parents)."""

import json

import pytest
from safetensors.torch import save_file

from modelatlas.cli.main import main
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_models(folder):
    weights, parents = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=7)
    folder.mkdir()
    for name, tensors in weights.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"\xff" * 4)
    return parents


def test_build_show_search(tmp_path, capsys):
    parents = make_models(tmp_path / "m")
    out = tmp_path / "atl"
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    captured = capsys.readouterr()
    assert "warning: broken: unreadable: " in captured.err
    assert "├── t0_0  (" in captured.out and f"atlas written to {out}" in captured.out
    assert "7 models, 2 trees (1 in none); stage: specialize" in captured.out
    assert "not in any tree" not in captured.out  # build warns the notes on stderr instead
    data = json.loads((out / "atlas.json").read_text())
    assert {m["name"]: m["parent"] for m in data["models"] if m["tree"]} == parents
    assert (out / "atlas.html").exists() and not (out / "embeddings.safetensors").exists()
    assert main(["index", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "t1  [tree 2, 3 models; root confidence" in shown
    assert "\nnot in any tree (1):\n  broken: unreadable: " in shown and "notes (" not in shown
    assert main(["index", "search", "t1_0", str(out), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("1. t1_0  keyword score 4.000  (tree 2, parent t1)")  # t1, 0 and the whole name
    assert "keyword score 1.000" in lines[1] and len(lines) == 2  # one word of two: t1, t1_1, t0_0 tie


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["index", "show", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'atlas.json'}: no atlas here")
    for command in (["show"], ["search", "t0"]):  # a mistyped folder said "nope/atlas.json: no atlas here"
        assert main(["index", *command, str(tmp_path / "nope")]) == 1
        assert capsys.readouterr().err == (f"error: {tmp_path / 'nope'}: no such folder (build an atlas with `atlas "
                                           "index build PATH... --out DIR`)\n")
    make_models(tmp_path / "m")
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "a"), "--experts",
                 str(tmp_path / "none")]) == 1
    assert f"{tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["index", "search", "zzz", str(tmp_path / "a")]) == 1
    assert "no model matches 'zzz'" in capsys.readouterr().out
    # a free-text query on an atlas without text embeddings is looked up as keywords, and says so (it said only
    # "no model matches"); --mode keywords asked for that
    assert main(["index", "search", "a handwritten seven", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().out == ("no model matches 'a handwritten seven' (searched as keywords: this atlas was "
                                       "built without --text-experts, which free-text search needs)\n")
    assert main(["index", "search", "zzz", str(tmp_path / "a"), "--mode", "keywords"]) == 1
    assert capsys.readouterr().out == "no model matches 'zzz'\n"
    assert main(["index", "search", "x", str(tmp_path / "a"), "--mode", "text"]) == 1
    assert "no text embeddings" in capsys.readouterr().err


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    make_models(tmp_path / "m")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "atl"):
        assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert "not a folder; choose a new --out" in err and "File exists" not in err


def test_out_that_is_a_file_is_refused_before_the_work(tmp_path):
    from modelatlas.atlas.index import check_atlas_folder
    from modelatlas.errors import AtlasError

    (tmp_path / "file").write_text("x")
    with pytest.raises(AtlasError, match=r"file is a file, not a folder"):
        check_atlas_folder(tmp_path / "file")
    with pytest.raises(AtlasError, match=r"lies below the file .*file, not a folder"):
        check_atlas_folder(tmp_path / "file" / "atl")


def test_hand_edited_atlas_is_one_line(tmp_path, capsys):
    make_models(tmp_path / "m")
    out = tmp_path / "atl"
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    data = json.loads((out / "atlas.json").read_text())
    data["models"][1]["parameters"] = "4k"
    (out / "atlas.json").write_text(json.dumps(data))
    for argv in (["index", "show", str(out)], ["index", "search", "t0", str(out)]):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err == f"error: {out / 'atlas.json'}: models[1].parameters must be an integer; got '4k'\n"


def test_failing_rebuild_leaves_the_old_atlas(tmp_path, capsys):
    make_models(tmp_path / "m")
    out = tmp_path / "atl"
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--experts", str(tmp_path / "none")]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    capsys.readouterr()
    assert main(["index", "show", str(out)]) == 0
    assert "7 models, 2 trees (1 in none)" in capsys.readouterr().out


def test_show_lists_the_notes_of_placed_models(tmp_path, capsys):
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.lineage.forest import Edge, Forest

    models = [ModelEntry("a", "/z/a"), ModelEntry("b", "/z/b", notes=["classes experts: in no known tree"]),
              ModelEntry("c", "/z/c", notes=["lineage skipped it: an adapter"]), ModelEntry("d", "/z/d")]
    Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)])).save(tmp_path / "atl")
    assert main(["index", "show", str(tmp_path / "atl")]) == 0
    out = capsys.readouterr().out
    assert ("not in any tree (2):\n  c: lineage skipped it: an adapter\n  d: no reason recorded\n"
            "notes (1 model):\n  b: classes experts: in no known tree\n4 models, 1 tree (2 in none)") in out


def test_a_model_with_no_class_above_one_half_says_so(tmp_path, capsys):
    """Its expert saw it, but no class passed 0.5: `show` printed no label and no note, `search` no label."""
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.lineage.forest import Edge, Forest

    note = "classes experts: no class above 0.5; most probable 3 (0.42)"
    models = [ModelEntry("a", "/z/a", tree=1, expert_tree="t0", predicted=[["7", 0.9]]),
              ModelEntry("b", "/z/b", tree=1, parent="a", expert_tree="t0", predicted=[], notes=[note])]
    Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)]), {"classes": {"folder": "/x", "layer": "w"}}).save(
        tmp_path / "atl")
    assert main(["index", "show", str(tmp_path / "atl")]) == 0
    out = capsys.readouterr().out
    assert "a  [7]\n" in out and "└── b  (0.50)  [no class above 0.5]\n" in out
    assert f"notes (1 model):\n  b: {note}\n2 models, 1 tree; " in out and out.endswith("; 1 described by experts\n")
    assert main(["index", "search", "b", str(tmp_path / "atl")]) == 0
    assert capsys.readouterr().out.endswith("(tree 1, parent a)  [no class above 0.5]\n")


def test_a_model_with_classes_and_a_description_shows_both(tmp_path, capsys):
    """An atlas built with --experts and --text-experts showed a model's classes only: `search "dogs"` listed it
    for its description "dogs", shown nowhere (the page's filter likewise)."""
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.atlas.html import _pred_text
    from modelatlas.lineage.forest import Edge, Forest

    said = [["dogs", 0.9], ["fish", 0.1]]
    models = [ModelEntry("a", "/z/a", tree=1, expert_tree="t", predicted=[["1", 1.0], ["2", 0.99]], described=said),
              ModelEntry("b", "/z/b", tree=1, parent="a", expert_tree="t", predicted=[], described=said)]
    Atlas(models, Forest(["a", "b"], [Edge("a", "b", 0.5)]), {"classes": {"folder": "/x", "layer": "w"}}).save(
        tmp_path / "atl")
    assert main(["index", "search", "dogs", str(tmp_path / "atl"), "--mode", "keywords"]) == 0
    out = capsys.readouterr().out
    assert '(tree 1, root)  [1, 2] "dogs" (0.90)\n' in out
    assert '(tree 1, parent a)  [no class above 0.5] "dogs" (0.90)\n' in out
    assert [_pred_text(m) for m in models] == ["1 1.00, 2 0.99; dogs 0.90", "no class above 0.5; dogs 0.90"]


def test_search_says_a_model_in_no_tree_is_in_none(tmp_path, capsys):
    """An unreadable model found by its name was listed as "(tree None, root)"."""
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.lineage.forest import Forest

    models = [ModelEntry("a", "/z/a", tree=1), ModelEntry("broken", "/z/broken", notes=["unreadable: truncated"])]
    Atlas(models, Forest(["a"], [])).save(tmp_path / "atl")
    assert main(["index", "search", "broken", str(tmp_path / "atl")]) == 0
    assert capsys.readouterr().out == "  1. broken  keyword score 3.000  (in no tree)\n"


def test_build_refuses_a_folder_that_holds_no_atlas(tmp_path, capsys):
    make_models(tmp_path / "m")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for out in (tmp_path / "busy", tmp_path / "m"):
        assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 1
        assert capsys.readouterr().err == (f"error: --out {out} is a non-empty folder that holds no atlas (atlas.json): "
                                           "the atlas's files would mix with its files; choose a new or empty --out\n")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "a"), "--stage", "specialize"]) == 0
    (tmp_path / "a" / "mine.txt").write_text("kept")  # a folder with an atlas is ours to rebuild
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "a"), "--stage", "specialize"]) == 0


def test_search_help_does_not_promise_notes(capsys):
    with pytest.raises(SystemExit):
        main(["index", "search", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("keywords: whole words of names, paths, predicted classes, descriptions, dtype and tree (not notes; "
            "'tree 3': the members of tree 3)") in out


def test_names_with_terminal_control_characters_are_shown_escaped(tmp_path, capsys):
    """A checkpoint named with an escape sequence (evil\\x1b[2J: clear the screen) or a carriage return (which
    overwrites the line) reached the terminal raw through `show`, `search` and the build's warnings."""
    make_models(tmp_path / "m")
    (tmp_path / "m" / "t0_0.safetensors").rename(tmp_path / "m" / "evil\x1b[2J\rx.safetensors")
    out = tmp_path / "atl"
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    assert main(["index", "show", str(out)]) == 0
    assert main(["index", "search", "evil", str(out)]) == 0
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert "\x1b" not in stream and "\r" not in stream
    assert "evil\\x1b[2J\\x0dx" in captured.out


def test_build_warns_when_the_stage_is_a_guess(tmp_path, capsys):
    """`atlas lineage recover` warned that two models' edge direction was a guess; `atlas index build` did not."""
    weights, _ = make_synthetic_forest(n_trees=1, children=1, depth=1, seed=7)
    (tmp_path / "m").mkdir()
    for name, tensors in weights.items():
        save_file(tensors, str(tmp_path / "m" / f"{name}.safetensors"))
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "a")]) == 0
    assert "no evidence of the training stage" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "b"), "--stage", "specialize"]) == 0
    assert "no evidence" not in capsys.readouterr().err


def test_build_warns_no_copy_the_tree_already_draws(tmp_path, capsys):
    """Every copy was also a 'warning: X: duplicate of Y' line (15 of them for 5 models and 3 conversions each)."""
    from safetensors.torch import load_file

    make_models(tmp_path / "m")
    (tmp_path / "m" / "broken.safetensors").unlink()
    t = load_file(str(tmp_path / "m" / "t0_0.safetensors"))
    save_file(t, str(tmp_path / "m" / "t0_0_again.safetensors"))
    save_file({k: v.half() for k, v in t.items()}, str(tmp_path / "m" / "t0_0_fp16.safetensors"))
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "atl"), "--stage", "specialize"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "t0_0_again  (identical weights to t0_0)" in captured.out
    assert "t0_0_fp16  (float16 copy of t0_0)" in captured.out
    notes = {m["name"]: m["notes"] for m in json.loads((tmp_path / "atl" / "atlas.json").read_text())["models"]}
    assert notes["t0_0_again"] == ["identical weights to t0_0"] and notes["t0_0_fp16"] == ["float16 copy of t0_0"]


def test_build_refuses_a_folder_whose_atlas_json_is_someone_elses(tmp_path, capsys):
    """Any atlas.json (a sprite sheet's, say) made --out pass as an atlas: the build overwrote it."""
    from modelatlas.atlas.index import check_atlas_folder
    from modelatlas.errors import AtlasError

    (tmp_path / "sprites").mkdir()
    (tmp_path / "sprites" / "atlas.json").write_text('{"frames": {}, "meta": {"image": "sheet.png"}}')
    with pytest.raises(AtlasError, match=r"sprites is a folder whose atlas\.json is no modelatlas atlas \(format "
                                         r"None\): it would be overwritten; choose a new or empty --out"):
        check_atlas_folder(tmp_path / "sprites")
    (tmp_path / "sprites" / "atlas.json").write_text("{")  # unreadable: nothing says it is one of ours
    with pytest.raises(AtlasError, match=r"atlas\.json is no modelatlas atlas \(not readable as JSON\)"):
        check_atlas_folder(tmp_path / "sprites")


def test_an_atlas_of_another_version_says_rebuild_and_is_rebuilt_in_place(tmp_path, capsys):
    """An atlas.json of another modelatlas version: show said 'unknown atlas format', and the rebuild that fixes
    it was refused ('is no modelatlas atlas'), though it is one, leaving only deleting it by hand."""
    make_models(tmp_path / "m")
    out = tmp_path / "atl"
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    data = json.loads((out / "atlas.json").read_text())
    (out / "atlas.json").write_text(json.dumps({**data, "format": "modelatlas-atlas/2"}))
    capsys.readouterr()
    assert main(["index", "show", str(out)]) == 1
    assert capsys.readouterr().err == (f"error: {out / 'atlas.json'}: an atlas of another modelatlas version (format "
                                       "'modelatlas-atlas/2'; this one reads 'modelatlas-atlas/1'): rebuild it with "
                                       f"`atlas index build PATH... --out {out}`\n")
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    assert json.loads((out / "atlas.json").read_text()) == data


def test_build_warns_at_most_20_notes_and_points_at_show(tmp_path, capsys, monkeypatch):
    """Each note was a warning line: 1,000 models outside the experts' trees were 1,000 lines."""
    import modelatlas.cli.index as index_cli

    monkeypatch.setattr(index_cli, "MAX_WARNED", 2)
    make_models(tmp_path / "m")
    for i in range(3):
        (tmp_path / "m" / f"broken{i}.safetensors").write_bytes(b"\xff" * 4)
    out = tmp_path / "atl"
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err[:2]] == ["warning", "warning"] and len(err) == 3
    assert err[2] == f"warning: ... and 2 more notes: `atlas index show {out}` lists them all"
    assert main(["index", "show", str(out)]) == 0
    assert "not in any tree (4):" in capsys.readouterr().out


def test_search_with_query_and_atlas_swapped_says_the_order(tmp_path, capsys, monkeypatch):
    """`atlas index search my-atlas t0` said 't0/atlas.json: no atlas here', of a folder that is not there."""
    make_models(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert main(["index", "build", "m", "--out", "atl", "--stage", "specialize"]) == 0
    capsys.readouterr()
    assert main(["index", "search", "atl", "t0 1"]) == 1
    assert capsys.readouterr() == ("", "error: 't0 1' is no atlas, and atl is one: the query comes first "
                                       "(atlas index search 't0 1' atl)\n")
    assert main(["index", "search", "atl", "m", "--mode", "keywords"]) == 1  # m is there: its own error
    assert "m/atlas.json: no atlas here" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["atlas.json", "my-atlas.HTML"])
def test_build_refuses_an_out_named_as_a_file(tmp_path, capsys, monkeypatch, out):
    """`--out atlas.json` wrote a folder named atlas.json (holding atlas.json and atlas.html), without a word."""
    make_models(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert main(["index", "build", "m", "--out", out]) == 1
    stem = out.rsplit(".", 1)[0]
    assert capsys.readouterr() == ("", f"error: --out {out}: --out is the atlas folder, which atlas.json and "
                                       f"atlas.html are written into, not a file; name it {stem}\n")
    assert not (tmp_path / out).exists()


def test_an_atlas_folder_named_json_is_still_rebuilt(tmp_path, capsys):
    """An atlas folder an earlier build wrote under a .json name stays usable: rebuilt, not refused."""
    make_models(tmp_path / "m")
    out = tmp_path / "old.json"
    out.mkdir()
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(tmp_path / "new"), "--stage", "specialize"]) == 0
    (out / "atlas.json").write_text((tmp_path / "new" / "atlas.json").read_text())
    assert main(["index", "build", str(tmp_path / "m"), "--out", str(out), "--stage", "specialize"]) == 0
    assert (out / "atlas.html").is_file()


@pytest.mark.parametrize("argv", [["-v2", "ATLAS"], ["--top", "3", "-v2", "ATLAS"]])
def test_a_query_starting_with_a_dash_is_told_to_follow_double_dash(tmp_path, capsys, argv):
    """argparse read the query "-v2" as an option and said only "the following arguments are required: ATLAS"."""
    with pytest.raises(SystemExit) as e:
        main(["index", "search", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'-v2' was read as an option: put -- before" in err
    assert "atlas index search -- -v2 ..." in err


def test_after_double_dash_a_dashed_query_is_searched(tmp_path, capsys):
    make_models(tmp_path / "models")
    assert main(["index", "build", str(tmp_path / "models"), "--out", str(tmp_path / "atlas")]) == 0
    capsys.readouterr()
    code = main(["index", "search", "--mode", "keywords", "--", "-t1_0", str(tmp_path / "atlas")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.lstrip().startswith("1. t1_0  keyword score 2.000")  # the dash is no part of the word


@pytest.mark.parametrize("argv", [["q"], ["--top", "-1", "q", "ATLAS"], ["--to", "x", "q", "ATLAS"]])
def test_other_argument_errors_get_no_double_dash_hint(capsys, argv):
    with pytest.raises(SystemExit):
        main(["index", "search", *argv])
    assert "put -- before" not in capsys.readouterr().err


def test_search_help_describes_the_command_and_atlas(capsys):
    """`atlas index search --help` had no description and ATLAS no help (`show` says what it takes)."""
    with pytest.raises(SystemExit):
        main(["index", "search", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "ATLAS atlas folder (or its atlas.json)" in out and "exit 1 when no model matches" in out


def check_loads_no_torch(argv):
    """Run ``atlas ARGV`` in a fresh interpreter (this checkout's modelatlas); whether it imported torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import modelatlas

    code = ("import io, sys, contextlib\nfrom modelatlas.cli.main import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    code = main({argv!r})\n"
            "print(code, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(modelatlas.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return out.split()


@pytest.mark.parametrize("command", [["show"], ["search", "b"], ["search", "b", "--mode", "keywords"]])
def test_show_and_keyword_search_do_not_import_torch(tmp_path, command):
    """`atlas index show` took 2 s on a 6-model atlas, 1.4 s of it importing torch (and scipy) that reading
    atlas.json does not need: through modelatlas.atlas's build, the lineage package's recovery and weights.base."""
    from modelatlas.atlas import Atlas, ModelEntry
    from modelatlas.lineage.forest import Edge, Forest

    Atlas([ModelEntry("a", "/z/a", tree=1), ModelEntry("b", "/z/b", tree=1, parent="a")],
          Forest(["a", "b"], [Edge("a", "b", 0.5)])).save(tmp_path / "atl")
    assert check_loads_no_torch(["index", *command, str(tmp_path / "atl")]) == ["0", "False"]
