"""The atlas viewer: one self-contained HTML page (inline CSS and a few lines of JavaScript, no network).

It draws the recovered forest as a picture (``modelatlas.lineage.plot``, inline PNG), each tree as an indented list (edge confidence beside each model, predicted classes
under it), a table of every model (size, dtype, tree, parent, predictions, notes), and a filter box that
hides the table rows that do not match every typed word (a word starting a word of the model's name, path
or notes, or a whole word of a predicted class; never a probability), and dims those models in the trees,
keeping the trees' shape. Pure function of an :class:`Atlas`; every
string from the atlas is HTML-escaped. Time O(N + E).
"""

from __future__ import annotations

import base64
import re
from html import escape

from modelatlas.atlas.index import NO_CLASS, Atlas, ModelEntry
from modelatlas.atlas.search import below, shared_folder
from modelatlas.errors import same_form
from modelatlas.lineage.export import MAX_INDENT, copy_formats, copy_text, runner_up_note, tree_heading

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} .meta{color:#555} input{font-size:1em;padding:.3em;width:24em;margin:1em 0}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:1.4em;border-left:1px solid #bbb}
ul.tree{border:none;padding-left:0} li{margin:.15em 0}
.score{color:#777;font-size:.85em} .pred{color:#2a6;font-size:.85em} .note{color:#b60;font-size:.85em}
table{border-collapse:collapse;margin-top:1em} td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f4f4} .hidden{display:none} .dim>b{opacity:.3} .tree-box{margin:1em 0}
"""

# A row matches when every typed word starts a word of its data-s (name, path, notes) or is a whole word of
# its data-c (class names, best description): typing "1" finds the models predicted to know class 1, not
# every model with a 1 in its name or a probability of 0.91.
_JS = """
function words(q){return q.normalize('NFC').toLowerCase().match(/[\\p{L}\\p{N}]+/gu)||[];}
function has(el,ws){var s=' '+el.getAttribute('data-s'),c=' '+el.getAttribute('data-c')+' ';
 return ws.every(function(w){return s.indexOf(' '+w)>=0||c.indexOf(' '+w+' ')>=0;});}
function filt(q){var ws=words(q),on=ws.length>0;
 document.querySelectorAll('tr[data-s]').forEach(function(tr){tr.classList.toggle('hidden',on&&!has(tr,ws));});
 document.querySelectorAll('li[data-s]').forEach(function(li){
  var hit=!on||has(li,ws)||Array.prototype.some.call(li.querySelectorAll('li[data-s]'),function(d){return has(d,ws);});
  li.classList.toggle('dim',!hit);});}
"""


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pred_text(entry: ModelEntry, k: int = 6) -> str:
    """The predicted classes (or that none passed 0.5), then the best description: a model with both showed
    only its classes, and the filter kept it for a word of the description it did not show."""
    shown = ", ".join(f"{c} {p:.2f}" for c, p in (entry.predicted or [])[:k])
    shown += f" (+{len(entry.predicted) - k})" if entry.predicted and len(entry.predicted) > k else ""
    shown = shown or (NO_CLASS if entry.expert_tree and entry.predicted == [] else "")
    described = f"{entry.described[0][0]} {entry.described[0][1]:.2f}" if entry.described else ""
    return "; ".join(t for t in (shown, described) if t)


def _words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits, in Unicode NFC form, as the page's ``words()`` splits what is typed."""
    return re.findall(r"[^\W_]+", same_form(text).lower())


def _filter_attrs(entry: ModelEntry | None, folder: str, name: str = "") -> str:
    """The ``data-s`` / ``data-c`` attributes the filter box matches (see _JS). data-s: the words of the name,
    the path below ``folder``, the one all models share (else typing a word of it, which the page never
    shows, would keep every row), and the notes but their numbers; data-c: the words of the predicted
    classes and the best description, without their probabilities."""
    if entry is None:
        return f'data-s="{escape(" ".join(_words(name)))}" data-c=""'
    where = below(entry.path, folder)
    notes = [w for w in _words(" ".join(entry.notes)) if not w.isdigit()]
    said = [c for c, _ in (entry.predicted or []) + (entry.described or [])[:1]]
    s, c = dict.fromkeys(_words(f"{entry.name} {where}") + notes), dict.fromkeys(_words(" ".join(said)))
    return f'data-s="{escape(" ".join(s))}" data-c="{escape(" ".join(c))}"'


def _li(name: str, entries: dict, depth: int, folder: str, edge=None, formats: dict | None = None) -> str:
    """A model's list item, left open: its name, edge score (with a close runner-up parent, from its ``edge``;
    a copy or a merge said as the terminal tree says it, ``formats`` from :func:`copy_formats`), predictions
    (and its depth past MAX_INDENT)."""
    e = entries.get(name)
    close = escape(runner_up_note(edge)) if edge is not None else ""
    said = copy_text(edge, formats) if edge is not None else ""
    score = f' <span class="score">({escape(said)})</span>' if said else \
        f' <span class="score">({e.score:.2f}{close})</span>' if e is not None and e.score is not None else ""
    said = _pred_text(e) if e is not None else ""
    pred = f'<br><span class="pred">{escape(said)}</span>' if said else ""
    deep = f'<span class="score">[depth {depth}]</span> ' if depth > MAX_INDENT else ""
    return f'<li {_filter_attrs(e, folder, name)}>{deep}<b>{escape(name)}</b>{score}{pred}'


def _subtree(root: str, kids: dict, entries: dict, out: list[str], folder: str, formats: dict | None = None) -> None:
    """Nested lists from ``root``, depth-first with an explicit stack (a chain of thousands of checkpoints
    reaches no recursion limit); below MAX_INDENT levels the children follow as siblings, tagged by depth."""
    stack: list = [(root, 0, None)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):  # a closing tag scheduled after a node's children
            out.append(item)
            continue
        name, depth, edge = item
        out.append(_li(name, entries, depth, folder, edge, formats))
        children = kids.get(name, [])
        if children and depth < MAX_INDENT:
            out.append("<ul>")
            stack.append("</ul></li>")
        else:
            out.append("</li>")
        stack.extend((e.child, depth + 1, e) for e in reversed(children))


def _trees(atlas: Atlas, folder: str) -> list[str]:
    kids, entries = atlas.forest.children(), {m.name: m for m in atlas.models}
    formats, out = copy_formats(atlas.forest), []
    for t, root in enumerate(atlas.forest.roots()):
        size, note = tree_heading(atlas.forest, root) or (1, "")
        out.append(f'<div class="tree-box"><h3>tree {t + 1} ({_counted(size, "model")}{escape(note)})</h3>'
                   '<ul class="tree">')
        _subtree(root, kids, entries, out, folder, formats)
        out.append("</ul></div>")
    return out


def _table(atlas: Atlas, folder: str) -> list[str]:
    head = ["model", "tree", "parent", "score", "predicted classes / description", "parameters", "size", "dtype", "notes"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for m in atlas.models:
        cells = [f"<b>{escape(m.name)}</b>", "" if m.tree is None else str(m.tree), escape(m.parent or ""),
                 "" if m.score is None else f"{m.score:.2f}", escape(_pred_text(m)), f"{m.parameters:,}",
                 _human(m.size_bytes), escape(m.dtype), f'<span class="note">{escape("; ".join(m.notes))}</span>']
        out.append(f'<tr {_filter_attrs(m, folder)}>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _picture(atlas: Atlas) -> str:
    """The forest drawn as in ``atlas lineage recover --png`` (no marks: an atlas has no truth), inline as a
    base64 PNG so that the page stays one file; folded away under its heading. Empty without edges."""
    if not atlas.forest.edges:
        return ""
    from modelatlas.lineage.plot import render_forest

    png = base64.b64encode(render_forest(atlas.forest, dpi=100)).decode("ascii")
    return (f'<details open><summary>lineage drawing</summary><img alt="the recovered lineage forest" '
            f'style="max-width:100%" src="data:image/png;base64,{png}"></details>')


def render_html(atlas: Atlas) -> str:
    """The viewer page for ``atlas`` as one HTML string."""
    d, folder = atlas.forest.decisions, shared_folder([m.path for m in atlas.models])
    meta = (f"{_counted(len(atlas.models), 'model')}, {_counted(len(atlas.forest.roots()), 'tree')}; "
            f"stage: {d.get('stage', '?')}; "
            f"distance: {d.get('distance', '?')}")
    experts = "; ".join(f"{k} experts: {escape(v.get('folder', ''))} (layer {escape(v.get('layer', ''))})"
                        for k, v in atlas.experts.items())
    body = [f"<h1>modelatlas</h1><p class=meta>{escape(meta)}</p>",
            f"<p class=meta>{experts}</p>" if experts else "",
            '<input placeholder="filter models (name, whole class name, note)" oninput="filt(this.value)">',
            _picture(atlas), *_trees(atlas, folder), "<h2>all models</h2>", *_table(atlas, folder)]
    return ("<!doctype html><html><head><meta charset=utf-8><title>modelatlas</title>"
            f"<style>{_CSS}</style><script>{_JS}</script></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
