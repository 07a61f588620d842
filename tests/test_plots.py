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


def test_plot_tradeoff_draws_every_group_and_refuses_an_empty_plot(tmp_path):
    from consa_cli.plots import PlotError, plot_tradeoff

    groups = {"learned": [(0.03, 0.6), (0.04, 0.8)], "rules": [(0.05, 0.15)], "empty": []}
    width, height = png_size(plot_tradeoff(groups, tmp_path / "t.png", "cost", "retrieval", "title", reference=1.0))
    assert width >= 600 and height > 300
    with pytest.raises(PlotError, match="nothing to plot"):
        plot_tradeoff({"empty": []}, tmp_path / "e.png", "x", "y", "empty")


def test_summarize_compare_pairs_consa_eval_rows_with_their_dense_row(tmp_path):
    """bench/summarize_compare.py reads `consa eval --json` rows: dNLL and t against the file's own dense row."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "summarize_compare.py"
    spec = importlib.util.spec_from_file_location("summarize_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dense = {"label": "dense", "is_reference": True, "ppl": 10.0, "nll_per_sequence": [2.0, 2.2, 2.1]}
    vote = {"label": "vote4", "is_reference": False, "ppl": 11.0, "nll_per_sequence": [2.1, 2.25, 2.2],
            "full_units": 22, "units": 90, "retrieval": {"overall": 0.6, "by_task": {}}}
    (row,) = module.eval_rows([dense, vote])
    assert row["name"] == "vote4" and row["retrieval"] == 0.6 and row["full_units"] == 22
    assert row["delta_nll_vs_dense"] == pytest.approx(0.25 / 3)
    assert row["paired_t_vs_dense"] > 0
    assert module.group_of("vote4", [("^vote", "votes")]) == "votes"
    assert module.group_of("rule:top layer", []) == "rule"
