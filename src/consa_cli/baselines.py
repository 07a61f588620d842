"""Hand-written allocation rules, the baselines a learned allocation has to beat.

Each rule returns an :class:`~consa_cli.allocation.Allocation` with the same number of full-attention units a
search at the same sparsity would keep, so export and eval treat it exactly like a learned one.
"""

from __future__ import annotations

import torch

from consa_cli.allocation import Allocation, AllocationError, full_heads_per_layer, full_unit_count

RULES = ("interleaved", "bottom", "top", "middle", "uniform-heads", "random")
BASELINES = (*RULES, "native")  # native: the model's own pattern (Gemma3's 5:1), whatever --sparsity says


def _evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` of ``range(total)``, one at the end of each equal block (Gemma / Mistral style: the last of
    every ``total / count`` layers is global)."""
    return [((i + 1) * total) // count - 1 for i in range(count)]


def rule_allocation(
    rule: str,
    num_layers: int,
    num_kv_heads: int,
    sparsity: float,
    granularity: str,
    sliding_window: int,
    sink_tokens: int,
    seed: int = 0,
    model: str = "",
    model_fingerprint: str = "",
) -> Allocation:
    """Build the ``rule`` allocation at ``sparsity`` for a model with ``num_layers x num_kv_heads`` units.

    Rules: ``interleaved`` (FA layers evenly spaced), ``bottom`` / ``top`` / ``middle`` (a contiguous FA block),
    ``uniform-heads`` (the same number of FA KV heads in every layer, rotating which heads), ``random`` (seeded).
    Layer rules at a KV-head granularity give whole layers; ``uniform-heads`` needs a KV-head granularity.
    """
    if rule not in RULES:
        raise AllocationError(f"unknown rule '{rule}'; choose from {', '.join(RULES)}")
    fa_mask = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
    if rule == "uniform-heads":
        if granularity == "layer":
            raise AllocationError("rule 'uniform-heads' needs --granularity kv-head or kv-head-per-layer")
        if granularity == "kv-head-per-layer":
            per_layer = [full_heads_per_layer(num_kv_heads, sparsity)] * num_layers
        else:  # spread the global count evenly over depth: every layer gets floor or ceil of the mean
            keep = full_unit_count(num_layers * num_kv_heads, sparsity)
            extra = set(_evenly_spaced(keep % num_layers, num_layers)) if keep % num_layers else set()
            per_layer = [keep // num_layers + (layer in extra) for layer in range(num_layers)]
        offset = 0
        for layer, count in enumerate(per_layer):  # rotate which heads, so no head index is favoured
            fa_mask[layer, [(offset + h) % num_kv_heads for h in range(count)]] = True
            offset += count
    elif rule == "random":
        generator = torch.Generator().manual_seed(seed)
        if granularity == "layer":
            keep = full_unit_count(num_layers, sparsity)
            fa_mask[torch.randperm(num_layers, generator=generator)[:keep]] = True
        elif granularity == "kv-head-per-layer":
            keep = full_heads_per_layer(num_kv_heads, sparsity)
            for layer in range(num_layers):
                fa_mask[layer, torch.randperm(num_kv_heads, generator=generator)[:keep]] = True
        else:
            keep = full_unit_count(num_layers * num_kv_heads, sparsity)
            flat = fa_mask.view(-1)
            flat[torch.randperm(num_layers * num_kv_heads, generator=generator)[:keep]] = True
    else:
        # Layer rules keep whole layers; at a head granularity the count is rounded to whole layers.
        keep = full_unit_count(num_layers, sparsity)
        if rule == "interleaved":
            layers = _evenly_spaced(keep, num_layers) if keep else []
        elif rule == "bottom":
            layers = list(range(keep))
        elif rule == "top":
            layers = list(range(num_layers - keep, num_layers))
        else:
            start = (num_layers - keep) // 2
            layers = list(range(start, start + keep))
        fa_mask[layers] = True
    return Allocation(
        fa_mask=fa_mask,
        granularity=granularity,
        sliding_window=sliding_window,
        sink_tokens=sink_tokens,
        method=f"rule:{rule}",
        model=model,
        model_fingerprint=model_fingerprint,
        metadata={"rule": rule, "requested_sparsity": sparsity, "seed": seed},
    )


def native_allocation(config, model: str = "", model_fingerprint: str = "") -> Allocation:
    """The model's own pattern as an allocation: its sliding layers (Gemma3) or all full attention."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    is_full = torch.tensor([kind != "sliding_attention" for kind in layer_types])
    fa_mask = is_full.unsqueeze(1).expand(config.num_hidden_layers, config.num_key_value_heads)
    return Allocation(
        fa_mask=fa_mask,
        granularity="layer",
        sliding_window=int(window) if window else config.max_position_embeddings,
        sink_tokens=0,
        method="native",
        model=model,
        model_fingerprint=model_fingerprint,
    )


def native_sparsity(config) -> float | None:
    """The fraction of layers a natively hybrid model (Gemma3) trained as sliding-window; None for other models."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = sum(kind == "sliding_attention" for kind in layer_types)
    return sliding / len(layer_types) if sliding else None


def check_baseline(rule: str, sparsity: float, window: int) -> None:
    """Refuse bad baseline settings before any model is loaded."""
    if rule not in BASELINES:
        raise AllocationError(f"unknown rule '{rule}'; choose from {', '.join(BASELINES)}")
    if not 0.0 <= sparsity <= 1.0:
        raise AllocationError(f"--sparsity must be between 0 and 1, got {sparsity}")
    if window < 1:
        raise AllocationError(f"--window must be at least 1, got {window}")


def baseline_allocation(rule: str, config, sparsity: float, granularity: str, sliding_window: int,
                        sink_tokens: int, seed: int = 0, model: str = "", model_fingerprint: str = "") -> Allocation:
    """A rule allocation (:func:`rule_allocation`) or the model's own pattern (``native``) for ``config``."""
    check_baseline(rule, sparsity, sliding_window)
    if rule == "native":
        return native_allocation(config, model, model_fingerprint)
    return rule_allocation(rule, config.num_hidden_layers, config.num_key_value_heads, sparsity, granularity,
                           sliding_window, sink_tokens, seed, model, model_fingerprint)
