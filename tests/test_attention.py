"""The hybrid attention: exact against the original model, transformers' native windows and a slow reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DynamicCache

from consa_cli.attention import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    causal_window_mask,
    consa_attention_forward,
    hybrid_attention,
    install_hybrid,
    original_attention,
    remove_hybrid,
)
from consa_cli.baselines import native_allocation
from consa_cli.families import adapter_for

WINDOW = 8
TOKENS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
MIXED = torch.tensor([[True, False], [False, False], [False, True], [True, True]])


def test_native_allocation_reproduces_original_logits(family):
    """All full attention, or for Gemma3 its own 5:1 sliding pattern, is the original model exactly."""
    model = tiny_model(family)
    reference = model(TOKENS).logits
    native = native_allocation(model.config)
    assert native.num_full_units == (4 if family != "gemma3_text" else 0)  # tiny Gemma3: 4 layers < 6
    with hybrid_attention(model, native.fa_mask, native.sliding_window, native.sink_tokens):
        hybrid = model(TOKENS).logits
    # Full attention takes the very same SDPA call: bit-exact. Gemma3's sliding layers go through consa's
    # blocked sliding-window path, which sums in another order: equal to float32 rounding.
    tolerance = 0.0 if family != "gemma3_text" else 1e-5
    torch.testing.assert_close(hybrid, reference, rtol=0, atol=tolerance)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_original_attention_is_the_model_itself_inside_an_installed_hybrid():
    """The search teacher of a natively hybrid model (Gemma3) is its own pattern, not all-full attention."""
    model = tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 2)
    reference = model(TOKENS).logits
    with hybrid_attention(model, torch.ones(4, 2, dtype=torch.bool), 8, 0):
        all_full = model(TOKENS).logits
        with original_attention(model):
            teacher = model(TOKENS).logits
        assert model.config._attn_implementation != "sdpa"  # the hybrid is back on
        torch.testing.assert_close(model(TOKENS).logits, all_full, rtol=0, atol=0)
    torch.testing.assert_close(teacher, reference, rtol=0, atol=0)
    assert (all_full - reference).abs().max() > 1e-3  # at 40 tokens > window 8 all-full is another model
    with original_attention(model):  # no hybrid installed: nothing to switch
        torch.testing.assert_close(model(TOKENS).logits, reference, rtol=0, atol=0)


def test_all_sliding_without_sinks_equals_native_sliding_window(family):
    overrides = {}
    if family == "gemma3_text":  # Gemma3 ties RoPE to the layer type: compare on an all-sliding Gemma3
        overrides = {"layer_types": ["sliding_attention"] * 4, "sliding_window": WINDOW}
    model = tiny_model(family, **overrides)
    native_config = adapter_for(family).native_layer_export(model.config.to_dict(), [False] * 4, WINDOW)
    native = AutoModelForCausalLM.from_config(AutoConfig.for_model(**native_config), attn_implementation="sdpa")
    native.load_state_dict(model.state_dict())
    with hybrid_attention(model, torch.zeros(4, 2, dtype=torch.bool), WINDOW, sink_tokens=0):
        sliding = model(TOKENS).logits
    with hybrid_attention(model, torch.ones(4, 2, dtype=torch.bool), WINDOW, sink_tokens=0):
        full = model(TOKENS).logits
    torch.testing.assert_close(sliding, native.eval()(TOKENS).logits, rtol=1e-5, atol=1e-5)
    assert (sliding - full).abs().max() > 1e-3  # the window really bites at 40 tokens


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Slow reference: every query head separately, an explicit mask built from first principles."""
    hybrid = module.consa_hybrid
    groups = query.shape[1] // key.shape[1]
    q_len, kv_len = query.shape[2], key.shape[2]
    outputs = []
    for head in range(query.shape[1]):
        kv_head = head // groups
        full = bool(hybrid.fa_weight[kv_head])
        mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
        for i in range(q_len):
            q_pos = kv_len - q_len + i
            for k in range(q_pos + 1):
                mask[i, k] = full or k > q_pos - hybrid.sliding_window or k < hybrid.sink_tokens
        scores = query[:, head] @ key[:, kv_head].transpose(-1, -2) * scaling
        scores = scores.masked_fill(~mask, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ value[:, kv_head])
    return torch.stack(outputs, dim=1).transpose(1, 2), None


AttentionInterface.register("consa_reference", _reference_attention)


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_mixed_head_allocation_equals_slow_reference(family, sinks, backend):
    model = tiny_model(family)
    install_hybrid(model, MIXED, WINDOW, sinks, backend=backend)
    hybrid = model(TOKENS).logits
    model.set_attn_implementation("consa_reference")
    reference = model(TOKENS).logits
    remove_hybrid(model)
    torch.testing.assert_close(hybrid, reference, rtol=1e-4, atol=1e-4)


def test_relaxed_weights_mix_full_and_sliding_outputs():
    model = tiny_model("qwen3")
    module = model.model.layers[0].self_attn
    query, key, value = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    outputs = {}
    for name, weight in {"full": torch.ones(2, dtype=torch.bool), "sliding": torch.zeros(2, dtype=torch.bool),
                         "mix": torch.tensor([0.25, 0.75])}.items():
        install_hybrid(model, weight.expand(4, 2), WINDOW, 2)
        outputs[name], _ = consa_attention_forward(module, query, key, value, None, scaling=0.25)
        remove_hybrid(model)
    mix_per_head = torch.tensor([0.25, 0.25, 0.75, 0.75]).view(1, 1, 4, 1)
    expected = mix_per_head * outputs["full"] + (1 - mix_per_head) * outputs["sliding"]
    torch.testing.assert_close(outputs["mix"], expected, rtol=1e-5, atol=1e-6)


def test_blocked_sliding_window_accepts_kernels_returning_another_layout(monkeypatch):
    """CUDA's memory-efficient SDPA returns [B, T, H, D]-strided outputs; the blocked window path must cope."""
    sdpa = ATTENTION_BACKENDS["sdpa"]

    def strided_sdpa(*args):
        return sdpa.attend(*args).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setitem(ATTENTION_BACKENDS, "strided", AttentionBackend(strided_sdpa, sdpa.full_and_sliding))
    model = tiny_model("qwen3")
    all_sliding = torch.zeros(4, 2, dtype=torch.bool)
    assert TOKENS.shape[1] >= 4 * WINDOW  # the blocked path
    outputs = []
    for backend in ("sdpa", "strided"):
        with hybrid_attention(model, all_sliding, WINDOW, 2, backend):
            outputs.append(model(TOKENS).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


def test_incremental_decoding_matches_full_forward(family):
    """With a KV cache, queries at later positions must see the same window and sinks as in one pass."""
    model = tiny_model(family)
    install_hybrid(model, MIXED, WINDOW, 2)
    full_pass = model(TOKENS[:1]).logits
    cache = DynamicCache()
    prefix = model(TOKENS[:1, :25], past_key_values=cache, use_cache=True).logits
    steps = [model(TOKENS[:1, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(25, 40)]
    remove_hybrid(model)
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full_pass, rtol=1e-4, atol=1e-4)


def test_window_mask_semantics():
    mask = causal_window_mask(5, 5, window=2, sink_tokens=1, device="cpu")
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_install_rejects_wrong_layer_count():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="3 layers, model has 4"):
        install_hybrid(model, torch.ones(3, 2, dtype=torch.bool), WINDOW, 0)


def test_hard_allocation_forward_reads_no_device_value_on_the_host():
    """Which heads are full is read once at install: a forward (prefill or decode) has no host sync."""
    from consa_cli.efficiency import OpCounter

    model = tiny_model("qwen3")
    for mask in (MIXED, MIXED.sort(dim=1, descending=True).values):  # gathered heads, then FA-first slices
        with torch.no_grad(), hybrid_attention(model, mask, WINDOW, 2), OpCounter() as counter:
            cache = DynamicCache()
            model(TOKENS, past_key_values=cache, use_cache=True)
            model(TOKENS[:, :1], past_key_values=cache, use_cache=True)
        assert counter.counts.host_syncs == 0, counter.counts.by_op


@pytest.mark.parametrize("model_type", ["qwen3", "llama", "gemma3_text"])
def test_the_unpadded_hybrid_gets_no_causal_mask_even_while_transformers_traces(monkeypatch, model_type):
    """While a CUDA graph is captured or dynamo traces, transformers cannot rule out packed sequences and builds the
    full causal mask for the plain ``consa`` name (the relaxed mix then takes the two-call reference path with a
    T x T mask: the graphed search step at 0.36x dense, benchmarks.md session 18). The search installs the hybrid
    for unpadded rows, which gets no mask at all: same logits, the fast path on every layer; a padding mask is
    refused there. Without a cache, as the search calls the model: with one transformers skips the packing check."""
    import transformers.masking_utils as masking_utils

    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    calls = []
    original = ATTENTION_BACKENDS["sdpa"]

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original.full_and_sliding(*args, **kwargs)

    monkeypatch.setitem(ATTENTION_BACKENDS, "sdpa", AttentionBackend(original.attend, spy))
    weights = torch.full((layers, model.config.num_key_value_heads), 0.5)
    with torch.no_grad():
        install_hybrid(model, weights, WINDOW, 2, backend="sdpa")
        try:
            reference = model(input_ids=TOKENS, use_cache=False).logits
            assert len(calls) == layers  # outside tracing transformers skips the causal square by itself
            monkeypatch.setattr(masking_utils, "is_tracing", lambda *args, **kwargs: True)
            calls.clear()
            model(input_ids=TOKENS, use_cache=False)
            assert calls == [], "the plain name got no mask under tracing: this test no longer shows the problem"
        finally:
            remove_hybrid(model)
        install_hybrid(model, weights, WINDOW, 2, backend="sdpa", padding_masks=False)
        try:
            calls.clear()
            logits = model(input_ids=TOKENS, use_cache=False).logits
            assert len(calls) == layers, "a causal mask reached the attention and sent it to the two-call path"
            torch.testing.assert_close(logits, reference)
            with original_attention(model):
                assert model.config._attn_implementation == "sdpa"
            assert model.config._attn_implementation == "consa_unpadded"  # the teacher's switch restores it
            with pytest.raises(ValueError, match="unpadded inputs"):
                model(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS))
        finally:
            remove_hybrid(model)
    assert model.config._attn_implementation == "sdpa"
