import matplotlib

from modelatlas.figures import new_figure, png_bytes


def test_new_figure_gives_one_axes_or_a_grid():
    fig, ax = new_figure((2, 2))
    ax.plot([0, 1])
    assert png_bytes(fig).startswith(b"\x89PNG")
    fig, axes = new_figure((3, 2), 2, 3)
    assert axes.shape == (2, 3)


def test_rendering_leaves_the_callers_matplotlib_backend_alone():
    """The renderers called matplotlib.use("Agg"): in a notebook that switched off inline plots for good."""
    from modelatlas.distill.result import render_losses
    from modelatlas.lineage.forest import Edge, Forest
    from modelatlas.lineage.plot import render_forest

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend of the caller's choosing
    try:
        render_losses([3.0, 2.0, 1.0])
        render_forest(Forest(["a", "b"], [Edge("a", "b", 0.5)]))
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)



def test_a_name_the_font_lacks_glyphs_for_draws_without_a_warning():
    import warnings

    fig, ax = new_figure((2, 1))
    ax.text(0.1, 0.5, "bert-日本 ☃")  # a model name in the lineage picture of `atlas index build`
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert png_bytes(fig).startswith(b"\x89PNG")
    assert [str(w.message) for w in caught] == []


def test_a_name_that_is_not_utf8_is_drawn_as_escapes():
    """FreeType takes only valid Unicode: a model named b"m\\xe9" (surrogate escape) ended the PNG in a TypeError."""
    fig, ax = new_figure((2, 1))
    label = ax.text(0.1, 0.5, "m\udce9")
    assert png_bytes(fig).startswith(b"\x89PNG") and label.get_text() == "m\\xe9"


def test_a_learning_curve_without_iterations_says_why_it_is_empty(monkeypatch):
    # `atlas distill run --method random` drew empty axes in loss.png, which read as a failed run (day-one review)
    from modelatlas.distill import result

    drawn = []
    monkeypatch.setattr(result, "png_bytes", lambda fig: drawn.append(fig) or b"")
    result.render_losses([], "random")
    result.render_losses([2.0, 1.0], "dm")
    said = [[t.get_text() for t in fig.axes[0].texts] for fig in drawn]
    assert said == [["no outer iterations: the set was chosen, not optimised"], []]
