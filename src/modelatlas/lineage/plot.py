"""A picture of a recovered forest (``atlas lineage recover --png``): each tree drawn top-down, root first,
one arrow per edge from parent to child.

With ``marks`` (from :func:`modelatlas.lineage.scoring.edge_marks`) the arrows are coloured as in the DOT
export: right (green), reversed (orange), wrong (red), not in the truth (gray); without them, by the edge's
confidence score (darker = surer). Copies (identical weights, a lower-precision save) are dashed, a merged
model's arrow from its most weighted parent dotted and labelled "merge". Model names
are written when there are few enough to read (:data:`MAX_LABELS`); larger forests keep the shape only.

Pure: returns PNG bytes (the CLI writes them atomically). Layout O(N + E), iterative, so a chain of
thousands of checkpoints needs no recursion; drawing O(N + E): one arrow artist per edge up to
:data:`MAX_ARROWS` edges, one line collection above.
"""

from __future__ import annotations

import math

from modelatlas.figures import new_figure, png_bytes
from modelatlas.lineage.export import _COLORS
from modelatlas.lineage.forest import COPY_KINDS, Forest

MAX_LABELS = 150  # above this many models, names would overlap: draw the shape only
MAX_SCORES = 40  # edge scores are written beside the arrows up to this many edges
MAX_ARROWS = 400  # above this many edges, plain segments (the parent is the upper end) instead of arrows


def tree_layout(forest: Forest) -> dict[str, tuple[float, int]]:
    """``(x, depth)`` of every node: leaves at consecutive x in depth-first order (children sorted by name),
    a parent centred over its first and last child, trees side by side with a gap of one leaf.
    A node on a cycle (a hand-edited forest) has no root above it and is placed alone at the end."""
    children: dict[str, list[str]] = {n: [] for n in forest.nodes}
    has_parent = set()
    for e in forest.edges:
        children.setdefault(e.parent, []).append(e.child)
        has_parent.add(e.child)
    pos: dict[str, tuple[float, int]] = {}
    seen: set[str] = set()
    next_x = 0.0
    for root in [n for n in forest.nodes if n not in has_parent] + list(forest.nodes):
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, 0, [])]
        while stack:  # post-order without recursion: children are placed before their parent
            node, depth, kids = stack.pop()
            if not kids:
                kids = [k for k in sorted(children.get(node, [])) if k not in seen]
                if kids:  # first visit: come back to this node after its children
                    seen.update(kids)
                    stack.append((node, depth, kids))
                    stack.extend((k, depth + 1, []) for k in reversed(kids))
                    continue
                pos[node], next_x = (next_x, depth), next_x + 1  # a leaf
            else:
                pos[node] = ((pos[kids[0]][0] + pos[kids[-1]][0]) / 2, depth)
        next_x += 1  # a gap between trees
    return pos


def _edge_style(edge, marks: dict | None) -> tuple[str, str]:
    """(colour, line style) of one arrow."""
    style = "--" if edge.kind in COPY_KINDS else ":" if edge.kind == "merge" else "-"  # a merge: to one parent of several
    mark = (marks or {}).get((edge.parent, edge.child))
    if mark:
        return _COLORS[mark], style
    score = float(edge.score) if math.isfinite(edge.score) else 0.0  # a NaN from a hand-edited file: light
    shade = 0.75 - 0.6 * min(max(score, 0.0), 1.0)  # score 1 -> dark gray, score 0 -> light gray
    return str(round(shade, 3)), style


def _figsize(pos: dict[str, tuple[float, int]]) -> tuple[float, float]:
    """Inches: about 0.45 per leaf column and 1 per level, within [4, 40] x [2.5, 30]."""
    width = max((x for x, _ in pos.values()), default=0) + 1
    depth = max((d for _, d in pos.values()), default=0) + 1
    return min(max(4.0, 0.45 * width + 1), 40.0), min(max(2.5, 1.0 * depth + 1), 30.0)


def _label_nodes(ax, pos: dict[str, tuple[float, int]], parents: set[str]) -> None:
    """Names: a leaf's below it, a parent's to its right (above and below it run the arrows). A name is
    plain text: matplotlib would read '$...$' in it as mathtext, and fail on 'run$\\frac$' when drawing."""
    turn = 30 if len(pos) > 30 else 0
    for name, (x, d) in pos.items():
        if name in parents:
            ax.text(x + 0.1, -d, name, fontsize=6, ha="left", va="center", rotation=turn,
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5}, parse_math=False)
        else:
            ax.text(x, -d - 0.12, name, fontsize=6, ha="center", va="top", rotation=turn, parse_math=False)


def _legend(ax, shown: set[str]) -> None:
    from matplotlib.lines import Line2D

    names = {"right": "right", "reversed": "reversed", "wrong": "wrong", "unknown": "not in truth"}
    handles = [Line2D([], [], color=_COLORS[m], label=names[m]) for m in names if m in shown]
    ax.legend(handles=handles, fontsize=6, loc="upper right", frameon=False)


def _arrows(ax, forest: Forest, pos: dict, marks: dict | None) -> None:
    """One arrow per edge, with its score up to MAX_SCORES edges."""
    for e in forest.edges:
        (x0, y0), (x1, y1) = pos[e.parent], pos[e.child]
        color, style = _edge_style(e, marks)
        ax.annotate("", xy=(x1, -y1), xytext=(x0, -y0), arrowprops={
            "arrowstyle": "-|>", "color": color, "linestyle": style, "shrinkA": 5, "shrinkB": 5, "lw": 1.2})
        if len(forest.edges) <= MAX_SCORES and e.kind not in COPY_KINDS:
            said = "merge" if e.kind == "merge" else f"{e.score:.2f}"
            ax.text(0.4 * x0 + 0.6 * x1, -(0.4 * y0 + 0.6 * y1), said, fontsize=6, color="dimgray",
                    ha="center", va="center", bbox={"fc": "white", "ec": "none", "pad": 0.5})


def _lines(ax, forest: Forest, pos: dict, marks: dict | None) -> None:
    """Every edge as a segment of one LineCollection (an arrow artist each cost ~3 ms: 12 s at 5,000 models);
    the parent is always the upper end, so the direction still reads."""
    from matplotlib.collections import LineCollection

    segments = [[(pos[e.parent][0], -pos[e.parent][1]), (pos[e.child][0], -pos[e.child][1])] for e in forest.edges]
    styles = [_edge_style(e, marks) for e in forest.edges]
    ax.add_collection(LineCollection(segments, colors=[c for c, _ in styles], linestyles=[s for _, s in styles],
                                     linewidths=0.8))


def render_forest(forest: Forest, marks: dict | None = None, title: str | None = None, dpi: int = 150) -> bytes:
    """PNG bytes of the forest (see the module docstring). ``title`` defaults to "N models, K trees"."""
    pos = tree_layout(forest)
    fig, ax = new_figure(_figsize(pos), dpi=dpi)
    if len(forest.edges) <= MAX_ARROWS:
        _arrows(ax, forest, pos, marks)
    else:
        _lines(ax, forest, pos, marks)
    xs, ys = [p[0] for p in pos.values()], [-p[1] for p in pos.values()]
    ax.scatter(xs, ys, s=18, c="steelblue", zorder=3)
    if len(pos) <= MAX_LABELS:
        _label_nodes(ax, pos, {e.parent for e in forest.edges})
    if marks:
        _legend(ax, set(marks.values()))
    n_trees = len(forest.trees) or sum(1 for n in forest.nodes if n not in {e.child for e in forest.edges})
    ax.set_title(title or f"{len(forest.nodes)} models, {n_trees} tree{'s' * (n_trees != 1)}", fontsize=9)
    ax.set_axis_off()
    ax.margins(0.05, 0.15)
    return png_bytes(fig)
