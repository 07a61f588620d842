"""Fast kernels for search: the full-attention and sliding-window outputs of the same heads, mixed.

Search needs, for every gated unit, both its full-attention and its sliding-window output, mixed as
``sliding + w * (full - sliding)``. :func:`flex_full_and_sliding` takes full attention from SDPA's causal kernel
(flash attention, the very kernel a dense forward uses) and the window (``q - window < k <= q`` plus the first
``sink_tokens`` keys) from FlexAttention with a block-sparse mask, which visits only the window's key blocks; the
full branch, the window and the mix are one compiled graph per layer (:func:`full_window_mix`; with closed gates
skipped, the full branch runs on the open heads before the compiled window). Forward and backward, GQA without repeating K/V, no ``T x T`` mask.
The extra work over a dense forward is one windowed attention. With sinks, sequences longer than
:data:`DEFAULT_QUERY_CHUNK` (and a multiple of it) run the window over query chunks, so the sinks' key block does not
hold up the backward (:func:`to_window_chunks`).

Measured against the alternative of one pass over the causal keys split in a windowed and a beyond-window part
merged by their log-sum-exps (docs/benchmarks.md): that pass is no faster at 8192 tokens (FlexAttention's kernels
are slower than flash attention on dense causal blocks) and its log-sum-exp gradient failed our CUDA test.
FlexAttention has no backward on CPU, so this backend is for CUDA; the two-call SDPA path in
:mod:`consa_cli.attention` stays the reference.

:func:`flash_full_and_sliding` takes the window from PyTorch's own flash attention kernel instead, which has a
window (``window_size_left``) but no sinks: the sinks that lie outside a query's window are a small explicit
attention over the first ``sink_tokens`` keys, merged with the window by log-sum-exp. Its backward never
differentiates through that merge: flash attention's backward, given the merged output and log-sum-exp, yields
the window keys' share of the gradients (as ring attention does for its key blocks), and the sinks' share is
written out by hand. The same autograd function runs on CPU with plain-torch primitives (:data:`MATH_WINDOW`),
which is how its tests check the merge and the sink backward in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from consa_cli.hybrid_runtime import causal_window_mask


def flex_supported(device: torch.device) -> bool:
    """Whether the flex backend can run (forward and backward) on ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# FlexAttention's default tile: 128 queries x 128 keys per block of the block-sparse mask.
DEFAULT_BLOCK_SIZE = 128
# Queries per chunk of the window's FlexAttention call (see to_window_chunks). Measured on an H200 (docs/benchmarks.md,
# session 10): the mix alone 13% / 7% faster than without chunks at 4096 / 8192 tokens (512 and 2048 close), the
# Qwen3-0.6B search step faster in 5 of 6 paired runs (best 0.837x dense), for 0.7-1.4 GiB more peak memory. Only
# with sinks: they are the straggler the chunks cut short. Without sinks the chunked mix is the slower one (2.15 vs
# 1.77 ms at 4096 tokens, 3.14 vs 2.81 ms at 8192; session 11), so the default leaves such windows unchunked.
DEFAULT_QUERY_CHUNK = 1024


def default_query_chunk(sink_tokens: int) -> int:
    """The flex window's query chunk when none is given: :data:`DEFAULT_QUERY_CHUNK` with sinks, 0 without."""
    return DEFAULT_QUERY_CHUNK if sink_tokens else 0


# Block masks made so far, by (length, window, sinks, device, tile). A plain dict, not functools.lru_cache: dynamo
# traces through an lru_cache wrapper, so a compiled model (`consa search --compile`) would build the mask inside
# its graph on every call; a mask it finds here is read as graph inputs instead (prepare_flex fills it first).
_WINDOW_MASKS: dict[tuple, object] = {}
_WINDOW_MASKS_KEPT = 16


def window_block_mask(length: int, window: int, sink_tokens: int, device: str, block_size: int = DEFAULT_BLOCK_SIZE):
    """FlexAttention block mask of the sliding window plus sinks, ``length`` queries and keys (cached)."""
    key = (length, window, sink_tokens, device, block_size)
    if key in _WINDOW_MASKS:
        return _WINDOW_MASKS[key]
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink_tokens))

    mask = create_block_mask(in_window, None, None, length, length, device=device, BLOCK_SIZE=block_size)
    _keep_mask(key, mask)
    return mask


def _keep_mask(key: tuple, mask) -> None:
    if not torch.compiler.is_compiling():  # (while tracing it is part of the graph; nothing to keep)
        if len(_WINDOW_MASKS) >= _WINDOW_MASKS_KEPT:
            _WINDOW_MASKS.pop(next(iter(_WINDOW_MASKS)))
        _WINDOW_MASKS[key] = mask


# --- query chunks: the sink keys' backward split over chunks of queries ------------------------------------------
#
# FlexAttention's backward computes each key block's gradient in one thread block that walks every query block
# seeing it. A band of `window` keys is seen by about window / 128 + 1 query blocks, but the key block holding the
# sinks is seen by all of them (32 at 4096 tokens), so that one thread block runs ~6x longer than the rest and the
# kernel waits for it (docs/benchmarks.md, sessions 8 and 9). Cutting the queries into chunks, each with its own
# copy of the keys it can see (the `reach` keys before the chunk, the chunk's own, and the sinks in a key block of
# their own), makes every key block -- the sinks' included -- seen by at most chunk / 128 query blocks. The chunks
# are batch entries of one FlexAttention call; the copies' gradients add up through autograd (unfold and expand).


def window_chunk_geometry(window: int, sink_tokens: int, block_size: int) -> tuple[int, int]:
    """``(reach, sink_slot)``: keys laid before each chunk (the window) and the sinks' slot (one whole block)."""
    return window, (block_size if sink_tokens else 0)


def to_window_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk: int, window: int,
                     sink_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE):
    """``[B, H, T, D]`` queries, keys, values -> one batch entry per chunk of ``chunk`` queries (``T % chunk == 0``).

    Queries ``[B * C, Hq, chunk, D]``; keys and values ``[B * C, Hkv, reach + chunk + sink_slot, D]``: positions
    ``c * chunk - reach ...`` (zeros before the sequence's start), then the first ``sink_tokens`` keys, zero-padded
    to a whole block so the band's blocks stay aligned with the queries'.
    """
    batch, query_heads, length, dim = query.shape
    chunks = length // chunk
    reach, sink_slot = window_chunk_geometry(window, sink_tokens, block_size)

    def keys(states: torch.Tensor) -> torch.Tensor:
        kv_heads = states.shape[1]
        band = F.pad(states, (0, 0, reach, 0)).unfold(2, reach + chunk, chunk)  # [B, Hkv, C, D, reach + chunk]
        parts = [band.permute(0, 2, 1, 4, 3)]
        if sink_slot:
            sinks = F.pad(states[:, :, :sink_tokens], (0, 0, 0, sink_slot - sink_tokens))
            parts.append(sinks.unsqueeze(1).expand(batch, chunks, kv_heads, sink_slot, dim))
        return torch.cat(parts, dim=3).reshape(batch * chunks, kv_heads, -1, dim)

    queries = query.view(batch, query_heads, chunks, chunk, dim).transpose(1, 2).reshape(
        batch * chunks, query_heads, chunk, dim)
    return queries, keys(key), keys(value)


def from_window_chunks(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of the queries' layout of :func:`to_window_chunks`: ``[B * C, H, chunk, D]`` -> ``[B, H, T, D]``."""
    chunks_total, heads, chunk, dim = out.shape
    chunks = chunks_total // batch
    return out.view(batch, chunks, heads, chunk, dim).transpose(1, 2).reshape(batch, heads, chunks * chunk, dim)


def window_chunk_mask_mod(chunks: int, chunk: int, window: int, sink_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE):
    """The sliding window + sinks as a FlexAttention ``mask_mod`` over :func:`to_window_chunks`' layout.

    A sink key within a query's window is attended in the band (where it also lies), beyond it in the sink slot,
    never twice.
    """
    reach, _ = window_chunk_geometry(window, sink_tokens, block_size)

    def in_window(batch, head, q_idx, kv_idx):
        first = (batch % chunks) * chunk  # the chunk's first query position
        position = first + q_idx
        band_key = first - reach + kv_idx
        in_band = (kv_idx < reach + chunk) & (band_key >= 0) & (band_key <= position) & (position - band_key < window)
        if not sink_tokens:
            return in_band
        sink_key = kv_idx - (reach + chunk)
        in_sinks = (sink_key >= 0) & (sink_key < sink_tokens) & (position - sink_key >= window)
        return in_band | in_sinks

    return in_window


def window_chunk_block_mask(batch: int, length: int, chunk: int, window: int, sink_tokens: int, device: str,
                            block_size: int = DEFAULT_BLOCK_SIZE):
    """FlexAttention block mask of :func:`window_chunk_mask_mod` for ``batch`` sequences of ``length`` (cached)."""
    key = ("chunks", batch, length, chunk, window, sink_tokens, device, block_size)
    if key in _WINDOW_MASKS:
        return _WINDOW_MASKS[key]
    from torch.nn.attention.flex_attention import create_block_mask

    chunks = length // chunk
    reach, sink_slot = window_chunk_geometry(window, sink_tokens, block_size)
    mask = create_block_mask(window_chunk_mask_mod(chunks, chunk, window, sink_tokens, block_size), batch * chunks,
                             None, chunk, reach + chunk + sink_slot, device=device, BLOCK_SIZE=block_size)
    _keep_mask(key, mask)
    return mask


def query_chunk_for(length: int, query_chunk: int) -> int:
    """The chunk the window is computed over at ``length``: ``query_chunk`` if the length is a longer multiple of
    it, else 0 (the whole sequence at once)."""
    return query_chunk if query_chunk and length > query_chunk and length % query_chunk == 0 else 0


# --- closed gates: the full branch only for the heads that can use it -------------------------------------------
#
# A hard-concrete gate sample is clamped to [0, 1]; where it is clamped at 0 the mix is the sliding output alone,
# and the gate's gradient is zero (clamp passes none back). So for those heads the full-attention branch contributes
# nothing, forward or backward: it is computed only for the other heads (SearchSettings.skip_closed_gates). The
# heads are read on the host once per step by the search loop, so a forward never waits for the device.

_OPEN_HEADS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_OPEN_HEADS_KEPT = 512


def open_head_indices(full_kv_heads: tuple[int, ...], num_kv_heads: int, groups: int, device: torch.device):
    """``(kv_idx, q_idx, open_kv)`` on ``device`` for KV heads ``full_kv_heads``: their indices, their query heads'
    indices and a ``[num_kv_heads]`` bool mask (cached: the same few subsets recur step after step)."""
    key = (full_kv_heads, num_kv_heads, groups, str(device))
    if key not in _OPEN_HEADS:
        kv = torch.tensor(full_kv_heads, dtype=torch.long)
        query = (kv.unsqueeze(1) * groups + torch.arange(groups)).flatten()
        mask = torch.zeros(num_kv_heads, dtype=torch.bool)
        mask[kv] = True
        if len(_OPEN_HEADS) >= _OPEN_HEADS_KEPT:
            _OPEN_HEADS.pop(next(iter(_OPEN_HEADS)))
        _OPEN_HEADS[key] = tuple(t.to(device) for t in (kv, query, mask))
    return _OPEN_HEADS[key]


def full_on_open_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                       full_kv_heads: tuple[int, ...], full_attention: Callable):
    """The full-attention branch for the KV heads ``full_kv_heads`` only (zeros elsewhere), and ``fa_weight`` with no
    gradient for the others, whose weight is exactly 0. Their true gradient, ``<grad, full - sliding>``, would be
    cancelled by the clamp of the gate sample anyway; detached, the zeros standing in for their full output cannot
    leak into it. ``full_attention(q, k, v)`` computes causal attention on head slices."""
    num_kv_heads = key.shape[1]
    kv_idx, q_idx, open_kv = open_head_indices(full_kv_heads, num_kv_heads, query.shape[1] // num_kv_heads,
                                               query.device)
    full = query.new_zeros(query.shape)
    if full_kv_heads:
        part = full_attention(query.index_select(1, q_idx), key.index_select(1, kv_idx), value.index_select(1, kv_idx))
        full = full.index_copy(1, q_idx, part.to(full.dtype))
    weight = torch.where(open_kv.to(fa_weight.device), fa_weight, fa_weight.detach())
    return full, weight


def causal_full_branch(query, key, value, fa_weight, scaling: float, full_kv_heads: tuple[int, ...] | None):
    """The full-attention branch from SDPA's causal kernel (GQA), on every head or only ``full_kv_heads`` (then with
    the weights of :func:`full_on_open_heads`): ``(full, fa_weight)``."""
    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)

    if full_kv_heads is None or len(full_kv_heads) == key.shape[1]:
        return causal(query, key, value), fa_weight
    return full_on_open_heads(query, key, value, fa_weight, full_kv_heads, causal)


def prepare_flex(length: int, window: int, sink_tokens: int, device: torch.device, batch: int = 1) -> None:
    """Before a compiled forward first runs: make the window's block mask eagerly, so the graph reads it."""
    chunk = query_chunk_for(length, default_query_chunk(sink_tokens))
    if chunk:
        window_chunk_block_mask(batch, length, chunk, window, sink_tokens, str(device))
    else:
        window_block_mask(length, window, sink_tokens, str(device))


def window_mix(query, key, value, full, fa_weight, window_mask, scaling, kernel_options=None):
    """``sliding + w * (full - sliding)`` with the sliding output from FlexAttention; ``fa_weight`` per query head."""
    from torch.nn.attention.flex_attention import flex_attention

    sliding = flex_attention(query, key, value, block_mask=window_mask, scale=scaling, enable_gqa=True,
                             kernel_options=kernel_options)
    mix = fa_weight.view(1, -1, 1, 1)
    return (sliding.float() + mix * (full.float() - sliding.float())).to(sliding.dtype)


def chunked_window_mix(query, key, value, full, fa_weight, window_mask, scaling, chunk, window, sink_tokens,
                       block_size=DEFAULT_BLOCK_SIZE, kernel_options=None):
    """:func:`window_mix` with the window computed over :func:`to_window_chunks`' layout (``window_mask`` is its
    :func:`window_chunk_block_mask`)."""
    from torch.nn.attention.flex_attention import flex_attention

    chunked = to_window_chunks(query, key, value, chunk, window, sink_tokens, block_size)
    sliding = from_window_chunks(flex_attention(*chunked, block_mask=window_mask, scale=scaling, enable_gqa=True,
                                                kernel_options=kernel_options), query.shape[0])
    mix = fa_weight.view(1, -1, 1, 1)
    return (sliding.float() + mix * (full.float() - sliding.float())).to(sliding.dtype)


def full_window_mix(query, key, value, fa_weight, window_mask, scaling, chunk=0, window=0, sink_tokens=0,
                    block_size=DEFAULT_BLOCK_SIZE, kernel_options=None):
    """The whole relaxed mix in one graph: SDPA's causal kernel for the full branch, the FlexAttention window
    (:func:`window_mix`, or :func:`chunked_window_mix` with ``chunk``), the mix with ``fa_weight`` per KV head, and
    the output laid out as ``[B, T, H, D]`` in memory (a ``[B, H, T, D]`` view of it), which is the layout the
    attention module hands on, so its ``transpose(1, 2).contiguous()`` copies nothing.

    One compiled call per layer instead of an eager SDPA call, three eager copies, the weight's expansion and a
    compiled window: at 4096 tokens the search step waits on the host's launches, not the device (docs/benchmarks.md,
    sessions 11-15)."""
    groups = query.shape[1] // key.shape[1]
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    per_query_head = fa_weight.float().repeat_interleave(groups)
    if chunk:
        mixed = chunked_window_mix(query, key, value, full, per_query_head, window_mask, scaling, chunk, window,
                                   sink_tokens, block_size, kernel_options)
    else:
        mixed = window_mix(query, key, value, full, per_query_head, window_mask, scaling, kernel_options)
    return mixed.transpose(1, 2).contiguous().transpose(1, 2)


@functools.cache
def _compiled_window_mix(kernel_options: tuple = (), chunk: int = 0, window: int = 0, sink_tokens: int = 0,
                         block_size: int = DEFAULT_BLOCK_SIZE, compile_options: tuple = (), with_full: bool = False):
    """The compiled mix, one graph per set of FlexAttention kernel options (a sorted tuple of items) and, with
    query chunks, per chunk layout; ``compile_options``: inductor options (sorted items), e.g. ``cpp_wrapper`` or
    ``triton.cudagraphs``; ``with_full``: the full branch inside the graph too (:func:`full_window_mix`)."""
    options = dict(kernel_options) or None
    if with_full:
        mix = functools.partial(full_window_mix, chunk=chunk, window=window, sink_tokens=sink_tokens,
                                block_size=block_size, kernel_options=options)
    elif chunk:
        mix = functools.partial(chunked_window_mix, chunk=chunk, window=window, sink_tokens=sink_tokens,
                                block_size=block_size, kernel_options=options)
    else:
        mix = functools.partial(window_mix, kernel_options=options)
    return torch.compile(mix, dynamic=False, fullgraph=True, options=dict(compile_options) or None)


def flex_full_and_sliding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                          scaling: float, window: int, sink_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE,
                          kernel_options: dict | None = None,
                          query_chunk: int | None = None,
                          full_kv_heads: tuple[int, ...] | None = None,
                          compile_options: tuple = (),
                          fuse_full: bool = True) -> torch.Tensor:
    """The relaxed mix for query heads ``[B, Hq, T, D]`` and KV heads ``[B, Hkv, T, D]``: SDPA full + flex window.

    ``fa_weight`` is per KV head ``[Hkv]``; it covers every query head of its group. Self-attention only (as many
    queries as keys), no padding mask. ``block_size`` (the mask's tile) and ``kernel_options`` (FlexAttention's
    Triton options, e.g. ``BLOCK_M``, ``num_warps``) are for tuning: bench/search_speed.py ``--flex-configs``.
    ``query_chunk`` > 0 computes the window over chunks of that many queries (:func:`to_window_chunks`), when the
    length is a longer multiple of it; otherwise (and with 0) over the whole sequence at once; None:
    :func:`default_query_chunk` (chunks only with sinks).
    ``full_kv_heads``: the KV heads whose weight may be nonzero (:func:`full_on_open_heads`); None: all.
    ``compile_options``: inductor's options for the compiled graph, sorted items (benchmarks: the C++ wrapper,
    ``(("cpp_wrapper", True),)``, or CUDA graphs of it, ``(("triton.cudagraphs", True),)``).
    ``fuse_full``: with every head's full branch needed (``full_kv_heads`` None or all), the full branch, the
    weight's expansion and the copies into one compiled graph with the window (:func:`full_window_mix`); False:
    the full branch as an eager SDPA call before the compiled window (the backend up to session 14).
    """
    groups = query.shape[1] // key.shape[1]
    batch, length = query.shape[0], query.shape[-2]
    chunk = query_chunk_for(length, default_query_chunk(sink_tokens) if query_chunk is None else query_chunk)
    if chunk:
        window_mask = window_chunk_block_mask(batch, length, chunk, window, sink_tokens, str(query.device), block_size)
    else:
        window_mask = window_block_mask(length, window, sink_tokens, str(query.device), block_size)
    options = tuple(sorted((kernel_options or {}).items()))
    every_head = full_kv_heads is None or len(full_kv_heads) == key.shape[1]
    if fuse_full and every_head:
        # (The layers' weights are rows of one [L, H] tensor: views that differ only in their offset share a graph.)
        compiled = _compiled_window_mix(options, chunk, window, sink_tokens, block_size, compile_options, True)
        return compiled(query, key, value, fa_weight, window_mask, scaling)
    # One dense layout and a fresh [Hq] weight tensor (not a view into the [L, H] weights) for every layer, so the
    # compiled graph is reused instead of recompiled per stride pattern.
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    full, fa_weight = causal_full_branch(query, key, value, fa_weight, scaling, full_kv_heads)
    per_query_head = fa_weight.to(device=query.device, dtype=torch.float32).repeat_interleave(groups)
    compiled = (_compiled_window_mix(options, chunk, window, sink_tokens, block_size, compile_options) if chunk
                else _compiled_window_mix(options, compile_options=compile_options))
    return compiled(query, key, value, full, per_query_head, window_mask, scaling)


# --- flash: SDPA full + flash attention's own window, sinks merged by log-sum-exp ------------------------------


def flash_supported(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether the flash backend can run on ``device`` (and in ``dtype``, when given): flash attention's kernels
    need a CUDA GPU of compute capability 8.0 or newer and half precision."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class WindowKernel:
    """Causal sliding-window attention (``q - window < k <= q``, no sinks) as the two primitives the flash
    backend's autograd function is built from, in the ``[B, H, T, D]`` layout with GQA (fewer KV heads).

    ``forward(query, key, value, scaling, window) -> (out, lse, state)``: the output, the log-sum-exp of each
    query's scaled scores ``[B, Hq, T]`` (float32 or wider) and the tensors ``backward`` needs besides.
    ``backward(grad_out, query, key, value, out, lse, state, scaling, window) -> (dq, dk, dv)``: the window keys'
    share of the gradients when ``out`` and ``lse`` are those of a larger key set that contains the window (the
    window merged with its sinks): a key's probability is ``exp(score - lse)`` (as in ring attention).
    """

    forward: Callable
    backward: Callable
    compile_sinks: bool = False  # the sinks' share through torch.compile (CUDA: fused reductions)


def _grouped(states: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Query-head states ``[B, Hq, T, D]`` -> ``[B, Hkv, groups, T, D]`` in ``dtype``: a KV head's query heads."""
    return states.unflatten(1, (-1, groups)).to(dtype)


def attention_with_lse(query, key, value, mask, scaling):
    """Masked attention and its log-sum-exp in at least float32: ``(out [B, Hq, T, D], lse [B, Hq, T])``.

    ``mask`` (True = attend) broadcasts to ``[T, S]`` queries x keys. A query that sees no key gets a zero output
    and ``lse = -inf``, so a log-sum-exp merge gives it no weight.
    """
    compute = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    scores = torch.einsum("bhgtd,bhsd->bhgts", _grouped(query, groups, compute), key.to(compute)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, value.to(compute))
    return out.flatten(1, 2), lse.flatten(1, 2)


def attention_backward_with_lse(grad_out, query, key, value, out, lse, mask, scaling):
    """Gradients ``(dq, dk, dv)`` of a masked attention's keys, in at least float32, given the ``out`` and ``lse``
    of a key set that contains them: ``P = exp(S - lse)``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dq = scale dS
    K``, ``dK = scale dS^T Q``, ``dV = P^T dO``, each KV head's summed over its query heads."""
    compute = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    query, grad_out, out = (_grouped(t, groups, compute) for t in (query, grad_out, out))
    key, value = key.to(compute), value.to(compute)
    scores = torch.einsum("bhgtd,bhsd->bhgts", query, key) * scaling
    probs = torch.exp(scores.masked_fill(~mask, float("-inf")) - _grouped(lse.unsqueeze(-1), groups, compute))
    delta = (grad_out * out).sum(-1, keepdim=True)
    grad_scores = probs * (torch.einsum("bhgtd,bhsd->bhgts", grad_out, value) - delta)
    grad_query = torch.einsum("bhgts,bhsd->bhgtd", grad_scores, key).flatten(1, 2) * scaling
    grad_key = torch.einsum("bhgts,bhgtd->bhsd", grad_scores, query) * scaling
    grad_value = torch.einsum("bhgts,bhgtd->bhsd", probs, grad_out)
    return grad_query, grad_key, grad_value


def _math_window_forward(query, key, value, scaling, window):
    mask = causal_window_mask(query.shape[-2], key.shape[-2], window, 0, query.device)
    out, lse = attention_with_lse(query, key, value, mask, scaling)
    return out.to(query.dtype), lse, ()


def _math_window_backward(grad_out, query, key, value, out, lse, state, scaling, window):
    mask = causal_window_mask(query.shape[-2], key.shape[-2], window, 0, query.device)
    grads = attention_backward_with_lse(grad_out, query, key, value, out, lse, mask, scaling)
    return tuple(grad.to(like.dtype) for grad, like in zip(grads, (query, key, value), strict=True))


def _token_major(states: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> the ``[B, T, H, D]`` flash attention reads (free for what transformers hands over)."""
    return states.transpose(1, 2).contiguous()


def _flash_window_forward(query, key, value, scaling, window):
    length = query.shape[-2]
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        _token_major(query), _token_major(key), _token_major(value), None, None, length, length, 0.0, True, False,
        scale=scaling, window_size_left=window - 1, window_size_right=0)
    return out.transpose(1, 2), lse, (rng_state, unused)


def _flash_window_backward(grad_out, query, key, value, out, lse, state, scaling, window):
    length = query.shape[-2]
    grads = torch.ops.aten._flash_attention_backward(
        _token_major(grad_out), _token_major(query), _token_major(key), _token_major(value), _token_major(out),
        lse.contiguous(), None, None, length, length, 0.0, True, *state, scale=scaling, window_size_left=window - 1,
        window_size_right=0)
    return tuple(grad.transpose(1, 2) for grad in grads)


# PyTorch's flash attention kernels (CUDA, half precision), the backend's primitives.
FLASH_WINDOW = WindowKernel(_flash_window_forward, _flash_window_backward, compile_sinks=True)
# The same two primitives in plain torch (any device and dtype; T x T scores): the CPU tests run the very same
# autograd function, sink merge and sink backward with these.
MATH_WINDOW = WindowKernel(_math_window_forward, _math_window_backward)


def _sinks_beyond_window(length: int, window: int, sinks: int, device) -> torch.Tensor:
    """Bool ``[length, sinks]``: the sink keys a query sees only as sinks (``k <= q - window``)."""
    q_pos = torch.arange(length, device=device).unsqueeze(1)
    return torch.arange(sinks, device=device).unsqueeze(0) <= q_pos - window


# The sinks' share, written with broadcasting instead of matrix products: a handful of sink keys makes every
# product a [T, D] x [D, S] with S ~ 4, which cuBLAS runs as a badly shaped float32 GEMM (on an H200 the sink
# backward took 0.55 ms of a 2.3 ms flash step at 4096 tokens, more than flash's own window backward). Compiled,
# each function below becomes a few fused reductions that read q, dO and O once.


def _sink_merge_forward(query, sink_key, sink_value, out, lse, scaling: float, window: int):
    """The window's ``(out, lse)`` merged with the sinks beyond each query's window: ``(out in query.dtype,
    merged lse)``. ``sink_key``/``sink_value`` are the first keys ``[B, Hkv, S, D]``."""
    compute = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // sink_key.shape[1]
    mask = _sinks_beyond_window(query.shape[-2], window, sink_key.shape[-2], query.device)
    grouped = _grouped(query, groups, compute).unsqueeze(-2)                    # [B, Hkv, g, T, 1, D]
    scores = (grouped * sink_key.to(compute)[:, :, None, None]).sum(-1) * scaling  # [B, Hkv, g, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_lse = scores.logsumexp(-1)
    merged = torch.logaddexp(_grouped(lse, groups, compute), sink_lse)
    safe = torch.where(torch.isinf(merged), 0.0, merged)
    probs = torch.exp(scores - safe.unsqueeze(-1))                              # the sinks' share of the merge
    sink_out = (probs.unsqueeze(-1) * sink_value.to(compute)[:, :, None, None]).sum(-2)
    window_share = torch.exp(_grouped(lse, groups, compute) - safe).unsqueeze(-1)
    merged_out = _grouped(out, groups, compute) * window_share + sink_out
    return merged_out.flatten(1, 2).to(query.dtype), merged.flatten(1, 2)


def _sink_backward(grad_out, query, sink_key, sink_value, out, lse, scaling: float, window: int):
    """The sink keys' share of ``(dq, dk, dv)`` given the merged ``out`` and ``lse`` (see
    :func:`attention_backward_with_lse`), in at least float32; ``dk``/``dv`` are ``[B, Hkv, S, D]``."""
    compute = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // sink_key.shape[1]
    mask = _sinks_beyond_window(query.shape[-2], window, sink_key.shape[-2], query.device)
    q, d_out = (_grouped(t, groups, compute) for t in (query, grad_out))      # [B, Hkv, g, T, D]
    key, value = sink_key.to(compute)[:, :, None, None], sink_value.to(compute)[:, :, None, None]
    scores = (q.unsqueeze(-2) * key).sum(-1) * scaling                          # [B, Hkv, g, T, S]
    probs = torch.exp(scores.masked_fill(~mask, float("-inf")) - _grouped(lse, groups, compute).unsqueeze(-1))
    delta = (d_out * _grouped(out, groups, compute)).sum(-1, keepdim=True)
    grad_scores = probs * ((d_out.unsqueeze(-2) * value).sum(-1) - delta)
    grad_query = (grad_scores.unsqueeze(-1) * key).sum(-2).flatten(1, 2) * scaling
    grad_key = (grad_scores.unsqueeze(-1) * q.unsqueeze(-2)).sum((2, 3)) * scaling
    grad_value = (probs.unsqueeze(-1) * d_out.unsqueeze(-2)).sum((2, 3))
    return grad_query, grad_key, grad_value


def _compile_sinks(kernel: WindowKernel) -> bool:
    """Compile the sinks' share on its own, unless a compiled model is tracing it (it fuses it into its graph)."""
    return kernel.compile_sinks and not torch.compiler.is_compiling()


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=False)  # one graph per length, as the flex window


class SlidingWindowWithSinks(torch.autograd.Function):
    """Sliding-window attention plus sinks from a window kernel without sinks.

    Forward: the window kernel's ``(out, lse)``, and the sinks that lie outside a query's window as a small
    explicit attention over the first keys, merged by log-sum-exp. Backward: no gradient through the log-sum-exp;
    the window kernel's backward given the MERGED output and log-sum-exp yields exactly the window keys' share,
    and the sinks' share is computed by hand from the same merged log-sum-exp.
    """

    @staticmethod
    def forward(ctx, query, key, value, scaling, window, sink_tokens, kernel):
        length = query.shape[-2]
        out, lse, state = kernel.forward(query, key, value, scaling, window)
        sinks = min(sink_tokens, max(length - window, 0))  # sink keys that some query sees beyond its window
        if sinks:
            merge = _compiled(_sink_merge_forward) if _compile_sinks(kernel) else _sink_merge_forward
            out, lse = merge(query, key[:, :, :sinks], value[:, :, :sinks], out, lse, scaling, window)
        ctx.save_for_backward(query, key, value, out, lse, *state)
        ctx.settings = (scaling, window, sinks, kernel)
        # A fresh view, never the very tensor the forward computed: a no-op cast (``.to`` in float32) hands back
        # that intermediate itself, and torch 2.11's dynamo then routes the traced function's incoming gradient
        # to the intermediate's slot, so every input got a zero gradient (pytorch/pytorch#180642, fixed in 2.12).
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, *state = ctx.saved_tensors
        scaling, window, sinks, kernel = ctx.settings
        grad_query, grad_key, grad_value = kernel.backward(grad_out, query, key, value, out, lse, tuple(state),
                                                           scaling, window)
        if sinks:
            sink_backward = _compiled(_sink_backward) if _compile_sinks(kernel) else _sink_backward
            sink_query, sink_key, sink_value = sink_backward(grad_out, query, key[:, :, :sinks], value[:, :, :sinks],
                                                             out, lse, scaling, window)
            grad_query = grad_query.add_(sink_query)
            grad_key[:, :, :sinks].add_(sink_key)
            grad_value[:, :, :sinks].add_(sink_value)
        return grad_query, grad_key, grad_value, None, None, None, None


def flash_full_and_sliding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                           scaling: float, window: int, sink_tokens: int,
                           window_kernel: WindowKernel = FLASH_WINDOW,
                           full_kv_heads: tuple[int, ...] | None = None) -> torch.Tensor:
    """The relaxed mix for query heads ``[B, Hq, T, D]`` and KV heads ``[B, Hkv, T, D]``: SDPA full + flash window.

    ``fa_weight`` is per KV head ``[Hkv]``; it covers every query head of its group. Self-attention only (as many
    queries as keys), no padding mask. ``window_kernel`` is :data:`FLASH_WINDOW` (CUDA, half precision) or, for
    tests, :data:`MATH_WINDOW`. ``full_kv_heads``: as for :func:`flex_full_and_sliding`.
    """
    groups = query.shape[1] // key.shape[1]
    full, fa_weight = causal_full_branch(query, key, value, fa_weight, scaling, full_kv_heads)
    sliding = SlidingWindowWithSinks.apply(query, key, value, scaling, window, sink_tokens, window_kernel)
    # One fused kernel for sliding + w * (full - sliding), in the inputs' dtype like the two-call reference.
    mix = fa_weight.to(device=query.device, dtype=query.dtype).repeat_interleave(groups).view(1, -1, 1, 1)
    return torch.lerp(sliding, full, mix)


# --- fa4: SDPA full + flash-attn-4's window, the sinks merged through its differentiable log-sum-exp -------------
#
# flash-attn-4 (the `flash-attn-4` package: CuTe DSL kernels for Hopper and Blackwell) has a local window and returns
# a log-sum-exp whose gradient its backward takes. So the sinks beyond each query's window merge into the window's
# output by plain autograd (:func:`_sink_merge_forward`, compiled), with no hand-written backward. Probed on an H200
# (docs/benchmarks.md, session 15): correct (bf16 against float32: output 0.2%, gradients 0.3%); per layer, forward
# + backward, its window costs 0.90 ms with the log-sum-exp 1.20 at 8192 tokens against the 1.39 ms by which the flex
# mix exceeds dense attention, while at 4096 tokens each call costs 0.7-1.0 ms of host time whatever its work.


def fa4_supported(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether the fa4 backend can run: CUDA, compute capability 9.0+ (flash-attn-4's kernels), half precision,
    and the ``flash-attn-4`` package importable."""
    if device.type != "cuda" or not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        from flash_attn.cute.interface import flash_attn_func  # noqa: F401
    except Exception:  # noqa: BLE001 -- any failure to import (missing package, CUDA libraries) means "not here"
        return False
    return True


def fa4_window_with_lse(query, key, value, scaling: float, window: int):
    """flash-attn-4's causal window ``q - window < k <= q`` on ``[B, H, T, D]`` inputs (GQA): ``(out [B, Hq, T, D],
    lse [B, Hq, T])``, both differentiable."""
    from flash_attn.cute.interface import flash_attn_func

    out, lse = flash_attn_func(_token_major(query), _token_major(key), _token_major(value), softmax_scale=scaling,
                               causal=True, window_size=(window - 1, 0), return_lse=True)
    return out.transpose(1, 2), lse


def math_window_with_lse(query, key, value, scaling: float, window: int):
    """:func:`fa4_window_with_lse` in plain torch (any device and dtype; ``T x T`` scores): the CPU tests' stand-in."""
    mask = causal_window_mask(query.shape[-2], key.shape[-2], window, 0, query.device)
    out, lse = attention_with_lse(query, key, value, mask, scaling)
    return out.to(query.dtype), lse


def fa4_full_and_sliding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                         scaling: float, window: int, sink_tokens: int,
                         window_with_lse: Callable = fa4_window_with_lse,
                         full_kv_heads: tuple[int, ...] | None = None) -> torch.Tensor:
    """The relaxed mix for query heads ``[B, Hq, T, D]`` and KV heads ``[B, Hkv, T, D]``: SDPA full +
    flash-attn-4 window, the sinks beyond each query's window merged by log-sum-exp under autograd.

    ``fa_weight`` is per KV head ``[Hkv]``. Self-attention only, no padding mask. ``window_with_lse`` is
    :func:`fa4_window_with_lse` or, for tests, :func:`math_window_with_lse`. ``full_kv_heads``: as for
    :func:`flex_full_and_sliding`.
    """
    groups = query.shape[1] // key.shape[1]
    full, fa_weight = causal_full_branch(query, key, value, fa_weight, scaling, full_kv_heads)
    sliding, lse = window_with_lse(query, key, value, scaling, window)
    sinks = min(sink_tokens, max(query.shape[-2] - window, 0))  # sink keys that some query sees beyond its window
    if sinks:
        merge = (_compiled(_sink_merge_forward) if query.is_cuda and not torch.compiler.is_compiling()
                 else _sink_merge_forward)
        sliding, _ = merge(query, key[:, :, :sinks], value[:, :, :sinks], sliding, lse, scaling, window)
    mix = fa_weight.to(device=query.device, dtype=query.dtype).repeat_interleave(groups).view(1, -1, 1, 1)
    return torch.lerp(sliding, full, mix)
