import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import AtlasError, ConfigError
from modelatlas.lineage import LineageConfig, LineageRecovery, recover_lineage
from modelatlas.lineage.scoring import score_forest
from modelatlas.lineage.synthetic import make_synthetic_forest


@pytest.mark.parametrize("method,stage", [("full", "specialize"), ("full", "generalize"), ("lora", "specialize")])
def test_recovers_synthetic_forest(method, stage):
    weights, parents = make_synthetic_forest(method=method, stage=stage, seed=3)
    est = LineageRecovery(LineageConfig(stage="auto" if method == "full" else stage)).fit(weights)
    s = score_forest(est.forest_, parents)
    assert s.ari == 1.0 and est.n_trees_ == 3
    assert s.undirected == 1.0
    # synthetic LoRA steps (Gaussian products) barely move kurtosis: direction is the weak part there
    assert s.directed >= (0.95 if method == "full" else 0.8)
    if method == "full":
        assert est.stage_ == stage and est.stage_confidence_ > 0.9
    assert est.decisions_["distance"] == ("rank" if method == "lora" else "nuclear*rank")


def test_fitted_attributes_and_twin():
    weights, _ = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=1)
    est = LineageRecovery(n_trees=2, stage="specialize").fit(weights)
    n = len(weights)
    assert est.names_ == list(weights) and est.distances_.shape == (n, n) and est.kurtosis_.shape == (n,)
    assert len(est.edges_) == n - 2 and len(est.roots_) == 2 and est.clusters_.shape == (n,)
    assert all(0 <= e.score <= 1 for e in est.edges_)
    assert est.stage_ == "specialize" and est.stage_confidence_ == 1.0
    conf, runner = est.decisions_["root_confidence"], est.decisions_["root_runner_up"]
    assert len(conf) == len(runner) == 2 and all(0.5 <= c <= 1 for c in conf)
    for tree, r in zip(est.forest_.trees, runner):  # the runner-up is another model of the same tree
        assert r in tree and r not in est.roots_
    twin = recover_lineage(weights, n_trees=2, stage="specialize")
    assert [(e.parent, e.child) for e in twin.edges] == [(e.parent, e.child) for e in est.edges_]


def test_a_one_model_tree_has_no_runner_up_root():
    """A tree of one model gave itself as its runner-up root ("root_runner_up": ["t0"] in the JSON)."""
    weights, _ = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=1)
    weights = {n: w for n, w in weights.items() if n != "t1" and not n.startswith("t1_")} | {"t1": weights["t1"]}
    forest = LineageRecovery(n_trees=2, stage="specialize").fit(weights).forest_
    runner = dict(zip(forest.roots(), forest.decisions["root_runner_up"]))
    assert runner["t1"] is None and runner["t0"] in {"t0_0", "t0_1"}
    assert forest.to_dict()["decisions"]["root_runner_up"] == [runner[r] for r in forest.roots()]


def test_architectures_are_separated_not_crashed_on():
    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, dim=16, seed=2)
    other, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, dim=8, seed=5)
    weights.update({f"small_{k}": v for k, v in other.items()})
    est = LineageRecovery().fit(weights)
    assert est.n_trees_ == 2 and est.decisions_["architectures"] == 2
    trees = [set(t) for t in est.forest_.trees]
    assert {"small_t0", "small_t0_0", "small_t0_1"} in trees
    assert np.isnan(est.distances_[0, -1])
    with pytest.raises(ConfigError, match=r"n_trees \(--trees\) = 1 is impossible: the models form 2 architecture"):
        LineageRecovery(n_trees=1).fit(weights)


def test_impossible_tree_count_counts_copies_once():
    w = torch.randn(8, 8)
    with pytest.raises(ConfigError, match=r"1 architecture group\(s\) of 1 distinct model\(s\) \(copies, and models equal"):
        recover_lineage({"a": {"w": w}, "b": {"w": w.clone()}, "c": {"w": w.clone()}}, n_trees=2)  # "of 1 models"


def test_layer_regex_and_skipped_models():
    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=2)
    weights["odd"] = {"bias": torch.zeros(4)}
    f = recover_lineage(weights, layers=r"attn\.v")
    assert f.decisions["layers"] == ["regex 'attn\\.v'"]  # the pattern as typed, not its repr (doubled \\)
    assert "odd" in f.skipped and "no tensor matches the layers pattern 'attn\\.v'" in f.skipped["odd"]
    assert "--" not in f.skipped["odd"]  # a library reason names the parameter, not the CLI's --layers


def test_a_layer_regex_that_matches_nothing_names_the_matrices_to_match():
    # "no tensor matches the layers pattern 'fc'" left a user with checkpoints of unknown layout to dump headers
    weights = {"a": {"embed.weight": torch.randn(4, 8), "layers.0.weight": torch.randn(4, 4), "layers.0.bias":
                     torch.zeros(4), "layers.1.weight": torch.randn(4, 4), "head.weight": torch.randn(2, 4)},
               "b": {"fc.weight": torch.randn(4, 4)}}
    f = recover_lineage(weights, layers="fc")
    assert f.skipped["a"].endswith("no tensor matches the layers pattern 'fc' (its matrices: embed.weight, layers.0.weight, "
                              "layers.1.weight, ...)")


def test_layer_regex_that_matches_only_vectors_says_so():
    weights, _ = make_synthetic_forest(n_trees=1, children=1, depth=1, seed=2)
    weights = {name: {**w, "l0.bias": torch.zeros(4)} for name, w in weights.items()}
    with pytest.raises(AtlasError, match=r"the layers pattern 'bias' matches only l0\.bias, which are not float "
                                         r"tensors of 2"):
        recover_lineage(weights, layers="bias")  # it matches a name: "no tensor matches" read as a typo


def test_paths_and_broken_file(tmp_path):
    weights, parents = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=4)
    for name, tensors in weights.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    paths = sorted(tmp_path.iterdir())
    f = recover_lineage(paths, stage="specialize")
    assert "broken" in f.skipped and "broken.safetensors" in f.skipped["broken"]
    assert set(f.nodes) == set(weights)
    assert score_forest(f, parents).undirected == 1.0


def test_same_seed_same_result():
    weights, _ = make_synthetic_forest(method="lora", seed=6)
    a, b = recover_lineage(weights, seed=1), recover_lineage(weights, seed=1)
    assert a.to_dict() == b.to_dict()


def test_live_tensors_passed_in_are_left_unchanged():
    # MemoryCheckpoint hands recovery the caller's own tensors (no copy of a live model): nothing may write to them
    weights, _ = make_synthetic_forest(2, 2, 2, dim=300, method="lora")  # 300 > 2s rows: the sketched path
    before = {m: {k: t.clone() for k, t in sd.items()} for m, sd in weights.items()}
    recover_lineage(weights)
    assert all(torch.equal(weights[m][k], before[m][k]) for m in weights for k in weights[m])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="stage must be one of"):
        LineageConfig(stage="sideways")
    with pytest.raises(ConfigError, match="lam"):
        LineageConfig(lam=-1)
    with pytest.raises(ConfigError, match=r"layers \(--layers\): invalid regular expression"):
        LineageConfig(layers="(")
    # each was accepted: lam = inf gave NaN edge costs (a silently wrong forest), a float sketch a TypeError
    # deep in the sketch, n_trees=True one tree
    for field, bad in [("lam", float("inf")), ("root_prior", float("inf")), ("sketch", 8.5), ("n_trees", True),
                       ("seed", 1.5), ("seed", 2**64)]:  # 2**64: seeds are reduced to 64 bits, it repeated 0
        with pytest.raises(ConfigError, match=field):
            LineageConfig(**{field: bad})
    with pytest.raises(ConfigError, match=r"n_trees \(--trees\): the mother-paper recipe must be told"):
        LineageConfig(method="mother-paper", stage="specialize")
    with pytest.raises(ConfigError, match="no model could be compared"):
        recover_lineage({"a": {"b": torch.zeros(3)}})


def test_all_skipped_error_names_the_reasons(tmp_path):
    # the reasons used to be printed only after a successful fit, so "see the reasons above" showed none
    bad = [tmp_path / f"m{i}.safetensors" for i in range(5)]
    for p in bad:
        p.write_bytes(b"garbage!")
    with pytest.raises(ConfigError) as err:
        recover_lineage(bad)
    msg = str(err.value)
    assert "m0.safetensors: corrupt safetensors header" in msg and "and 2 more" in msg and "\n" not in msg


@pytest.mark.parametrize("method,expected", [("full", "l2"), ("lora", "rank")])
def test_mother_paper_auto_distance_is_the_recipes_own(method, expected):
    """``--method mother-paper`` with the default ``--distance auto`` must not use nuclear*rank."""
    weights, _ = make_synthetic_forest(n_trees=2, children=2, depth=1, method=method, seed=3)
    f = recover_lineage(weights, method="mother-paper", n_trees=2, stage="specialize")
    assert f.decisions["distance"] == expected


def test_mother_paper_baseline_runs():
    weights, parents = make_synthetic_forest(seed=3)
    f = recover_lineage(weights, method="mother-paper", n_trees=3, stage="specialize", distance="l2")
    assert f.decisions["method"] == "mother-paper" and f.decisions["distance"] == "l2"
    assert score_forest(f, parents).ari == 1.0


def test_weight_updates_without_base_are_skipped():
    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=2)
    from modelatlas.lineage.sources import MemoryCheckpoint

    delta = MemoryCheckpoint("adapter", weights["t0_0"])
    delta.kind = "lora_delta"
    ckpts = [MemoryCheckpoint(k, v) for k, v in weights.items()] + [delta]
    f = recover_lineage(ckpts)
    assert "adapter" not in f.nodes and "holds a weight update (lora_delta), not a model" in f.skipped["adapter"]


def test_adapters_are_merged_onto_the_adapter_base(tmp_path):
    import json

    from modelatlas.weights import open_checkpoint
    g = torch.Generator().manual_seed(1)
    save_file({"w.weight": torch.randn(8, 8, generator=g)}, str(tmp_path / "base.safetensors"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["w"]}))
        save_file({"base_model.model.w.lora_A.weight": torch.randn(1, 8, generator=g),
                   "base_model.model.w.lora_B.weight": torch.randn(8, 1, generator=g)},
                  str(tmp_path / name / "adapter_model.safetensors"))
    paths = [tmp_path / "base.safetensors", tmp_path / "a", tmp_path / "b"]
    assert set(recover_lineage(paths).skipped) == {"a", "b"}
    with open_checkpoint(paths[0]) as base:
        f = recover_lineage(paths, adapter_base=base, stage="specialize")
        with open_checkpoint(paths[1], base=base) as merged:  # the merged weights are what was compared
            assert not torch.equal(merged.read("w.weight"), base.read("w.weight"))
    # rank-1 updates of one base: base is adjacent to both (direction: 3 models of one 8 x 8 layer are a guess)
    assert not f.skipped and {frozenset((e.parent, e.child)) for e in f.edges} == {frozenset("a") | {"base"},
                                                                                   frozenset("b") | {"base"}}


def test_model_failing_mid_read_is_skipped():
    from modelatlas.lineage.sources import MemoryCheckpoint

    class Broken(MemoryCheckpoint):
        def _read(self, name):
            raise OSError("read error on disk")

    weights, parents = make_synthetic_forest(n_trees=2, children=2, depth=1, seed=8)
    ckpts = [MemoryCheckpoint(k, v) for k, v in weights.items()] + [Broken("bad", weights["t0"])]
    est = LineageRecovery(stage="specialize").fit(ckpts)
    assert "bad" not in est.names_ and "read error on disk" in est.skipped_["bad"]
    assert score_forest(est.forest_, parents).undirected == 1.0


def make_poisoned(value, dim):
    """A 2-tree synthetic forest where child t0_0 holds one NaN / inf weight (a diverged checkpoint)."""
    weights, parents = make_synthetic_forest(n_trees=2, children=2, depth=1, dim=dim, seed=1)
    weights["t0_0"]["attn.q"][0, 0] = value
    return weights, {k: v for k, v in parents.items() if k != "t0_0"}


@pytest.mark.parametrize("value,dim", [(float("nan"), 16), (float("inf"), 16), (float("nan"), 300)])
def test_model_with_nan_or_inf_weights_is_skipped(value, dim):
    # one NaN used to poison the layer mean, hence every distance: scipy raised "must contain only finite values"
    weights, parents = make_poisoned(value, dim)
    f = recover_lineage(weights, stage="specialize", distance_sketch=16)  # dim 300: the streamed, sketched path
    assert "t0_0" not in f.nodes and "NaN or inf" in f.skipped["t0_0"] and "attn.q" in f.skipped["t0_0"]
    assert score_forest(f, parents).directed == 1.0


def test_identical_models_are_marked_duplicates_and_change_nothing_else():
    weights, parents = make_synthetic_forest(seed=3)
    plain = recover_lineage(weights)
    dup = dict(weights)
    dup["t0_1-copy"] = {k: v.clone() for k, v in weights["t0_1"].items()}  # a second save of a child
    dup["t2-again"] = {k: v.clone() for k, v in weights["t2"].items()}  # and of a root
    est = LineageRecovery().fit(dup)
    f = est.forest_
    kinds = {(e.parent, e.child): e.kind for e in f.edges}
    assert kinds[("t0_1", "t0_1-copy")] == kinds[("t2", "t2-again")] == "duplicate"
    assert f.decisions["duplicates"] == {"t0_1-copy": "t0_1", "t2-again": "t2"}
    trained = {(e.parent, e.child, round(e.score, 9)) for e in f.edges if e.kind == "trained"}
    assert trained == {(e.parent, e.child, round(e.score, 9)) for e in plain.edges}  # the rest is untouched
    assert f.nodes.index("t0_1-copy") == f.nodes.index("t0_1") + 1 and sorted(f.roots()) == sorted(plain.roots())
    i, j = est.names_.index("t2"), est.names_.index("t2-again")
    assert est.distances_[i, j] == 0 and est.clusters_[i] == est.clusters_[j] and est.kurtosis_[i] == est.kurtosis_[j]
    assert est.distances_.shape == (len(dup), len(dup)) and len(est.names_) == len(dup)
    assert score_forest(f, parents).directed == score_forest(plain, parents).directed  # copies not in the truth


def test_duplicate_edges_survive_json_and_are_drawn_as_identical():
    from modelatlas.lineage.export import to_dot, to_mermaid, to_text
    from modelatlas.lineage.forest import Edge, Forest
    f = Forest(["a", "b", "a2"], [Edge("a", "b", 0.7, 0.1), Edge("a", "a2", 1.0, 0.0, "duplicate")], trees=[["a", "b", "a2"]])
    back = Forest.from_dict(f.to_dict())
    assert [e.kind for e in back.edges] == ["trained", "duplicate"]
    assert "a2  (identical weights to a)" in to_text(f) and "b  (0.70)" in to_text(f)
    assert 'style=dashed' in to_dot(f) and '-.->|"identical"|' in to_mermaid(f)
    assert Forest.from_dict({"nodes": ["a", "b"], "edges": [{"parent": "a", "child": "b"}]}).edges[0].kind == "trained"


def check_shape_error(nodes, pairs, words):
    from modelatlas.errors import AtlasError
    from modelatlas.lineage.forest import Forest
    with pytest.raises(AtlasError, match=words):
        Forest.from_dict({"nodes": nodes, "edges": [{"parent": p, "child": c} for p, c in pairs]})


def test_from_dict_accepts_only_a_forest():
    from modelatlas.lineage.forest import Forest
    nodes = ["r", "a", "b", "c", "d"]
    chain = [("r", "a"), ("a", "b"), ("b", "c"), ("r", "d")]
    assert Forest.from_dict({"nodes": nodes, "edges": [{"parent": p, "child": c} for p, c in chain]}).roots() == ["r"]
    check_shape_error(nodes, [("a", "b"), ("b", "c"), ("c", "a")], r"cycle 'a' <- 'c' <- 'b' <- 'a'")
    check_shape_error(nodes, [("r", "a"), ("a", "b"), ("b", "c"), ("c", "b")], "second parent")
    check_shape_error(nodes, [("r", "a"), ("b", "c"), ("c", "d"), ("d", "b")], r"cycle 'b' <- 'd' <- 'c' <- 'b'")
    check_shape_error(["a", "b", "a"], [], "node 'a' is listed twice")
    check_shape_error(["a"], [("a", "x")], "names 'x', which is not in 'nodes'")


def test_lower_precision_saves_are_copies_not_fine_tunes():
    weights, parents = make_synthetic_forest(seed=3)
    plain = recover_lineage(weights)
    more = dict(weights)
    more["t0_1-fp16"] = {k: v.half() for k, v in weights["t0_1"].items()}  # the same model saved in float16
    more["t1-bf16"] = {k: v.bfloat16() for k, v in weights["t1"].items()}  # a root saved in bfloat16
    # a float16 model that is NOT a copy: a small fine-tune of t2 (0.5 %, far above float16 rounding)
    more["t2-tuned-fp16"] = {k: (v + 0.005 * v.std() * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).half()
                             for k, v in weights["t2"].items()}
    f = recover_lineage(more)
    kinds = {(e.parent, e.child): e.kind for e in f.edges}
    assert kinds[("t0_1", "t0_1-fp16")] == kinds[("t1", "t1-bf16")] == "precision"
    assert f.decisions["precision_copies"] == {"t0_1-fp16": "float16", "t1-bf16": "bfloat16"}
    assert f.decisions["duplicates"] == {"t0_1-fp16": "t0_1", "t1-bf16": "t1"}
    assert {k for (p, c), k in kinds.items() if "t2-tuned-fp16" in (p, c)} == {"trained"}  # a model of its own
    outside = {(e.parent, e.child) for e in plain.edges if not e.parent.startswith("t2")}
    assert outside <= {pc for pc, k in kinds.items() if k == "trained"}  # the copies change nothing else


def test_precision_edges_are_drawn_as_copies():
    from modelatlas.lineage.export import to_dot, to_mermaid, to_text
    from modelatlas.lineage.forest import Edge, Forest
    f = Forest(["a", "a16"], [Edge("a", "a16", 1.0, 0.0, "precision")], trees=[["a", "a16"]])
    assert "a16  (lower-precision copy of a)" in to_text(f)
    assert 'label="lower precision", style=dashed' in to_dot(f) and '-.->|"lower precision"|' in to_mermaid(f)
    assert Forest.from_dict(f.to_dict()).edges[0].kind == "precision"


def make_mixed_tree_matrices():
    """Hand-made (rms, rank fraction) of 5 models: root 0 with a LoRA child 4 and a FULL fine-tune 1, whose
    LoRA children 2 and 3 are its nearest models. Every model's nearest neighbour differs by a low rank; only
    the MST edge 0-1 (the full fine-tune) is full rank."""
    rms = np.array([[0, 1.0, 1.2, 1.2, 0.4],
                    [1.0, 0, 0.5, 0.5, 1.1],
                    [1.2, 0.5, 0, 0.7, 1.3],
                    [1.2, 0.5, 0.7, 0, 1.3],
                    [0.4, 1.1, 1.3, 1.3, 0]])
    frac = np.array([[0, 0.6, 0.65, 0.65, 0.06],
                     [0.6, 0, 0.06, 0.06, 0.6],
                     [0.65, 0.06, 0, 0.12, 0.66],
                     [0.65, 0.06, 0.12, 0, 0.66],
                     [0.06, 0.6, 0.66, 0.66, 0]])
    return rms, frac


def test_a_full_fine_tune_among_lora_children_keeps_the_tree_off_rank_distance():
    from modelatlas.lineage.tree_distance import _auto_kind

    rms, frac = make_mixed_tree_matrices()
    seen = np.ones_like(rms)  # unquantized: every update in plain sight
    near = np.argmin(rms + np.diag(np.full(5, np.inf)), axis=1)
    assert (frac[np.arange(5), near] < 0.25).all()  # what the old nearest-neighbour rule looked at
    assert _auto_kind(rms, frac, seen, paper=False) == "nuclear*rank"  # MST edges: 0.06, 0.06, 0.06, 0.6 -> 0.9 quantile 0.44
    lora = np.where(frac > 0.25, 0.12, frac)  # the same tree, all LoRA
    np.fill_diagonal(lora, 0)
    assert _auto_kind(rms, lora, seen, paper=False) == "rank"


def test_checkpoints_named_alike_in_different_runs_are_told_apart_by_folder(tmp_path):
    """runA/checkpoint-500 and runB/checkpoint-500 used to be refused as duplicate names."""
    weights, _ = make_synthetic_forest(n_trees=1, children=2, depth=1, seed=1)
    for run, name in (("runA", "t0_0"), ("runB", "t0_1")):
        (tmp_path / run).mkdir()
        save_file(weights[name], str(tmp_path / run / "checkpoint-500.safetensors"))
    save_file(weights["t0"], str(tmp_path / "base.safetensors"))
    (tmp_path / "runB" / "broken.safetensors").write_bytes(b"\xff")
    (tmp_path / "runA" / "broken.safetensors").write_bytes(b"\xff")
    paths = [tmp_path / "base.safetensors", *sorted(tmp_path.glob("run*/*.safetensors"))]
    f = recover_lineage(paths, stage="specialize")
    assert sorted(f.nodes) == ["base", "runA/checkpoint-500", "runB/checkpoint-500"]
    assert sorted(f.skipped) == ["runA/broken", "runB/broken"]
    with pytest.raises(ConfigError, match=r"\['base'\] appear more than once \(the same model given twice"):
        recover_lineage([paths[0], paths[0], paths[1]])


def test_an_up_cast_copy_is_found_by_its_values():
    """A model rounded to float16 or bfloat16 and saved back as float32: its header says float32, its values
    say float16 / bfloat16, so it is that model's lower-precision copy, not a fine-tune at distance ~1e-3."""
    weights, _ = make_synthetic_forest(seed=3)
    more = dict(weights)
    more["t0_1-up16"] = {k: v.half().float() for k, v in weights["t0_1"].items()}
    more["t1-upbf16"] = {k: v.bfloat16().float() for k, v in weights["t1"].items()}
    f = recover_lineage(more)
    kinds = {(e.parent, e.child): e.kind for e in f.edges}
    assert kinds[("t0_1", "t0_1-up16")] == kinds[("t1", "t1-upbf16")] == "precision"
    assert f.decisions["precision_copies"] == {"t0_1-up16": "float16", "t1-upbf16": "bfloat16"}


def test_value_formats_need_informative_values():
    from modelatlas.lineage.distances import ValueFormats
    fits = ValueFormats(4, min_values=8)
    x = torch.randn(4, 32)
    rows = [x[0], x[1].half().float(), x[2].bfloat16().float(), torch.zeros(32).index_fill_(0, torch.arange(4), 1.0)]
    for i, r in enumerate(rows):
        fits.update(i, r[None])
    assert fits.formats() == ["", "float16", "bfloat16", ""]  # zeros and ones fit every format: not evidence


def test_value_formats_trust_a_half_precision_dtype(monkeypatch):
    # a layer stored as bfloat16 fits bfloat16 by construction: checking it cost four conversions and two
    # comparisons of every value, half of a bfloat16 1B model's recovery (bench/lineage_llm_scale.py)
    from modelatlas.lineage.distances import ValueFormats
    calls = []
    real = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(a.dtype) or real(a, b))
    fits = ValueFormats(3, min_values=8)
    x = torch.randn(3, 300)
    fits.update(0, x[0:1].bfloat16().float(), torch.bfloat16)
    assert calls == []
    fits.update(1, x[1:2].bfloat16().float(), torch.float16)  # a bfloat16 model saved as float16 still shows
    fits.update(2, x[2:3].half().float(), torch.float16)
    assert set(calls) == {torch.float32} and fits.formats() == ["bfloat16", "bfloat16", "float16"]


@pytest.mark.parametrize("model, message", [
    (torch.nn.Linear(4, 4), r"weights\['b'\] is a Linear, not a dict of tensor name -> tensor \(pass model\.state_dict\(\)\)"),
    ({"w": "text"}, r"weights\['b'\]\['w'\] is a str, not a tensor"),
    (None, r"weights\['b'\] is a NoneType, not a dict"),
])
def test_in_memory_models_that_are_no_state_dict_are_named(model, message):
    # a module passed for its state dict read "'Linear' object has no attribute 'items'"
    with pytest.raises(ConfigError, match=message):
        recover_lineage({"a": {"w": torch.randn(4, 4)}, "b": model})
