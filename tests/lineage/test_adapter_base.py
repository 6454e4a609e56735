"""The base PEFT adapters are merged onto (``adapter_base=``, ``--base``) is the root of its tree: each adapter
merged onto it was trained from it, whatever the kurtosis says."""

import pytest

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.orient import hung_from
from modelatlas.weights import open_checkpoint


def _recover(fam, paths, **params):
    with open_checkpoint(fam / "base.safetensors") as base:
        return recover_lineage(paths, adapter_base=base, **params)


# before the fix: with 2 adapters and stage specialize (mst and joint), with 3 and stage auto or generalize, and
# with the base given last, an adapter was the root and the base its child (score 0.00)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("stage", ["auto", "specialize", "generalize"])
@pytest.mark.parametrize("placement", ["mst", "joint"])
@pytest.mark.parametrize("base_first", [True, False])
def test_the_adapter_base_is_the_root_of_its_tree(tmp_path, make_adapter_family, n, stage, placement, base_first):
    fam = make_adapter_family(tmp_path / "fam", n=n)
    adapters = [fam / f"a{k}" for k in range(n)]
    paths = [fam / "base.safetensors", *adapters] if base_first else [*adapters, fam / "base.safetensors"]
    f = _recover(fam, paths, stage=stage, placement=placement)
    names = [f"a{k}" for k in range(n)]
    assert f.roots() == ["base"] and f.parents() == {"base": None, **dict.fromkeys(names, "base")}
    given = f.decisions["adapter_base"]
    assert given["base"] == "base" and given["merged"] == names and not given["apart"]
    assert given["root_by_weights"] in ["base", *names]  # the root the kurtosis alone chose, kept for the record
    if placement == "mst":
        assert f.decisions["root_confidence"] == [1.0]
        assert all(e.score == pytest.approx(0.5, abs=0.01) for e in f.edges)  # margin: rank 2 from base, 4 apart


def test_no_adapter_base_among_the_models_records_nothing(tmp_path, make_adapter_family):
    fam = make_adapter_family(tmp_path / "fam", n=2)
    f = _recover(fam, [fam / "a0", fam / "a1"], stage="specialize")  # the base merged onto, but not compared
    assert "adapter_base" not in f.decisions and sorted(f.nodes) == ["a0", "a1"]


def test_hung_from_turns_the_path_to_the_new_root_round():
    # 0 -> 1 -> 2 -> 3 and 1 -> 4, hung from 3: 3 -> 2 -> 1 -> 0, 1 -> 4 kept
    assert hung_from([-1, 0, 1, 2, 1], 3) == [1, 2, 3, -1, 1]
    assert hung_from([-1, 0, 1], 0) == [-1, 0, 1]


def test_an_adapter_equal_to_the_base_is_its_copy_given_first_or_not(tmp_path, make_adapter_family):
    import shutil

    from safetensors.torch import load_file, save_file

    fam = make_adapter_family(tmp_path / "fam", n=2)
    shutil.copytree(fam / "a0", fam / "z")  # PEFT's initial adapter: B = 0, the merged model is the base
    saved = load_file(str(fam / "a0" / "adapter_model.safetensors"))
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in saved.items()}, str(fam / "z" / "adapter_model.safetensors"))
    f = _recover(fam, [fam / "z", fam / "a0", fam / "base.safetensors", fam / "a1"])
    # was: z the root (or below a0), base its "duplicate" child
    assert f.roots() == ["base"] and f.nodes[0] == "base" and f.decisions["duplicates"] == {"z": "base"}
    assert {(e.parent, e.child, e.kind) for e in f.edges} == {("base", "z", "duplicate"), ("base", "a0", "trained"),
                                                              ("base", "a1", "trained")}
    assert f.decisions["adapter_base"]["merged"] == ["z", "a0", "a1"] and not f.decisions["adapter_base"]["apart"]


def test_an_adapter_trained_on_from_another_stays_below_it(tmp_path, make_adapter_family):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    fam = make_adapter_family(tmp_path / "fam", n=3)
    shutil.copytree(fam / "a1", fam / "c")  # a1's training gone on: its factors moved a little
    g = torch.Generator().manual_seed(9)
    saved = load_file(str(fam / "a1" / "adapter_model.safetensors"))
    save_file({k: v + 0.03 * torch.randn(v.shape, generator=g) for k, v in saved.items()},
              str(fam / "c" / "adapter_model.safetensors"))
    paths = [fam / "base.safetensors", *(fam / f"a{k}" for k in range(3)), fam / "c"]
    # (the rank distance sees c - a1 as rank 4, c - base as 2); specialize: the stage auto chose (no evidence)
    # before the known descents voted on it, under which the weights alone chose a1 as the root
    f = _recover(fam, paths, distance="l2", stage="specialize")
    assert f.parents() == {"base": None, "a0": "base", "a1": "base", "a2": "base", "c": "a1"}
    assert f.decisions["adapter_base"]["root_by_weights"] == "a1"  # was the root, the base below it
