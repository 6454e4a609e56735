import pytest

from modelatlas.cli.distill import parse_overrides
from modelatlas.cli.main import main
from modelatlas.errors import ConfigError


@pytest.mark.parametrize("value, said", [("[" * 100_000, "nested too deeply"), ("1" * 5000, "Exceeds the limit")])
def test_a_set_value_nested_deeply_or_with_a_huge_integer_is_one_line(tmp_path, capsys, value, said):
    """--set lr_img=[[[... ended in a RecursionError traceback, --set lr_img=<5,000 digits> in a ValueError one."""
    with pytest.raises(ConfigError, match=f"--set lr_img: .*{said}"):
        parse_overrides([f"lr_img={value}"])
    argv = ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "o"),
            "--set", f"lr_img={value}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --set lr_img: ") and said in err and err.count("\n") == 1 and len(err) < 300
    assert parse_overrides(["lr_img=0.5", "init=noise"]) == {"lr_img": 0.5, "init": "noise"}


@pytest.mark.parametrize("command, flag, value, field, other", [
    ("run", "--iterations", "5", "iterations", "7"),
    ("poster", "--iterations", "5", "iterations", "7"),
    ("poster", "--class-order", "natural", "class_order", '"poco"'),
    ("poster", "--no-learn-labels", None, "learn_labels", "true"),
])
def test_a_flag_and_a_set_of_its_field_that_differ_are_refused(tmp_path, capsys, command, flag, value, field, other):
    """--iterations 5 --set iterations=7 ran 5 (--class-order / --no-learn-labels also replaced their --set field)
    without a word."""
    what = ["--method", "dm", "--ipc", "1"] if command == "run" else ["--ipc", "0.5"]
    argv = ["distill", command, *what, "--dataset", "digits", "--out", str(tmp_path / "o"), flag,
            *([value] if value else []), "--set", f"{field}={other}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and f"--set {field}={other}" in err and "give it once" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("argv", [["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1"],
                                  ["zoo", "make", "--preset", "tiny"], ["attribute"]])
def test_an_output_folder_where_no_file_can_be_made_is_refused_first(argv, capsys):
    """`--out /proc/runs` failed as '/proc/runs: No such file or directory' once the first file was written."""
    assert main([*argv, "--out", "/proc/atlas-runs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/proc/atlas-runs" in err and "cannot be written: no file can be made in /proc" in err
