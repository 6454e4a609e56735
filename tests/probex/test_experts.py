"""An experts folder (``train_tree_experts`` / ``TreeExperts.load``): a hand-edited, corrupt or half-rewritten
folder is one CheckpointError naming the file, never a traceback or a mix of two runs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError, ConfigError, ManifestError
from modelatlas.probex import ProbeXConfig
from modelatlas.probex.experts import TreeExperts, train_tree_experts
from modelatlas.zoo.manifest import Manifest, ModelRecord


def make_zoo(folder, n=12):
    """One tree of ``n`` labelled children, each with a (4, 3) layer "w" and a (4, 5) layer "v"."""
    g = torch.Generator().manual_seed(0)
    recs = [ModelRecord("r", "r.safetensors", None, "r")]
    for i in range(n + 1):
        name = "r" if i == n else f"c{i}"
        save_file({"w": torch.randn(4, 3, generator=g), "v": torch.randn(4, 5, generator=g)},
                  str(folder / f"{name}.safetensors"))
        if i < n:
            recs.append(ModelRecord(name, f"{name}.safetensors", "r", "r", task={"classes": [i % 2]}))
    Manifest(recs, {}, folder).save(folder / "manifest.json")
    return folder


def make_experts(tmp_path, layer="w"):
    out = tmp_path / "experts"
    train_tree_experts(make_zoo(tmp_path), out, layer=layer, config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))
    return out


def test_a_layer_no_model_has_lists_the_layers_to_pass(tmp_path):
    """`atlas probex train star --layer nope` said only "star/t0.0: no tensor named 'nope' (10 tensors)": no
    layer to pass instead. It lists the model's weight matrices and --layer auto; nothing is written."""
    from modelatlas.errors import TensorNotFoundError

    with pytest.raises(TensorNotFoundError, match=r"c0\.safetensors: no tensor named 'nope' \(2 tensors\); its "
                                                  r"weight matrices: v, w \(pass one as --layer, or --layer auto to "
                                                  r"pick the best on validation\)$"):
        train_tree_experts(make_zoo(tmp_path), tmp_path / "experts", layer="nope",
                           config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))
    assert not (tmp_path / "experts").exists()


def test_an_interrupted_retrain_leaves_no_mix_of_two_runs(tmp_path, monkeypatch):
    import modelatlas.probex.experts as experts_module

    out = make_experts(tmp_path, layer="w")
    real_fit = experts_module.TreeRouter.fit

    def interrupted(*args, **kwargs):  # after the tree's new expert is saved, before the router and index
        raise KeyboardInterrupt

    monkeypatch.setattr(experts_module.TreeRouter, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tree_experts(tmp_path, out, layer="v", config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))
    monkeypatch.setattr(experts_module.TreeRouter, "fit", real_fit)
    with pytest.raises(CheckpointError, match="training did not finish .*--resume"):
        TreeExperts.load(out)


def test_experts_of_another_layer_than_the_index_are_refused(tmp_path):
    out = make_experts(tmp_path)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "layer": "v"}))
    with pytest.raises(CheckpointError, match=r"index\.json: layer is 'v', but the expert of tree 'r' was trained "
                                              r"on 'w'"):
        TreeExperts.load(out)


@pytest.mark.parametrize("change, said", [
    ({"trees": {}}, "trees must name at least one"),
    ({"trees": ["r"]}, "trees must be an object"),
    ({"task": "colour"}, "task must be one of"),
    ({"layer": 3}, "layer must be a string"),
])
def test_a_hand_edited_index_is_one_error_naming_the_key(tmp_path, change, said):
    out = make_experts(tmp_path)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, **change}))
    with pytest.raises(CheckpointError, match=f"index.json: {said}"):
        TreeExperts.load(out)
    (out / "index.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"index\.json: not an experts index"):
        TreeExperts.load(out)
    (out / "index.json").write_text(json.dumps({"format": index["format"]}))
    with pytest.raises(CheckpointError, match="index.json: task must be one of"):
        TreeExperts.load(out)


def test_corrupt_router_and_expert_json_are_one_error_naming_the_file(tmp_path):
    out = make_experts(tmp_path)
    router_json = out / "router" / "router.json"
    for text in ("[]", '{"slack": "x", "trees": ["r"]}', '{"slack": 1.5, "trees": 3}'):
        router_json.write_text(text)
        with pytest.raises(CheckpointError, match="router"):
            TreeExperts.load(out)
    make_experts(tmp_path)
    expert_json = out / "experts" / "r" / "expert.json"
    meta = json.loads(expert_json.read_text())
    for text in ("[]", json.dumps({**meta, "config": 5}), json.dumps({**meta, "config": {"rank_u": "x"}})):
        expert_json.write_text(text)
        with pytest.raises(CheckpointError, match=r"expert\.json: "):
            TreeExperts.load(out)


def test_resuming_another_run_names_the_setting_that_differs_before_the_epochs(tmp_path):
    out = make_experts(tmp_path, layer="w")  # 1 epoch; a longer run on another layer is not this run
    cfg = ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=3)
    train_tree_experts(tmp_path, out, layer="w", config=cfg)
    with pytest.raises(CheckpointError, match="cannot resume: layer was 'w' in the interrupted run, now 'v'"):
        train_tree_experts(tmp_path, out, layer="v", config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1),
                           resume=True)


def test_models_of_one_name_in_two_folders_are_told_apart(tmp_path):
    """`atlas probex predict/search zooA zooB` printed "t0.1" twice, so a hit could not be told from the other."""
    import shutil

    out = make_experts(tmp_path)
    for run in ("runA", "runB"):
        (tmp_path / run).mkdir()
        shutil.copy(tmp_path / "c0.safetensors", tmp_path / run / "c0.safetensors")
    paths = [tmp_path / "runA" / "c0.safetensors", tmp_path / "runB" / "c0.safetensors", tmp_path / "runC" / "c0"]
    _, routes = TreeExperts.load(out).read(paths)
    assert [r.name for r in routes] == ["runA/c0", "runB/c0", "runC/c0"]  # the missing one too
    assert routes[0].reason is None and routes[2].reason is not None


def test_trees_of_two_architectures_are_refused_before_training(tmp_path):
    """One router compares one layer shape: torch.cat failed with a traceback once every expert was trained."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for tree, rows in (("r", 4), ("s", 6)):
        for i in range(12 + 1):
            name = tree if i == 12 else f"{tree}{i}"
            save_file({"w": torch.randn(rows, 3, generator=g)}, str(tmp_path / f"{name}.safetensors"))
            recs.append(ModelRecord(name, f"{name}.safetensors", None if i == 12 else tree, tree,
                                    task={} if i == 12 else {"classes": [i % 2]}))
    Manifest(recs, {}, tmp_path).save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"layer 'w' is \(4, 3\) in tree 'r' but \(6, 3\) in tree 's'; one "):
        train_tree_experts(tmp_path, tmp_path / "out", layer="w", config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))
    assert not (tmp_path / "out").exists()  # refused before the first expert's training


def test_a_file_given_as_the_experts_folder_is_named_with_the_fix(tmp_path):
    """--experts out/index.json said "out/index.json/index.json: cannot read: [Errno 20] Not a directory"."""
    out = make_experts(tmp_path)
    with pytest.raises(CheckpointError, match=rf"index\.json: a file, not an experts folder; pass the folder .* "
                                              rf"\({out}\)$"):
        TreeExperts.load(out / "index.json")


def test_an_out_below_a_file_is_refused_before_any_training(tmp_path, monkeypatch):
    """It failed as '.../checkpoints/r: Not a directory' at the first checkpoint, after the layer selection."""
    import modelatlas.probex.experts as experts_module

    make_zoo(tmp_path)
    monkeypatch.setattr(experts_module, "select_layer", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ConfigError, match=r"--out .*c0\.safetensors/x lies below the file .*c0\.safetensors, not a "
                                          r"folder; choose a new --out"):
        train_tree_experts(tmp_path, tmp_path / "c0.safetensors" / "x", config=ProbeXConfig(epochs=1))


def test_a_huge_class_index_is_refused_naming_the_model(tmp_path):
    """A typo'd class index of 10**8 made training allocate a (models x 10**8) target table."""
    from modelatlas.zoo.manifest import load_manifest

    m = load_manifest(make_zoo(tmp_path))
    m["c3"].task["classes"] = [1, 100_000_000]
    m.save(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"model 'c3' task 'classes' must be .*integers from 0 to 99,999\); got \[1, 100000000\]"):
        train_tree_experts(tmp_path, tmp_path / "e", layer="w", config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))


def test_a_zoo_stored_as_adapters_is_refused_with_the_merge_to_run(tmp_path, monkeypatch):
    """An adapter-stored model was read as its update B A alone and trained on beside full models' layers: the
    experts learned a mix of updates and weights, and the same zoo merged was routed to no tree."""
    import modelatlas.probex.experts as experts_module
    from modelatlas.zoo.manifest import load_manifest

    m = load_manifest(make_zoo(tmp_path))
    m["c3"].storage = m["c5"].storage = "adapter"
    m.save(tmp_path / "manifest.json")
    monkeypatch.setattr(experts_module, "load_layer", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ManifestError, match=r"manifest\.json: 2 models \(c3, c5\) are stored as LoRA adapters .*"
                                            rf"`atlas zoo merge {tmp_path} --out DIR`"):
        train_tree_experts(tmp_path, tmp_path / "e", layer="w", config=ProbeXConfig(epochs=1))


def test_ones_own_adapters_in_a_hand_written_manifest_are_refused_with_the_merge_to_do(tmp_path, monkeypatch):
    """PEFT adapters of one's own listed in a manifest without "storage" were learned as their updates B A alone
    (validation 0.5 on 12 adapters of 4 classes), and the same adapters read with --base were in no known tree."""
    from tests.weights.test_peft_lora import make_adapter

    import modelatlas.probex.experts as experts_module
    from modelatlas.zoo.manifest import load_manifest

    m = load_manifest(make_zoo(tmp_path))
    for name in ("c3", "c5"):
        make_adapter(tmp_path / f"{name}-lora", {"w.lora_A.weight": torch.ones(2, 3), "w.lora_B.weight": torch.ones(4, 2)},
                     target_modules=["w"])
        m[name].path = f"{name}-lora"
    m.save(tmp_path / "labels.json")
    monkeypatch.setattr(experts_module, "load_layer", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ManifestError, match=r"labels\.json: 2 models \(c3, c5\) are PEFT LoRA adapters .*save each "
                                            r"merged onto its base"):
        train_tree_experts(tmp_path / "labels.json", tmp_path / "e", layer="w", config=ProbeXConfig(epochs=1))


def test_a_retrain_interrupted_before_its_first_checkpoint_resumes_with_its_own_settings(tmp_path, monkeypatch):
    """Without --resume the old run's checkpoints stayed until each tree's first new one: a retrain on another
    layer stopped before it could not be resumed ('layer was 'w' in the interrupted run, now 'v'')."""
    import modelatlas.probex.experts as experts_module

    out, cfg = make_experts(tmp_path, layer="w"), ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(experts_module, "_fit_one", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_tree_experts(tmp_path, out, layer="v", config=cfg)
    assert train_tree_experts(tmp_path, out, layer="v", config=cfg, resume=True).layer == "v"
    assert TreeExperts.load(out).layer == "v"


def test_resuming_auto_when_it_picks_another_layer_says_so_and_names_the_layer_to_pass(tmp_path, monkeypatch):
    """A run resumed with more epochs (as the docs allow) can see --layer auto pick another layer; it was refused
    as 'layer was 'w' in the interrupted run, now 'v'', though the user passed --layer auto both times."""
    import modelatlas.probex.experts as experts_module

    make_zoo(tmp_path)
    out, cfg = tmp_path / "e", ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1)
    monkeypatch.setattr(experts_module, "select_layer", lambda *a, **k: {"w": (1.0, 0.0), "v": (0.5, 0.0)})
    train_tree_experts(tmp_path, out, config=cfg)
    monkeypatch.setattr(experts_module, "select_layer", lambda *a, **k: {"w": (0.5, 0.0), "v": (1.0, 0.0)})
    with pytest.raises(CheckpointError, match=r"train_state\.json: cannot resume: --layer auto chose 'v' at --epochs 2, "
                                          r"but the interrupted run trained 'w' .*resume with --layer w"):
        train_tree_experts(tmp_path, out, config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=2), resume=True)


def test_a_retrain_removes_only_the_training_states_under_checkpoints(tmp_path):
    """--out passes as an experts folder when it holds a checkpoints/ folder: a retrain must not delete what
    else is in it."""
    out = make_experts(tmp_path)
    (out / "checkpoints" / "mine").mkdir()
    (out / "checkpoints" / "mine" / "model.pt").write_text("keep me")
    (out / "checkpoints" / "r" / "notes.txt").write_text("keep me too")
    train_tree_experts(tmp_path, out, layer="v", config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))
    assert (out / "checkpoints" / "mine" / "model.pt").read_text() == "keep me"
    assert (out / "checkpoints" / "r" / "notes.txt").read_text() == "keep me too"


@pytest.mark.parametrize("foreign", [{"index.json": '{"pages": 3}'}, {"checkpoints/epoch-3.ckpt": "weights"}])
def test_a_folder_with_someone_elses_index_or_checkpoints_is_not_taken_for_experts(tmp_path, foreign):
    """Any index.json or checkpoints/ folder made --out pass as an experts folder: the retrain deleted that
    index.json and wrote the experts among the other files."""
    make_zoo(tmp_path)
    out = tmp_path / "run"
    for rel, text in foreign.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    with pytest.raises(ConfigError, match="non-empty folder that holds no experts"):
        train_tree_experts(tmp_path, out, layer="w", config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1))
    assert all((out / rel).read_text() == text for rel, text in foreign.items())


def test_a_run_stopped_before_its_first_state_was_written_can_be_run_again(tmp_path):
    """What an interrupt before the first save leaves (checkpoints/<tree>/, empty) is still this run's folder."""
    make_zoo(tmp_path)
    (tmp_path / "e" / "checkpoints" / "r").mkdir(parents=True)
    cfg = ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1)
    assert train_tree_experts(tmp_path, tmp_path / "e", layer="w", config=cfg, resume=True).trees["r"]["models"] == 12


def test_a_run_with_a_damaged_index_and_its_states_is_trained_again(tmp_path):
    out = make_experts(tmp_path)
    (out / "index.json").write_text("{")
    cfg = ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1)
    train_tree_experts(tmp_path, out, layer="w", config=cfg)
    assert TreeExperts.load(out).layer == "w"


def test_an_interrupted_training_is_not_dropped_by_a_rerun_without_resume(tmp_path, monkeypatch):
    """Ctrl-C says "rerun with --resume to continue"; a rerun without it deleted the states and trained from
    scratch, silently (atlas distill run and atlas attribute refuse it)."""
    import modelatlas.probex.experts as experts_module

    make_zoo(tmp_path)
    out, cfg = tmp_path / "e", ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1)
    with monkeypatch.context() as m:
        m.setattr(experts_module.TreeRouter, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train_tree_experts(tmp_path, out, layer="w", config=cfg)
    state = out / "checkpoints" / "r" / "train_state.json"
    before = state.read_bytes()
    with pytest.raises(ConfigError, match=rf"^--out {out} holds an interrupted training \(checkpoints, no index\.json\): "
                                          r"pass --resume to continue it, choose a new --out, or delete"):
        train_tree_experts(tmp_path, out, layer="w", config=cfg)
    assert state.read_bytes() == before
    assert train_tree_experts(tmp_path, out, layer="w", config=cfg, resume=True).layer == "w"
    train_tree_experts(tmp_path, out, layer="w", config=cfg)  # a finished run is trained again


def test_progress_bars_name_the_layer_and_the_tree_they_train(tmp_path):
    """Every expert's bar said "train" (and every tree's read "read w"), so a long --layer auto run showed neither
    which layer or tree it was at nor how many were left."""
    from modelatlas.progress import silent

    seen = []

    def progress(iterable, *, total=None, desc=""):
        seen.append(desc)
        return silent(iterable)

    report = train_tree_experts(make_zoo(tmp_path), tmp_path / "e",
                                config=ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=1), progress=progress)
    trained = [d for d in seen if d.startswith("train")]
    assert [d.split(" (")[1] for d in trained[:2]] == ["1 of 2)", "2 of 2)"]
    assert sorted(d.split()[2] for d in trained[:2]) == ["v", "w"] and trained[0].startswith("train layer ")
    assert trained[2:] == ["train tree r (1 of 1)"] and f"read {report.layer} of tree r" in seen


@pytest.mark.parametrize("text", ["", '{"slack": 1.5, "trees": ["r"]', "\x8b{}"])
def test_a_router_json_that_is_not_json_is_named(tmp_path, text):
    """An empty, cut or non-UTF-8 router.json was named as the router folder (fuzzed, session 40)."""
    out = make_experts(tmp_path)
    (out / "router" / "router.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"router[/\\]router\.json: cannot read the tree router"):
        TreeExperts.load(out)


@pytest.mark.parametrize("shape", [[-1, 3], [4, 4], [12], [0, 0]])
def test_a_router_shape_of_another_weight_count_is_named_in_router_json(tmp_path, shape):
    """A shape that no layer of the centroids' weights has was blamed on index.json ('the experts and the router
    expect layers of different shapes'), as if the index were damaged (fuzzed, session 40)."""
    out = make_experts(tmp_path)
    meta = json.loads((out / "router" / "router.json").read_text())
    (out / "router" / "router.json").write_text(json.dumps({**meta, "shape": shape}))
    with pytest.raises(CheckpointError, match=r"router\.json: shape must be the layer's two sizes, of 12 weights"):
        TreeExperts.load(out)


def test_an_expert_json_of_another_layer_is_named(tmp_path):
    """An expert.json edited to another layer was named by index.json alone, the file left as it was (fuzzed)."""
    out = make_experts(tmp_path)
    meta = json.loads((out / "experts" / "r" / "expert.json").read_text())
    (out / "experts" / "r" / "expert.json").write_text(json.dumps({**meta, "layer": "v"}))
    with pytest.raises(CheckpointError, match=r"index\.json: layer is 'w', but the expert of tree 'r' was trained on "
                                              r"'v' \(.*expert\.json\)"):
        TreeExperts.load(out)


@pytest.mark.parametrize("trees", [[2**64], ["r", "r"], [None]])
def test_router_trees_that_are_not_distinct_names_are_named_in_router_json(tmp_path, trees):
    """A number among the router's trees ended in a TypeError traceback (sorted with the index's names for the
    message); a repeated name or another name than the index's was blamed on index.json alone (fuzzed)."""
    out = make_experts(tmp_path)
    meta = json.loads((out / "router" / "router.json").read_text())
    (out / "router" / "router.json").write_text(json.dumps({**meta, "trees": trees}))
    with pytest.raises(CheckpointError, match=r"router\.json: trees must list one tree per centroid \(1\), each once"):
        TreeExperts.load(out)


def test_router_trees_of_other_names_than_the_index_name_router_json(tmp_path):
    out = make_experts(tmp_path)
    meta = json.loads((out / "router" / "router.json").read_text())
    (out / "router" / "router.json").write_text(json.dumps({**meta, "trees": ["x"]}))
    with pytest.raises(CheckpointError, match=r"index\.json: the router \(.*router\.json\) knows trees \['x'\], the "
                                              r"index \['r'\]"):
        TreeExperts.load(out)


@pytest.mark.parametrize("name", ["router/router.safetensors", "experts/r/expert.safetensors"])
def test_a_flipped_bit_of_a_weights_file_is_refused_naming_it(tmp_path, name):
    """A radius or centroid with a bit flipped routed the zoo's own models to no tree (exit 1, not a word on
    stderr); an expert's weights predicted other classes. index.json records each file's SHA-256 (fuzzed)."""
    out = make_experts(tmp_path)
    data = bytearray((out / name).read_bytes())
    data[-2] ^= 0x04  # the last value's bits, not the header
    (out / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name.split('/')[-1]}: is not the file index\.json records "
                                              r"\(damaged or edited since it was written: its SHA-256 differs\)"):
        TreeExperts.load(out)


def test_an_index_of_older_experts_without_digests_still_loads(tmp_path):
    out = make_experts(tmp_path)
    index = json.loads((out / "index.json").read_text())
    assert sorted(index.pop("files_sha256")) == ["experts/r/expert.json", "experts/r/expert.safetensors",
                                                  "router/router.json", "router/router.safetensors"]
    (out / "index.json").write_text(json.dumps(index))
    assert TreeExperts.load(out).layer == "w"


@pytest.mark.parametrize("rel", ["../x", "router", "experts/nope"])
def test_an_index_naming_no_expert_folder_names_index_json(tmp_path, rel):
    """'../x' was named as that folder ('experts/../x: not a ProbeX expert folder'), not as the index (fuzzed)."""
    out = make_experts(tmp_path)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "trees": {"r": rel}}))
    with pytest.raises(CheckpointError, match=rf"index\.json: trees\['r'\] is '{rel}', not a folder of this experts "
                                              "folder holding an expert.json"):
        TreeExperts.load(out)


def test_a_router_safetensors_without_radii_is_named(tmp_path):
    """It was named as router.json lacking 'radii' (fuzzed: a tensor renamed in the header)."""
    from safetensors.torch import load_file

    out = make_experts(tmp_path)
    tensors = load_file(str(out / "router" / "router.safetensors"))
    save_file({"centroids": tensors["centroids"], "r": tensors["radii"]}, str(out / "router" / "router.safetensors"))
    with pytest.raises(CheckpointError, match=r"router\.safetensors: has no tensor 'radii'"):
        TreeExperts.load(out)
