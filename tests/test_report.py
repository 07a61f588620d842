"""The comparison report: tables from evaluate's rows, plots against sparsity, learned masks next to rules."""

from __future__ import annotations

import re

import pytest
import torch

import consa_cli.report as report_module
from consa_cli.allocation import Allocation
from consa_cli.baselines import rule_allocation
from consa_cli.evaluate import EvalSettings, evaluate, resolve_target
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.plots import plot_masks, plot_versus_sparsity
from consa_cli.report import REPORT_FILE, method_label, write_report

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread):
    """Keep every test out of the real consa cache, on one torch thread."""


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir, tiny_text_file):
    """Two rules at two sparsities and a 'learned' allocation, evaluated with retrieval on the tiny model."""
    import consa_cli.retrieval

    root = tmp_path_factory.mktemp("report")
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.float32)
    fingerprint = model_fingerprint(model)
    specs = []
    for rule in ("interleaved", "top"):
        for sparsity in (0.5, 0.75):
            allocation = rule_allocation(rule, 4, 2, sparsity, "layer", 4, 0, model=str(tiny_model_dir),
                                         model_fingerprint=fingerprint)
            specs.append(allocation.save(root / f"{rule}-{sparsity}" / "allocation.safetensors").parent)
    learned = Allocation(torch.tensor([[False, True], [False, False], [True, False], [False, False]]), "kv-head", 4,
                         0, model=str(tiny_model_dir), model_fingerprint=fingerprint, scores=torch.randn(8))
    specs.append(learned.save(root / "learned-0.75" / "allocation.safetensors").parent)
    targets = [resolve_target(str(spec)) for spec in specs]
    words = " ".join(f"w{i}" for i in range(10, 40))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(consa_cli.retrieval, "default_filler", lambda: (f"{words} .", f"{words} w5 ."))
        settings = EvalSettings(data=str(tiny_text_file), seq_lens=[32], max_sequences=4, dtype="float32",
                                retrieval_tasks=["passkey"], retrieval_haystack="prose", retrieval_lengths=[96],
                                retrieval_depths=[0.5], retrieval_samples=2)
        rows = evaluate(targets, settings)
    return rows, targets


def test_report_tables_plots_and_masks(tmp_path, compared, monkeypatch):
    rows, targets = compared
    drawn = []
    monkeypatch.setattr(report_module, "plot_masks",
                        lambda panels, path: drawn.append([title for title, _ in panels]) or plot_masks(panels, path))

    path = write_report(rows, targets, tmp_path / "out", command="consa eval a b --report out")

    assert path == tmp_path / "out" / REPORT_FILE
    text = path.read_text()
    assert text.startswith("# consa evaluation report\n\n```bash\nconsa eval a b --report out\n```")
    for row in rows:  # one perplexity-table line per row, with its method and PPL
        assert re.search(rf"\| {re.escape(row['label'])} \| {re.escape(method_label(row['method'], row['granularity']))}"
                         rf" \| .* \| {row['ppl']:.3f} \|", text), row["label"]
    assert "| interleaved-0.5 | rule:interleaved layer | 2/4 |" in text
    assert "| learned-0.75 | learned kv-head | 2/8 |" in text
    assert "## Perplexity by query position" in text and "[4, 8)" in text and "## Retrieval" in text
    for row in rows:  # overall retrieval with its binomial standard error over the prompts
        retrieval = row["retrieval"]
        assert f"| {retrieval['overall']:.2f} +- {retrieval['overall_stderr']:.2f} |" in text
    pictures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(pictures) == sorted(["delta-nll-32.png", "delta-nll-beyond-window-32.png", "retrieval.png",
                                       "masks-sparsity-0.5.png", "masks-sparsity-0.75.png"])
    assert all(is_png(tmp_path / "out" / picture) for picture in pictures)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {REPORT_FILE, *pictures}
    # At 0.75 the learned mask comes first, then the rules at the same sparsity; 0.5 has only rules.
    assert [titles[0].split(":")[0] for titles in drawn] == ["interleaved-0.5", "learned-0.75"]
    assert [title.split(":")[0] for title in drawn[1]] == ["learned-0.75", "interleaved-0.75", "top-0.75"]


def test_plot_versus_sparsity_draws_one_line_per_method(tmp_path):
    series = {"learned kv-head": [(0.75, 0.02), (0.5, 0.01)], "rule:top layer": [(0.5, 0.03)]}
    picture = plot_versus_sparsity(series, tmp_path / "p.png", "delta NLL", "title", reference=0.0)
    assert is_png(picture)
    from consa_cli.plots import PlotError

    with pytest.raises(PlotError, match="nothing to plot"):
        plot_versus_sparsity({}, tmp_path / "q.png", "y", "empty")
    with pytest.raises(PlotError, match="no allocation"):
        plot_masks([], tmp_path / "r.png")


def test_task_metrics_are_shown_with_their_stderr():
    from consa_cli.report import task_metric_cells

    metrics = {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "sample_len": 6.0}
    assert task_metric_cells(metrics) == ["acc 0.500 (0.100)", "acc_norm 0.250"]
