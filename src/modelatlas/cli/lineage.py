"""``atlas lineage recover``: recover the lineage forest of a set of models and print it as a tree."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from modelatlas.cli.argtypes import positive_int
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.lineage_files import check_out_files, check_outputs_spare_inputs, out_file, write_outputs
from modelatlas.cli.lineage_paths import expand_paths
from modelatlas.cli.output import counted, echo, note, tqdm_progress, warn
from modelatlas.errors import CheckpointError, ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="recover which model was fine-tuned from which (MoTHer)")
    lsub = p.add_subparsers(dest="lineage_command", metavar="SUBCOMMAND")
    r = lsub.add_parser("recover", help="recover the lineage forest from model weights",
                        description="Recover the directed lineage forest (who was trained from whom) from the "
                                    "weights alone. PATH: model files, model folders, or folders holding many.")
    r.add_argument("paths", nargs="+", metavar="PATH")
    r.add_argument("--out", type=out_file, help="write the forest as JSON (atomically)")
    r.add_argument("--dot", type=out_file, help="write a Graphviz DOT file")
    r.add_argument("--mermaid", type=out_file, help="write a Mermaid graph")
    r.add_argument("--png", type=out_file, help="draw the forest as a PNG image (with --truth: edges coloured "
                                                 "right / reversed / wrong)")
    r.add_argument("--truth", type=Path, metavar="MANIFEST", help="zoo manifest (or zoo folder), or a JSON object {\"model\": \"its parent\" or null}: mark and score edges")
    r.add_argument("--base", metavar="MODEL", help="the base model PEFT adapters among PATH were trained on: each "
                   "adapter is merged onto it (W + dW) and the base joins the models (default: adapters, which "
                   "hold an update and no model, are skipped)")
    add_recovery_options(r)
    r.set_defaults(func=_recover)


def add_recovery_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``lineage recover`` and ``demo``."""
    p.add_argument("--stage", choices=("auto", "specialize", "generalize"), default="auto",
                   help="kurtosis direction: fine-tuning (specialize) or pretraining-like (generalize); "
                        "default: decided from the weights")
    p.add_argument("--trees", type=positive_int, metavar="K", help="number of trees (default: found from the data)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.3, metavar="X",
                   help="direction penalty in units of the mean distance (default 0.3)")
    p.add_argument("--layers", metavar="REGEX", help="compare only tensors whose name matches (default: square matrices)")
    p.add_argument("--distance", choices=("auto", "l2", "rank"), default="auto",
                   help="l2 (full fine-tuning), rank (LoRA) or auto (default: per tree, rank for LoRA trees, "
                        "else nuclear*rank; with --method mother-paper, rank or l2)")
    p.add_argument("--placement", choices=("mst", "joint"), default="mst",
                   help="mst: edges by distance, kurtosis orients them (default); joint: MoTHer's arborescence "
                        "of distance + direction penalty")
    p.add_argument("--method", choices=("atlas", "mother-paper"), default="atlas",
                   help="atlas (default) or the published recipe (needs --trees and --stage)")
    p.add_argument("--no-merges", dest="merges", action="store_false",
                   help="place merged models of others given (linear, task arithmetic, SLERP, TIES, DARE, or "
                        "declared by a mergekit_config.yml) in the trees as models (default: found, and drawn "
                        "beside their parents)")
    add_field_flags(p, RECOVERY_FLAGS)


# LineageConfig's fields that these options set (config_from_args), for errors naming the flag
RECOVERY_FLAGS = {**dashed("method", "stage", "layers", "distance", "placement"), "n_trees": "--trees", "lam": "--lambda",
                  "merges": "--no-merges"}


def config_from_args(args: argparse.Namespace):
    from modelatlas.lineage import LineageConfig

    return LineageConfig(method=args.method, stage=args.stage, n_trees=args.trees, lam=args.lam,
                         layers=args.layers, distance=args.distance, placement=args.placement,
                         merges=args.merges)


def maybe_adapter(path: Path, is_adapter_folder) -> bool:
    """Whether ``path`` is or may be a PEFT adapter: not on disk (a hub id) or unreadable, it cannot be told here."""
    try:
        return not path.exists() or is_adapter_folder(path)
    except OSError:
        return True


def _recover(args: argparse.Namespace) -> int:
    from modelatlas.lineage import LineageRecovery
    from modelatlas.weights.registry import distinct_models

    config = config_from_args(args)
    check_out_files(args)
    truth = _load_truth(args.truth)
    base_path, base = open_base(args.base)  # before the models: their notes came before "--base nope: no such file"
    with nullcontext() if base is None else base:
        models = expand_paths(args.paths, base_path)
        if not models:
            raise ConfigError(f"no models found in {' '.join(args.paths)} (give model files or folders holding them)")
        if base_path is not None:  # the root its adapters hang from, first, kept once if also given
            models = distinct_models([base_path, *models])
        warned = warn_base_without_adapters(models, args.base)  # before the recovery, not after it
        check_outputs_spare_inputs(args, models, truth)
        if truth is not None:  # before the recovery: a manifest of other models would score 0% after minutes
            from modelatlas.lineage.scoring import check_truth
            from modelatlas.lineage.sources import unique_names

            truth = match_truth(truth, models)
            check_truth(unique_names(models), truth)
        est = LineageRecovery(config).fit(models, progress=tqdm_progress, adapter_base=base)
    forest = with_truth(est.forest_, truth)
    show_forest(forest, truth)
    warn_unused_base(forest, args.base, warned)
    write_outputs(args, forest, truth)
    return 0


def open_base(base: str | None):
    """(its model path, the open model) of --base, or (None, None) without one; a wrong one named as --base's.
    The caller closes the model."""
    if base is None:
        return None, None
    from modelatlas.weights import open_adapter_base

    try:
        return open_adapter_base(base)
    except CheckpointError as e:
        raise ConfigError(f"--base {e}") from e


def _load_truth(path: Path | None):
    if path is None:
        return None
    from modelatlas.zoo.manifest import load_truth

    return load_truth(path)


def match_truth(truth, models: list):
    """``truth`` with the given models it holds under another name (another folder, a renamed copy) renamed
    to the names they are shown by; stderr says which."""
    from modelatlas.lineage.sources import unique_names
    from modelatlas.weights.base import same_form
    from modelatlas.zoo.matching import match_models, other_weights

    given = dict(zip(unique_names(models), models))
    found = match_models(truth, given)
    other = other_weights(truth, given)
    for compared in (True, False):
        names = [n for n, c in other.items() if c == compared]
        more = f", ... ({len(names)} in all)" if len(names) > 3 else ""
        what = ("with other weights than it records (another zoo's manifest?)" if compared else
                "with another weights file than the digest it records (another zoo's manifest, or the same model "
                "saved again? the zoo's own file is not there to compare tensors)")
        if names:
            note(f"--truth: {', '.join(names[:3])}{more}: named in the manifest, but {what}; edges are scored by name")
    if found:  # one name spelt NFD and NFC prints alike: say so
        pairs = [f"{new} = {old}" + (" (one name in two Unicode forms)" if same_form(new) == same_form(old) else "")
                 for old, new in sorted(found.items(), key=lambda kv: kv[1])]
        more = f", ... ({len(pairs)} in all)" if len(pairs) > 5 else ""
        note(f"--truth: models found in the manifest under another name: {', '.join(pairs[:5])}{more}")
    return truth.renamed(found) if found else truth


def with_truth(forest, truth):
    """The forest to show against ``truth``: identical copies represented by the model the truth names."""
    if truth is None:
        return forest
    from modelatlas.lineage.scoring import prefer_named_copies

    return prefer_named_copies(forest, truth)


def stage_text(decisions: dict) -> str:
    """The stage as the summary lines say it: "generalize", or where the trees' stages differ
    (``decisions["stage_mixed"]``) "mixed: 2 trees generalize, 1 tree specialize", the more models' first."""
    if not decisions.get("stage_mixed"):
        return str(decisions.get("stage"))
    stages = [t["stage"] for t in decisions.get("stage_trees") or []]
    order = sorted(set(stages), key=lambda s: s != decisions.get("stage"))
    return "mixed: " + ", ".join(f"{counted(stages.count(s), 'tree')} {s}" for s in order)


def warn_stage_guess(forest) -> None:
    """Warn (stderr) when edge directions rest on no evidence of the training stage (found, not given). The
    tree of the adapters' base (--base) is not guessed: it hangs from the base. Time O(N)."""
    d = forest.decisions
    base = (d.get("adapter_base") or {}).get("base")
    rooted = next((set(tree) for tree in forest.trees if base in tree), set())
    # single models and copies: no direction to guess
    directed = any(e.kind == "trained" and e.child not in rooted for e in forest.edges)
    if directed and not d.get("stage_given") and d.get("stage_confidence", 1.0) <= 0.5:
        warn("the weights hold no evidence of the training stage (chains or single models only), so edge "
             "directions are a guess; pass --stage specialize|generalize if you know it")
    elif directed and d.get("stage_from_stand_ins"):  # lineage.stage: too few models read as they are
        warn(f"the training stage of {counted(d['stage_from_stand_ins'], 'tree')} was read from quantized files "
             "whose scales were fitted by least squares (K-quants, files quantized with an importance matrix), "
             "which bias the kurtosis it is read from, so edge directions may be wrong; pass --stage "
             "specialize|generalize if you know it")


def warn_base_without_adapters(models: list[Path], base: str | None) -> bool:
    """Warn (stderr), before the work, when --base was given and no model is a PEFT adapter (a folder with
    adapter_config.json and its weights: the one kind merged onto a base); True when warned. A path not on disk
    (a hub id) cannot be told without resolving it: :func:`warn_unused_base` says it after the recovery.
    Time O(N) file checks."""
    from modelatlas.weights.peft_lora import is_adapter_folder

    if base is None or any(maybe_adapter(Path(m), is_adapter_folder) for m in models):
        return False
    _warn_base(base)
    return True


def warn_unused_base(forest, base: str | None, warned: bool = False) -> None:
    """Warn (stderr) when --base was given but no adapter was merged onto it (the recovery is then the one of
    the base given as a model, which it silently became), unless ``warned`` before the work. Time O(1)."""
    if base is not None and not warned and not forest.decisions.get("adapter_base"):
        # adapters may have been given and left out (another base's: 'update shape ... does not match'): it said
        # 'no PEFT adapter among the models' below their lines
        _warn_base(base, "no PEFT adapter among the models was merged onto it (none was given, or each was left "
                         "out: see above)")


def _warn_base(base: str, why: str = "no PEFT adapter among the models, so none is merged onto it") -> None:
    warn(f"--base {base}: {why}; --base only roots the tree of the adapters merged onto it: it is compared as one "
         "more model")


def _model_notes(forest) -> None:
    """One stderr line per skipped model, per model compared apart from the GGUF files, per quantized model
    whose source is not among the models, per AWQ model read unsmoothed, per merged QLoRA model, per model equal to another on the compared layers only (placed
    beside it, direction unknown), per model with layers the others lack, and per adapter merged onto --base placed in another tree than the base."""
    for name, why in forest.skipped.items():
        note(f"skipped {name}: {' '.join(why.split())}")
    for name, why in (forest.decisions.get("gguf_unmapped") or {}).items():
        note(f"{name}: compared under its own names, apart from the GGUF files: {why}")
    for name, base in (forest.decisions.get("made_from_quantized") or {}).items():
        note(f"{name}: made from {base}'s dequantized weights (its values sit on {base}'s levels: a QLoRA-style "
             f"merge), so {base} is no copy of it, though it rounds to the same codes")
    for name, kind in (forest.decisions.get("quantized_models") or {}).items():
        note(f"{name}: quantized ({kind}), and no model given is the one it was quantized from: placed as a model "
             "of its own that stands in for that one (its rounding taken out of its distances and kurtosis)")
    for name, rel in (forest.decisions.get("awq_unsmoothed") or {}).items():
        note(f"{name}: AWQ-rescaled, compared with its rescaling undone by the factors {rel}'s norms and column "
             "norms give (AWQ divided its norms by them)")
    for name in forest.decisions.get("nf4_merges") or []:
        note(f"{name}: its values sit on the NF4 levels of 64-value blocks (a merged QLoRA model, its NF4 base not "
             "given): its NF4 rounding taken out of its distances and kurtosis, as for a quantized model")
    for name, o in (forest.decisions.get("outside_layers") or {}).items():
        more = f" and {o['n_differing'] - len(o['differs_in'])} more" if o["n_differing"] > len(o["differs_in"]) else ""
        why = ("it has layers the other lacks: added in training, most likely" if f"(only in {name})" in
               " ".join(o["differs_in"]) else "which way it was trained cannot be told from the compared layers; "
               "a --layers pattern that takes in those tensors compares them")
        note(f"{name}: equal to {o['like']} on the compared layers, but differs in {', '.join(o['differs_in'])}"
             f"{more}: placed below it with score 0 ({why})")
    for name, o in (forest.decisions.get("shared_layers") or {}).items():
        more = ", ..." if o["not_compared"] > len(o["examples"]) else ""
        note(f"{name}: has {counted(o['not_compared'], 'layer')} the models it was compared with lack "
             f"({', '.join(o['examples'])}{more}): compared on the {o['compared']} they share")
    _declared_notes(forest.decisions.get("declared_merges") or {})
    given = forest.decisions.get("adapter_base") or {}
    for name in given.get("apart", []):
        note(f"{name}: merged onto {given['base']} (--base), but placed in another tree: --trees split them, or its "
             "update is far larger than the others'")


def _declared_notes(declared: dict) -> None:
    """One stderr line per mergekit_config.yml that placed nothing (lineage.declared): unreadable, or naming
    models not given."""
    for name, rec in declared.items():
        if "problem" in rec:
            note(f"{name}: {rec['file']}: {rec['problem']}")
        else:
            note(f"{name}: mergekit_config.yml declares a {rec['method']} merge of models not all given (not found: "
                 f"{', '.join(rec['not_given'])}): placed as a model")


def _accuracy_text(s) -> str:
    """The edge accuracies of a LineageScore, or that there was no true edge to score (it read "100.0% (0/0)")."""
    if not s.n_true_edges:
        return "directed-edge accuracy: nothing to score (no true edge between the models given)"
    return f"directed-edge accuracy {s.directed:.1%} ({s.n_correct}/{s.n_true_edges}), undirected {s.undirected:.1%}"


def show_forest(forest, truth=None) -> None:
    """Skipped models (stderr), the tree drawing, the decisions and, with ``truth``, the scores."""
    from modelatlas.lineage.export import to_text
    from modelatlas.lineage.scoring import edge_marks, error_notes, score_forest

    _model_notes(forest)
    marks, notes = (edge_marks(forest, truth), error_notes(forest, truth)) if truth is not None else (None, None)
    echo(to_text(forest, marks, notes).rstrip("\n"))
    d = forest.decisions
    known = (d.get("stage_known") or {}).get("pairs")  # descents known (--base, quantized bases) that voted
    voted = f", {counted(known, 'known descent')} among them" if known else ""
    how = "given" if d.get("stage_given") else f"from the weights{voted}, confidence {d['stage_confidence']:.2f}"
    if d.get("stage_mixed"):
        how = f"from the weights{voted}, each tree by its own evidence where it outweighs the others'"
    k_how = "given" if d.get("n_trees_given") else "found from the data"
    if d.get("architectures", 1) > 1:  # trees apart by their layers, not by the data
        k_how += f"; {d['architectures']} architectures, compared apart"
    dups, lowp = d.get("duplicates") or {}, d.get("precision_copies") or {}
    same = f", {len(dups) - len(lowp)} of them identical to another (marked 'identical weights')" if len(dups) > len(lowp) else ""
    same += f", {len(lowp)} a lower-precision copy of another ({', '.join(sorted(set(lowp.values())))})" if lowp else ""
    if d.get("outside_layers"):
        same += f", {len(d['outside_layers'])} equal to another on the compared layers only"
    if d.get("model_merges"):
        n = len(d["model_merges"])
        same += f", {n} of them {'a merge' if n == 1 else 'merges'} of others (each beside its most weighted parent)"
    echo(f"\n{counted(len(forest.nodes), 'model')}{same}, {counted(d['n_trees'], 'tree')} ({k_how}); stage: {stage_text(d)} ({how}); "
         f"distance: {d['distance']}")
    warn_stage_guess(forest)
    if truth is not None:
        _show_scores(score_forest(forest, truth))


def _show_scores(s) -> None:
    """The score lines of a LineageScore (``--truth``)."""
    wrong = ", ".join(f"{n} {k}" for k, n in s.errors.items())
    left = f"; {counted(s.n_left_out, 'true edge')} not scored (a model not given)" if s.n_left_out else ""
    if s.n_bridged:
        left += f", {s.n_bridged} scored to the nearest given ancestor"
    if s.n_skipped:  # 3/4 with every edge drawn marked right, and no word of the fourth
        whose = "its model was" if s.n_skipped == 1 else "their models were"
        left += f"; {counted(s.n_skipped, 'true edge')} missed: {whose} skipped (see above)"
    echo(_accuracy_text(s) + f", tree ARI {s.ari:.3f}" + (f"; wrong edges: {wrong}" if wrong else "")
         + left + (f"; the runner-up parent is the true one for {s.n_runner_up_right} of the {s.n_misplaced} "
                   "misplaced" if s.n_misplaced else ""))
    if s.n_merges or s.n_false_merges:
        echo(f"merges: {s.n_merges_found} of {s.n_merges} found with exactly their parents"
             + (f"; {counted(s.n_false_merges, 'model')} taken for a merge that the truth says is none" if s.n_false_merges else ""))
