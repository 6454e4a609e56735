"""Shared test setup: single-threaded torch (tests must not fight over the 2 CI cores) and a seeded start;
fixtures more than one test folder uses."""

import atexit
import json
import os
import shutil
import signal
import tempfile

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches of trained teachers / experts / pools go to a folder of this session, never the user's home.
os.environ["ATLAS_CACHE_DIR"] = tempfile.mkdtemp(prefix="atlas-test-cache-")
atexit.register(shutil.rmtree, os.environ["ATLAS_CACHE_DIR"], True)
torch.set_num_threads(1)
# A shell's background job (`pytest &`, nohup) starts with SIGINT ignored, and Python keeps it so: the Ctrl-C tests
# (tests/distill: a SIGINT sent to the process) saw nothing and failed ("DID NOT RAISE KeyboardInterrupt",
# session 39). The tests run as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_adapter_family():
    """``make_adapter_family(folder, n=3)``: a base model and n PEFT adapters trained on it, written to folder."""
    return _adapter_family


def _adapter_family(folder, n=3):
    """base.safetensors (3 layers 16 x 16) and PEFT adapters a0..a{n-1} (rank 2, seeded) trained on it."""
    g = torch.Generator().manual_seed(5)
    folder.mkdir()
    save_file({f"layers.{i}.weight": torch.randn(16, 16, generator=g) for i in range(3)}, str(folder / "base.safetensors"))
    for k in range(n):
        ad = folder / f"a{k}"
        ad.mkdir()
        (ad / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["layers.0", "layers.1", "layers.2"]}))
        save_file({f"base_model.model.layers.{i}.lora_{m}.weight": 0.3 * torch.randn(*shape, generator=g)
                   for i in range(3) for m, shape in (("A", (2, 16)), ("B", (16, 2)))}, str(ad / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def make_lightning_ckpt():
    """``make_lightning_ckpt(path, state_dict, legacy=False, **top_level)``: a PyTorch Lightning checkpoint."""
    return _lightning_ckpt


def _lightning_ckpt(path, state_dict, legacy=False, **extra):
    """A Trainer checkpoint as Lightning 2.x writes it (plain types only), the weights under "state_dict";
    ``extra`` replaces or adds top-level keys; ``legacy``: the pre-zip torch.save format."""
    opt = {"state": {0: {"step": torch.tensor(30.0), "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0", "state_dict": state_dict,
                "loops": {"fit_loop": {"state_dict": {}}}, "optimizer_states": [opt], "lr_schedulers": [],
                "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)}},
                "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}, **extra},
               path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def non_utf8_name(tmp_path):
    """``"m\\udce9"``: the file name ``b"m\\xe9"`` (a Latin-1 é, not UTF-8) as Python holds it, with a surrogate
    escape. Skips the test where tmp_path's file system refuses such a name (macOS, Windows)."""
    name = os.fsdecode(b"m\xe9")
    try:
        (tmp_path / name).touch()
    except (OSError, UnicodeEncodeError) as e:
        pytest.skip(f"the file system refuses a file name that is not UTF-8 ({e})")
    (tmp_path / name).unlink()
    return name


@pytest.fixture
def make_two_class_images():
    """``make(root)``: an image folder of two classes (cat, dog), 4 grey 8 x 8 PNGs each; returns ``root``."""
    return _image_tree


def _image_tree(root):
    import numpy as np
    from PIL import Image

    for c, value in (("cat", 30), ("dog", 220)):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(root / c / f"{i}.png")
    return root
