"""Per-step overhead of decoding: ATen ops, fresh tensors and host syncs of one decode step, per variant.

Deterministic CPU proxy for what makes a GPU decode step slow when the KV reads are small: every ATen op that
computes or copies is a kernel launch, every fresh tensor an allocation, and every host sync (``.item()``,
``bool(tensor)``, ``nonzero``) stalls the launch queue. Counted with :class:`consa_cli.efficiency.OpCounter` (a
TorchDispatchMode) on one decode step after a prefill, for the variants of ``bench/inference_speed.py`` (dense,
transformers' native layer hybrid, consa's layer and KV-head hybrids), plus ``consa-masked``: the KV-head
allocation under the search / eval attention (``consa_cli.attention.hybrid_attention``, DynamicCache), on a
small random Qwen3 in float32:

    PYTHONPATH=src python bench/decode_overhead.py --json docs/results/decode_overhead_cpu.json

``--time`` adds the wall time of a decode step (noisy on a shared machine; the counts are not). On a GPU,
``--device cuda`` also counts synchronizing CUDA calls (torch's sync-debug mode).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from inference_speed import VARIANTS, build_variants
from transformers import AutoModelForCausalLM, Qwen3Config

from consa_cli.attention import hybrid_attention
from consa_cli.efficiency import decode_step_ops, measure_generation

# Qwen3-0.6B's attention shape (16 query / 8 KV heads), narrower and shallower so a CPU prefill takes seconds.
SMALL_QWEN3 = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192)


def step_ms(model, context_length: int, batch_size: int, steps: int) -> float:
    """Mean wall time of ``steps`` decode steps after a prefill, in milliseconds (noisy on a shared CPU)."""
    row = measure_generation(model, context_length, batch_size, steps)
    return 1000.0 * batch_size / row["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="prefill tokens before the counted step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cuda also counts synchronizing CUDA calls")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sink-tokens", type=int, default=None, help="consa hybrids' sinks [default: family's]")
    parser.add_argument("--full-fraction", type=float, default=0.25)
    parser.add_argument("--variants", default=",".join((*VARIANTS, "consa-masked")))
    parser.add_argument("--time", action="store_true", help="also time 8 decode steps per variant")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = Qwen3Config(**{**SMALL_QWEN3, "num_hidden_layers": args.layers})
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().requires_grad_(False)
    available = build_variants(model, "small qwen3", args.device, torch.float32, args.window, args.sink_tokens,
                               args.full_fraction)
    head_allocation = available["consa-kv-head"][1]
    available["consa-masked"] = ("consa search / eval attention, KV-head", head_allocation, lambda: hybrid_attention(
        model, head_allocation.fa_mask.to(args.device), args.window, head_allocation.sink_tokens))
    rows = []
    for name in args.variants.split(","):
        label, _, enter = available[name]
        with enter() as variant:
            counts = decode_step_ops(variant, args.context, args.batch)
            milliseconds = step_ms(variant, args.context, args.batch, 8) if args.time else None
        row = {"variant": name, "label": label, "kernels": counts.kernels, "views": counts.views,
               "allocations": counts.allocations, "host_syncs": counts.host_syncs,
               "python_calls": counts.python_calls, "cuda_syncs": counts.cuda_syncs, "step_ms": milliseconds,
               "kernels_per_layer": counts.kernels / args.layers, "by_op": dict(sorted(counts.by_op.items()))}
        rows.append(row)
        timing = f" {milliseconds:7.1f} ms/step" if milliseconds else ""
        timing += f" CUDA syncs {counts.cuda_syncs}" if counts.cuda_syncs is not None else ""
        print(f"{name:14s} kernels {counts.kernels:5d} ({row['kernels_per_layer']:5.1f}/layer) views "
              f"{counts.views:5d} allocations {counts.allocations:5d} host syncs {counts.host_syncs:3d} "
              f"python calls {counts.python_calls:5d}{timing}",
              flush=True)
    if args.json:
        report = {"command": "python bench/decode_overhead.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
                  "date": datetime.date.today().isoformat(), "time": time.strftime("%H:%M UTC", time.gmtime()),
                  "torch": torch.__version__, "device": args.device, "config": {**SMALL_QWEN3, "num_hidden_layers": args.layers},
                  "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
