"""Figures drawn off-screen for the PNG files modelatlas writes, without touching matplotlib's global state.

``matplotlib.use("Agg")`` inside a library call switches the backend of the whole process: in a notebook that
has shown plots inline, every later ``plt.show()`` then stops displaying. A :class:`matplotlib.figure.Figure`
with its own Agg canvas needs neither pyplot nor a backend switch, and is freed with its last reference (no
``plt.close``, no figure kept in pyplot's registry).
"""

from __future__ import annotations

import io
import warnings


def new_figure(figsize: tuple[float, float], rows: int | None = None, cols: int | None = None, dpi: int = 100):
    """``(fig, ax)`` with one axes, or ``(fig, axes)`` with a (rows, cols) array of axes when ``rows`` is given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    if rows is None:
        return fig, fig.add_subplot()
    return fig, fig.subplots(rows, cols or 1, squeeze=False)


def png_bytes(fig, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes, cropped to its content (``dpi``: the figure's own when None)."""
    _escape_surrogates(fig)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a name in a script the font lacks is drawn as boxes, not warned per glyph
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def _escape_surrogates(fig) -> None:
    """Write lone surrogates in the figure's text (a model or class named by a file name that is not UTF-8) as
    escapes (``\\xe9``, :data:`~modelatlas.atomic.SURROGATE_ESCAPES`): FreeType takes only valid Unicode, and
    one such name ended the PNG in a TypeError after the whole command."""
    from matplotlib.text import Text

    from modelatlas.atomic import SURROGATE_ESCAPES

    for t in fig.findobj(Text):
        text = t.get_text()
        if text != (shown := text.translate(SURROGATE_ESCAPES)):
            t.set_text(shown)
