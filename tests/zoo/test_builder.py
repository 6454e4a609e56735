import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from modelatlas.errors import ConfigError
from modelatlas.zoo import load_manifest, load_model, make_zoo, plan_zoo
from modelatlas.zoo.builder import build_one  # noqa: F401  (worker entry point must stay importable)


def check_same_weights(a, b, names):
    for name in names:
        x, y = load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_tree_shape_and_manifest(tiny_zoo):
    manifest, out = tiny_zoo
    assert len(manifest) == 2 * (1 + 2 + 4)
    assert manifest.parents()["t1.0.1"] == "t1.0" and manifest.parents()["t0"] is None
    assert manifest.trees()["t1.0.1"] == "t1"
    assert load_manifest(out).names == manifest.names
    for m in manifest.models:
        folder = manifest.path_of(m.name)
        assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
        assert m.method == ("root" if m.parent is None else m.method) and 0.0 <= m.train["test_acc"] <= 1.0
        assert m.task["label"] and m.task["dataset"] == "digits"
    cfg = json.loads((out / "t0" / "config.json").read_text())
    assert cfg["atlas_arch"]["arch"] == "mlp" and manifest.config["arch_config"]["hidden"] == 8
    assert {m.method for m in manifest.models} == {"root", "full", "lora"}


def test_children_start_from_their_parent(tiny_zoo):
    manifest, out = tiny_zoo
    full = next(m for m in manifest.models if m.method == "full" and m.task["head"] == "keep")
    p = load_file(str(out / full.parent / "model.safetensors"))
    c = load_file(str(out / full.name / "model.safetensors"))
    other_root = load_file(str(out / ("t1" if full.tree == "t0" else "t0") / "model.safetensors"))
    near = (c["layers.0.weight"] - p["layers.0.weight"]).norm()
    assert near < (c["layers.0.weight"] - other_root["layers.0.weight"]).norm()
    model = load_model(out, full.name)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_same_seed_same_zoo_across_worker_counts(tiny_zoo, tmp_path, make_config):
    manifest, out = tiny_zoo
    again = make_zoo(make_config(), tmp_path, workers=2)
    assert [m.task for m in again.models] == [m.task for m in manifest.models]
    check_same_weights(out, tmp_path, manifest.names)
    assert [m.sha256 for m in again.models] == [m.sha256 for m in manifest.models]  # the digests say so too
    assert all(len(m.sha256) == 64 for m in manifest.models)
    other = make_zoo(make_config(seed=12, depth=0), tmp_path / "other", workers=1)
    x = load_file(str(tmp_path / "other" / "t0" / "model.safetensors"))
    assert not torch.equal(x["embed.weight"], load_file(str(out / "t0" / "model.safetensors"))["embed.weight"])
    assert len(other) == 2


def test_resume_skips_finished_models(tmp_path, make_config):
    cfg = make_config(depth=1, trees=1)
    make_zoo(cfg, tmp_path, workers=1)
    stamp = {n: (tmp_path / n / "model.safetensors").stat().st_mtime_ns for n in ("t0", "t0.0", "t0.1")}
    (tmp_path / "t0.1" / "zoo_record.json").unlink()  # as if interrupted before t0.1 finished
    manifest = make_zoo(cfg, tmp_path, workers=1)
    assert len(manifest) == 3
    assert (tmp_path / "t0" / "model.safetensors").stat().st_mtime_ns == stamp["t0"]
    assert (tmp_path / "t0.0" / "model.safetensors").stat().st_mtime_ns == stamp["t0.0"]
    assert (tmp_path / "t0.1" / "zoo_record.json").exists()
    digests = [m.sha256 for m in manifest.models]
    rec = json.loads((tmp_path / "t0" / "zoo_record.json").read_text())
    del rec["record"]["sha256"]  # a model finished by a version that wrote no digest
    (tmp_path / "t0" / "zoo_record.json").write_text(json.dumps(rec))
    assert [m.sha256 for m in make_zoo(cfg, tmp_path, workers=1).models] == digests  # resumed: filled in
    with pytest.raises(ConfigError, match="t0: built from a different zoo config"):
        make_zoo(make_config(depth=1, trees=1, seed=99), tmp_path, workers=1)
    make_zoo(make_config(depth=1, trees=1, seed=99), tmp_path, workers=1, resume=False)


def test_a_smaller_zoo_is_not_built_over_a_larger_one(tmp_path, make_config):
    # --no-resume over a larger zoo left its extra models, which lineage recovery then read as this zoo's
    make_zoo(make_config(depth=1, trees=1), tmp_path, workers=1)
    with pytest.raises(ConfigError, match=r"holds models of another zoo that this one does not have \(t0.0, t0.1\)"):
        make_zoo(make_config(depth=0, trees=1, seed=5), tmp_path, workers=1, resume=False)
    assert (tmp_path / "t0.0" / "zoo_record.json").is_file()  # nothing deleted


def test_resume_trains_a_damaged_model_again(tmp_path, make_config):
    cfg = make_config(depth=1, trees=1)
    digests = [m.sha256 for m in make_zoo(cfg, tmp_path, workers=1).models]
    (tmp_path / "t0" / "model.safetensors").write_bytes(b"")  # truncated after the build
    stamp = (tmp_path / "t0.0" / "model.safetensors").stat().st_mtime_ns
    assert [m.sha256 for m in make_zoo(cfg, tmp_path, workers=1).models] == digests  # the same weights again
    assert (tmp_path / "t0.0" / "model.safetensors").stat().st_mtime_ns == stamp  # the intact ones kept


def test_make_zoo_argument_errors(tmp_path, make_config):
    with pytest.raises(ConfigError, match="workers: must be a positive integer"):
        make_zoo(make_config(), tmp_path, workers=0)
    with pytest.raises(ConfigError, match="config: expected a ZooConfig"):
        make_zoo({"arch": "mlp"}, tmp_path)


@pytest.mark.parametrize("arch, sizes", [("cnn", {"channels": [2], "hidden": 8}),
                                         ("vit", {"hidden": 8, "n_heads": 2, "intermediate": 8, "n_layers": 1})])
def test_cnn_and_vit_zoos(tmp_path, make_config, arch, sizes):
    manifest = make_zoo(make_config(arch=arch, arch_kwargs=sizes, trees=1, depth=1, method="lora"), tmp_path, workers=1)
    root = load_file(str(tmp_path / "t0" / "model.safetensors"))
    child = load_file(str(tmp_path / "t0.1" / "model.safetensors"))
    frozen = "conv.0.weight" if arch == "cnn" else "vit.embeddings.patch_embeddings.projection.weight"
    adapted = "layers.0.weight" if arch == "cnn" else "vit.encoder.layer.0.attention.attention.value.weight"
    assert torch.equal(root[frozen], child[frozen])  # LoRA leaves non-linear layers untouched
    r = manifest["t0.1"].train["lora_r"]
    assert torch.linalg.matrix_rank(child[adapted] - root[adapted]) == r


@pytest.mark.slow  # loading mnist5k takes ~10 s
def test_dataset_tasks_resize_other_datasets(tmp_path, make_config):
    from modelatlas.data import load_dataset
    from modelatlas.errors import AtlasError

    try:
        load_dataset("mnist5k", "test")
    except AtlasError:
        pytest.skip("mnist5k not installed")
    cfg = make_config(trees=1, depth=1, input_shape=(1, 28, 28), task_kinds=("dataset",), other_datasets=("mnist5k",))
    manifest = make_zoo(cfg, tmp_path, workers=1)
    assert manifest["t0.0"].dataset == "mnist5k" and manifest["t0.0"].task["kind"] == "dataset"
    assert manifest.config["arch_config"]["input_shape"] == [1, 28, 28]


@pytest.mark.parametrize("overrides", [{}, {"trees": 1, "children": 3, "depth": 1}, {"shape": "star", "children": 4, "depth": 1},
                                       {"depth": 0}])
def test_model_names_are_the_plans_names(make_config, overrides):
    from modelatlas.zoo.plan import model_names, planned_names

    config = make_config(**overrides)
    names = [n["name"] for n in plan_zoo(config)]
    assert model_names(config) == names and len(names) == config.n_models
    assert planned_names({**config.to_dict(), "arch_config": {}}) == names
    assert planned_names({"family": "named_class_star"}) is None  # not a make_zoo manifest


def test_an_interrupted_build_lists_its_finished_models_and_resumes_to_the_same_zoo(tmp_path, make_config, monkeypatch):
    from modelatlas.zoo import builder

    config = make_config(trees=1, children=3, depth=1)
    whole = make_zoo(config, tmp_path / "whole", workers=1)
    real, calls = builder.build_one, []

    def interrupted(job):
        calls.append(job["node"]["name"])
        if len(calls) == 3:  # Ctrl-C while the second child trains
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(builder, "build_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_zoo(config, tmp_path / "part", workers=1)
    assert load_manifest(tmp_path / "part").names == ["t0", "t0.0"]  # was ["t0"]: level 0 only
    (tmp_path / "part" / "t0.1").mkdir()
    (tmp_path / "part" / "t0.1" / ".model.safetensors.0123.tmp").write_bytes(b"half")  # a killed write
    monkeypatch.setattr(builder, "build_one", real)
    part = make_zoo(config, tmp_path / "part", workers=1)
    assert [m.sha256 for m in part.models] == [m.sha256 for m in whole.models]
    assert not list((tmp_path / "part").rglob("*.tmp"))


def test_an_out_that_is_a_file_or_a_folder_of_other_files_is_refused_before_training(tmp_path, make_config):
    config = make_config(trees=1, children=1, depth=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="out: .*file is a file, not a folder"):
        make_zoo(config, tmp_path / "file", workers=1)
    with pytest.raises(ConfigError, match="out: .*file/zoo lies below the file .*file, not a folder"):
        make_zoo(config, tmp_path / "file" / "zoo", workers=1)  # was 'Not a directory' after the first model
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "attribution.json").write_text("{}")
    with pytest.raises(ConfigError, match="non-empty folder holding no zoo \\(e.g. 'attribution.json'\\)"):
        make_zoo(config, tmp_path / "results", workers=1)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["attribution.json"]
    (tmp_path / "empty").mkdir()
    assert len(make_zoo(config, tmp_path / "empty", workers=1)) == 2
    (tmp_path / "webapp").mkdir()  # a web app's manifest.json made the folder pass as a zoo: it was overwritten
    (tmp_path / "webapp" / "manifest.json").write_text('{"name": "My App", "icons": []}')
    with pytest.raises(ConfigError, match="non-empty folder holding no zoo \\(e.g. 'manifest.json', which is no zoo "
                                          "manifest\\)"):
        make_zoo(config, tmp_path / "webapp", workers=1)
    assert (tmp_path / "webapp" / "manifest.json").read_text() == '{"name": "My App", "icons": []}'


def test_workers_are_capped_at_the_widest_level_and_the_cores(tmp_path, make_config, monkeypatch):
    import os

    from modelatlas.zoo import builder

    sizes = []

    def spy(workers):
        sizes.append(workers)
        raise RuntimeError("no pool in this test")

    monkeypatch.setattr(builder, "_spawn_pool", spy)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    with pytest.raises(RuntimeError, match="no pool"):  # 1 root + 3 children: at most 3 train at once
        make_zoo(make_config(trees=1, children=3, depth=1), tmp_path / "a", workers=1000)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(RuntimeError, match="no pool"):
        make_zoo(make_config(trees=1, children=3, depth=1), tmp_path / "b", workers=1000)
    assert sizes == [3, 2]  # was [1000, 1000]: 1000 torch processes


def test_building_in_process_leaves_the_callers_global_rng_alone(tmp_path, make_config):
    """workers=1 trains in the caller's process, and each model seeds torch's global generator: a notebook's
    own random stream was reset by it."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_zoo(make_config(seed=12, depth=0), tmp_path / "z", workers=1)
    assert torch.equal(torch.rand(3), expected)


def test_a_zoo_whose_manifest_was_damaged_is_rebuilt_in_place(tmp_path, make_config):
    """Its model folders say it is this zoo: the rerun writes the manifest again (not refused as foreign)."""
    config = make_config(trees=1, children=1, depth=1)
    whole = make_zoo(config, tmp_path / "z", workers=1)
    (tmp_path / "z" / "manifest.json").write_text("{")
    assert make_zoo(config, tmp_path / "z", workers=1).names == whole.names


def worker_pids(pid: int) -> list[int]:
    """The pool workers (spawned `spawn_main` processes) among the children of process ``pid`` (Linux /proc)."""
    from pathlib import Path

    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_workers_end_with_a_build_killed_by_sigkill(tmp_path):
    """`kill -9` of `atlas zoo make` (no handler runs, so the pool is not terminated) left its workers training
    on, writing their models into the zoo, then printing BrokenPipeError tracebacks when they handed them to the
    dead parent. They now end with it. ~15 s (two workers import torch)."""
    script = ("from modelatlas.zoo import make_zoo, preset; "
              f"make_zoo(preset('tiny', root_steps=(10**6, 10**6)), {str(tmp_path / 'z')!r}, workers=2)")
    build = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.2)
            workers = worker_pids(build.pid)
        assert len(workers) == 2, "the build started no two workers"
        time.sleep(8)  # the workers are past their initializer, training their root
        build.send_signal(signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 10
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(running(w) for w in workers)
    finally:
        for w in workers:  # without the fix: the orphaned workers this test started
            if running(w):
                os.kill(w, signal.SIGKILL)
        if build.poll() is None:
            build.kill()
