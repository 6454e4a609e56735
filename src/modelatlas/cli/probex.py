"""``atlas probex train | predict | search``: ProbeX tree experts on model weights."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from modelatlas.cli.argtypes import out_dir, positive_int, seed
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.output import counted, echo, note, say_fresh_start, tqdm_progress, warn
from modelatlas.cli.parsers import DashHintParser

_BASE_HELP = ("the base model PEFT adapters among the models were trained on: each is read merged onto it, as "
              "`atlas index build --base` reads them (default: the base an atlas given was built with, else an "
              "adapter's update B A alone)")
MAX_WARNED = 20  # models skipped by `search` warned one a line, as `atlas index build` warns its notes
MIN_MODELS = 10  # modelatlas.probex.experts.MIN_MODELS, not imported: that would load torch for `--help`


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probex", help="learn on weights: what was a model trained on, text search over models")
    psub = p.add_subparsers(dest="probex_command", metavar="SUBCOMMAND", parser_class=DashHintParser)  # a "-v2" query
    t = psub.add_parser("train", help="train one ProbeX expert per model tree of a zoo, and a tree router",
                        description="Train one ProbeX expert per model tree of a zoo (trees with at least "
                                    f"{MIN_MODELS} labelled fine-tuned models; smaller trees are left out), "
                                    "and a router that sends a model to its tree's expert.")
    t.add_argument("manifest", metavar="ZOO_MANIFEST", help="zoo folder or its manifest.json, or a manifest written "
                   "by hand for models of your own (docs/probex.md)")
    t.add_argument("--task", choices=["classes", "text"], default="classes",
                   help="classes (default): predict the training-class set; text: align weights with the class "
                        "prompts")
    t.add_argument("--layer", default="auto", help="weight tensor name, or 'auto' (default: the best on validation)")
    t.add_argument("--out", default="probex_experts", type=out_dir, help="experts folder: new, empty or an experts folder "
                                                           "(default: probex_experts)")
    t.add_argument("--epochs", type=positive_int, default=100, help="training epochs per expert (default: 100)")
    t.add_argument("--rank", type=positive_int, default=32, help="r_U = r_V = r_T (default: 32; the paper used 128)")
    t.add_argument("--seed", type=seed, default=0, help="seed of the split, initialisation and batches (default: 0)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in --out (same settings; a larger --epochs trains on)")
    t.set_defaults(func=_train, interrupt_hint=_train_interrupted)
    add_field_flags(t, {**dashed("epochs", "seed", "task", "layer"), "rank_u": "--rank", "rank_v": "--rank",
                        "rank_t": "--rank"})  # task, layer: settings a refused --resume names
    _register_predict_search(psub)


def _register_predict_search(psub: argparse._SubParsersAction) -> None:
    pr = psub.add_parser("predict", help="predict each model's training classes with its tree's expert",
                         description="Predict each model's training classes with its tree's expert: one line per "
                                     "model, the classes above probability 0.5, most likely first (text experts: the "
                                     "best-matching seen prompts). Exit 1 when no model got a prediction.")
    pr.add_argument("models", nargs="+", metavar="MODEL",
                    help="model files, folders of models, a zoo manifest or an atlas folder")
    pr.add_argument("--experts", required=True, help="folder written by `atlas probex train`")
    pr.add_argument("--top", type=positive_int, default=10, help="most classes to show per model (default 10); class experts "
                    "show only those above probability 0.5")
    pr.add_argument("--base", metavar="MODEL", help=_BASE_HELP)
    pr.set_defaults(func=_predict)
    s = psub.add_parser("search", help="rank models by a free-text query (experts trained with --task text)",
                        description="Rank models by a free-text query through their trees' text experts (`atlas "
                                    "probex train --task text`): best first, each with log p(query) and the seen "
                                    "prompt it matches best.")
    s.add_argument("query", help='e.g. "a handwritten seven, upside down"')
    s.add_argument("models", nargs="+", metavar="MODELS_OR_INDEX",
                   help="model files, folders of models, a zoo manifest or an atlas folder (its models are read)")
    s.add_argument("--experts", required=True, help="folder written by `atlas probex train --task text`")
    s.add_argument("--top", type=positive_int, default=10, help="models to list (default 10)")
    s.add_argument("--base", metavar="MODEL", help=_BASE_HELP)
    s.set_defaults(func=_search)


def _train_interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C of `probex train` kept. A retrain without --resume into an experts folder, stopped before
    it saved a training state (during --layer auto, say), kept only the earlier run's files, which --resume
    would continue or refuse: it said 'progress is kept ...; rerun with --resume' all the same."""
    out = Path(args.out)
    started = getattr(args, "started", None)
    saved = [p for p in (out / "checkpoints").glob("*/train_state.json")
             if started is None or p.stat().st_mtime >= started - 2.0]  # coarse file clocks: 1 s on some
    if not saved and not args.resume:
        return f"stopped before this run saved anything in {out}: run the command again, without --resume"
    return f"progress is kept in {out}; rerun with --resume to continue"


def _train(args: argparse.Namespace) -> int:
    from modelatlas.probex import ProbeXConfig
    from modelatlas.probex.experts import train_tree_experts

    args.started = time.time()  # a training state written from now on is this run's

    cfg = ProbeXConfig(rank_u=args.rank, rank_v=args.rank, rank_t=args.rank, epochs=args.epochs, seed=args.seed,
                       lr=1e-3 if args.task == "classes" else 2e-3)
    _check_labelled(Path(args.manifest))
    say_fresh_start(args.resume, args.out)
    report = train_tree_experts(args.manifest, args.out, args.task, args.layer, cfg, tqdm_progress, args.resume)
    metric = "per-label accuracy" if args.task == "classes" else "top-1 accuracy"  # it said "validation 0.967"
    for name, score in report.layer_scores.items():
        echo(f"layer {name}: validation {metric} {score:.3f}")
    echo(f"layer: {report.layer}")
    for tree, info in report.trees.items():
        echo(f"tree {tree}: {info['models']} models, validation {metric} {info['val_score']:.3f}, "
             f"{info['parameters']:,} parameters")
    for tree, n in report.left_out.items():
        echo(f"tree {tree}: {counted(n, 'labelled model')}, fewer than {MIN_MODELS}: no expert")
    echo(f"experts saved to {args.out}")
    return 0


def _check_labelled(given: Path) -> None:
    """Refuse a folder of models with no manifest.json (one's own checkpoints), naming how to label them: it was
    told 'no such manifest (...; build one with `atlas zoo make`)', which trains a synthetic zoo. A model folder
    or a folder inside a zoo is left to the manifest's own errors. O(files in the folder)."""
    from modelatlas.errors import AtlasError, ConfigError
    from modelatlas.weights import discover_models

    if not given.is_dir() or (given / "manifest.json").exists() or (given.parent / "manifest.json").exists():
        return
    try:
        found = [p for p in discover_models([given]) if p != given]  # a model folder is itself, not a folder of models
    except AtlasError:
        return
    if found:
        raise ConfigError(f"{given}: {counted(len(found), 'model')} but no manifest.json, which `atlas probex train` "
                          "learns from (each model's parent, tree and training classes); write one by hand as "
                          "docs/probex.md shows (\"Your own models and labels\"), or build a zoo with `atlas zoo make`")


def _model_paths(items: list[str]) -> tuple[list[Path], set[str]]:
    """Model files and folders of models as they are; a zoo (manifest.json, or a JSON file of another name
    that is a zoo manifest by its own word, as `probex train` takes) or an atlas (atlas.json, folder
    or file) stands for the models it lists. A model reached twice (a zoo and one of its models, a model folder
    and its model.safetensors) is kept once, where it first appears, as `atlas index build` keeps it: it was
    listed twice, taking two of the --top places. A path that is no model is skipped with a note, as
    `atlas index build` skips it, unless it is the only one; a file of an atlas (atlas.html) is refused, naming
    the atlas folder to give. Also returns the --base the atlases given
    were built with (their ``adapter_base``)."""
    from modelatlas.cli.lineage_paths import discover_or_skip
    from modelatlas.errors import ConfigError
    from modelatlas.weights.registry import distinct_models
    from modelatlas.zoo.manifest import is_zoo_manifest, load_manifest

    paths: list[Path] = []
    bases: set[str] = set()
    for item in items:
        p = Path(item)  # a folder with another program's manifest.json beside its weights is a model folder
        if (p.name == "manifest.json" or (p.is_dir() and is_zoo_manifest(p / "manifest.json"))
                or (p.suffix == ".json" and p.is_file() and is_zoo_manifest(p))):  # labels.json: train took it
            m = load_manifest(p)
            paths.extend(_present([m.root / r.path for r in m.models], m.source or p,
                                  f"; `atlas zoo verify {p}` lists what is missing"))
            if p.is_dir():
                _note_unlisted(p, [m.root / r.path for r in m.models])
        elif p.is_file() and p.name != "atlas.json" and (p.parent / "atlas.json").is_file():
            raise ConfigError(f"{p}: a file of the atlas {p.parent}, not a model; give the atlas folder {p.parent} "
                              "(the models it lists are read)")  # atlas.html: it said "unknown checkpoint format"
        elif p.name == "atlas.json" or (p.is_dir() and (p / "atlas.json").exists()):
            from modelatlas.atlas import Atlas

            atlas = Atlas.load(p, embeddings=False)
            paths.extend(_present([Path(m.path) for m in atlas.models], p, "; rebuild the atlas", hub_ids=True))
            bases.update([atlas.adapter_base] if atlas.adapter_base else [])
        else:
            paths.extend(discover_or_skip(p, alone=len(items) == 1))
    return distinct_models(paths), bases


def _present(listed: list[Path], source: Path, fix: str, hub_ids: bool = False) -> list[Path]:
    """The models a zoo manifest or an atlas (``source``) lists that are there; each local one missing is noted on
    stderr as skipped: it was read as a hub id, "not in the local Hugging Face cache ... `huggingface-cli
    download tinyd/t0.1`". With ``hub_ids`` (an atlas's), relative paths are hub ids, kept to be read from the cache."""
    gone = [p for p in listed if not p.exists() and (p.is_absolute() or not hub_ids)]
    for p in gone:
        note(f"skipped: {p}: listed in {source}, but not there (moved or deleted{fix})")
    return [p for p in listed if p not in gone]


def _note_unlisted(folder: Path, listed: list[Path]) -> None:
    """On stderr, the models in the zoo folder ``folder`` its manifest does not list: a model of one's own
    dropped beside the models of a hand-written manifest was read by `atlas index build FOLDER` and left
    out by predict and search without a word. O(files in the folder)."""
    from modelatlas.errors import AtlasError
    from modelatlas.weights import discover_models
    from modelatlas.weights.registry import distinct_models

    try:
        found = discover_models([folder])
    except AtlasError:
        return  # the listed models' own errors say it
    known = distinct_models(listed)
    unlisted = distinct_models(known + found)[len(known):]  # those after the listed ones: not among them
    if unlisted:
        shown = ", ".join(p.name for p in unlisted[:3]) + (", ..." if len(unlisted) > 3 else "")
        note(f"note: {counted(len(unlisted), 'model')} in {folder} not in its manifest, not read ({shown}): "
             "give them as paths of their own, or add them to the manifest")


def _read(experts, args: argparse.Namespace):
    """``experts.read`` of the models given, each adapter merged onto ``--base``, or else the base the
    atlases given were built with. A zoo stored as adapters on their parents gets a note: `atlas zoo merge`."""
    from modelatlas.cli.lineage_paths import note_zoo_adapters
    from modelatlas.errors import CheckpointError, ConfigError
    from modelatlas.weights.peft_lora import open_adapter_base

    paths, recorded = _model_paths(args.models)
    if not paths:  # it said "no models given" of the folder given, as `atlas index build` does not
        raise ConfigError(f"no models found in {' '.join(args.models)} (give model files, folders holding them, a "
                          "zoo manifest or an atlas)")
    if args.base is not None:
        _warn_base_unused(paths, args.base)
    if args.base is None and len(recorded) > 1:
        raise ConfigError(f"the atlases given were built with different --base ({', '.join(sorted(recorded))}); "
                          "give them one at a time, or pass --base")
    where = args.base or next(iter(recorded), None)
    if where is None:
        note_zoo_adapters(paths)
        return experts.read(paths, tqdm_progress)
    try:
        base = open_adapter_base(where)[1]
    except CheckpointError as e:
        raise ConfigError(f"--base {e}" if args.base else f"the atlas's base {e}; pass --base") from e
    note_zoo_adapters(paths, where)  # after the base's own error, if any
    with base:
        return experts.read(paths, tqdm_progress, adapter_base=base)


def _warn_base_unused(paths: list[Path], base: str) -> None:
    """Warn (stderr) when --base was given and no model is a PEFT adapter: nothing is merged onto it, and it
    said nothing, as if it had been used (`atlas index build --base` warns so). O(N) file checks."""
    from modelatlas.cli.lineage import maybe_adapter
    from modelatlas.weights.peft_lora import is_adapter_folder

    if not any(maybe_adapter(p, is_adapter_folder) for p in paths):
        warn(f"--base {base}: no PEFT adapter among the models, so none is merged onto it; the models are read as "
             "they are")


def _predict(args: argparse.Namespace) -> int:
    from modelatlas.probex.experts import TreeExperts

    experts = TreeExperts.load(args.experts)
    if experts.task != "classes":
        warn(f"{args.experts} holds text experts; showing the best-matching seen class prompts")
    x, routes = _read(experts, args)
    unknown = 0
    for i, r in enumerate(routes):
        if not r.known:
            echo(f"{r.message()}; no prediction")
            unknown += 1
            continue
        expert = experts.experts[r.tree]
        probs = expert.predict_proba(x[i:i + 1])[0]
        order = probs.argsort()[::-1][: args.top]
        shown = ", ".join(f"{expert.classes_[k]} ({probs[k]:.2f})" for k in order
                          if experts.task != "classes" or probs[k] > 0.5)
        echo(f"{r.name} [tree {r.tree}]: {shown or 'no class above 0.5'}")
    return 1 if unknown == len(routes) else 0


def _unranked(routes, experts) -> str:
    """Why none of ``routes`` can be ranked: models that could not be read (or lack the layer) are not models
    "in no tree", which sent users looking at the wrong cause."""
    unread = sum(r.reason is not None for r in routes)
    trees = f"a tree that the experts in {experts.folder} were trained on"
    if not unread:
        return f"none in {trees}"
    why = f"{unread} not routed (unreadable, or no {experts.layer} of the experts' shape)"
    return why + (f", the other {len(routes) - unread} in no {trees[2:]}" if unread < len(routes) else "")


def _best_prompt(experts, x, routes, i: int) -> str:
    """What model ``i``'s text expert takes it for: its best-matching seen prompt with the probability, as `atlas
    index search` shows it (a hit gave a name and a score only). One expert forward pass."""
    expert = experts.experts[routes[i].tree]
    probs = expert.predict_proba(x[i:i + 1])[0]
    k = int(probs.argmax())
    return f'"{expert.classes_[k]}" ({probs[k]:.2f})'


def _search(args: argparse.Namespace) -> int:
    from modelatlas.atlas.search import check_query
    from modelatlas.errors import ConfigError
    from modelatlas.probex.experts import TreeExperts
    from modelatlas.probex.text_encoder import encode_texts

    check_query(args.query)  # as `atlas index search`: before any expert or weight is read
    experts = TreeExperts.load(args.experts)
    if experts.task != "text":
        raise ConfigError(f"{args.experts}: experts were trained with --task {experts.task}; search needs --task text")
    x, routes = _read(experts, args)
    scores = experts.search_scores(x, routes, encode_texts([args.query]))
    skipped = [r for r in routes if not r.known]
    for r in skipped[:MAX_WARNED]:
        warn(f"{r.message()}; skipped")
    if len(skipped) > MAX_WARNED:  # 1,000 models of another architecture were 1,000 lines above the results
        warn(f"... and {len(skipped) - MAX_WARNED} more models skipped (`atlas probex predict` with these models "
             "and experts names each)")
    if not any(r.known for r in routes):
        raise ConfigError(f"no model to rank: {counted(len(routes), 'model')} given, {_unranked(routes, experts)} "
                          "(see the warnings above)")
    order = [i for i in scores.argsort()[::-1] if routes[i].known][: args.top]
    for rank, i in enumerate(order, 1):
        echo(f"{rank:3d}. {routes[i].name}  log p(query) {scores[i]:.3f}  {_best_prompt(experts, x, routes, i)}")
    return 0
