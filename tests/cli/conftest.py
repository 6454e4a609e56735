"""The commands' tests expect the user-facing behaviour, whatever the developer's shell exports."""

import pytest


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    # ATLAS_DEBUG=1 (which the README suggests) would re-raise the errors these tests expect as one line;
    # ATLAS_PROGRESS=1 would draw bars into the captured stderr.
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    monkeypatch.delenv("ATLAS_PROGRESS", raising=False)
