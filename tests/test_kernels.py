"""The flex full-and-sliding attention (SDPA full + FlexAttention window) against the two-call SDPA reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from consa_cli.attention import (
    ATTENTION_BACKENDS,
    install_hybrid,
    remove_hybrid,
    set_fa_weights,
)
from consa_cli.kernels import flex_supported, window_block_mask, window_mix

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flex backward runs on CUDA only")


def qkv(length, query_heads=4, kv_heads=2, dim=16, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(1, heads, length, dim, generator=generator, dtype=dtype)
               for heads in (query_heads, kv_heads, kv_heads)]
    return [t.to(device).requires_grad_() for t in tensors]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("block_size", [128, 16])
def test_flex_window_graph_forward_on_cpu_equals_the_reference(block_size):
    """The flex graph, uncompiled (FlexAttention's CPU forward), against two SDPA calls; window 8 + 2 sinks, with
    the default tile and a tile smaller than the sequence (the tuning knob of bench/search_speed.py)."""
    length, window, sinks, scaling = 64, 8, 2, 0.25
    query, key, value = (t.detach().float() for t in qkv(length))
    weight = torch.tensor([0.2, 0.7])
    reference = ATTENTION_BACKENDS["sdpa"].full_and_sliding(query, key, value, weight, scaling, window, sinks)
    full = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                            enable_gqa=True)
    mixed = window_mix(query, key, value, full, weight.repeat_interleave(2),
                       window_block_mask(length, window, sinks, "cpu", block_size), scaling)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)


def test_flex_needs_cuda():
    assert not flex_supported(torch.device("cpu"))


@needs_cuda
@pytest.mark.parametrize(("batch", "length", "window", "sinks", "heads", "kv_heads", "dim"), [
    (1, 1024, 128, 4, 16, 8, 128), (2, 777, 100, 0, 16, 8, 128), (2, 300, 32, 4, 4, 2, 16)])
def test_flex_kernel_matches_float64_reference_forward_and_backward(batch, length, window, sinks, heads, kv_heads,
                                                                  dim):
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
    flex = ATTENTION_BACKENDS["flex"].full_and_sliding(query, key, value, weight, scaling, window, sinks)
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
def test_flex_backend_search_forward_and_gate_gradient_match_sdpa_on_a_model():
    model = tiny_model("qwen3").to("cuda")  # float32: the reference's own rounding stays far below the bound
    tokens = torch.randint(0, 96, (2, 300), generator=torch.Generator().manual_seed(0)).to("cuda")
    outputs = {}
    for name in ("sdpa", "flex"):
        install_hybrid(model, torch.ones(4, 2, dtype=torch.bool), 32, 4, name)
        weights = torch.tensor([[0.0, 1.0], [0.5, 0.25], [1.0, 1.0], [0.1, 0.9]], device="cuda", requires_grad=True)
        set_fa_weights(model, weights)
        logits = model(tokens, use_cache=False).logits.float()
        grad, = torch.autograd.grad(logits.logsumexp(-1).mean(), weights)
        outputs[name] = (logits, grad)
        remove_hybrid(model)
    (logits, grad), (reference_logits, reference_grad) = outputs["flex"], outputs["sdpa"]
    logit_error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    grad_error = ((grad - reference_grad).norm() / reference_grad.norm()).item()
    assert logit_error < 5e-3 and grad_error < 2e-2, (logit_error, grad_error, grad.tolist(), reference_grad.tolist())
