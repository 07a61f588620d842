"""The fused Triton loss kernels (consa_cli.loss_kernels) against the chunked reference of consa_cli.losses.

On a CPU they run under Triton's interpreter, in a subprocess (TRITON_INTERPRET is read when a kernel is defined);
on a GPU, through the search's own loss function with the kernels on and off.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import consa_cli.losses
from consa_cli.losses import search_loss

HAS_TRITON = importlib.util.find_spec("triton") is not None

INTERPRETED_CHECK = textwrap.dedent("""
    import torch
    from consa_cli import loss_kernels
    from consa_cli.losses import IGNORE, _kl_chunk, _next_token_chunk

    torch.manual_seed(0)
    loss_kernels.BLOCK = 64  # (read when called) several blocks per row and a partial last one
    rows, vocab = 6, 150
    for dtype, rtol, grad_atol in ((torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-3, 4e-3)):
        wide = (torch.randn(rows, vocab + 10) * 4).to(dtype)
        student = wide[:, :vocab]  # rows with a stride longer than the vocabulary
        teacher = (torch.randn(rows, vocab) * 4).to(dtype)
        weights = torch.rand(rows)
        weights[1] = 0.0
        targets = torch.randint(0, vocab, (rows,))
        targets[2] = IGNORE
        for name, fused, reference, other in (
                ("kl", loss_kernels.kl_rows, _kl_chunk, teacher),
                ("lm", lambda *a: loss_kernels.next_token_rows(*a, ignore_index=IGNORE), _next_token_chunk,
                 targets)):
            grad, expected_grad = torch.full_like(student, 7.0), torch.empty_like(student)
            value = fused(student, other, weights, grad)
            expected = reference(student, other, weights.unsqueeze(-1), expected_grad)
            torch.testing.assert_close(value, expected, rtol=rtol, atol=1e-6, msg=f"{name} {dtype} loss")
            torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=0, atol=grad_atol,
                                       msg=f"{name} {dtype} gradient")
            assert grad[1].abs().max() == 0, "a row of weight 0 has no gradient"
    # A teacher with -inf logits (a banned word): those words carry no probability and the loss stays finite.
    teacher = torch.randn(2, 100)
    teacher[0, 10:40] = float("-inf")
    student = torch.randn(2, 100)
    grad = torch.empty_like(student)
    value = loss_kernels.kl_rows(student, teacher, torch.ones(2), grad)
    p, log_q = teacher.softmax(-1), student.log_softmax(-1)
    expected = torch.where(p > 0, p * (teacher.log_softmax(-1) - log_q), 0.0).sum()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, log_q.exp() - p)
    # No rows: nothing launched, zero loss.
    empty = torch.empty(0, 100)
    assert loss_kernels.kl_rows(empty, empty, torch.empty(0), empty.clone()).item() == 0.0
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (make install brings it on Linux x86-64)")
def test_fused_loss_kernels_equal_the_chunked_reference_under_the_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_search_loss_equals_the_compiled_chunks_on_cuda(dtype, monkeypatch):
    """Mixed kl / lm batch with masked positions, the vocabulary of Qwen3: fused kernels on and off."""
    torch.manual_seed(0)
    vocab = 151936
    student = (torch.randn(4, 96, vocab, device="cuda") * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(2, 96, vocab, device="cuda") * 3).to(dtype)
    ids = torch.randint(0, vocab, (4, 96), device="cuda")
    mask = torch.ones(4, 96, dtype=torch.bool)
    mask[1, :50] = False
    mask[3, 60:] = False
    losses = ["kl", "lm", "lm", "kl"]
    results = []
    for fused in (False, True):
        monkeypatch.setattr(consa_cli.losses, "FUSED_KERNELS", fused)
        value = search_loss(student, ids, mask, losses, teacher)
        grad, = torch.autograd.grad(2.0 * value, student)
        results.append((value, grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    tolerance = 1e-7 if dtype == torch.float32 else 2e-7  # the gradients are ~1e-6 here (weights 1/(B * count))
    torch.testing.assert_close(results[1][1].float(), results[0][1].float(), rtol=1e-2, atol=tolerance)
