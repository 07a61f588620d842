"""Search losses over vocabulary-sized logits, in token chunks, with the gradient made in the same sweep.

At 4096 tokens Qwen3's 151936-word vocabulary makes the logits 1.2 GB in bfloat16, and every float32 intermediate
of a plain ``cross_entropy(logits.float(), ...)`` (the upcast, the log-softmax, the teacher's probabilities, the
gradient) 2.5 GB more. Here each chunk of tokens is upcast, its loss summed and its gradient written in the logits'
own dtype, so nothing of float32 bigger than a chunk exists; backward only scales the stored gradient. On CUDA with
Triton the rows go through the fused kernels of :mod:`consa_cli.loss_kernels` instead (each row read twice, its
gradient written once); without Triton each chunk is one compiled graph.

Every row (token position) carries a weight in the total, so a loss can count only some positions and average each
sequence on its own (a retrieval calibration sample scores its answer tokens only; see :func:`search_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 25  # float32 elements of one chunk's intermediates (128 MiB)
FUSED_KERNELS = True  # on CUDA, the Triton kernels where Triton imports (benchmarks set False to compare)
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


@functools.cache
def _fused_kernels() -> dict | None:
    """The Triton kernel of each chunk function, or None without Triton."""
    try:
        from consa_cli import loss_kernels
    except ImportError:
        return None
    return {_kl_chunk: loss_kernels.kl_rows,
            _next_token_chunk: functools.partial(loss_kernels.next_token_rows, ignore_index=IGNORE)}


def _fused(chunk_fn, logits: torch.Tensor):
    """``chunk_fn``'s fused kernel where it applies (CUDA, Triton, rows with unit column stride), else None."""
    if not (FUSED_KERNELS and logits.is_cuda and logits.stride(-1) == 1):
        return None
    kernels = _fused_kernels()
    return None if kernels is None else kernels[chunk_fn]


def loss_kernels(device: torch.device | str) -> str:
    """Which implementation the losses run with on ``device`` (recorded in a search's metadata): ``triton`` (the
    fused kernels), ``compiled-chunks`` (CUDA without Triton's kernels) or ``chunks`` (eager, the CPU reference)."""
    if torch.device(device).type != "cuda":
        return "chunks"
    return "triton" if FUSED_KERNELS and _fused_kernels() is not None else "compiled-chunks"


class _ChunkedLoss(torch.autograd.Function):
    """Weighted sum over rows of ``chunk_fn``'s per-row losses; the gradient is computed in forward and kept."""

    @staticmethod
    def forward(ctx, logits, other, chunk_fn, weights):
        grad = torch.empty_like(logits)
        weights = weights.to(device=logits.device, dtype=torch.float32)
        fused = _fused(chunk_fn, logits)
        if fused is not None:
            total = fused(logits, other.contiguous(), weights.contiguous(), grad)
            ctx.save_for_backward(grad)
            return total
        chunk_fn = _compiled(chunk_fn) if logits.is_cuda else chunk_fn
        weights = weights.unsqueeze(-1)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = slice(start, start + rows)
            total = total + chunk_fn(logits[chunk], other[chunk], weights[chunk], grad[chunk])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # Scaled in place: a second [tokens, vocab] buffer would raise the step's peak memory by the logits' size
        # (2.5 GB at 8192 tokens of Qwen3). So the gradient can be taken once; a second backward through the same
        # graph (retain_graph) is refused rather than given a gradient scaled twice.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the chunked loss's gradient was already taken once: its backward runs only once")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None


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


@dataclass(frozen=True)
class LossPart:
    """One loss over some sequences of a batch: which sequences (``sequences``: their batch indices; ``rows``: those
    indices on the device, None when it is every sequence), which flattened logits rows it reads (``student_rows`` /
    ``other_rows``: None for every row in place) and each row's weight."""

    loss: str
    sequences: tuple[int, ...]
    rows: torch.Tensor | None
    student_rows: torch.Tensor | None
    other_rows: torch.Tensor | None
    weights: torch.Tensor


def plan_search_loss(loss_mask: torch.Tensor, losses: str | Sequence[str],
                     device: torch.device | str | None = None) -> tuple[LossPart, ...]:
    """The index and weight tensors of :func:`search_loss` for one batch, made from ``loss_mask`` on the host and
    then moved to ``device`` (default: ``loss_mask``'s).

    The search makes them at the start of a step, before any of its work is queued: read or copied later, in the
    middle of a step, they would make the host wait for the device (every host read of a device tensor, and every
    copy from pageable host memory, synchronises), and a host that waits cannot queue the next kernels ahead.
    """
    device = loss_mask.device if device is None else torch.device(device)
    host_mask = loss_mask.cpu()
    batch, length = host_mask.shape
    losses = [losses] * batch if isinstance(losses, str) else list(losses)
    scored = host_mask.clone()
    scored[[i for i, loss in enumerate(losses) if loss == "lm"], -1] = False
    weights = scored / (scored.sum(dim=1, keepdim=True).clamp(min=1) * batch)
    positions = torch.arange(length)
    all_but_last, last = bool(host_mask[:, :-1].all()), bool(host_mask[:, -1].all())
    parts = []
    for loss in ("kl", "lm"):
        sequences = tuple(i for i, name in enumerate(losses) if name == loss)
        if not sequences:
            continue
        rows = None if len(sequences) == batch else torch.tensor(sequences).to(device)
        if len(sequences) == batch and all_but_last and (loss == "lm" or last):
            # the logits in place, no copy (lm: the last position weighs 0)
            parts.append(LossPart(loss, sequences, rows, None, None, weights.flatten().to(device)))
            continue
        selected = scored[list(sequences)]
        student_rows = (torch.tensor(sequences).unsqueeze(1) * length + positions)[selected]
        other_rows = (torch.arange(len(sequences)).unsqueeze(1) * length + positions)[selected]
        parts.append(LossPart(loss, sequences, rows, student_rows.to(device), other_rows.to(device),
                              weights[list(sequences)][selected].to(device)))
    return tuple(parts)


def search_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None,
                losses: str | Sequence[str], teacher_logits: torch.Tensor | None = None,
                plan: Sequence[LossPart] | None = None) -> torch.Tensor:
    """The search's task loss: each sequence's mean over the logit positions ``loss_mask [B, T]`` selects, then
    the mean over the batch.

    ``losses`` names each sequence's loss (one name: all of them): ``kl`` compares with the dense model's
    ``teacher_logits``, which hold only the ``kl`` sequences, in batch order (``[count of kl sequences, T,
    vocab]``); ``lm`` is next-token cross-entropy (the last position has no next token and never counts). A mixed
    batch adds the per-sequence terms, each weighted 1/B. Where only some positions count, only their logits rows
    are used, so a retrieval sample scoring three answer tokens costs three rows, not a thousand. ``plan``:
    :func:`plan_search_loss` of ``loss_mask`` and ``losses`` made ahead (then ``loss_mask`` is not read); without
    it, made here.
    """
    if plan is None:
        plan = plan_search_loss(loss_mask, losses, logits.device)
    terms = []
    for part in plan:
        if part.loss == "kl":
            chunk_fn, other = _kl_chunk, teacher_logits.detach().flatten(0, -2)
        else:
            chunk_fn = _next_token_chunk
            ids = input_ids if part.rows is None else input_ids.index_select(0, part.rows)
            other = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE).flatten()
        student = logits.flatten(0, 1)
        if part.student_rows is not None:  # (None: every sequence, every row, in place)
            student, other = student.index_select(0, part.student_rows), other.index_select(0, part.other_rows)
        terms.append(_ChunkedLoss.apply(student, other, chunk_fn, part.weights))
    return sum(terms[1:], start=terms[0])
