"""Public entry points: :func:`distill` (learn a synthetic set) and :func:`run_distillation` (learn,
evaluate against the random-subset baseline, write the result folder); re-evaluating a saved result is
:func:`modelatlas.distill.reevaluate.evaluate_result`.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from modelatlas.atomic import check_out_folder, file_in_the_way, not_a_folder
from modelatlas.data import load_dataset
from modelatlas.data import transforms as T
from modelatlas.data.image_folder import check_out_outside_images
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import methods
from modelatlas.distill.evaluate import EvalProtocol, evaluate_random_baseline, evaluate_synthetic
from modelatlas.distill.finished import stored_result
from modelatlas.distill.loop import (
    CHECKPOINT_JSON,
    device_history,
    read_checkpoint,
    read_json,
    saved_wall_time,
)
from modelatlas.distill.methods.base import DistillContext
from modelatlas.distill.nets import pick_device
from modelatlas.distill.result import RESULT_JSON, load_result, write_result
from modelatlas.distill.run_check import (
    RUN_JSON,
    absolute_root,
    another_commands,
    check_run,
    foreign_result,
    has_progress,
    run_record,
)
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
    check_out_outside_images(out, dataset, dataset_kwargs.get("root"), "--out")
    spec, ipc = check_start(method, ipc, init_from is not None, seed)
    config, checkpoint = _resumed(out, config, resume)  # checkpoint.json, read once for every use below
    train, test = _datasets(dataset, dataset_test, dataset_kwargs)  # both checked (the training split once)
    if baseline and method != "random":
        check_baseline_ipc(train, ipc, ipc_asked)
    tf, train_t, test_t, init_from, init = _prepared(train, test, transform, init_from)
    cfg = spec.make_config(config)
    check_poster_ipc(cfg, ipc)
    proto = _protocol(protocol, method, cfg, train.input_shape, eval_nets, eval_epochs)  # checked first
    with _undone_if_unstarted(out):
        check_run(out / "checkpoint" / RUN_JSON, resume, run_record(method, train, ipc, tf, dataset_kwargs, init_from,
                                                                      init, cfg, seed), _default_net(cfg, train))
        run = {"method": method, "ipc": ipc, "seed": seed, "config": cfg, "init_from": init_from,
               "dataset_kwargs": dataset_kwargs, "device": device}
        named = isinstance(dataset, str) and dataset_test is None  # a given test split is not recorded
        if resume and named and (stored := stored_result(out, run, proto, baseline, checkpoint)) is not None:
            return {**stored, "reused": True}  # (not in result.json: this call wrote nothing)
        syn, ctx = _run(method, train_t, ipc, cfg, seed, progress, out / "checkpoint", resume, device, init,
                        checkpoint)
    info = _evaluated(run, syn, ctx, train.name, cfg, train_t, test_t, proto, baseline, progress)
    if resume:
        info.update(_kept_reevaluation(out, seed, ctx.losses))
    write_result(out, syn, tf, info, losses=ctx.losses)
    return info


def _evaluated(run: dict, syn, ctx, data_name: str, cfg, train_t: ArrayDataset, test_t: ArrayDataset,
               proto: EvalProtocol, baseline: bool, progress: Progress | None) -> dict:
    """The ``result.json`` dict of a finished distillation: its settings, the set's evaluation under ``proto``
    and (``baseline``) the random baseline's under the same protocol and seed."""
    wall = ctx.elapsed()  # distillation only, not the evaluation below
    seed, device = run["seed"], run["device"]
    ev = evaluate_synthetic(syn, test_t, proto, seed=seed, progress=progress, device=device)
    from modelatlas.distill.methods.podd.api import poster_fields

    info = {**_info(run, data_name, cfg), **poster_fields(syn, run["ipc"]), "evaluation": ev.to_dict(),
            "wall_time_s": round(wall, 3), "resumed": ctx.wall_offset > 0,
            "devices": device_history(ctx.checkpoint, torch.device(ctx.device).type)}  # a run moved between them
    if baseline and run["method"] != "random":
        info["baseline_random"] = evaluate_random_baseline(train_t, test_t, run["ipc"], proto, seed, progress,
                                                           device).to_dict()
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
    if not (resume and path.is_file() and has_progress(out)) or not isinstance(config, (dict, type(None))):
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
        if not has_progress(out):
            (out / "checkpoint" / RUN_JSON).unlink(missing_ok=True)
            for folder in reversed(made):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


def _kept_reevaluation(out: Path, seed: int, losses: list[float]) -> dict:
    """A finished result's ``reevaluation`` when this resume left its set as it was (same seed and loss history)."""
    try:
        old = read_json(out / RESULT_JSON) if (out / RESULT_JSON).is_file() else {}
    except CheckpointError:  # a damaged result.json: this run replaces it
        return {}
    same = old.get("seed") == seed and old.get("losses") == losses and "reevaluation" in old
    return {"reevaluation": old["reevaluation"]} if same else {}


def check_out(out: Path, resume: bool) -> None:
    """Refuse an ``out`` that holds a checkpoint or a finished result (without resume), a finished result without
    its checkpoint folder (with resume), or other files than a result of ours."""
    ckpt = out / "checkpoint" / CHECKPOINT_JSON
    if (out / RESULT_JSON).is_file() and foreign_result(out / RESULT_JSON):
        raise ConfigError(f"--out {out} holds a result.json that names no distillation method (another program's "
                          "result: its files would be overwritten); choose a new or empty --out")
    if (out / RESULT_JSON).is_file() and not resume:  # first: a finished run keeps its checkpoint too
        raise ConfigError(f"{out / RESULT_JSON} exists: {out} holds a finished result; choose a new --out, delete "
                          "the folder to redo it, or pass --resume (resume=True) to finish or re-evaluate that run")
    if ckpt.is_file() and not resume:
        raise ConfigError(f"{ckpt} exists: pass --resume (resume=True) to continue that run, or choose a new --out")
    if resume and (out / RESULT_JSON).is_file() and not any(  # it started over, unchecked, with the method's
            (out / "checkpoint" / name).is_file() for name in (RUN_JSON, CHECKPOINT_JSON)):  # default iterations
        raise ConfigError(f"--resume: {out} holds a finished result but no {out / 'checkpoint'}/ (run.json, "
                          "checkpoint.json), so its run cannot be continued; re-evaluate it with `atlas distill "
                          f"eval {out}` (evaluate_result), or run it again in a new --out (or after deleting {out})")
    above = file_in_the_way(out.parent)  # else: 'Not a directory' at the first write
    if above is not None:
        raise ConfigError(f"--out {out}: {above} is {not_a_folder(above, False)}, not a folder; choose another --out")
    check_out_folder(out, f"--out {out}", "choose a new --out")
    run = out / "checkpoint" / RUN_JSON
    ours = any((out / name).is_file() for name in (RESULT_JSON, f"checkpoint/{CHECKPOINT_JSON}")) \
        or (run.is_file() and not another_commands(run))
    if out.is_dir() and not ours and any(out.iterdir()):
        raise ConfigError(f"--out {out} is a non-empty folder that is not a distillation result (its files would "
                          "be overwritten); choose a new or empty --out")


def check_poster_ipc(cfg, ipc: int) -> None:
    """Refuse a PoDD run whose ``ipc`` is not ceil(``poster_ipc``) (at least 1), the images per class of its run
    and baseline: --ipc 3 --set poster_ipc=0.3 made a 0.3-IPC poster recorded as ipc 3, scored against a
    3-per-class baseline."""
    poster = getattr(cfg, "poster_ipc", None)
    need = None if poster is None else max(1, math.ceil(poster))
    if need is not None and ipc != need:
        raise ConfigError(f"ipc {ipc} is not the {need:.4g} image{'s' * (need != 1)} per class of a poster of poster_ipc "
                          f"{poster:g} (ceil(poster_ipc): the run's and its baseline's); make posters with "
                          f"`atlas distill poster --ipc {poster:g}` (run_poster)")


def check_baseline_ipc(train: ArrayDataset, ipc: int, asked: str | None = None) -> None:
    """Refuse, before any distillation, an ``ipc`` the random-subset baseline cannot draw (it needs ``ipc``
    real examples of every class); ``asked`` names the value the user gave when it is not ``ipc`` itself."""
    counts = torch.bincount(train.y, minlength=train.num_classes)
    c = int(counts.argmin())
    if int(counts[c]) < ipc:
        what = asked or f"ipc {ipc}"
        need = ipc if ipc < 10**6 else f"{ipc:.3g}"  # ceil(--ipc 1e308) printed 309 digits
        raise ConfigError(f"{what} needs {need} real examples per class for the random baseline, but class "
                          f"{train.classes[c]!r} of {train.name!r} has only {int(counts[c])}; lower the ipc "
                          "or pass --no-baseline (baseline=False)")


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
