import shutil

from modelatlas.cli.main import main


def test_a_demo_that_finishes_an_interrupted_zoo_says_what_it_trained(tmp_path, capsys):
    """A rerun after Ctrl-C (the manifest lists the models finished so far) trained the rest and said
    'reused (built before)'."""
    argv = ["demo", "--out", str(tmp_path / "zoo"), "--preset", "tiny", "--workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    shutil.rmtree(tmp_path / "zoo" / "t1.1")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 1 model, reused 5 (built before) in " in out and "\nreused (built before)" not in out
    assert "building zoo 'tiny'" in out  # one model to train


def test_a_demo_of_a_zoo_built_before_says_it_reuses_it(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path / "zoo"), "--preset", "tiny", "--workers", "1"]
    assert main(argv) == 0
    assert "building zoo 'tiny'" in capsys.readouterr().out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("reusing the zoo 'tiny' (6 models") and "building" not in out


def test_a_demo_over_a_zoo_of_another_seed_does_not_say_it_reuses_it(tmp_path, capsys):
    """The models of another seed count for nothing (make_zoo refuses them): the demo said 'reusing the zoo',
    then failed on 'built from a different zoo config'."""
    argv = ["demo", "--out", str(tmp_path / "zoo"), "--preset", "tiny", "--workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("building zoo 'tiny' (6 models") and "reusing" not in out
    assert "built from a different zoo config" in err


def test_a_demo_that_retrains_a_damaged_model_says_so(tmp_path, capsys):
    """make_zoo trains a model whose weights no longer match their digest again; the demo said 'reusing the zoo'
    and 'reused (built before)' all the same."""
    argv = ["demo", "--out", str(tmp_path / "zoo"), "--preset", "tiny", "--workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    weights = tmp_path / "zoo" / "t1.1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("building zoo 'tiny'") and "trained 1 model, reused 5 (built before) in " in out
