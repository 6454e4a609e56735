import pytest

from modelatlas.cli.main import main
from modelatlas.errors import ConfigError


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "data" in capsys.readouterr().out


def test_error_mapper_one_line_exit_1(capsys, monkeypatch):
    from modelatlas.cli import main as m

    def boom(args):
        raise ConfigError("field 'ipc' must be > 0; got -1")

    import argparse

    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert m.run_mapped(boom, argparse.Namespace()) == 1
    err = capsys.readouterr().err
    assert err == "error: field 'ipc' must be > 0; got -1\n"
    monkeypatch.setenv("ATLAS_DEBUG", "1")
    with pytest.raises(ConfigError):
        m.run_mapped(boom, argparse.Namespace())


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    assert "digits" in capsys.readouterr().out
