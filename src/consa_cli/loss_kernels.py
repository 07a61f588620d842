"""Fused Triton kernels for the search losses over vocabulary-sized rows: loss and gradient in two sweeps of a row.

The compiled chunk functions of :mod:`consa_cli.losses` make the KL step's loss cost more than its arithmetic: for
every chunk, inductor splits the vocabulary-wide reductions (it warns "Online softmax is disabled ... split the
reduction") and reads the rows several times. Here one program owns one row (token position):

1. one sweep keeps running maxima and sums of exponentials (an online softmax) of the student's logits and, for the
   KL, of the teacher's, and with them the loss;
2. a second sweep writes the gradient ``(softmax(student) - target distribution) * weight`` in the logits' dtype.

So a row is read twice and its gradient written once; nothing in float32 is as big as a row. Both kernels are
CUDA-only (Triton); :mod:`consa_cli.losses` keeps the chunked functions as the reference and the CPU path, and
``tests/test_losses.py`` compares the two (on a GPU; on a CPU under Triton's interpreter where Triton is installed).

The KL of a row, with ``p = softmax(t)``, ``q = softmax(x)``, running maxima ``m`` and sums ``s``:
``KL(p || q) = sum p (t - x) - (m_t + log s_t) + (m_x + log s_x)``, and ``sum p (t - x)`` is accumulated online as
``sum exp(t - m_t) (t - x)``, rescaled whenever ``m_t`` grows, then divided by ``s_t``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The vocabulary size is a compile-time constant (one compilation per model; Triton 3.6's interpreter cannot loop
# to a run-time bound).
BLOCK = 4096  # vocabulary entries a program handles at once
NUM_WARPS = 8


@triton.jit
def _kl_rows(student_ptr, teacher_ptr, weight_ptr, grad_ptr, loss_ptr, student_stride, teacher_stride, grad_stride,
             vocab: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_stride
    teacher_row = teacher_ptr + row * teacher_stride
    grad_row = grad_ptr + row * grad_stride
    weight = tl.load(weight_ptr + row)
    offsets = tl.arange(0, BLOCK)
    max_x = tl.full((), float("-inf"), tl.float32)
    sum_x = tl.zeros((), tl.float32)
    max_t = tl.full((), float("-inf"), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)  # sum exp(t - max_t) (t - x)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        inside = cols < vocab
        x = tl.load(student_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        t = tl.load(teacher_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        new_max_x = tl.maximum(max_x, tl.max(x, 0))
        sum_x = sum_x * tl.exp(max_x - new_max_x) + tl.sum(tl.exp(x - new_max_x), 0)
        max_x = new_max_x
        new_max_t = tl.maximum(max_t, tl.max(t, 0))
        rescale = tl.exp(max_t - new_max_t)
        exp_t = tl.exp(t - new_max_t)
        # (-inf teacher entries, and the padding, carry no probability: their t - x would be nan)
        difference = tl.where(exp_t > 0, t - x, 0.0)
        sum_t = sum_t * rescale + tl.sum(exp_t, 0)
        cross = cross * rescale + tl.sum(exp_t * difference, 0)
        max_t = new_max_t
    log_normaliser_x = max_x + tl.log(sum_x)
    log_normaliser_t = max_t + tl.log(sum_t)
    tl.store(loss_ptr + row, weight * (cross / sum_t - log_normaliser_t + log_normaliser_x))
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        inside = cols < vocab
        x = tl.load(student_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        t = tl.load(teacher_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        gradient = (tl.exp(x - log_normaliser_x) - tl.exp(t - log_normaliser_t)) * weight
        tl.store(grad_row + cols, gradient.to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _next_token_rows(logits_ptr, targets_ptr, weight_ptr, grad_ptr, loss_ptr, logits_stride, grad_stride,
                     ignore_index, vocab: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    grad_row = grad_ptr + row * grad_stride
    target = tl.load(targets_ptr + row)
    counted = target != ignore_index
    weight = tl.where(counted, tl.load(weight_ptr + row), 0.0)
    offsets = tl.arange(0, BLOCK)
    max_x = tl.full((), float("-inf"), tl.float32)
    sum_x = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        x = tl.load(logits_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max_x = tl.maximum(max_x, tl.max(x, 0))
        sum_x = sum_x * tl.exp(max_x - new_max_x) + tl.sum(tl.exp(x - new_max_x), 0)
        max_x = new_max_x
    log_normaliser = max_x + tl.log(sum_x)
    safe_target = tl.where(counted, target, 0)
    target_logit = tl.load(logits_row + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, weight * (log_normaliser - target_logit), 0.0))
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        inside = cols < vocab
        x = tl.load(logits_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        probability = tl.exp(x - log_normaliser)
        gradient = tl.where(cols == target, probability - 1.0, probability) * weight
        tl.store(grad_row + cols, gradient.to(grad_ptr.dtype.element_ty), mask=inside)


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor,
            grad: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``weights * KL(softmax(teacher) || softmax(student))``; writes the gradient into ``grad``.
    ``student``, ``teacher`` and ``grad`` are ``[rows, vocab]`` with unit column stride; ``weights`` float32."""
    rows, vocab = student.shape
    losses = torch.empty(rows, dtype=torch.float32, device=student.device)
    if rows:
        _kl_rows[(rows,)](student, teacher, weights, grad, losses, student.stride(0), teacher.stride(0),
                          grad.stride(0), vocab=vocab, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return losses.sum()


def next_token_rows(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor,
                    ignore_index: int) -> torch.Tensor:
    """Sum over rows of ``weights * cross-entropy(logits, targets)`` (rows whose target is ``ignore_index`` count
    nothing); writes the gradient into ``grad``."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _next_token_rows[(rows,)](logits, targets, weights, grad, losses, logits.stride(0), grad.stride(0),
                                  ignore_index, vocab=vocab, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return losses.sum()
