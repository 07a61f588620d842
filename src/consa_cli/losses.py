"""Search losses over vocabulary-sized logits, in token chunks, with the gradient made in the same sweep.

At 4096 tokens Qwen3's 151936-word vocabulary makes the logits 1.2 GB in bfloat16, and every float32 intermediate
of a plain ``cross_entropy(logits.float(), ...)`` (the upcast, the log-softmax, the teacher's probabilities, the
gradient) 2.5 GB more. Here each chunk of tokens is upcast, its loss summed and its gradient written in the logits'
own dtype, so nothing of float32 bigger than a chunk exists; backward only scales the stored gradient. On CUDA each
chunk is one compiled (fused) graph.

Every row (token position) carries a weight in the total, so a loss can count only some positions and average each
sequence on its own (a retrieval calibration sample scores its answer tokens only; see :func:`search_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

CHUNK_ELEMENTS = 1 << 25  # float32 elements of one chunk's intermediates (128 MiB)
IGNORE = -100  # target of positions without a next token


def _kl_chunk(student, teacher, weight, grad_out):
    log_q = student.float().log_softmax(-1)
    log_p = teacher.float().log_softmax(-1)
    p = log_p.exp()
    grad_out.copy_((log_q.exp() - p) * weight)
    return ((p * (log_p - log_q)) * weight).sum()


def _next_token_chunk(logits, targets, weight, grad_out):
    log_q = logits.float().log_softmax(-1)
    weight = weight * (targets != IGNORE).unsqueeze(-1)
    hit = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1)
    p = log_q.exp()
    grad_out.copy_(torch.where(hit, p - 1.0, p) * weight)
    return -(torch.where(hit, log_q, 0.0) * weight).sum()


@functools.cache
def _compiled(chunk_fn):
    return torch.compile(chunk_fn, dynamic=False)


class _ChunkedLoss(torch.autograd.Function):
    """Weighted sum over rows of ``chunk_fn``'s per-row losses; the gradient is computed in forward and kept."""

    @staticmethod
    def forward(ctx, logits, other, chunk_fn, weights):
        chunk_fn = _compiled(chunk_fn) if logits.is_cuda else chunk_fn
        grad = torch.empty_like(logits)
        weights = weights.to(device=logits.device, dtype=torch.float32).unsqueeze(-1)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = slice(start, start + rows)
            total = total + chunk_fn(logits[chunk], other[chunk], weights[chunk], grad[chunk])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of ``[..., vocab]`` logits, differentiable in the student's: the mean over tokens,
    or the sum weighted by ``row_weights`` (one per token)."""
    student = student_logits.flatten(0, -2)
    if row_weights is None:
        row_weights = torch.full((student.shape[0],), 1.0 / max(student.shape[0], 1))
    return _ChunkedLoss.apply(student, teacher_logits.detach().flatten(0, -2), _kl_chunk, row_weights.flatten())


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, vocab]`` predicting ``input_ids [B, T]`` one position ahead."""
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE)
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    weights = torch.full((targets.numel(),), 1.0 / max(count, 1))
    return _ChunkedLoss.apply(logits.flatten(0, 1), targets.flatten(), _next_token_chunk, weights)


def search_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, losses: str | Sequence[str],
                teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The search's task loss: each sequence's mean over the logit positions ``loss_mask [B, T]`` selects, then
    the mean over the batch.

    ``losses`` names each sequence's loss (one name: all of them): ``kl`` compares with the dense model's
    ``teacher_logits``, which hold only the ``kl`` sequences, in batch order (``[count of kl sequences, T,
    vocab]``); ``lm`` is next-token cross-entropy (the last position has no next token and never counts). A mixed
    batch adds the per-sequence terms, each weighted 1/B. Where only some positions count, only their logits rows
    are used, so a retrieval sample scoring three answer tokens costs three rows, not a thousand.
    """
    batch, length = input_ids.shape
    losses = [losses] * batch if isinstance(losses, str) else list(losses)
    scored = loss_mask.clone()
    scored[[i for i, loss in enumerate(losses) if loss == "lm"], -1] = False
    weights = scored / (scored.sum(dim=1, keepdim=True).clamp(min=1) * batch)
    positions = torch.arange(length, device=scored.device)
    # Read once per call (each bool() of a device tensor is a host sync): are all positions before the last scored,
    # and is the last one (which only kl scores)?
    all_but_last, last = bool(loss_mask[:, :-1].all()), bool(loss_mask[:, -1].all())
    parts = []
    for loss, chunk_fn in (("kl", _kl_chunk), ("lm", _next_token_chunk)):
        sequences = [i for i, name in enumerate(losses) if name == loss]
        if not sequences:
            continue
        if loss == "kl":
            other = teacher_logits.detach().flatten(0, -2)
        else:
            other = torch.nn.functional.pad(input_ids[sequences, 1:], (0, 1), value=IGNORE).flatten()
        every_position = all_but_last and (loss == "lm" or last)
        if len(sequences) == batch and every_position:  # the logits in place, no copy (lm: the last weighs 0)
            parts.append(_ChunkedLoss.apply(logits.flatten(0, 1), other, chunk_fn, weights.flatten()))
            continue
        selected = scored[sequences]
        student_rows = (torch.tensor(sequences, device=scored.device).unsqueeze(1) * length + positions)[selected]
        other_rows = (torch.arange(len(sequences), device=scored.device).unsqueeze(1) * length + positions)[selected]
        parts.append(_ChunkedLoss.apply(logits.flatten(0, 1).index_select(0, student_rows),
                                        other.index_select(0, other_rows), chunk_fn,
                                        weights[sequences][selected]))
    return sum(parts[1:], start=parts[0])
