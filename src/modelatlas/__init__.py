"""modelatlas: neural-network weights and datasets as data.

Capabilities live in subpackages:

- :mod:`modelatlas.weights`  -- the only code that reads checkpoints (safetensors, PyTorch, HF folders, PEFT, ...).
- :mod:`modelatlas.zoo`      -- model families with known lineage (ground truth for tests and benchmarks).
- :mod:`modelatlas.lineage`  -- MoTHer lineage recovery: who was fine-tuned from whom.
- :mod:`modelatlas.probex`   -- ProbeX tree experts: learning on weights, text search over models.
- :mod:`modelatlas.data`     -- offline dataset registry and transforms.
- :mod:`modelatlas.distill`  -- dataset distillation (DC/DSA/DM/MTT/RaT-BPTT/PoDD, Teddy, HeLlO, DDM).
- :mod:`modelatlas.cli`      -- the ``atlas`` command line (the only code that prints or parses arguments).
"""

__version__ = "0.1.0"
