"""consa eval --efficiency: the cache really shrinks to the analytic size, measured next to the dense model."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from conftest import bench_module, tiny_model
from typer.testing import CliRunner

from consa_cli.allocation import Allocation
from consa_cli.cli import app
from consa_cli.efficiency import EfficiencySettings, analytic_kv_bytes, compare_efficiency, measure_generation
from consa_cli.inference import hybrid_inference
from consa_cli.models import load_model_and_tokenizer, model_fingerprint

MIXED = torch.tensor([[True, False], [False, False], [False, True], [True, True]])


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread):
    """Keep every test out of the real consa cache, on one torch thread."""


def test_analytic_kv_bytes():
    config = tiny_model("qwen3").config  # 4 layers x 2 KV heads, head_dim 16
    allocation = Allocation(MIXED, "kv-head", sliding_window=8, sink_tokens=2)
    per_head_token = 2 * 16 * 4  # keys + values, float32
    assert analytic_kv_bytes(config, None, 100, 3, torch.float32) == 3 * per_head_token * 100 * 8
    assert analytic_kv_bytes(config, allocation, 100, 1, torch.float32) == per_head_token * (4 * 100 + 4 * 9)
    assert analytic_kv_bytes(config, allocation, 5, 1, torch.float32) == per_head_token * 8 * 5  # shorter than W


def test_hybrid_cache_is_within_5_percent_of_analytic_and_smaller_than_dense():
    model = tiny_model("llama")
    allocation = Allocation(MIXED, "kv-head", sliding_window=8, sink_tokens=2)
    variants = [("dense", None, lambda: nullcontext(model)), ("hybrid", allocation, lambda: hybrid_inference(model, allocation))]
    rows = compare_efficiency(variants, EfficiencySettings([200, 400], [1, 2], decode_steps=5))
    assert [(r["label"], r["context_length"], r["batch_size"]) for r in rows] == [
        (label, length, batch) for length in (200, 400) for batch in (1, 2) for label in ("dense", "hybrid")]
    for row in rows:
        assert row["cache_length"] == row["context_length"] + 5
        if row["label"] == "dense":
            assert row["is_reference"] and row["kv_bytes"] == row["kv_bytes_analytic"]
        else:
            assert 1.0 <= row["kv_vs_analytic"] <= 1.05
            assert row["kv_vs_dense"] < 0.6 and row["prefill_speedup"] > 0
    assert model.config._attn_implementation == "sdpa"  # each variant restored the model


def test_compiled_decode_runs_every_variant_on_a_static_cache_through_the_compiled_step(monkeypatch):
    """--compiled-decode: static caches (consa's and transformers'), the decode steps through the compiled
    forward (traced whole by the eager backend here; CUDA graphs on a GPU), the same analytic KV size."""
    from transformers import StaticCache

    import consa_cli.efficiency as efficiency
    from consa_cli.hybrid_runtime import StaticHybridCacheLayer

    model = tiny_model("qwen3")
    allocation = Allocation(MIXED, "kv-head", sliding_window=8, sink_tokens=2)
    calls, caches = [], []

    def traced(module):
        step = torch.compile(module, backend="eager", fullgraph=True, dynamic=False)

        def counted(**kwargs):
            calls.append(kwargs["input_ids"].shape)
            caches.append(kwargs[efficiency.cache_argument(module)])
            return step(**kwargs)
        return counted

    monkeypatch.setattr(efficiency, "compile_decode", traced)
    variants = [("dense", None, lambda: nullcontext(model)), ("hybrid", allocation, lambda: hybrid_inference(model, allocation))]
    rows = compare_efficiency(variants, EfficiencySettings([40], [2], decode_steps=4, repeats=2, compiled_decode=True))
    assert len(calls) == 2 * 2 * (efficiency.COMPILED_WARMUP_STEPS + 4)  # variants x repeats x steps, one token each
    assert all(shape == (2, 1) for shape in calls)
    assert isinstance(caches[0], StaticCache)
    assert all(isinstance(layer, StaticHybridCacheLayer) for layer in caches[-1].layers)
    for row in rows:
        assert row["cache_length"] == 40 + efficiency.COMPILED_WARMUP_STEPS + 4
        assert 1.0 <= row["kv_vs_analytic"] <= 1.05


def test_eager_reference_keeps_the_dense_row_on_a_dynamic_cache_under_compiled_decode(monkeypatch):
    """--eager-reference: the first variant decodes as transformers runs it (eager, DynamicCache), the others
    through the compiled step on static caches; each row says which."""
    import consa_cli.efficiency as efficiency
    from consa_cli.hybrid_runtime import StaticHybridCacheLayer

    model = tiny_model("qwen3")
    allocation = Allocation(MIXED, "kv-head", sliding_window=8, sink_tokens=2)
    compiled_calls, static_caches = [], []
    original_new_cache = efficiency.new_cache

    def traced(module):
        step = torch.compile(module, backend="eager", fullgraph=True, dynamic=False)

        def counted(**kwargs):
            compiled_calls.append(kwargs["input_ids"].shape)
            return step(**kwargs)
        return counted

    def recorded_cache(module, *args):
        cache = original_new_cache(module, *args)
        if args:  # a capacity: a static cache
            static_caches.append(cache)
        return cache

    monkeypatch.setattr(efficiency, "compile_decode", traced)
    monkeypatch.setattr(efficiency, "new_cache", recorded_cache)
    variants = [("dense", None, lambda: nullcontext(model)), ("hybrid", allocation, lambda: hybrid_inference(model, allocation))]
    settings = EfficiencySettings([40], [2], decode_steps=4, compiled_decode=True, eager_reference=True)
    rows = compare_efficiency(variants, settings)
    assert [row["compiled_decode"] for row in rows] == [False, True]
    assert len(compiled_calls) == efficiency.COMPILED_WARMUP_STEPS + 4  # the hybrid's steps only
    # One static cache, the hybrid's: the dense reference never got one (transformers' StaticCache).
    assert len(static_caches) == 1 and all(isinstance(layer, StaticHybridCacheLayer) for layer in static_caches[0].layers)
    assert rows[0]["cache_length"] == 40 + 4 and rows[1]["cache_length"] == 40 + efficiency.COMPILED_WARMUP_STEPS + 4


def test_measure_generation_counts_tokens():
    row = measure_generation(tiny_model("qwen3"), 50, 3, 4)
    assert row["prefill_tokens_per_s"] == pytest.approx(150 / row["prefill_s"])
    assert row["cache_length"] == 54 and row["peak_bytes"] is None  # no device memory counter on CPU


def test_eval_efficiency_command(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    loaded = load_model_and_tokenizer(str(tiny_model_dir))[0]
    Allocation(MIXED, "kv-head", 8, 2, model=str(tiny_model_dir), model_fingerprint=model_fingerprint(loaded)).save(
        run / "allocation.safetensors")
    result = CliRunner().invoke(app, ["eval", str(run), "--efficiency", "--context-lengths", "64,128",
                                      "--decode-steps", "3", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())["efficiency"]
    assert [row["label"] for row in rows] == [f"dense ({tiny_model_dir})", "run"] * 2
    assert all(row["kv_vs_dense"] < 1 for row in rows if row["label"] == "run")
    assert "inference efficiency" in result.stdout
    bad = CliRunner().invoke(app, ["eval", str(run), "--efficiency", "--context-lengths", "x"])
    assert bad.exit_code == 2 and "--context-lengths" in bad.stderr
    alone = CliRunner().invoke(app, ["eval", str(run), "--efficiency", "--eager-reference"])
    assert alone.exit_code == 2 and alone.stderr.strip() == "error: --eager-reference only changes --compiled-decode runs"


def test_eval_efficiency_passes_the_eager_reference_on(tmp_path, tiny_model_dir, monkeypatch):
    import consa_cli.efficiency as efficiency

    seen = []
    monkeypatch.setattr(efficiency, "evaluate_efficiency", lambda targets, settings, *args: seen.append(settings) or [])
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--efficiency", "--compiled-decode",
                                      "--eager-reference"])
    assert result.exit_code == 0, result.output
    assert seen[0].compiled_decode and seen[0].eager_reference


def test_generate_speed_times_plain_generate_with_the_hybrid_caches(monkeypatch):
    """bench/generate_speed.py measures nothing but model.generate(): the static hybrid cache (kept on the model,
    reused by the timed calls) decodes what the dynamic one does, and every call produced exactly the new tokens."""
    from consa_cli.hybrid_runtime import StaticHybridCacheLayer

    module = bench_module("generate_speed", monkeypatch)  # (it imports bench/inference_speed.py)
    model = tiny_model("qwen3")
    with torch.no_grad(), hybrid_inference(model, Allocation(MIXED, "kv-head", sliding_window=8, sink_tokens=2)):
        rows = {kind: module.measure(model, 24, 2, 5, kind, repeats=2) for kind in ("dynamic", "static")}
        kept = model._consa_static_cache
    assert rows["static"]["generated"] == rows["dynamic"]["generated"]
    assert all(len(tokens) == 5 for tokens in rows["static"]["generated"])
    assert all(isinstance(layer, StaticHybridCacheLayer) and 24 + 4 <= layer.max_cache_len <= 24 + 5 for layer in kept.layers)
    for row in rows.values():
        assert 0 < row["first_token_s"] and 0 < row["generate_s"]
        assert row["decode_tokens_per_s"] is None or row["decode_tokens_per_s"] > 0
