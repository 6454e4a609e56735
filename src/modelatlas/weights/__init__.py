"""Reading checkpoints: the only code in modelatlas that opens weight files.

One interface for every format: :func:`open_checkpoint` returns a :class:`Checkpoint` that lists tensors
(name, shape, dtype) without loading them and reads one tensor at a time, so a caller that needs one layer
never holds the whole model. :func:`discover_models` expands folders into the models they hold.
"""

from modelatlas.weights.base import Checkpoint, TensorInfo
from modelatlas.weights.peft_lora import join_adapter_base, open_adapter_base, open_with_base
from modelatlas.weights.registry import (
    discover_models,
    model_name,
    open_checkpoint,
    open_many,
    register_format,
    unique_names,
)

__all__ = ["Checkpoint", "TensorInfo", "discover_models", "join_adapter_base", "model_name",
           "open_adapter_base", "open_checkpoint", "open_many", "open_with_base", "register_format", "unique_names"]
