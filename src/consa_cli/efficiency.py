"""``consa eval --efficiency``: KV-cache size, peak memory and prefill / decode speed of hybrids vs the dense model.

One measurement = a prefill of ``context_length`` random tokens (only the last position's logits are computed,
as ``generate()`` does) followed by ``decode_steps`` greedy single-token steps, all on one cache. Reported side
by side: the cache's bytes measured from its tensors, the analytic size for the allocation, the device's peak
memory (CUDA), prefill seconds and decode tokens per second (batch x steps / seconds).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, StaticCache

from consa_cli.allocation import Allocation
from consa_cli.hybrid_runtime import PREFIX_ATTENTION_NAME, cache_argument, hybrid_cache

GIB = 1024**3


@dataclass
class EfficiencySettings:
    """What one efficiency comparison measures. The defaults suit the embedded model on a CPU."""

    context_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decode_steps: int = 16
    seed: int = 0
    repeats: int = 1  # best of N timings: on a shared machine the minimum is the least disturbed run
    # Decode steps as CUDA graphs: every variant on a static cache (consa's static hybrid cache, transformers'
    # StaticCache for the others) with its forward compiled (torch.compile, mode "reduce-overhead"). The
    # measure of what a step costs the GPU once the host's launch overhead is gone; prompts stay eager.
    compiled_decode: bool = False
    # With compiled_decode: the first variant (the dense reference) still decodes eagerly on a dynamic cache, as
    # transformers runs a model by default. Its own compiled static-cache decode is slower than that (it repeats
    # the KV heads of the whole cache every step: docs/benchmarks.md), so this is the reference users know.
    eager_reference: bool = False


# Untimed decode steps before the timed ones when decoding is compiled: the first calls compile, then record
# the CUDA graph, which later calls replay.
COMPILED_WARMUP_STEPS = 3


def analytic_kv_bytes(config, allocation: Allocation | None, length: int, batch_size: int,
                      dtype: torch.dtype) -> int:
    """Bytes of keys + values a cache must hold after ``length`` tokens: every token for full-attention heads,
    ``sink_tokens + sliding_window - 1`` (what the next query sees besides itself) for sliding-window heads."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * batch_size * head_dim * torch.tensor([], dtype=dtype).element_size()
    if allocation is None:
        return per_token * length * config.num_hidden_layers * config.num_key_value_heads
    full_heads = int(allocation.fa_mask.sum())
    kept = min(length, allocation.sink_tokens + allocation.sliding_window - 1)
    return per_token * (full_heads * length + (allocation.fa_mask.numel() - full_heads) * kept)


def cache_bytes(cache) -> int:
    """Bytes of the storage the cache's tensors hold (views into one buffer counted once)."""
    storages = {}
    for layer in cache.layers:
        tensors = layer.tensors() if hasattr(layer, "tensors") else [layer.keys, layer.values]
        for tensor in tensors:
            if tensor is not None and tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def new_cache(model, max_cache_len: int | None = None):
    """The cache ``generate()`` would use: consa's hybrid cache, or transformers' DynamicCache for the config
    (which holds only the window for native sliding layers); with ``max_cache_len``, their static forms (what
    ``generate(cache_implementation="static")`` uses)."""
    if model.config._attn_implementation == PREFIX_ATTENTION_NAME:  # measurements prompt without padding
        return hybrid_cache(model, max_cache_len, left_padding=0)
    if max_cache_len is not None:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    return DynamicCache(config=model.config)


def compile_decode(model):
    """``model``'s forward compiled for decode steps: one CUDA graph per step shape (``reduce-overhead``)."""
    return torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)


# aten ops that copy a device value to the host (``.item()``, ``bool(t)``, ``int(t)``, data-dependent shapes):
# on a GPU each one waits for every queued kernel, once per layer per step if it sits in the attention.
HOST_SYNC_OPS = frozenset({"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal",
                           "aten.masked_select", "aten.unique", "aten._unique2"})


@dataclass
class OpCounts:
    """What one forward dispatches to ATen, counted by :class:`OpCounter` (exact and machine-independent).

    ``kernels``: ops that compute or copy (each a kernel launch on a GPU); ``views``: metadata-only ops
    (slices, transposes, reshapes without a copy); ``allocations``: fresh tensors the kernels return;
    ``host_syncs``: ops that read a device value on the host (see :data:`HOST_SYNC_OPS`); ``python_calls``:
    Python function calls (the host-side work that has to keep the launch queue fed); ``cuda_syncs``: the
    synchronizing CUDA calls torch reports in sync-debug mode (CUDA only); ``by_op``: kernels by name.
    """

    kernels: int = 0
    views: int = 0
    allocations: int = 0
    host_syncs: int = 0
    python_calls: int = 0
    cuda_syncs: int | None = None
    by_op: dict[str, int] = field(default_factory=dict)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as counter: model(...)``, then ``counter.counts``: every ATen op the code runs."""

    def __init__(self):
        super().__init__()
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in HOST_SYNC_OPS:
            self.counts.host_syncs += 1
        if func.is_view:
            self.counts.views += 1
            return out
        self.counts.kernels += 1
        self.counts.by_op[name] = self.counts.by_op.get(name, 0) + 1
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self.counts.allocations += sum(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
                                       for t in torch.utils._pytree.tree_leaves(out))
        return out


@torch.no_grad()
def decode_step_ops(model, context_length: int, batch_size: int = 1, steps: int = 2, seed: int = 0) -> OpCounts:
    """Op counts of one greedy decode step (the last of ``steps``) after a ``context_length`` prefill, on the
    cache ``generate()`` would use, called as :func:`measure_generation` calls it."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.get_text_config().vocab_size, (batch_size, context_length),
                           generator=generator).to(device)
    with_cache = {cache_argument(model): new_cache(model), "use_cache": True}
    next_tokens = model(input_ids=tokens, logits_to_keep=1, **with_cache).logits[:, -1:].argmax(dim=-1)
    for _ in range(steps - 1):
        next_tokens = model(input_ids=next_tokens, **with_cache).logits[:, -1:].argmax(dim=-1)
    with OpCounter() as counter:
        next_tokens = model(input_ids=next_tokens, **with_cache).logits[:, -1:].argmax(dim=-1)
    calls = 0

    def count_call(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count_call)  # a separate step: the counter's own Python would count too
    try:
        model(input_ids=next_tokens, **with_cache)
    finally:
        sys.setprofile(None)
    counter.counts.python_calls = calls
    if device.type == "cuda":
        counter.counts.cuda_syncs = _cuda_syncs(lambda: model(input_ids=next_tokens, **with_cache))
    return counter.counts


def _cuda_syncs(step: Callable) -> int:
    """Synchronizing CUDA calls during ``step()``, as torch's sync-debug mode reports them."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    # Only torch's per-operation warning: switching the mode on also warns ("... debug mode is a prototype").
    return sum("called a synchronizing CUDA operation" in str(warning.message) for warning in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_generation(model, context_length: int, batch_size: int, decode_steps: int, seed: int = 0,
                       cache=None, decode=None, warmup_steps: int = 0) -> dict:
    """Prefill ``batch_size x context_length`` random tokens, then ``decode_steps`` greedy steps; time and memory.

    ``cache``: a static cache to reuse (reset here), else a fresh dynamic one; ``decode``: what runs a decode
    step (a compiled forward), else ``model``; ``warmup_steps`` untimed decode steps come before the timed ones.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.get_text_config().vocab_size, (batch_size, context_length),
                           generator=generator).to(device)
    if cache is None:
        cache = new_cache(model)
    else:
        cache.reset()
    decode = model if decode is None else decode
    with_cache = {cache_argument(model): cache, "use_cache": True}
    on_cuda = device.type == "cuda"
    _sync(device)
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    logits = model(input_ids=tokens, logits_to_keep=1, **with_cache).logits
    next_tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    del logits, tokens
    for _ in range(warmup_steps):
        next_tokens = decode(input_ids=next_tokens, **with_cache).logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(decode_steps):
        logits = decode(input_ids=next_tokens, **with_cache).logits
        next_tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
    _sync(device)
    decode_s = time.perf_counter() - start
    del logits, with_cache
    row = {
        "context_length": context_length,
        "batch_size": batch_size,
        "decode_steps": decode_steps,
        "cache_length": int(cache.get_seq_length()),
        "kv_bytes": cache_bytes(cache),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch_size * context_length / prefill_s,
        "decode_tokens_per_s": batch_size * decode_steps / decode_s if decode_steps else None,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if on_cuda else None,
        # What stays allocated after the run: the cache (plus one token per sequence).
        "kv_bytes_allocated": torch.cuda.memory_allocated(device) - allocated_before if on_cuda else None,
    }
    del cache
    return row


def compare_efficiency(variants: list[tuple[str, Allocation | None, Callable]], settings: EfficiencySettings,
                       on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure every variant at every (context length, batch size); the first variant is the dense reference.

    ``variants`` are ``(label, allocation or None, enter)``: ``enter()`` returns a context manager that yields
    the model running that variant. Variants take turns at each size, so an interrupted run still compares
    them all at the sizes it reached. Rows carry the analytic KV size and ratios against the dense row.
    """
    rows: list[dict] = []
    warmed: set[str] = set()
    for length in settings.context_lengths:
        for batch in settings.batch_sizes:
            reference = None
            for index, (label, allocation, enter) in enumerate(variants):
                compiled = settings.compiled_decode and not (settings.eager_reference and index == 0)
                with enter() as model:
                    if label not in warmed:
                        measure_generation(model, min(settings.context_lengths), 1, 2, settings.seed)
                        warmed.add(label)
                    row = {"label": label, **_best_of(model, length, batch, settings, compiled),
                           "compiled_decode": compiled}
                    dtype = next(model.parameters()).dtype
                    row["kv_bytes_analytic"] = analytic_kv_bytes(model.config, allocation, row["cache_length"],
                                                                 batch, dtype)
                row["kv_vs_analytic"] = row["kv_bytes"] / row["kv_bytes_analytic"]
                reference = reference or row
                row["is_reference"] = reference is row
                _add_ratios(row, reference)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _best_of(model, length: int, batch: int, settings: EfficiencySettings, compiled: bool) -> dict:
    if compiled:
        # One static cache for every repeat (reset in place): compiled graphs keep its buffers' addresses.
        capacity = length + COMPILED_WARMUP_STEPS + settings.decode_steps
        cache, decode, warmup = new_cache(model, capacity), compile_decode(model), COMPILED_WARMUP_STEPS
    else:
        cache, decode, warmup = None, None, 0
    # Each (variant, length, batch) is another graph of the same forward: more than dynamo's default 8 per function.
    with torch._dynamo.config.patch(recompile_limit=64):
        runs = [measure_generation(model, length, batch, settings.decode_steps, settings.seed, cache, decode,
                                   warmup) for _ in range(settings.repeats)]
    best = min(runs, key=lambda run: run["prefill_s"])
    fastest_decode = max(runs, key=lambda run: run["decode_tokens_per_s"] or 0)["decode_tokens_per_s"]
    return {**best, "decode_tokens_per_s": fastest_decode, "repeats": settings.repeats}


def _add_ratios(row: dict, reference: dict) -> None:
    row["kv_vs_dense"] = row["kv_bytes"] / reference["kv_bytes"]
    row["prefill_speedup"] = reference["prefill_s"] / row["prefill_s"]
    if row["decode_tokens_per_s"] and reference["decode_tokens_per_s"]:
        row["decode_speedup"] = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
    if row["peak_bytes"] and reference["peak_bytes"]:
        row["peak_vs_dense"] = row["peak_bytes"] / reference["peak_bytes"]


def evaluate_efficiency(targets: list, settings: EfficiencySettings, dtype: torch.dtype, device: str,
                        dense_model: str | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """``consa eval --efficiency``: the dense source model, then every target (an export, an allocation applied to
    its model, or a plain model), measured alike. ``targets`` are :class:`consa_cli.evaluate.Target`."""
    from consa_cli.export import load_hybrid
    from consa_cli.inference import hybrid_inference
    from consa_cli.models import load_model_and_tokenizer, model_fingerprint

    dense_name = dense_model or next((t.base_model for t in targets if t.base_model), None)
    loaded: dict[str, torch.nn.Module] = {}  # every model stays loaded: variants take turns at each size

    def base(name):
        if name not in loaded:
            loaded[name] = load_model_and_tokenizer(name, dtype=dtype, device=device)[0]
        return loaded[name]

    @contextmanager
    def as_loaded(name):
        yield base(name)

    @contextmanager
    def with_allocation(target):
        model = base(target.base_model)
        target.allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads,
                                     model_fingerprint(model))
        with hybrid_inference(model, target.allocation):
            yield model

    @contextmanager
    def export(target):
        key = f"export:{target.path}"
        if key not in loaded:
            loaded[key] = load_hybrid(target.path, dtype=dtype, device=device)
        yield loaded[key]

    variants = [] if dense_name is None else [(f"dense ({dense_name})", None, lambda: as_loaded(dense_name))]
    for target in targets:
        if target.kind == "model":
            if target.path != dense_name:
                variants.append((target.label, None, lambda t=target: as_loaded(t.path)))
        elif target.kind == "allocation":
            variants.append((target.label, target.allocation, lambda t=target: with_allocation(t)))
        else:
            variants.append((target.label, target.allocation, lambda t=target: export(t)))
    return compare_efficiency(variants, settings, on_row)
