"""End-to-end ``model.generate()`` time: what a user of plain transformers gets from a consa hybrid.

bench/inference_speed.py times prefill and decode steps as consa_cli.efficiency runs them (its own caches, its own
compiled step). This script calls nothing but ``model.generate()``: transformers builds the cache (consa's hybrid
cache through the hook consa installs, or its own), and with ``cache_implementation="static"`` on CUDA it compiles
the decode step itself (CUDA graphs). Per variant, at each batch size: a generate of 1 new token (the prefill and
the first token) and one of ``--new-tokens`` tokens, each warmed up once and then timed ``--repeats`` times (best
kept); decode tokens/s = batch x (new tokens - 1) / (the difference of the two). Variants:

* ``dense``: transformers' dense model, its default generate (DynamicCache, eager): the issue's reference;
* ``dense-static``: the same with ``cache_implementation="static"`` (transformers' StaticCache, compiled);
* ``consa-layer``, ``consa-kv-head``: the hybrids of bench/inference_speed.py (same weights), with
  ``--cache-implementation`` (default ``static``: compiled decoding; ``dynamic``: consa's dynamic hybrid cache).

GPU (Qwen3-0.6B shape, random weights):

    python bench/generate_speed.py --device cuda --length 32768 --batches 1,8 --new-tokens 33 --repeats 3 \
        --json docs/results/generate_speed_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from inference_speed import build_variants, load

VARIANTS = ("dense", "dense-static", "consa-layer", "consa-kv-head")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_generate_seconds(model, tokens: torch.Tensor, new_tokens: int, cache_implementation: str | None,
                          repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest of ``repeats`` greedy ``generate()`` calls of exactly ``new_tokens`` tokens, after one untimed call
    (which compiles and records the decode graphs where transformers compiles); also the generated sequences."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                    attention_mask=torch.ones_like(tokens))
    if cache_implementation is not None:
        settings["cache_implementation"] = cache_implementation
    model.generate(tokens, **settings)
    best, sequences = float("inf"), None
    for _ in range(repeats):
        _sync(tokens.device)
        start = time.perf_counter()
        sequences = model.generate(tokens, **settings)
        _sync(tokens.device)
        best = min(best, time.perf_counter() - start)
    return best, sequences


def measure(model, length: int, batch: int, new_tokens: int, cache_implementation: str | None, repeats: int,
            seed: int = 0) -> dict:
    """One row: prefill (a 1-token generate), the whole generate, decode tokens/s and peak memory."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.config.get_text_config().vocab_size, (batch, length), generator=generator)
    tokens = tokens.to(device)
    first_s, _ = best_generate_seconds(model, tokens, 1, cache_implementation, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    total_s, sequences = best_generate_seconds(model, tokens, new_tokens, cache_implementation, repeats)
    return {
        "context_length": length,
        "batch_size": batch,
        "new_tokens": new_tokens,
        "cache_implementation": cache_implementation or "default",
        "first_token_s": first_s,
        "generate_s": total_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (total_s - first_s) if total_s > first_s else None,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "generated": sequences[:, length:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b-random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--length", type=int, default=32768, help="prompt tokens")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens each timed generate produces (>= 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sink-tokens", type=int, default=None)
    parser.add_argument("--full-fraction", type=float, default=0.25)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache-implementation", default="static", choices=("static", "dynamic"),
                        help="the consa variants' cache (dense always uses transformers' default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is the difference to a 1-token generate)")
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    dtype = getattr(torch, args.dtype)
    model = load(args.model, dtype, args.device)
    variants = build_variants(model, args.model, args.device, dtype, args.window, args.sink_tokens, args.full_fraction)
    caches = {"dense": None, "dense-static": "static", "consa-layer": args.cache_implementation,
              "consa-kv-head": args.cache_implementation}
    result = {"command": "python bench/generate_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
              "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "rows": []}
    for batch in (int(b) for b in args.batches.split(",")):
        reference = None
        for name in args.variants.split(","):
            label, _, enter = variants["dense" if name == "dense-static" else name]
            with enter() as running:
                row = {"variant": name, "label": label,
                       **measure(running, args.length, batch, args.new_tokens, caches[name], args.repeats)}
            reference = reference or row
            row["first_token_speedup"] = reference["first_token_s"] / row["first_token_s"]
            if row["decode_tokens_per_s"] and reference["decode_tokens_per_s"]:
                row["decode_speedup"] = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
            result["rows"].append(row)
            peak = f"{row['peak_bytes'] / 2**30:6.2f} GiB" if row["peak_bytes"] else "-"
            print(f"{name:14s} B={batch} first token {row['first_token_s']:.3f} s (x{row['first_token_speedup']:.2f})"
                  f"  generate {row['generate_s']:.3f} s  decode {row['decode_tokens_per_s'] or 0:8.1f} tok/s"
                  f" (x{row.get('decode_speedup', 0):.2f})  peak {peak}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
