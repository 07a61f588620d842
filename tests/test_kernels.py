"""The fast full-and-sliding attentions against the two-call SDPA reference: flex (SDPA full + FlexAttention window)
and flash (SDPA full + flash attention's window, sinks merged by log-sum-exp)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import bench_module, tiny_model

from consa_cli.attention import (
    ATTENTION_BACKENDS,
    install_hybrid,
    remove_hybrid,
    set_fa_weights,
)
from consa_cli.kernels import (
    FLASH_WINDOW,
    MATH_WINDOW,
    SlidingWindowWithSinks,
    chunked_window_mix,
    fa4_full_and_sliding,
    fa4_supported,
    flash_full_and_sliding,
    flash_supported,
    flex_supported,
    from_window_chunks,
    full_window_mix,
    math_window_with_lse,
    to_window_chunks,
    window_block_mask,
    window_chunk_block_mask,
    window_chunk_mask_mod,
    window_mix,
)
from consa_cli.search import run_search
from consa_cli.settings import SearchSettings

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the flex and flash kernels run on CUDA only")


@pytest.fixture(autouse=True)
def fresh_compiled_graphs():
    """A clean dynamo cache for every test: the compiled mix is one code object, and the tests' many shapes and
    options would pass its recompile limit (8; the search compiles it once per run: one shape, one option set)."""
    torch._dynamo.reset()
    yield


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


def sliding_reference(query, key, value, scaling, window, sinks):
    """The sliding-window branch alone (gate weights 0) of the two-call SDPA reference."""
    weight = torch.zeros(key.shape[1], dtype=query.dtype)
    return ATTENTION_BACKENDS["sdpa"].full_and_sliding(query, key, value, weight, scaling, window, sinks)


@pytest.mark.parametrize(("length", "chunk", "window", "sinks", "block_size"), [
    (64, 16, 8, 2, 16), (96, 32, 40, 3, 16), (48, 16, 5, 0, 16), (64, 32, 16, 4, 8)])
def test_window_chunks_layout_and_mask_give_the_sliding_window_forward_and_backward(length, chunk, window, sinks,
                                                                                   block_size):
    """The chunk layout with its mask_mod, run as plain float64 attention, against the two-call SDPA window: output
    and the gradients of q, k and v (the copies' gradients add up through unfold and expand). Batch 2, GQA; windows
    shorter and longer than a chunk, no sinks, a sink slot wider than the sinks."""
    query, key, value = (torch.cat([t, 0.5 * t.flip(-2)]).detach().requires_grad_()
                         for t in qkv(length, dim=8, seed=length))
    scaling = 0.4
    chunked = to_window_chunks(query, key, value, chunk, window, sinks, block_size)
    mask_mod = window_chunk_mask_mod(length // chunk, chunk, window, sinks, block_size)
    batch_index = torch.arange(chunked[0].shape[0]).view(-1, 1, 1)
    allowed = mask_mod(batch_index, 0, torch.arange(chunk).view(1, -1, 1),
                       torch.arange(chunked[1].shape[-2]).view(1, 1, -1)).unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(*chunked, attn_mask=allowed, scale=scaling, enable_gqa=True)
    got = from_window_chunks(out, batch=2)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((got * upstream).sum(), (query, key, value))
    want = sliding_reference(query, key, value, scaling, window, sinks)
    want_grads = torch.autograd.grad((want * upstream).sum(), (query, key, value))
    for got_tensor, want_tensor in zip((got, *grads), (want, *want_grads), strict=True):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=1e-10, atol=1e-10)
    # every (query, key) pair of the window is attended exactly once over the chunk layout
    assert allowed.sum().item() == sum(min(q + 1, window) + max(0, min(sinks, q - window + 1)) for q in range(length)) * 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_chunked_flex_window_graph_forward_on_cpu_equals_the_reference():
    """The chunked flex graph, uncompiled (FlexAttention's CPU forward) with its block mask, against two SDPA calls."""
    length, chunk, window, sinks, scaling, block_size = 64, 16, 8, 2, 0.25, 16
    query, key, value = (t.detach().float() for t in qkv(length))
    weight = torch.tensor([0.2, 0.7])
    reference = ATTENTION_BACKENDS["sdpa"].full_and_sliding(query, key, value, weight, scaling, window, sinks)
    full = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                            enable_gqa=True)
    mask = window_chunk_block_mask(1, length, chunk, window, sinks, "cpu", block_size)
    mixed = chunked_window_mix(query, key, value, full, weight.repeat_interleave(2), mask, scaling, chunk, window,
                               sinks, block_size)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("chunk", [0, 16])
def test_the_whole_mix_in_one_graph_equals_the_reference_and_is_laid_out_as_the_module_hands_it_on(chunk):
    """:func:`full_window_mix` (full branch, weights and window in one function; uncompiled, FlexAttention's CPU
    forward) from inputs in transformers' layout, with and without query chunks, against two SDPA calls; its output
    is a ``[B, H, T, D]`` view of ``[B, T, H, D]`` memory, so the module's ``transpose(1, 2).contiguous()`` is free."""
    length, window, sinks, scaling, block_size = 64, 8, 2, 0.25, 16
    query, key, value = (t.detach().float().transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(length))
    weight = torch.tensor([0.2, 0.7])
    reference = ATTENTION_BACKENDS["sdpa"].full_and_sliding(query, key, value, weight, scaling, window, sinks)
    mask = (window_chunk_block_mask(1, length, chunk, window, sinks, "cpu", block_size) if chunk
            else window_block_mask(length, window, sinks, "cpu", block_size))
    mixed = full_window_mix(query, key, value, weight, mask, scaling, chunk, window, sinks, block_size)
    torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-5)
    handed_on = mixed.transpose(1, 2)
    assert handed_on.is_contiguous() and handed_on.contiguous().data_ptr() == mixed.data_ptr()


def test_prepare_flex_makes_the_mask_the_window_will_use():
    """Before a compiled search: the chunked block mask for lengths that are longer multiples of the default chunk
    (for the search's sequences per step) when there are sinks, the whole-sequence mask otherwise."""
    from consa_cli import kernels

    chunk = kernels.DEFAULT_QUERY_CHUNK
    kernels.prepare_flex(2 * chunk, 64, 4, torch.device("cpu"), batch=3)
    assert ("chunks", 3, 2 * chunk, chunk, 64, 4, "cpu", kernels.DEFAULT_BLOCK_SIZE) in kernels._WINDOW_MASKS
    kernels.prepare_flex(chunk + 64, 64, 4, torch.device("cpu"), batch=3)
    assert (chunk + 64, 64, 4, "cpu", kernels.DEFAULT_BLOCK_SIZE) in kernels._WINDOW_MASKS
    assert kernels.query_chunk_for(chunk, chunk) == 0 and kernels.query_chunk_for(4 * chunk, 0) == 0
    # Without sinks the chunks are no straggler's cure (they measured slower): the whole-sequence mask.
    assert kernels.default_query_chunk(0) == 0 and kernels.default_query_chunk(4) == chunk
    kernels.prepare_flex(2 * chunk, 64, 0, torch.device("cpu"), batch=3)
    assert (2 * chunk, 64, 0, "cpu", kernels.DEFAULT_BLOCK_SIZE) in kernels._WINDOW_MASKS
    assert ("chunks", 3, 2 * chunk, chunk, 64, 0, "cpu", kernels.DEFAULT_BLOCK_SIZE) not in kernels._WINDOW_MASKS


@pytest.mark.parametrize("backend", ["sdpa", "flash-math"])
@pytest.mark.parametrize("open_heads", [(1,), (), (0, 2)])
def test_the_full_branch_on_open_heads_only_equals_the_whole_mix(backend, open_heads):
    """``full_kv_heads``: the full branch only for the open heads, the others' weight exactly 0 (a closed gate).
    Output and q / k / v gradients equal the whole mix with the same weights; the open heads' weight gradients too;
    the closed heads' weight gradients are zero (in search the clamp zeroes them anyway). float64, GQA 6 / 3 heads."""
    query, key, value = qkv(50, query_heads=6, kv_heads=3, dim=8, seed=5)
    weight = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    closed = [head for head in range(3) if head not in open_heads]
    weight[closed] = 0.0
    weight.requires_grad_()
    if backend == "sdpa":
        mix = ATTENTION_BACKENDS["sdpa"].full_and_sliding
    else:
        def mix(*args, **options):
            return flash_full_and_sliding(*args, window_kernel=MATH_WINDOW, **options)
    inputs, scaling = (query, key, value, weight), 0.4
    upstream = torch.randn(query.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = mix(*inputs, scaling, 7, 2, full_kv_heads=open_heads)
    grads = torch.autograd.grad((got * upstream).sum(), inputs)
    want = mix(*inputs, scaling, 7, 2)
    want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
    for got_tensor, want_tensor in zip((got, *grads[:3]), (want, *want_grads[:3]), strict=True):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[3][list(open_heads)], want_grads[3][list(open_heads)], rtol=1e-10, atol=1e-10)
    assert torch.all(grads[3][closed] == 0) and (not closed or torch.any(want_grads[3][closed] != 0))


def test_flex_needs_cuda():
    assert not flex_supported(torch.device("cpu"))


def errors_against_reference(backend, batch, length, window, sinks, heads, kv_heads, dim, reference_dtype, seed,
                             **options):
    """Relative errors of a backend in bf16 on the GPU against the two-call SDPA reference in ``reference_dtype`` on
    the same (bf16-rounded) inputs: the output and the gradients of q, k, v and the gate weights.

    Inputs in the layout transformers hands over (``[B, T, H, D]`` transposed to ``[B, H, T, D]``); ``options`` go
    to the backend's function (e.g. flex's ``query_chunk``).
    """
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def tensor(num_heads):
        return torch.randn(batch, length, num_heads, dim, device="cuda", dtype=torch.bfloat16,
                           generator=generator).transpose(1, 2).requires_grad_()

    query, key, value = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    weight = torch.linspace(0, 1, kv_heads, device="cuda", requires_grad=True)
    scaling = dim ** -0.5
    fast = ATTENTION_BACKENDS[backend].full_and_sliding(query, key, value, weight, scaling, window, sinks, **options)
    upstream = torch.randn(fast.shape, device="cuda", generator=generator)
    grads = torch.autograd.grad((fast.float() * upstream).sum(), (query, key, value, weight))
    exact_inputs = [t.detach().to(reference_dtype).requires_grad_() for t in (query, key, value, weight)]
    exact = ATTENTION_BACKENDS["sdpa"].full_and_sliding(*exact_inputs, scaling, window, sinks)
    exact_grads = torch.autograd.grad((exact * upstream.to(reference_dtype)).sum(), exact_inputs)
    return [((got.to(reference_dtype) - want).norm() / want.norm()).item()
            for got, want in zip((fast, *grads), (exact, *exact_grads), strict=True)]


@needs_cuda
@pytest.mark.parametrize(("batch", "length", "window", "sinks", "heads", "kv_heads", "dim"), [
    (1, 1024, 128, 4, 16, 8, 128), (2, 777, 100, 0, 16, 8, 128), (2, 300, 32, 4, 4, 2, 16)])
def test_flex_kernel_matches_float64_reference_forward_and_backward(batch, length, window, sinks, heads, kv_heads,
                                                                  dim):
    """bf16 flex on the GPU against a float64 reference of the same inputs: outputs and all four gradients."""
    errors = errors_against_reference("flex", batch, length, window, sinks, heads, kv_heads, dim, torch.float64,
                                      seed=length)
    # bf16 rounding of inputs is shared; what differs is the kernels' bf16 arithmetic: compare at bf16 scale.
    assert max(errors) < 2e-2, errors


@needs_cuda
@pytest.mark.parametrize(("batch", "length", "chunk", "window", "sinks", "heads", "kv_heads", "dim"), [
    (1, 2048, 512, 128, 4, 16, 8, 128), (2, 1024, 256, 300, 4, 4, 2, 64), (2, 1024, 512, 100, 0, 16, 8, 128)])
def test_chunked_flex_kernel_matches_float64_reference_forward_and_backward(batch, length, chunk, window, sinks,
                                                                          heads, kv_heads, dim):
    """The flex window over query chunks (``query_chunk``), bf16 on the GPU, against the float64 reference: windows
    shorter and longer than a chunk, with and without sinks, batch 2."""
    errors = errors_against_reference("flex", batch, length, window, sinks, heads, kv_heads, dim, torch.float64,
                                      seed=length, query_chunk=chunk)
    assert max(errors) < 2e-2, errors


@needs_cuda
@pytest.mark.parametrize("open_heads", [(1, 5), ()])
def test_flex_with_closed_gates_matches_the_whole_flex_mix(open_heads):
    """``full_kv_heads`` on the GPU: bf16 flex with the full branch on the open heads only, against flex over all
    heads with the same weights (closed ones exactly 0): output and q / k / v gradients."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    query, key, value = (torch.randn(1, 2048, heads, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
                         .transpose(1, 2).requires_grad_() for heads in (16, 8, 8))
    weight = torch.zeros(8, device="cuda")
    weight[list(open_heads)] = torch.tensor([0.4, 0.8], device="cuda")[:len(open_heads)]
    upstream = torch.randn(1, 16, 2048, 64, device="cuda", generator=generator)
    results = []
    for options in ({"full_kv_heads": open_heads}, {}):
        out = ATTENTION_BACKENDS["flex"].full_and_sliding(query, key, value, weight, 0.125, 256, 4, **options)
        results.append((out, *torch.autograd.grad((out.float() * upstream).sum(), (query, key, value))))
    for got, want in zip(*results, strict=True):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@needs_cuda
def test_the_flex_variants_agree_over_steps_with_new_inputs():
    """The flex backend's one graph per layer (default), the same replayed as CUDA graphs, and the full branch as an
    eager call before the compiled window (``fuse_full=False``): over three steps of new inputs (what a graph replay
    must copy in) at 2048 tokens in chunks, outputs and q / k / v / weight gradients within bf16 noise."""
    from consa_cli.kernels import flex_full_and_sliding

    variants = {"fused": {}, "graphs": {"compile_options": (("triton.cudagraphs", True),)},
                "unfused": {"fuse_full": False}}
    results = {name: [] for name in variants}
    for name, options in variants.items():
        for step in range(3):
            generator = torch.Generator(device="cuda").manual_seed(step)
            query, key, value = (torch.randn(1, 2048, heads, 64, device="cuda", dtype=torch.bfloat16,
                                             generator=generator).transpose(1, 2).requires_grad_()
                                 for heads in (16, 8, 8))
            weight = torch.rand(2, 8, device="cuda", generator=generator).requires_grad_()
            upstream = torch.randn(1, 16, 2048, 64, device="cuda", generator=generator)
            out = flex_full_and_sliding(query, key, value, weight[1], 0.125, 256, 4, **options)
            grads = torch.autograd.grad((out.float() * upstream).sum(), (query, key, value, weight))
            results[name].append([t.detach().float().clone() for t in (out, *grads)])
            torch.compiler.cudagraph_mark_step_begin()
    for name in ("fused", "graphs"):
        for got_step, want_step in zip(results[name], results["unfused"], strict=True):
            for got, want in zip(got_step, want_step, strict=True):
                assert ((got - want).norm() / want.norm()).item() < 1e-2, name


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


# --- flash: the autograd function on CPU with the math primitives, the aten flash kernels on CUDA ---------------


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize(("length", "window"), [(37, 11), (101, 13), (13, 11)])
def test_flash_function_with_math_primitives_matches_the_reference_forward_and_backward(length, window, sinks):
    """The flash backend's own autograd function, window merge and sink backward, run on the float64 math
    primitives, against autograd through the two-call SDPA reference: output and the gradients of q, k, v and the
    gate weights. (13, 11): fewer sink keys than ``sink_tokens`` ever lie beyond a window; (101, 13): the reference
    takes its blocked sliding-window path."""
    query, key, value = qkv(length, dim=8, seed=length)
    query, key, value = (torch.cat([t, 0.5 * t.flip(-2)]).detach().requires_grad_() for t in (query, key, value))
    weight = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    scaling = 0.4  # scores large enough that the sinks' share of the softmax matters
    inputs = (query, key, value, weight)
    upstream = torch.randn(query.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flash = flash_full_and_sliding(*inputs, scaling, window, sinks, window_kernel=MATH_WINDOW)
    grads = torch.autograd.grad((flash * upstream).sum(), inputs)
    reference = ATTENTION_BACKENDS["sdpa"].full_and_sliding(*inputs, scaling, window, sinks)
    reference_grads = torch.autograd.grad((reference * upstream).sum(), inputs)
    for got, want in zip((flash, *grads), (reference, *reference_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_flash_sliding_function_passes_gradcheck_with_sinks_beyond_the_window():
    """Numerical derivatives of the sliding branch alone (window 4, 3 sinks, GQA): the hand-written backward of the
    window keys (given the merged log-sum-exp) and of the sinks, independent of any reference implementation."""
    query, key, value = qkv(19, dim=8, seed=5)
    assert torch.autograd.gradcheck(lambda q, k, v: SlidingWindowWithSinks.apply(q, k, v, 0.5, 4, 3, MATH_WINDOW),
                                    (query, key, value))


def test_compiled_sink_share_equals_the_eager_one():
    """The sinks' share as the flash backend runs it on a GPU (``compile_sinks``: the broadcast reductions through
    torch.compile, fullgraph) against the same autograd function run eagerly: output and q, k, v gradients (CPU
    inductor, float32, GQA, sinks beyond a window 8 at 40 tokens)."""
    compiled_kernel = dataclasses.replace(MATH_WINDOW, compile_sinks=True)
    query, key, value = (t.float().detach() for t in qkv(40, dim=8, seed=7))
    upstream = torch.randn(query.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for kernel in (MATH_WINDOW, compiled_kernel):
        inputs = tuple(t.clone().requires_grad_() for t in (query, key, value))
        out = SlidingWindowWithSinks.apply(*inputs, 0.5, 8, 3, kernel)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), inputs)))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_prepared_block_mask_is_read_by_a_compiled_graph_not_rebuilt_in_it():
    """--compile with flex: prepare_flex makes the window's block mask eagerly, and a compiled forward that asks for
    it gets its tensors as graph inputs; without it dynamo would trace the mask's construction into the graph
    (through an lru_cache, which it ignores) and rebuild it on every call."""
    from consa_cli.kernels import _WINDOW_MASKS, prepare_flex

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def uses_mask(x):
        return x * window_block_mask(x.shape[-2], 16, 4, str(x.device)).kv_num_blocks.sum()

    _WINDOW_MASKS.clear()
    x = torch.randn(1, 2, 256, 8)
    prepare_flex(256, 16, 4, x.device)
    assert (256, 16, 4, "cpu", 128) in _WINDOW_MASKS
    assert window_block_mask(256, 16, 4, "cpu") is _WINDOW_MASKS[(256, 16, 4, "cpu", 128)]
    compiled = torch.compile(uses_mask, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), uses_mask(x))
    assert "arange" not in graphs[0].code and "vmap" not in graphs[0].code
    # Unprepared, the same function builds the mask inside its graph: what the preparation avoids.
    _WINDOW_MASKS.clear()
    torch._dynamo.reset()
    torch.compile(uses_mask, backend=backend, fullgraph=True)(x)
    assert "arange" in graphs[-1].code


@pytest.mark.parametrize("sink_tokens", [4, 0])
def test_the_flash_mix_traces_into_one_graph_of_a_compiled_model(sink_tokens):
    """`consa search --compile --attention-backend flash`: the autograd function, its window primitives and its
    sink share trace into the model's graph without a break (the sink share is then not compiled on its own),
    with the eager function's output and gradients (aot_eager: the capture and the autograd split; CPU, float32).
    With and without the sink merge: either way the float32 forward ends in a no-op cast, which under torch 2.11
    gave every input a zero gradient until the function returned a fresh view."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    kernel = dataclasses.replace(MATH_WINDOW, compile_sinks=True)
    query, key, value = (t.float().detach() for t in qkv(64, dim=8, seed=9))
    weight = torch.tensor([0.3, 0.8])
    results = []
    for run in (flash_full_and_sliding, torch.compile(flash_full_and_sliding, backend=backend)):
        inputs = tuple(t.clone().requires_grad_() for t in (query, key, value, weight))
        out = run(*inputs, 0.4, 16, sink_tokens, window_kernel=kernel)
        results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    assert len(graphs) == 1
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flash_needs_cuda_and_half_precision():
    assert not flash_supported(torch.device("cpu"))
    assert not flash_supported(torch.device("cpu"), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize(("batch", "length", "window", "sinks", "heads", "kv_heads", "dim"), [
    (1, 1000, 128, 4, 16, 8, 128), (2, 1000, 100, 0, 8, 4, 64), (1, 4096, 512, 4, 16, 8, 128),
    (1, 4096, 512, 0, 16, 8, 128), (2, 300, 32, 4, 4, 2, 16)])
def test_flash_kernel_matches_float32_reference_forward_and_backward(batch, length, window, sinks, heads, kv_heads,
                                                                   dim):
    """bf16 flash on the GPU against the two-call SDPA reference in float32: output and all four gradients, with
    and without sinks, GQA, at lengths of no particular multiple and the search's 4096."""
    assert flash_supported(torch.device("cuda"), torch.bfloat16)
    errors = errors_against_reference("flash", batch, length, window, sinks, heads, kv_heads, dim, torch.float32,
                                      seed=length + sinks)
    assert max(errors) < 2e-2, errors


@needs_cuda
def test_flash_window_primitives_match_the_math_primitives():
    """The aten flash primitives (window 64, GQA) against the float32 math ones: output, log-sum-exp (flash's is in
    natural-log units of the scaled scores, what the sink merge assumes) and the backward given a merged state."""
    query, key, value = (t.detach() for t in qkv(500, query_heads=8, kv_heads=2, dim=64, dtype=torch.bfloat16,
                                                 device="cuda"))
    out, lse, state = FLASH_WINDOW.forward(query, key, value, 0.125, 64)
    math_out, math_lse, _ = MATH_WINDOW.forward(*(t.float() for t in (query, key, value)), 0.125, 64)
    torch.testing.assert_close(out.float(), math_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, math_lse, rtol=1e-3, atol=1e-3)
    merged_lse = lse + 0.5  # as if other keys held 1 - exp(-0.5) of each query's mass
    grad_out = torch.randn_like(out)
    grads = FLASH_WINDOW.backward(grad_out, query, key, value, out, merged_lse, state, 0.125, 64)
    math_grads = MATH_WINDOW.backward(*(t.float() for t in (grad_out, query, key, value, out)), merged_lse, (),
                                      0.125, 64)
    for got, want in zip(grads, math_grads, strict=True):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


@needs_cuda
def test_gated_search_step_runs_with_the_flash_backend_and_agrees_with_sdpa():
    """Two steps of consa's search loop on a bf16 tiny Qwen3 (window 8 + 4 sinks, LM loss: the KL loss is zero
    while every gate is still full): the flash backend is used and recorded, every gate moves, and the losses
    equal the SDPA backend's on the same sampled gates."""
    sequences = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(3))
    results = {}
    for backend in ("flash", "sdpa"):
        model = tiny_model("qwen3").to("cuda", torch.bfloat16)
        settings = SearchSettings(window=8, seq_len=64, steps=2, sparsity=0.5, target_warmup_steps=0, loss="lm",
                                  dtype="bfloat16", attention_backend=backend)
        results[backend] = run_search(settings, model, sequences, sink_tokens=4)
    flash, sdpa = results["flash"], results["sdpa"]
    assert flash.allocation.metadata["attention_backend"] == "flash"
    assert (flash.allocation.scores != settings.log_alpha_init).all()
    for got, want in zip(flash.metrics, sdpa.metrics, strict=True):
        assert abs(got["task_loss"] - want["task_loss"]) < 1e-2 * abs(want["task_loss"]), (got, want)


def test_the_chunked_sink_backward_of_the_bench_equals_the_backends(monkeypatch):
    """bench/sink_variants.py's two-stage sums over the queries give the sinks' share of the gradients exactly as
    the flash backend's own (float64 on the CPU; chunks that divide the rows, and a single chunk when none does)."""
    from consa_cli import kernels as consa_kernels

    module = bench_module("sink_variants", monkeypatch)
    generator = torch.Generator().manual_seed(0)
    for length, chunk_rows in ((48, 8), (50, 8)):
        query, grad_out, out = (torch.randn(1, 4, length, 8, generator=generator, dtype=torch.float64) for _ in range(3))
        sink_key, sink_value = (torch.randn(1, 2, 3, 8, generator=generator, dtype=torch.float64) for _ in range(2))
        lse = torch.randn(1, 4, length, generator=generator, dtype=torch.float64) + 3
        expected = consa_kernels._sink_backward(grad_out, query, sink_key, sink_value, out, lse, 0.3, 16)
        chunked = module.chunked_sink_backward(grad_out, query, sink_key, sink_value, out, lse, 0.3, 16, chunk_rows)
        for got, want in zip(chunked, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_flash_attn_4_probe_reference_is_the_sliding_window_and_its_log_sum_exp(monkeypatch, tmp_path):
    """bench/fa4_window_probe.py's float32 reference on ``[B, T, H, D]`` inputs: with a window as long as the sequence
    it is causal attention, its log-sum-exp is that of the scaled causal scores, and a shorter window hides the keys
    beyond it; without CUDA the probe stops with a one-line error."""
    probe = bench_module("fa4_window_probe", monkeypatch)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 24, heads, 8, generator=generator) for heads in (4, 2, 2))
    out, lse = probe.reference(query, key, value, 0.3, 24)
    causal = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, causal.transpose(1, 2), rtol=1e-5, atol=1e-5)
    scores = query.transpose(1, 2) @ key.repeat_interleave(2, 2).permute(0, 2, 3, 1) * 0.3
    scores = scores.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    windowed, _ = probe.reference(query, key, value, 0.3, 1)  # each query sees itself only
    torch.testing.assert_close(windowed, value.repeat_interleave(2, 2), rtol=1e-5, atol=1e-5)
    if not torch.cuda.is_available():
        monkeypatch.setattr("sys.argv", ["fa4_window_probe.py", "--json", str(tmp_path / "probe.json")])
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            probe.main()


# --- fa4: flash-attn-4's window (CUDA, the package installed); on CPU the same mix with a plain-torch window ---------


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize(("length", "window"), [(37, 11), (101, 13), (13, 11)])
def test_the_fa4_mix_with_a_math_window_matches_the_reference_forward_and_backward(length, window, sinks):
    """The fa4 backend's mix -- window output and log-sum-exp, the sinks beyond the window merged under autograd,
    the mix -- with the plain-torch stand-in for flash-attn-4's window, against autograd through the two-call SDPA
    reference in float64: output and the gradients of q, k, v and the gate weights (batch 2, GQA)."""
    query, key, value = qkv(length, dim=8, seed=length)
    query, key, value = (torch.cat([t, 0.5 * t.flip(-2)]).detach().requires_grad_() for t in (query, key, value))
    weight = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    inputs = (query, key, value, weight)
    got = fa4_full_and_sliding(query, key, value, weight, 0.35, window, sinks, window_with_lse=math_window_with_lse)
    want = ATTENTION_BACKENDS["sdpa"].full_and_sliding(query, key, value, weight, 0.35, window, sinks)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
    for got_tensor, want_tensor in zip((got, *got_grads), (want, *want_grads), strict=True):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=1e-10, atol=1e-10)


def test_the_fa4_backend_says_what_it_needs():
    """Without a Hopper GPU and the package: a one-line error naming both (and half precision); not with --compile."""
    from consa_cli.search import resolve_attention_backend
    from consa_cli.settings import SettingsError, build_settings

    assert not fa4_supported(torch.device("cpu"), torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="compute capability 9.0.*flash-attn-4"):
            resolve_attention_backend("fa4", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(SettingsError, match="fa4 cannot be combined with --compile"):
        build_settings(SearchSettings, None, attention_backend="fa4", compile=True)


needs_fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and fa4_supported(torch.device("cuda"), torch.bfloat16)),
                               reason="the fa4 backend needs Hopper or newer and flash-attn-4")


@needs_fa4
@pytest.mark.parametrize(("batch", "length", "window", "sinks", "heads", "kv_heads", "dim"), [
    (1, 1024, 128, 4, 16, 8, 128), (2, 777, 100, 0, 16, 8, 128), (2, 1024, 300, 4, 4, 2, 64)])
def test_fa4_kernel_matches_float64_reference_forward_and_backward(batch, length, window, sinks, heads, kv_heads, dim):
    """bf16 fa4 (flash-attn-4's window) on the GPU against the float64 two-call reference: output and all four
    gradients."""
    errors = errors_against_reference("fa4", batch, length, window, sinks, heads, kv_heads, dim, torch.float64,
                                      seed=length)
    assert max(errors) < 2e-2, errors
