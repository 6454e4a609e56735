import re

import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError
from modelatlas.weights import discover_models, model_name, open_checkpoint, unique_names
from modelatlas.weights.hub_cache import hub_cache_dir, parse_hub_id

COMMIT = "a" * 40
OLD = "b" * 40


def make_cached_model(cache, repo_id="org/tiny", commit=COMMIT, ref="main", value=1.0):
    """The huggingface_hub layout: blobs/, refs/<ref> holding the commit, snapshots/<commit>/ linking to blobs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    blob = repo / "blobs" / f"blob-{commit}"
    save_file({"w": torch.full((2, 2), value)}, str(blob))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # "org/tiny" must not exist as a local path
    return tmp_path / "hub"


def test_open_by_hub_id(cache):
    snap = make_cached_model(cache)
    with open_checkpoint("org/tiny") as ck:
        assert ck.name == "org/tiny" and ck.path == snap
        assert torch.equal(ck.read("w"), torch.ones(2, 2))


def test_a_snapshot_folder_given_as_a_path_is_named_by_its_repo(cache):
    snap = make_cached_model(cache)  # was named by its commit hash, "aaaa...": no clue which model it is
    old = make_cached_model(cache, commit=OLD, ref="v1", value=2.0)
    assert model_name(snap) == "org/tiny@aaaaaaa" and model_name(snap / "model.safetensors") == "org/tiny@aaaaaaa"
    with open_checkpoint(snap) as ck:
        assert ck.name == "org/tiny@aaaaaaa"
    assert unique_names([snap, old / "model.safetensors"]) == ["org/tiny@aaaaaaa", "org/tiny@bbbbbbb"]
    assert model_name(cache / "snapshots" / COMMIT) == COMMIT  # not in a cache entry: its own name


def test_layout_matches_huggingface_hub(cache):
    hub = pytest.importorskip("huggingface_hub")
    snap = make_cached_model(cache)
    found = hub.try_to_load_from_cache("org/tiny", "model.safetensors", cache_dir=cache)
    assert found is not None and open_checkpoint("org/tiny").path / "model.safetensors" == snap / "model.safetensors"


def test_revisions(cache):
    make_cached_model(cache)
    make_cached_model(cache, commit=OLD, ref="v1", value=2.0)
    with open_checkpoint("org/tiny@v1") as ck:
        assert torch.equal(ck.read("w"), torch.full((2, 2), 2.0))
        assert ck.name == "org/tiny@v1"  # not "org/tiny": two revisions of one model are two names
    with open_checkpoint(f"org/tiny@{COMMIT}") as ck:
        assert torch.equal(ck.read("w"), torch.ones(2, 2))
    with pytest.raises(CheckpointError, match=r"revision 'v9' of 'org/tiny' is not in the local Hugging Face cache"):
        open_checkpoint("org/tiny@v9")


def test_missing_id_says_no_download(cache):
    cache.mkdir()
    with pytest.raises(CheckpointError, match=rf"hub id 'org/absent' is not in the local Hugging Face cache at "
                                              rf"{re.escape(str(cache))}.*modelatlas does not download"):
        open_checkpoint("org/absent")


def test_local_path_wins_and_file_paths_are_not_ids(cache, tmp_path):
    make_cached_model(cache)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    save_file({"local": torch.zeros(1)}, str(tmp_path / "org" / "tiny" / "model.safetensors"))
    with open_checkpoint("org/tiny") as ck:
        assert ck.keys() == ["local"]
    assert parse_hub_id("runs/model.pt") is None
    with pytest.raises(CheckpointError, match="runs/model.pt: no such file or folder$"):
        open_checkpoint("runs/model.pt")


def test_cache_dir_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):  # whatever the developer's shell sets
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"


def test_cache_dir_follows_huggingface_hub_in_full(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # was ignored: ~/.cache looked up instead
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))  # the older name, still honoured
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("WHERE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", "$WHERE/hub")  # expanded, as huggingface_hub does
    assert hub_cache_dir() == tmp_path / "hub"


def test_discover_keeps_hub_ids(cache):
    make_cached_model(cache)
    [path] = discover_models(["org/tiny"])
    with open_checkpoint(path) as ck:
        assert ck.name == "org/tiny"


def test_bare_hub_ids_like_gpt2(cache):
    make_cached_model(cache, repo_id="gpt2")
    assert parse_hub_id("gpt2") == ("gpt2", "main") and parse_hub_id("gpt2@v1") == ("gpt2", "v1")
    [path] = discover_models(["gpt2"])
    with open_checkpoint(path) as ck:
        assert ck.name == "gpt2" and torch.equal(ck.read("w"), torch.ones(2, 2))
    with pytest.raises(CheckpointError, match=r"^gtp2: no such file or folder, and hub id 'gtp2' is not in the local"):
        open_checkpoint("gtp2")  # a typo: says both what was looked for and where
    assert parse_hub_id("model.safetensors") is None and parse_hub_id("./gpt2") is None


@pytest.mark.parametrize("target", ["../../../outside", "ABSOLUTE"])
def test_a_ref_naming_a_folder_outside_the_cache_is_refused(cache, tmp_path, target):
    make_cached_model(cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(outside / "model.safetensors"))
    ref = cache / "models--org--tiny" / "refs" / "evil"
    ref.write_text(str(outside) if target == "ABSOLUTE" else target)  # snapshots/<ref> would be `outside`
    with pytest.raises(CheckpointError, match=r"refs/evil: corrupt Hugging Face cache ref: holds '.*outside', "
                                              r"not a commit hash"):
        open_checkpoint("org/tiny@evil")
    assert parse_hub_id("org/tiny@/etc/hostname") is None  # a revision is a name under refs/, never a path


def test_a_cache_entry_given_as_a_folder_names_its_hub_id(cache):
    make_cached_model(cache)
    entry = cache / "models--org--tiny"  # was "no models found": refs/, snapshots/ and blobs/ hold no model
    assert discover_models([entry]) == [entry] and discover_models([cache]) == [entry]  # reported when opened
    with pytest.raises(CheckpointError, match=rf"models--org--tiny: a Hugging Face cache entry, not a model folder; "
                                              rf"give its hub id org/tiny \(with HF_HUB_CACHE={re.escape(str(cache))} "):
        open_checkpoint(entry)


def test_a_short_commit_opens_its_snapshot(cache):
    snap = make_cached_model(cache)  # a snapshot given as a path is named org/tiny@aaaaaaa: that name opens it
    with open_checkpoint("org/tiny@aaaaaaa") as ck:
        assert ck.path == snap and ck.name == "org/tiny@aaaaaaa"
    make_cached_model(cache, commit="a" * 39 + "b", ref="v2")
    with pytest.raises(CheckpointError, match=r"start of 2 cached commits.*give more of the commit hash"):
        open_checkpoint("org/tiny@aaaaaaa")
    with pytest.raises(CheckpointError, match=r"revision 'ccccccc' of 'org/tiny' is not in the local"):
        open_checkpoint("org/tiny@ccccccc")


def test_a_snapshot_whose_blob_is_gone_names_the_broken_link(cache):
    snap = make_cached_model(cache)
    blob = (snap / "model.safetensors").resolve()
    blob.unlink()  # pruned from blobs/ (or a download cut short), the snapshot's link left behind
    with pytest.raises(CheckpointError, match=f"model.safetensors is a link to {blob}, which does not exist"):
        open_checkpoint("org/tiny")


def test_a_shard_whose_blob_is_gone_names_the_broken_link(cache):
    snap = make_cached_model(cache)
    (snap / "model.safetensors").unlink()
    blob = cache / "models--org--tiny" / "blobs" / "shard-blob"
    save_file({"w": torch.ones(2, 2)}, str(blob))
    (snap / "model-00001-of-00001.safetensors").symlink_to(blob)
    (snap / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00001.safetensors"}}')
    assert torch.equal(open_checkpoint("org/tiny").read("w"), torch.ones(2, 2))
    blob.unlink()
    with pytest.raises(CheckpointError, match=f"shard 'model-00001-of-00001.safetensors' is a link to {blob}, "
                                              "which does not exist"):
        open_checkpoint("org/tiny")


def test_a_model_cached_by_commit_only_names_its_snapshots(cache):
    # snapshot_download(revision=<commit>) writes no refs/main: "org/tiny" said only "not in the local cache"
    make_cached_model(cache)
    (cache / "models--org--tiny" / "refs" / "main").unlink()
    with pytest.raises(CheckpointError, match=r"revision 'main' of 'org/tiny' is not in the local Hugging Face "
                                              r"cache .*; it holds org/tiny@aaaaaaa \(give that\)"):
        open_checkpoint("org/tiny")


def test_hub_cache_folder_names_and_commits():
    from modelatlas.weights.base import hub_folder_name, hub_repo_id, is_commit

    assert hub_folder_name("org/my--name") == "models--org--my--name"
    assert hub_repo_id("models--org--name") == "org/name" and hub_repo_id("models--gpt2") == "gpt2"
    assert hub_repo_id("datasets--org--name") is None and hub_repo_id("org--name") is None
    assert is_commit("0123456789abcdef0123456789abcdef01234567")
    assert not is_commit("0123456789ABCDEF0123456789abcdef01234567") and not is_commit("0123456789abcdef")
    assert not is_commit("0123456789abcdef0123456789abcdef01234567\n")


@pytest.mark.parametrize("written", ["./gpt2", "gpt2/"])
def test_a_path_written_as_one_is_never_a_hub_id(cache, written):
    make_cached_model(cache, repo_id="gpt2")  # `./gpt2` is a local folder that is missing, not the cached gpt2
    with pytest.raises(CheckpointError, match=r"^gpt2: no such file or folder$"):
        open_checkpoint(written)  # opened the cached model: pathlib drops the ./ and the trailing /
    with pytest.raises(CheckpointError, match=r"^gpt2: no such file or folder$"):
        discover_models([written])  # was kept as the hub id, and said `huggingface-cli download gpt2` when absent
