"""Model families consa supports, as adapters in one registry keyed by ``config.model_type``.

An adapter knows three things about a family: where its attention modules live, which sink setting suits
it by default, and how (if at all) a layer-granularity hybrid is written as a native transformers config
that loads without consa.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from consa_cli.hybrid_runtime import decoder_attention_modules

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class UnsupportedModelError(ValueError):
    """The checkpoint's family has no adapter."""


@dataclass(frozen=True)
class FamilyAdapter:
    """How consa treats one model family.

    Parameters
    ----------
    model_type:
        ``config.model_type`` this adapter serves.
    default_sink_tokens:
        Sink tokens that sliding-window units keep by default. Models trained with full attention everywhere
        need sinks once some heads lose them (CONTEXT.md section 5: SmolLM2 window 256 all-SWA PPL 49.9 -> 25.4
        with 4 sinks); models trained with sliding windows (Gemma3) get worse with them.
    native_layer_export:
        Builds the config dict of a plain-transformers checkpoint for a layer allocation without sinks, or
        ``None`` when the family has no exact native form.
    """

    model_type: str
    default_sink_tokens: int
    native_layer_export: Callable[[dict, list[bool], int], dict | None] | None = None

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention module of every decoder layer, in layer order."""
        try:
            return decoder_attention_modules(model)
        except ValueError as error:
            raise UnsupportedModelError(str(error)) from None


def _with_layer_types(config: dict, layer_is_full: list[bool], window: int, **fields) -> dict:
    """A copy of ``config`` with explicit per-layer types, the window, and ``fields`` set."""
    patched = copy.deepcopy(config)
    patched.update(fields, sliding_window=window,
                   layer_types=[FULL_ATTENTION if full else SLIDING_ATTENTION for full in layer_is_full])
    return patched


def _qwen_native(config: dict, layer_is_full: list[bool], window: int) -> dict:
    # Qwen2/Qwen3 configs drop sliding_window unless use_sliding_window is set, and without explicit
    # layer_types they make the TOP layers sliding: write all three.
    return _with_layer_types(config, layer_is_full, window, use_sliding_window=True, max_window_layers=0)


def _llama_as_smollm3(config: dict, layer_is_full: list[bool], window: int) -> dict:
    # Llama ignores layer_types; SmolLM3 is Llama plus layer_types and per-layer NoPE. With RoPE on in every
    # layer it computes exactly what Llama computes, so the relabelled checkpoint runs the hybrid natively.
    return _with_layer_types(config, layer_is_full, window, model_type="smollm3",
                             architectures=["SmolLM3ForCausalLM"], no_rope_layers=[1] * len(layer_is_full),
                             use_sliding_window=True)


def _mistral_as_ministral(config: dict, layer_is_full: list[bool], window: int) -> dict:
    # Mistral applies one window to every layer; Ministral is the same network with per-layer types.
    return _with_layer_types(config, layer_is_full, window, model_type="ministral",
                             architectures=["MinistralForCausalLM"])


def _gemma3_native(config: dict, layer_is_full: list[bool], window: int) -> dict | None:
    # Gemma3 picks its RoPE base by layer type (local 1e4, global 1e6), so relabelling a layer would change
    # its positional encoding, not only its mask. Only allocations that keep every layer's original type
    # (with any window) are exact natively; anything else loads through consa.
    patched = _with_layer_types(config, layer_is_full, window)
    original = config.get("layer_types")
    return patched if original is not None and patched["layer_types"] == list(original) else None


FAMILIES: dict[str, FamilyAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        FamilyAdapter("qwen3", default_sink_tokens=4, native_layer_export=_qwen_native),
        FamilyAdapter("qwen2", default_sink_tokens=4, native_layer_export=_qwen_native),
        FamilyAdapter("llama", default_sink_tokens=4, native_layer_export=_llama_as_smollm3),
        FamilyAdapter("smollm3", default_sink_tokens=4, native_layer_export=_llama_as_smollm3),
        FamilyAdapter("mistral", default_sink_tokens=4, native_layer_export=_mistral_as_ministral),
        FamilyAdapter("ministral", default_sink_tokens=4, native_layer_export=_mistral_as_ministral),
        FamilyAdapter("gemma3_text", default_sink_tokens=0, native_layer_export=_gemma3_native),
    )
}


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for ``model_type``, or a one-line error naming what is supported."""
    if model_type == "gemma3":
        model_type = "gemma3_text"
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; consa supports: {supported}"
        ) from None
