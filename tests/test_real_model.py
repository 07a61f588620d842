"""One short smoke test of the whole pipeline on the real embedded model and text (SmolLM2-135M, Wikipedia)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from consa_cli import load_hybrid
from consa_cli.allocation import Allocation
from consa_cli.cli import app

pytestmark = pytest.mark.slow


def test_search_export_eval_on_the_embedded_model(tmp_path):
    runner = CliRunner()
    run_dir, export_dir, report = tmp_path / "run", tmp_path / "export", tmp_path / "eval.json"
    result = runner.invoke(app, ["search", "--steps", "3", "--seq-len", "256", "--window", "32",
                                 "--output", str(run_dir)])
    assert result.exit_code == 0, result.output
    allocation = Allocation.load(run_dir)
    assert (allocation.num_units, allocation.num_full_units, allocation.sink_tokens) == (90, 22, 4)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3

    result = runner.invoke(app, ["export", str(run_dir), "--output", str(export_dir)])
    assert result.exit_code == 0, result.output
    model, tokenizer = load_hybrid(export_dir, dtype=torch.bfloat16, return_tokenizer=True)
    assert torch.equal(model.consa_allocation.fa_mask, allocation.fa_mask)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert tokenizer.decode(model(ids).logits[0, -1].argmax()).strip() == "Paris"  # short prompt: inside the window

    result = runner.invoke(app, ["eval", str(export_dir), "--seq-len", "256", "--max-sequences", "4",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    dense, hybrid = json.loads(report.read_text())["rows"]
    assert dense["is_reference"] and 5 < dense["ppl"] < 60  # real text on a real model, not noise
    assert hybrid["ppl"] > dense["ppl"]  # 75% of heads see 32 tokens of 256: perplexity must rise

    # Healing on the real weights: two steps, written as an export that eval pairs with the dense model.
    healed_dir, healed_report = tmp_path / "healed", tmp_path / "healed.json"
    result = runner.invoke(app, ["heal", str(run_dir), "--steps", "2", "--seq-len", "256", "--device", "cpu",
                                 "--output", str(healed_dir)])
    assert result.exit_code == 0, result.output
    log = json.loads((healed_dir / "heal_log.json").read_text())
    assert len(log["steps"]) == 2 and all(0 < step["kl"] < 1 for step in log["steps"])
    healed = load_hybrid(healed_dir, dtype=torch.bfloat16)
    assert torch.equal(healed.consa_allocation.fa_mask, allocation.fa_mask)
    assert tokenizer.decode(healed(ids).logits[0, -1].argmax()).strip() == "Paris"
    result = runner.invoke(app, ["eval", str(run_dir), str(healed_dir), "--seq-len", "256", "--max-sequences", "4",
                                 "--json", str(healed_report)])
    assert result.exit_code == 0, result.output
    rows = {row["label"]: row for row in json.loads(healed_report.read_text())["rows"]}
    assert rows["healed"]["kind"] == "export" and rows["healed"]["delta_nll_vs_dense"] is not None
    assert rows["run"]["delta_nll_vs_dense"] > 0
