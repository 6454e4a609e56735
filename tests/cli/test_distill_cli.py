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
