"""A run or a cache made on one device type and taken up on another (the simulated device of ``conftest.py``):
a resume goes on with one :class:`~modelatlas.errors.DeviceChangeWarning` (the device type is in checkpoint.json);
MTT's, Teddy's and HeLlO's caches, stored on the CPU and keyed by no device, load on either and say which
device trained them."""

import json
import warnings

import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.distill import distill
from modelatlas.errors import DeviceChangeWarning


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits", "train")


def check_same_set(a, b):
    assert torch.equal(a.images.detach(), b.images.detach()) and torch.equal(a.targets(), b.targets())
    assert sorted(a.extras) == sorted(b.extras) and all(torch.equal(v, b.extras[k]) for k, v in a.extras.items())


def device_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeviceChangeWarning)]


def make_checkpoint(method, tiny, train, tmp_path, device="cpu"):
    """A run of ``method`` stopped after its first iteration on ``device``: its checkpoint folder."""
    ck = tmp_path / "ckpt"
    distill(method, train, 1, tiny(method, tmp_path / "cache", iterations=1), seed=0, checkpoint_dir=ck,
            device=device)
    return ck


def resumed(method, tiny, train, tmp_path, ck, device, iterations=None):
    """The run of ``ck`` resumed on ``device`` to ``iterations`` (default: the tiny config's) and the
    DeviceChangeWarnings it issued."""
    extra = {} if iterations is None else {"iterations": iterations}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        syn = distill(method, train, 1, tiny(method, tmp_path / "cache", **extra), seed=0, checkpoint_dir=ck,
                      resume=True, device=device)
    return syn, device_warnings(caught)


@pytest.mark.parametrize("method", ("mtt", "podd"))
def test_a_run_checkpointed_on_the_cpu_resumes_on_the_device_with_one_warning(method, tiny, train, sim_device,
                                                                               tmp_path):
    """It resumed without a word. The states load on any device (here the set is still the straight run's: the
    simulation computes as the CPU does); the warning is one line naming both devices."""
    straight = distill(method, train, 1, tiny(method, tmp_path / "cache"), seed=0, device="cpu")
    ck = make_checkpoint(method, tiny, train, tmp_path)
    assert json.loads((ck / "checkpoint.json").read_text())["device"] == "cpu"
    with sim_device:
        syn, said = resumed(method, tiny, train, tmp_path, ck, sim_device.device)
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"{ck / 'checkpoint.json'}: checkpointed on cpu, resumed on meta; the run goes on")
    check_same_set(straight, syn)
    meta = json.loads((ck / "checkpoint.json").read_text())
    assert meta["device"] == "meta" and meta["devices"] == ["cpu", "meta"]  # the last part's; every part's


def test_a_resume_on_the_same_device_type_is_bit_identical_and_silent(tiny, train, tmp_path):
    straight = distill("dm", train, 1, tiny("dm", tmp_path / "cache"), seed=0, device="cpu")
    syn, said = resumed("dm", tiny, train, tmp_path, make_checkpoint("dm", tiny, train, tmp_path), "cpu")
    assert said == []
    check_same_set(straight, syn)


def test_no_warning_without_iterations_left_or_from_a_checkpoint_that_records_no_device(tiny, train, sim_device,
                                                                                       tmp_path):
    """A finished run asked again on another device distils nothing more (its evaluation records its device);
    a checkpoint of before session 36 does not say where it ran."""
    ck = make_checkpoint("dm", tiny, train, tmp_path)
    with sim_device:
        _, said = resumed("dm", tiny, train, tmp_path, ck, sim_device.device, iterations=1)
    assert said == []
    meta = json.loads((ck / "checkpoint.json").read_text())
    del meta["device"]
    (ck / "checkpoint.json").write_text(json.dumps(meta))
    with sim_device:
        _, said = resumed("dm", tiny, train, tmp_path, ck, sim_device.device)
    assert said == []


CACHE_DEVICE = {"mtt": "expert_buffer_device", "teddy": "pool_device", "hello": "teacher_device"}


@pytest.mark.parametrize("method", sorted(CACHE_DEVICE))
@pytest.mark.parametrize("first", ("cpu", "device"))
def test_a_cache_made_on_one_device_is_reused_on_the_other_and_says_whose_it_is(method, first, tiny, train,
                                                                               sim_device, tmp_path):
    """Stored on the CPU and keyed by no device (distill/cache.py says why): the second run on the other device
    trains nothing (the cache's files are the same), its set is the first's, and its meta names the device that
    trained the cache (there was no record of it)."""
    devices = {"cpu": "cpu", "device": sim_device.device}
    second = "device" if first == "cpu" else "cpu"
    cfg = {**tiny(method, tmp_path), "cache_dir": str(tmp_path / "cache")}
    with sim_device:
        a = distill(method, train, 1, cfg, seed=0, device=devices[first])
        files = {p: p.read_bytes() for p in sorted((tmp_path / "cache").rglob("*")) if p.is_file()}
        b = distill(method, train, 1, cfg, seed=0, device=devices[second])
    assert {p: p.read_bytes() for p in sorted((tmp_path / "cache").rglob("*")) if p.is_file()} == files
    check_same_set(a, b)
    made_on = torch.device(devices[first]).type
    assert a.meta[CACHE_DEVICE[method]] == b.meta[CACHE_DEVICE[method]] == made_on


def test_a_run_folder_says_every_device_type_it_ran_on(tiny, train, sim_device, tmp_path):
    """result.json named the last part's device only: a run moved from a GPU to the CPU read as all-CPU."""
    from modelatlas.distill.api import run_distillation

    quick = dict(seed=0, eval_nets=1, eval_epochs=1, baseline=False)
    config = {"iterations": 1, "width": 8, "batch_real": 16, "checkpoint_every": 1}
    run_distillation("dm", "digits", 1, tmp_path, config=config, device="cpu", **quick)
    with sim_device, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeviceChangeWarning)
        info = run_distillation("dm", "digits", 1, tmp_path, config={**config, "iterations": 2}, resume=True,
                                device=sim_device.device, **quick)
    assert info["devices"] == ["cpu", "meta"] and json.loads((tmp_path / "result.json").read_text())["devices"] == [
        "cpu", "meta"]
    assert run_distillation("dm", "digits", 1, tmp_path / "b", config=config, **quick)["devices"] == ["cpu"]


def test_device_history_of_old_and_new_checkpoints():
    from modelatlas.distill.loop import device_history

    assert device_history(None, "cpu") == ["cpu"]
    assert device_history({"device": "cuda"}, "cpu") == ["cuda", "cpu"]  # a checkpoint with its last device only
    assert device_history({"devices": ["cuda", "cpu"], "device": "cpu"}, "cpu") == ["cuda", "cpu"]
    assert device_history({}, "cuda") == ["cuda"]
