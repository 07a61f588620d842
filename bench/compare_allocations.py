"""Learned vs rule allocations on real weights: held-out perplexity with paired statistics, in one run.

Every allocation is scored on the same held-out sequences as the dense model, so the table reports the mean
per-sequence NLL difference to dense and its paired t statistic, plus each learned run's convergence
(expected sparsity at the end, how many units a log_alpha > 0 threshold would keep, seconds per step).

Example (the evidence in docs/results.md):

    python bench/compare_allocations.py --sparsity 0.75 --window 128 --seq-len 1024 --steps 150 \
        --searches '[{"granularity": "layer"}, {"granularity": "kv-head"}]' --rules interleaved \
        --json docs/results/compare.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from consa_cli.attention import hybrid_attention
from consa_cli.baselines import rule_allocation
from consa_cli.data import EMBEDDED_CORPUS, load_token_sequences
from consa_cli.evaluate import paired_difference, sequence_nll
from consa_cli.families import adapter_for
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.search import environment_versions, resolve_device, run_search
from consa_cli.settings import SearchSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=EMBEDDED_CORPUS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--searches", default='[{"granularity": "kv-head"}]',
                        help="JSON list of SearchSettings overrides, one search each; 'name' labels a run")
    parser.add_argument("--rules", default="interleaved", help="comma-separated rules (see consa baseline)")
    parser.add_argument("--rule-granularity", default="layer")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()

    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype), device=str(device))
    sinks = args.sink_tokens if args.sink_tokens is not None else adapter_for(
        model.config.model_type).default_sink_tokens
    fingerprint = model_fingerprint(model)
    calibration = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration")
    evaluation = load_token_sequences(args.data, tokenizer, args.seq_len, "evaluation", args.eval_sequences)
    dense_nll = sequence_nll(model, evaluation)
    rows = [{"name": "dense", "method": "dense", "full_units": None, "units": None,
             "nll": dense_nll.mean().item(), "ppl": dense_nll.mean().exp().item()}]
    print(f"dense: ppl {rows[0]['ppl']:.3f} on {evaluation.shape[0]} x {args.seq_len} tokens", flush=True)

    def score(name: str, allocation, extra: dict) -> None:
        with hybrid_attention(model, allocation.fa_mask.to(device), allocation.sliding_window,
                              allocation.sink_tokens):
            nll = sequence_nll(model, evaluation)
        delta, t_stat = paired_difference(nll, dense_nll)
        row = {"name": name, "method": allocation.method, "granularity": allocation.granularity,
               "full_units": allocation.num_full_units, "units": allocation.num_units,
               "sparsity": allocation.sparsity, "nll": nll.mean().item(), "ppl": nll.mean().exp().item(),
               "delta_nll_vs_dense": delta, "paired_t_vs_dense": t_stat, "fa_rows": allocation.render_rows(),
               "nll_per_sequence": nll.tolist(), **extra}
        rows.append(row)
        write_report(args, device, sinks, evaluation.shape[0], rows, started)  # a killed run keeps its rows
        print(f"{name}: ppl {row['ppl']:.3f}  delta {delta:+.4f} (t {t_stat:.1f})  "
              f"{allocation.num_full_units}/{allocation.num_units} FA  {extra}", flush=True)

    for rule in filter(None, args.rules.split(",")):
        allocation = rule_allocation(rule, model.config.num_hidden_layers, model.config.num_key_value_heads,
                                     args.sparsity, args.rule_granularity, args.window, sinks)
        score(f"rule:{rule}", allocation, {})

    for overrides in json.loads(args.searches):
        overrides = dict(overrides)
        name = overrides.pop("name", None) or "learned " + " ".join(f"{k}={v}" for k, v in overrides.items())
        settings = SearchSettings(**{"model": args.model, "sparsity": args.sparsity, "window": args.window,
                                     "seq_len": args.seq_len, "steps": args.steps, "dtype": args.dtype,
                                     "data": args.data, **overrides})
        settings.validate()
        result = run_search(settings, model, calibration, sinks, fingerprint)
        last = result.metrics[-1]
        score(name, result.allocation, {
            "settings": overrides,
            "final_expected_sparsity": last["expected_sparsity"],
            "full_units_threshold": last["full_units_threshold"],
            "seconds_per_step": result.seconds / settings.steps,
            "expected_sparsity_trace": [m["expected_sparsity"] for m in result.metrics],
            "scores": result.allocation.scores.tolist(),
        })

    write_report(args, device, sinks, evaluation.shape[0], rows, started)

def write_report(args, device, sinks: int, eval_sequences: int, rows: list[dict], started: float) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": datetime.date.today().isoformat(),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": environment_versions(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sink_tokens": sinks,
        "eval_sequences": eval_sequences,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
