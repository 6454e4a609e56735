"""``unlearn="auto"`` (the default): Newton where its exact Hessian fits, the Newton step by conjugate gradients
(``"cg"``) otherwise (gradient ascent until session 40).

Found on day one: ``atlas attribute --dataset fashion-mnist`` with default options was refused (25,450
parameters, over Newton's 20,000) with advice to use "a smaller width, or smaller inputs", for which the command
has no flag; only ``--unlearn ascent`` ran. The limit is lowered here so that digits' 2,410-parameter target
stands for a model over it (seconds, not a Fashion-MNIST run)."""

import json
import re

import pytest
import torch

from modelatlas.attribution import DDMConfig, ddm, ddm_attribution
from modelatlas.attribution import target as T
from modelatlas.attribution.ddm import unlearn_choice
from modelatlas.cli.main import build_parser, main
from modelatlas.errors import ConfigError

TINY = ["attribute", "--clusters-per-class", "2", "--max-train", "200", "--max-test", "20", "--train-steps", "2",
        "--match-steps", "1", "--test-index", "0"]


def _run(tmp_path, capsys, name, *flags):
    assert main([*TINY, *flags, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
    info = json.loads((tmp_path / name / "attribution.json").read_text())
    from modelatlas.atomic import read_tensors
    return info, read_tensors(tmp_path / name / "attribution.safetensors")["matrix"], capsys.readouterr().out


def test_the_default_over_newtons_limit_runs_cg_and_says_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ddm, "MAX_NEWTON_PARAMS", 1000)
    info, matrix, out = _run(tmp_path, capsys, "auto")
    assert ("unlearning: cg (auto: the target model's 2,410 parameters are over the 1,000 of Newton's exact "
            "Hessian: the Newton step by conjugate gradients on Hessian-vector products)") in out, out
    assert info["config"]["unlearn"] == "auto" and info["unlearn_used"] == "cg"
    assert info["unlearn_why"].startswith("auto: the target model's 2,410 parameters are over")
    t = info["timings"]
    assert t["cg_converged"] is True and 1 <= t["cg_iterations"] <= 500 and t["cg_relative_residual"] <= 1e-5
    assert f"conjugate gradients: {t['cg_iterations']} iterations, relative residual" in out, out
    _, asked, out = _run(tmp_path, capsys, "cg", "--unlearn", "cg")
    assert torch.equal(matrix, asked) and "unlearning:" not in out  # what auto chose, bit for bit


def test_the_digits_default_is_still_newton(tmp_path, capsys):
    info, matrix, out = _run(tmp_path, capsys, "auto")
    assert ("unlearning: newton (auto: the target model's 2,410 parameters fit Newton's exact Hessian, at most "
            "20,000)") in out, out
    assert info["unlearn_used"] == "newton" and "damping_used" in info["timings"]
    _, asked, _ = _run(tmp_path, capsys, "newton", "--unlearn", "newton")
    assert torch.equal(matrix, asked)


def test_the_library_default_is_auto_and_picks_newton_where_it_fits(planted):
    x, y, xt, yt = planted
    cfg = dict(clusters_per_class=2, train_steps=3, checkpoints=1, match_steps=1)
    assert DDMConfig().unlearn == "auto"
    default = ddm_attribution(x, y, xt, yt, 2, DDMConfig(**cfg))
    newton = ddm_attribution(x, y, xt, yt, 2, DDMConfig(**cfg, unlearn="newton"))
    assert torch.equal(default.matrix, newton.matrix) and "damping_used" in default.timings


def test_explicit_newton_over_the_limit_is_refused_naming_flags_that_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ddm, "MAX_NEWTON_PARAMS", 1000)
    assert main([*TINY, "--unlearn", "newton", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exact 2,410 x 2,410 Hessian" in err, err
    assert "use --unlearn 'cg' (the same step by conjugate gradients, without the Hessian), or --unlearn 'auto' (the " \
        "default), which takes it for such a model" in err, err
    parser = build_parser()._subparsers._group_actions[0].choices["attribute"]
    flags = {s for a in parser._actions for s in a.option_strings}
    named = set(re.findall(r"--[a-z][\w-]*", err))
    assert named and named <= flags, named - flags
    assert "width" not in err and "smaller inputs" not in err  # no flag sets them
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_damping_applies_where_auto_takes_cg(tmp_path, capsys, monkeypatch):
    """--damping tuned Newton only and was refused where auto took ascent; CG takes it too."""
    monkeypatch.setattr(ddm, "MAX_NEWTON_PARAMS", 1000)
    info, _, out = _run(tmp_path, capsys, "o", "--damping", "0.5")
    assert info["unlearn_used"] == "cg" and info["timings"]["damping_used"] in (0.5, 1.0, 2.0, 4.0), info["timings"]


@pytest.mark.parametrize("flags, named", [(["--cg-iterations", "9"], "--cg-iterations"),
                                          (["--cg-tolerance", "0.1", "--cg-iterations", "9"], "--cg-iterations")])
def test_cg_flags_where_auto_takes_newton_are_refused(tmp_path, capsys, flags, named):
    assert main([*TINY, *flags, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"error: {named} applies to conjugate-gradient unlearning only, and --unlearn auto (the default) takes " \
           f"newton for this target model; drop {named}, or add --unlearn cg" in err, err
    assert main([*TINY, *flags, "--unlearn", "ascent", "--out", str(tmp_path / "a")]) == 1
    assert f"error: {named} applies to --unlearn cg only (and auto where it takes cg), not ascent" in capsys.readouterr().err


def test_unlearn_choice_counts_the_target_models_parameters():
    for shape, k, width, depth in (((1, 8, 8), 10, 32, 1), ((1, 28, 28), 10, 32, 1), ((3, 32, 32), 100, 7, 3)):
        model = T.make_model(shape, k, width, depth, seed=0)
        assert T.n_params(shape, k, width, depth) == sum(p.numel() for p in model.parameters())
    method, why = unlearn_choice(DDMConfig(), (1, 28, 28), 10)  # Fashion-MNIST
    assert method == "cg" and "25,450 parameters" in why
    assert unlearn_choice(DDMConfig(unlearn="cg"), (1, 8, 8), 10) == ("cg", "as given")
    assert unlearn_choice(DDMConfig(unlearn="ascent"), (1, 8, 8), 10) == ("ascent", "as given")
    with pytest.raises(ConfigError, match=r"unlearn='newton' needs the exact 25,450 x 25,450 Hessian"):
        unlearn_choice(DDMConfig(unlearn="newton"), (1, 28, 28), 10)


def test_the_help_states_the_limit_the_library_applies(capsys):
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    assert f"at most {ddm.MAX_NEWTON_PARAMS:,} parameters" in " ".join(capsys.readouterr().out.split())
