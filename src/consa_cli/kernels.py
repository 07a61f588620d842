"""Fast kernels for search: the full-attention and sliding-window outputs of the same heads, mixed.

Search needs, for every gated unit, both its full-attention and its sliding-window output, mixed as
``sliding + w * (full - sliding)``. :func:`flex_full_and_sliding` takes full attention from SDPA's causal kernel
(flash attention, the very kernel a dense forward uses) and the window (``q - window < k <= q`` plus the first
``sink_tokens`` keys) from FlexAttention with a block-sparse mask, which visits only the window's key blocks; the
mix is compiled into the window's graph. Forward and backward, GQA without repeating K/V, no ``T x T`` mask.
The extra work over a dense forward is one windowed attention.

Measured against the alternative of one pass over the causal keys split in a windowed and a beyond-window part
merged by their log-sum-exps (docs/benchmarks.md): that pass is no faster at 8192 tokens (FlexAttention's kernels
are slower than flash attention on dense causal blocks) and its log-sum-exp gradient failed our CUDA test.
FlexAttention has no backward on CPU, so this backend is for CUDA; the two-call SDPA path in
:mod:`consa_cli.attention` stays the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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


@functools.lru_cache(maxsize=16)
def window_block_mask(length: int, window: int, sink_tokens: int, device: str, block_size: int = DEFAULT_BLOCK_SIZE):
    """FlexAttention block mask of the sliding window plus sinks, ``length`` queries and keys (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink_tokens))

    return create_block_mask(in_window, None, None, length, length, device=device, BLOCK_SIZE=block_size)


def window_mix(query, key, value, full, fa_weight, window_mask, scaling, kernel_options=None):
    """``sliding + w * (full - sliding)`` with the sliding output from FlexAttention; ``fa_weight`` per query head."""
    from torch.nn.attention.flex_attention import flex_attention

    sliding = flex_attention(query, key, value, block_mask=window_mask, scale=scaling, enable_gqa=True,
                             kernel_options=kernel_options)
    mix = fa_weight.view(1, -1, 1, 1)
    return (sliding.float() + mix * (full.float() - sliding.float())).to(sliding.dtype)


@functools.cache
def _compiled_window_mix(kernel_options: tuple = ()):
    """The compiled mix, one graph per set of FlexAttention kernel options (a sorted tuple of items)."""
    options = dict(kernel_options) or None
    return torch.compile(functools.partial(window_mix, kernel_options=options), dynamic=False, fullgraph=True)


def flex_full_and_sliding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                          scaling: float, window: int, sink_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE,
                          kernel_options: dict | None = None) -> torch.Tensor:
    """The relaxed mix for query heads ``[B, Hq, T, D]`` and KV heads ``[B, Hkv, T, D]``: SDPA full + flex window.

    ``fa_weight`` is per KV head ``[Hkv]``; it covers every query head of its group. Self-attention only (as many
    queries as keys), no padding mask. ``block_size`` (the mask's tile) and ``kernel_options`` (FlexAttention's
    Triton options, e.g. ``BLOCK_M``, ``num_warps``) are for tuning: bench/search_speed.py ``--flex-configs``.
    """
    groups = query.shape[1] // key.shape[1]
    window_mask = window_block_mask(query.shape[-2], window, sink_tokens, str(query.device), block_size)
    # One dense layout and a fresh [Hq] weight tensor (not a view into the [L, H] weights) for every layer, so the
    # compiled graph is reused instead of recompiled per stride pattern.
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    per_query_head = fa_weight.to(device=query.device, dtype=torch.float32).repeat_interleave(groups)
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    compiled = _compiled_window_mix(tuple(sorted((kernel_options or {}).items())))
    return compiled(query, key, value, full, per_query_head, window_mask, scaling)
