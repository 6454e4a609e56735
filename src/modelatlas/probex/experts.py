"""Tree experts end to end: from a zoo manifest to a folder of per-tree experts and a router, and back.

Layout of an experts folder::

    index.json              {"format", "task", "layer", "layer_scores", "trees": {tree: "experts/<tree>"}}
    router/                 router.json + router.safetensors (tree centroids and radii on ``layer``)
    experts/<tree>/         expert.json + expert.safetensors
    checkpoints/<tree>/     resumable training state (kept for --resume)

Only ``layer`` is read from each model (through :mod:`modelatlas.weights`), once per model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modelatlas.atomic import atomic_write_json, check_out_folder, read_json_object
from modelatlas.digests import check_files_sha256, files_sha256
from modelatlas.errors import AtlasError, CheckpointError, ConfigError, ManifestError, TensorNotFoundError
from modelatlas.probex.config import ProbeXConfig
from modelatlas.probex.estimator import ProbeXClassifier, WeightExpert, load_expert
from modelatlas.probex.labelled import (
    check_full_weights,
    class_names,
    group_by_tree,
    left_out,
    targets,
    task_records,
    tree_paths,
)
from modelatlas.probex.layers import candidate_layers, check_finite, load_layer, load_layers
from modelatlas.probex.model import check_train_memory
from modelatlas.probex.router import RouteResult, TreeRouter
from modelatlas.progress import Progress, resolve
from modelatlas.weights import Checkpoint
from modelatlas.zoo.manifest import ModelRecord, load_manifest

INDEX_FORMAT = "modelatlas-probex-experts/1"
TASKS = ("classes", "text")
MIN_MODELS = 10  # labelled models a tree needs for an expert: fewer leave almost nothing to validate on


@dataclass
class TrainReport:
    layer: str
    layer_scores: dict[str, float] = field(default_factory=dict)
    trees: dict[str, dict] = field(default_factory=dict)  # tree -> {"models", "val_score", "parameters"}
    left_out: dict[str, int] = field(default_factory=dict)  # tree -> its labelled models, fewer than min_models


def _fit_one(task: str, x, target, cfg: ProbeXConfig, layer: str, classes, progress, ckpt, resume) -> WeightExpert:
    if task == "classes":
        return ProbeXClassifier(cfg, layer).fit(x, target, classes, progress, ckpt, resume)
    from modelatlas.probex.text_aligner import ProbeXTextAligner
    from modelatlas.probex.text_encoder import encode_texts

    prompts = sorted(set(target.tolist()))
    labels = np.array([prompts.index(t) for t in target])
    return ProbeXTextAligner(cfg, layer).fit(x, labels, encode_texts(prompts), prompts, progress, ckpt, resume)


def _titled(progress: Progress | None, what: str) -> Progress:
    """``progress`` whose bars end with ``what``: "train layer v (1 of 5)", "train tree t0 (2 of 3)", "read v of
    tree t1". Every expert's bar said "train", so a long --layer auto run showed neither which layer or tree it was
    training nor how many were left."""
    inner = resolve(progress)
    return lambda iterable, *, total=None, desc="": inner(iterable, total=total, desc=f"{desc} {what}".strip())


def select_layer(paths, target, task: str, layers: list[str], cfg: ProbeXConfig, classes=None,
                 progress: Progress | None = None) -> dict[str, float]:
    """Train one expert per candidate layer; returns layer -> (best validation score, its validation loss).
    Pick the best with ``max(result, key=lambda k: (result[k][0], -result[k][1]))``."""
    xs = load_layers(paths, layers, progress)
    out = {}
    for n, name in enumerate(layers, 1):
        check_finite(paths, xs[name], name)
        shown = _titled(progress, f"layer {name} ({n} of {len(layers)})")
        hist = _fit_one(task, xs[name], target, cfg, name, classes, shown, None, False).history_
        out[name] = (float(hist["best_score"]), float(hist["best_loss"]))
    return out


def _check_out(out: Path, resume: bool) -> None:
    """Refuse a file, a path below a file (it failed as 'Not a directory' at the first checkpoint, after the
    layer selection), a non-empty folder that holds no experts (its files would mix with theirs), or, without
    ``resume``, an interrupted run's states (a rerun without --resume dropped them, as distill would not)."""
    check_out_folder(out, f"--out {out}", "choose a new --out")
    if out.is_dir() and not _holds_experts(out) and any(out.iterdir()):
        raise ConfigError(f"--out {out} is a non-empty folder that holds no experts (index.json): the experts' files "
                          "would mix with its files; choose a new or empty --out")
    if not resume and not (out / "index.json").exists() and any((out / "checkpoints").glob("*/train_state.json")):
        raise ConfigError(f"--out {out} holds an interrupted training (checkpoints, no index.json): pass --resume "
                          f"to continue it, choose a new --out, or delete {out} to start over")


def _holds_experts(out: Path) -> bool:
    """A finished run (an index.json of this format) or an interrupted one (a checkpoints/ folder holding only
    training states, perhaps none yet); any index.json or checkpoints/ folder passed, and a retrain deleted
    that index.json and wrote among the other files."""
    if (out / "index.json").exists():
        try:
            return json.loads((out / "index.json").read_text(encoding="utf-8")).get("format") == INDEX_FORMAT
        except (OSError, ValueError, AttributeError):  # unreadable, or not an object: the states may tell
            pass
    states = ("train_state.", ".train_state.")  # the files, or an atomic write's temporary file
    return (out / "checkpoints").is_dir() and all(p.is_dir() or p.name.startswith(states)
                                                  for p in (out / "checkpoints").rglob("*"))


def _read_trees(paths_of: dict[str, list[Path]], layer: str, progress, source) -> dict[str, torch.Tensor]:
    """Each tree's ``layer`` (B, d_H, d_W), all read before any training: one router compares one shape, so
    trees of another architecture are refused here, not by a traceback once every expert was trained."""
    xs: dict[str, torch.Tensor] = {}
    for tree, paths in paths_of.items():
        try:
            xs[tree] = x = load_layer(paths, layer, _titled(progress, f"of tree {tree}"))
        except TensorNotFoundError as e:  # 'no tensor named 'fc' (10 tensors)' named no layer to pass instead
            mats = candidate_layers(e.path)
            raise TensorNotFoundError(e.path, f"{e.reason}; its weight matrices: {', '.join(mats[:8]) or 'none'}"
                                              f"{', ...' * (len(mats) > 8)} (pass one as --layer, or --layer auto "
                                              "to pick the best on validation)") from None
        check_finite(paths, x, layer)
        first = next(iter(xs))
        if x.shape[1:] != xs[first].shape[1:]:
            raise ManifestError(f"{source}: layer {layer!r} is {tuple(xs[first].shape[1:])} in tree {first!r} but "
                                f"{tuple(x.shape[1:])} in tree {tree!r}; one experts folder serves one architecture: "
                                "train each architecture's trees into their own --out, from a manifest of them only")
    return xs


def _auto_layer(paths: list[Path], records: list[ModelRecord], task: str, cfg: ProbeXConfig, classes,
                progress) -> tuple[str, dict[str, float]]:
    """(best layer, layer -> validation score) of one tree's models, over every weight matrix of the first."""
    candidates = candidate_layers(paths[0])
    if not candidates:  # else max() of no scores: a ValueError traceback
        raise ConfigError(f"{paths[0]} holds no weight matrix (2-D or conv, at least 2 x 2) for --layer auto to "
                          "choose from; pass --layer NAME")
    scores = select_layer(paths, targets(records, task, len(classes or [])), task, candidates, cfg, classes, progress)
    return max(scores, key=lambda k: (scores[k][0], -scores[k][1])), {k: v[0] for k, v in scores.items()}


def _clear_states(out: Path) -> None:
    """Delete an earlier run's training states (checkpoints/<tree>/train_state.*), nothing else there."""
    for name in ("train_state.json", "train_state.safetensors"):
        for state in (out / "checkpoints").glob(f"*/{name}"):
            state.unlink(missing_ok=True)


def _check_auto_resume(out: Path, trees, chosen: str, epochs: int) -> None:
    """Refuse to resume a tree whose saved state is on another layer than --layer auto chose now (more epochs
    can change its pick), naming the layer to pass; the settings check said 'layer was ...' of a layer the user
    never gave. A state that cannot be read is left to the settings check."""
    for tree in trees:
        path = out / "checkpoints" / tree / "train_state.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))["settings"]["layer"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(saved, str) and saved != chosen:
            raise CheckpointError(path, f"cannot resume: --layer auto chose {chosen!r} at --epochs {epochs}, but the "
                                        f"interrupted run trained {saved!r} (the pick is by validation, which more "
                                        f"epochs can change); resume with --layer {saved}, or train without "
                                        "--resume to start over")


def train_tree_experts(manifest_path: str | Path, out: str | Path, task: str = "classes", layer: str = "auto",
                       config: ProbeXConfig | None = None, progress: Progress | None = None,
                       resume: bool = False, min_models: int = MIN_MODELS) -> TrainReport:
    """Train one expert per tree of the zoo (trees with >= ``min_models`` labelled models) and a router.

    ``layer="auto"`` trains an expert per candidate layer on the largest tree and keeps the best on
    validation for every tree. Time O(trees * training cost); reads one layer per model.
    """
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}; got {task!r}")
    cfg, out = config if config is not None else ProbeXConfig(), Path(out)
    _check_out(out, resume)
    check_train_memory(cfg)
    manifest = load_manifest(manifest_path)
    records = task_records(manifest, task)
    classes = class_names(records, manifest) if task == "classes" else None
    by_tree = group_by_tree(records, min_models, manifest_path)
    check_full_weights(manifest, by_tree)
    paths_of = tree_paths(manifest, by_tree)  # each checked before any layer is read, naming the record
    report = TrainReport(layer, left_out=left_out(records, by_tree))
    if layer == "auto":
        largest = max(by_tree.values(), key=len)
        report.layer, report.layer_scores = _auto_layer(paths_of[largest[0].tree], largest, task, cfg, classes, progress)
        if resume:
            _check_auto_resume(out, by_tree, report.layer, cfg.epochs)
    xs = _read_trees(paths_of, report.layer, progress, manifest_path)
    if not resume:  # else a tree's older state stays until its first new one, and --resume meets the old run
        _clear_states(out)
    for n, (tree, ms) in enumerate(by_tree.items(), 1):
        expert = _fit_one(task, xs[tree], targets(ms, task, len(classes or [])), cfg, report.layer, classes,
                          _titled(progress, f"tree {tree} ({n} of {len(by_tree)})"), out / "checkpoints" / tree, resume)
        (out / "index.json").unlink(missing_ok=True)  # an older run's index must not list this run's experts
        expert.save(out / "experts" / tree)
        report.trees[tree] = {"models": len(ms), "val_score": float(expert.history_["best_score"]),
                              "parameters": expert.n_parameters_}
    TreeRouter().fit(torch.cat(list(xs.values())), [t for t, x in xs.items() for _ in range(len(x))]).save(out / "router")
    _write_index(out, task, report)
    return report


def _write_index(out: Path, task: str, report: TrainReport) -> None:
    """``index.json``, last: what was trained, and the SHA-256 of every file it loads (a file damaged or edited
    since is refused by :meth:`TreeExperts.load`, not read into other predictions)."""
    files = ["router/router.json", "router/router.safetensors",
             *(f"experts/{t}/expert.{ext}" for t in report.trees for ext in ("json", "safetensors"))]
    atomic_write_json(out / "index.json", {"format": INDEX_FORMAT, "task": task, "layer": report.layer,
                                           "layer_scores": report.layer_scores, "report": report.trees,
                                           "trees": {t: f"experts/{t}" for t in report.trees},
                                           "files_sha256": files_sha256(out, files)})


def _read_index(folder: Path) -> dict:
    """``index.json`` of an experts folder, its keys checked; a missing folder is named as missing, and a
    folder with checkpoints but no index is a training run that did not finish."""
    if folder.is_file():  # e.g. the index itself: "index.json/index.json: Not a directory" said nothing useful
        raise CheckpointError(folder, "a file, not an experts folder; pass the folder `atlas probex train --out` "
                                      "wrote" + (f" ({folder.parent})" if folder.name == "index.json" else ""))
    if not folder.exists():  # (said "not an experts folder (no index.json ...)", as if the folder were there)
        raise CheckpointError(folder, "no such folder; pass the folder `atlas probex train --out` wrote")
    path = folder / "index.json"
    if not path.exists() and (folder / "checkpoints").is_dir():
        raise CheckpointError(folder, "training did not finish (no index.json); rerun the same `atlas probex "
                                      "train` command with --resume to complete it")
    if not path.exists():
        _refuse_atlas(folder)
    index = read_json_object(path, "not an experts folder (no index.json; train one with `atlas probex train`)",
                             "an experts index")
    if index.get("format") != INDEX_FORMAT:
        raise CheckpointError(path, f"unknown format {index.get('format')!r} (expected {INDEX_FORMAT})")
    trees = index.get("trees")
    if index.get("task") not in TASKS:
        raise CheckpointError(path, f"task must be one of {TASKS}; got {index.get('task')!r}")
    if not isinstance(index.get("layer"), str):
        raise CheckpointError(path, f"layer must be a string; got {index.get('layer')!r}")
    if not isinstance(trees, dict) or not all(isinstance(v, str) for v in trees.values()):
        raise CheckpointError(path, f"trees must be an object of tree -> expert folder; got {trees!r:.60}")
    if not trees:
        raise CheckpointError(path, "trees must name at least one tree's expert; got none")
    for tree, rel in trees.items():  # '../x' or a folder of no expert was named as that folder, not the index
        if not (folder / rel / "expert.json").is_file() or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(path, f"trees[{tree!r}] is {rel!r}, not a folder of this experts folder holding an "
                                        "expert.json; train the experts again")
    return index


def _refuse_atlas(folder: Path) -> None:
    """An atlas folder given as experts (it records the experts it was built with): named as an atlas, with
    those experts' folders. It said 'not an experts folder (no index.json; train one ...)'."""
    from modelatlas.atomic import peek_json_object

    data = peek_json_object(folder / "atlas.json")
    if data is None:
        return
    used = data.get("experts") if isinstance(data.get("experts"), dict) else {}
    built = [f"{e['folder']} ({task})" for task, e in used.items() if isinstance(e, dict) and isinstance(e.get("folder"), str)]
    raise CheckpointError(folder, "an atlas (`atlas index build`), not an experts folder; pass the folder `atlas "
                                  "probex train --out` wrote" + (f": this atlas used {', '.join(built)}" if built else ""))


@dataclass
class TreeExperts:
    """A loaded experts folder: ``route`` then ``predict_proba`` / ``similarity`` per model."""

    folder: Path
    task: str
    layer: str
    router: TreeRouter
    experts: dict[str, WeightExpert]
    tree_dirs: dict[str, Path] = field(default_factory=dict)  # tree -> its expert's folder

    @classmethod
    def load(cls, folder: str | Path) -> TreeExperts:
        folder = Path(folder)
        index = _read_index(folder)
        experts = {t: load_expert(folder / rel) for t, rel in index["trees"].items()}
        loaded = cls(folder, index["task"], index["layer"], TreeRouter.load(folder / "router"), experts,
                     {t: folder / rel for t, rel in index["trees"].items()})
        loaded._check_consistent()  # (first: a file edited by hand is named with what is wrong in it)
        check_files_sha256(folder, index.get("files_sha256"), folder / "index.json", "train the experts again")
        return loaded

    def weights_digest(self) -> str:
        """SHA-256 over every tree's expert.safetensors, in tree order: tells these experts from a retrained
        set of the same task, layer and ranks, whose embeddings would not match stored ones. O(expert bytes)."""
        import hashlib

        h = hashlib.sha256()
        for tree in sorted(self.tree_dirs):
            h.update(tree.encode() + b"\0")
            with open(self.tree_dirs[tree] / "expert.safetensors", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def _check_consistent(self) -> None:
        """Every expert is on the index's layer at one shape, and the router routes to exactly those trees:
        a folder mixing two runs (edited by hand, or copied over) would otherwise fail model by model."""
        where = self.folder / "index.json"
        shapes = {tuple(e.mean_.shape) for e in self.experts.values()}
        for tree, expert in self.experts.items():
            if expert.layer and expert.layer != self.layer:  # either file may be the edited one: both named
                raise CheckpointError(where, f"layer is {self.layer!r}, but the expert of tree {tree!r} was trained "
                                             f"on {expert.layer!r} ({self.tree_dirs[tree] / 'expert.json'}); train "
                                             "the experts again")
        router_shape = getattr(self.router, "shape_", None)
        if len(shapes) > 1 or (router_shape is not None and {tuple(router_shape)} != shapes):
            raise CheckpointError(where, f"the experts and the router expect layers of different shapes "
                                         f"({sorted(shapes)}, router {router_shape}); train the experts again")
        if set(self.router.trees_) != set(self.experts):
            raise CheckpointError(where, f"the router ({self.folder / 'router' / 'router.json'}) knows trees "
                                         f"{sorted(self.router.trees_)}, the index "
                                         f"{sorted(self.experts)}; train the experts again")

    def read(self, paths, progress: Progress | None = None, adapter_base: Checkpoint | None = None):
        """(X, route results) for model paths: their ``layer`` (a PEFT adapter's merged onto ``adapter_base``
        when given, else its update B A), and the tree each belongs to. A model that
        cannot be read, lacks the layer or has it in another shape is routed to no tree, with the reason (its
        row of X is zeros and never used), so that one stray model does not stop the others. Models are named
        as in an atlas: zooA/t0.1 and zooB/t0.1, not t0.1 twice. O(B d_H d_W)."""
        from modelatlas.weights import unique_names
        from modelatlas.weights.base import error_line

        paths = list(paths)
        if not paths:
            raise ConfigError("no models given")
        shape = tuple(next(iter(self.experts.values())).mean_.shape)
        x, routes, names = torch.zeros(len(paths), *shape), [], unique_names(paths)  # (B, d_H, d_W)
        for i, p in enumerate(resolve(progress)(paths, total=len(paths), desc=f"read {self.layer}")):
            try:
                mat = load_layer([p], self.layer, adapter_base=adapter_base)  # (1, d_H, d_W)
                if tuple(mat.shape[1:]) != shape:  # the router's own error named weight counts, not the layer
                    raise CheckpointError(p, f"layer {self.layer!r} has shape {tuple(mat.shape[1:])}; the experts "
                                             f"were trained on {shape}: another architecture")
                routes.append(self.router.route(mat, [names[i]])[0])  # refuses another shape
                x[i] = mat[0]
            except (AtlasError, OSError) as e:
                routes.append(RouteResult(names[i], None, "", float("nan"), float("nan"), error_line(e)))
        return x, routes

    def predict_proba(self, x, routes: list[RouteResult]) -> list[np.ndarray | None]:
        """Per model, its tree expert's class probabilities (None for a model in no known tree)."""
        return [self.experts[r.tree].predict_proba(x[i:i + 1])[0] if r.known else None for i, r in enumerate(routes)]

    def search_scores(self, x, routes: list[RouteResult], query_embedding) -> np.ndarray:
        """Every model's score for one query through its tree's text expert, normalised against that expert's
        seen prompts (see ProbeXTextAligner.search_scores); -inf outside known trees."""
        self.check_query(query_embedding)
        scores = np.full(len(routes), -np.inf)
        for i, r in enumerate(routes):
            if r.known:
                expert = self.experts[r.tree]
                scores[i] = expert.search_scores(x[i:i + 1], query_embedding, expert.text_)[0]
        return scores

    def check_query(self, query_embedding) -> None:
        """Refuse (ConfigError naming the folder) a query embedding of another width than the text embeddings
        the experts were trained on, e.g. experts trained on synthetic text vectors, not the MiniLM encoder's."""
        width = np.asarray(query_embedding).shape[-1]
        for tree, expert in self.experts.items():
            d_text = getattr(expert, "text_", None)
            if d_text is None or d_text.shape[1] != width:
                raise ConfigError(f"{self.folder}: the expert of tree {tree!r} was not trained on text embeddings "
                                  f"of width {width} (the text encoder's); train text experts with "
                                  "`atlas probex train --task text`")
