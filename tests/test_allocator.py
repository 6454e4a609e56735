import sys

import pytest

from modelatlas.allocator import keep_freed_memory


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("ATLAS_MALLOC", "default")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("ATLAS_MALLOC", raising=False)
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory() is True
    big = bytearray(64 << 20)  # a 64 MiB block: now from the heap; still allocates and frees fine
    big[-1] = 1
    del big
