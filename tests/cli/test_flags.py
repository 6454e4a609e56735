"""Config errors reach CLI users naming the flag they typed, not the config field (library users keep the field)."""

import pytest

from modelatlas.cli.flags import dashed, named_by_flags
from modelatlas.cli.main import main
from modelatlas.errors import ConfigError

FLAGS = {**dashed("match_steps", "clusters_per_class", "unlearn", "trees", "children", "depth", "arch_kwargs",
                  "dataset", "ipc"), "lam": "--lambda", "rank_u": "--rank", "n_trees": "--trees"}


@pytest.mark.parametrize("message, shown", [
    ("match_steps must be >= 0 (an integer), got -1", "--match-steps must be >= 0 (an integer), got -1"),
    ("lam (--lambda) must be >= 0 and finite; got -1.0", "--lambda must be >= 0 and finite; got -1.0"),
    ("n_trees (--trees): the recipe must be told the number of trees K",
     "--trees: the recipe must be told the number of trees K"),
    ("ProbeXConfig.rank_u must be a positive integer; got 0", "--rank must be a positive integer; got 0"),
    ("depth: a star is roots with direct children only (depth 1), got 3",
     "--depth: a star is roots with direct children only (depth 1), got 3"),
    ("trees 9, children 9, depth 99: more than 100,000 models", "--trees 9, --children 9, --depth 99: more than 100,000 models"),
    ("arch_kwargs.hidden: must be a positive integer, got -1", "--arch-kwargs hidden: must be a positive integer, got -1"),
    ("ipc 3 is not the 1 image per class of a poster", "--ipc 3 is not the 1 image per class of a poster"),
    ("class 8 has 4 examples, fewer than clusters_per_class=5; lower it",
     "class 8 has 4 examples, fewer than --clusters-per-class 5; lower it"),
    ("unlearn='newton' needs the exact Hessian", "--unlearn 'newton' needs the exact Hessian"),
])
def test_a_field_is_named_by_its_flag(message, shown):
    assert named_by_flags(message, FLAGS) == shown



@pytest.mark.parametrize("message", [
    "window (100) must be <= total (150); raise total or lower window",  # fields of --set, no flag of their own
    "dataset 'mnist5k': labels must be a 1-D integer tensor",  # a value (one of --other-datasets), not the field
    "--iterations 5 and --set match_steps=3 differ; give it once",  # already in the user's words
    "the depth of the trees must be told",  # words in a sentence, not its subject
])
def test_what_is_not_a_field_subject_is_left_as_it_is(message):
    assert named_by_flags(message, FLAGS) == message


@pytest.mark.parametrize("argv, said", [
    (["attribute", "--out", "OUT", "--match-steps", "-1"], "error: --match-steps must be >= 0 (an integer), got -1\n"),
    (["attribute", "--out", "OUT", "--train-steps", "0"], "error: --train-steps must be >= 1 (an integer), got 0\n"),
    (["lineage", "recover", "m.safetensors", "--lambda", "-1"],
     "error: --lambda must be >= 0 and finite (paper: 0.3); got -1.0\n"),
    (["zoo", "make", "--out", "OUT", "--children", "0"], "error: --children: must be a positive integer, got 0\n"),
    (["zoo", "make", "--out", "OUT", "--preset", "nope"], "error: --preset: unknown preset 'nope'; choose one of"),
    (["zoo", "make", "--out", "OUT", "--merges", "1", "--merge-kinds", "ties,della"],
     "error: --merge-kinds: unknown value 'della'; choose one of"),
    (["distill", "run", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--iterations", "0"],
     "error: --iterations must be >= 1 (0 would return the starting set unchanged), got 0\n"),
    (["distill", "poster", "--dataset", "digits", "--ipc", "0.5", "--out", "OUT", "--iterations", "-2"],
     "error: --iterations must be >= 1 (0 would return the starting set unchanged), got -2\n"),
])
def test_commands_name_the_flag_of_a_refused_config_value(argv, said, tmp_path, monkeypatch, capsys):
    """`atlas attribute --match-steps -1` said 'match_steps must be >= 0': a name the user never typed."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith(said) and not (tmp_path / "OUT").exists()


def test_library_users_still_see_the_field():
    from modelatlas.attribution import DDMConfig

    with pytest.raises(ConfigError, match="^match_steps must be >= 0"):
        DDMConfig(match_steps=-1)
