"""Checks of a HeLlO set as stored in a result folder: the label generator's settings (``meta["hello"]`` in
``synthetic.json``) and its tensors (``extra.backbone.*``, ``extra.projector.*`` in ``synthetic.safetensors``).
The projector is rebuilt with ``strict=False`` loads (the classifier and the regenerated buffers are not
stored), so without this check a missing tensor left a random one in its place and the evaluation silently
trained on labels of a random backbone."""

from __future__ import annotations

from pathlib import Path

from modelatlas.distill.nets import NET_NAMES, make_net
from modelatlas.distill.synthetic import META_FILE, TENSORS_FILE, SyntheticSet
from modelatlas.errors import CheckpointError, ConfigError

_INTS = ("width", "depth", "rank", "text_dim", "proj_seed")


def check_stored(syn: SyntheticSet, folder: Path) -> None:
    """Raise CheckpointError naming the file and the key when ``syn`` cannot rebuild its label projector."""
    info = _settings(syn, folder / META_FILE)
    k, r, e = syn.num_classes, info["rank"], info["text_dim"]
    try:
        net = make_net(info["net"], tuple(info["input_shape"]), k, info["width"], info["depth"], seed=0)
    except ConfigError as err:
        raise CheckpointError(folder / META_FILE, f"meta hello does not describe a network ({err})") from None
    want = {f"backbone.{n}": tuple(v.shape) for n, v in net.state_dict().items() if n.startswith("features.")}
    want.update({"projector.A": (r, e), "projector.B": (k, r), "projector.log_scale": (), "projector.bias": (k,)})
    if info["head_init"] == "class_mean":
        want["projector.W0"] = (k, e)
    for key, shape in want.items():
        got = syn.extras.get(key)
        if got is None or tuple(got.shape) != shape:
            found = "missing" if got is None else f"of shape {tuple(got.shape)}"
            raise CheckpointError(folder / TENSORS_FILE, f"tensor 'extra.{key}' of the HeLlO label projector is "
                                                         f"{found}, expected shape {shape}")


def _settings(syn: SyntheticSet, path: Path) -> dict:
    info = syn.meta.get("hello")
    keys = (*_INTS, "net", "head_init", "temperature", "input_shape")
    if not isinstance(info, dict) or any(key not in info for key in keys):
        raise CheckpointError(path, f"meta hello must be an object with the keys {', '.join(keys)}")
    bad = next((key for key in _INTS if isinstance(info[key], bool) or not isinstance(info[key], int)
                or (info[key] < 1 and key != "proj_seed")), None)
    if bad is not None:
        raise CheckpointError(path, f"meta hello {bad} must be a positive integer, got {info[bad]!r}")
    temp = info["temperature"]
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0:
        raise CheckpointError(path, f"meta hello temperature must be a number > 0, got {temp!r}")
    if info["net"] not in NET_NAMES or info["head_init"] not in ("text", "class_mean"):
        raise CheckpointError(path, f"meta hello net must be one of {', '.join(NET_NAMES)} and head_init 'text' or "
                                    f"'class_mean', got {info['net']!r} and {info['head_init']!r}")
    if info["input_shape"] != list(syn.images.shape[1:]):
        raise CheckpointError(path, f"meta hello input_shape {info['input_shape']!r} is not the images' shape "
                                    f"{list(syn.images.shape[1:])}")
    return info
