"""Merged models in zoos (ZooConfig.merges): planning, the merge arithmetic, building, the manifest."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from modelatlas.errors import ConfigError, ManifestError
from modelatlas.zoo import ZooConfig, load_manifest, make_zoo, plan_zoo
from modelatlas.zoo.builder import fingerprint
from modelatlas.zoo.manifest import Manifest, ModelRecord, _record
from modelatlas.zoo.merged import KINDS, merged_state, plan_merges, slerp
from modelatlas.zoo.plan import model_names, planned_names


def make_nodes(config):
    """The trained models' nodes of ``config``'s plan (the merges left out)."""
    return [n for n in plan_zoo(config) if n["method"] != "merge"]


def check_merge_node(node, by_name):
    merge = node["merge"]
    if merge["kind"] in ("ties", "dare_ties", "dare_linear"):
        return check_sparse_node(node, by_name)
    assert len(set(merge["parents"])) == len(merge["parents"]) and math.isclose(sum(merge["weights"]), 1.0)
    assert node["parent"] == merge["parents"][max(range(len(merge["weights"])), key=merge["weights"].__getitem__)]
    assert all(by_name[p]["tree"] == node["tree"] for p in merge["parents"])
    if merge["kind"] == "task_arithmetic":  # two siblings on their parent
        base, a, b = merge["parents"]
        assert by_name[a]["parent"] == by_name[b]["parent"] == base
        assert all(0.3 <= w <= 1.0 for w in merge["weights"][1:])
    else:
        assert all(by_name[p]["parent"] is not None for p in merge["parents"]) and len(merge["parents"]) == 2
        assert all(0.2 <= w <= 0.8 for w in merge["weights"])


def check_sparse_node(node, by_name):
    """A TIES / DARE merge: base then two of its descendants, weights [0, x, y], the most weighted its parent."""
    merge = node["merge"]
    base, a, b = merge["parents"]
    assert merge["weights"][0] == 0 and all(0.3 <= w <= 1.0 for w in merge["weights"][1:])
    assert 0.3 <= merge["density"] <= 0.7 and ("seed" in merge) == (merge["kind"] != "ties")
    assert node["parent"] == (a if merge["weights"][1] >= merge["weights"][2] else b)
    assert a.startswith(base + ".") and b.startswith(base + ".")  # the base above both


def test_plan_cycles_kinds_on_distinct_pairs_seeded(make_config):
    config = make_config(merges=5, method="full")
    nodes = make_nodes(config)
    by_name = {n["name"]: n for n in nodes}
    merges = plan_merges(config, nodes)
    assert [m["name"] for m in merges] == [f"t{t}.merge{i}" for t in range(2) for i in range(5)]
    assert [m["merge"]["kind"] for m in merges[:5]] == ["linear", "task_arithmetic", "slerp", "linear", "task_arithmetic"]
    for t in ("t0", "t1"):
        pairs = [frozenset(m["merge"]["parents"][-2:]) for m in merges if m["tree"] == t]
        assert len(set(pairs)) == 5  # no two merges of a tree on one pair
    for m in merges:
        check_merge_node(m, by_name)
        assert m["level"] == 3 and m["storage"] == "full" and m["eval_task"] == by_name[m["parent"]]["task"]
    assert plan_merges(config, nodes) == merges  # seeded
    assert plan_merges(make_config(merges=5, method="full", seed=12), nodes) != merges
    assert [n["name"] for n in plan_zoo(config)] == model_names(config)  # the merges last


def test_task_arithmetic_without_siblings_is_linear(make_config):
    config = make_config(children=1, depth=3, merges=2, trees=1, method="full")  # a chain: no two siblings
    merges = plan_merges(config, make_nodes(config))
    assert [m["merge"]["kind"] for m in merges] == ["linear", "linear"]


def test_plan_sparse_kinds_on_siblings_then_a_common_base(make_config):
    config = make_config(merges=5, method="full", merge_kinds=("ties", "dare_linear", "dare_ties"))
    nodes = make_nodes(config)
    by_name = {n["name"]: n for n in nodes}
    merges = plan_merges(config, nodes)
    assert [m["merge"]["kind"] for m in merges[:5]] == ["ties", "dare_linear", "dare_ties", "ties", "dare_linear"]
    for m in merges:
        check_merge_node(m, by_name)
    # 2 x 2 x depth 2: three sibling pairs a tree, then cousins on their root
    assert sum(by_name[m["merge"]["parents"][0]]["parent"] is None and len(m["merge"]["parents"][1]) == 6
               for m in merges) >= 2
    default = make_config(merges=5, method="full")
    assert plan_merges(default, nodes) == plan_merges(replace(default, merge_kinds=KINDS), nodes)


def test_config_checks_merges(make_config):
    with pytest.raises(ConfigError, match=r"merges: 4 merged models .* has 2 \(1 pairs\); lower merges to <= 1"):
        make_config(depth=1, merges=4)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="merges: must be a non-negative integer"):
            make_config(merges=bad)
    with pytest.raises(ConfigError, match="merge_dtype: unknown value 'float16'"):
        make_config(merges=1, merge_dtype="float16")
    with pytest.raises(ConfigError, match="merge_kinds: unknown value 'della'"):
        make_config(merges=1, merge_kinds=("ties", "della"))
    for bad in ((), ("ties", "ties")):
        with pytest.raises(ConfigError, match="merge_kinds: must be one or more distinct kinds"):
            make_config(merges=1, merge_kinds=bad)


def test_fingerprint_of_a_zoo_without_merges_is_unchanged():
    # computed by the code before merges existed: a zoo built then still resumes
    assert fingerprint(ZooConfig()) == "3fbacc5a7783f49c"
    assert fingerprint(ZooConfig(merges=1)) != "3fbacc5a7783f49c"
    assert fingerprint(ZooConfig(merge_kinds=["linear", "task_arithmetic", "slerp"])) == "3fbacc5a7783f49c"
    assert fingerprint(ZooConfig(merges=1, merge_kinds=("ties",))) != fingerprint(ZooConfig(merges=1))
    # the merged models' dtype or kinds without merged models build the same zoo: --merge-dtype alone refused its
    # resume
    assert fingerprint(ZooConfig(merge_dtype="bfloat16")) == "3fbacc5a7783f49c"
    assert fingerprint(ZooConfig(merge_kinds=("ties",))) == "3fbacc5a7783f49c"
    assert fingerprint(ZooConfig(merges=1, merge_dtype="bfloat16")) != fingerprint(ZooConfig(merges=1))


def test_merged_state_by_hand():
    a = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(5)}
    p = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(7)}
    lin = merged_state({"kind": "linear", "weights": [0.25, 0.75]}, [a, b])
    assert torch.allclose(lin["w"], torch.tensor([0.25, 0.75])) and lin["n"].item() == 5  # ints: the main parent's
    ta = merged_state({"kind": "task_arithmetic", "weights": [-0.5, 0.8, 0.7]}, [p, a, b])
    assert torch.allclose(ta["w"], torch.tensor([0.3, 0.2]))  # P + 0.8 (A - P) + 0.7 (B - P)
    sl = merged_state({"kind": "slerp", "weights": [0.5, 0.5]}, [a, b], dtype="bfloat16")
    assert sl["w"].dtype == torch.bfloat16
    assert torch.allclose(sl["w"].float(), torch.tensor([0.7071, 0.7071]), atol=4e-3)  # on the unit circle
    assert torch.allclose(slerp(0.25, a["w"], b["w"]), torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    assert torch.allclose(slerp(0.5, torch.tensor([1.0, 0]), torch.tensor([3.0, 0])), torch.tensor([2.0, 0]))  # parallel


def test_zoo_with_merges_builds_resumes_and_reads(tmp_path, make_config):
    config = make_config(merges=2, merge_dtype="bfloat16")
    manifest = make_zoo(config, tmp_path, workers=1)
    merges = manifest.merges()
    assert sorted(merges) == ["t0.merge0", "t0.merge1", "t1.merge0", "t1.merge1"]
    rec = manifest["t0.merge1"]
    assert rec.method == "merge" and rec.storage == "full" and 0 <= rec.train["test_acc"] <= 1
    parents = [load_file(str(tmp_path / p / "model.safetensors")) for p in rec.merge["parents"]]
    got = load_file(str(tmp_path / rec.name / "model.safetensors"))
    want = merged_state(rec.merge, parents, "bfloat16")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((tmp_path / rec.name / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_manifest(tmp_path).merges() == merges
    again = make_zoo(config, tmp_path, workers=1)  # resumed: nothing rebuilt, the same records
    assert again.models == manifest.models
    plain = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert ["merge" in m for m in plain] == [m.method == "merge" for m in manifest.models]  # only merges say it


def test_a_zoo_of_sparse_merges_builds(tmp_path, make_config):
    config = make_config(trees=1, merges=2, merge_kinds=("ties", "dare_linear"))
    manifest = make_zoo(config, tmp_path, workers=1)
    for name, merge in manifest.merges().items():
        parents = [load_file(str(tmp_path / p / "model.safetensors")) for p in merge["parents"]]
        got = load_file(str(tmp_path / name / "model.safetensors"))
        assert all(torch.equal(got[k], v) for k, v in merged_state(merge, parents).items())
        zeros = sum(int((got[k] == parents[0][k]).sum()) for k in got)  # values left at the base's: trimmed or dropped
        assert zeros > 0.05 * sum(v.numel() for v in got.values())
    assert [m["kind"] for m in manifest.merges().values()] == ["ties", "dare_linear"]


def test_manifest_checks_merge_records(tmp_path):
    ok = {"name": "m", "path": "m", "parent": "a", "tree": "t", "merge": {"parents": ["a", "b"], "weights": [0.6, 0.4]}}
    assert _record(tmp_path / "manifest.json", 3, ok).merge["parents"] == ["a", "b"]
    for merge in ({"parents": ["a"], "weights": [1.0]}, {"parents": ["a", "a"], "weights": [0.5, 0.5]},
                  {"parents": ["a", "b"], "weights": [1.0]}, {"parents": ["a", "b"], "weights": ["x", 1]},
                  {"parents": ["a", "b"], "weights": [float("nan"), 1]},  # NaN and inf were taken as weights
                  {"parents": ["a", "b"], "weights": [float("inf"), 0.5]}):
        with pytest.raises(ManifestError, match=r"manifest.json: model #3 key 'merge' must hold 'parents'"):
            _record(tmp_path / "manifest.json", 3, {**ok, "merge": merge})
    models = [ModelRecord("a", "a", None, "t"), ModelRecord("m", "m", "a", "t", merge={"parents": ["a", "z"], "weights": [1, 0]})]
    with pytest.raises(ManifestError, match="model 'm' is a merge of 'z', which is not in the manifest"):
        Manifest(models)
    models[1] = ModelRecord("m", "m", "a", "t", merge={"parents": ["a", "m"], "weights": [0.5, 0.5]})
    with pytest.raises(ManifestError, match="model 'm' is a merge of itself"):  # was scored as a missed merge
        Manifest(models)


def test_planned_names_of_a_manifest_written_before_merges(make_config):
    config = make_config(depth=1).to_dict()
    old = {k: v for k, v in config.items() if k not in ("merges", "merge_dtype", "merge_kinds")}
    assert planned_names({**old, "arch_config": {}}) == model_names(make_config(depth=1))


def test_a_large_star_draws_its_merges_without_listing_its_pairs(make_config, monkeypatch):
    # listing a 3,000-star's 4.5M pairs took 13 s a plan; a star of 100,000 would have 5e9
    from modelatlas.zoo import merged as MZ

    def refuse(*args):
        raise AssertionError("a tree of 3,000 fine-tunes listed its pairs")

    monkeypatch.setattr(MZ, "_PairLists", refuse)
    config = make_config(shape="star", depth=1, trees=1, children=3000, merges=6, method="full",
                         merge_kinds=("linear", "task_arithmetic", "slerp", "ties"))
    nodes = [{"name": "t0", "parent": None, "tree": "t0", "level": 0, "task": {"dataset": "digits"}}]
    nodes += [{"name": f"t0.{j}", "parent": "t0", "tree": "t0", "level": 1, "task": {"dataset": "digits"}}
              for j in range(3000)]
    merges = MZ.plan_merges(config, nodes)
    by_name = {n["name"]: n for n in nodes}
    assert len({frozenset(m["merge"]["parents"][-2:]) for m in merges}) == 6
    for m in merges:
        assert all(by_name[p]["tree"] == "t0" and p != m["name"] for p in m["merge"]["parents"])
        if m["merge"]["kind"] in ("task_arithmetic", "ties"):
            assert m["merge"]["parents"][0] == "t0"  # two siblings on their parent
    assert MZ.plan_merges(config, nodes) == merges  # seeded
