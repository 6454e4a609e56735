import pytest
import torch

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


@pytest.mark.parametrize("code, text", [(28, "No space left on device"), (30, "Read-only file system"),
                                        (16, "Device or resource busy")])
def test_an_os_error_about_a_file_is_one_line(capsys, monkeypatch, code, text):
    """A full disk, a read-only folder or a busy mount point while writing an output was a traceback; an
    OSError that names no file stays one (it is a bug, not the user's input)."""
    import argparse

    from modelatlas.cli import main as m

    def boom(args):
        raise OSError(code, text, "/out/result.json")

    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert m.run_mapped(boom, argparse.Namespace()) == 1
    assert capsys.readouterr().err == f"error: /out/result.json: {text}\n"
    with pytest.raises(OSError):
        m.run_mapped(lambda args: (_ for _ in ()).throw(OSError(code, text)), argparse.Namespace())


def test_an_error_naming_a_file_that_is_not_utf8_is_escaped(tmp_path, monkeypatch, non_utf8_name):
    """``m\\xe9`` as the rest of the CLI writes it, also on a strict UTF-8 stderr (before: ``m\\udce9``, or a
    UnicodeEncodeError traceback there); a garbage file read through the command, an OSError, Ctrl-C."""
    import argparse
    import io

    from modelatlas.cli import main as m

    (tmp_path / f"{non_utf8_name}.pt").write_bytes(b"garbage")
    errors = [OSError(2, "No such file or directory", str(tmp_path / non_utf8_name)), KeyboardInterrupt()]
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stderr", io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict"))
    codes = [main(["lineage", "recover", f"{non_utf8_name}.pt"])]
    codes += [m.run_mapped(lambda args, e=e: (_ for _ in ()).throw(e), argparse.Namespace(out=non_utf8_name,
              interrupt_hint="kept in {out}")) for e in errors]
    m.sys.stderr.seek(0)
    lines = m.sys.stderr.buffer.read().decode().splitlines()
    assert codes == [1, 1, 130]
    assert lines[0].startswith("error: ") and "m\\xe9.pt: corrupt or unsupported PyTorch pickle" in lines[0]
    assert lines[1:] == [f"error: {tmp_path}/m\\xe9: No such file or directory",
                         "error: interrupted (stopped before anything was saved in m\\xe9: run the command again)"]


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


def check_groups():
    """Every command that has subcommands (index, zoo, lineage, ...), with their names."""
    import argparse

    from modelatlas.cli.main import build_parser

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: list(sub.choices) for name, p in top.choices.items()
            for sub in p._actions if isinstance(sub, argparse._SubParsersAction)}


def test_group_without_subcommand_prints_its_own_usage(capsys):
    groups = check_groups()
    assert {"index", "lineage", "probex", "zoo", "data"} <= set(groups)
    for name, subcommands in groups.items():
        with pytest.raises(SystemExit) as e:
            main([name])
        assert e.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"usage: atlas {name} ")
        assert f"atlas {name}: error: choose a subcommand: {', '.join(subcommands)}" in captured.err


@pytest.mark.parametrize("argv, option", [
    (["index", "search", "q", "atl", "--top", "0"], "--top"),
    (["index", "search", "q", "atl", "--top", "-2"], "--top"),
    (["probex", "predict", "m", "--experts", "e", "--top", "0"], "--top"),
    (["probex", "search", "q", "m", "--experts", "e", "--top", "x"], "--top"),
    (["lineage", "recover", "m", "--trees", "0"], "--trees"),
    (["zoo", "make", "--out", "z", "--workers", "0"], "--workers"),
    (["attribute", "--dataset", "digits", "--out", "o", "--max-train", "-1"], "--max-train"),
])
def test_counts_must_be_positive_and_say_so(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were the check lost, the command would write its --out here, not in the repo
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    value = argv[argv.index(option) + 1]
    assert f"argument {option}: invalid positive integer value: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, kind", [
    ("--input-shape", "1,x,28", "comma-separated integers"),
    ("--lora-ranks", "4,", "comma-separated integers"),
])
def test_list_options_name_their_type(option, value, kind, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["zoo", "make", "--out", "z", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: invalid {kind} value: '{value}'" in err and "lambda" not in err


@pytest.mark.parametrize("argv", [["zoo", "make", "--preset", "tiny"], ["attribute"], ["demo"],
                                  ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1"],
                                  ["distill", "poster", "--dataset", "digits", "--ipc", "1"],
                                  ["index", "build", "m"], ["probex", "train", "z"]])
@pytest.mark.parametrize("value", ["", "  ", "-"])
def test_an_empty_out_is_refused(argv, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # '--out ""' wrote into the current folder and printed 'wrote '
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", value])
    assert e.value.code == 2 and f"argument --out: invalid output folder value: {value!r}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("hint, saved, expected", [
    ("progress is kept in {out}/checkpoint; rerun with --resume to continue", True,
     "progress is kept in runs/dm/checkpoint; rerun with --resume to continue"),
    # stopped before the first checkpoint: no folder to resume from (it promised one that was never written)
    ("progress is kept in {out}; rerun with --resume to continue", False,
     "stopped before anything was saved in runs/dm: run the command again, without --resume"),
    (None, False, "nothing partial was left"),
])
def test_ctrl_c_says_what_the_command_kept(hint, saved, expected, capsys, tmp_path, monkeypatch):
    import argparse

    from modelatlas.cli.main import run_mapped

    def func(args):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    if saved:
        (tmp_path / "runs" / "dm" / "checkpoint").mkdir(parents=True)
    args = argparse.Namespace(interrupt_hint=hint, out="runs/dm", resume=False) if hint else argparse.Namespace()
    assert run_mapped(func, args) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted (") and expected in err and err.count("\n") == 1


def test_each_resumable_command_names_its_resume():
    from modelatlas.cli.main import build_parser

    parser = build_parser()
    for argv, words in [(["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", "o"], "--resume"),
                        (["probex", "train", "z"], "--resume"), (["zoo", "make", "--out", "z"], "rerun the same command")]:
        args = parser.parse_args(argv)
        hint = args.interrupt_hint(args) if callable(args.interrupt_hint) else args.interrupt_hint
        assert words in hint


def test_help_does_not_import_torch():
    """`atlas --help` took 1.8 s, 1.4 s of it importing torch through `atlas data`'s registration."""
    import subprocess
    import sys

    code = ("import sys\nfrom modelatlas.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("argv", [["zoo", "make", "--preset", "tiny", "--out", "z"], ["attribute"], ["demo"],
                                  ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", "o"],
                                  ["distill", "poster", "--dataset", "digits", "--ipc", "1", "--out", "o"],
                                  ["distill", "eval", "o"], ["probex", "train", "z"]])
@pytest.mark.parametrize("value", [str(2**64), str(-(2**63) - 1), "1.5"])
def test_a_seed_beyond_64_bits_is_refused(argv, value, capsys):
    # seeds are reduced to 64 bits: --seed 2**64 silently repeated the run of --seed 0
    with pytest.raises(SystemExit) as e:
        main([*argv, "--seed", value])
    assert e.value.code == 2 and f"argument --seed: invalid seed value: '{value}'" in capsys.readouterr().err


def test_ctrl_c_before_anything_was_saved_names_resume_only_for_commands_that_have_it(capsys, tmp_path, monkeypatch):
    """`atlas zoo merge` stopped before its first model said 'run the command again, without --resume': it has
    no --resume."""
    from modelatlas.cli.main import build_parser, run_mapped

    def func(args):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["zoo", "merge", "zoo", "--out", "m"])
    assert run_mapped(func, args) == 130
    err = capsys.readouterr().err
    assert "stopped before anything was saved in m: run the command again" in err and "--resume" not in err


def test_output_the_terminal_cannot_encode_is_escaped_not_a_traceback(tmp_path):
    """Output redirected on Windows (cp1252) ended in a UnicodeEncodeError traceback at the first ✓ or tree
    branch, after the whole command had run; characters it cannot encode are now written escaped."""
    import os
    import subprocess
    import sys

    from modelatlas.zoo.manifest import Manifest, ModelRecord

    Manifest([ModelRecord("t0", "t0", None, "t0", task={"label": "数字 ✓"})]).save(tmp_path / "manifest.json")
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    run = subprocess.run([sys.executable, "-m", "modelatlas.cli.main", "zoo", "show", str(tmp_path)], env=env,
                         capture_output=True)
    assert run.returncode == 0 and b"Traceback" not in run.stderr
    assert b"t0  [root]" in run.stdout and b"\\u2713" in run.stdout


@pytest.mark.parametrize("error, size", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                  "you tried to allocate 107374182400 bytes."), "(100.0 GiB asked for at once)"),
    (MemoryError("Unable to allocate 3.2 TiB for an array"), "(3.2 TiB asked for at once)"),
    (MemoryError(), ""),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 25599999744 bytes. Error code "
                  "12 (Cannot allocate memory)"), "(23.8 GiB asked for at once)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 "
                            "GiB of which 1.06 GiB is free."), "(2.00 GiB asked for at once)"),  # as CUDA words it
])
def test_out_of_memory_is_one_line(capsys, error, size):
    """A huge --arch-kwargs or --ipc ended in the allocator's traceback."""
    import argparse

    from modelatlas.cli.main import run_mapped

    def command(args):
        raise error

    assert run_mapped(command, argparse.Namespace()) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: out of memory{(' ' + size) if size else ''}: lower the sizes") and err.count("\n") == 1


def test_other_runtime_errors_still_raise():
    import argparse

    from modelatlas.cli.main import run_mapped

    def command(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_mapped(command, argparse.Namespace())


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first moments of a command (its modules being imported) printed a 20-line traceback."""
    import modelatlas.cli.main as main_module

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    monkeypatch.setattr(main_module.importlib, "import_module", interrupted)
    assert main(["probex", "train", "zoo"]) == 130
    assert capsys.readouterr().err == "error: interrupted (before the command started: nothing was read or written)\n"


EARLY_CTRL_C = """
import sys

class Interrupt:  # Ctrl-C while the command line's own modules load: at the import of tqdm
    def find_spec(self, name, path=None, target=None):
        if name == "tqdm":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
from modelatlas.cli.main import main  # what the installed `atlas` script does
sys.exit(main(["data", "list"]))
"""


def test_ctrl_c_while_the_command_line_itself_loads_is_one_line():
    """Ctrl-C in the first ~0.1 s of `atlas`, while `modelatlas.cli.main` imported tqdm, was a traceback:
    main() had not started, so its handler could not catch it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATLAS_DEBUG"}
    run = subprocess.run([sys.executable, "-c", EARLY_CTRL_C], capture_output=True, text=True, env=env)
    assert (run.returncode, run.stderr) == (130, "error: interrupted (before the command started: nothing was "
                                                 "read or written)\n")


def test_ctrl_c_while_the_command_is_prepared_is_one_line(monkeypatch, capsys):
    """After the arguments are parsed and before the command runs (the allocator set up) Ctrl-C was a traceback."""
    import modelatlas.cli.main as main_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    monkeypatch.setattr(main_module, "keep_freed_memory", interrupted)
    assert main(["data", "list"]) == 130
    assert capsys.readouterr().err.startswith("error: interrupted (before the command started")


def test_ctrl_c_before_the_command_with_atlas_debug_is_one_traceback(monkeypatch):
    """With ATLAS_DEBUG=1 a Ctrl-C before the command ran raised a new KeyboardInterrupt while handling it:
    two tracebacks, 'During handling of the above exception, another exception occurred'. The interrupt
    itself is raised again, as a later Ctrl-C is (run_mapped)."""
    import modelatlas.cli.main as main_module

    def interrupted(name):
        raise KeyboardInterrupt("the first")

    monkeypatch.setenv("ATLAS_DEBUG", "1")
    monkeypatch.setattr(main_module.importlib, "import_module", interrupted)
    with pytest.raises(KeyboardInterrupt, match="the first") as e:
        main(["probex", "train", "zoo"])
    assert e.value.__context__ is None


def test_ctrl_c_while_the_command_line_loads_with_atlas_debug_is_one_traceback():
    """The same while `modelatlas.cli.main` itself is imported: one traceback, ending the run as a Ctrl-C
    during a command does with ATLAS_DEBUG=1 (the interpreter ends by SIGINT: 130 in a shell)."""
    import os
    import subprocess
    import sys

    later = EARLY_CTRL_C.replace('if name == "tqdm"', 'if name == "modelatlas.data"')
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "ATLAS_DEBUG": "1"}) for code in (EARLY_CTRL_C, later)]
    for run in runs:
        assert run.stderr.count("Traceback (most recent call last)") == 1 and "During handling" not in run.stderr
        assert run.stderr.endswith("KeyboardInterrupt\n") and run.returncode == runs[1].returncode != 0
    assert "cli/output.py" in runs[0].stderr and "run_mapped" in runs[1].stderr
