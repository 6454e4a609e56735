import pytest
import torch

from modelatlas.cli.main import main
from modelatlas.errors import ConfigError, ManifestError
from modelatlas.weights import open_checkpoint
from modelatlas.zoo import Manifest, ModelRecord, load_manifest, load_state, make_zoo
from modelatlas.zoo.merge import merge_zoo
from modelatlas.zoo.store import verify_zoo


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
    """(manifest, folder) of a 1 x 2 x depth-2 LoRA zoo stored as adapters: grandchildren sit on adapters."""
    from tests.zoo.conftest import _config

    out = tmp_path_factory.mktemp("adapters")
    return make_zoo(_config(trees=1, method="lora", storage="adapter", lora_ranks=(2,)), out, workers=1), out


def test_merged_zoo_holds_each_models_full_weights(adapter_zoo, tmp_path):
    manifest, folder = adapter_zoo
    merged = merge_zoo(manifest, tmp_path / "m")
    assert [m.name for m in merged.models] == manifest.names and merged.parents() == manifest.parents()
    assert {m.storage for m in merged.models} == {"full"} and merged.config["storage"] == "merged"
    assert set(verify_zoo(load_manifest(tmp_path / "m")).values()) == {"ok"}
    for m in manifest.models:  # a grandchild: root + child's update + its own
        got = open_checkpoint(tmp_path / "m" / m.name)
        want = load_state(folder, m.name)
        assert got.kind == "full" and all(torch.equal(got.read(k), v) for k, v in want.items())
    deep = next(m.name for m in manifest.models if m.parent and manifest[m.parent].storage == "adapter")
    assert not torch.equal(load_state(tmp_path / "m", deep)["classifier.weight"],
                           load_state(folder, manifest[deep].parent)["classifier.weight"])


def test_merge_refuses_its_own_zoo_a_full_folder_and_single_files(adapter_zoo, tmp_path):
    manifest, folder = adapter_zoo
    with pytest.raises(ConfigError, match="the zoo's own folder"):
        merge_zoo(manifest, folder)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="busy: is not empty"):
        merge_zoo(manifest, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    with pytest.raises(ConfigError, match="busy/x/m: lies below the file .*busy/x, not a folder"):
        merge_zoo(manifest, tmp_path / "busy" / "x" / "m")
    merge_zoo(manifest, tmp_path / "again")
    (tmp_path / "again" / "manifest.json").unlink()  # as if interrupted before the manifest
    assert merge_zoo(manifest, tmp_path / "again").names == manifest.names  # a rerun rewrites it
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "a.safetensors").write_bytes(b"")
    files = Manifest([ModelRecord("a", "a.safetensors", None, "a")], root=tmp_path / "z")
    with pytest.raises(ManifestError, match="a single weights file"):
        merge_zoo(files, tmp_path / "out")


def test_cli_merge_then_recover(adapter_zoo, tmp_path, capsys):
    _, folder = adapter_zoo
    assert main(["lineage", "recover", str(folder), "--stage", "generalize"]) == 0
    assert f"`atlas zoo merge {folder} --out DIR`" in capsys.readouterr().err
    assert main(["zoo", "merge", str(folder), "--out", str(tmp_path / "m")]) == 0
    assert "7 models written with full weights" in capsys.readouterr().out
    assert main(["lineage", "recover", str(tmp_path / "m"), "--truth", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "stores models as LoRA adapters" not in captured.err and "skipped" not in captured.err
    assert "/6), undirected" in captured.out.splitlines()[-1]  # every edge scored (3-step models: not all right)


def test_merge_refuses_a_folder_holding_another_zoo(adapter_zoo, tmp_path):
    """Another zoo of the same shape (model folders t0, t0.0... and a manifest) was taken for an earlier
    merge of this one and overwritten with this zoo's weights."""
    from tests.zoo.conftest import _config

    manifest, _ = adapter_zoo
    other = make_zoo(_config(trees=1, seed=5), tmp_path / "other", workers=1)
    before = {m.name: m.sha256 for m in other.models}
    with pytest.raises(ConfigError, match="other: holds another zoo"):
        merge_zoo(manifest, tmp_path / "other")
    assert set(verify_zoo(load_manifest(tmp_path / "other")).values()) == {"ok"}
    assert {m.name: m.sha256 for m in load_manifest(tmp_path / "other").models} == before
    (tmp_path / "other" / "manifest.json").unlink()  # its model folders alone are another zoo's too
    with pytest.raises(ConfigError, match="other: holds another zoo"):
        merge_zoo(manifest, tmp_path / "other")


def test_merge_refuses_a_folder_inside_the_zoo(adapter_zoo):
    """--out zoo/merged wrote the merged zoo into the zoo it read: `atlas zoo verify zoo` then failed on the
    'extra' folder merged/."""
    manifest, folder = adapter_zoo
    for inside in (folder / "merged", folder / manifest.names[0] / "m"):
        with pytest.raises(ConfigError, match="inside the zoo"):
            merge_zoo(manifest, inside)
        assert not inside.exists()
    assert set(verify_zoo(manifest).values()) == {"ok"}


def test_a_rerun_clears_what_a_killed_merge_left(adapter_zoo, tmp_path):
    """A merge killed mid-write (SIGKILL, power loss) leaves a hidden temporary file; the rerun kept it, and
    `atlas zoo verify` of the merged zoo failed on it as an extra file."""
    manifest, _ = adapter_zoo
    leftover = tmp_path / "m" / manifest.names[0] / ".model.safetensors.0123456789ab.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    merge_zoo(manifest, tmp_path / "m")
    assert not leftover.exists()
    from modelatlas.zoo.store import extra_files

    assert extra_files(load_manifest(tmp_path / "m")) == []


def test_ctrl_c_during_a_cli_merge_says_what_was_left(adapter_zoo, tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-merge said 'nothing partial was left', though --out held the models merged so far."""
    import modelatlas.zoo.merge as merge

    _, folder = adapter_zoo
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = merge.save_full
    monkeypatch.setattr(merge, "save_full", save)
    argv = ["zoo", "merge", str(folder), "--out", str(tmp_path / "m")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing partial" not in err and "rerun the same command" in err
    monkeypatch.setattr(merge, "save_full", real)
    assert main(argv) == 0


def test_a_manifest_whose_models_were_renamed_is_merged_by_their_paths(adapter_zoo, tmp_path):
    """Models renamed in manifest.json (paths kept) are shown and scored (--truth) by their new names, but
    merge read the folder named like the model ('zoo/model-0: not a finished zoo model')."""
    from tests.zoo.conftest import make_renamed_copy

    manifest, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    new, _ = make_renamed_copy(folder, zoo)
    merged = merge_zoo(load_manifest(zoo), tmp_path / "m")
    status = verify_zoo(load_manifest(tmp_path / "m"))
    assert merged.names == list(new.values()) and {status[n] for n in new.values()} == {"ok"}
    for old in new:
        assert torch.equal(load_state(tmp_path / "m", manifest[old].path)["classifier.weight"],
                           load_state(folder, old)["classifier.weight"])


def test_a_rerun_after_the_source_was_rebuilt_rewrites_the_merge(adapter_zoo, tmp_path):
    """A model of the source zoo trained again (damaged, then resumed) records other seconds and results: the
    earlier merge of the zoo is still this zoo's, not 'another zoo'."""
    from dataclasses import replace

    manifest, _ = adapter_zoo
    merge_zoo(manifest, tmp_path / "m")
    rebuilt = Manifest([replace(m, train={**m.train, "seconds": 99.0}) for m in manifest.models], manifest.config,
                       manifest.root)
    assert merge_zoo(rebuilt, tmp_path / "m").models[0].train["seconds"] == 99.0


def test_a_zoo_whose_weights_changed_since_it_was_built_is_not_merged(adapter_zoo, tmp_path):
    """A model file overwritten since the build (another model's weights) was merged as it was, and the merged
    manifest recorded its digest: the merged zoo verified 'ok' with weights that are not the recorded model's."""
    import shutil

    manifest, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    shutil.copytree(folder, zoo)
    full = [m for m in manifest.models if m.storage == "full"]
    child = next(m for m in manifest.models if m.storage == "adapter")
    victim = zoo / child.path / "adapter_model.safetensors"
    other = next(m for m in manifest.models if m.storage == "adapter" and m.name != child.name)
    shutil.copy(zoo / other.path / "adapter_model.safetensors", victim)
    assert full  # the root, read as it is
    with pytest.raises(ManifestError, match=f"zoo: {child.name} changed since the zoo was built .*atlas zoo verify"):
        merge_zoo(load_manifest(zoo), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_single_file_model_is_refused_before_anything_is_written(adapter_zoo, tmp_path):
    """A manifest listing a single weights file after zoo folders had those folders merged into --out before
    the refusal."""
    import shutil
    from dataclasses import replace

    manifest, folder = adapter_zoo
    zoo = tmp_path / "zoo"
    shutil.copytree(folder, zoo)
    (zoo / "extra.safetensors").write_bytes((zoo / manifest.models[0].path / "model.safetensors").read_bytes())
    last = replace(manifest.models[0], name="extra", path="extra.safetensors", parent=None, tree="extra", sha256="")
    with pytest.raises(ManifestError, match="a single weights file"):
        merge_zoo(Manifest([*manifest.models, last], manifest.config, zoo), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_help_says_an_earlier_merge_is_rewritten(capsys):
    """--help said --out must be 'new or empty', though a rerun into an earlier merge of the zoo is how an
    interrupted merge is finished."""
    with pytest.raises(SystemExit):
        main(["zoo", "merge", "--help"])
    assert "or an earlier merge of this zoo" in " ".join(capsys.readouterr().out.split())


def test_the_adapter_note_is_printed_only_where_it_applies(adapter_zoo, tmp_path, capsys):
    """`atlas index build ZOO --base ROOT` printed 'stores models as LoRA adapters on their parents' (use `atlas
    zoo merge`) for a zoo whose adapters all sit on ROOT, where --base is the way. Now, with --base, only for a
    zoo holding adapters on another parent (here on adapters: the grandchildren of a depth-2 zoo)."""
    from tests.zoo.conftest import _config

    _, deep = adapter_zoo
    flat = tmp_path / "flat"
    make_zoo(_config(trees=1, depth=1, method="lora", storage="adapter", lora_ranks=(2,)), flat, workers=1)
    for zoo, base, said in [(flat, [], True), (flat, ["--base", str(flat / "t0")], False),
                            (deep, ["--base", str(deep / "t0")], True)]:
        out = ["--out", str(tmp_path / "atlas"), "--stage", "specialize"]
        assert main(["index", "build", str(zoo), *out, *base]) == 0
        err = capsys.readouterr().err
        assert (f"note: {zoo} stores models as LoRA adapters on their parents" in err) == said, err
    assert "not all on --base: t0.0.0 is on t0.0; `atlas zoo merge" in err


def test_probex_predict_on_a_zoo_of_adapters_says_to_merge_it(adapter_zoo, tmp_path, capsys):
    """Each adapter was reported as 'belongs to no known tree' (its update B A alone is far from every tree),
    with no word that the zoo is stored as adapters, as `atlas index build` and `lineage recover` say."""
    from tests.probex.test_experts import make_experts

    _, folder = adapter_zoo
    experts = make_experts(tmp_path)
    main(["probex", "predict", str(folder), "--experts", str(experts)])
    assert f"stores models as LoRA adapters on their parents; `atlas zoo merge {folder} --out DIR`" in capsys.readouterr().err


def test_an_adapter_zoo_with_bfloat16_merges_merged_keeps_them(tmp_path):
    import json

    from tests.zoo.conftest import _config

    zoo = make_zoo(_config(trees=1, depth=1, children=3, method="lora", storage="adapter", lora_ranks=(2,), merges=2,
                           merge_dtype="bfloat16"), tmp_path / "z", workers=1)
    merged = merge_zoo(zoo, tmp_path / "m")
    assert merged.merges() == zoo.merges() and set(verify_zoo(merged).values()) == {"ok"}
    for name in zoo.merges():
        assert open_checkpoint(tmp_path / "m" / name).read("classifier.weight").dtype == torch.bfloat16
        assert json.loads((tmp_path / "m" / name / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "m" / "t0" / "config.json").read_text())["torch_dtype"] == "float32"
