"""PyTorch Lightning checkpoints (the module attribute stripped) and the values admitted in their
hyper_parameters (paths, argparse.Namespace) by torch_pickle's weights_only load."""

import datetime
import os
import pathlib
import pickle
import sys
import threading
import types
import zipfile
from argparse import Namespace
from collections import OrderedDict
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
import torch
from tests.weights.conftest import check_reads_state_dict, make_evil, make_state_dict

from modelatlas.errors import UnsafeCheckpointError
from modelatlas.weights import open_checkpoint
from modelatlas.weights.torch_pickle import admitted_globals


def make_lightning_state(prefix="model."):
    return {f"{prefix}{k}": v for k, v in make_state_dict().items()}


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_module_attribute_is_stripped_and_kept_as_name_prefix(tmp_path, legacy, make_lightning_ckpt):
    p = make_lightning_ckpt(tmp_path / "epoch=3-step=30.ckpt", make_lightning_state(), legacy)
    with open_checkpoint(p) as ck:
        check_reads_state_dict(ck)  # "model.layer.weight" is listed as "layer.weight", as a plain save lists it
        assert ck.name_prefix == "model."
    with open_checkpoint(p) as ck:  # reopened after close(): same names
        ck.close()
        assert ck.read("layer.bias").dtype == torch.float16 and ck.name_prefix == "model."


def test_lightning_checkpoint_told_by_trainer_keys_without_its_version(tmp_path):
    torch.save({"epoch": 1, "global_step": 8, "state_dict": make_lightning_state("net.")}, tmp_path / "a.ckpt")
    torch.save({"state_dict": make_lightning_state("backbone._orig_mod."), "callbacks": {}}, tmp_path / "b.ckpt")
    with open_checkpoint(tmp_path / "a.ckpt") as a, open_checkpoint(tmp_path / "b.ckpt") as b:
        check_reads_state_dict(a)
        check_reads_state_dict(b)  # torch.compile'd network in the module: both prefixes go
        assert (a.name_prefix, b.name_prefix) == ("net.", "backbone._orig_mod.")


def test_names_that_only_share_a_first_component_are_kept_outside_lightning(tmp_path):
    # a transformers save's "model.layers.0..." are real names; so are a DDP-stripped plain save's
    state = {"model.layers.0.q.weight": torch.ones(2, 2), "model.norm.weight": torch.ones(2)}
    torch.save(state, tmp_path / "hf.bin")
    torch.save({"module.model.w": torch.ones(2)}, tmp_path / "ddp.pt")
    with open_checkpoint(tmp_path / "hf.bin") as hf, open_checkpoint(tmp_path / "ddp.pt") as ddp:
        assert hf.keys() == list(state) and hf.name_prefix == ""
        assert ddp.keys() == ["model.w"] and ddp.name_prefix == "module."


def test_lightning_module_of_two_networks_keeps_its_names(tmp_path, make_lightning_ckpt):
    state = {"encoder.0.weight": torch.ones(3, 2), "decoder.0.weight": torch.ones(2, 3)}
    p = make_lightning_ckpt(tmp_path / "ae.ckpt", state)
    with open_checkpoint(p) as ck:
        assert ck.keys() == ["encoder.0.weight", "decoder.0.weight"] and ck.name_prefix == ""


class make_ordered_dict(OrderedDict):  # noqa: N801 - named like the helpers; torch admits OrderedDict, not this
    pass


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_hyper_parameters_holding_objects_are_refused_by_name(tmp_path, legacy, make_lightning_ckpt):
    """save_hyperparameters() of a datetime (an OmegaConf config) stores the object: weights_only refuses it."""
    p = make_lightning_ckpt(tmp_path / "hp.ckpt", make_lightning_state(), legacy,
                            hyper_parameters={"data": Path("/x"), "when": datetime.datetime(2024, 1, 2)})
    with pytest.raises(UnsafeCheckpointError, match=r"hp\.ckpt: refused to unpickle: a PyTorch Lightning "
                       r"checkpoint holding a Python object \(datetime\.datetime\) besides its weights, most "
                       r"often in hyper_parameters .*torch\.save\(torch\.load\(PATH, weights_only=False\)"
                       r"\['state_dict'\], 'model\.pt'\)$") as info:
        open_checkpoint(p)
    assert "\n" not in str(info.value)
    torch.save({"args": make_ordered_dict(lr=0.1), "w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"plain\.pt: refused to unpickle: the file would execute "
                       r"code \(.*make_ordered_dict"):
        open_checkpoint(tmp_path / "plain.pt")  # no Lightning marker: the general message


needs_torch_2_6 = pytest.mark.skipif(torch.__version__ < (2, 6), reason="torch < 2.6 admits no (class, name) pairs")


@needs_torch_2_6
@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_hyper_parameters_of_paths_and_namespaces_are_read(tmp_path, legacy, make_lightning_ckpt):
    """The values are admitted for our load only: a plain weights_only load refuses them after it."""
    hp = {"data": Path("/x"), "args": Namespace(lr=0.1, out=PurePosixPath("o")), "w": PureWindowsPath("C:/d")}
    p = make_lightning_ckpt(tmp_path / "hp.ckpt", make_lightning_state(), legacy, hyper_parameters=hp)
    with open_checkpoint(p) as ck:
        check_reads_state_dict(ck)
        assert ck.name_prefix == "model."
    with pytest.raises(pickle.UnpicklingError, match="PosixPath"):
        torch.load(p, weights_only=True)


@needs_torch_2_6
@pytest.mark.skipif(os.name == "nt", reason="checks how a POSIX system loads paths pickled elsewhere")
@pytest.mark.parametrize("module, name, pure, text, loaded", [
    ("pathlib", "WindowsPath", PureWindowsPath, "C:\\d", PureWindowsPath),
    ("pathlib._local", "PosixPath", PurePosixPath, "/d", pathlib.PosixPath)])
def test_paths_pickled_elsewhere_load_as_path_values(tmp_path, monkeypatch, module, name, pure, text, loaded):
    """A Windows machine's WindowsPath (not instantiable here: a PureWindowsPath), a Python 3.13 PosixPath."""
    fake = type(name, (pure,), {"__module__": module, "__qualname__": name})
    monkeypatch.setitem(sys.modules, module, sys.modules.get(module) or types.ModuleType(module))
    monkeypatch.setattr(sys.modules[module], name, fake, raising=False)  # so pickle writes GLOBAL module name
    torch.save({"hp": {"data": fake(text)}, "w": torch.ones(1)}, tmp_path / "m.pt")
    monkeypatch.undo()
    assert f"{module}\n{name}".encode() in zipfile.ZipFile(tmp_path / "m.pt").read("m/data.pkl")
    with open_checkpoint(tmp_path / "m.pt") as ck:
        assert ck.keys() == ["w"]
    with torch.serialization.safe_globals(admitted_globals()):
        data = torch.load(tmp_path / "m.pt", weights_only=True)["hp"]["data"]
    assert type(data) is loaded and str(data) == text


@needs_torch_2_6
def test_an_allowlisted_pair_the_caller_added_stays_after_our_load(tmp_path):
    before, theirs = torch.serialization.get_safe_globals(), (Namespace, "argparse.Namespace")
    torch.save({"w": torch.ones(1)}, tmp_path / "m.pt")
    try:
        torch.serialization.add_safe_globals([theirs])
        open_checkpoint(tmp_path / "m.pt").close()
        assert theirs in torch.serialization.get_safe_globals()  # leaving safe_globals removes what it added
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


@needs_torch_2_6
def test_loads_in_two_threads_keep_the_admitted_values_until_both_end(tmp_path, make_lightning_ckpt, monkeypatch):
    """Thread 1 starts loading, thread 2 starts while it runs, thread 1 ends first: leaving its safe_globals
    context took the admitted values away from thread 2's load, which refused the Path in hyper_parameters."""
    p = make_lightning_ckpt(tmp_path / "hp.ckpt", make_lightning_state(), hyper_parameters={"data": Path("/x")})
    real_load, first_in, second_in, first_done = torch.load, *(threading.Event() for _ in range(3))

    def load(*args, **kwargs):  # the two loads overlap in this order: first in, second in, first out, second out
        if threading.current_thread().name == "first":
            first_in.set()
            assert second_in.wait(10)
            return real_load(*args, **kwargs)
        second_in.set()
        assert first_done.wait(10)
        return real_load(*args, **kwargs)

    def run(name):
        try:
            open_checkpoint(p).close()
            results[name] = "read"
        except Exception as e:  # noqa: BLE001 - the test reports what the thread raised
            results[name] = repr(e)
        if name == "first":
            first_done.set()

    results = {}
    monkeypatch.setattr(torch, "load", load)
    first = threading.Thread(target=run, args=("first",), name="first")
    second = threading.Thread(target=run, args=("second",), name="second")
    first.start()
    assert first_in.wait(10)
    second.start()
    for t in (first, second):
        t.join(20)
    assert results == {"first": "read", "second": "read"}
    assert (Namespace, "argparse.Namespace") not in torch.serialization.get_safe_globals()  # gone after both


@needs_torch_2_6
@pytest.mark.parametrize("inside", ["namespace", "path"])
def test_code_inside_an_admitted_value_is_refused_and_runs_nothing(tmp_path, inside):
    marker = tmp_path / "pwned"
    value = Namespace(x=make_evil(marker)) if inside == "namespace" else make_evil(marker, around=PurePosixPath)
    torch.save({"w": torch.ones(1), "hp": value}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused to unpickle: the file would execute code"):
        open_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert (Namespace, "argparse.Namespace") not in torch.serialization.get_safe_globals()  # left on the error too
