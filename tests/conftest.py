"""Shared test setup: single-threaded torch (tests must not fight over the 2 CI cores) and a seeded start."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches of trained teachers / experts / pools go to a folder of this session, never the user's home.
os.environ["ATLAS_CACHE_DIR"] = tempfile.mkdtemp(prefix="atlas-test-cache-")
atexit.register(shutil.rmtree, os.environ["ATLAS_CACHE_DIR"], True)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
