"""Training-free attention-mass allocation and the scalar-gate + L1 ablation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from consa_cli.calibration import CalibrationSet
from consa_cli.heuristics import attention_mass_scores, attention_mass_search
from consa_cli.search import run_search
from consa_cli.settings import SearchSettings

SEQUENCES = torch.randint(0, 96, (4, 300), generator=torch.Generator().manual_seed(5))
WINDOW, SINKS = 40, 3


def reference_mass(model, sequences, window, sinks, query_mask):
    """Beyond-window mass per (layer, KV head) from transformers' own eager attention probabilities."""
    model.set_attn_implementation("eager")
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    totals = torch.zeros(config.num_hidden_layers, config.num_key_value_heads, dtype=torch.float64)
    for row, counted in zip(sequences, query_mask, strict=True):
        attentions = model(input_ids=row[None], output_attentions=True).attentions
        q_pos = torch.arange(row.numel()).unsqueeze(1)
        k_pos = torch.arange(row.numel()).unsqueeze(0)
        beyond = (k_pos <= q_pos - window) & (k_pos >= sinks)
        for layer, probs in enumerate(attentions):  # [1, Hq, T, T]
            mass = (probs[0] * beyond).sum(-1)[:, counted]  # [Hq, counted]
            totals[layer] += mass.view(config.num_key_value_heads, groups, -1).mean(dim=(1, 2)).double()
    return (totals / len(sequences)).float()  # the mean over sequences of each sequence's mean


def test_attention_mass_equals_the_eager_attention_probabilities():
    model = tiny_model("qwen3")
    mask = torch.ones_like(SEQUENCES, dtype=torch.bool)
    mask[1, :250] = False  # a "retrieval sample": only its last positions count
    scores = attention_mass_scores(model, CalibrationSet(SEQUENCES, mask), torch.arange(4), 4, WINDOW, SINKS)
    query_mask = mask.clone()
    query_mask[:, :WINDOW] = False
    torch.testing.assert_close(scores, reference_mass(model, SEQUENCES, WINDOW, SINKS, query_mask), rtol=1e-4,
                               atol=1e-6)
    assert (scores > 0).all()


def test_attention_mass_pass_leaves_the_model_and_its_logits_unchanged():
    model = tiny_model("llama")
    before = model(input_ids=SEQUENCES[:1]).logits
    calibration = CalibrationSet.text_only(SEQUENCES)
    attention_mass_scores(model, calibration, torch.arange(4), 2, WINDOW, SINKS)
    assert calibration.loss_mask.all()  # the first window is left out of the statistics, not out of the data
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "consa_mass") for m in model.modules())
    torch.testing.assert_close(model(input_ids=SEQUENCES[:1]).logits, before)


@pytest.mark.parametrize("granularity", ["layer", "kv-head", "kv-head-per-layer"])
def test_attention_mass_keeps_the_highest_scoring_units_exactly(granularity):
    settings = SearchSettings(window=WINDOW, seq_len=300, steps=3, sparsity=0.5, granularity=granularity,
                              method="attention-mass")
    allocation = attention_mass_search(settings, tiny_model("qwen3"), CalibrationSet.text_only(SEQUENCES),
                                       SINKS).allocation
    assert allocation.method == "heuristic:attention-mass"
    assert allocation.num_full_units == allocation.num_units // 2
    if granularity != "kv-head-per-layer":  # per layer, each layer keeps its own best half
        assert allocation.scores[allocation.unit_mask].min() >= allocation.scores[~allocation.unit_mask].max()


def test_scalar_l1_gates_are_pulled_down_and_ranked_to_the_exact_count():
    settings = SearchSettings(window=8, seq_len=64, steps=30, sparsity=0.5, dtype="float32", method="scalar-l1",
                              l1_weight=5.0)
    sequences = SEQUENCES[:, :64]
    result = run_search(settings, tiny_model("llama"), sequences, sink_tokens=2)
    allocation = result.allocation
    assert allocation.method == "learned:scalar-l1"
    assert allocation.num_full_units == allocation.num_units // 2
    assert (allocation.scores < 5.0).all()  # every gate moved down from its start under the L1 pull
    strong = run_search(SearchSettings(**{**settings.__dict__, "l1_weight": 50.0}), tiny_model("llama"), sequences,
                        sink_tokens=2)
    assert strong.metrics[-1]["expected_sparsity"] > result.metrics[-1]["expected_sparsity"]


def test_cli_runs_each_method_on_a_retrieval_mixture(tmp_path, tiny_model_dir, tiny_text_file):
    from test_resume import invoke

    from consa_cli.allocation import Allocation

    for method in ("attention-mass", "scalar-l1", "l0"):
        run_dir = tmp_path / method
        result = invoke("search", "--model", tiny_model_dir, "--data", tiny_text_file, "--seq-len", "32",
                        "--window", "8", "--steps", "3", "--sparsity", "0.5", "--method", method, "--output", run_dir)
        assert result.exit_code == 0, result.output
        assert f"method {method}" in result.stdout
        allocation = Allocation.load(run_dir)
        assert allocation.num_full_units == allocation.num_units // 2
        assert allocation.metadata["settings"]["method"] == method


def test_cli_rejects_an_unknown_method_in_one_line(tmp_path, tiny_model_dir):
    from test_resume import invoke

    result = invoke("search", "--model", tiny_model_dir, "--method", "magic", "--output", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr == "error: --method must be one of l0, scalar-l1, attention-mass, got 'magic'\n"


def test_attention_mass_of_a_natively_hybrid_model_follows_its_own_sliding_layers():
    """Gemma3's sliding layers see only their window: the statistic comes from the model as trained, so those
    layers have no mass beyond a larger window, and the result equals transformers' own eager probabilities."""
    model = tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=16)
    mask = torch.ones_like(SEQUENCES, dtype=torch.bool)
    scores = attention_mass_scores(model, CalibrationSet(SEQUENCES, mask), torch.arange(4), 4, WINDOW, SINKS)
    query_mask = mask.clone()
    query_mask[:, :WINDOW] = False
    torch.testing.assert_close(scores, reference_mass(model, SEQUENCES, WINDOW, SINKS, query_mask), rtol=1e-4,
                               atol=1e-6)
    assert (scores[0::2] == 0).all() and (scores[1::2] > 0).all()  # sliding layers 0, 2; full layers 1, 3
