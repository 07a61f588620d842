"""Shared fixtures: tiny random models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)

FAMILY_CONFIGS = {
    "qwen3": lambda **kw: Qwen3Config(**{**SMALL, "head_dim": 16, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**SMALL, **kw}),
    "llama": lambda **kw: LlamaConfig(**{**SMALL, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**SMALL, "sliding_window": None, **kw}),
    "gemma3_text": lambda **kw: Gemma3TextConfig(**{**SMALL, "head_dim": 16, "sliding_window": 8,
                                                    "query_pre_attn_scalar": 16, **kw}),
}
FAMILIES = list(FAMILY_CONFIGS)


def tiny_model(family: str, seed: int = 0, **config_overrides):
    """A tiny random model of ``family`` in float32 eval mode."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family](**config_overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
