"""bench/head_retrieval_association.py: the head-by-head association and its permutation test."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_module

from consa_cli.allocation import Allocation


def masks_and_scores(decisive: bool):
    """12 masks of 4 layers x 2 heads; head (2, 1) kept by half of them. With ``decisive`` the scores follow it."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 4, 2, generator=generator) > 0.5
    masks[:, 0, 0] = True  # kept by every mask: not tested
    masks[:, 2, 1] = torch.arange(12) % 2 == 0
    noise = torch.rand(12, generator=generator, dtype=torch.float64)
    scores = 0.2 + 0.5 * masks[:, 2, 1].double() + 0.01 * noise if decisive else noise
    return masks, scores


def test_a_decisive_head_is_found_and_significant_and_noise_is_not(monkeypatch):
    module = bench_module("head_retrieval_association", monkeypatch)
    masks, scores = masks_and_scores(decisive=True)
    result = module.association(masks, scores, permutations=400, seed=0)
    top = result["heads"][0]
    assert (top["layer"], top["kv_head"], top["kept_by"]) == (2, 1, 6)
    assert top["r"] > 0.99 and top["mean_with"] > top["mean_without"] + 0.4
    assert result["permutation_p"] < 0.01 and [0, 0] in result["always_kept"]
    masks, scores = masks_and_scores(decisive=False)
    assert module.association(masks, scores, permutations=400, seed=0)["permutation_p"] > 0.05


def test_main_reads_allocations_and_file_qualified_labels(monkeypatch, tmp_path, capsys):
    module = bench_module("head_retrieval_association", monkeypatch)
    masks, scores = masks_and_scores(decisive=True)
    paths, labels = [], []
    for index, mask in enumerate(masks):
        paths.append(Allocation(fa_mask=mask, granularity="kv-head", sliding_window=8, sink_tokens=0,
                                model="tiny").save(tmp_path / f"m{index}.safetensors"))
    # two evaluation files that share labels: the FILE:LABEL form picks the right one
    for name, offset in (("a.json", 0), ("b.json", 6)):
        rows = [{"label": f"seed-{i}", "retrieval": {"overall": scores[offset + i].item()}} for i in range(6)]
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
    labels = [f"a.json:seed-{i}" for i in range(6)] + [f"b.json:seed-{i}" for i in range(6)]
    monkeypatch.setattr("sys.argv", ["head_retrieval_association.py", *map(str, paths), "--evaluation",
                                     str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", *labels,
                                     "--permutations", "200", "--json", str(tmp_path / "out.json")])
    module.main()
    assert "layer 2 head 1: r +1.00" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["heads"][0]["kept_by"] == 6
    monkeypatch.setattr("sys.argv", ["head_retrieval_association.py", str(paths[0]), "--evaluation",
                                     str(tmp_path / "a.json"), "--labels", "c.json:seed-0"])
    with pytest.raises(SystemExit, match="no evaluation row for c.json:seed-0"):
        module.main()
