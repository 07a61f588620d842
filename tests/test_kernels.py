"""The one-pass full-and-sliding attention: its merge math (CPU) and the flex kernels against the SDPA reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from consa_cli.attention import (
    ATTENTION_BACKENDS,
    causal_window_mask,
    install_hybrid,
    remove_hybrid,
    set_fa_weights,
)
from consa_cli.kernels import _flex_mix, flex_supported, merge_partials

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flex backward runs on CUDA only")


def partial_attention(query, key, value, allowed, scaling):
    """Plain attention over the keys ``allowed`` marks, with its log-sum-exp (``-inf`` and output 0 where none)."""
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return probs @ value, lse


def qkv(length, query_heads=4, kv_heads=2, dim=16, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(1, heads, length, dim, generator=generator, dtype=dtype)
               for heads in (query_heads, kv_heads, kv_heads)]
    return [t.to(device).requires_grad_() for t in tensors]


@pytest.mark.parametrize(("window", "sinks"), [(8, 0), (8, 3), (16, 4)])
def test_window_and_beyond_window_partials_merge_into_full_and_the_mix(window, sinks):
    """The LSE merge of the two disjoint key sets equals full attention and the reference mix, gradients too."""
    length, scaling = 40, 0.3
    query, key, value = qkv(length)
    weight = torch.tensor([0.3, 0.9], dtype=torch.float64, requires_grad=True)
    causal = causal_window_mask(length, length, None, 0, "cpu")
    in_window = causal_window_mask(length, length, window, sinks, "cpu")
    beyond = causal & ~in_window
    assert not beyond[:window].any() and beyond[-1].sum() == length - window - sinks  # rows with no key beyond

    key_states, value_states = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    window_out, window_lse = partial_attention(query, key_states, value_states, in_window, scaling)
    beyond_out, beyond_lse = partial_attention(query, key_states, value_states, beyond, scaling)
    full, _ = partial_attention(query, key_states, value_states, causal, scaling)
    torch.testing.assert_close(merge_partials(window_out, window_lse, beyond_out, beyond_lse, torch.ones(4)), full,
                               rtol=1e-12, atol=1e-12)
    mixed = merge_partials(window_out, window_lse, beyond_out, beyond_lse, weight.repeat_interleave(2))
    per_head = weight.repeat_interleave(2).view(1, -1, 1, 1)
    reference = window_out + per_head * (full - window_out)
    torch.testing.assert_close(mixed, reference, rtol=1e-12, atol=1e-12)
    eager = ATTENTION_BACKENDS["eager"].full_and_sliding(query, key, value, weight, scaling, window, sinks)
    torch.testing.assert_close(mixed, eager, rtol=1e-5, atol=1e-6)  # the eager softmax runs in float32

    upstream = torch.randn_like(reference)
    grads = torch.autograd.grad((mixed * upstream).sum(), (query, key, value, weight), retain_graph=True)
    expected = torch.autograd.grad((reference * upstream).sum(), (query, key, value, weight))
    for grad, reference_grad in zip(grads, expected, strict=True):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, reference_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_graphs_forward_on_cpu_equal_the_reference():
    """Both flex graphs, uncompiled (FlexAttention's CPU forward), against two SDPA calls; window 8 + 2 sinks."""
    from consa_cli.kernels import _block_masks, _window_mix

    length, window, sinks, scaling = 64, 8, 2, 0.25
    query, key, value = (t.detach().float() for t in qkv(length))
    weight = torch.tensor([0.2, 0.7])
    window_mask, beyond_mask = _block_masks(length, window, sinks, "cpu")
    reference = ATTENTION_BACKENDS["sdpa"].full_and_sliding(query, key, value, weight, scaling, window, sinks)
    one_pass = _flex_mix(query, key, value, weight.repeat_interleave(2), window_mask, beyond_mask, scaling)
    torch.testing.assert_close(one_pass, reference, rtol=1e-5, atol=1e-5)
    full = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                            enable_gqa=True)
    sdpa_and_window = _window_mix(query, key, value, full, weight.repeat_interleave(2), window_mask, scaling)
    torch.testing.assert_close(sdpa_and_window, reference, rtol=1e-5, atol=1e-5)


def test_flex_needs_cuda():
    assert not flex_supported(torch.device("cpu"))


FLEX_BACKENDS = ["flex", "flex-one-pass"]


@needs_cuda
@pytest.mark.parametrize("backend", FLEX_BACKENDS)
@pytest.mark.parametrize(("batch", "length", "window", "sinks", "heads", "kv_heads", "dim"), [
    (1, 1024, 128, 4, 16, 8, 128), (2, 777, 100, 0, 16, 8, 128), (2, 300, 32, 4, 4, 2, 16)])
def test_flex_kernels_match_float64_reference_forward_and_backward(backend, batch, length, window, sinks, heads,
                                                                   kv_heads, dim):
    """bf16 flex on the GPU against a float64 reference of the same inputs: outputs and all four gradients.

    Inputs in the layout transformers hands over (``[B, T, H, D]`` transposed to ``[B, H, T, D]``).
    """
    generator = torch.Generator(device="cuda").manual_seed(length)

    def tensor(num_heads):
        return torch.randn(batch, length, num_heads, dim, device="cuda", dtype=torch.bfloat16,
                           generator=generator).transpose(1, 2).requires_grad_()

    query, key, value = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    weight = torch.linspace(0, 1, kv_heads, device="cuda", requires_grad=True)
    scaling = dim ** -0.5
    flex = ATTENTION_BACKENDS[backend].full_and_sliding(query, key, value, weight, scaling, window, sinks)
    upstream = torch.randn(flex.shape, device="cuda", generator=generator)
    grads = torch.autograd.grad((flex.float() * upstream).sum(), (query, key, value, weight))
    exact_inputs = [t.detach().double().requires_grad_() for t in (query, key, value, weight)]
    exact = ATTENTION_BACKENDS["sdpa"].full_and_sliding(*exact_inputs, scaling, window, sinks)
    exact_grads = torch.autograd.grad((exact * upstream.double()).sum(), exact_inputs)
    # bf16 rounding of inputs is shared; what differs is the kernels' bf16 arithmetic: compare at bf16 scale.
    errors = [((got.double() - want).norm() / want.norm()).item()
              for got, want in zip((flex, *grads), (exact, *exact_grads), strict=True)]
    assert max(errors) < 2e-2, errors


@needs_cuda
@pytest.mark.parametrize("backend", FLEX_BACKENDS)
def test_flex_backend_search_forward_and_gate_gradient_match_sdpa_on_a_model(backend):
    model = tiny_model("qwen3").to("cuda")  # float32: the reference's own rounding stays far below the bound
    tokens = torch.randint(0, 96, (2, 300), generator=torch.Generator().manual_seed(0)).to("cuda")
    outputs = {}
    for name in ("sdpa", backend):
        install_hybrid(model, torch.ones(4, 2, dtype=torch.bool), 32, 4, name)
        weights = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 1.0], [0.1, 0.9]], device="cuda", requires_grad=True)
        set_fa_weights(model, weights)
        logits = model(tokens, use_cache=False).logits.float()
        grad, = torch.autograd.grad(logits.logsumexp(-1).mean(), weights)
        outputs[name] = (logits, grad)
        remove_hybrid(model)
    (logits, grad), (reference_logits, reference_grad) = outputs[backend], outputs["sdpa"]
    logit_error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    grad_error = ((grad - reference_grad).norm() / reference_grad.norm()).item()
    assert logit_error < 1e-3 and grad_error < 1e-2, (logit_error, grad_error, grad.tolist(), reference_grad.tolist())
