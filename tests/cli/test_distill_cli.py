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


def test_a_run_resumed_on_another_device_type_says_so_in_one_warning_line(tmp_path, capsys):
    """A run checkpointed on a GPU (its checkpoint.json says "cuda": no GPU here) and resumed on the CPU went on
    without a word; the library warns (warnings.warn) and the CLI shows it as one `warning:` line, once."""
    import json

    out = tmp_path / "o"
    base = ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", str(out),
            "--set", "width=8", "--eval-nets", "1", "--eval-epochs", "1", "--no-baseline"]
    assert main([*base, "--iterations", "1", "--device", "cpu"]) == 0
    ckpt = out / "checkpoint" / "checkpoint.json"
    meta = json.loads(ckpt.read_text())
    assert meta["device"] == "cpu"
    ckpt.write_text(json.dumps({**meta, "device": "cuda"}))
    capsys.readouterr()
    assert main([*base, "--iterations", "2", "--device", "cpu", "--resume"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert warned == [f"warning: {ckpt}: checkpointed on cuda, resumed on cpu; the run goes on, but its remaining "
                      "iterations round as cpu does, so the set is not bit-identical to one finished on cuda"]


def test_warnings_as_lines_shows_its_category_as_one_line_each_time_and_others_as_before(capsys):
    import warnings

    from modelatlas.cli.output import warnings_as_lines
    from modelatlas.errors import AtlasWarning

    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: seen.append(str(message))
        with warnings_as_lines(AtlasWarning):
            for _ in range(2):
                warnings.warn("a\nb", AtlasWarning, stacklevel=1)
            warnings.warn("other", RuntimeWarning, stacklevel=1)
        warnings.warn("after", AtlasWarning, stacklevel=1)
    assert capsys.readouterr().err == "warning: a\\nb\n" * 2 and seen == ["other", "after"]


KILLED_AT_ITEM = """
import os, signal, sys
import modelatlas.cli.distill as run
import modelatlas.cli.distill_poster as poster
from modelatlas.cli.main import main

class Bar:  # the outer loop's bar: the process is SIGKILLed (no cleanup, no finally) before item K
    def __init__(self, it):
        self.it = it
    def __iter__(self):
        for i, x in enumerate(self.it):
            if i == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
            yield x
    def set_postfix(self, **kw):
        pass

run.tqdm_progress = poster.tqdm_progress = lambda it, total=None, desc="": Bar(it)
main(sys.argv[2:])
"""


@pytest.mark.parametrize("command", [["run", "--method", "dm", "--ipc", "1"], ["poster", "--ipc", "0.3"]])
def test_a_process_killed_after_a_checkpoint_resumes_to_the_straight_runs_result(tmp_path, command):
    """A real SIGKILL (the tests of an interrupted run raise KeyboardInterrupt inside the process, whose handlers
    still run): the killed process leaves its last checkpoint and no result; --resume finishes to the set,
    losses and accuracies of a run never stopped, and result.json differs only in resumed and wall time."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    import modelatlas

    args = ["distill", *command, "--dataset", "digits", "--iterations", "6", "--set", "checkpoint_every=2",
            "--set", "width=8", "--set", "batch_real=16", "--eval-nets", "1", "--eval-epochs", "2"]
    if command[0] == "poster":
        args += ["--set", "total=4", "--set", "window=2"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    src = str(Path(modelatlas.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_ITEM, "5", *args, "--out", str(killed)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((killed / "checkpoint" / "checkpoint.json").read_text())["iteration"] == 4
    assert not (killed / "result.json").exists()
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    a, b = (load_file(str(tmp_path / d / "synthetic.safetensors")) for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("straight", "killed"))
    assert {k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)} <= {"resumed", "wall_time_s"}
    assert rb["resumed"] is True and rb["devices"] == ["cpu"] and len(rb["losses"]) == 6


def test_help_names_every_method_and_its_default_iterations(capsys):
    """`atlas distill run --help` listed "random, herding, dc, dsa, dm, ..." and gave --iterations's default as
    "the method's", `atlas distill poster --help` too (podd's: 200). Each method and its config's default are
    named now, checked against the registry."""
    import re

    from modelatlas.distill import methods

    for command in ("run", "poster"):
        with pytest.raises(SystemExit):
            main(["distill", command, "--help"])
    run_help, poster_help = (" ".join(h.split()) for h in capsys.readouterr().out.split("usage: atlas distill poster"))
    options = run_help.split("options:")[1]  # not the usage lines, which name the flags too
    listed = options.split("--method METHOD")[1].split("--dataset")[0]
    said = options.split("--iterations ITERATIONS")[1].split("the method's: ")[1].split(")")[0]
    shown = {}
    for group in said.split("; "):  # "dc, dsa 200", "random and herding take none"
        names, steps = re.fullmatch(r"(.+?) (\d+|take none)", group).groups()
        shown.update({n: 0 if steps == "take none" else int(steps) for n in re.split(r", | and ", names)})
    assert shown == {m: methods.get(m).config_cls().iterations for m in methods.available()}
    assert all(re.search(rf"\b{m}\b", listed) for m in methods.available())
    assert "outer iterations (default 200)" in poster_help and methods.get("podd").config_cls().iterations == 200
