import sys

import pytest

from modelatlas.plugins import load_plugins_once


def test_a_failed_plugin_import_is_tried_again(tmp_path, monkeypatch):
    """The registries marked their plugins loaded before importing them: after one failed import (a missing
    dependency), every later lookup found an empty registry ('unknown dataset') instead of the error."""
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("import fakepkg\nfakepkg.hits = getattr(fakepkg, 'hits', 0) + 1\n")
    (pkg / "bad.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):
        with pytest.raises(ImportError, match="needs libfoo"):
            load_plugins_once("fakepkg", ["good", "bad", "absent"])
    (pkg / "bad.py").write_text("")  # fixed (installed)
    load_plugins_once("fakepkg", ["good", "bad", "absent"])
    load_plugins_once("fakepkg", ["good", "bad", "absent"])  # loaded: nothing imported again
    assert sys.modules["fakepkg"].hits == 1


def test_a_plugin_using_its_registry_on_import_does_not_recurse(tmp_path, monkeypatch):
    pkg = tmp_path / "selfpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "uses.py").write_text("from modelatlas.plugins import load_plugins_once\n"
                                 "load_plugins_once('selfpkg', ['uses'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins_once("selfpkg", ["uses"])
    assert "selfpkg.uses" in sys.modules
