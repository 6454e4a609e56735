"""Why a PyTorch file could not be loaded, said so that a user can act on it: a file that is no pickle at all
(a CSV named .pt), another format's file, a corrupt pickle, or one refused because it holds Python objects
(:func:`unpickling_error`: a Lightning checkpoint's hyper-parameters, a whole ``nn.Module``, code). Used by
:mod:`.torch_pickle`; reads at most the first :data:`HEAD_BYTES` of the pickle.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

from modelatlas.errors import CheckpointError, UnsafeCheckpointError
from modelatlas.weights.base import misnamed_reason

LIGHTNING_VERSION = "pytorch-lightning_version"  # the Trainer's first keys: epoch, global_step, this
HEAD_BYTES = 4096  # of a pickle: enough to hold the Trainer's first keys


def no_pickle(path: Path, is_zip: bool) -> str | None:
    """Why a file that failed to load is no PyTorch file at all: neither a zip nor a pickle (opcode PROTO first)
    as torch.save writes, e.g. a CSV or a log named .pt, whose error was "corrupt or truncated PyTorch file:
    101" (a KeyError of its second byte); None when it may be one."""
    head = b"" if is_zip else pickle_head(path, False)[:20]
    other = misnamed_reason(path, "PyTorch") if head else None
    if other:  # a safetensors file named .pt: its first byte is the header length's
        return other
    if not head or head[0] == 0x80 or head.startswith(b"PK"):  # PK: a zip cut short, no longer read as one
        return None
    return f"not a PyTorch file: it begins with {head!r}, neither a zip archive nor a pickle (what torch.save writes)"


def pickle_head(path: Path, is_zip: bool) -> bytes:
    """The first HEAD_BYTES of the pickle (a zip's ``data.pkl``, stored uncompressed: :func:`~.torch_pickle.zip_records`), or
    b"" when unreadable: enough to tell a Lightning checkpoint by its first keys when loading it failed."""
    try:
        if not is_zip:
            with open(path, "rb") as f:
                return f.read(HEAD_BYTES)
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return b""
            with zf.open(name) as f:
                return f.read(HEAD_BYTES)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return b""


def unpickling_error(path: Path, e: pickle.UnpicklingError, head: bytes = b"",
                      misnamed: str | None = None) -> CheckpointError:
    """Refused globals mean the file would run code (unsafe); anything else is a corrupt pickle. ``head``: the
    pickle's first bytes; for a Lightning checkpoint the error says where such objects usually are.
    ``misnamed``: that the file is another format's (:func:`misnamed_reason`), said instead."""
    if misnamed:  # another format's file (a safetensors file named .bin): its opcode error said nothing
        return CheckpointError(path, misnamed)
    msg = str(e)
    found = re.search(r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported global: [^\n]*)", msg)
    if found and LIGHTNING_VERSION.encode() in head:
        name = re.search(r"GLOBAL (\S+)", found.group(1))
        what = name.group(1).rstrip(".") if name else found.group(1)
        return UnsafeCheckpointError(path, f"refused to unpickle: a PyTorch Lightning checkpoint holding a Python "
                                           f"object ({what}) besides its weights, most often in hyper_parameters "
                                           "(save_hyperparameters() of an OmegaConf config, a dataclass, a "
                                           "datetime); such objects could execute code and only tensors, plain "
                                           "values, paths and argparse Namespaces are loaded (weights_only=True). "
                                           "From a trusted file, save the weights alone: "
                                           "torch.save(torch.load(PATH, weights_only=False)"
                                           "['state_dict'], 'model.pt')")
    if found:
        return UnsafeCheckpointError(path, refused_global(found.group(1)))
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", msg)
    reason = detail.group(1) if detail else (msg.strip().splitlines() or ["unreadable pickle"])[0]
    return CheckpointError(path, f"corrupt or unsupported PyTorch pickle: {reason}")


def refused_global(reason: str) -> str:
    """The message for a pickle refused for a global ``reason`` (torch's first line, which names it and advises
    ``add_safe_globals``: advice for code, not for a user of the command line, so it is not repeated). A
    ``torch.nn`` class is a whole model saved with ``torch.save(model)``: the fix is its state dict."""
    name = re.search(r"GLOBAL (\S+)", reason)
    what = name.group(1).rstrip(".") if name else reason.rstrip(".")
    if what.startswith("torch.nn."):
        fix = ("it is a whole model saved with torch.save(model); from a trusted file, save its weights alone: "
               "torch.save(torch.load(PATH, weights_only=False).state_dict(), 'model.pt')")
    else:
        fix = "convert a trusted file to safetensors to read it"
    return (f"refused to unpickle: the file would execute code (it holds a Python object, {what}); only plain "
            f"tensor state dicts are loaded (weights_only=True): {fix}")
