"""Imported first by every bench script (each imports torch): the ``atlas`` command line's OpenMP policy,
:func:`modelatlas.waiting.short_spin` (``GOMP_SPINCOUNT=1000`` unless the environment sets it or
``OMP_WAIT_POLICY``), so that a benchmark times what ``atlas`` runs.

libgomp reads the variable once, when torch loads it, so this must run before the script's first import of
torch (or of anything that imports it: safetensors.torch, modelatlas' subpackages): a call in ``main()`` comes
too late. Hence an import, written as the script's first one, ``import short_spin  # noqa: F401  # isort: skip``
(``isort: skip`` keeps ruff's import sorting from moving it below ``import torch``). Without it, idle OpenMP
threads spinning on the 2 shared cores cost 5-10x on a busy machine (docs/benchmarks.md, "Session 31: OpenMP
threads that spin only briefly"). A no-op where torch is already loaded (a test importing a bench script).
"""

from modelatlas.waiting import short_spin

short_spin()
