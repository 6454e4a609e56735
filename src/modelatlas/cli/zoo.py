"""``atlas zoo make`` (train a zoo with known lineage), ``atlas zoo show`` (print its trees), ``atlas zoo
verify`` (weights against the manifest's digests, or against another build) and ``atlas zoo merge`` (an
adapter-stored zoo written with full weights)."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

from modelatlas.cli.argtypes import int_tuple, out_dir, positive_int, seed, str_tuple
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.output import counted, echo, tqdm_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="build and inspect model zoos with known lineage")
    zsub = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    _register_make(zsub)
    show = zsub.add_parser("show", help="print a zoo's trees with each model's task")
    show.add_argument("dir", help="zoo folder (holding manifest.json) or the manifest file")
    show.set_defaults(func=_show)
    ver = zsub.add_parser("verify", help="check every model's weights against the manifest's SHA-256 digests",
                          description="Check a zoo's weights files against its manifest, or (--against) compare "
                          "its digests with another build of the same config, e.g. one made on another machine.")
    ver.add_argument("dir", help="zoo folder (holding manifest.json) or the manifest file")
    ver.add_argument("--against", metavar="MANIFEST", help="another build's manifest (or zoo folder): compare digests")
    ver.set_defaults(func=_verify)
    mrg = zsub.add_parser("merge", help="write a zoo stored as LoRA adapters with every model's full weights",
                          description="Copy a zoo, writing each adapter-stored model as its full weights (its "
                          "parent's weights plus its update), so that `atlas lineage recover` and `atlas index build` "
                          "can compare adapters trained on other adapters.")
    mrg.add_argument("dir", help="zoo folder (holding manifest.json) or the manifest file")
    mrg.add_argument("--out", required=True, type=out_dir, help="new or empty folder for the merged zoo, or an earlier "
                     "merge of this zoo (rewritten: how an interrupted merge is finished)")
    mrg.set_defaults(func=_merge, interrupt_hint="{out} holds the models merged so far and no manifest yet; "
                     "rerun the same command to write the merged zoo")
    pre = zsub.add_parser("presets", help="list preset zoos")
    pre.set_defaults(func=_presets)


def _register_make(zsub) -> None:
    mk = zsub.add_parser("make", help="train a zoo of models with known parents",
                         description="Train a zoo: a preset and/or explicit options (options override the preset). "
                         "An option left out takes the preset's value, else the default shown.")
    mk.add_argument("--preset", help="named config (see `atlas zoo presets`)")
    mk.add_argument("--arch", choices=["mlp", "cnn", "vit"], help="architecture (default mlp)")
    mk.add_argument("--dataset", help="root dataset (default digits; see `atlas data list`)")
    mk.add_argument("--arch-kwargs", type=_json_dict, help='sizes as JSON, e.g. \'{"hidden": 32, "n_hidden": 2}\' (default: the architecture\'s)')
    mk.add_argument("--input-shape", type=int_tuple,
                    help="C,H,W every input is resized to, e.g. 1,28,28 (default: the dataset's own)")
    mk.add_argument("--shape", choices=["tree", "star"], help="tree: trees x children x depth; star: root + children (default tree)")
    mk.add_argument("--trees", type=int, help="number of roots (default 3)")
    mk.add_argument("--children", type=int, help="children of each non-leaf model (default 2)")
    mk.add_argument("--depth", type=int, help="levels below each root (default 2 for a tree, 1 for a star)")
    mk.add_argument("--method", choices=["full", "lora", "mixed"],
                    help="children's fine-tuning: full, LoRA or a coin flip per child (default full)")
    mk.add_argument("--storage", choices=["merged", "adapter"], help="LoRA children: merged weights or adapter folder (default merged)")
    mk.add_argument("--lora-ranks", type=int_tuple, help="ranks LoRA children draw from, e.g. 4 or 2,4,8 (default 4)")
    mk.add_argument("--task-sampler", help="mixed, class_subset, transform, new_head, random_class_subset, named_class "
                    "(default mixed)")
    mk.add_argument("--task-kinds", type=str_tuple,
                    help="kinds the mixed sampler draws: class_subset,transform,dataset,new_head "
                    "(default class_subset,transform,new_head)")
    mk.add_argument("--other-datasets", type=str_tuple, help="datasets of 'dataset' child tasks, e.g. mnist5k (adds the kind 'dataset'; default none)")
    mk.add_argument("--merges", type=int, help="merged models added to each tree after training: linear, task-arithmetic "
                    "and SLERP merges of its fine-tunes, parents and weights in the manifest (default 0)")
    mk.add_argument("--merge-kinds", type=str_tuple, help="the kinds merges cycle through: linear,task_arithmetic,slerp,"
                    "ties,dare_ties,dare_linear (default linear,task_arithmetic,slerp)")
    mk.add_argument("--merge-dtype", choices=["float32", "bfloat16"], help="the merged models' weights (default float32)")
    mk.add_argument("--seed", type=seed, help="zoo seed (default 0)")
    mk.add_argument("--workers", type=positive_int, default=2, help="training processes (default 2)")
    mk.add_argument("--out", required=True, type=out_dir, help="output folder (one sub-folder per model + manifest.json)")
    mk.add_argument("--no-resume", action="store_true", help="retrain models already saved in --out")
    mk.set_defaults(func=_make, interrupt_hint="finished models are kept; rerun the same command to finish the zoo")
    add_field_flags(mk, dashed(*_OPTIONS, "preset", "workers", "out"))  # ZooConfig's fields, make_zoo's arguments


_OPTIONS = ("arch", "arch_kwargs", "input_shape", "task_kinds", "dataset", "shape", "trees", "children", "depth", "method", "storage", "lora_ranks",
            "task_sampler", "other_datasets", "merges", "merge_dtype", "merge_kinds", "seed")


def _config(args: argparse.Namespace):
    from modelatlas.zoo import ZooConfig, preset

    config = preset(args.preset) if args.preset else ZooConfig()
    overrides = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    if overrides.get("shape") == "star" and "depth" not in overrides:
        overrides["depth"] = 1  # a tree preset's depth is not the user's: a star has depth 1
    kinds = overrides.get("task_kinds", config.task_kinds)
    if "other_datasets" in overrides and "dataset" not in kinds:
        overrides["task_kinds"] = (*kinds, "dataset")
    return preset(args.preset, **overrides) if args.preset else replace(config, **overrides)


def _make(args: argparse.Namespace) -> int:
    import time

    from modelatlas.zoo import make_zoo

    config = _config(args)
    start = time.perf_counter()
    manifest = make_zoo(config, args.out, workers=args.workers, progress=tqdm_progress, resume=not args.no_resume)
    secs = time.perf_counter() - start
    accs = [m.train.get("test_acc", float("nan")) for m in manifest.models]
    methods = {k: sum(m.method == k for m in manifest.models) for k in ("root", "full", "lora", "merge")}
    merges = f", {counted(methods['merge'], 'merge')}" if methods["merge"] else ""
    echo(f"zoo: {counted(len(manifest), 'model')} ({counted(methods['root'], 'root')}, "
         f"{counted(methods['full'], 'full fine-tune')}, {methods['lora']} LoRA{merges}) in {args.out}; "
         f"{how_built(len(manifest.reused), len(manifest))}")
    per = sum(m.train.get("seconds", 0.0) for m in manifest.models) / max(1, len(manifest))
    echo(f"mean test accuracy {sum(accs) / max(1, len(accs)):.3f}; {secs:.1f} s wall this run; "
         f"{per:.2f} s of training per model when it was built (a reused model is not retrained)")
    echo(f"manifest: {manifest.root / 'manifest.json'}")
    return 0


def finished_before(zoo, out: Path) -> int:
    """How many of the zoo's models are already finished in ``out`` (a rerun, or one after Ctrl-C), as make_zoo
    reads them: built from this config (a model of another seed or preset, which make_zoo refuses, was announced
    as 'reusing the zoo') and with their weights intact (a truncated one, which make_zoo trains again, was
    counted as reused)."""
    from modelatlas.errors import ConfigError
    from modelatlas.zoo.builder import fingerprint, finished_model
    from modelatlas.zoo.plan import model_names

    if not out.is_dir():
        return 0
    fp = fingerprint(zoo)
    try:
        return sum(finished_model(out / name, fp) is not None for name in model_names(zoo))
    except ConfigError:  # another config's models: make_zoo refuses them
        return 0


def how_built(reused: int, n: int) -> str:
    """'trained', 'reused (built before)' or 'trained 1 model, reused 5 (built before)'."""
    if reused == 0:
        return "trained"
    if reused >= n:
        return "reused (built before)"
    return f"trained {counted(n - reused, 'model')}, reused {reused} (built before)"


def _json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except RecursionError:  # '[[[...': a traceback
        raise argparse.ArgumentTypeError("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and a 5,000-digit integer (argparse printed the whole value)
        raise argparse.ArgumentTypeError(f"not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def merge_text(merge: dict) -> str:
    """A merge record as a sum, e.g. ``"linear: 0.27 t0.0 + 0.73 t0.1"`` ("" for none); a TIES / DARE merge as
    its models' weights on its base, e.g. ``"ties (density 0.40) on t0: 0.60 t0.0 + 0.30 t0.1"``."""
    if not merge:
        return ""
    from modelatlas.lineage.export import signed_sum

    if "density" in merge:  # no sum: trimmed or dropped task vectors on the base (zoo.merged)
        terms = signed_sum(merge["weights"][1:], merge["parents"][1:])
        return f"{merge['kind']} (density {merge['density']:.2f}) on {merge['parents'][0]}: {terms}"
    return f"{merge.get('kind', 'merge')}: {signed_sum(merge['weights'], merge['parents'])}"


def tree_lines(manifest) -> list[str]:
    """One line per model, indented under its parent: name, method, storage, accuracy, task label."""
    kids: dict[str | None, list] = {}
    for m in manifest.models:
        kids.setdefault(m.parent, []).append(m)
    lines: list[str] = []

    def walk(m, indent: str) -> None:
        acc = m.train.get("test_acc")
        acc_s = f"acc {acc:.2f}" if isinstance(acc, float) else ""
        how = m.method if m.method != "lora" else f"lora r={m.train.get('lora_r')}" + (" adapter" if m.storage == "adapter" else "")
        lines.append(f"{indent}{m.name}  [{how}] {acc_s}  {m.task.get('label', '') or merge_text(m.merge)}")
        for c in kids.get(m.name, []):
            walk(c, indent + "  ")

    for root in kids.get(None, []):
        walk(root, "")
    return lines


def _show(args: argparse.Namespace) -> int:
    from modelatlas.zoo import load_manifest

    manifest = load_manifest(args.dir)
    cfg = manifest.config
    n = len(manifest.merges())
    merges = f" ({counted(n, 'merged model')})" if n else ""
    echo(f"{manifest.root}: {_built(manifest)}{merges}, arch {cfg.get('arch', '?')}, dataset {cfg.get('dataset', '?')}, "
         f"seed {cfg.get('seed', '?')}")
    for line in tree_lines(manifest):
        echo(line)
    return 0


def _built(manifest) -> str:
    """'6 models', or '3 of 21 models (unfinished build)' for a zoo whose build was interrupted."""
    from modelatlas.zoo.plan import planned_names

    planned = planned_names(manifest.config)
    if planned is not None and len(planned) > len(manifest):
        return f"{len(manifest)} of {len(planned)} models (unfinished build: rerun `atlas zoo make` to finish)"
    return counted(len(manifest), "model")


def _verify(args: argparse.Namespace) -> int:
    from modelatlas.zoo import load_manifest
    from modelatlas.zoo.store import compare_digests, config_differences, extra_files, verify_zoo

    manifest = load_manifest(args.dir)
    extra: list[str] = []
    if args.against:
        other = load_manifest(args.against)
        status, good = compare_digests(manifest, other), "same"
        differ = config_differences(manifest.config, other.config)
        if differ:
            echo(f"note: {other.source} was built from another config ({'; '.join(differ[:3])}), "
                 "so its weights are not expected to match")
    else:
        status, good, extra = verify_zoo(manifest), "ok", extra_files(manifest)
    for name, s in status.items():
        if s != good:
            echo(f"{name}: {s}")
    for path in extra:
        echo(f"{path}: extra (not in the manifest)")
    counts = Counter(status.values())  # in order of first appearance
    parts = [f"{n} {s}" for s, n in counts.items()] + ([counted(len(extra), "extra file")] if extra else [])
    echo(f"{manifest.root}: {counted(len(status), 'model')}; " + ", ".join(parts))
    if counts["not built"]:
        echo("the build was interrupted: rerun the same `atlas zoo make` command to finish it")
    return 0 if all(s == good for s in status.values()) and not extra else 1


def _merge(args: argparse.Namespace) -> int:
    from modelatlas.zoo import load_manifest
    from modelatlas.zoo.merge import merge_zoo

    manifest = load_manifest(args.dir)
    merged = merge_zoo(manifest, args.out, progress=tqdm_progress)
    adapters = sum(m.storage == "adapter" for m in manifest.models)
    echo(f"{counted(len(merged), 'model')} written with full weights to {args.out} "
         f"({counted(adapters, 'adapter')} merged onto their parents); manifest: {merged.root / 'manifest.json'}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from modelatlas.zoo import preset, presets

    for name in presets():
        c = preset(name)
        echo(f"{name:20s} {c.arch} on {c.dataset}, {c.shape} {c.trees}x{c.children}x{c.depth} "
             f"({c.n_models} models), method {c.method}, storage {c.storage}, sampler {c.task_sampler}")
    return 0
