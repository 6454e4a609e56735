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
