"""The KL loss's teacher: the original model's predictions for a calibration sequence, computed once per sequence.

The model's weights are frozen during a search, so the teacher's output for a sequence is the same at every visit.
A search longer than its calibration set visits sequences again (the Qwen3 recipe: 300 steps over 126 sequences
of 4096 tokens), and the teacher's forward is a third of a KL step (docs/benchmarks.md). :class:`TeacherCache`
keeps the teacher's last hidden state of each sequence that will be visited again -- hidden size x tokens, 8 MiB
for a 4096-token Qwen3-0.6B sequence, against 1.2 GiB for its logits -- and makes the logits from it with the
output head, which is what the model's own forward does (:func:`logits_from_hidden`; a test checks every family
in the registry). Computed or recalled, the logits are the same numbers. The cache holds only sequences with a
later visit, drops each after its last, and never exceeds its byte budget (what does not fit is recomputed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits a causal LM's forward makes from its decoder's last hidden state ``hidden [B, T, H]``: the output
    head, then Gemma's final soft-capping where the config sets it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def remaining_visits(order: torch.Tensor, batch_size: int, first_step: int, steps: int,
                     is_teacher_row: torch.Tensor) -> dict[int, int]:
    """How often the search's steps ``first_step .. steps-1`` use the teacher on each sequence: step s reads
    ``order[(s * batch_size + i) % len(order)]`` for i < batch_size, and ``is_teacher_row[index]`` says whether that
    sequence's loss is the KL loss."""
    counts: dict[int, int] = {}
    for step in range(first_step, steps):
        for i in range(batch_size):
            index = int(order[(step * batch_size + i) % len(order)])
            if is_teacher_row[index]:
                counts[index] = counts.get(index, 0) + 1
    return counts


class TeacherCache:
    """Teacher logits for the search's KL sequences, with each sequence's last hidden state kept while it has a
    later visit and the budget allows.

    ``decoder_forward(input_ids)`` returns the decoder's last hidden state with the model's own attention (the
    search wraps it in :func:`~consa_cli.attention.original_attention` and ``torch.no_grad``); ``visits`` comes from
    :func:`remaining_visits`; ``budget_bytes`` 0 keeps nothing (every visit recomputes, as without a cache).
    """

    def __init__(self, model: nn.Module, decoder_forward: Callable[[torch.Tensor], torch.Tensor],
                 visits: dict[int, int], budget_bytes: int):
        self.model = model
        self.decoder_forward = decoder_forward
        self.visits = dict(visits)
        self.budget_bytes = budget_bytes
        self.kept: dict[int, torch.Tensor] = {}
        self.kept_bytes = 0
        self.computed = 0  # sequences whose hidden state was computed (a teacher forward)
        self.recalled = 0  # sequences whose hidden state came from the cache

    def logits(self, sequence_ids: Sequence[int], input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits ``[len(sequence_ids), T, vocab]`` for ``input_ids`` (one row per id, in order)."""
        with torch.no_grad():
            return logits_from_hidden(self.model, self._hidden(sequence_ids, input_ids))

    def _hidden(self, sequence_ids: Sequence[int], input_ids: torch.Tensor) -> torch.Tensor:
        missing = [row for row, index in enumerate(sequence_ids) if index not in self.kept]
        self.computed += len(missing)
        self.recalled += len(sequence_ids) - len(missing)
        if len(missing) == len(sequence_ids):
            hidden = self.decoder_forward(input_ids)
        else:  # the kept rows from the cache, the others from one forward over them, in batch order
            fresh = iter(self.decoder_forward(input_ids[missing]) if missing else ())
            hidden = torch.stack([self.kept[index] if index in self.kept else next(fresh) for index in sequence_ids])
        for row, index in enumerate(sequence_ids):
            self._after_visit(index, hidden[row])
        return hidden

    def _after_visit(self, index: int, hidden: torch.Tensor) -> None:
        left = self.visits.get(index, 1) - 1
        self.visits[index] = left
        if left <= 0:
            dropped = self.kept.pop(index, None)
            if dropped is not None:
                self.kept_bytes -= dropped.numel() * dropped.element_size()
            return
        size = hidden.numel() * hidden.element_size()
        if index not in self.kept and self.kept_bytes + size <= self.budget_bytes:
            self.kept[index] = hidden.detach().clone()  # a copy: a batch's hidden state would be kept whole
            self.kept_bytes += size
