"""Turning what a user passes (paths, open checkpoints, in-memory state dicts) into checkpoints, choosing
the layers to compare, and separating models of different architectures.

This is the only lineage code that touches the :mod:`modelatlas.weights` interface; it opens nothing
itself. A model that cannot be opened or lists no usable layer is *skipped* with a one-line reason.

Models whose compared layers differ only by one more first name component in front of every name (a plain
save of a wrapper module, ``model.0.weight``, beside a save of the network itself, ``0.weight``) are one
architecture: the longer names are read under the shorter ones (:class:`PrefixedView`). Groups whose layers
share most of their weights (a fine-tune that added or dropped a head or a tower) are compared on the shared
ones (:mod:`.shared_layers`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from modelatlas.errors import AtlasError, ConfigError, shown_path
from modelatlas.lineage.shared_layers import joined_signatures
from modelatlas.weights import Checkpoint, TensorInfo, discover_models, open_with_base, unique_names
from modelatlas.weights.base import _stem, shared_first_component

_FLOAT = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
# name endings of weights packed into integers by quantization libraries, left packed by the readers (GPTQ
# with g_idx in 2, 4 or 8 bits, AWQ GEMM under its quant_method: awq config, compressed-tensors pack-quantized
# and bitsandbytes layers with their quant state are unpacked by weights.dequantized); the model's float
# tensors are then its scales, not its weights
_PACKED = {".qweight": "3-bit GPTQ (or AWQ without its quantization_config)", ".q_weight": "EXL2", ".weight_packed": "compressed-tensors",
           ".weight.absmax": "bitsandbytes 4-bit", ".SCB": "bitsandbytes 8-bit"}
_PACKED_IN = {".weight.absmax": ".weight", ".SCB": ".weight"}  # a scale's packed weight (else the tensor itself)


class MemoryCheckpoint(Checkpoint):
    """A checkpoint held in memory (``{tensor name: tensor}``), for tests and callers with live models."""

    format = "memory"

    def __init__(self, name: str, tensors: Mapping[str, torch.Tensor]):
        super().__init__(Path(name), name=name)
        self._tensors = _as_tensors(name, tensors)

    def _infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in self._tensors.items()]

    def _read(self, name: str) -> torch.Tensor:
        # the caller's own tensor, not a copy (a live model is not doubled in memory): recovery only reads it,
        # which tests/lineage/test_recover.py checks
        return self._tensors[name]


class PrefixedView(Checkpoint):
    """``ckpt``'s tensors under ``prefix`` (``"model."``), named without it, so that a model whose compared
    layers carry one more first component than its architecture group's is read under the group's names.
    Reads, prefetch hints and quantization queries go to ``ckpt`` under the full name; tensors outside
    ``prefix`` are not listed. ``name_prefix`` says what the names lost, the reader's prefix included."""

    def __init__(self, ckpt: Checkpoint, prefix: str):
        super().__init__(ckpt.path, name=ckpt.name)
        self.inner, self.prefix = ckpt, prefix
        self.format, self.kind, self.name_prefix = ckpt.format, ckpt.kind, ckpt.name_prefix + prefix

    def _infos(self) -> list[TensorInfo]:
        n = len(self.prefix)
        return [TensorInfo(t.name[n:], t.shape, t.dtype) for t in self.inner.tensors() if t.name.startswith(self.prefix)]

    def _read(self, name: str) -> torch.Tensor:
        return self.inner.read(self.prefix + name)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        self.info(name)  # not one of ``inner``'s tensors outside ``prefix``
        return self.inner.read_rows(self.prefix + name, rows)

    def compared_rows(self, name: str, max_rows: int = 256) -> torch.Tensor | None:
        return self.inner.compared_rows(self.prefix + name, max_rows)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(self.prefix + name)

    def quantization(self, name: str) -> str | None:
        return self.inner.quantization(self.prefix + name)

    def requantized_match(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        return self.inner.requantized_match(self.prefix + name, x, rows=rows)

    def grid_match(self, name: str, x: torch.Tensor, slack: float = 0.0,
                   rows: torch.Tensor | None = None) -> float | None:
        return self.inner.grid_match(self.prefix + name, x, slack, rows=rows)

    def rounding_variance(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.inner.rounding_variance(self.prefix + name, values)

    def least_squares(self, name: str) -> bool | None:
        return self.inner.least_squares(self.prefix + name)

    def grid_position(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        return self.inner.grid_position(self.prefix + name, x, rows=rows)

    def rounding_moments(self, name: str) -> torch.Tensor | None:
        return self.inner.rounding_moments(self.prefix + name)

    def close(self) -> None:
        self.inner.close()


def _as_tensors(name: str, tensors) -> dict[str, torch.Tensor]:
    """``tensors`` as name -> tensor, or a ConfigError naming the model (and tensor) that is no state dict: a
    module passed for its state dict read "'Linear' object has no attribute 'items'"."""
    if not isinstance(tensors, Mapping):
        hint = " (pass model.state_dict())" if isinstance(tensors, torch.nn.Module) else ""
        raise ConfigError(f"weights[{name!r}] is a {type(tensors).__name__}, not a dict of tensor name -> "
                          f"tensor{hint}")
    out = {}
    for key, value in tensors.items():
        try:
            out[key] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"weights[{name!r}][{key!r}] is a {type(value).__name__}, not a tensor") from e
    return out


def as_checkpoints(source, progress=None, adapter_base: Checkpoint | None = None
                   ) -> tuple[list[Checkpoint], dict[str, str]]:
    """Checkpoints from a list of paths / Checkpoints or a dict ``name -> {tensor name: tensor}``.

    Returns (checkpoints, skipped) where skipped maps a model name to why it could not be opened. A PEFT
    adapter path (an update dW, no model) is opened merged onto ``adapter_base`` when one is given (the base
    model the adapters were trained on), else skipped with that reason. Opening reads headers only. Time O(N)
    file opens.
    """
    skipped: dict[str, str] = {}
    if isinstance(source, Mapping):
        ckpts = [MemoryCheckpoint(str(k), v) for k, v in source.items()]
    else:
        ckpts = []
        items = list(source) if isinstance(source, Iterable) and not isinstance(source, (str, Path)) else [source]
        items = _expanded(items)
        names = unique_names([it.path if isinstance(it, Checkpoint) else it for it in items])
        for item, name in zip(items, names):
            if isinstance(item, Checkpoint):
                ckpts.append(item)
                continue
            try:
                ck = open_with_base(item, adapter_base)
            except AtlasError as e:
                skipped[name] = str(e)
                continue
            if name != _stem(Path(item)):  # a name given twice, told apart by its folder
                ck.name = name
            ckpts.append(ck)
    names = [c.name for c in ckpts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"model names must be unique; {dup} appear more than once (the same model given "
                          "twice, or checkpoints named alike: rename them)")
    return ckpts, skipped


def adapter_roles(ckpts: list[Checkpoint], adapter_base: Checkpoint | None) -> tuple[str | None, list[str]]:
    """(the name of the model among ``ckpts`` that is ``adapter_base``, the PEFT adapters' base: the same open
    checkpoint or the same model on disk, else None; the names of the checkpoints merged onto it, in order).
    With none merged onto it the base is None: it is known to be the root only of adapters merged onto it
    (rooted without one, its tree's stage evidence was dropped for none: a tiny zoo's confidence fell from
    0.88 to 0.73, and its root confidence rose to 1.0). Time O(N) (a path's real location for each full model)."""
    from modelatlas.weights.peft_lora import MergedLoraCheckpoint
    from modelatlas.weights.registry import distinct_models

    if adapter_base is None:
        return None, []
    merged = [c.name for c in ckpts if isinstance(c, MergedLoraCheckpoint) and c.base is adapter_base]
    base = next((c.name for c in ckpts if c is adapter_base or (
        c.kind == "full" and not isinstance(c, MergedLoraCheckpoint)
        and len(distinct_models([Path(c.path), Path(adapter_base.path)])) == 1)), None)
    return base if merged else None, merged


def gguf_aligned(ckpts: list[Checkpoint], pattern: str | None = None
                 ) -> tuple[list[Checkpoint], dict[str, str], dict[str, str]]:
    """``ckpts`` with each Hugging Face model that llama.cpp converts to the architecture of a GGUF file among
    them seen under GGUF names and layout (:func:`modelatlas.weights.gguf_names.gguf_view`), so that it falls
    in the GGUF files' architecture group and its conversions and quantizations are compared with it. With a
    layers ``pattern`` that selects none of a model's GGUF-named layers (``q_proj``, written in its own names),
    the model keeps its names: renamed, it had no layer left to compare. Returns (checkpoints, {model name: GGUF
    architecture} of the models renamed, {model name: why not} of the models of a GGUF file's architecture
    that could not be renamed, e.g. no head count in config.json). Headers and config.json only."""
    targets = dict.fromkeys((c.architecture, *c.head_counts()) for c in ckpts
                            if c.format == "gguf" and getattr(c, "architecture", None))
    if not targets:
        return ckpts, {}, {}
    out, renamed, unmapped = [], {}, {}
    for ck in ckpts:
        view = _gguf_named(ck, targets, unmapped) if ck.format != "gguf" and ck.kind == "full" else None
        if view is not None and pattern is not None and not select_layers(view, pattern)[0]:
            view = None
        if view is not None:
            renamed[ck.name] = view.gguf_architecture
        out.append(ck if view is None else view)
    return out, renamed, unmapped


def _gguf_named(ck: Checkpoint, targets: dict, unmapped: dict[str, str]) -> Checkpoint | None:
    """``ck`` under the names of the first of ``targets`` (architecture, head counts) it maps to, or None;
    why a model of one of those architectures did not map goes in ``unmapped``."""
    from modelatlas.weights.gguf_names import GGUFNamedView, gguf_attempt

    why = None
    for target in targets:
        try:
            got = gguf_attempt(ck, *target)
        except AtlasError:  # its tensors cannot be listed (a bad shard index): skipped, saying so, when grouped
            return None
        if isinstance(got, GGUFNamedView):
            return got
        why = why or got
    if why is not None:
        unmapped[ck.name] = why
    return None


def _expanded(items: list) -> list:
    """Each path as the models it names (a folder of models: the models in it, as ``atlas lineage recover``
    reads it; it was skipped as "unknown checkpoint format"); a path that does not expand (missing, of an
    unknown format) stays, for opening to report; Checkpoints stay."""
    out = []
    for item in items:
        try:
            out.extend([item] if isinstance(item, Checkpoint) else discover_models([item]))
        except AtlasError:
            out.append(item)
    return out


def select_layers(ckpt: Checkpoint, pattern: str | None) -> tuple[list[TensorInfo], str]:
    """The tensors compared for one model and the rule that chose them.

    With ``pattern``: float tensors of 2 or more dimensions whose name matches (``re.search``). Without:
    square 2-D float matrices (MoTHer's choice); a model with none uses every float matrix instead.
    """
    mats = [t for t in ckpt.tensors() if t.dtype in _FLOAT and len(t.shape) >= 2 and t.numel > 1]
    if pattern is not None:
        rx = re.compile(pattern)
        return [t for t in mats if rx.search(t.name)], f"regex '{pattern}'"
    square = [t for t in mats if len(t.shape) == 2 and t.shape[0] == t.shape[1]]
    if square:
        return square, "square matrices"
    return mats, "all matrices (no square ones)"


def packed_weights(ckpt: Checkpoint) -> str | None:
    """Why ``ckpt``'s weights cannot be compared when it stores them packed into integers that no reader
    unpacked (AWQ, EXL2, bitsandbytes: :data:`_PACKED`) or as float8 values with scales, naming the first such
    tensor; None otherwise. A name alone is not enough: the packed weight must be integers (a float
    ``q_weight`` is a model's own). Header only."""
    dtypes = {t.name: t.dtype for t in ckpt.tensors()}
    for name in dtypes:
        end, kind = next(((end, k) for end, k in _PACKED.items() if name.endswith(end)), ("", None))
        packed = dtypes.get(name.removesuffix(end) + _PACKED_IN.get(end, end), "float")
        if kind is not None and not packed.startswith(("float", "bfloat", "bool")):
            return (f"its weights are packed into integers by {kind} quantization ({name!r}), which is not "
                    f"unpacked here, and its float tensors are scales, not weights; {_UNQUANTIZED} its float "
                    "tensors anyway)")
    return _scaled_float8(dtypes)


_UNQUANTIZED = "compare its unquantized model, or save it dequantized (a --layers pattern compares"
_FP8_SCALES = (".weight_scale_inv", ".weight_scale")  # DeepSeek-style block scales; compressed-tensors / vLLM FP8


def _scaled_float8(dtypes: dict[str, str]) -> str | None:
    """Why a model of float8 weights stored with scales cannot be compared: its weights are the float8 values
    times the scales, which nothing here applies (they were compared as they are stored)."""
    for name in dtypes:
        end = next((e for e in _FP8_SCALES if name.endswith(e)), None)
        weight = dtypes.get(name.removesuffix(end) + ".weight", "") if end else ""
        if weight.startswith("float8"):
            return (f"its weights are float8 values with scales ({name!r}), which are not applied here, so the "
                    f"stored values are not its weights; {_UNQUANTIZED} the stored values anyway)")
    return None


def group_by_architecture(ckpts: list[Checkpoint], pattern: str | None):
    """Split models by the (name, shape) set of their selected layers; each group can be compared.

    Returns (groups, rules, skipped): ``groups`` is a list of (member checkpoints, layer infos), in the order
    of the models, ``rules`` the layer-selection rule of each group, ``skipped`` names models with no selected
    layer. A set that is another's with one or more first components (``model.``) in front of every name, the
    shapes equal, joins that group: its models are given as :class:`PrefixedView` s. Sets that differ in any
    other way stay apart. Time O(N T) for T tensors per model (headers only).
    """
    by_sig: dict[tuple, list[int]] = {}
    rules: dict[tuple, str] = {}
    skipped: dict[str, str] = {}
    for i, ck in enumerate(ckpts):
        if getattr(ck, "kind", "full") != "full":  # e.g. a PEFT adapter opened alone: only the update dW
            skipped[ck.name] = (f"{shown_path(ck.path)}: holds a weight update ({ck.kind}), not a model; give the base model "
                                "it was trained on (--base MODEL on the command line, adapter_base= in "
                                "Python) or store merged weights")
            continue
        try:  # listing the tensors reads a shard index or header: a bad one skips this model only
            packed = packed_weights(ck) if pattern is None else None
            layers, rule = select_layers(ck, pattern) if packed is None else ([], "")
        except AtlasError as e:
            skipped[ck.name] = str(e)
            continue
        if packed is not None:
            skipped[ck.name] = f"{shown_path(ck.path)}: {packed}"
            continue
        if not layers:
            skipped[ck.name] = f"{shown_path(ck.path)}: {_no_layer_reason(ck, pattern)}"
            continue
        sig = tuple(sorted((t.name, t.shape) for t in layers))
        by_sig.setdefault(sig, []).append(i)
        rules[sig] = rule
    members, first = _joined(ckpts, by_sig)
    return ([(m, _layer_infos(s, m[0])) for s, m in members.items()], [rules[first[s]] for s in members],
            skipped)


def _joined(ckpts: list[Checkpoint], by_sig: dict[tuple, list[int]]) -> tuple[dict, dict]:
    """(each group's signature -> its models, in the order of their first model; -> its first model's own
    signature). A signature that is another's with first components in front (:func:`_aligned_signatures`)
    joins it, its models as PrefixedViews; two that share most of their layers
    (:func:`~.shared_layers.joined_signatures`) become one group, compared on the shared layers."""
    aligned = _aligned_signatures(set(by_sig))
    shared = joined_signatures({aligned.get(sig, (sig, ""))[0] for sig in by_sig})  # layers added or dropped
    members: dict[tuple, list[tuple[int, str, tuple]]] = {}  # group signature -> (model, prefix to drop, own sig)
    for sig, idx in by_sig.items():
        target, prefix = aligned.get(sig, (sig, ""))
        target, more = shared.get(target, (target, ""))
        members.setdefault(target, []).extend((i, prefix + more, sig) for i in idx)
    order = sorted(members, key=lambda s: min(members[s]))
    return ({s: [PrefixedView(ckpts[i], p) if p else ckpts[i] for i, p, _ in sorted(members[s])] for s in order},
            {s: min(members[s])[2] for s in order})


def _layer_infos(sig: tuple, first: Checkpoint) -> list[TensorInfo]:
    """The layers of group signature ``sig`` as its first model lists them (names under the group's, dtypes
    its own), sorted by name."""
    want = set(sig)
    return sorted((t for t in first.tensors() if (t.name, t.shape) in want), key=lambda t: t.name)


def _aligned_signatures(sigs: set[tuple]) -> dict[tuple, tuple[tuple, str]]:
    """Signature -> (the signature it is with its shared first components stripped, the stripped prefix), for
    each one that is another's in ``sigs`` so (the shortest such: ``model.net.x`` goes to ``x`` when both
    ``net.x`` and ``x`` are there). Shapes must match exactly: only names are stripped. Time O(S T) for S
    signatures of T layers, a few levels deep."""
    out = {}
    for sig in sigs:
        cur, prefix = sig, ""
        while (p := shared_first_component(name for name, _ in cur)) is not None:
            cur, prefix = tuple((name[len(p):], shape) for name, shape in cur), prefix + p  # still sorted
            if cur in sigs:
                out[sig] = (cur, prefix)
    return out


def whole(ckpt: Checkpoint) -> Checkpoint:
    """The model itself: a PrefixedView's whole checkpoint (it lists only the part under its prefix)."""
    return ckpt.inner if isinstance(ckpt, PrefixedView) else ckpt


def own_layers(ckpt: Checkpoint, pattern: str | None) -> list[TensorInfo]:
    """The layers ``ckpt`` would be compared on alone (a PrefixedView: its whole model's, names in full), for
    :func:`~.shared_layers.extra_layers`. Headers only."""
    return select_layers(whole(ckpt), pattern)[0]


def _no_layer_reason(ckpt: Checkpoint, pattern: str | None) -> str:
    """Why ``ckpt`` has no layer to compare. A pattern that matches only biases or integer buffers matches
    names: saying it matches nothing sent users hunting for a typo."""
    if pattern is None:
        return "no float matrix to compare"
    rx = re.compile(pattern)
    named = [t.name for t in ckpt.tensors() if rx.search(t.name)]
    parts = [(t.name, layer) for t in ckpt.stored_tensors() if rx.search(t.name)
             and (layer := getattr(ckpt, "layer_of", lambda _: None)(t.name)) is not None]
    if not named and parts:  # a quantized model's qweight, weight_packed, weight_scale: read as its layer
        return (f"the layers pattern '{pattern}' matches only {parts[0][0]}, a stored part of the quantized layer "
                f"{parts[0][1]}, which is read dequantized under that name: match the layer's name")
    if not named:  # the names to match (a user with checkpoints of unknown layout had to dump the headers)
        mats = [t.name for t in ckpt.tensors() if len(t.shape) >= 2]
        some = f" (its matrices: {', '.join(mats[:3])}{', ...' if len(mats) > 3 else ''})" if mats else ""
        return f"no tensor matches the layers pattern '{pattern}'{some}"
    return (f"the layers pattern '{pattern}' matches only {', '.join(named[:3])}{', ...' if len(named) > 3 else ''}, "
            "which are not float tensors of 2 or more dimensions (biases, scalars, empty tensors and integer "
            "buffers are not compared); match weight matrices instead")
