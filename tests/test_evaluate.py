"""Eval: paired statistics, target classification, and perplexity rows against the dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny

from consa_cli.allocation import Allocation, AllocationError
from consa_cli.evaluate import (
    EvalSettings,
    Target,
    bucket_rows,
    evaluate,
    paired_difference,
    position_buckets,
    resolve_target,
    resolve_targets,
)
from consa_cli.export import MASK_FILE, export_checkpoint
from consa_cli.models import load_model_and_tokenizer, model_fingerprint

SEQ_LEN = 32


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread):
    """Keep every test out of the real consa cache, on one torch thread."""


@pytest.fixture(scope="module")
def fingerprint(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.float32)
    return model_fingerprint(model)


def write_allocation(run_dir, model_dir, fingerprint, full: bool, window: int = 2, sinks: int = 0, **fields):
    """A run directory with an all-full or all-sliding layer allocation of the tiny 4 x 2 model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mask = torch.full((4, 2), full, dtype=torch.bool)
    Allocation(mask, "layer", window, sinks, method="test", model=str(model_dir), model_fingerprint=fingerprint,
               **fields).save(run_dir / "allocation.safetensors")
    return run_dir


def eval_settings(data, **overrides) -> EvalSettings:
    return EvalSettings(**{"data": str(data), "seq_lens": [SEQ_LEN], "max_sequences": 4, "dtype": "float32",
                           **overrides})


def test_paired_difference_matches_hand_computation():
    candidate = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    reference = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    # delta = [0.5, 1, 1]: mean 5/6, sample variance ((1/3)^2 + 2 (1/6)^2) / 2 = 1/12,
    # standard error sqrt(1/12) / sqrt(3) = 1/6, so t = (5/6) / (1/6) = 5.
    mean, t = paired_difference(candidate, reference)
    assert mean == pytest.approx(5 / 6)
    assert t == pytest.approx(5.0)
    mean, t = paired_difference(reference, candidate)
    assert (mean, t) == (pytest.approx(-5 / 6), pytest.approx(-5.0))


def test_paired_difference_edge_cases():
    mean, t = paired_difference(torch.tensor([2.0]), torch.tensor([1.5]))
    assert mean == pytest.approx(0.5) and math.isnan(t)  # one sequence: no t statistic
    assert paired_difference(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])) == (1.0, math.inf)
    assert paired_difference(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])) == (-1.0, -math.inf)
    # identical scores (an all-full-attention allocation vs the dense model): no difference, not -inf
    assert paired_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == (0.0, 0.0)


def test_resolve_target_classifies_every_kind(tmp_path, tiny_model_dir, fingerprint):
    run_dir = write_allocation(tmp_path / "run", tiny_model_dir, fingerprint, full=False)
    target = resolve_target(str(run_dir))
    assert (target.kind, target.label, target.path) == ("allocation", "run", str(run_dir))
    assert target.base_model == str(tiny_model_dir) and target.allocation.num_full_units == 0

    file_target = resolve_target(str(run_dir / "allocation.safetensors"))
    assert (file_target.kind, file_target.label, file_target.base_model) == ("allocation", "allocation",
                                                                            str(tiny_model_dir))

    export_checkpoint(run_dir, tmp_path / "exported", verify=False)
    export = resolve_target(str(tmp_path / "exported"))
    assert (export.kind, export.label) == ("export", "exported")
    assert export.allocation.sliding_window == 2

    model = resolve_target(str(tiny_model_dir))  # a plain checkpoint directory is a model
    assert (model.kind, model.allocation, model.base_model) == ("model", None, str(tiny_model_dir))
    hub = resolve_target("Qwen/Qwen3-0.6B")
    assert (hub.kind, hub.label, hub.base_model) == ("model", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B")


def test_colliding_target_names_get_their_folders_and_every_row_keeps_its_own_label(tmp_path, tiny_model_dir,
                                                                                    tiny_text_file, fingerprint):
    """`consa eval runA/seed-0.safetensors runB/seed-0.safetensors`: rows are keyed by label, so equal names would
    have merged two allocations' rows; they are labelled with their folders, as deep as it takes."""
    first = write_allocation(tmp_path / "x" / "runA" / "seed-0", tiny_model_dir, fingerprint, full=True)
    second = write_allocation(tmp_path / "y" / "runA" / "seed-0", tiny_model_dir, fingerprint, full=False)
    third = write_allocation(tmp_path / "y" / "runB" / "seed-1", tiny_model_dir, fingerprint, full=False)
    specs = [str(first), str(second), str(third), str(third), str(first / "allocation.safetensors")]
    labels = [target.label for target in resolve_targets(specs)]
    assert labels == ["x/runA/seed-0", "y/runA/seed-0", "seed-1", "seed-1 (2)", "allocation"]
    files = [str(first / "allocation.safetensors"), str(second / "allocation.safetensors")]
    assert [t.label for t in resolve_targets(files)] == ["x/runA/seed-0/allocation", "y/runA/seed-0/allocation"]
    rows = evaluate(resolve_targets([str(first), str(second)]), eval_settings(tiny_text_file))
    assert [row["label"] for row in rows[1:]] == ["x/runA/seed-0", "y/runA/seed-0"]
    assert rows[1]["full_units"] != rows[2]["full_units"]  # two allocations, two rows


def test_resolve_target_refuses_a_corrupt_allocation(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(AllocationError, match="not a readable safetensors allocation"):
        resolve_target(str(bad))


def test_evaluate_rows_against_the_dense_reference(tmp_path, tiny_model_dir, tiny_text_file, fingerprint):
    full = write_allocation(tmp_path / "all-full", tiny_model_dir, fingerprint, full=True)
    sliding = write_allocation(tmp_path / "all-sliding", tiny_model_dir, fingerprint, full=False, window=2)
    seen = []

    rows = evaluate([resolve_target(str(full)), resolve_target(str(sliding))], eval_settings(tiny_text_file),
                    on_progress=lambda label, done, total: seen.append((label, done, total)))

    assert [row["label"] for row in rows] == [f"dense ({tiny_model_dir})", "all-full", "all-sliding"]
    dense, all_full, all_sliding = rows
    assert dense["is_reference"] is True and dense["kind"] == "model" and dense["method"] == "dense"
    assert "delta_nll_vs_dense" not in dense
    assert not any(row.get("is_reference") for row in rows[1:])
    assert all_full["delta_nll_vs_dense"] == 0.0 and all_full["nll"] == dense["nll"]
    assert all_full["paired_t_vs_dense"] == 0.0
    assert all_sliding["delta_nll_vs_dense"] > 0
    assert all_sliding["delta_nll_vs_dense"] == pytest.approx(all_sliding["nll"] - dense["nll"])
    for row in rows:
        assert row["seq_len"] == SEQ_LEN and row["sequences"] == 4 and len(row["nll_per_sequence"]) == 4
        assert row["ppl"] == pytest.approx(math.exp(row["nll"]), rel=1e-12)
        assert row["nll"] == pytest.approx(sum(row["nll_per_sequence"]) / 4, abs=1e-6)
    assert (all_sliding["sparsity"], all_sliding["sliding_window"], all_sliding["sink_tokens"]) == (1.0, 2, 0)
    assert (all_sliding["full_units"], all_sliding["units"], all_sliding["granularity"]) == (0, 4, "layer")
    assert {label for label, _, _ in seen} == {row["label"] for row in rows}
    assert all(total == 4 for _, _, total in seen)


def test_evaluate_export_matches_the_allocation_applied_in_memory(tmp_path, tiny_model_dir, tiny_text_file,
                                                                  fingerprint):
    run_dir = tmp_path / "run"
    mask = torch.tensor([[True, False], [False, False], [False, True], [True, True]])
    run_dir.mkdir()
    Allocation(mask, "kv-head", 4, 1, model=str(tiny_model_dir), model_fingerprint=fingerprint).save(
        run_dir / "allocation.safetensors")
    export_checkpoint(run_dir, tmp_path / "exported")
    assert (tmp_path / "exported" / MASK_FILE).is_file()

    rows = evaluate([resolve_target(str(tmp_path / "exported")), resolve_target(str(run_dir))],
                    eval_settings(tiny_text_file, seq_lens=[SEQ_LEN, 16], max_sequences=3))

    by_key = {(row["label"], row["seq_len"]): row for row in rows}
    assert [row["label"] for row in rows][:2] == [f"dense ({tiny_model_dir})"] * 2  # dense first, both lengths
    assert [row["seq_len"] for row in rows] == [SEQ_LEN, 16] * 3
    for seq_len in (SEQ_LEN, 16):
        exported, in_memory = by_key[("exported", seq_len)], by_key[("run", seq_len)]
        assert exported["kind"] == "export" and in_memory["kind"] == "allocation"
        # The export reorders KV heads FA-first: the same model up to float summation order.
        assert exported["nll_per_sequence"] == pytest.approx(in_memory["nll_per_sequence"], abs=1e-5)
        assert exported["delta_nll_vs_dense"] == pytest.approx(in_memory["delta_nll_vs_dense"], abs=1e-5)
        assert in_memory["delta_nll_vs_dense"] > 0


def test_evaluate_without_dense_and_with_an_explicit_dense_model(tmp_path, tiny_model_dir, tiny_text_file,
                                                                fingerprint):
    sliding = write_allocation(tmp_path / "all-sliding", tiny_model_dir, fingerprint, full=False)
    rows = evaluate([resolve_target(str(sliding))], eval_settings(tiny_text_file, include_dense=False))
    assert [row["label"] for row in rows] == ["all-sliding"] and "delta_nll_vs_dense" not in rows[0]

    # Naming the dense model as a target itself gives one reference row, not two, first whatever the order.
    dense = Target(str(tiny_model_dir), "model", str(tiny_model_dir), None, str(tiny_model_dir))
    for targets in ([dense, resolve_target(str(sliding))], [resolve_target(str(sliding)), dense]):
        rows = evaluate(targets, eval_settings(tiny_text_file))
        assert [row["label"] for row in rows] == [str(tiny_model_dir), "all-sliding"]
        assert [row.get("is_reference", False) for row in rows] == [True, False]
        assert rows[1]["delta_nll_vs_dense"] > 0


def test_evaluate_refuses_an_allocation_for_another_model(tmp_path, tiny_model_dir, tiny_text_file):
    other = save_tiny(tmp_path / "other", "qwen3", seed=1)
    run_dir = write_allocation(tmp_path / "run", tmp_path / "other", model_fingerprint(other), full=False)
    target = resolve_target(str(run_dir))
    target.base_model = str(tiny_model_dir)  # applied to the wrong weights
    with pytest.raises(AllocationError, match="another model"):
        evaluate([target], eval_settings(tiny_text_file, include_dense=False))


def test_evaluate_scores_retrieval_for_every_target(tmp_path, tiny_model_dir, tiny_text_file, fingerprint,
                                                    monkeypatch):
    import consa_cli.retrieval

    words = " ".join(f"w{i}" for i in range(10, 40))
    monkeypatch.setattr(consa_cli.retrieval, "default_filler", lambda: (f"{words} .", f"{words} w5 ."))
    full = write_allocation(tmp_path / "all-full", tiny_model_dir, fingerprint, full=True)
    settings = eval_settings(tiny_text_file, retrieval_tasks=["passkey"], retrieval_haystack="prose",
                             retrieval_lengths=[96], retrieval_depths=[0.5], retrieval_samples=2)
    dense, hybrid = evaluate([resolve_target(str(full))], settings)
    for row in (dense, hybrid):
        cells = row["retrieval"]["cells"]
        assert [(c["task"], c["length"], c["depth"], c["n"]) for c in cells] == [("passkey", 96, 0.5, 2)]
        assert 0.0 <= row["retrieval"]["overall"] <= 1.0
    assert hybrid["retrieval"] == dense["retrieval"]  # all-full allocation: the very same answers


def test_position_buckets_double_from_the_window():
    assert position_buckets(128, 1023) == [(0, 128), (128, 256), (256, 512), (512, 1023)]
    assert position_buckets(4, 31) == [(0, 4), (4, 8), (8, 16), (16, 31)]
    assert position_buckets(8, 16) == [(0, 8), (8, 16)]
    assert position_buckets(100, 50) == [(0, 50)]  # the window covers everything: one bucket
    with pytest.raises(ValueError):
        position_buckets(0, 10)


def test_bucket_rows_split_the_per_token_nll():
    nll = torch.tensor([[1.0, 1.0, 2.0, 4.0], [3.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    reference = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    first, second = bucket_rows(nll, [(0, 2), (2, 4)], reference)
    assert (first["start"], first["end"], second["start"], second["end"]) == (0, 2, 2, 4)
    assert first["nll"] == pytest.approx(1.5) and second["nll"] == pytest.approx(2.5)
    assert second["ppl"] == pytest.approx(math.exp(2.5))
    assert (first["delta_nll_vs_dense"], first["paired_t_vs_dense"]) == (0.0, 0.0)
    # per-sequence bucket means: [3, 2] vs [1, 1.5] -> deltas [2, 0.5], mean 1.25
    assert second["delta_nll_vs_dense"] == pytest.approx(1.25)
    assert "delta_nll_vs_dense" not in bucket_rows(nll, [(0, 4)])[0]


def test_evaluate_splits_perplexity_by_position(tmp_path, tiny_model_dir, tiny_text_file, fingerprint):
    sliding = write_allocation(tmp_path / "all-sliding", tiny_model_dir, fingerprint, full=False, window=4)
    dense, hybrid = evaluate([resolve_target(str(sliding))], eval_settings(tiny_text_file))

    buckets = [(0, 4), (4, 8), (8, 16), (16, SEQ_LEN - 1)]
    for row in (dense, hybrid):  # the dense row is split at the targets' window too
        assert row["bucket_window"] == 4
        assert [(b["start"], b["end"]) for b in row["position_buckets"]] == buckets
        sizes = [end - start for start, end in buckets]  # the buckets' token-weighted mean is the whole mean
        whole = sum(b["nll"] * n for b, n in zip(row["position_buckets"], sizes, strict=True)) / (SEQ_LEN - 1)
        assert whole == pytest.approx(row["nll"], abs=1e-9)
    assert all("delta_nll_vs_dense" not in b for b in dense["position_buckets"])
    within, *beyond = hybrid["position_buckets"]
    # Queries inside the window see their whole prefix: exactly the dense predictions; beyond it, they differ
    # (a random model on random text may do better or worse without the far context).
    assert within["delta_nll_vs_dense"] == pytest.approx(0.0, abs=1e-6)
    assert all(abs(b["delta_nll_vs_dense"]) > 1e-4 for b in beyond)

    rows = evaluate([resolve_target(str(sliding))], eval_settings(tiny_text_file, bucket_window=8))
    assert [(b["start"], b["end"]) for b in rows[1]["position_buckets"]] == [(0, 8), (8, 16), (16, SEQ_LEN - 1)]


def test_a_natively_hybrid_reference_says_what_it_runs(tmp_path, tiny_text_file):
    """Gemma3's reference row is its own 5:1-style pattern, not all-full attention: labelled and counted so."""
    path = tmp_path / "gemma"
    model = save_tiny(path, "gemma3_text", layer_types=["sliding_attention", "sliding_attention",
                                                         "sliding_attention", "full_attention"], sliding_window=4)
    run = write_allocation(tmp_path / "run", path, model_fingerprint(model), full=False, window=4)
    reference, hybrid = evaluate([resolve_target(str(run))], eval_settings(tiny_text_file))
    assert reference["label"] == f"original ({path})" and reference["is_reference"]
    assert (reference["full_units"], reference["units"], reference["sliding_window"]) == (1, 4, 4)  # layers
    assert reference["sparsity"] == 0.75 and reference["native_pattern"] is True and reference["method"] == "dense"
    assert hybrid["label"] == "run" and "native_pattern" not in hybrid and hybrid["delta_nll_vs_dense"] > 0

    (dense,) = evaluate([resolve_target(str(path.parent / "qwen"))] if save_tiny(path.parent / "qwen") else [],
                        eval_settings(tiny_text_file))
    assert "native_pattern" not in dense and dense["sparsity"] == 0.0 and dense["full_units"] is None
