"""Hybrid full / sliding-window attention inside unmodified transformers models.

consa registers one attention function and one mask function with transformers (``AttentionInterface`` and
``AttentionMaskInterface``, both under the name ``consa``), and the same attention without a mask function under
``consa_unpadded`` for inputs that never carry a padding mask (the search's calibration rows). Each attention module carries a
:class:`LayerHybrid` describing its KV heads: a weight per KV head for the full-attention output (1 = full
attention, 0 = sliding window, anything between = the relaxed mix used during search) and the window settings.
No global state: everything lives on the model's own modules, so several hybrid models can coexist. This is the
search-time attention (any head pattern, relaxed weights); inference on a fixed allocation uses
:mod:`consa_cli.inference`, which shares its kernels from :mod:`consa_cli.hybrid_runtime`.

Window semantics match transformers': a sliding-window query at position q sees key k when
``q - window < k <= q``, plus the first ``sink_tokens`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from consa_cli.families import adapter_for
from consa_cli.hybrid_runtime import ATTENTION_BACKENDS as KERNELS
from consa_cli.hybrid_runtime import (
    attend,
    causal_padding_mask,
    causal_window_mask,  # noqa: F401 - part of this module's interface
    split_head_attention,
)
from consa_cli.kernels import (
    fa4_full_and_sliding,
    flash_full_and_sliding,
    flex_full_and_sliding,
    full_on_open_heads,
    prepare_flex,
)

ATTENTION_NAME = "consa"
# No mask function is registered under this name, so transformers builds no mask for it at all (its rule for attention
# that needs none). The plain name's mask function skips the causal square only where transformers allows it, and
# while a CUDA graph is captured or dynamo traces transformers cannot rule out packed sequences (it would have to read
# position_ids) and asks for the full T x T mask -- which sends the relaxed mix to the two-call reference path: the
# search step captured as CUDA graphs ran at 0.36x dense at 8192 tokens with it (docs/benchmarks.md, session 18).
UNPADDED_ATTENTION_NAME = "consa_unpadded"


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
    # Relaxed weights only: the KV heads whose weight may be nonzero, read on the host by the search loop (None: all).
    # The others' weight is exactly 0 (a closed gate), so the full-attention branch skips them.
    open_kv_heads: tuple[int, ...] | None = None
    # Hard allocations are read on the host once, here: a forward never waits for the device to say which heads.
    full_kv_heads: tuple[int, ...] | None = field(init=False, default=None, repr=False)
    _head_indices: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        if self.fa_weight.dtype == torch.bool:
            self.full_kv_heads = tuple(torch.nonzero(self.fa_weight.cpu()).flatten().tolist())

    def head_indices(self, is_full: bool, groups: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """KV heads and their query heads of one attention type (hard allocations), made once per device."""
        key = (is_full, groups, device)
        if key not in self._head_indices:
            kv = [head for head in range(self.fa_weight.numel()) if (head in self.full_kv_heads) == is_full]
            query = [head * groups + member for head in kv for member in range(groups)]
            self._head_indices[key] = (torch.tensor(kv, device=device), torch.tensor(query, device=device))
        return self._head_indices[key]


# --- attention backends: one signature each, SDPA is the reference ---------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """How one backend computes attention.

    ``attend(query, key, value, mask, is_causal, scaling)``: one attention kernel over aligned heads, which the
    inference runtime (:mod:`consa_cli.hybrid_runtime`) calls for hard allocations (full, sliding or both on
    separate head slices). ``full_and_sliding(query, key, value, fa_weight, scaling, window, sink_tokens,
    full_kv_heads=None)``: the relaxed mix ``sliding + w * (full - sliding)`` that search needs (the full branch
    only on ``full_kv_heads`` when given), for query heads ``[B, Hq, T, D]``, KV heads
    ``[B, Hkv, T, D]`` and ``fa_weight`` per KV head, in self-attention without a padding mask.
    """

    attend: Callable
    full_and_sliding: Callable
    # ``prepare(length, window, sink_tokens, device, batch=1)``: what to make eagerly before a compiled forward first runs
    # (a compiled graph would otherwise rebuild it on every call); None: nothing.
    prepare: Callable | None = None


def _mix_two_calls(kernel, query, key, value, fa_weight, scaling, window, sink_tokens, attention_mask=None,
                   full_kv_heads: tuple[int, ...] | None = None):
    """The reference relaxed mix: a full and a sliding-window attention call, then the mix. ``full_kv_heads``: the
    KV heads whose weight may be nonzero, the only ones the full call covers (None: all; no padding mask then)."""
    groups = query.shape[1] // key.shape[1]
    if full_kv_heads is None or len(full_kv_heads) == key.shape[1]:
        full = attend(query, key, value, attention_mask, scaling, kernel, None, sink_tokens)
    else:
        full, fa_weight = full_on_open_heads(
            query, key, value, fa_weight, full_kv_heads,
            lambda q, k, v: attend(q, k, v, attention_mask, scaling, kernel, None, sink_tokens))
    sliding = attend(query, key, value, attention_mask, scaling, kernel, window, sink_tokens)
    mix = fa_weight.to(device=query.device, dtype=query.dtype).repeat_interleave(groups).view(1, -1, 1, 1)
    return sliding + mix * (full - sliding)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(KERNELS["sdpa"], partial(_mix_two_calls, KERNELS["sdpa"])),
    "eager": AttentionBackend(KERNELS["eager"], partial(_mix_two_calls, KERNELS["eager"])),
    # consa_cli.kernels: SDPA full + FlexAttention window; hard allocations (the KL teacher) take SDPA's kernels.
    "flex": AttentionBackend(KERNELS["sdpa"], flex_full_and_sliding, prepare_flex),
    # consa_cli.kernels: SDPA full + flash attention's own window, sinks merged by log-sum-exp (CUDA, half precision).
    "flash": AttentionBackend(KERNELS["sdpa"], flash_full_and_sliding),
    # consa_cli.kernels: SDPA full + flash-attn-4's window (the package, when installed; Hopper and newer).
    "fa4": AttentionBackend(KERNELS["sdpa"], fa4_full_and_sliding),
}


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
    kernel = backend.attend
    num_kv_heads = key.shape[1]
    groups = query.shape[1] // num_kv_heads
    window, sinks = hybrid.sliding_window, hybrid.sink_tokens
    weight = hybrid.fa_weight

    if weight.dtype == torch.bool:
        full_heads = len(hybrid.full_kv_heads)
        if hybrid.full_kv_heads == tuple(range(full_heads)):  # FA heads first (all, none, or a permuted export)
            out = split_head_attention(query, key, value, attention_mask, scaling, full_heads, window, sinks, kernel)
        else:  # each head gets only the attention it needs, on gathered head slices
            out = torch.empty_like(query)
            for is_full in (True, False):
                kv_idx, q_idx = hybrid.head_indices(is_full, groups, query.device)
                part = attend(query.index_select(1, q_idx), key.index_select(1, kv_idx),
                              value.index_select(1, kv_idx), attention_mask, scaling, kernel,
                              None if is_full else window, sinks)
                out.index_copy_(1, q_idx, part)
    elif attention_mask is None and query.shape[-2] == key.shape[-2]:
        out = backend.full_and_sliding(query, key, value, weight, scaling, window, sinks,
                                       full_kv_heads=hybrid.open_kv_heads)
    else:  # padding or a KV cache: the reference handles both
        out = _mix_two_calls(kernel, query, key, value, weight, scaling, window, sinks, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def refuse_padding_masks(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a hybrid installed for unpadded inputs: transformers would drop a padding mask silently
    for an attention name without a mask function, so a call that passes one fails instead."""
    if kwargs.get("attention_mask") is not None:
        raise ValueError("this hybrid was installed for unpadded inputs (install_hybrid(padding_masks=False)); "
                         "call it without an attention_mask")


consa_mask = causal_padding_mask


AttentionInterface.register(ATTENTION_NAME, consa_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, consa_mask)
AttentionInterface.register(UNPADDED_ATTENTION_NAME, consa_attention_forward)


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
    padding_masks: bool = True,
) -> None:
    """Switch ``model`` to consa attention with per-(layer, KV head) weights ``fa_weights [L, H]``.

    Bool weights give a hard allocation; float weights the relaxed mix. Call :func:`set_fa_weights` to
    change the weights later (each search step does) and :func:`remove_hybrid` to restore the original.
    ``padding_masks=False``: the model will only see full, unpadded rows (no ``attention_mask``); transformers then
    builds no mask, not even while a CUDA graph is captured or dynamo traces (:data:`UNPADDED_ATTENTION_NAME`),
    and a call with an ``attention_mask`` fails (transformers would drop it unread).
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
    if padding_masks and hasattr(model, "_consa_padding_guard"):
        model._consa_padding_guard.remove()
        del model._consa_padding_guard
    elif not padding_masks and not hasattr(model, "_consa_padding_guard"):
        model._consa_padding_guard = model.register_forward_pre_hook(refuse_padding_masks, with_kwargs=True)
    model.set_attn_implementation(ATTENTION_NAME if padding_masks else UNPADDED_ATTENTION_NAME)


def set_fa_weights(model: nn.Module, fa_weights: torch.Tensor, open_heads: torch.Tensor | None = None) -> None:
    """Replace the per-KV-head full-attention weights ``[L, H]`` of an installed hybrid.

    ``open_heads``: a host ``[L, H]`` bool tensor, False where the relaxed weight is exactly 0 (a closed gate); the
    full-attention branch then skips those heads. None: every head gets both branches.
    """
    for layer_idx, module in enumerate(attention_modules(model)):
        open_kv = None if open_heads is None else tuple(torch.nonzero(open_heads[layer_idx]).flatten().tolist())
        module.consa_hybrid = replace(module.consa_hybrid, fa_weight=fa_weights[layer_idx], open_kv_heads=open_kv)


def remove_hybrid(model: nn.Module) -> None:
    """Restore the model's original attention implementation."""
    original = getattr(model, "_consa_original_attn", None)
    if original is None:
        return
    for module in attention_modules(model):
        if hasattr(module, "consa_hybrid"):
            del module.consa_hybrid
    if hasattr(model, "_consa_padding_guard"):
        model._consa_padding_guard.remove()
        del model._consa_padding_guard
    model.set_attn_implementation(original)
    del model._consa_original_attn


@contextmanager
def original_attention(model: nn.Module):
    """``with original_attention(model): ...`` runs the model with its own attention while a hybrid is installed,
    then switches the hybrid back on (its settings stay in place).

    The search's teacher: the model as it was trained. For a dense model that is all-full attention; for a natively
    hybrid model (Gemma3: 5 sliding layers per full one, RoPE base chosen by layer type) it is its own pattern --
    all-full attention there reads far beyond the window its sliding layers were trained on (Gemma3-270M at 2048
    tokens: perplexity 24.6 natively, 371 all-full).
    """
    original = getattr(model, "_consa_original_attn", None)
    if original is None:  # no hybrid installed: the model already runs its own attention
        yield model
        return
    hybrid = model.config._attn_implementation
    model.set_attn_implementation(original)
    try:
        yield model
    finally:
        model.set_attn_implementation(hybrid)


@contextmanager
def hybrid_attention(model: nn.Module, fa_weights: torch.Tensor, sliding_window: int, sink_tokens: int,
                     backend: str = "sdpa"):
    """``with hybrid_attention(model, mask, W, S): ...`` runs the model as a hybrid, then restores it."""
    install_hybrid(model, fa_weights, sliding_window, sink_tokens, backend)
    try:
        yield model
    finally:
        remove_hybrid(model)
