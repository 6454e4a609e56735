"""Models whose layers differ by a few blocks (a head, a tower): compared on the layers they share."""

import pytest
import torch

from modelatlas.cli.main import main
from modelatlas.lineage import recover_lineage
from modelatlas.lineage.shared_layers import MIN_SHARE, common_layers, joined_signatures
from modelatlas.lineage.sources import MemoryCheckpoint
from modelatlas.lineage.synthetic import make_synthetic_forest

S = (8, 8)


def make_sig(*names, shape=S):
    return tuple(sorted((n, shape) for n in names))


@pytest.mark.parametrize("a, b, want", [
    (make_sig("a", "b"), make_sig("a", "b", "v"), (make_sig("a", "b"), "", "")),  # one more layer
    (make_sig("a", "b"), make_sig("lm.a", "lm.b", "vision.x"), (make_sig("a", "b"), "", "lm.")),  # under a prefix
    (make_sig("m.a", "m.b", "m.c", "head"), make_sig("a", "b", "c", "cls"), (make_sig("a", "b", "c"), "m.", "")),
    (make_sig("x.w"), make_sig("enc.x.w", "dec.x.w"), None),  # two places it could be: a guess, not a match
    (make_sig("a", "b"), make_sig("a", "v", "w"), (make_sig("a"), "", "")),  # a third of b's weights
    (make_sig("a", "b"), make_sig("a", "u", "v", "w", "z"), None),  # a fifth of b's: under MIN_SHARE
    (make_sig("a", "b"), make_sig("a", "b", shape=(8, 4)) + make_sig("v"), None),  # other shapes
    (make_sig("a", "b"), make_sig("xa", "xb", "v"), None),  # "x" is no first component
    (make_sig("x.w"), make_sig("model.y.w"), None),  # "w" alone, the last component: no evidence
    (make_sig("x.w", "v.w"), make_sig("m.x.w", "m.v.w", "u"), (make_sig("x.w", "v.w"), "", "m.")),
])
def test_common_layers_worked_examples(a, b, want):
    assert common_layers(a, b) == want
    assert common_layers(b, a) == (None if want is None else (want[0], want[2], want[1]))


def test_groups_join_by_what_they_share_transitively_and_in_any_order():
    base, tower, more = make_sig("a", "b"), make_sig("a", "b", "v"), make_sig("m.a", "m.b", "m.v", "w")
    got = joined_signatures([base, tower, more])
    assert got == {base: (base, ""), tower: (base, ""), more: (base, "m.")}  # more holds tower, which holds base
    assert joined_signatures([more, tower, base]) == got
    assert joined_signatures([tower]) == {}
    # a pretrained checkpoint with its masked-LM head, two fine-tunes with heads of their own: the encoder
    mlm, cls = make_sig("enc.0", "enc.1", "lm_head.dense"), make_sig("enc.0", "enc.1", "classifier.dense")
    qa = make_sig("model.enc.0", "model.enc.1", "model.pre_qa")
    got = joined_signatures([mlm, cls, qa])
    assert {s: got[s][1] for s in got} == {mlm: "", cls: "", qa: "model."}
    assert {got[s][0] for s in got} == {make_sig("enc.0", "enc.1")}


def test_a_small_shared_part_does_not_join():
    # one 8 x 8 matrix shared by a model of 64 x 64 layers: under MIN_SHARE of its weights, not one architecture
    small, big = make_sig("a"), make_sig("a") + make_sig("h1", "h2", shape=(64, 64))
    assert 64 / (64 + 2 * 64 * 64) < MIN_SHARE
    assert joined_signatures([small, big]) == {}


def make_tower_family(frozen: bool = False):
    """A 13-model tree (3 children x depth 2) whose t0_1 branch added a square layer "vision.proj" (inherited and
    fine-tuned below it); ``frozen``: t0_1 trained the new layer only (its other layers are t0's)."""
    weights, parents = make_synthetic_forest(1, 3, 2, 16, step=0.05, seed=3, layers=("a", "b", "c", "vision.proj"))
    for name, tensors in weights.items():
        if not name.startswith("t0_1"):
            del tensors["vision.proj"]
    if frozen:
        weights["t0_1"].update({k: v for k, v in weights["t0"].items()})
    return [MemoryCheckpoint(n, t) for n, t in weights.items()], parents


def test_a_branch_that_added_a_layer_stays_in_its_tree():
    """Grouped by their exact layer sets, the t0_1 branch was a second tree, "found from the data"."""
    ckpts, parents = make_tower_family()
    forest = recover_lineage(ckpts)
    assert forest.decisions["architectures"] == 1 and forest.decisions["n_trees"] == 1
    assert {(e.parent, e.child) for e in forest.edges} == {(p, c) for c, p in parents.items() if p}
    assert forest.decisions["shared_layers"] == {
        n: {"compared": 3, "not_compared": 1, "examples": ["vision.proj"]} for n in parents if n.startswith("t0_1")}


@pytest.mark.parametrize("first", [False, True])
def test_a_model_equal_on_the_shared_layers_but_with_more_is_no_copy(first):
    """A projector trained on a frozen model: equal to it on every compared layer, and was called identical.
    The one that added layers is placed below the other, given first or not."""
    ckpts, _ = make_tower_family(frozen=True)
    if first:
        ckpts.sort(key=lambda c: c.name != "t0_1")
    forest = recover_lineage(ckpts)
    assert "t0_1" not in forest.decisions.get("duplicates", {})
    assert forest.decisions["outside_layers"]["t0_1"]["like"] == "t0"
    assert forest.decisions["outside_layers"]["t0_1"]["differs_in"] == ["vision.proj (only in t0_1)"]


def test_the_command_line_names_the_layers_not_compared_and_architectures_apart(tmp_path, capsys):
    from safetensors.torch import save_file

    ckpts, _ = make_tower_family()
    for ck in ckpts:
        save_file({k: ck.read(k).contiguous() for k in ck.keys()}, str(tmp_path / f"{ck.name}.safetensors"))
    save_file({"z": torch.ones(4, 4)}, str(tmp_path / "other.safetensors"))  # another architecture
    assert main(["lineage", "recover", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "t0_1_2: has 1 layer the models it was compared with lack (vision.proj): compared on the 3 they share" \
        in err.splitlines()
    assert "14 models, 2 trees (found from the data; 2 architectures, compared apart)" in out


def test_a_multimodal_fine_tune_under_its_own_prefix_joins_its_language_model():
    """LLaVA-style names: the chat model's layers under "language_model." beside a vision tower's."""
    layers = ("model.layers.0.q", "model.layers.0.o", "model.layers.1.q", "vision_tower.0.q", "vision_tower.1.q")
    weights, parents = make_synthetic_forest(1, 2, 2, 16, step=0.05, seed=5, layers=layers)
    ckpts = []
    for name, tensors in weights.items():
        if name.startswith("t0_1"):  # the multimodal branch: every name under language_model. but the tower's
            tensors = {(k if k.startswith("vision") else "language_model." + k): v for k, v in tensors.items()}
        else:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("vision")}
        ckpts.append(MemoryCheckpoint(name, tensors))
    forest = recover_lineage(ckpts)
    assert forest.decisions["architectures"] == 1
    assert {(e.parent, e.child) for e in forest.edges} == {(p, c) for c, p in parents.items() if p}
    assert forest.decisions["shared_layers"]["t0_1"] == {"compared": 3, "not_compared": 2,
                                                         "examples": ["vision_tower.0.q", "vision_tower.1.q"]}


def test_the_command_line_says_why_a_model_with_more_layers_is_placed_below(tmp_path, capsys):
    from safetensors.torch import save_file

    ckpts, _ = make_tower_family(frozen=True)
    for ck in ckpts:
        save_file({k: ck.read(k).contiguous() for k in ck.keys()}, str(tmp_path / f"{ck.name}.safetensors"))
    assert main(["lineage", "recover", str(tmp_path)]) == 0
    assert ("t0_1: equal to t0 on the compared layers, but differs in vision.proj (only in t0_1): placed below it "
            "with score 0 (it has layers the other lacks: added in training, most likely)") in capsys.readouterr().err


def test_a_pretrained_checkpoint_with_its_lm_head_roots_its_classifier_fine_tunes():
    """roberta-base is saved with a square lm_head.dense, its sequence classifiers with classifier.dense: neither
    holds the other, and the base was drawn apart, a tree of its own."""
    layers = tuple(f"roberta.encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in "qkv")
    weights, parents = make_synthetic_forest(1, 3, 1, 16, step=0.05, seed=1, layers=layers + ("head.dense.weight",))
    ckpts = []
    for name, tensors in weights.items():
        head = "lm_head" if name == "t0" else "classifier"
        ckpts.append(MemoryCheckpoint(name, {k.replace("head.", head + "."): v for k, v in tensors.items()}))
    forest = recover_lineage(ckpts)
    assert forest.decisions["architectures"] == 1
    assert {(e.parent, e.child) for e in forest.edges} == {(p, c) for c, p in parents.items() if p}
    assert forest.decisions["shared_layers"]["t0"] == {"compared": 6, "not_compared": 1,
                                                       "examples": ["lm_head.dense.weight"]}


def test_no_join_is_looked_for_among_more_layer_sets_than_the_cap(monkeypatch):
    from modelatlas.lineage import shared_layers

    sigs = [make_sig("a", "b"), make_sig("a", "b", "v"), make_sig("a", "b", "w")]
    assert len(shared_layers.joined_signatures(sigs)) == 3
    monkeypatch.setattr(shared_layers, "MAX_SIGNATURES", 2)
    assert shared_layers.joined_signatures(sigs) == {}


@pytest.mark.parametrize("same_tower", [False, True])
def test_two_multimodal_models_equal_on_the_language_model_are_told_apart_by_their_towers(same_tower):
    """A view under language_model. lists only the shared part: their towers were "only in" each, or unread."""
    g = torch.Generator().manual_seed(0)
    lm = {f"model.layers.{i}.q": torch.randn(16, 16, generator=g) for i in range(3)}
    tuned = {k: v + 0.05 * torch.randn(16, 16, generator=g) for k, v in lm.items()}
    tower = {f"vision_tower.{i}.q": torch.randn(16, 16, generator=g) for i in range(2)}
    other = tower if same_tower else {k: v + 0.05 for k, v in tower.items()}
    ckpts = [MemoryCheckpoint("llm", lm),
             MemoryCheckpoint("mm-a", {**{"language_model." + k: v for k, v in tuned.items()}, **tower}),
             MemoryCheckpoint("mm-b", {**{"language_model." + k: v for k, v in tuned.items()}, **other})]
    forest = recover_lineage(ckpts, stage="specialize")
    if same_tower:
        assert forest.decisions["duplicates"] == {"mm-b": "mm-a"} and "outside_layers" not in forest.decisions
    else:
        assert forest.decisions["outside_layers"]["mm-b"]["differs_in"] == ["vision_tower.0.q", "vision_tower.1.q"]


def test_shape_families_link_layer_sets_through_shapes_they_hold_in_common():
    from modelatlas.lineage.shared_layers import shape_families

    a, b = make_sig("a", "b"), make_sig("x", shape=(4, 4)) + make_sig("y")  # b holds an 8 x 8 layer too
    c, d = make_sig("z", shape=(4, 4)), make_sig("u", shape=(2, 2))
    assert shape_families([a, b, c, d]) == [[a, b, c], [d]]  # a-b by (8, 8), b-c by (4, 4)
    assert shape_families([]) == []


def test_the_cap_counts_the_layer_sets_of_one_shape_family_not_of_the_folder(monkeypatch):
    from modelatlas.lineage import shared_layers

    narrow = [make_sig("a", "b"), make_sig("a", "b", "v")]
    wide = [make_sig("a", "b", shape=(16, 16)), make_sig("a", "b", "head", shape=(16, 16))]
    monkeypatch.setattr(shared_layers, "MAX_SIGNATURES", 2)
    got = shared_layers.joined_signatures(narrow + wide)  # 4 layer sets, two families of 2: each joined
    assert got == {narrow[0]: (narrow[0], ""), narrow[1]: (narrow[0], ""), wide[0]: (wide[0], ""),
                   wide[1]: (wide[0], "")}


@pytest.mark.parametrize("seed", range(6))
def test_joins_per_family_equal_joins_over_all_layer_sets(seed):
    from modelatlas.lineage.shared_layers import _join, shape_families

    g = torch.Generator().manual_seed(seed)
    shapes, names = [(8, 8), (16, 16), (4, 4), (8, 4)], ["a", "b", "c", "m.a", "m.b", "head", "x.w", "y.w"]
    sigs = set()
    for _ in range(12):  # random layer sets, each of one width but a few layers: families, prefixes, ties
        k, width = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g))
        pick = torch.randperm(len(names), generator=g)[:k].tolist()
        odd = (torch.rand(k, generator=g) < 0.05).tolist()  # a layer of another width now and then: links families
        sigs.add(tuple(sorted((names[i], shapes[(width + o) % 4]) for i, o in zip(pick, odd))))
    assert len(shape_families(sorted(sigs))) >= 2  # the case the families are for
    assert joined_signatures(list(sigs)) == _join(sorted(sigs))  # the brute-force oracle: one family of all
