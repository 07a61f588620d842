"""Search losses over vocabulary-sized logits, in token chunks, with the gradient made in the same sweep.

At 4096 tokens Qwen3's 151936-word vocabulary makes the logits 1.2 GB in bfloat16, and every float32 intermediate
of a plain ``cross_entropy(logits.float(), ...)`` (the upcast, the log-softmax, the teacher's probabilities, the
gradient) 2.5 GB more. Here each chunk of tokens is upcast, its loss summed and its gradient written in the logits'
own dtype, so nothing of float32 bigger than a chunk exists; backward only scales the stored gradient. On CUDA each
chunk is one compiled (fused) graph.
"""

from __future__ import annotations

import functools

import torch

CHUNK_ELEMENTS = 1 << 25  # float32 elements of one chunk's intermediates (128 MiB)
IGNORE = -100  # target of positions without a next token


def _kl_chunk(student, teacher, scale, grad_out):
    log_q = student.float().log_softmax(-1)
    log_p = teacher.float().log_softmax(-1)
    p = log_p.exp()
    grad_out.copy_((log_q.exp() - p) * scale)
    return (p * (log_p - log_q)).sum()


def _next_token_chunk(logits, targets, scale, grad_out):
    log_q = logits.float().log_softmax(-1)
    valid = (targets != IGNORE).unsqueeze(-1)
    hit = torch.arange(logits.shape[-1], device=logits.device) == targets.unsqueeze(-1)
    p = log_q.exp()
    grad_out.copy_(torch.where(hit, p - 1.0, p) * valid * scale)
    return -torch.where(hit, log_q, 0.0).sum()


@functools.cache
def _compiled(chunk_fn):
    return torch.compile(chunk_fn, dynamic=False)


class _ChunkedLoss(torch.autograd.Function):
    """Mean over tokens of ``chunk_fn``'s per-chunk sums; the gradient is computed in forward and kept."""

    @staticmethod
    def forward(ctx, logits, other, chunk_fn, count):
        chunk_fn = _compiled(chunk_fn) if logits.is_cuda else chunk_fn
        grad = torch.empty_like(logits)
        scale = torch.tensor(1.0 / max(count, 1), device=logits.device)
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = slice(start, start + rows)
            total = total + chunk_fn(logits[chunk], other[chunk], scale, grad[chunk])
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of ``[..., vocab]`` logits; differentiable in the student's."""
    student = student_logits.flatten(0, -2)
    return _ChunkedLoss.apply(student, teacher_logits.detach().flatten(0, -2), _kl_chunk, student.shape[0])


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, vocab]`` predicting ``input_ids [B, T]`` one position ahead."""
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE)
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    return _ChunkedLoss.apply(logits.flatten(0, 1), targets.flatten(), _next_token_chunk, count)
