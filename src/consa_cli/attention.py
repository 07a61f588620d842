"""Hybrid full / sliding-window attention inside unmodified transformers models.

consa registers one attention function and one mask function with transformers (``AttentionInterface`` and
``AttentionMaskInterface``, both under the name ``consa``). Each attention module carries a
:class:`LayerHybrid` describing its KV heads: a weight per KV head for the full-attention output (1 = full
attention, 0 = sliding window, anything between = the relaxed mix used during search) and the window settings.
No global state: everything lives on the model's own modules, so several hybrid models can coexist.

Window semantics match transformers': a sliding-window query at position q sees key k when
``q - window < k <= q``, plus the first ``sink_tokens`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from consa_cli.families import adapter_for
from consa_cli.kernels import flex_full_and_sliding

ATTENTION_NAME = "consa"


@dataclass
class LayerHybrid:
    """Per-layer hybrid settings, stored on the attention module as ``module.consa_hybrid``.

    ``fa_weight`` is ``[num_kv_heads]``: bool for a hard allocation, float in [0, 1] for the relaxed mix
    ``w * full + (1 - w) * sliding`` (differentiable, used by search).
    """

    fa_weight: torch.Tensor
    sliding_window: int
    sink_tokens: int
    backend: str = "sdpa"


# --- attention backends: one signature each, SDPA is the reference ---------------------------------------


def _sdpa_backend(query, key, value, mask, is_causal, scaling):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling)


def _eager_backend(query, key, value, mask, is_causal, scaling):
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if is_causal:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        mask = causal_window_mask(q_len, kv_len, None, 0, query.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


@dataclass(frozen=True)
class AttentionBackend:
    """How one backend computes attention.

    ``attend(query, key, value, mask, is_causal, scaling)``: one attention over aligned heads (hard
    allocations: full, sliding or both on separate head slices). ``full_and_sliding(query, key, value,
    fa_weight, scaling, window, sink_tokens)``: the relaxed mix ``sliding + w * (full - sliding)`` that search
    needs, for query heads ``[B, Hq, T, D]``, KV heads ``[B, Hkv, T, D]`` and ``fa_weight`` per KV head, in
    self-attention without a padding mask.
    """

    attend: Callable
    full_and_sliding: Callable


def _mix_two_calls(attend, query, key, value, fa_weight, scaling, window, sink_tokens, attention_mask=None):
    """The reference relaxed mix: a full and a sliding-window attention call, then the mix."""
    groups = query.shape[1] // key.shape[1]
    key_states, value_states = _repeat_kv(key, groups), _repeat_kv(value, groups)
    full = _attend(query, key_states, value_states, attention_mask, scaling, attend, None, sink_tokens)
    sliding = _attend(query, key_states, value_states, attention_mask, scaling, attend, window, sink_tokens)
    mix = fa_weight.to(device=query.device, dtype=query.dtype).repeat_interleave(groups).view(1, -1, 1, 1)
    return sliding + mix * (full - sliding)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(_sdpa_backend, partial(_mix_two_calls, _sdpa_backend)),
    "eager": AttentionBackend(_eager_backend, partial(_mix_two_calls, _eager_backend)),
    # consa_cli.kernels: SDPA full + FlexAttention window; hard allocations (the KL teacher) take SDPA's kernels.
    "flex": AttentionBackend(_sdpa_backend, flex_full_and_sliding),
}


def causal_window_mask(
    q_len: int, kv_len: int, window: int | None, sink_tokens: int, device: torch.device | str
) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` mask (True = attend) for queries at the last ``q_len`` of ``kv_len`` positions.

    ``window=None`` gives plain causal attention.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((k_pos > q_pos - window) | (k_pos < sink_tokens))
    return allowed


def _attend(query, key, value, attention_mask, scaling, backend, window, sink_tokens):
    """Full attention (``window=None``) or sliding-window attention for heads already aligned q<->kv."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if window is None or window >= kv_len:
        if attention_mask is None:
            if q_len == kv_len:
                return backend(query, key, value, None, q_len > 1, scaling)
            if q_len == 1:
                return backend(query, key, value, None, False, scaling)
            attention_mask = causal_window_mask(q_len, kv_len, None, 0, query.device)
        return backend(query, key, value, attention_mask, False, scaling)
    if attention_mask is None and q_len == kv_len and q_len >= 4 * window:
        return _sliding_blocked(query, key, value, scaling, backend, window, sink_tokens)
    mask = causal_window_mask(q_len, kv_len, window, sink_tokens, query.device)
    if attention_mask is not None:
        mask = mask & attention_mask
    return backend(query, key, value, mask, False, scaling)


def _sliding_blocked(query, key, value, scaling, backend, window, sink_tokens):
    """Sliding-window (+ sinks) attention over query blocks of ``window`` tokens.

    Each block only needs the previous and its own block of keys plus the sinks, so the score matrices are
    ``window x (2 * window + sinks)`` instead of one ``T x T`` matrix that a mask mostly discards: about
    ``T / (2 * window)`` times less work for long sequences. Exactly the same result as the masked path.
    """
    batch, heads, length, dim = query.shape
    blocks = -(-length // window)
    padded = blocks * window
    device = query.device

    q_blocks = F.pad(query, (0, 0, 0, padded - length)).view(batch, heads, blocks, window, dim)

    def key_blocks(states):
        # Keys of block i: positions [(i - 1) * window, (i + 1) * window), from the sequence padded in front.
        states = F.pad(states, (0, 0, window, padded - length))
        windows = states.unfold(2, 2 * window, window).transpose(-1, -2)  # [B, H, blocks, 2W, D]
        if sink_tokens:
            sinks = states[:, :, window : window + sink_tokens].unsqueeze(2).expand(-1, -1, blocks, -1, -1)
            windows = torch.cat([sinks, windows], dim=3)
        return windows

    k_blocks, v_blocks = key_blocks(key), key_blocks(value)
    q_pos = torch.arange(padded, device=device).view(blocks, window, 1)
    window_pos = (torch.arange(blocks, device=device).view(blocks, 1, 1) - 1) * window + torch.arange(
        2 * window, device=device).view(1, 1, -1)
    in_window = (window_pos >= 0) & (window_pos <= q_pos) & (window_pos > q_pos - window)
    if sink_tokens:
        sink_pos = torch.arange(sink_tokens, device=device).view(1, 1, -1)
        # A sink inside the query's window is already counted there: only add it when it is outside.
        as_sink = (sink_pos <= q_pos) & (sink_pos <= q_pos - window)
        in_window = torch.cat([as_sink, in_window], dim=-1)
    out = backend(
        q_blocks.reshape(batch, heads * blocks, window, dim),
        k_blocks.reshape(batch, heads * blocks, -1, dim),
        v_blocks.reshape(batch, heads * blocks, -1, dim),
        in_window.unsqueeze(0).expand(heads, -1, -1, -1).reshape(1, heads * blocks, window, -1),
        False,
        scaling,
    )
    # reshape, not view: some kernels (CUDA's memory-efficient SDPA) return another memory layout.
    return out.reshape(batch, heads, padded, dim)[:, :, :length]


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def consa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: per-KV-head full / sliding-window attention (or their mix)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("consa attention does not support attention logit softcapping")
    hybrid: LayerHybrid | None = getattr(module, "consa_hybrid", None)
    if hybrid is None:
        raise RuntimeError("consa attention is active but this layer has no allocation; use install_hybrid()")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask -> bool
    backend = ATTENTION_BACKENDS[hybrid.backend]
    attend = backend.attend
    num_kv_heads = key.shape[1]
    groups = query.shape[1] // num_kv_heads
    window, sinks = hybrid.sliding_window, hybrid.sink_tokens
    weight = hybrid.fa_weight

    if weight.dtype == torch.bool:
        # Hard allocation: each head gets only the attention it needs, on contiguous head slices.
        if bool(weight.all()) or bool((~weight).all()):
            out = _attend(
                query, _repeat_kv(key, groups), _repeat_kv(value, groups), attention_mask, scaling, attend,
                None if bool(weight.all()) else window, sinks,
            )
        else:
            out = torch.empty_like(query)
            for is_full in (True, False):
                kv_idx = torch.nonzero(weight == is_full).flatten().to(query.device)
                q_idx = (kv_idx.unsqueeze(1) * groups + torch.arange(groups, device=query.device)).flatten()
                part = _attend(
                    query.index_select(1, q_idx),
                    _repeat_kv(key.index_select(1, kv_idx), groups),
                    _repeat_kv(value.index_select(1, kv_idx), groups),
                    attention_mask, scaling, attend, None if is_full else window, sinks,
                )
                out.index_copy_(1, q_idx, part)
    elif attention_mask is None and query.shape[-2] == key.shape[-2]:
        out = backend.full_and_sliding(query, key, value, weight, scaling, window, sinks)
    else:  # padding or a KV cache: the reference handles both
        out = _mix_two_calls(attend, query, key, value, weight, scaling, window, sinks, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def consa_mask(*args, **kwargs):
    """Mask function for the ``consa`` implementation: causal + padding only.

    The per-head window is applied inside the attention function, so even layers a model natively builds a
    sliding mask for (Gemma3) receive the plain causal mask here.
    """
    kwargs["mask_function"] = causal_mask_function
    kwargs.pop("local_size", None)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, consa_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, consa_mask)


# --- installing an allocation on a model -------------------------------------------------------------------


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return adapter_for(model.config.model_type).attention_modules(model)


def install_hybrid(
    model: nn.Module,
    fa_weights: torch.Tensor,
    sliding_window: int,
    sink_tokens: int,
    backend: str = "sdpa",
) -> None:
    """Switch ``model`` to consa attention with per-(layer, KV head) weights ``fa_weights [L, H]``.

    Bool weights give a hard allocation; float weights the relaxed mix. Call :func:`set_fa_weights` to
    change the weights later (each search step does) and :func:`remove_hybrid` to restore the original.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose from {', '.join(ATTENTION_BACKENDS)}")
    modules = attention_modules(model)
    if fa_weights.shape[0] != len(modules):
        raise ValueError(f"fa_weights has {fa_weights.shape[0]} layers, model has {len(modules)}")
    if not hasattr(model, "_consa_original_attn"):
        model._consa_original_attn = model.config._attn_implementation
    for layer_idx, module in enumerate(modules):
        module.consa_hybrid = LayerHybrid(fa_weights[layer_idx], sliding_window, sink_tokens, backend)
    model.set_attn_implementation(ATTENTION_NAME)


def set_fa_weights(model: nn.Module, fa_weights: torch.Tensor) -> None:
    """Replace the per-KV-head full-attention weights ``[L, H]`` of an installed hybrid."""
    for layer_idx, module in enumerate(attention_modules(model)):
        module.consa_hybrid.fa_weight = fa_weights[layer_idx]


def remove_hybrid(model: nn.Module) -> None:
    """Restore the model's original attention implementation."""
    original = getattr(model, "_consa_original_attn", None)
    if original is None:
        return
    for module in attention_modules(model):
        if hasattr(module, "consa_hybrid"):
            del module.consa_hybrid
    model.set_attn_implementation(original)
    del model._consa_original_attn


@contextmanager
def hybrid_attention(model: nn.Module, fa_weights: torch.Tensor, sliding_window: int, sink_tokens: int,
                     backend: str = "sdpa"):
    """``with hybrid_attention(model, mask, W, S): ...`` runs the model as a hybrid, then restores it."""
    install_hybrid(model, fa_weights, sliding_window, sink_tokens, backend)
    try:
        yield model
    finally:
        remove_hybrid(model)
