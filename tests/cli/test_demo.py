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
