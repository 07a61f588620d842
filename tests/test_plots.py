"""Allocation pictures: a real PNG of the right size, with and without learned scores."""

from __future__ import annotations

import pytest
import torch

from consa_cli.allocation import Allocation
from consa_cli.plots import plot_allocation

pytest.importorskip("matplotlib")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_allocation_writes_a_png(tmp_path):
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    plain = png_size(plot_allocation(Allocation(mask, "kv-head", 16, 4), tmp_path / "nested" / "mask.png"))
    scored = png_size(plot_allocation(Allocation(mask, "kv-head", 16, 4, scores=torch.randn(6)), tmp_path / "s.png"))
    assert plain[0] >= 600 and plain[1] > 100
    assert scored[1] > plain[1] * 1.3  # the learned-scores panel is drawn below the mask


def test_layer_scores_are_drawn_per_layer(tmp_path):
    allocation = Allocation(torch.tensor([[True] * 2, [False] * 2]), "layer", 16, 0, scores=torch.tensor([3.0, -2.0]))
    assert plot_allocation(allocation, tmp_path / "layer.png").stat().st_size > 1000
