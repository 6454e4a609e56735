"""Build an atlas from a collection of checkpoints: describe, recover the lineage, predict, embed.

Steps (each model's header is read once; the lineage pass streams its weights layer by layer, see
:mod:`modelatlas.lineage.distances`; each expert reads its one layer per model):
  1. describe every model from its header: parameters and dtype as stored, bytes on disk, an architecture
     signature;
  2. recover the lineage forest of the readable models (:func:`modelatlas.lineage.recover_lineage`);
  3. with ProbeX class experts: route each model with the expert layer to its tree and predict its
     training classes (a model in no known tree gets a note, not a guess);
  4. with ProbeX text experts: store each routed model's embedding in the text space, so that queries
     later need the experts but not the weights.
Time: the lineage recovery's (O(N P) reading plus O(N^2) distances) plus O(N d_H d_W) per expert layer.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from modelatlas.atlas.index import NO_CLASS, Atlas, ModelEntry
from modelatlas.errors import AtlasError, CheckpointError
from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.export import copy_formats, copy_text
from modelatlas.lineage.forest import Forest
from modelatlas.lineage.recover import recover_lineage
from modelatlas.progress import Progress, resolve
from modelatlas.weights import Checkpoint, discover_models, join_adapter_base, open_with_base, unique_names
from modelatlas.weights.base import error_line


def build_atlas(inputs: str | Path | Sequence[str | Path], experts: str | Path | None = None,
                text_experts: str | Path | None = None, lineage: LineageConfig | None = None,
                progress: Progress | None = None, adapter_base: str | Path | tuple[Path, Checkpoint] | None = None) -> Atlas:
    """An :class:`Atlas` of the models in ``inputs`` (model files, model folders, or folders of models; one
    path alone is one input, not a sequence of its characters);
    ``experts`` / ``text_experts``: folders written by ``atlas probex train`` (``--task classes`` / ``text``),
    loaded first: a wrong folder is an error before the lineage recovery, not after it. ``adapter_base``: the
    base model PEFT adapters among the inputs were trained on; it joins the models, and the lineage compares
    each adapter merged onto it (without it an adapter is in no tree): a path, or (its path, the open base) as
    :func:`~modelatlas.weights.open_adapter_base` gives them, the caller's to close (`atlas index build` opens
    it once, to check it before the models). The atlas records
    it only when an adapter was merged onto it (a later `atlas probex predict ATLAS` reopens it)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    loaded = {task: _load_experts(folder, task) for task, folder in (("classes", experts), ("text", text_experts))
              if folder is not None}
    base, paths = join_adapter_base(adapter_base, discover_models(inputs))
    try:
        return _build(paths, inputs, loaded, lineage, progress, base)
    finally:
        if base is not None and not isinstance(adapter_base, tuple):  # (an open base given is the caller's)
            base.close()


def _build(paths: list[Path], inputs, loaded: dict, lineage, progress, base) -> Atlas:
    if not paths:
        raise AtlasError(f"no models found in {', '.join(map(str, inputs))}")
    named = list(zip(paths, unique_names(paths)))  # runA/model.safetensors and runB/... -> "runA", "runB"
    described = resolve(progress)(named, total=len(paths), desc="headers")
    entries, shapes = zip(*[_describe(p, n, base) for p, n in described])
    entries = list(entries)
    readable = [(p, e.name) for p, e in zip(paths, entries) if not e.notes]
    if len(readable) < 2:
        why = "; ".join(f"{e.name}: {e.notes[0]}" for e in entries if e.notes)  # an unreadable model's only note
        raise AtlasError(f"{len(readable)} readable model(s) of {len(paths)}: an atlas needs at least 2"
                         + (f" ({why[:300]})" if why else ""))
    forest = _lineage(readable, lineage, progress, base)
    _place(entries, forest)
    # join_adapter_base put the base first; recorded only when an adapter was merged onto it (a full-weights zoo
    # with --base was compared as it is, and its atlas.json sent `probex predict` to reopen a base it needs not)
    recorded = os.path.abspath(paths[0]) if forest.decisions.get("adapter_base") else None
    atlas, shape_of = Atlas(entries, forest, adapter_base=recorded), dict(zip(paths, shapes))
    if "classes" in loaded:
        _predict(atlas, paths, shape_of, loaded["classes"], progress, base)
    if "text" in loaded:
        _embed(atlas, paths, shape_of, loaded["text"], progress, base)
    return atlas


def _lineage(readable: list[tuple[Path, str]], config: LineageConfig | None, progress, base=None) -> Forest:
    """The lineage forest of the readable models under the atlas's names for them (names told apart by folder
    over every model, readable or not, so that lineage and entries agree); adapters merged onto ``base``, the
    root of their tree."""
    ckpts = []
    try:
        for path, name in readable:
            ckpts.append(open_with_base(path, base))
            ckpts[-1].name = name
        return recover_lineage(ckpts, config=config, progress=progress, adapter_base=base)
    finally:
        for ck in ckpts:
            ck.close()


def _describe(path: Path, name: str, base=None) -> tuple[ModelEntry, dict[str, tuple[int, ...]]]:
    """The entry of one model from its header, and its tensor shapes (an adapter's merged onto ``base``, as the
    lineage and the experts read it); an unreadable model (an adapter of another base) gets a note.
    Parameters, dtype and size are what its files store: a LoRA adapter's factors (not the dense updates it
    exposes), a GGUF tensor's quantization type and bytes (not its float32 dequantization)."""
    # a hub id (the only path given that need not exist) as itself: resolved, it named a file below the working
    # folder, which a later `atlas probex predict ATLAS` could not read
    entry = ModelEntry(name, str(Path(path).resolve()) if Path(path).exists() else str(path))
    try:
        with open_with_base(path, base) as ckpt:
            infos, stored = ckpt.tensors(), ckpt.stored_tensors()
            by_dtype = _values_by_type(ckpt, infos, stored)
            entry.size_bytes = ckpt.size_on_disk()
    except CheckpointError as e:
        entry.notes.append(f"unreadable: {error_line(e)}")
        return entry, {}
    entry.parameters, entry.tensors = sum(by_dtype.values()), len(stored)
    entry.dtype = by_dtype.most_common(1)[0][0] if by_dtype else ""
    signature = ";".join(f"{t.name}:{'x'.join(map(str, t.shape))}" for t in sorted(infos, key=lambda t: t.name))
    entry.architecture = hashlib.sha1(signature.encode()).hexdigest()[:10]
    return entry, {t.name: tuple(t.shape) for t in infos}


def _values_by_type(ckpt, infos, stored) -> Counter:
    """Stored type -> the weights stored in it: "Q8_0" for a quantized GGUF tensor; for a layer a quantization
    library packed (GPTQ's int32 words, bitsandbytes' bytes of two codes), the layer's weights under its type,
    its scales and zeros not counted (a GGUF block's scales are not either)."""
    sizes = {t.name: t.numel for t in infos}
    layer_of = getattr(ckpt, "layer_of", lambda _: None)
    by_type: Counter = Counter()
    for t in stored:
        layer, kind = layer_of(t.name), ckpt.quantization(t.name)
        if layer is None:
            by_type[kind or t.dtype] += t.numel
        elif kind is not None:  # the tensor holding the layer's values
            by_type[kind] += sizes[layer]
    return by_type


def _place(entries: list[ModelEntry], forest: Forest) -> None:
    """Copy each model's tree, parent and edge score from the forest; note models the lineage skipped."""
    tree_of = {n: t + 1 for t, members in enumerate(forest.trees) for n in members}
    edge_of = {e.child: e for e in forest.edges}
    for entry in entries:
        if entry.name in forest.skipped:
            entry.notes.append(f"lineage skipped it: {forest.skipped[entry.name]}")
        if entry.name not in forest.nodes:
            continue
        entry.tree = tree_of.get(entry.name)
        edge = edge_of.get(entry.name)
        if edge is not None:
            entry.parent, entry.score = edge.parent, round(float(edge.score), 4)
            if said := copy_text(edge, copy_formats(forest)):
                entry.notes.append(said)
        kind = (forest.decisions.get("quantized_models") or {}).get(entry.name)
        if kind is not None:
            entry.notes.append(f"quantized ({kind}); the model it was quantized from is not among these")
        outside = (forest.decisions.get("outside_layers") or {}).get(entry.name)
        if outside is not None:  # a head-only fine-tune, say: the lineage cannot tell which way it went
            entry.notes.append(f"equal to {outside['like']} on the compared layers; differs in "
                               f"{outside['n_differing']} other tensor(s), e.g. {outside['differs_in'][0]}")
        shared = (forest.decisions.get("shared_layers") or {}).get(entry.name)
        if shared is not None:  # a head or a tower the models it was compared with lack
            entry.notes.append(f"compared on the {shared['compared']} layers it shares with the others; "
                               f"{shared['not_compared']} of its own not compared, e.g. {shared['examples'][0]}")


def _load_experts(folder, task: str):
    """The experts in ``folder``, trained for ``task``; else an AtlasError saying which option they belong to."""
    from modelatlas.probex.experts import TreeExperts

    experts = TreeExperts.load(folder)
    if experts.task != task:
        flag = "--experts" if experts.task == "classes" else "--text-experts"
        raise AtlasError(f"{folder}: experts trained with --task {experts.task}; pass them as {flag}")
    return experts


def _routed(atlas: Atlas, paths: list[Path], shapes: dict, experts, task: str, progress, base=None):
    """(X, routes, entries) of the models that hold the experts' layer at their shape, routed to trees.
    Entries without the layer, or in no known tree, get a note."""
    from modelatlas.probex.layers import load_layer

    want = tuple(next(iter(experts.experts.values())).mean_.shape)  # (d_H, d_W)
    chosen, missing = [], []
    for path, entry in zip(paths, atlas.models):
        shape = shapes[path].get(experts.layer)
        if shape is not None and len(shape) >= 2 and (shape[0], _prod(shape[1:])) == want:
            chosen.append((path, entry))
        elif not any(n.startswith("unreadable") for n in entry.notes):
            missing.append(entry)
    for entry in missing:
        entry.notes.append(f"{task} experts: no tensor {experts.layer!r} of shape {want}")
    if not chosen:
        return None, [], []
    x = load_layer([p for p, _ in chosen], experts.layer, progress, adapter_base=base)  # adapters merged
    routes = experts.router.route(x, [e.name for _, e in chosen])
    for r, (_, entry) in zip(routes, chosen):
        if r.reason is not None:
            entry.notes.append(f"{task} experts: not routed: {r.reason}")
        elif not r.known:
            entry.notes.append(f"{task} experts: in no known tree (nearest {r.nearest!r} at {r.distance:.3g}, "
                               f"radius {r.radius:.3g})")
    return x, routes, [e for _, e in chosen]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _predict(atlas: Atlas, paths, shapes, experts, progress, base=None) -> None:
    """Each routed model's predicted training classes (probability > 0.5, best first); none above 0.5: a note
    naming the most probable one (as `atlas probex predict` says), so that it does not look unseen."""
    x, routes, chosen = _routed(atlas, paths, shapes, experts, "classes", progress, base)
    for i, (r, entry) in enumerate(zip(routes, chosen)):
        if r.known:
            expert = experts.experts[r.tree]
            probs = expert.predict_proba(x[i:i + 1])[0]
            order = probs.argsort()[::-1]
            entry.expert_tree = r.tree
            entry.predicted = [[str(expert.classes_[k]), round(float(probs[k]), 3)] for k in order if probs[k] > 0.5]
            if not entry.predicted:
                entry.notes.append(f"classes experts: {NO_CLASS}; most probable {expert.classes_[order[0]]} "
                                   f"({probs[order[0]]:.2f})")
    atlas.experts["classes"] = {"folder": str(Path(experts.folder).resolve()), "layer": experts.layer}


def _embed(atlas: Atlas, paths, shapes, experts, progress, base=None) -> None:
    """Each routed model's unit-norm embedding in its text expert's space, grouped by expert tree."""
    x, routes, chosen = _routed(atlas, paths, shapes, experts, "text", progress, base)
    for tree, expert in experts.experts.items():
        idx = [i for i, r in enumerate(routes) if r.tree == tree]
        if idx:
            emb = torch.as_tensor(expert.embed_models(x[idx]))  # (n, r_T)
            atlas.embeddings[tree] = ([chosen[i].name for i in idx], emb)
            probs = expert.predict_proba(x[idx])  # (n, C) over the seen prompts
            for row, i in enumerate(idx):
                chosen[i].text_tree = tree
                top = probs[row].argsort()[::-1][:3]
                chosen[i].described = [[expert.classes_[k], round(float(probs[row, k]), 3)] for k in top]
    atlas.experts["text"] = {"folder": str(Path(experts.folder).resolve()), "layer": experts.layer,
                             "digest": experts.weights_digest()}  # a later search checks the experts are these
