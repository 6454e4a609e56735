"""Session 39's day-one review of `atlas distill` / `atlas attribute`: what a new user met first."""

from __future__ import annotations

import pytest

from modelatlas.data import load_dataset
from modelatlas.distill import distill


class _Recorder:
    """A Progress that shows nothing and remembers every bar's description and length."""

    def __init__(self):
        self.bars: list[tuple[str, int | None]] = []

    def __call__(self, iterable, *, total=None, desc=""):
        self.bars.append((desc, total))
        return _Bar(iterable)


class _Bar:
    def __init__(self, iterable):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def set_postfix(self, **values):
        pass


@pytest.mark.parametrize(("method", "config", "bars"), [
    ("mtt", {"iterations": 1, "num_experts": 2, "expert_epochs": 3, "max_start_epoch": 1, "syn_steps": 2,
             "width": 8}, [("mtt: train expert 1/2", 3), ("mtt: train expert 2/2", 3)]),
    ("hello", {"iterations": 1, "width": 8, "batch_real": 16, "teacher_steps": 4, "projector_steps": 3,
               "head_init": "class_mean"}, [("hello: train teacher", 4), ("hello: fit projector", 3)]),
    ("teddy", {"iterations": 1, "width": 8, "batch_real": 16, "base_steps": 6, "pool_size": 4,
               "finetune_steps": 2, "traj_steps": 2, "pool_kind": "both"},
     [("teddy: train pool base 1/1", 6), ("teddy: fine-tune pruned model 1/2", 2)]),
])
def test_the_long_first_run_work_shows_progress(method, config, bars, tmp_path):
    """MTT's experts, HeLlO's teacher and projector and Teddy's pool were trained with no bar at all (on
    Fashion-MNIST, MTT's 36 expert epochs are hours of a silent terminal before the first 'mtt' bar)."""
    train = load_dataset("digits", "train").subset(list(range(200)))
    seen = _Recorder()
    distill(method, train, 1, {**config, "cache_dir": str(tmp_path / "cache")}, seed=0, progress=seen)
    for bar in bars:
        assert bar in seen.bars, seen.bars
    seen.bars.clear()  # a second run loads the cache: no training, no such bar (HeLlO fits its projector again)
    distill(method, train, 1, {**config, "cache_dir": str(tmp_path / "cache")}, seed=0, progress=seen)
    assert [b for b in seen.bars if b in bars] == [b for b in bars if b[0] == "hello: fit projector"], seen.bars


@pytest.mark.parametrize("flag", [["--iterations", "50"], ["--set", "iterations=50"]])
def test_iterations_given_to_a_method_that_takes_none_is_said(flag, tmp_path, capsys):
    """`--method random --iterations 50` ran as if the flag were not there, without a word."""
    from modelatlas.cli.main import main

    argv = ["distill", "run", "--method", "random", "--dataset", "digits", "--ipc", "1", "--eval-nets", "1",
            "--eval-epochs", "1", "--no-baseline", *flag]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "warning: --method random takes no iterations (it picks real images); 50 is ignored" in capsys.readouterr().err
    assert main(["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--eval-nets", "1",
                 "--eval-epochs", "1", "--no-baseline", "--iterations", "1", "--out", str(tmp_path / "b")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_attribute_on_large_images_names_the_way_out_once(tmp_path, capsys):
    """The refusal of Newton's Hessian read 'use --unlearn 'ascent' (--unlearn ascent)': the library's own
    flag hint, and the CLI's rewrite of unlearn='ascent' beside it. Since session 39 the default (--unlearn auto)
    takes another step for such a model (ascent; since session 40 the Newton step by conjugate gradients), and
    only an explicit --unlearn newton is refused."""
    import numpy as np
    from PIL import Image

    from modelatlas.cli.main import main

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    argv = ["attribute", "--dataset", "image-folder", "--data-root", str(tmp_path / "imgs"), "--clusters-per-class",
            "1", "--train-steps", "2", "--match-steps", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "unlearning: cg (auto: the target model's 98,402 parameters are over" in capsys.readouterr().out
    assert main([*argv[:-1], str(tmp_path / "newton"), "--unlearn", "newton"]) == 1
    err = capsys.readouterr().err
    assert "use --unlearn 'cg' (" in err and err.count("'cg'") == 1 and "--unlearn cg" not in err, err


def test_distill_eval_says_where_its_numbers_went(tmp_path, capsys):
    """`atlas distill eval` printed the accuracy and protocol, not that result.json now holds them (under
    'reevaluation', beside the run's own 'evaluation'), so a user could not tell whether it had overwritten it."""
    from modelatlas.cli.main import main

    out = tmp_path / "dm"
    assert main(["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1",
                 "--eval-nets", "1", "--eval-epochs", "1", "--no-baseline", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["distill", "eval", str(out), "--eval-epochs", "2"]) == 0
    assert (f"stored in {out / 'result.json'} under 'reevaluation' (its 'evaluation' is kept)"
            in capsys.readouterr().out)


def test_the_baseline_evaluation_has_a_bar_of_its_own(tmp_path):
    """The set's and the baseline's evaluation bars were both 'evaluate': the second looked like the first
    starting over. And each bar moved once per network: 25 s per net on digits with the default 1000 epochs,
    minutes on Fashion-MNIST, with a bar that looked stuck at 0/5; each net's epochs have a bar too."""
    from modelatlas.distill import run_distillation

    seen = _Recorder()
    run_distillation("dm", "digits", 1, tmp_path / "out", config={"iterations": 1}, eval_nets=2, eval_epochs=1,
                     progress=seen)
    assert [b for b in seen.bars if b[0].startswith("evaluate")] == [
        ("evaluate", 2), ("evaluate: net 1/2, epochs", 1), ("evaluate: net 2/2, epochs", 1),
        ("evaluate: random baseline", 2), ("evaluate: random baseline: net 1/2, epochs", 1),
        ("evaluate: random baseline: net 2/2, epochs", 1)]


def test_attribution_plot_names_the_classes(tmp_path, monkeypatch):
    """attribution.png titled each panel with the class index ('test 0 (y=1)', '+ c3 (1)'): on Fashion-MNIST
    or an image folder a user had to look up which class 1 is."""
    import numpy as np
    from PIL import Image

    from modelatlas.attribution import report
    from modelatlas.cli.main import main

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    titles = []
    monkeypatch.setattr(report, "_panel", lambda ax, img, title: titles.append(title))
    assert main(["attribute", "--dataset", "image-folder", "--data-root", str(tmp_path / "imgs"), "--unlearn", "ascent",
                 "--clusters-per-class", "1", "--train-steps", "2", "--match-steps", "2", "--test-index", "0",
                 "--out", str(tmp_path / "out")]) == 0
    assert titles[0].startswith("test 0 (y=cat)") or titles[0].startswith("test 0 (y=dog)"), titles
    assert any("(cat)" in t for t in titles[1:]) and any("(dog)" in t for t in titles[1:]), titles


def test_a_resumed_run_says_so(tmp_path, capsys):
    """A run continued with --resume printed the same lines as a straight one: with no terminal (no bar
    starting at the checkpointed iteration) nothing said that the checkpoint had been taken up."""
    from modelatlas.cli.main import main

    argv = ["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--eval-nets", "1",
            "--eval-epochs", "1", "--no-baseline", "--set", "checkpoint_every=1", "--out", str(tmp_path / "out")]
    assert main([*argv, "--iterations", "1"]) == 0
    assert "(all parts" not in capsys.readouterr().out
    assert main([*argv, "--iterations", "2", "--resume"]) == 0
    assert "distillation wall time" in (out := capsys.readouterr().out) and "(all parts of the resumed run)" in out


def test_ddm_clustering_and_target_training_show_progress():
    """DDM's k-means and target-model training showed nothing: on Fashion-MNIST 17 s + 15 s of a silent
    terminal before the first bar (the matching's)."""
    from modelatlas.attribution import DDMConfig, ddm_attribution

    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    seen = _Recorder()
    ddm_attribution(tr.x, tr.y, te.x[:20], te.y[:20], 10, DDMConfig(clusters_per_class=2, train_steps=5,
                                                                    match_steps=2), progress=seen)
    assert seen.bars[:3] == [("k-means per class", 10), ("train target model", 5), ("reverse gradient matching", 2)]
