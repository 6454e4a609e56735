"""Public entry points: :func:`distill` (learn a synthetic set) and :func:`run_distillation` (learn,
evaluate against the random-subset baseline, write the result folder); re-evaluating a saved result is
:func:`modelatlas.distill.reevaluate.evaluate_result`.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from modelatlas.atomic import atomic_write_json, check_out_folder, file_in_the_way
from modelatlas.data import load_dataset
from modelatlas.data import transforms as T
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import methods
from modelatlas.distill.evaluate import EvalProtocol, evaluate_random_baseline, evaluate_synthetic
from modelatlas.distill.finished import stored_result
from modelatlas.distill.loop import CHECKPOINT_JSON, read_checkpoint, read_json, saved_wall_time
from modelatlas.distill.methods.base import DistillContext
from modelatlas.distill.nets import pick_device
from modelatlas.distill.result import RESULT_JSON, load_result, write_result
from modelatlas.distill.splits import check_class_names, check_splits, check_train
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.progress import Progress
from modelatlas.seeding import SEED_RANGE, is_seed


def _run(method: str, train: ArrayDataset, ipc: int, cfg, seed: int, progress: Progress | None,
         checkpoint_dir: str | Path | None, resume: bool, device, init: SyntheticSet | None = None,
         checkpoint: dict | None = None) -> tuple[SyntheticSet, DistillContext]:
    """Run ``method`` on ``train`` (both checked: :func:`check_start`, :func:`check_train`) with its config
    ``cfg``; ``checkpoint``: the checkpoint.json of a resumed run as the caller read it (None: read here)."""
    ctx = DistillContext(seed=seed, progress=progress, resume=resume, device=pick_device(device),
                         checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None, init=init)
    if resume and ctx.checkpoint_dir is None:
        raise ConfigError("resume=True needs checkpoint_dir (the CLI uses OUT/checkpoint)")
    if resume:  # the time of the earlier parts, as of their last checkpoint
        ctx.checkpoint = checkpoint if checkpoint is not None else read_checkpoint(ctx.checkpoint_dir)
        ctx.wall_offset = saved_wall_time(ctx.checkpoint)
    if not resume and ctx.checkpoint_dir is not None and (ctx.checkpoint_dir / CHECKPOINT_JSON).is_file():
        # a fresh run would overwrite that run's progress at its first checkpoint
        raise ConfigError(f"{ctx.checkpoint_dir / CHECKPOINT_JSON} exists: pass resume=True to continue that "
                          "run, or choose another checkpoint_dir")
    syn = methods.get(method).run(train, ipc, cfg, ctx)
    syn.meta.update({"method": method, "seed": seed})
    return syn, ctx


def check_start(method: str, ipc: int, has_init: bool, seed: int = 0):
    """(the method's spec, ``ipc`` as an int (a NumPy integer is fine; result.json takes only an int)), or a
    ConfigError for an ipc that is not an integer >= 1, a seed out of range (2**64 ran as seed 0) or a
    starting set the method cannot take; checked before anything is written."""
    if isinstance(ipc, bool) or not isinstance(ipc, numbers.Integral) or ipc < 1:  # 1.5: a TypeError in slicing
        raise ConfigError(f"ipc must be an integer >= 1, got {ipc!r}")
    if not is_seed(seed):
        raise ConfigError(f"seed must be {SEED_RANGE}, got {seed!r}")
    spec = methods.get(method)
    if has_init and not spec.accepts_init:
        takers = ", ".join(n for n in methods.available() if methods.get(n).accepts_init)
        raise ConfigError(f"method {method!r} cannot start from a given set (init); methods that can: {takers}")
    return spec, int(ipc)


def distill(method: str, dataset_train: ArrayDataset, ipc: int, config=None, seed: int = 0,
            progress: Progress | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
            device: str | None = None, init: SyntheticSet | None = None) -> SyntheticSet:
    """Distil ``dataset_train`` into ``ipc`` synthetic examples per class with ``method``.

    ``init``: start from this synthetic set (another method's result, same data and ``ipc``) instead of
    real images, e.g. HeLlO's label projector on DM's images; only methods with ``accepts_init``.

    ``config``: None (defaults), a dict of config fields, or the method's config dataclass. With
    ``checkpoint_dir`` the run checkpoints every ``config.checkpoint_every`` iterations; ``resume=True``
    continues from the last checkpoint (same seed -> identical result to an uninterrupted run).
    Time and memory: see the method's module docstring.
    """
    spec, ipc = check_start(method, ipc, init is not None, seed)
    check_train(dataset_train)
    cfg = spec.make_config(config)
    return _run(method, dataset_train, ipc, cfg, seed, progress, checkpoint_dir, resume, device, init)[0]


def _datasets(dataset, dataset_test, dataset_kwargs) -> tuple[ArrayDataset, ArrayDataset]:
    if isinstance(dataset, str):
        kw = dataset_kwargs or {}
        train = load_dataset(dataset, "train", **kw)
        return train, check_splits(train, dataset_test or load_dataset(dataset, "test", **kw))
    if dataset_test is None:
        raise ConfigError("dataset_test is required when dataset is an ArrayDataset")
    return dataset, check_splits(dataset, dataset_test)


def apply_transform(transform, data: ArrayDataset) -> ArrayDataset:
    """``data`` with its inputs mapped by a fitted transform (standardize, ZCA, identity). O(N D)."""
    return ArrayDataset(data.name, transform.transform(data.x), data.y, data.classes, dict(data.meta))


def default_protocol(method: str, config, in_shape, eval_nets: int = 5, eval_epochs: int | None = None) -> EvalProtocol:
    """The evaluation protocol a method's papers use, with its distillation network."""
    spec = methods.get(method)
    cfg = spec.make_config(config)
    net = cfg.net_spec(tuple(in_shape))
    # the Adam protocol trains at the inner lr the set was distilled for (RaT-BPTT/PoDD ``inner_lr``)
    lr = getattr(cfg, "inner_lr", None) if spec.eval_kind == "adam" else None
    return EvalProtocol(kind=spec.eval_kind, num_nets=eval_nets, epochs=eval_epochs, lr=lr,
                        dsa=bool(spec.eval_dsa(cfg)) and len(in_shape) == 3, net=net["net"], width=net["width"],
                        depth=net["depth"])


def run_distillation(method: str, dataset: str | ArrayDataset, ipc: int, out: str | Path, config=None,
                     seed: int = 0, eval_nets: int = 5, eval_epochs: int | None = None,
                     protocol: EvalProtocol | None = None, transform: str | None = None,
                     dataset_test: ArrayDataset | None = None, dataset_kwargs: dict | None = None,
                     baseline: bool = True, progress: Progress | None = None, resume: bool = False,
                     device: str | None = None, init_from: str | Path | None = None,
                     ipc_asked: str | None = None) -> dict:
    """Distil, evaluate (and the random baseline under the same protocol), and write the result folder
    ``out`` (see :mod:`modelatlas.distill.result`). Checkpoints go to ``out/checkpoint``. ``init_from``: a
    result folder of the same dataset, ``ipc`` and transform whose set this run starts from (e.g. HeLlO's
    labels on DM's images). A data ``root`` in ``dataset_kwargs`` is recorded as an absolute path; a resumed
    run's wall time adds up its parts; ``ipc_asked`` names the ipc the user gave where it is not ``ipc`` (a
    poster's), in the baseline's refusal. Returns the ``result.json`` dict (``"reused": True``: nothing written)."""
    out, dataset_kwargs, device = Path(out), absolute_root(dataset_kwargs), pick_device(device)  # checked first
    check_out(out, resume)
    spec, ipc = check_start(method, ipc, init_from is not None, seed)
    config, checkpoint = _resumed(out, config, resume)  # checkpoint.json, read once for every use below
    train, test = _datasets(dataset, dataset_test, dataset_kwargs)  # both checked (the training split once)
    if baseline and method != "random":
        check_baseline_ipc(train, ipc, ipc_asked)
    tf, train_t, test_t, init_from, init = _prepared(train, test, transform, init_from)
    cfg = spec.make_config(config)
    proto = _protocol(protocol, method, cfg, train.input_shape, eval_nets, eval_epochs)  # checked first
    with _undone_if_unstarted(out):
        _check_run(out / "checkpoint" / RUN_JSON, resume, _run_record(method, train, ipc, tf, dataset_kwargs, init_from,
                                                                      init, cfg), _default_net(cfg, train))
        run = {"method": method, "ipc": ipc, "seed": seed, "config": cfg, "init_from": init_from,
               "dataset_kwargs": dataset_kwargs, "device": device}
        named = isinstance(dataset, str) and dataset_test is None  # a given test split is not recorded
        if resume and named and (stored := stored_result(out, run, proto, baseline, checkpoint)) is not None:
            return {**stored, "reused": True}  # (not in result.json: this call wrote nothing)
        syn, ctx = _run(method, train_t, ipc, cfg, seed, progress, out / "checkpoint", resume, device, init,
                        checkpoint)
    wall = ctx.elapsed()  # distillation only, not the evaluation below
    ev = evaluate_synthetic(syn, test_t, proto, seed=seed, progress=progress, device=device)
    info = {**_info(run, train.name, cfg), "evaluation": ev.to_dict(), "wall_time_s": round(wall, 3),
            "resumed": ctx.wall_offset > 0}
    if baseline and method != "random":
        info["baseline_random"] = evaluate_random_baseline(train_t, test_t, ipc, proto, seed, progress, device).to_dict()
    if resume:
        info.update(_kept_reevaluation(out, seed, ctx.losses))
    write_result(out, syn, tf, info, losses=ctx.losses)
    return info


def _protocol(protocol, method: str, cfg, in_shape, eval_nets: int, eval_epochs: int | None) -> EvalProtocol:
    """``protocol`` when given (checked: "sgd" failed with AttributeError after the distillation), else the
    method's (:func:`default_protocol`)."""
    if protocol is not None and not isinstance(protocol, EvalProtocol):
        raise ConfigError(f"protocol must be an EvalProtocol, got {type(protocol).__name__}")
    return protocol or default_protocol(method, cfg, in_shape, eval_nets, eval_epochs)


def _prepared(train: ArrayDataset, test: ArrayDataset, transform: str | None, init_from: str | Path | None):
    """(fitted transform, both splits in its space, ``init_from`` resolved, the starting set or None);
    ``train`` is checked (:func:`check_splits`): the transform does not scan it again."""
    tf = T.make_transform(transform).fit(train.x, finite=True)
    init_from = None if init_from is None else str(Path(init_from).resolve())
    init = None if init_from is None else _init_set(init_from, train, tf)
    return tf, apply_transform(tf, train), apply_transform(tf, test), init_from, init


def _info(run: dict, dataset: str, cfg) -> dict:
    """The settings part of result.json (``run``: see :func:`~modelatlas.distill.finished.stored_result`)."""
    return {"method": run["method"], "dataset": dataset, "ipc": run["ipc"], "seed": run["seed"],
            "config": cfg.to_dict(), "device": str(run["device"]), "torch": torch.__version__,
            "dataset_kwargs": run["dataset_kwargs"], "init_from": run["init_from"]}


def _run_record(method: str, train: ArrayDataset, ipc: int, tf, dataset_kwargs: dict, init_from: str | None,
                init: SyntheticSet | None, cfg) -> dict:
    """The settings a resume is checked against (``run.json``)."""
    return {"method": method, "dataset": train.name, "ipc": ipc, "transform": tf.kind, "dataset_kwargs": dataset_kwargs,
            "init_from": init_from, "init_digest": _digest(init), "config": cfg.to_dict(), "classes": train.classes}


def _default_net(cfg, train: ArrayDataset) -> dict:
    """The net spec a width/depth of None stands for on this data (not this run's own, which may set them)."""
    return replace(cfg, width=None, depth=None).net_spec(train.input_shape)


def _resumed(out: Path, config, resume: bool) -> tuple[object, dict | None]:
    """(``config`` as :func:`_resumed_iterations` leaves it, the checkpoint.json of a resume or None:
    :func:`~modelatlas.distill.loop.read_checkpoint`)."""
    checkpoint = read_checkpoint(out / "checkpoint") if resume else None
    return _resumed_iterations(out, config, resume, checkpoint), checkpoint


def _resumed_iterations(out: Path, config, resume: bool, checkpoint: dict | None):
    """``config`` with, on a resume that names no iteration count, the checkpointed run's: the method's default
    would silently extend the run (a finished 2-iteration run re-evaluated with --resume went on to 500). The
    last checkpoint's count comes first: run.json keeps the first start's, so a run extended by a resume with
    --iterations was then refused ("3 iterations done, more than iterations=2") on a plain --resume.
    ``checkpoint``: the checkpoint.json read (:func:`~modelatlas.distill.loop.read_checkpoint`)."""
    path = out / "checkpoint" / RUN_JSON
    if not (resume and path.is_file() and _has_progress(out)) or not isinstance(config, (dict, type(None))):
        return config
    if "iterations" in (config or {}):
        return config
    saved = checkpoint or {}
    if not isinstance(saved.get("iterations"), int):
        saved = read_json(path, "delete the checkpoint folder to start over").get("config", {})
    iterations = saved.get("iterations") if isinstance(saved, dict) else None
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        return config
    return {**(config or {}), "iterations": iterations}


@contextmanager
def _undone_if_unstarted(out: Path):
    """Run the body; if it fails (a method's own refusal, Ctrl-C) before the first checkpoint, remove the
    run.json this start wrote and the folders it made, so that the refusal leaves ``out`` as it was."""
    made = [p for p in (out, out / "checkpoint") if not p.exists()]
    try:
        yield
    except BaseException:
        if not _has_progress(out):
            (out / "checkpoint" / RUN_JSON).unlink(missing_ok=True)
            for folder in reversed(made):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


def _has_progress(out: Path) -> bool:
    """Whether ``out`` holds a run's checkpoint or its finished result (what its run.json describes)."""
    return (out / "checkpoint" / CHECKPOINT_JSON).is_file() or (out / RESULT_JSON).is_file()


def _kept_reevaluation(out: Path, seed: int, losses: list[float]) -> dict:
    """A finished result's ``reevaluation`` when this resume left its set as it was (same seed and loss history)."""
    try:
        old = read_json(out / RESULT_JSON) if (out / RESULT_JSON).is_file() else {}
    except CheckpointError:  # a damaged result.json: this run replaces it
        return {}
    same = old.get("seed") == seed and old.get("losses") == losses and "reevaluation" in old
    return {"reevaluation": old["reevaluation"]} if same else {}


def absolute_root(dataset_kwargs: dict | None) -> dict:
    """``dataset_kwargs`` with a ``root`` made absolute (a result stays usable from another working folder)."""
    kw = dict(dataset_kwargs or {})
    if kw.get("root") is not None:
        kw["root"] = str(Path(kw["root"]).expanduser().resolve())
    return kw


def check_out(out: Path, resume: bool) -> None:
    """Refuse an ``out`` that holds a checkpoint or a finished result (without resume), or other files than a
    result of ours."""
    ckpt = out / "checkpoint" / CHECKPOINT_JSON
    if ckpt.is_file() and not resume:
        raise ConfigError(f"{ckpt} exists: pass --resume (resume=True) to continue that run, or choose a new --out")
    if (out / RESULT_JSON).is_file() and not resume:
        raise ConfigError(f"{out / RESULT_JSON} exists: {out} holds a finished result; choose a new --out, delete "
                          "the folder to redo it, or pass --resume (resume=True) to finish or re-evaluate that run")
    above = file_in_the_way(out.parent)  # else: 'Not a directory' at the first write
    if above is not None:
        raise ConfigError(f"--out {out}: {above} is a file, not a folder; choose another --out")
    check_out_folder(out, f"--out {out}", "choose a new --out")
    ours = any((out / name).is_file()
               for name in (RESULT_JSON, f"checkpoint/{RUN_JSON}", f"checkpoint/{CHECKPOINT_JSON}"))
    if out.is_dir() and not ours and any(out.iterdir()):
        raise ConfigError(f"--out {out} is a non-empty folder that is not a distillation result (its files would "
                          "be overwritten); choose a new or empty --out")


def check_baseline_ipc(train: ArrayDataset, ipc: int, asked: str | None = None) -> None:
    """Refuse, before any distillation, an ``ipc`` the random-subset baseline cannot draw (it needs ``ipc``
    real examples of every class); ``asked`` names the value the user gave when it is not ``ipc`` itself."""
    counts = torch.bincount(train.y, minlength=train.num_classes)
    c = int(counts.argmin())
    if int(counts[c]) < ipc:
        what = asked or f"ipc {ipc}"
        raise ConfigError(f"{what} needs {ipc} real examples per class for the random baseline, but class "
                          f"{train.classes[c]!r} of {train.name!r} has only {int(counts[c])}; lower the ipc "
                          "or pass --no-baseline (baseline=False)")


RUN_JSON = "run.json"
# a resumed run may be extended, checkpoint more often, score its real batch in smaller chunks (the same
# gradient: the fix for a run that ran out of memory) or keep its cache elsewhere (experts, pools, teachers are
# fixed by the data, their settings and the seed); a field missing from an older run.json is one of these
_MAY_CHANGE = ("iterations", "checkpoint_every", "real_chunk", "cache_dir")


# settings compared first, so a resume names the most telling difference (another method, not its fields)
_FIRST = ("method", "dataset", "ipc", "transform", "dataset_kwargs", "init_from", "init_digest")


def _check_run(path: Path, resume: bool, run: dict, net: dict | None = None) -> None:
    """On resume, refuse a checkpoint written by another run (another dataset of the same shape would load
    without complaint); otherwise record this run beside its checkpoints. Values are compared resolved (an
    explicit ``identity`` transform or the default width equal their defaults; ``net``: the default net spec
    for this input, which a saved or given width/depth of None stands for; a starting set by its content, so
    its folder may move; the class names, which an image folder takes from its subfolders). Checkpoints
    without the file (older versions) are resumed unchecked; a run.json with neither a checkpoint nor a result
    beside it (a start stopped before its first checkpoint) is replaced."""
    if not (resume and path.is_file() and _has_progress(path.parent.parent)):  # (alone: a start that never checkpointed)
        atomic_write_json(path, run)
        return
    saved_run = _checked_types(path, read_json(path, "delete the checkpoint folder to start over"))
    saved, now = _identity(saved_run, net), _identity(json.loads(json.dumps(run)), net)
    rest = sorted((set(saved) | set(now)) - set(_FIRST), key=lambda k: (k.startswith("config."), k))
    for k in (*_FIRST, *rest):
        if saved.get(k) != now.get(k):
            raise ConfigError(f"{path}: the checkpointed run used {k} {saved.get(k)!r}, not {now.get(k)!r}; "
                              "resume with the same settings or use a new --out")
    _check_classes(path, saved_run.get("classes"), run["classes"])


_RUN_TYPES = {"config": (dict, "an object"), "classes": (list, "a list"), "dataset_kwargs": (dict, "an object"),
              "init_from": (str, "a folder name")}


def _checked_types(path: Path, saved: dict) -> dict:
    """``saved`` (run.json), refused naming the key when one is of another type (a hand edit: an
    AttributeError or TypeError in the comparison)."""
    for key, (kind, what) in _RUN_TYPES.items():  # absent in older versions; only init_from may be null
        if key in saved and not isinstance(saved[key], kind) and not (saved[key] is None and key == "init_from"):
            raise CheckpointError(path, f"{key} must be {what}, got {saved[key]!r}; delete the checkpoint folder "
                                        "to start over")
    return saved


def _check_classes(path: Path, saved: list | None, now: list[str]) -> None:
    """Refuse other class names (an image folder's class renamed, or one swapped for another): the checkpointed
    images would go on under other labels. A run.json without them (older versions) is not checked."""
    if saved is None or saved == now:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
    was, got = (repr(names[i]) if i < len(names) else "none" for names in (saved, now))
    raise ConfigError(f"{path}: the checkpointed run's class {i} was {was}, the data's is {got} ({len(saved)} "
                      f"classes then, {len(now)} now); resume on the same data or use a new --out")


def _identity(run: dict, net: dict | None) -> dict:
    """A run's settings as flat keys (``config.lr_img``), resolved, less those a resumed run may change."""
    config = {f"config.{k}": v for k, v in run.get("config", {}).items() if k not in _MAY_CHANGE}
    for k in ("width", "depth"):  # None is the default net's value
        if net is not None and config.get(f"config.{k}", 0) is None:
            config[f"config.{k}"] = net[k]
    top = {k: v for k, v in run.items() if k not in ("config", "classes")}  # classes: see _check_classes
    if top.get("init_digest") is not None:  # the starting set is known by its content: its folder may move
        top.pop("init_from", None)
    top["transform"] = top.get("transform") or "identity"
    top["dataset_kwargs"] = absolute_root(top.get("dataset_kwargs"))
    if top.get("init_from") is not None:
        top["init_from"] = str(Path(top["init_from"]).resolve())
    return {**top, **config}


def _digest(syn: SyntheticSet | None) -> str | None:
    """A SHA-256 of a starting set's images, classes and label logits (None without one). Time O(set size)."""
    if syn is None:
        return None
    h = hashlib.sha256()
    for t in (syn.images, syn.classes, syn.label_logits):
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _init_set(folder: str | Path, train: ArrayDataset, tf) -> SyntheticSet:
    """The set of result folder ``folder``, checked to live in this run's data space (dataset, classes,
    transform)."""
    syn, saved_tf, info = load_result(folder)
    if info.get("dataset") != train.name:
        raise ConfigError(f"{folder}: its set distils {info.get('dataset')!r}, but this run distils {train.name!r}")
    check_class_names(folder, syn, train.classes, "this run's", "start from a result distilled from the same data")
    same = saved_tf.kind == tf.kind and all(
        torch.equal(v, tf.state_dict()[k]) for k, v in saved_tf.state_dict().items())
    if not same and saved_tf.kind == tf.kind:  # "pass --transform zca" would name the flag already given
        kw = info.get("dataset_kwargs")
        root = (kw.get("root") if isinstance(kw, dict) else None) or "its data"
        raise ConfigError(f"{folder}: its {tf.kind!r} transform was fitted on other training data ({root}); "
                          "start from a result distilled from the same data")
    if not same:
        raise ConfigError(f"{folder}: its images are in transform {saved_tf.kind!r} space, this run uses "
                          f"{tf.kind!r}; pass --transform {saved_tf.kind}")
    syn.meta["source"] = str(folder)  # named by init_synthetic's errors
    return syn
