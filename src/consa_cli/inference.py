"""Hybrid inference that really saves memory and time: KV heads reordered so each layer's full-attention heads
are contiguous, two dense kernel calls per layer, and a KV cache that keeps only the sliding heads' window.

The kernels and the cache live in :mod:`consa_cli.hybrid_runtime` (self-contained, also shipped inside KV-head
exports); this module puts them on a consa model: :func:`kv_head_order` and :func:`permute_kv_heads` (exact:
the permuted model computes the same function), :func:`install_inference` / :func:`hybrid_inference`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from consa_cli.allocation import Allocation
from consa_cli.attention import attention_modules, remove_hybrid
from consa_cli.hybrid_runtime import PREFIX_ATTENTION_NAME, install_prefix_hybrid


def kv_head_order(fa_mask: torch.Tensor) -> torch.Tensor:
    """``[L, H]`` long: per layer, the original KV head at each new position -- full-attention heads first,
    each group in its original order."""
    return torch.stack([torch.cat([torch.nonzero(row).flatten(), torch.nonzero(~row).flatten()])
                        for row in fa_mask.bool()])


def _rows(weight: torch.Tensor, heads: torch.Tensor, head_dim: int, dim: int) -> torch.Tensor:
    """``weight`` with its per-head blocks of ``head_dim`` along ``dim`` taken in the order ``heads``."""
    index = (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten().to(weight.device)
    return weight.index_select(dim, index)


@torch.no_grad()
def permute_kv_heads(model: nn.Module, order: torch.Tensor) -> None:
    """Reorder every layer's KV heads in place: new head ``j`` of layer ``l`` is old head ``order[l, j]``.

    Permutes the k/v projection rows (and biases), the query heads of each group with them and the output
    projection's input columns. Per-head-dim norms (Qwen3, Gemma3 ``q_norm``/``k_norm``) act on every head
    alike and need nothing. The model computes exactly the same function afterwards.
    """
    config = model.config.get_text_config()
    groups = config.num_attention_heads // config.num_key_value_heads
    for module, heads in zip(attention_modules(model), order, strict=True):
        head_dim = module.head_dim
        query_heads = (heads.unsqueeze(1) * groups + torch.arange(groups)).flatten()
        for projection, head_order in ((module.q_proj, query_heads), (module.k_proj, heads), (module.v_proj, heads)):
            projection.weight.copy_(_rows(projection.weight, head_order, head_dim, 0))
            if projection.bias is not None:
                projection.bias.copy_(_rows(projection.bias, head_order, head_dim, 0))
        module.o_proj.weight.copy_(_rows(module.o_proj.weight, query_heads, head_dim, 1))
    model.consa_kv_head_order = _compose(getattr(model, "consa_kv_head_order", None), order)


def _compose(previous: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    """The order relative to the original checkpoint after applying ``order`` on top of ``previous``;
    None when that is the identity."""
    total = order if previous is None else torch.gather(previous, 1, order)
    identity = torch.arange(order.shape[1]).expand_as(total)
    return None if torch.equal(total, identity) else total


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    return torch.argsort(order, dim=1)


def original_o_proj_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """Layer ``layer``'s output projection as in the original checkpoint, whatever order its heads are in now."""
    module = attention_modules(model)[layer]
    order = getattr(model, "consa_kv_head_order", None)
    if order is None:
        return module.o_proj.weight
    config = model.config.get_text_config()
    groups = config.num_attention_heads // config.num_key_value_heads
    heads = inverse_order(order)[layer]
    query_heads = (heads.unsqueeze(1) * groups + torch.arange(groups)).flatten()
    return _rows(module.o_proj.weight, query_heads, module.head_dim, 1)


def install_inference(model: nn.Module, allocation: Allocation, backend: str = "sdpa") -> None:
    """Run ``model`` as ``allocation``'s hybrid for inference: permute its KV heads (FA first), attend on head
    slices, and make ``generate()`` use the hybrid cache. :func:`remove_inference` undoes all of it."""
    allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads)
    remove_hybrid(model)
    if not hasattr(model, "_consa_inference_attn"):
        model._consa_inference_attn = model.config._attn_implementation
    order = kv_head_order(allocation.fa_mask)
    permute_kv_heads(model, order)
    model._consa_inference_order = order
    install_prefix_hybrid(model, allocation.fa_mask.sum(dim=1).tolist(), allocation.sliding_window,
                          allocation.sink_tokens, backend)


def remove_inference(model: nn.Module) -> None:
    """Restore the original head order, attention implementation and cache."""
    if model.config._attn_implementation != PREFIX_ATTENTION_NAME or not hasattr(model, "_consa_inference_attn"):
        return
    permute_kv_heads(model, inverse_order(model._consa_inference_order))
    for module in attention_modules(model):
        del module.consa_prefix
    del model._prepare_cache_for_generation, model._consa_inference_order
    if hasattr(model, "_consa_static_cache"):  # generate()'s kept static cache (hybrid_runtime.reusable_static_cache)
        del model._consa_static_cache
    model.set_attn_implementation(model._consa_inference_attn)
    del model._consa_inference_attn


@contextmanager
def hybrid_inference(model: nn.Module, allocation: Allocation, backend: str = "sdpa"):
    """``with hybrid_inference(model, allocation): model.generate(...)`` -- then the original model again."""
    install_inference(model, allocation, backend)
    try:
        yield model
    finally:
        remove_inference(model)
