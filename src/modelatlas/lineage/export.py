"""Forest export: Graphviz DOT and Mermaid text, and the terminal tree drawing (unicode tree lines).

Pure functions returning strings; the CLI writes them (atomically) or prints them. With ``marks``
(from :func:`modelatlas.lineage.scoring.edge_marks`) each edge is marked right (green / ✓), wrong
(red / ✗) or unknown (gray / ? (not in truth): a model the truth does not name); ``notes`` (edge -> text,
e.g. the error kind from :func:`modelatlas.lineage.scoring.edge_errors`) is shown beside the mark.
Time O(N + E).
"""

from __future__ import annotations

from modelatlas.lineage.forest import Forest
from modelatlas.lineage.runner_up import CLOSE

_COLORS = {"right": "darkgreen", "reversed": "orange", "wrong": "red", "unknown": "gray"}
_SYMBOLS = {"right": "✓", "reversed": "✗ (reversed)", "wrong": "✗", "unknown": "? (not in truth)"}
_COPY = {"duplicate": "identical", "precision": "lower precision", "merge": "merge"}  # edges that are no training step
_COPY_TEXT = {"duplicate": "identical weights to", "precision": "lower-precision copy of"}


BEHIND = "rounding of the model behind"  # a rounding of the model another rounding was made from too


def copy_text(edge, formats: dict | None = None) -> str:
    """How a copy or merge edge reads ("identical weights to NAME"; a merge by its parents and weights, from
    :func:`copy_formats`: "merge: 0.50 a + 0.50 b"; a lower-precision copy by its format, from a
    forest's ``decisions["precision_copies"]`` given as ``formats``: "q8_0 copy of NAME", "float16 copy of
    NAME"; "lower-precision copy of NAME" without it; a format ending in :data:`BEHIND`, a rounding of the
    model behind NAME: "q4_0 rounding of the model behind NAME"); "" for a training step. The tree drawing
    and the atlas's notes say it the same way."""
    if edge.kind == "merge":
        return (formats or {}).get(edge.child) or f"merge of {edge.parent} and others"
    fmt = (formats or {}).get(edge.child) if edge.kind == "precision" else None
    if fmt:
        return f"{fmt} {edge.parent}" if fmt.endswith(BEHIND) else f"{fmt} copy of {edge.parent}"
    return f"{_COPY_TEXT[edge.kind]} {edge.parent}" if edge.kind in _COPY_TEXT else ""


def copy_formats(forest) -> dict:
    """Each lower-precision copy's format (``decisions["precision_copies"]``), for :func:`copy_text`; a
    rounding of the same model as another (``decisions["same_model_roundings"]``) says so."""
    formats = dict(forest.decisions.get("precision_copies") or {})
    for name in forest.decisions.get("same_model_roundings") or {}:
        formats[name] = f"{formats.get(name, 'lower-precision')} {BEHIND}"
    for name, record in (forest.decisions.get("model_merges") or {}).items():
        formats[name] = merge_text(record)
    return formats


def merge_text(record: dict) -> str:
    """"merge: 0.50 a + 0.50 b" of a merge's record (``decisions["model_merges"]``, :mod:`.merges`); with a weight
    per layer, "merge per layer: 0.20-0.80 a + 0.20-0.80 b"; declared by its folder only, "ties merge of p, a, b
    (mergekit_config.yml)"; found from its values (:mod:`.sparse_merges`), "ties merge of p, a, b (base first;
    from its values)"."""
    terms = list(zip(record.get("weights") or [], record.get("parents", [])))
    if not terms and record.get("kind"):  # a TIES / DARE merge found from its values (lineage.sparse_merges)
        return f"{record['kind']} merge of {', '.join(record.get('parents', []))} (base first; from its values)"
    if not terms and record.get("declared"):  # a TIES / DARE ... merge its folder declares (lineage.declared)
        return f"{record['declared']} merge of {', '.join(record.get('parents', []))} (mergekit_config.yml)"
    if not terms:
        return "merge"
    t = record.get("per_layer") or []
    if t and len(terms) == 2:
        lo, hi = min(t), max(t)
        return f"merge per layer: {lo:.2f}-{hi:.2f} {terms[0][1]} + {1 - hi:.2f}-{1 - lo:.2f} {terms[1][1]}"
    return "merge: " + signed_sum([w for w, _ in terms], [name for _, name in terms])


def signed_sum(weights: list[float], names: list[str]) -> str:
    """"0.50 a + 0.50 b", "-0.60 p + 0.80 a - 0.10 b": a weighted sum of models as text."""
    text = f"{weights[0]:.2f} {names[0]}"
    return text + "".join(f" {'-' if w < 0 else '+'} {abs(w):.2f} {n}" for w, n in zip(weights[1:], names[1:]))


def _q(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(forest: Forest, marks: dict | None = None) -> str:
    """Graphviz ``digraph``: one node per model, edges labelled with their confidence score."""
    lines = ["digraph lineage {", "  rankdir=TB;", "  node [shape=box, fontname=Helvetica];"]
    for n in forest.nodes:
        lines.append(f"  {_q(n)};")
    for e in forest.edges:
        attrs = [f'label="{_COPY[e.kind]}", style=dashed'] if e.kind in _COPY else [f'label="{e.score:.2f}"']
        mark = (marks or {}).get((e.parent, e.child))
        if mark:
            attrs.append(f"color={_COLORS[mark]}")
        lines.append(f"  {_q(e.parent)} -> {_q(e.child)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _tag(edge: tuple[str, str], marks: dict | None, notes: dict | None, sep: str = " ") -> str:
    mark = (marks or {}).get(edge)
    note = (notes or {}).get(edge)
    if not mark:
        return ""
    return f"{sep}{_SYMBOLS[mark]}" + (f" ({note})" if note and mark == "wrong" else "")


def _mq(text: str) -> str:
    """A quoted Mermaid label: parentheses, ``|`` and ``;`` inside quotes are text, not syntax. Mermaid's
    entity codes stand for the marks that would end the quote or be read as HTML (``"`` ``<`` ``>`` ``&``),
    and ``#`` itself is escaped first so that a name holding ``#quot;`` stays that text."""
    for mark, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("&", "#amp;")):
        text = text.replace(mark, code)
    return '"' + text + '"'


def to_mermaid(forest: Forest, marks: dict | None = None, notes: dict | None = None) -> str:
    """Mermaid ``graph TD`` (renders in GitHub Markdown); node ids are n0, n1, ... labelled by name. Node and
    edge labels are quoted (an unquoted ``✗ (sibling; ...)`` is a Mermaid syntax error)."""
    ids = {n: f"n{i}" for i, n in enumerate(forest.nodes)}
    lines = ["graph TD"]
    for n in forest.nodes:
        lines.append(f"  {ids[n]}[{_mq(n)}]")
    styles = []
    for i, e in enumerate(forest.edges):
        mark = (marks or {}).get((e.parent, e.child))
        tag = _tag((e.parent, e.child), marks, notes)
        arrow = f"-.->|{_mq(_COPY[e.kind] + tag)}|" if e.kind in _COPY else f"-->|{_mq(f'{e.score:.2f}{tag}')}|"
        lines.append(f"  {ids[e.parent]} {arrow} {ids[e.child]}")
        if mark:
            styles.append(f"  linkStyle {i} stroke:{_COLORS[mark]}")
    return "\n".join(lines + styles) + "\n"


def to_text(forest: Forest, marks: dict | None = None, notes: dict | None = None,
            labels: dict[str, str] | None = None) -> str:
    """The forest drawn with unicode tree lines, each edge with its score and a close runner-up parent
    (:func:`runner_up_note`) (and ✓/✗ with ``marks``, plus its ``notes`` on wrong edges); ``labels`` (model -> text, e.g. predicted classes) is shown after a model.
    Levels deeper than :data:`MAX_INDENT` (a long chain of checkpoints) keep that indentation and show
    their depth, so that lines stay short and no recursion limit is reached."""
    kids = forest.children()
    out = []
    for t, root in enumerate(forest.roots()):
        tree = tree_heading(forest, root)
        head = f"  [tree {t + 1}, {tree[0]} model{'s' * (tree[0] != 1)}{tree[1]}]" if tree else ""
        out.append(f"{root}{head}{_label(root, labels)}")
        _draw(root, kids, (marks, notes, labels, copy_formats(forest)), out)
    # one model a line: a newline in a name (a file may be named so) split its line in two
    return "\n".join(line.replace("\n", "\\n") for line in out) + "\n"


ROOT_DOUBT = 0.75  # below it the runner-up root is named (on 117 benchmark trees every wrong root was below)


def tree_heading(forest: Forest, root: str) -> tuple[int, str] | None:
    """(size, note) of the tree whose root is ``root``, the note being its stage where the trees' stages differ
    ("; stage specialize 0.92"), then "; root confidence 0.93" and the next best root when the confidence is
    below :data:`ROOT_DOUBT`; None when the forest lists no such tree."""
    k = next((i for i, tree in enumerate(forest.trees) if root in tree), None)
    return None if k is None else (len(forest.trees[k]), _stage_note(forest.decisions, k) + _root_note(forest.decisions, k))


def _stage_note(decisions: dict, k: int) -> str:
    """"; stage specialize 0.92" (tree k's stage and its confidence) when the trees' stages differ
    (``decisions["stage_mixed"]``, :mod:`modelatlas.lineage.stage`); "" when one stage holds for all (the
    summary line says it)."""
    trees = decisions.get("stage_trees") or []
    if not decisions.get("stage_mixed") or k >= len(trees):
        return ""
    return f"; stage {trees[k]['stage']} {trees[k]['confidence']:.2f}"


def _root_note(decisions: dict, k: int) -> str:
    conf, runner = decisions.get("root_confidence") or [], decisions.get("root_runner_up") or []
    if k >= len(conf):
        return ""  # a joint placement, or a forest saved before root confidences
    note = f"; root confidence {conf[k]:.2f}"
    shown = conf[k] < ROOT_DOUBT and k < len(runner) and runner[k] is not None
    return note + (f", next best root {runner[k]}" if shown else "")


MAX_INDENT = 24


def _label(node: str, labels: dict | None) -> str:
    text = (labels or {}).get(node)
    return f"  {text}" if text else ""


def _draw(root: str, kids: dict, tags: tuple, out: list[str]) -> None:
    """Draw ``root``'s subtree depth-first with an explicit stack; ``tags`` = (marks, notes, labels, the copies'
    formats)."""
    stack = _pushed([], kids.get(root, []), "", 1)
    while stack:
        e, prefix, last, depth = stack.pop()
        tag = _tag((e.parent, e.child), *tags[:2], sep="  ")
        what = f"({copy_text(e, tags[3])})" if e.kind in _COPY else f"({e.score:.2f}{runner_up_note(e)})"
        deep = f"[depth {depth}] " if depth > MAX_INDENT else ""
        out.append(f"{prefix}{'└── ' if last else '├── '}{deep}{e.child}  {what}{tag}{_label(e.child, tags[2])}")
        inner = prefix + ("    " if last else "│   ") if depth < MAX_INDENT else prefix
        _pushed(stack, kids.get(e.child, []), inner, depth + 1)


def runner_up_note(edge) -> str:
    """"; or from t0, 3% farther" when the edge's runner-up parent is within :data:`~.runner_up.CLOSE` of its
    parent (a close call: where placement errs, the runner-up is mostly the true parent), else ""."""
    r = edge.runner_up_ratio
    if edge.runner_up is None or not r <= CLOSE:
        return ""
    pct = (r - 1) * 100
    return f"; or from {edge.runner_up}, {pct:.{1 if pct < 1 else 0}f}% farther"


def _pushed(stack: list, edges: list, prefix: str, depth: int) -> list:
    """Push ``edges`` so that the first is popped first; returns ``stack``."""
    for i in range(len(edges) - 1, -1, -1):
        stack.append((edges[i], prefix, i == len(edges) - 1, depth))
    return stack
