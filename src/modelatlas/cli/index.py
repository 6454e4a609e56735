"""``atlas index build | show | search``: an atlas of models (lineage + predicted properties), searchable."""

from __future__ import annotations

import argparse
import shlex
from contextlib import nullcontext
from pathlib import Path

from modelatlas.cli.argtypes import out_path, positive_int
from modelatlas.cli.output import counted, echo, tqdm_progress, warn
from modelatlas.cli.parsers import DashHintParser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build, show and search an atlas of models (lineage + predictions)")
    isub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND", parser_class=DashHintParser)  # a "-v2" query
    b = isub.add_parser("build", help="index models: recover their lineage, predict their training classes",
                        description="Index models into an atlas folder: atlas.json, atlas.html (a viewer) and, "
                                    "with --text-experts, the models' text embeddings for `atlas index search`.")
    b.add_argument("paths", nargs="+", metavar="PATH", help="model files, model folders, or folders holding many")
    b.add_argument("--out", required=True, type=out_path, help="atlas folder to write")
    b.add_argument("--experts", help="ProbeX class experts (`atlas probex train`): predict training classes")
    b.add_argument("--text-experts", help="ProbeX text experts (`atlas probex train --task text`): text search")
    b.add_argument("--base", metavar="MODEL", help="the base model PEFT adapters among PATH were trained on: it "
                   "joins the models, and the lineage merges each adapter onto it (default: adapters are in no tree)")
    from modelatlas.cli.lineage import add_recovery_options

    add_recovery_options(b)
    b.set_defaults(func=_build)
    s = isub.add_parser("show", help="print an atlas's trees with each model's predicted classes")
    s.add_argument("atlas", type=Path, metavar="ATLAS", help="atlas folder (or its atlas.json)")
    s.set_defaults(func=_show)
    q = isub.add_parser("search", help="rank an atlas's models by a free-text query or keywords",
                        description="Rank an atlas's models by a free-text query (an atlas built with --text-experts) "
                                    "or by keywords; exit 1 when no model matches.")
    q.add_argument("query", help="free text or keywords; a query starting with '-' goes after --: atlas index search "
                                 "-- -v2 ATLAS")
    q.add_argument("atlas", type=Path, metavar="ATLAS", help="atlas folder (or its atlas.json)")
    q.add_argument("--top", type=positive_int, default=10, help="models to list (default 10)")
    q.add_argument("--mode", choices=("auto", "text", "keywords"), default="auto",
                   help="text: through the stored text embeddings; keywords: whole words of names, paths, "
                        "predicted classes, descriptions, dtype and tree (not notes; 'tree 3': the members of "
                        "tree 3); auto (default): text when the atlas has embeddings")
    q.add_argument("--text-experts", help="text experts folder, if moved since the atlas was built")
    q.set_defaults(func=_search)


MAX_WARNED = 20  # notes warned by `index build`; `index show` lists every one


def _build(args: argparse.Namespace) -> int:
    from modelatlas.atlas import build_atlas
    from modelatlas.atlas.index import check_atlas_folder
    from modelatlas.cli.lineage import config_from_args, open_base, warn_base_without_adapters
    from modelatlas.cli.lineage_paths import expand_paths
    from modelatlas.errors import ConfigError

    _check_out_name(args.out)
    check_atlas_folder(args.out)  # before the work, not after it
    base_path, base = open_base(args.base)  # before the models' notes, named as --base's; opened once
    with nullcontext() if base is None else base:
        models = expand_paths(args.paths, base_path)
        if not models:
            raise ConfigError(f"no models found in {' '.join(args.paths)} (give model files or folders holding them)")
        warned = warn_base_without_adapters(models, args.base)  # before the work, not after it
        atlas = build_atlas(models, args.experts, args.text_experts, config_from_args(args), tqdm_progress,
                            None if base is None else (base_path, base))
    atlas.save(args.out)
    from modelatlas.lineage.export import copy_formats, copy_text

    drawn = {e.child: copy_text(e, copy_formats(atlas.forest)) for e in atlas.forest.edges}  # a copy's note: the tree below says it
    notes = [f"{m.name}: {note}" for m in atlas.models for note in m.notes if note != drawn.get(m.name)]
    for line in notes[:MAX_WARNED]:
        warn(line)
    if len(notes) > MAX_WARNED:  # 1,000 models outside the experts' trees were 1,000 lines
        warn(f"... and {len(notes) - MAX_WARNED} more notes: `atlas index show {args.out}` lists them all")
    _show_atlas(atlas, notes=False)  # they were just warned
    from modelatlas.cli.lineage import warn_stage_guess, warn_unused_base

    warn_stage_guess(atlas.forest)
    warn_unused_base(atlas.forest, args.base, warned)
    echo(f"atlas written to {args.out} (open {args.out / 'atlas.html'} in a browser)")
    return 0


def _check_out_name(out: Path) -> None:
    """Refuse an --out named as one of the atlas's files (``--out atlas.json``): it became a folder of that name,
    holding atlas.json and atlas.html. An existing atlas folder so named is kept (rebuilt)."""
    from modelatlas.atlas.index import JSON_NAME
    from modelatlas.errors import ConfigError

    if out.suffix.lower() in (".json", ".html", ".htm", ".safetensors") and not (out / JSON_NAME).is_file():
        raise ConfigError(f"--out {out}: --out is the atlas folder, which {JSON_NAME} and atlas.html are written "
                          f"into, not a file; name it {out.with_suffix('')}")


def _show_atlas(atlas, notes: bool = True) -> None:
    """The trees with each model's predictions, then (``notes``) the models in no tree and every model's
    notes, then a summary line."""
    from modelatlas.cli.lineage import stage_text
    from modelatlas.lineage.export import to_text

    labels = {m.name: _what(m) for m in atlas.models if _what(m)}
    echo(to_text(atlas.forest, labels=labels).rstrip("\n"))
    placed = set(atlas.forest.nodes)
    outside = [m for m in atlas.models if m.name not in placed]
    if notes:
        _show_notes(outside, [m for m in atlas.models if m.notes and m.name in placed])
    d, described = atlas.forest.decisions, sum(bool(m.predicted or m.described) for m in atlas.models)
    echo(f"{counted(len(atlas.models), 'model')}, {counted(len(atlas.forest.roots()), 'tree')}"
         + (f" ({len(outside)} in none)" if outside else "") + f"; stage: {stage_text(d)}; "
         f"distance: {d.get('distance')}" + (f"; {described} described by experts" if atlas.experts else ""))


def _show_notes(outside: list, noted: list) -> None:
    """The models left out of every tree, and the notes of the others, one model a line."""
    if outside:
        echo(f"not in any tree ({len(outside)}):")
        for m in outside:
            echo(f"  {m.name}: {'; '.join(m.notes) or 'no reason recorded'}")
    if noted:
        echo(f"notes ({counted(len(noted), 'model')}):")
        for m in noted:
            echo(f"  {m.name}: {'; '.join(m.notes)}")


def _what(m) -> str:
    """What the experts say a model was trained on: its predicted classes (or that its class expert found none
    above 0.5: its note names the most probable), then its best description; "" when no expert saw it. A model
    with both showed only its classes, and a keyword search found it by a description it did not show."""
    from modelatlas.atlas.index import NO_CLASS

    classes = "[" + ", ".join(c for c, _ in m.predicted) + "]" if m.predicted else ""
    classes = classes or (f"[{NO_CLASS}]" if m.expert_tree and m.predicted == [] else "")
    described = f'"{m.described[0][0]}" ({m.described[0][1]:.2f})' if m.described else ""
    return " ".join(t for t in (classes, described) if t)


def _show(args: argparse.Namespace) -> int:
    from modelatlas.atlas import Atlas

    _show_atlas(Atlas.load(args.atlas, embeddings=False))  # needs no embeddings.safetensors
    return 0


def _search(args: argparse.Namespace) -> int:
    from modelatlas.atlas import Atlas, search_atlas
    from modelatlas.atlas.index import shown_value

    _check_order(args.query, args.atlas)
    atlas = Atlas.load(args.atlas, embeddings=args.mode != "keywords")  # keywords with --text-experts: refused
    hits = search_atlas(atlas, args.query, args.top, args.mode, args.text_experts)
    if not hits:
        echo(f"no model matches {shown_value(args.query)}{_as_keywords(atlas, args.mode)}")
        return 1
    for rank, h in enumerate(hits, 1):
        m = atlas.entry(h.name)
        # a model in no tree (unreadable, or skipped by the lineage) is no root: it said "tree None, root"
        where = "in no tree" if m.tree is None else f"tree {m.tree}" + (f", parent {m.parent}" if m.parent else ", root")
        what = "log p(query)" if h.how == "text" else "keyword score"
        said = f"  {_what(m)}" if _what(m) else ""
        echo(f"{rank:3d}. {h.name}  {what} {h.score:.3f}  ({where}){said}")
    return 0


def _as_keywords(atlas, mode: str) -> str:
    """Why a query searched in the default mode found nothing when the atlas has no text embeddings: it was looked
    up as keywords, and a free-text query ("a handwritten seven, upside down") said only 'no model matches'."""
    if mode != "auto" or atlas.embeddings:
        return ""
    if atlas.experts.get("text"):
        return " (searched as keywords: none of this atlas's models is in a tree its text experts were trained on)"
    return " (searched as keywords: this atlas was built without --text-experts, which free-text search needs)"


def _check_order(query: str, atlas: Path) -> None:
    """Refuse QUERY and ATLAS given the other way round (`atlas index search my-atlas t0`): it said 'no atlas
    here' of the query, naming the query's folder and not the order. Two file checks."""
    from modelatlas.atlas.index import JSON_NAME
    from modelatlas.errors import ConfigError

    if not atlas.exists() and (Path(query) / JSON_NAME).is_file():
        raise ConfigError(f"{shlex.quote(str(atlas))} is no atlas, and {shlex.quote(query)} is one: the query comes first "
                          f"(atlas index search {shlex.quote(str(atlas))} {shlex.quote(query)})")
