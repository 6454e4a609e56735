"""mergekit_config.yml read from a model folder (weights.mergekit): a damaged one is a problem named in the result,
never an exception that ends the run reading the folder, nor minutes of work (tests/lineage/test_declared.py has
the merges it declares)."""

import json
import random
import time

import pytest
import yaml
from tests.weights.fuzz_damage import check_limits, make_json_damage

from modelatlas.weights import mergekit
from modelatlas.weights.mergekit import declared_merge

CONFIG = {"merge_method": "ties", "base_model": "org/base",
          "models": [{"model": "org/ft0", "parameters": {"weight": 0.6, "density": 0.5}},
                     {"model": "org/ft1", "parameters": {"weight": 0.4}}],
          "slices": [{"sources": [{"model": "org/ft0", "layer_range": [0, 2]}]}], "dtype": "float32"}


def make_config(folder, text: str):
    folder.mkdir(exist_ok=True)
    (folder / "mergekit_config.yml").write_text(text)
    return folder


@pytest.mark.parametrize(("text", "weights"), [
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1" + "0" * 400 + "\n", [None]),
    ("merge_method: linear\nmodels: 5\nslices: [{sources: 7}, 3]\nbase_model: b\n", []),
    ("merge_method: linear\nmodels: {model: a}\nslices: [{sources: {model: b}}]\nbase_model: b\n", [])])
def test_values_of_the_wrong_type_or_range_are_no_models_or_weights(tmp_path, text, weights):
    """A weight of 10^400 (float() raised OverflowError) and a number where a list belongs (a TypeError) ended
    `atlas lineage recover` over the folder holding them."""
    got = declared_merge(make_config(tmp_path / "m", text))
    assert got["weights"] == weights


@pytest.mark.parametrize("loader", ["C", "python"])
def test_a_config_nested_too_deeply_is_a_problem(tmp_path, monkeypatch, loader):
    """PyYAML's own loader raised RecursionError on [[[[...]]]] 5,000 deep (libyaml's refuses it itself)."""
    if loader == "python":
        monkeypatch.setattr(mergekit, "_SAFE_LOADER", yaml.SafeLoader)
    got = declared_merge(make_config(tmp_path / "m", "merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000))
    assert got["problem"].startswith("not readable as YAML")


def test_many_entries_cost_linear_time_and_aliases_cannot_multiply_them(tmp_path):
    """20,000 models took 16 s (a list's `in` for each); 20,000 slices each naming one aliased list of 20,000 sources
    (500 kB) did not finish, counting 4 * 10^8 entries."""
    many = "merge_method: linear\nmodels:\n" + "".join(f"  - {{model: m{i}}}\n" for i in range(9000))
    start = time.perf_counter()
    assert len(declared_merge(make_config(tmp_path / "many", many))["models"]) == 9000
    alias = ("s: &s [" + ",".join(["{model: a}"] * 20000) + "]\nmerge_method: linear\nslices: ["
             + ",".join(["{sources: *s}"] * 20000) + "]\n")
    got = declared_merge(make_config(tmp_path / "alias", alias))
    assert got["problem"] == "over 10000 model entries: not a mergekit config"
    assert time.perf_counter() - start < 30  # seconds, on a loaded machine (was: minutes)


def test_damaged_configs_give_a_merge_or_a_problem(tmp_path):
    """Seeded damage (fuzz_damage.make_json_damage; JSON is YAML) of a valid config: a dict each time."""
    for seed in range(300):
        doc, what = make_json_damage(random.Random(seed), json.loads(json.dumps(CONFIG)))
        folder = make_config(tmp_path / "m", json.dumps(doc))
        with check_limits(5.0, 2 * 2**30):
            got = declared_merge(folder)
        assert isinstance(got, dict) and ("problem" in got or isinstance(got["models"], list)), (seed, what, got)
