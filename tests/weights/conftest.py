"""Shared inputs of the weights tests: a small state dict, its check, and a pickle payload that must not run."""

import os
import shlex

import torch


class make_evil:  # noqa: N801 - a pickle payload, named like the helpers it stands with
    """Unpickling this runs ``touch <marker>`` (if the loader lets it)."""

    def __init__(self, marker, around=None):
        self.marker, self.around = str(marker), around

    def __reduce__(self):
        if self.around is not None:  # the payload as the argument of another callable: PurePosixPath(os.system(...))
            return (self.around, (make_evil(self.marker),))
        return (os.system, (f"touch {shlex.quote(self.marker)}",))  # quoted: temp paths may hold spaces


def make_state_dict():
    return {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.ones(2, dtype=torch.float16)}


def check_reads_state_dict(ck):
    assert [(t.name, t.shape, t.dtype) for t in ck.tensors()] == [
        ("layer.weight", (2, 3), "float32"), ("layer.bias", (2,), "float16")]
    assert torch.equal(ck.read("layer.weight"), torch.arange(6.0).reshape(2, 3))
    assert ck.kind == "full"
