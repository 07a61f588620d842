"""Inference speed and memory: dense vs transformers' native layer hybrid vs consa's layer and KV-head hybrids.

Each variant prefills ``batch x context`` random tokens (last-position logits only) and then decodes greedily
for ``--decode-steps`` steps on its cache (see consa_cli.efficiency). The layer hybrids keep ``--full-fraction``
of the layers full (evenly interleaved); the KV-head hybrid keeps the same number of KV heads full, spread evenly
over the layers, so every hybrid has the same analytic KV size. The JSON is rewritten after every row.

GPU (the numbers in docs/benchmarks.md; random weights in the Qwen3-0.6B shape):

    python bench/inference_speed.py --model qwen3-0.6b-random --device cuda --lengths 8192,16384,32768 \
        --batches 1,8 --json docs/results/inference_speed_h100.json

Compiled decoding, the dense model as transformers runs it (eager) next to the compiled variants in one run:

    python bench/inference_speed.py --device cuda --lengths 32768 --batches 1,8 --decode-steps 32 --compiled-decode \
        --eager-reference --json docs/results/inference_speed_h200_compiled_one_run.json

CPU (the embedded SmolLM2-135M):

    python bench/inference_speed.py --model embedded:SmolLM2-135M-Instruct --device cpu --lengths 1024,2048 \
        --batches 1 --window 256 --decode-steps 16 --repeats 3 --json docs/results/inference_speed_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

from consa_cli.allocation import Allocation, full_unit_count
from consa_cli.baselines import rule_allocation
from consa_cli.efficiency import EfficiencySettings, compare_efficiency
from consa_cli.export import native_config
from consa_cli.families import adapter_for
from consa_cli.inference import hybrid_inference
from consa_cli.models import load_model_and_tokenizer

VARIANTS = ("dense", "native", "consa-layer", "consa-kv-head")
# Compiled decoding: the fair dense reference is the dense model on consa's runtime (dense-runtime); transformers'
# own compiled dense decode repeats the KV heads of its static cache every step (docs/benchmarks.md). The native
# hybrid's static form is transformers' too.
COMPILED_VARIANTS = ("dense-runtime", "consa-layer", "consa-kv-head")
# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B), for random weights: the hub is out of reach here.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000, tie_word_embeddings=True)


def load(name: str, dtype: torch.dtype, device: str):
    if name == "qwen3-0.6b-random":
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_0_6B), dtype=dtype, attn_implementation="sdpa")
        return model.eval().requires_grad_(False)
    return load_model_and_tokenizer(name, dtype=dtype, device=device)[0]


def build_variants(model, name: str, device: str, dtype: torch.dtype, window: int, sink_tokens: int | None,
                   full_fraction: float) -> dict:
    """``{variant: (label, allocation, context manager factory)}`` for :data:`VARIANTS`, all on ``model``'s weights.

    The layer hybrids keep ``full_fraction`` of the layers full (evenly interleaved); the KV-head hybrid keeps the
    same number of KV heads full, spread evenly over the layers. consa's hybrids get ``sink_tokens`` sinks (the
    family's default when None), the native one none (transformers has no sinks).
    """
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    sinks = sink_tokens if sink_tokens is not None else adapter_for(config.model_type).default_sink_tokens
    sparsity = 1.0 - full_fraction
    layer_allocation = rule_allocation("interleaved", layers, heads, sparsity, "layer", window, sinks)
    native_allocation = rule_allocation("interleaved", layers, heads, sparsity, "layer", window, 0)
    # As many full KV heads as the layer hybrids have (e.g. 7 of 28 layers = 56 of 224 heads, 2 per layer).
    head_sparsity = 1.0 - full_unit_count(layers, sparsity) / layers
    head_allocation = rule_allocation("uniform-heads", layers, heads, head_sparsity, "kv-head", window, sinks)
    if head_allocation.fa_mask.sum() != layer_allocation.fa_mask.sum():
        raise SystemExit("the KV-head and layer hybrids keep different numbers of full heads")

    @contextmanager
    def dense():
        yield model

    @contextmanager
    def dense_without_cudnn():
        # The dense model with cuDNN attention switched off, as consa's runtime does for decode steps: cuDNN
        # rebuilds its plan on the host for every new key length (bench/profile_decode.py), which dominates a
        # dense decode step on an H100. The fair dense reference for decode speed.
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            yield model

    @contextmanager
    def native():
        # transformers' own layer hybrid: the config written by `consa export` for a layer allocation, same weights.
        patched = native_config(config.to_dict(), native_allocation)
        model.to("cpu")  # one copy of the weights on the device, as for every other variant
        with torch.device(device):
            hybrid = AutoModelForCausalLM.from_config(AutoConfig.for_model(**patched), dtype=dtype,
                                                      attn_implementation="sdpa")
        hybrid.load_state_dict(model.state_dict())
        try:
            yield hybrid.eval()
        finally:
            del hybrid
            model.to(device)

    @contextmanager
    def consa(allocation):
        with hybrid_inference(model, allocation):
            yield model

    # The dense model on consa's runtime: every KV head full, consa's cache and kernels. Under --compiled-decode
    # the fair dense reference: transformers' own SDPA path repeats the KV heads whenever a mask is passed, which
    # a static cache's decode step always does, so "dense" then copies its whole cache every step.
    all_full = Allocation(torch.ones(layers, heads, dtype=torch.bool), "kv-head", sliding_window=window,
                          sink_tokens=0)

    return {
        "dense": (f"dense ({name})", None, dense),
        "dense-runtime": ("dense on consa's runtime (all heads full)", None, lambda: consa(all_full)),
        "dense-no-cudnn": ("dense, SDPA without cuDNN", None, dense_without_cudnn),
        "native": ("transformers native layer hybrid", native_allocation, native),
        "consa-layer": ("consa layer hybrid", layer_allocation, lambda: consa(layer_allocation)),
        "consa-kv-head": ("consa KV-head hybrid", head_allocation, lambda: consa(head_allocation)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b-random", help="qwen3-0.6b-random or a model consa loads")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings (use 3+ on a shared CPU)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sink-tokens", type=int, default=None, help="consa hybrids' sinks [default: family's]")
    parser.add_argument("--full-fraction", type=float, default=0.25, help="share of layers / KV heads kept full")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)}, dense-runtime, dense-no-cudnn [default: "
                             f"{','.join(VARIANTS)}; with --compiled-decode {','.join(COMPILED_VARIANTS)}]")
    parser.add_argument("--compiled-decode", action="store_true",
                        help="static caches and decode steps compiled into CUDA graphs, for every variant")
    parser.add_argument("--eager-reference", action="store_true",
                        help="with --compiled-decode: the first variant (dense) decodes eagerly on a dynamic cache, "
                             "as transformers runs it, in the same run [default variants then: dense,"
                             f"{','.join(COMPILED_VARIANTS)}]")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.eager_reference and not args.compiled_decode:
        raise SystemExit("--eager-reference only changes --compiled-decode runs")
    if args.variants is None:
        compiled = ("dense", *COMPILED_VARIANTS) if args.eager_reference else COMPILED_VARIANTS
        args.variants = ",".join(compiled if args.compiled_decode else VARIANTS)
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)

    model = load(args.model, dtype, args.device)
    available = build_variants(model, args.model, args.device, dtype, args.window, args.sink_tokens,
                               args.full_fraction)
    sinks = available["consa-layer"][1].sink_tokens
    variants = [available[name] for name in args.variants.split(",")]
    settings = EfficiencySettings(context_lengths=[int(n) for n in args.lengths.split(",")],
                                  batch_sizes=[int(n) for n in args.batches.split(",")],
                                  decode_steps=args.decode_steps, repeats=args.repeats,
                                  compiled_decode=args.compiled_decode, eager_reference=args.eager_reference)
    report = {
        "command": "python bench/inference_speed.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v is not None and v is not False),
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "sink_tokens": sinks},
        "allocations": {label: allocation.describe() for label, allocation, _ in variants if allocation},
        "rows": [],
    }

    def on_row(row: dict) -> None:
        report["rows"].append(row)
        report["elapsed_s"] = time.perf_counter() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        gib = 1024**3
        peak = f"{row['peak_bytes'] / gib:6.2f}" if row["peak_bytes"] else "     -"
        print(f"{row['label']:34s} T={row['context_length']:6d} B={row['batch_size']} KV {row['kv_bytes'] / gib:6.3f} GiB "
              f"(x{row['kv_vs_analytic']:.3f} analytic) prefill {row['prefill_s']:6.3f} s decode "
              f"{row['decode_tokens_per_s']:7.1f} tok/s peak {peak} GiB", flush=True)

    compare_efficiency(variants, settings, on_row)


if __name__ == "__main__":
    main()
