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


def test_reader_leaving_early_is_quiet(capsys, monkeypatch):
    """`atlas index show A | head -1`: the closed pipe is exit code 141 with no traceback, whether it breaks
    during the command or at the final flush of buffered output."""
    import argparse
    import contextlib
    import io

    from modelatlas.cli import main as m

    class ClosedPipe(io.StringIO):  # no file descriptor: the real stdout is never redirected, even under -s
        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    with contextlib.redirect_stdout(ClosedPipe()):  # restored before capsys's teardown, whatever the fixture order
        assert m.run_mapped(closed, argparse.Namespace()) == 141
        assert m.run_mapped(lambda args: print("t0") or 0, argparse.Namespace()) == 141
    assert capsys.readouterr().err == ""
