"""attribution.png: the helpful (+) column shows only clusters that helped, the harmful (-) column only those
that harmed; RGB clusters are drawn in colour."""

from types import SimpleNamespace

import torch

from modelatlas.attribution.report import render_top_clusters, top_clusters


def test_helpful_and_harmful_lists_keep_their_sign():
    helpful, harmful = top_clusters(torch.tensor([[-0.1], [-0.5], [-0.9]]), 0, 2)
    assert helpful == [] and harmful == [2, 1]  # nothing helped: no cluster is shown as helpful
    helpful, harmful = top_clusters(torch.tensor([[0.3], [0.2]]), 0, 2)
    assert helpful == [0, 1] and harmful == []


def test_plot_with_an_empty_column_and_rgb_images():
    attr = SimpleNamespace(matrix=torch.tensor([[-0.2], [-0.4]]), assign=torch.tensor([0, 1, 1]),
                           cluster_class=torch.tensor([0, 1]))
    png = render_top_clusters(attr, torch.rand(3, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.tensor([0]), [0], top=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
