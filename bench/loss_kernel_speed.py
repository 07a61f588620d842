"""The search losses alone over Qwen3's vocabulary: the fused Triton kernels against the compiled chunk functions.

Per token count, in one process: forward + backward of the next-token loss (``lm``) and of the KL to a teacher
(``kl``) over bf16 logits ``[tokens, 151936]``, each with ``consa_cli.losses.FUSED_KERNELS`` on (fused) and off
(compiled chunks); the median of ``--repeats`` timed calls (CUDA events around each) and the bytes a pass must move
(read the logits twice -- the teacher's too for kl -- write the gradient, then scale it in backward) over the time,
as achieved bandwidth. For scale, the output head's GEMM of the same tokens (hidden 1024, as Qwen3-0.6B), which
the teacher's logits cost on a cached revisit. ``*_extra_peak_gib``: the memory a forward + backward needs above its
inputs (the logits' gradient is one logits-sized buffer; session 13 made backward scale it in place).

    python bench/loss_kernel_speed.py --tokens 4096 8192 --json docs/results/loss-kernels-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from search_speed import cuda_milliseconds

import consa_cli.losses
from consa_cli.losses import kl_to_teacher, next_token_loss
from consa_cli.search import environment_versions

VOCAB = 151936
HIDDEN = 1024


def measure(tokens: int, device: torch.device, args) -> dict:
    """Both losses, fused and chunked, and the head GEMM at ``tokens`` tokens."""
    generator = torch.Generator(device).manual_seed(0)
    logits = (torch.randn(1, tokens, VOCAB, device=device, generator=generator) * 3).bfloat16().requires_grad_()
    teacher = (torch.randn(1, tokens, VOCAB, device=device, generator=generator) * 3).bfloat16()
    input_ids = torch.randint(0, VOCAB, (1, tokens), device=device, generator=generator)
    losses = {"lm": lambda: next_token_loss(logits, input_ids), "kl": lambda: kl_to_teacher(logits, teacher)}
    element_bytes = tokens * VOCAB * 2
    # the logits (and the teacher's) read twice, the gradient written, then read and written again in backward
    moved = {"lm": 2 * element_bytes + element_bytes + 2 * element_bytes,
             "kl": 4 * element_bytes + element_bytes + 2 * element_bytes}
    row, values = {"tokens": tokens}, {}
    for loss, value in losses.items():
        for fused in (False, True):
            consa_cli.losses.FUSED_KERNELS = fused
            name = f"{loss}/{'fused' if fused else 'chunks'}"
            values[name] = value().item()

            def step(value=value):
                logits.grad = None  # (an accumulated gradient would add a pass over the logits)
                value().backward()

            row[f"{name}_ms"] = round(cuda_milliseconds(step, args.warmup, args.repeats), 3)
            logits.grad = None
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            # memory above the inputs while the loss and its gradient are made (the logits' gradient included)
            row[f"{name}_extra_peak_gib"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 2)
            row[f"{name}_gb_per_s"] = round(moved[loss] / row[f"{name}_ms"] / 1e6, 1)
        row[f"{loss}_speedup"] = round(row[f"{loss}/chunks_ms"] / row[f"{loss}/fused_ms"], 2)
        row[f"{loss}_value_difference"] = abs(values[f"{loss}/fused"] - values[f"{loss}/chunks"])
    consa_cli.losses.FUSED_KERNELS = True
    hidden = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
    head = torch.randn(VOCAB, HIDDEN, device=device, dtype=torch.bfloat16)
    row["head_gemm_ms"] = round(cuda_milliseconds(lambda: hidden @ head.T, args.warmup, args.repeats), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("loss_kernel_speed.py times CUDA kernels: run it on a GPU")
    device = torch.device("cuda")
    report = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "device": torch.cuda.get_device_name(device), "versions": environment_versions(), "vocab": VOCAB,
              "rows": []}
    for tokens in args.tokens:
        report["rows"].append(measure(tokens, device, args))
        print(report["rows"][-1], flush=True)
        torch.cuda.empty_cache()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
