"""``make_zoo``: train a planned zoo level by level in worker processes and write its manifest.

A child needs its parent's weights, so level k starts when level k-1 is saved; within a level models train
in parallel (multiprocessing ``spawn``, one torch thread per worker, which also keeps results independent
of the worker count). Each finished model is a folder written atomically with ``zoo_record.json`` last;
rerunning with ``resume=True`` skips finished folders (one whose weights no longer match their
recorded digest, damaged since, is trained again). ``manifest.json`` is rewritten after every level.
Time O(models x steps x batch cost) / workers; memory O(one dataset + one model) per worker.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.atomic import check_out_folder
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress, resolve
from modelatlas.zoo.architectures import build_model, head_name, lora_targets
from modelatlas.zoo.config import ADDED_FIELDS, ZooConfig
from modelatlas.zoo.lora import adapter_config, adapter_tensors, add_lora, merge_lora
from modelatlas.zoo.manifest import Manifest, ModelRecord, is_zoo_manifest, load_manifest
from modelatlas.zoo.merged import build_merge
from modelatlas.zoo.plan import plan_zoo, zoo_arch_config
from modelatlas.zoo.store import (
    RECORD,
    clear_folder,
    load_state,
    read_record,
    save_adapter,
    save_full,
    valid_record,
    weights_digest,
    weights_file,
    write_record,
)
from modelatlas.zoo.tasks import task_data
from modelatlas.zoo.train import accuracy, fit

_LATER = {k: v for k, v in ZooConfig().to_dict().items() if k in ADDED_FIELDS}  # their defaults: left out of the hash


def fingerprint(config: ZooConfig) -> str:
    """A short hash of the config: resuming refuses folders built from another config. Fields added since
    (``_LATER``) count only when set, so a zoo built before them resumes as it did; ``merge_dtype`` and
    ``merge_kinds`` only with merges (without, the same models are built)."""
    unset = {**_LATER, **({} if config.merges else {"merge_dtype": config.merge_dtype,
                                                    "merge_kinds": list(config.merge_kinds)})}
    data = {k: v for k, v in config.to_dict().items() if k not in unset or v != unset[k]}
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_zoo(config: ZooConfig, out_dir: str | Path, workers: int = 2, progress: Progress | None = None,
             resume: bool = True) -> Manifest:
    """Train every model of ``config`` into ``out_dir`` (one folder per model) and return the manifest.

    ``workers`` > 1 trains a level's models in that many spawned processes; ``resume`` skips models whose
    folder is finished (and raises :class:`ConfigError` if it was built from a different config).
    """
    if not isinstance(config, ZooConfig):
        raise ConfigError(f"config: expected a ZooConfig, got {type(config).__name__}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: must be a positive integer, got {workers!r}")
    out = Path(out_dir)
    arch = zoo_arch_config(config)  # every check before the folder is made: a bad config leaves nothing behind
    nodes = plan_zoo(config)
    _check_out(out, {n["name"] for n in nodes})
    # no more processes than models trained at once or cores (--workers 1000 spawned 1000 torch processes for a
    # 6-model zoo); the weights do not depend on the worker count
    workers = min(workers, max(Counter(n["level"] for n in nodes).values()), os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**config.to_dict(), "arch_config": arch}
    job = {"out": str(out), "arch": arch, "eval_samples": config.eval_samples, "fingerprint": fingerprint(config),
           "merge_dtype": config.merge_dtype}
    bar = resolve(progress)(_build(nodes, job, meta, workers, resume), total=len(nodes), desc="training zoo")
    reused = []
    for rec, found in bar:
        bar.set_postfix(model=rec["name"], acc=f"{rec['train'].get('test_acc', float('nan')):.2f}")
        reused += [rec["name"]] * found
    manifest = load_manifest(out)
    manifest.reused = tuple(reused)  # (told here: a caller counting them beforehand hashed every model twice)
    return manifest


def _check_out(out: Path, names: set[str]) -> None:
    """Refuse an output path that is a file or lies below one, or a non-empty folder holding no zoo (no
    manifest.json and no model folder of this plan): the models would be mixed into someone else's files."""
    check_out_folder(out, f"out: {out}", "choose another output folder (--out)")
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    ours = names.intersection(entries)  # with this plan's model folders, a damaged manifest is rewritten
    foreign = "manifest.json" in entries and not ours and not is_zoo_manifest(out / "manifest.json")  # a web app's
    if foreign or (entries and "manifest.json" not in entries and not ours):
        example = "'manifest.json', which is no zoo manifest" if foreign else repr(sorted(entries)[0])
        raise ConfigError(f"out: {out} is a non-empty folder holding no zoo (e.g. {example}); "
                          "choose a new or empty output folder (--out)")
    stale = sorted(e for e in entries if e not in names and (out / e / RECORD).is_file())
    if stale:  # an earlier, larger zoo's models: this build would not replace them, and its readers would read them
        raise ConfigError(f"out: {out} holds models of another zoo that this one does not have ({', '.join(stale[:3])}"
                          f"{', ...' if len(stale) > 3 else ''}); lineage recovery would read them as models of this "
                          "zoo: choose a new or empty output folder (--out), or delete them")


def _build(nodes: list[dict], job: dict, meta: dict, workers: int, resume: bool) -> Iterator[tuple[dict, bool]]:
    """Yield each model's record as it finishes, or is found finished (then with True), level by level."""
    out = Path(job["out"])
    records: dict[str, dict] = {}
    pool = None
    try:
        for level in sorted({n["level"] for n in nodes}):
            todo = []
            for node in (n for n in nodes if n["level"] == level):
                done = finished_model(out / node["name"], job["fingerprint"]) if resume else None
                if done is not None:
                    records[node["name"]] = done
                    yield done, True
                else:
                    todo.append({**job, "node": node})
            if workers > 1 and len(todo) > 1 and pool is None:
                pool = _spawn_pool(workers)
            results = pool.imap_unordered(build_one, todo) if pool is not None and len(todo) > 1 else map(_inline, todo)
            for rec in results:
                records[rec["name"]] = rec
                yield rec, False
            _write_manifest(out, nodes, records, meta)
    except (KeyboardInterrupt, GeneratorExit):
        if records:  # Ctrl-C: the models finished so far are listed (zoo show / verify say what is left)
            _write_manifest(out, nodes, records, meta)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def finished_model(folder: Path, fp: str) -> dict | None:
    """The record of the model finished in ``folder`` from the config of fingerprint ``fp``, or None where it has
    none or its weights were damaged since (trained again); a ConfigError where another config built it."""
    data = read_record(folder)
    if data is None:
        return None
    if data.get("fingerprint") != fp:
        raise ConfigError(f"{folder}: built from a different zoo config (another preset, seed or option); "
                          "choose another output folder (--out), or delete it to rebuild it (`atlas zoo make "
                          "--no-resume` and make_zoo(resume=False) rebuild in place)")
    rec = data["record"]
    if not valid_record(folder, rec):  # damaged (hand-edited) since it was built: trained again
        return None
    digest = weights_digest(weights_file(folder, rec.get("storage", "full")))
    if rec.get("sha256") and digest != rec["sha256"]:  # damaged since it was built (truncated, overwritten)
        return None  # trained again: the same seed gives the same weights, so its children still fit
    rec["sha256"] = digest  # (a version that wrote no digest)
    return rec


def _write_manifest(out: Path, nodes: list[dict], records: dict[str, dict], meta: dict) -> None:
    models = [ModelRecord(**records[n["name"]]) for n in nodes if n["name"] in records]
    Manifest(models, meta, out).save(out / "manifest.json")


def _spawn_pool(workers: int):
    """A spawn pool whose workers do not re-import the caller's ``__main__`` (they only need modelatlas), so
    a script without an ``if __name__ == "__main__"`` guard does not spawn workers recursively."""
    main = sys.modules.get("__main__")
    hidden = {k: main.__dict__.pop(k) for k in ("__file__",) if main is not None and k in main.__dict__}
    spec = getattr(main, "__spec__", None)
    if main is not None:
        main.__spec__ = None
    try:
        return mp.get_context("spawn").Pool(workers, initializer=_init_worker)
    finally:
        if main is not None:
            main.__dict__.update(hidden)
            main.__spec__ = spec


def _init_worker() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the pool
    _end_with_parent()
    torch.set_num_threads(1)
    keep_freed_memory()  # a worker only trains: keep activation blocks mapped between steps


def _end_with_parent() -> None:
    """Linux: have the kernel end this worker (SIGTERM) once the build's process dies. A build killed by SIGKILL
    (no handler runs, so no pool.terminate) left its workers training on, writing their models into the zoo beside
    a rerun's, then printing BrokenPipeError tracebacks when they handed them to the dead parent."""
    import ctypes
    import signal

    parent = mp.parent_process()
    if not sys.platform.startswith("linux") or parent is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl to call: the workers outlive a killed build, as before
        return
    if os.getppid() != parent.pid:  # the parent died before the call
        os._exit(1)


def _inline(job: dict) -> dict:
    """Build in this process with one thread (the same arithmetic as a worker, so the same weights); the
    caller's thread count and global torch RNG state are restored (build_one seeds the global generator)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return build_one(job)
    finally:
        torch.set_num_threads(threads)


def build_one(job: dict) -> dict:
    """Train, evaluate and save one planned model (or write a planned merge); returns its manifest record."""
    if job["node"]["method"] == "merge":
        return build_merge(job)
    start = time.perf_counter()
    node, arch, out = job["node"], job["arch"], Path(job["out"])
    spec, task = node["train"], node["task"]
    torch.manual_seed(spec["init_seed"])  # root init; a child's new head also draws from here
    model = build_model(arch)
    if node["parent"] is not None:
        fresh_head = {k: v.clone() for k, v in model.get_submodule(head_name(arch)).state_dict().items()}
        model.load_state_dict(load_state(out, node["parent"]))
        if task.get("head") == "new":
            model.get_submodule(head_name(arch)).load_state_dict(fresh_head)
    x, y = task_data(task, "train", arch["input_shape"])
    xt, yt = task_data(task, "test", arch["input_shape"], limit=job["eval_samples"])
    wrappers = None
    if node["method"] == "lora":
        wrappers = add_lora(model, lora_targets(model), spec["lora_r"], spec["lora_alpha"], spec["seed"])
    loss = fit(model, x, y, lr=spec["lr"], steps=spec["steps"], batch_size=spec["batch_size"], seed=spec["seed"],
               balance=bool(task.get("balance")))
    acc = accuracy(model, xt, yt)
    folder = out / node["name"]
    _save(folder, node, model, wrappers, arch)
    train = {**spec, "train_loss": loss, "test_acc": acc, "n_train": len(y), "n_test": len(yt),
             "seconds": round(time.perf_counter() - start, 3)}
    record = {"name": node["name"], "path": node["name"], "parent": node["parent"], "tree": node["tree"],
              "arch": arch["arch"], "dataset": task["dataset"], "method": node["method"],
              "storage": node["storage"], "task": task, "train": train,
              "sha256": weights_digest(weights_file(folder, node["storage"]))}
    write_record(folder, record, job["fingerprint"])
    return record


def _save(folder: Path, node: dict, model: torch.nn.Module, wrappers: dict | None, arch: dict) -> None:
    """Write the weights: an adapter folder, or the full state dict (LoRA merged first)."""
    folder.mkdir(parents=True, exist_ok=True)
    clear_folder(folder)
    spec = node["train"]
    if node["storage"] == "adapter":
        cfg = adapter_config(list(wrappers), spec["lora_r"], spec["lora_alpha"], node["parent"])
        save_adapter(folder, adapter_tensors(wrappers), cfg)
        return
    if wrappers is not None:
        merge_lora(model, wrappers)
    save_full(folder, model.state_dict(), arch)
