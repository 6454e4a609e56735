"""What a --resume says when it starts (cli.output.say_fresh_start)."""

import json

import pytest

from modelatlas.cli.output import say_fresh_start


@pytest.mark.parametrize("meta, want", [
    ({"iteration": 4, "losses": [1, 2, 3, 4]}, "resuming from {ck}: 4 iterations done\n"),
    ({"iteration": 1}, "resuming from {ck}: 1 iteration done\n"),
    ({"iteration": "4"}, ""),  # unreadable: the run itself says why
    ([4], ""),
    (None, ""),  # no checkpoint.json (a finished run keeps none): nothing
])
def test_a_resume_says_which_iteration_it_goes_on_from(tmp_path, capsys, meta, want):
    """A resume printed nothing until its last line: without a terminal it read as a fresh start."""
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    if meta is not None:
        (ck / "checkpoint.json").write_text(json.dumps(meta))
    say_fresh_start(True, tmp_path, "checkpoint")
    assert capsys.readouterr().out == want.format(ck=ck)


def test_a_resume_of_nothing_starts_from_the_beginning(tmp_path, capsys):
    say_fresh_start(True, tmp_path / "new", "checkpoint")
    assert capsys.readouterr().out == f"nothing to resume in {tmp_path / 'new' / 'checkpoint'}: starting from the beginning\n"
    say_fresh_start(False, tmp_path, "checkpoint")
    assert capsys.readouterr().out == ""
