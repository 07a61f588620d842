"""Hybrid inference: exact KV-head permutation, a cache that keeps only the window, generate() token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import consa_cli.hybrid_runtime as runtime
from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention
from consa_cli.efficiency import OpCounter, cache_argument, decode_step_ops, new_cache
from consa_cli.export import native_config
from consa_cli.hybrid_runtime import HybridCacheLayer, StaticHybridCacheLayer, hybrid_cache
from consa_cli.inference import hybrid_inference, kv_head_order, permute_kv_heads
from consa_cli.models import model_fingerprint

WINDOW = 8
MIXED = torch.tensor([[True, False], [False, False], [False, True], [True, True]])
PROMPT = torch.randint(2, 96, (2, 37), generator=torch.Generator().manual_seed(3))


def _allocation(mask: torch.Tensor, sinks: int = 2, granularity: str = "kv-head") -> Allocation:
    return Allocation(mask, granularity, sliding_window=WINDOW, sink_tokens=sinks)


def _cache(generated):
    return getattr(generated, "cache", None) or generated.past_key_values  # renamed in transformers 5.2x


def test_kv_head_order_puts_full_heads_first():
    order = kv_head_order(torch.tensor([[False, True, False, True], [True, False, False, False]]))
    assert order.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]


def test_permuting_kv_heads_keeps_logits_and_fingerprint(family):
    model = tiny_model(family, num_attention_heads=8, num_key_value_heads=4)
    tokens = PROMPT[:, :20]
    reference, fingerprint = model(tokens).logits, model_fingerprint(model)
    order = torch.tensor([[3, 1, 0, 2], [1, 0, 3, 2], [0, 1, 2, 3], [2, 3, 1, 0]])
    k_before = model.model.layers[0].self_attn.k_proj.weight.clone()
    permute_kv_heads(model, order)
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.weight, k_before)
    torch.testing.assert_close(model(tokens).logits, reference, rtol=1e-5, atol=1e-5)
    assert model_fingerprint(model) == fingerprint


@pytest.mark.parametrize("sinks", [0, 2])
def test_generate_matches_reference_token_for_token(family, sinks):
    """Greedy generate() on the permuted model with the hybrid cache = consa's attention with a DynamicCache."""
    model = tiny_model(family)
    allocation = _allocation(MIXED, sinks)
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with hybrid_attention(model, allocation.fa_mask, WINDOW, sinks):
        reference = model.generate(PROMPT, past_key_values=DynamicCache(), **settings)
    with hybrid_inference(model, allocation):
        generated = model.generate(PROMPT, return_dict_in_generate=True, **settings)
    assert torch.equal(generated.sequences, reference)
    assert all(isinstance(layer, HybridCacheLayer) for layer in _cache(generated).layers)  # generate() picked it
    assert model.config._attn_implementation == "sdpa"


def test_hybrid_logits_match_the_masked_model_in_prefill_and_decode(family):
    model = tiny_model(family)
    allocation = _allocation(MIXED)
    with hybrid_attention(model, allocation.fa_mask, WINDOW, 2):
        reference = model(PROMPT).logits
    with hybrid_inference(model, allocation):
        cache = hybrid_cache(model)
        prefill = model(PROMPT[:, :30], past_key_values=cache).logits
        steps = [model(PROMPT[:, i : i + 1], past_key_values=cache).logits for i in range(30, 33)]
        chunk = model(PROMPT[:, 33:], past_key_values=cache).logits  # several new tokens on a trimmed cache
    hybrid = torch.cat([prefill, *steps, chunk], dim=1)
    torch.testing.assert_close(hybrid, reference, rtol=1e-4, atol=1e-4)


def test_cache_keeps_full_history_for_fa_heads_and_window_plus_sinks_for_the_rest():
    model = tiny_model("qwen3")
    allocation = _allocation(MIXED, sinks=2)
    with hybrid_inference(model, allocation):
        cache = hybrid_cache(model)
        model(PROMPT, past_key_values=cache)
        model(PROMPT[:, :1], past_key_values=cache)
    length = PROMPT.shape[1] + 1
    for layer, row in zip(cache.layers, MIXED, strict=True):
        full, sliding = int(row.sum()), int((~row).sum())
        assert (layer.full_keys.shape[1] if layer.full_keys is not None else 0) == full
        if full:
            assert layer.full_keys.shape[2] >= length  # capacity: the whole history (+ growth room)
        if sliding:
            assert layer.sliding_keys.shape[1:3] == (sliding, 2 + WINDOW)  # sinks + a ring of the window
        else:
            assert layer.sliding_keys is None
        assert layer.get_seq_length() == length


@pytest.mark.parametrize("sinks", [0, 3])
def test_sliding_ring_returns_every_key_the_newest_query_sees_at_its_position(sinks):
    """Keys that carry their own position: after any mix of prefills, decode steps and chunks, the cache returns
    exactly the sinks and the window of the newest query, each labelled with its true position."""
    layer, length = HybridCacheLayer(full_heads=1, sliding_window=WINDOW, sink_tokens=sinks), 0
    for chunk in [5, 1, 1, 4, *[1] * 13, 7, *[1] * 9, 20, 1]:
        keys = torch.arange(length, length + chunk, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 3, -1, 2)
        length += chunk
        returned, _ = layer.update(keys, keys)
        positions = returned.sliding_positions("cpu")
        assert torch.equal(returned.sliding[0, 0, :, 0], positions.float())
        assert torch.equal(returned.full[0, 0, :, 0], torch.arange(length, dtype=torch.float32))
        newest_sees = {p for p in range(length) if p < sinks or p > length - 1 - WINDOW}
        assert newest_sees <= set(positions.tolist()) <= set(range(length))
        if chunk == 1:  # a decode step attends to the whole ring, unmasked: it must hold nothing else
            assert sorted(positions.tolist()) == sorted(newest_sees)
    assert layer.sliding_keys.shape[2] == sinks + WINDOW


@pytest.mark.parametrize("granularity", ["layer", "kv-head"])
def test_static_cache_gives_the_dynamic_caches_logits_in_prefill_decode_and_chunks(granularity):
    """The compile-ready cache: fixed buffers, positions as tensors, the same logits as the dynamic cache through a
    prompt, decode steps past the window's wrap-around, and a chunk of several tokens on a filled cache."""
    model = tiny_model("qwen3")
    mask = MIXED[:, :1].expand(-1, 2) if granularity == "layer" else MIXED
    with hybrid_inference(model, _allocation(mask, granularity=granularity)):
        logits = {}
        for name, cache in (("dynamic", hybrid_cache(model)), ("static", hybrid_cache(model, max_cache_len=64))):
            parts = [model(PROMPT[:, :20], past_key_values=cache).logits]
            parts += [model(PROMPT[:, i : i + 1], past_key_values=cache).logits for i in range(20, 33)]
            parts.append(model(PROMPT[:, 33:], past_key_values=cache).logits)
            parts += [model(PROMPT[:, i : i + 1], past_key_values=cache).logits for i in range(33, 37)]
            logits[name] = torch.cat(parts, dim=1)
        assert all(isinstance(layer, StaticHybridCacheLayer) for layer in cache.layers)
        assert int(cache.get_seq_length()) == 41
    torch.testing.assert_close(logits["static"], logits["dynamic"], rtol=1e-5, atol=1e-5)


def _assert_one_run_per_row_without_padding(cache, pads: list[int]) -> None:
    """What lets flash read a static cache's sliding slots: each row's filled slots are one run, none padding."""
    for layer in (layer for layer in cache.layers if layer.sliding_keys is not None):
        for row, pad in enumerate(pads):
            held = layer.slot_positions[row]
            filled = (held >= 0).nonzero().flatten()
            assert torch.equal(filled, torch.arange(int(filled[0]), int(filled[0]) + len(filled)))
            assert (held[held >= 0] >= pad).all()


@pytest.mark.parametrize("known", [True, False], ids=["padding-known", "padding-unknown"])
def test_static_cache_with_left_padding_gives_the_dynamic_caches_logits_through_chunks(known):
    """Left-padded rows: a static cache told the padding keeps no padded position in its sliding slots (each row's
    ring starts at its first real position), one not told keeps them and masks them; both give the dynamic cache's
    logits at every real position through a prompt, decode steps past the wrap-around and a chunk."""
    model = tiny_model("llama")
    prompt, real = PROMPT.clone(), torch.ones_like(PROMPT)
    prompt[1, :5], real[1, :5] = 0, 0
    with hybrid_inference(model, _allocation(MIXED)):
        logits = {}
        for name, cache in (("dynamic", hybrid_cache(model)),
                            ("static", hybrid_cache(model, 64, left_padding=[0, 5] if known else None))):
            def run(start, stop, cache=cache, check=known and name == "static"):
                out = model(prompt[:, start:stop], attention_mask=real[:, :stop], past_key_values=cache).logits
                if check:
                    _assert_one_run_per_row_without_padding(cache, [0, 5])
                return out
            parts = [run(0, 12), *[run(i, i + 1) for i in range(12, 26)], run(26, 30)]
            parts += [run(i, i + 1) for i in range(30, 37)]
            logits[name] = torch.cat(parts, dim=1)
    kept = real.bool()
    torch.testing.assert_close(logits["static"][kept], logits["dynamic"][kept], rtol=1e-5, atol=1e-5)


def test_left_padding_is_read_off_the_attention_mask_only_when_it_is_left_padding():
    assert runtime.left_padding_of(None) == 0
    assert runtime.left_padding_of(torch.tensor([[1, 1, 1], [0, 0, 1]])) == [0, 2]
    assert runtime.left_padding_of(torch.tensor([[1, 1, 0], [1, 1, 1]])) is None  # right padding: unknown
    assert runtime.left_padding_of(torch.tensor([[0, 1, 0, 1]])) is None  # a hole


def test_static_cache_ring_holds_each_slots_position():
    layer = StaticHybridCacheLayer(full_heads=1, sliding_window=WINDOW, sink_tokens=3, max_cache_len=64)
    length = 0
    for chunk in [5, *[1] * 11, 4, *[1] * 9]:
        keys = torch.arange(length, length + chunk, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 3, -1, 2)
        length += chunk
        layer.update(keys, keys)
        held = layer.slot_positions[0]
        assert torch.equal(layer.sliding_keys[0, 0, :, 0], held.clamp(min=0).float() * (held >= 0))
        assert set(held[held >= 0].tolist()) == {p for p in range(length) if p < 3 or p > length - 1 - WINDOW}
        assert torch.equal(layer.full_keys[0, 0, :length, 0], torch.arange(length, dtype=torch.float32))
    with pytest.raises(ValueError, match="holds 64 tokens; this input needs 65"):
        layer.update(torch.zeros(1, 3, 65 - length, 2), torch.zeros(1, 3, 65 - length, 2))


def test_static_generate_matches_dynamic_token_for_token():
    """``generate(cache_implementation="static")`` builds the static hybrid cache (compiled on CUDA by
    transformers; eager here) and decodes what the dynamic cache decodes, left padding included."""
    model = tiny_model("llama")
    prompt = PROMPT.clone()
    attention_mask = torch.ones_like(prompt)
    prompt[1, :5], attention_mask[1, :5] = 0, 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    with hybrid_inference(model, _allocation(MIXED)):
        dynamic = model.generate(prompt, **settings)
        static = model.generate(prompt, cache_implementation="static", return_dict_in_generate=True, **settings)
    assert torch.equal(static.sequences, dynamic)
    assert all(isinstance(layer, StaticHybridCacheLayer) for layer in _cache(static).layers)


def test_static_beam_search_matches_the_dynamic_cache():
    """Beam search reorders the cache's rows every step: the static cache's per-row slot bookkeeping follows."""
    model = tiny_model("llama")
    prompt = PROMPT.clone()
    attention_mask = torch.ones_like(prompt)
    prompt[1, :5], attention_mask[1, :5] = 0, 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=14, do_sample=False, num_beams=3, pad_token_id=0)
    with hybrid_inference(model, _allocation(MIXED)):
        dynamic = model.generate(prompt, **settings)
        static = model.generate(prompt, cache_implementation="static", **settings)
    assert torch.equal(static, dynamic)
    # Beams never mix prompts; a reorder that does moves each row's bookkeeping with its keys.
    layer = StaticHybridCacheLayer(full_heads=1, sliding_window=WINDOW, sink_tokens=2, max_cache_len=64,
                                   left_padding=[0, 5])
    keys = torch.arange(2 * 3 * 12, dtype=torch.float32).view(2, 3, 12, 1)
    layer.update(keys, keys)
    before = (layer.slot_positions.clone(), layer.sliding_keys.clone(), layer.ring_origin.clone())
    layer.reorder_cache(torch.tensor([1, 0]))
    for moved, kept in zip((layer.slot_positions, layer.sliding_keys, layer.ring_origin), before, strict=True):
        assert torch.equal(moved, kept.flip(0))
    assert layer.pads == [5, 0] and layer.origins == [5, 2]


def test_static_decode_step_compiles_into_one_graph_that_never_recompiles():
    """What CUDA graphs need: a decode step traces into one graph (fullgraph) and the next steps, past the ring's
    wrap-around, reuse it (error_on_recompile). The eager backend checks the tracing only, on any device."""
    import torch._dynamo

    model = tiny_model("qwen3")
    with hybrid_inference(model, _allocation(MIXED)):
        cache = hybrid_cache(model, max_cache_len=64)
        name = cache_argument(model)
        logits = model(PROMPT[:1, :12], **{name: cache}).logits
        step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        torch._dynamo.reset()
        next_token = logits[:, -1:].argmax(dim=-1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2 * WINDOW):
                next_token = step(input_ids=next_token, **{name: cache}).logits[:, -1:].argmax(dim=-1)
    assert int(cache.get_seq_length()) == 12 + 2 * WINDOW


def test_inductor_compiled_static_decode_matches_the_dynamic_cache():
    """The real compiler, not just the tracer (~20 s): the static cache's decode step through inductor (token-major
    buffers, tensor-indexed writes) gives the dynamic cache's logits, past the ring's wrap-around, gradients on."""
    model = tiny_model("qwen3")
    logits = {}
    with hybrid_inference(model, _allocation(MIXED)):
        name = cache_argument(model)
        for kind in ("dynamic", "static"):
            cache = hybrid_cache(model) if kind == "dynamic" else hybrid_cache(model, 64, left_padding=0)
            step = torch.compile(model, fullgraph=True, dynamic=False) if kind == "static" else model
            rows = [model(PROMPT[:, :20], **{name: cache}).logits[:, -1]]
            for token in PROMPT[:, 20:].split(1, dim=1):
                rows.append(step(input_ids=token, **{name: cache}).logits[:, -1].clone())
            logits[kind] = torch.stack(rows, dim=1)
    torch.testing.assert_close(logits["static"], logits["dynamic"], rtol=1e-4, atol=1e-4)


def test_padded_batch_generation_matches_reference():
    model = tiny_model("llama")
    allocation = _allocation(MIXED)
    prompt = PROMPT.clone()
    attention_mask = torch.ones_like(prompt)
    prompt[1, :5], attention_mask[1, :5] = 0, 0  # left padding
    settings = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with hybrid_attention(model, allocation.fa_mask, WINDOW, 2):
        reference = model.generate(prompt, past_key_values=DynamicCache(), **settings)
    with hybrid_inference(model, allocation):
        generated = model.generate(prompt, **settings)
    assert torch.equal(generated, reference)


@pytest.mark.parametrize("length", [70, 72])  # a ragged last block, and whole blocks
def test_blocked_sliding_attention_in_chunks_equals_masked(monkeypatch, length):
    """The long-prefill kernel split into several calls gives the masked result."""
    query, key, value = (torch.randn(2, 4 if i == 0 else 2, length, 16, generator=torch.Generator().manual_seed(i))
                         for i in range(3))
    monkeypatch.setattr(runtime, "_BLOCKED_CALL_ELEMENTS", 1)  # one block per call
    for sinks in (0, 3):
        blocked = runtime.sliding_blocked(query, key, value, 0.25, runtime.sdpa_backend, WINDOW, sinks)
        mask = runtime.causal_window_mask(length, length, WINDOW, sinks, "cpu")
        masked = runtime.sdpa_backend(query, key, value, mask, False, 0.25)
        torch.testing.assert_close(blocked, masked, rtol=1e-5, atol=1e-5)


def test_decode_step_has_no_host_sync_and_costs_no_more_than_the_native_hybrid():
    """A decode step's ATen ops (each a kernel launch on a GPU), fresh tensors and Python calls stay within
    1.25x of transformers' own layer hybrid, with no host sync: the per-step overhead that made GPU decode slow."""
    model = tiny_model("qwen3")
    layers = torch.tensor([True, False, False, True]).unsqueeze(1).expand(-1, 2)
    native = AutoModelForCausalLM.from_config(AutoConfig.for_model(**native_config(
        model.config.to_dict(), _allocation(layers, sinks=0, granularity="layer"))), attn_implementation="sdpa")
    native.load_state_dict(model.state_dict())
    reference = decode_step_ops(native.eval(), 40)  # past the window and sinks: the ring has wrapped
    for mask, granularity in ((layers, "layer"), (MIXED, "kv-head")):
        with hybrid_inference(model, _allocation(mask, granularity=granularity)):
            counts = decode_step_ops(model, 40)
        assert counts.host_syncs == 0
        assert counts.kernels <= 1.25 * reference.kernels, (granularity, counts.by_op, reference.by_op)
        assert counts.allocations <= 1.25 * reference.allocations
        assert counts.python_calls <= 1.25 * reference.python_calls
        assert "aten.cat" not in counts.by_op or counts.by_op["aten.cat"] <= reference.by_op["aten.cat"]


def test_op_counter_sees_host_syncs():
    with OpCounter() as counter:
        weight = torch.tensor([True, False])
        int(weight.sum()), bool(weight[:1].all())  # noqa: B018 - the syncs under test
    assert counter.counts.host_syncs == 2 and counter.counts.by_op["aten.sum"] == 1


BLOCK_CONSA_AND_RUN = """
import importlib.abc, sys
class NoConsa(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "consa_cli":
            raise ImportError("consa_cli is not installed")
sys.meta_path.insert(0, NoConsa())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
tokens = load_file(sys.argv[2])["tokens"]
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(tokens).logits
out = model.generate(tokens, max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.2x
kept = [layer.sliding_keys.shape[2] for layer in cache.layers if layer.sliding_keys is not None]
static = model.generate(tokens, max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static")
save_file({"logits": logits, "generated": out.sequences, "static": static, "kept": torch.tensor(kept)}, sys.argv[3])
"""


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_kv_head_export_loads_without_consa_via_remote_code(tmp_path, family):
    """The export's own modeling file runs the hybrid in plain transformers, consa made unimportable."""
    import subprocess
    import sys

    from conftest import save_tiny
    from safetensors.torch import load_file, save_file

    from consa_cli import load_hybrid
    from consa_cli.export import export_checkpoint

    model = save_tiny(tmp_path / "model", family)
    Allocation(MIXED, "kv-head", WINDOW, 2, model=str(tmp_path / "model"),
               model_fingerprint=model_fingerprint(model)).save(tmp_path / "mask.safetensors")
    export_checkpoint(tmp_path / "mask.safetensors", tmp_path / "export")
    save_file({"tokens": PROMPT}, tmp_path / "tokens.safetensors")
    environment = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", BLOCK_CONSA_AND_RUN, str(tmp_path / "export"), str(tmp_path / "tokens.safetensors"),
                    str(tmp_path / "remote.safetensors")], check=True, env=environment, cwd=tmp_path)
    remote = load_file(tmp_path / "remote.safetensors")
    with torch.no_grad():
        consa_logits = load_hybrid(tmp_path / "export")(PROMPT).logits
    torch.testing.assert_close(remote["logits"], consa_logits, rtol=0, atol=0)
    with torch.no_grad(), hybrid_attention(model, MIXED, WINDOW, 2):
        reference = model(PROMPT).logits
        expected = model.generate(PROMPT, past_key_values=DynamicCache(), max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(remote["logits"], reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(remote["generated"], expected)
    assert torch.equal(remote["static"], expected)  # the static cache of the export's own runtime, too
    assert remote["kept"].tolist() == [2 + WINDOW] * 3  # three layers have sliding heads: window + sinks only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_blocked_sliding_attention_matches_float32_masked_reference():
    """On the GPU the long-prefill kernel (fused SDPA with a one-tile mask) agrees with a float32 masked call."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(2, 8, 3000, 128, device="cuda", generator=generator)
    key, value = (torch.randn(2, 4, 3000, 128, device="cuda", generator=generator) for _ in range(2))
    for sinks in (0, 4):
        mask = runtime.causal_window_mask(3000, 3000, 256, sinks, "cuda")
        reference = runtime.sdpa_backend(query, key, value, mask, False, 128**-0.5)
        blocked = runtime.sliding_blocked(query.bfloat16(), key.bfloat16(), value.bfloat16(), 128**-0.5,
                                          runtime.sdpa_backend, 256, sinks)
        torch.testing.assert_close(blocked.float(), reference, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_static_decode_uses_flash_with_left_padding_eager_and_compiled():
    """A static cache's full heads decode through flash's variable-length form (each row from its first visible
    key to the written length), equal to a float32 masked reference with rows padded on the left, eager and
    compiled; a mask with a hole in a row falls back to the masked kernel."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, kv_heads, groups, slots, dim = 3, 2, 4, 320, 128
    query = torch.randn(batch, kv_heads * groups, 1, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    key, value = (torch.randn(batch, slots, kv_heads, dim, device="cuda", dtype=torch.bfloat16,
                              generator=generator).transpose(1, 2) for _ in range(2))
    length = torch.tensor(257, device="cuda")
    positions = torch.arange(slots, device="cuda")
    pads = torch.tensor([[0], [5], [100]], device="cuda")
    mask = ((positions < length) & (positions >= pads)).view(batch, 1, 1, slots)
    reference = runtime.eager_backend(query.float(), key.float(), value.float(), mask, False, dim**-0.5)

    def no_fallback(*args):
        raise AssertionError("the masked fallback ran")

    for decode in (runtime.static_full_decode, torch.compile(runtime.static_full_decode, fullgraph=True)):
        out = decode(query, key, value, mask, length, dim**-0.5, no_fallback)
        torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2)
    holed = mask.clone()
    holed[1, ..., 50:60] = False
    reference = runtime.eager_backend(query.float(), key.float(), value.float(), holed, False, dim**-0.5)
    out = runtime.static_full_decode(query, key, value, holed, length, dim**-0.5, runtime.sdpa_backend)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_static_sliding_decode_uses_flash_when_padding_is_known():
    """A static cache that knows each row's left padding keeps each row's filled sliding slots as one run: flash
    over them equals a float32 masked reference, eager and compiled, rows filled differently; unknown padding and
    a padding mask fall back to the masked kernel."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    batch, kv_heads, groups, slots, dim = 2, 2, 3, 36, 64
    query = torch.randn(batch, kv_heads * groups, 1, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    key, value = (torch.randn(batch, slots, kv_heads, dim, device="cuda", dtype=torch.bfloat16,
                              generator=generator).transpose(1, 2) for _ in range(2))

    def no_fallback(*args):
        raise AssertionError("the masked fallback ran")

    compiled = torch.compile(runtime.static_sliding_decode, fullgraph=True)
    positions = torch.full((batch, slots), -1, device="cuda")
    positions[0, :20] = torch.arange(20, device="cuda") + 500  # row 0: a prefix of its slots
    positions[1, 3:] = torch.arange(slots - 3, device="cuda") + 900  # row 1: padded sinks, then a full ring
    mask = (positions >= 0).view(batch, 1, 1, slots)
    reference = runtime.eager_backend(query.float(), key.float(), value.float(), mask, False, dim**-0.5)
    for decode in (runtime.static_sliding_decode, compiled):
        out = decode(query, key, value, positions, None, True, dim**-0.5, no_fallback)
        torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2)
    padding = torch.ones(batch, 1, 1, 1000, dtype=torch.bool, device="cuda")
    padding[0, ..., 500:505] = False  # unknown padding: the mask decides
    visible = mask & torch.gather(padding.view(batch, -1), 1, positions.clamp(min=0)).view(batch, 1, 1, slots)
    reference = runtime.eager_backend(query.float(), key.float(), value.float(), visible, False, dim**-0.5)
    for known in (False, True):  # known: the eager check sees a mask the flash call would not honour
        out = runtime.static_sliding_decode(query, key, value, positions, padding, known, dim**-0.5,
                                            runtime.sdpa_backend)
        torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_bf16_static_decode_follows_the_dynamic_cache():
    """The flash paths in a whole model: bf16 on CUDA, the same tokens fed through the eager dynamic cache and the
    compiled static one (full heads and unpadded sliding slots through flash), past the ring's wrap-around."""
    model = tiny_model("qwen3").cuda().to(torch.bfloat16)
    prompt, continuation = PROMPT[:, :20].cuda(), PROMPT[:, 20:].cuda()
    for mask, granularity in ((MIXED[:, :1].expand(-1, 2), "layer"), (MIXED, "kv-head")):
        with hybrid_inference(model, _allocation(mask, granularity=granularity)), torch.no_grad():
            name = cache_argument(model)
            logits = {}
            for kind, cache in (("dynamic", hybrid_cache(model)), ("static", hybrid_cache(model, 64, left_padding=0))):
                step = torch.compile(model, mode="reduce-overhead", fullgraph=True) if kind == "static" else model
                rows = [model(prompt, **{name: cache}).logits[:, -1]]
                for token in continuation.split(1, dim=1):
                    rows.append(step(input_ids=token, **{name: cache}).logits[:, -1].clone())
                logits[kind] = torch.stack(rows, dim=1).float()
            torch.testing.assert_close(logits["static"], logits["dynamic"], rtol=0, atol=3e-2, msg=granularity)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_static_generate_matches_dynamic_token_for_token():
    """On CUDA, generate(cache_implementation="static") compiles the decode step (CUDA graphs) and gives the
    tokens of the eager dynamic cache, for both granularities."""
    model = tiny_model("qwen3").cuda()
    prompt = PROMPT.cuda()
    settings = dict(max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0)
    padded, attention_mask = prompt.clone(), torch.ones_like(prompt)
    padded[1, :5], attention_mask[1, :5] = 0, 0  # left padding: per-row ring origins inside the CUDA graph
    for mask, granularity in ((MIXED[:, :1].expand(-1, 2), "layer"), (MIXED, "kv-head")):
        with hybrid_inference(model, _allocation(mask, granularity=granularity)):
            for tokens, given in ((prompt, {}), (padded, {"attention_mask": attention_mask})):
                dynamic = model.generate(tokens, **settings, **given)
                static = model.generate(tokens, cache_implementation="static", **settings, **given)
                assert torch.equal(static, dynamic), (granularity, sorted(given))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_step_never_synchronizes():
    model = tiny_model("qwen3").cuda()
    for mask, granularity in ((MIXED[:, :1].expand(-1, 2), "layer"), (MIXED, "kv-head")):
        with hybrid_inference(model, _allocation(mask, granularity=granularity)):
            assert decode_step_ops(model, 40).cuda_syncs == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generate_matches_reference_token_for_token():
    model = tiny_model("qwen3").cuda()
    prompt = PROMPT.cuda()
    allocation = _allocation(MIXED)
    settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with hybrid_attention(model, allocation.fa_mask.cuda(), WINDOW, 2):
        reference = model.generate(prompt, past_key_values=DynamicCache(), **settings)
    with hybrid_inference(model, allocation):
        assert torch.equal(model.generate(prompt, **settings), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_attention_avoids_cudnn():
    """cuDNN attention rebuilds its plan on the host for every new key length: decode steps must not use it."""
    model = tiny_model("qwen3").cuda()
    with hybrid_inference(model, _allocation(MIXED)):
        cache = {cache_argument(model): new_cache(model), "use_cache": True}
        tokens = model(input_ids=PROMPT.cuda(), logits_to_keep=1, **cache).logits[:, -1:].argmax(dim=-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            model(input_ids=tokens, **cache)
    ops = [event.key for event in profiler.key_averages()]
    assert any("attention" in op for op in ops)  # the profile saw the attention calls
    assert not any("cudnn_attention" in op for op in ops)


@pytest.mark.parametrize("granularity", ["layer", "kv-head"])
def test_static_prefill_reads_nothing_on_the_host_and_a_chunk_after_compiled_steps_sees_them(granularity):
    """A prompt into a fresh (or reset) static cache reads no device value on the host: one read per layer made the
    GPU wait for the host to launch every next layer (the static prefill's ~20 ms over the dynamic one at 32K,
    batch 1). After decode steps (compiled: only the device counter moves) a chunk still starts where they ended."""
    import torch._dynamo

    model = tiny_model("qwen3")
    mask = MIXED[:, :1].expand(-1, 2) if granularity == "layer" else MIXED
    with torch.no_grad(), hybrid_inference(model, _allocation(mask, granularity=granularity)):
        name = cache_argument(model)
        static = hybrid_cache(model, max_cache_len=64, left_padding=0)
        for _ in range(2):  # a fresh cache, then the same cache reset (how a benchmark reuses it)
            static.reset()
            with OpCounter() as counter:
                model(PROMPT[:, :20], **{name: static})
            assert counter.counts.host_syncs == 0, counter.counts.by_op
        torch._dynamo.reset()
        step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        dynamic = hybrid_cache(model)
        model(PROMPT[:, :20], **{name: dynamic})
        for i in range(20, 30):
            step(input_ids=PROMPT[:, i : i + 1], **{name: static})
            model(PROMPT[:, i : i + 1], **{name: dynamic})
        chunk = {kind: model(PROMPT[:, 30:], **{name: cache}).logits for kind, cache in (("static", static),
                                                                                         ("dynamic", dynamic))}
    assert int(static.get_seq_length()) == PROMPT.shape[1]
    torch.testing.assert_close(chunk["static"], chunk["dynamic"], rtol=1e-5, atol=1e-5)


def test_static_generate_reuses_its_cache_across_calls_that_fit_it():
    """Compiled decoding replays CUDA graphs over the cache's buffers: generate() calls of the same shape reuse one
    static hybrid cache (reset in place, the buffers' addresses kept, another left padding moved in), as
    transformers does with its StaticCache; another batch size or length gets a new one. Every call decodes what
    the dynamic cache decodes."""
    model = tiny_model("llama")
    prompt = PROMPT.clone()
    attention_mask = torch.ones_like(prompt)
    prompt[1, :5], attention_mask[1, :5] = 0, 0
    with hybrid_inference(model, _allocation(MIXED)):
        def generate(tokens, mask, **extra):
            settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0) | extra
            static = model.generate(tokens, attention_mask=mask, cache_implementation="static",
                                    return_dict_in_generate=True, **settings)
            assert torch.equal(static.sequences, model.generate(tokens, attention_mask=mask, **settings))
            return _cache(static)

        first = generate(prompt, attention_mask)
        buffers = [t.data_ptr() for layer in first.layers for t in layer._storage()]
        again = generate(prompt, attention_mask)
        assert again is first and [t.data_ptr() for layer in again.layers for t in layer._storage()] == buffers
        repadded, repadded_mask = PROMPT.clone(), torch.ones_like(PROMPT)  # the same shape, other rows padded
        repadded[0, :3], repadded_mask[0, :3] = 0, 0
        assert generate(repadded, repadded_mask) is first  # the rings' origins move, the buffers stay
        assert generate(prompt, attention_mask, max_new_tokens=4) is not first  # another capacity
        unpadded = generate(prompt[:1, 5:], attention_mask[:1, 5:])  # another batch size and padding
        assert unpadded is not first
        assert generate(prompt[:1, 5:], attention_mask[:1, 5:]) is unpadded
        beams = generate(prompt, attention_mask, num_beams=3)  # three rows per prompt
        assert beams is not unpadded and generate(prompt, attention_mask, num_beams=3) is beams
        assert model._consa_static_cache is beams
    assert not hasattr(model, "_consa_static_cache")  # the plain model again holds no cache


def test_a_reused_static_cache_takes_new_left_padding_in_place_and_refuses_a_mismatch():
    layer = StaticHybridCacheLayer(full_heads=1, sliding_window=WINDOW, sink_tokens=2, max_cache_len=64,
                                   left_padding=[0, 5])
    keys = torch.zeros(2, 3, 12, 4)
    layer.update(keys, keys)
    origin = layer.ring_origin
    layer.reset()
    layer.set_left_padding([4, 1])
    assert layer.ring_origin is origin and layer.ring_origin.tolist() == [4, 2] and layer.pads == [4, 1]
    with pytest.raises(ValueError, match="left_padding has 3 rows, the cache 2"):
        layer.set_left_padding([0, 0, 0])
    with pytest.raises(ValueError, match="left padding known must stay so"):
        layer.set_left_padding(None)
