"""Fast kernels for search: the full-attention and sliding-window outputs of the same heads, mixed.

Search needs, for every gated unit, both its full-attention and its sliding-window output, mixed as
``sliding + w * (full - sliding)``. Two implementations, both forward and backward, GQA without repeating K/V:

* ``flex_full_and_sliding``: full attention from SDPA's causal kernel (flash attention, the same kernel a dense
  forward uses) and the window (``q - window < k <= q`` plus the first ``sink_tokens`` keys) from FlexAttention with
  a block-sparse mask, which touches only the window's key blocks; the mix is compiled with it. The extra work over
  a dense forward is one windowed attention, about ``window / (length / 2)`` of a causal one.
* ``flex_one_pass``: both outputs from one pass over the causal keys, split in two disjoint sets, the window and
  the keys beyond it (``sink_tokens <= k <= q - window``). Each FlexAttention partial returns its log-sum-exp; the
  window part *is* the sliding output, and the full output is the two parts weighted by their share of the softmax
  mass (:func:`merge_partials`). The work is one causal attention, but in FlexAttention's kernels, which are
  slower than flash attention on dense causal blocks.

FlexAttention has no backward on CPU, so both are for CUDA; the two-call SDPA path in :mod:`consa_cli.attention`
stays the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def merge_partials(window_out: torch.Tensor, window_lse: torch.Tensor, beyond_out: torch.Tensor,
                   beyond_lse: torch.Tensor, fa_weight: torch.Tensor) -> torch.Tensor:
    """``sliding + w * (full - sliding)`` from a windowed and a beyond-window partial attention.

    ``*_out`` are ``[B, H, T, D]`` softmax-normalised outputs over disjoint key sets, ``*_lse`` their natural
    log-sum-exps ``[B, H, T]`` (``-inf`` where a set is empty), ``fa_weight`` the per-head weight ``[H]``.
    The full output is ``window_out + s * (beyond_out - window_out)`` with ``s = sigmoid(beyond_lse - window_lse)``
    the beyond-window share of the softmax mass, so the mix is ``window_out + w * s * (beyond_out - window_out)``.
    Computed in at least float32, returned in the outputs' dtype; differentiable in everything.
    """
    compute = torch.promote_types(window_out.dtype, torch.float32)
    beyond_share = torch.sigmoid(beyond_lse.to(compute) - window_lse.to(compute))
    coefficient = (fa_weight.to(compute).view(1, -1, 1) * beyond_share).unsqueeze(-1)
    sliding = window_out.to(compute)
    return (sliding + coefficient * (beyond_out.to(compute) - sliding)).to(window_out.dtype)


def flex_supported(device: torch.device) -> bool:
    """Whether the flex backend can run (forward and backward) on ``device``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _block_masks(length: int, window: int, sink_tokens: int, device: str):
    """Block-sparse masks of the window and of the keys beyond it, for ``length`` queries and keys (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sink_tokens))

    def beyond_window(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx - window) & (kv_idx >= sink_tokens)

    return tuple(create_block_mask(mask_mod, None, None, length, length, device=device)
                 for mask_mod in (in_window, beyond_window))


def _flex_mix(query, key, value, fa_weight, window_mask, beyond_mask, scaling):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    partials = [flex_attention(query, key, value, block_mask=mask, scale=scaling, enable_gqa=True,
                               return_aux=AuxRequest(lse=True)) for mask in (window_mask, beyond_mask)]
    (window_out, window_aux), (beyond_out, beyond_aux) = partials
    return merge_partials(window_out, window_aux.lse, beyond_out, beyond_aux.lse, fa_weight)


def _window_mix(query, key, value, full, fa_weight, window_mask, scaling):
    from torch.nn.attention.flex_attention import flex_attention

    sliding = flex_attention(query, key, value, block_mask=window_mask, scale=scaling, enable_gqa=True)
    mix = fa_weight.view(1, -1, 1, 1)
    return (sliding.float() + mix * (full.float() - sliding.float())).to(sliding.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _flex_inputs(query, key, value, fa_weight, window, sink_tokens):
    """Dense BHTD copies of the inputs (one layout for the compiled kernels), the masks and per-query-head weights."""
    groups = query.shape[1] // key.shape[1]
    masks = _block_masks(query.shape[-2], window, sink_tokens, str(query.device))
    # A fresh [Hq] tensor per call (not a view into the [L, H] weights): the compiled graph sees one layout.
    per_query_head = fa_weight.to(device=query.device, dtype=torch.float32).repeat_interleave(groups)
    return query.contiguous(), key.contiguous(), value.contiguous(), per_query_head, masks


def flex_full_and_sliding(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                          scaling: float, window: int, sink_tokens: int) -> torch.Tensor:
    """The relaxed mix for query heads ``[B, Hq, T, D]`` and KV heads ``[B, Hkv, T, D]``: SDPA full + flex window.

    ``fa_weight`` is per KV head ``[Hkv]``; it covers every query head of its group. Self-attention only (as many
    queries as keys), no padding mask.
    """
    query, key, value, per_query_head, (window_mask, _) = _flex_inputs(query, key, value, fa_weight, window,
                                                                        sink_tokens)
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return _compiled(_window_mix)(query, key, value, full, per_query_head, window_mask, scaling)


def flex_one_pass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fa_weight: torch.Tensor,
                  scaling: float, window: int, sink_tokens: int) -> torch.Tensor:
    """The same mix as :func:`flex_full_and_sliding`, from one pass over the causal keys (two merged partials)."""
    query, key, value, per_query_head, (window_mask, beyond_mask) = _flex_inputs(query, key, value, fa_weight,
                                                                                  window, sink_tokens)
    return _compiled(_flex_mix)(query, key, value, per_query_head, window_mask, beyond_mask, scaling)
