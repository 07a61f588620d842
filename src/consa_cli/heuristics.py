"""Training-free allocation: rank units by how much attention they pay beyond the sliding window.

The score of a KV head is the mean attention probability its query heads put on keys a sliding-window unit
would drop (older than the window and not a sink), over the calibration positions the search's loss counts
(every position at least a window into a text sequence; the answer positions of a retrieval sample), averaged
per sequence first -- as the search's loss is -- so a retrieval sample's few answer positions weigh as much as
a text sequence's thousand. A head that
rarely looks far back loses little when made sliding. This is the attention-statistics heuristic that the
learned search is measured against: one dense forward pass per calibration sequence, no gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from consa_cli.allocation import Allocation
from consa_cli.attention import attention_modules, consa_mask
from consa_cli.calibration import CalibrationSet
from consa_cli.models import DEFAULT_MODEL
from consa_cli.search import SearchResult, UnitLayout
from consa_cli.settings import SearchSettings, settings_to_dict

STATISTICS_ATTENTION = "consa_attention_mass"
QUERY_CHUNK = 256  # query rows per score block: bounds the [heads, chunk, T] probability tensor


class _MassRecorder:
    """Per-layer accumulator of beyond-window attention mass, stored as ``module.consa_mass``."""

    def __init__(self, num_kv_heads: int, window: int, sink_tokens: int, device: torch.device):
        self.window, self.sink_tokens = window, sink_tokens
        self.total = torch.zeros(num_kv_heads, dtype=torch.float64, device=device)  # sum of per-sequence means
        self.sequences = 0
        self.sequence_total = torch.zeros_like(self.total)  # of the sequence under way
        self.sequence_positions = 0
        self.query_mask: torch.Tensor | None = None  # [1, T]: the positions whose attention counts

    def end_sequence(self) -> None:
        if self.sequence_positions:
            self.total += self.sequence_total / self.sequence_positions
            self.sequences += 1
        self.sequence_total.zero_()
        self.sequence_positions = 0


def attention_with_mass(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The model's own attention (causal; a natively sliding layer keeps its window: Gemma3) that also adds each
    KV head's beyond-window mass to ``module.consa_mass``."""
    recorder: _MassRecorder = module.consa_mass
    batch, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    k_pos = torch.arange(length, device=query.device)
    out = torch.empty_like(query)
    for start in range(0, length, QUERY_CHUNK):
        q_pos = torch.arange(start, min(start + QUERY_CHUNK, length), device=query.device).unsqueeze(1)
        scores = torch.matmul(query[:, :, q_pos.squeeze(1)].float(), key.float().transpose(-1, -2)) * scaling
        hidden = k_pos > q_pos
        if kwargs.get("sliding_window"):  # what the model computes there: all-full would be another model
            hidden = hidden | (k_pos <= q_pos - kwargs["sliding_window"])
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[:, :, q_pos.squeeze(1)] = torch.matmul(probs, value.float()).to(query.dtype)
        beyond = (k_pos <= q_pos - recorder.window) & (k_pos >= recorder.sink_tokens)  # [chunk, T]
        mass = (probs * beyond).sum(dim=-1)  # [B, Hq, chunk]
        counted = recorder.query_mask[:, q_pos.squeeze(1)]  # [B, chunk]
        per_kv_head = (mass * counted.unsqueeze(1)).view(batch, kv_heads, groups, -1).sum(dim=(0, 2, 3)) / groups
        recorder.sequence_total += per_kv_head.double()
        recorder.sequence_positions += int(counted.sum())
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(STATISTICS_ATTENTION, attention_with_mass)
AttentionMaskInterface.register(STATISTICS_ATTENTION, consa_mask)


@torch.no_grad()
def attention_mass_scores(model: nn.Module, calibration: CalibrationSet, order: torch.Tensor, count: int,
                          window: int, sink_tokens: int,
                          on_sequence: Callable[[int], None] | None = None) -> torch.Tensor:
    """Mean beyond-window attention mass ``[L, H_kv]`` over the first ``count`` sequences in ``order``."""
    device = next(model.parameters()).device
    modules = attention_modules(model)
    num_kv_heads = model.config.num_key_value_heads
    original = model.config._attn_implementation
    for module in modules:
        module.consa_mass = _MassRecorder(num_kv_heads, window, sink_tokens, device)
    model.set_attn_implementation(STATISTICS_ATTENTION)
    try:
        for done in range(count):
            index = order[done % len(order)]
            input_ids = calibration.sequences[index : index + 1].to(device)
            # Positions inside the first window have nothing beyond it: they would only dilute the mean.
            query_mask = calibration.loss_mask[index : index + 1].to(device, copy=True)
            query_mask[:, :window] = False
            for module in modules:
                module.consa_mass.query_mask = query_mask
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            for module in modules:
                module.consa_mass.end_sequence()
            if on_sequence is not None:
                on_sequence(done + 1)
        return torch.stack([(m.consa_mass.total / max(1, m.consa_mass.sequences)).float().cpu() for m in modules])
    finally:
        model.set_attn_implementation(original)
        for module in modules:
            del module.consa_mass


def attention_mass_search(settings: SearchSettings, model: nn.Module, calibration: CalibrationSet,
                          sink_tokens: int, model_fingerprint: str = "",
                          on_step: Callable[[dict], None] | None = None) -> SearchResult:
    """``consa search --method attention-mass``: the same calibration budget as a learned search.

    It reads ``steps x batch_size`` sequences in the search's seeded order (the tokens a learned search of the
    same settings sees) and keeps the units with the most beyond-window attention mass, exactly the target count
    (per layer for kv-head-per-layer); a layer unit scores the mean of its KV heads.
    """
    started = time.perf_counter()
    config = model.config
    layout = UnitLayout(settings.granularity, config.num_hidden_layers, config.num_key_value_heads)
    order = torch.randperm(calibration.sequences.shape[0], generator=torch.Generator().manual_seed(settings.seed))
    count = settings.steps * settings.batch_size

    def report(done: int) -> None:
        if on_step is not None:
            on_step({"step": done, "sequences": done, "of": count})

    mass = attention_mass_scores(model, calibration, order, count, settings.window, sink_tokens, report)
    scores = mass.mean(dim=1) if settings.granularity == "layer" else mass.flatten()
    allocation = Allocation(
        fa_mask=layout.rank_to_mask(scores, settings.sparsity),
        granularity=settings.granularity,
        sliding_window=settings.window,
        sink_tokens=sink_tokens,
        method="heuristic:attention-mass",
        model=settings.model or DEFAULT_MODEL,
        model_fingerprint=model_fingerprint,
        scores=scores,
    )
    allocation.metadata = {"settings": settings_to_dict(settings), "sequences_scored": count}
    return SearchResult(allocation=allocation, seconds=time.perf_counter() - started)
