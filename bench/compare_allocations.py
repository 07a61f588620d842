"""Learned vs rule allocations on real weights: held-out perplexity with paired statistics, in one run.

Every allocation is scored on the same held-out sequences as the dense model, so the table reports the mean
per-sequence NLL difference to dense and its paired t statistic, plus each learned run's convergence
(expected sparsity at the end, how many units a log_alpha > 0 threshold would keep, seconds per step).

Searches and rules run at every ``--sparsities`` value unless a search names its own ``sparsity``. A search's
overrides may set ``method`` (l0, scalar-l1, attention-mass), ``retrieval_fraction`` (synthetic retrieval
calibration) and ``seq_len`` (the length of its calibration sequences; every row is still evaluated at
``--seq-len``) and ``seeds`` (as ``consa search --seeds N``: one search per seed, each with its own calibration
draw, and the row is their vote; the row records the seeds, each unit's votes and every seed's mask). ``--retrieval``
adds long-range retrieval accuracy per allocation (paired prompts for all rows).

Example (the evidence in docs/results.md):

    python bench/compare_allocations.py --sparsities 0.75 --window 128 --seq-len 1024 --steps 150 \
        --searches '[{"granularity": "layer"}, {"granularity": "kv-head", "retrieval_fraction": 0.25}]' \
        --rules interleaved,uniform-heads:kv-head-per-layer --retrieval passkey,multikey,variable-tracking \
        --json docs/results/compare.json --save-dir docs/results/allocations
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import time
from pathlib import Path

import torch

from consa_cli.attention import hybrid_attention
from consa_cli.baselines import baseline_allocation
from consa_cli.calibration import CalibrationSet, mix_retrieval
from consa_cli.data import EMBEDDED_CORPUS, load_token_sequences
from consa_cli.evaluate import paired_difference, sequence_nll
from consa_cli.families import adapter_for
from consa_cli.heuristics import attention_mass_search
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.retrieval import evaluate_retrieval, haystack_filler
from consa_cli.search import environment_versions, resolve_device, run_search
from consa_cli.settings import SearchSettings
from consa_cli.vote import vote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=EMBEDDED_CORPUS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attention-backend", default="auto", help="search attention backend (see consa search)")
    parser.add_argument("--sparsities", default="0.75", help="comma-separated target sparsities")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--searches", default='[{"granularity": "kv-head"}]',
                        help="JSON list of SearchSettings overrides, one search each; 'name' labels a run")
    parser.add_argument("--rules", default="interleaved",
                        help="comma-separated rules (see consa baseline), each optionally RULE:GRANULARITY")
    parser.add_argument("--rule-granularity", default="layer", help="granularity of rules that name none")
    parser.add_argument("--retrieval", default="", help="comma-separated retrieval tasks to score (none: PPL only)")
    parser.add_argument("--retrieval-lengths", default="1024,2048")
    parser.add_argument("--retrieval-depths", default="0.1,0.5,0.9")
    parser.add_argument("--retrieval-samples", type=int, default=8)
    parser.add_argument("--retrieval-haystack", default="noise", help="noise or prose (see consa eval)")
    parser.add_argument("--searches-first", action="store_true",
                        help="run each sparsity's searches before its rules (a slow machine keeps the learned rows)")
    parser.add_argument("--save-dir", type=Path, default=None, help="write every allocation here (safetensors)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()

    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype), device=str(device))
    sinks = args.sink_tokens if args.sink_tokens is not None else adapter_for(
        model.config.model_type).default_sink_tokens
    fingerprint = model_fingerprint(model)
    evaluation = load_token_sequences(args.data, tokenizer, args.seq_len, "evaluation", args.eval_sequences)
    tasks = [task for task in args.retrieval.split(",") if task]

    def retrieval() -> dict:
        result = evaluate_retrieval(model, tokenizer, tasks, [int(n) for n in args.retrieval_lengths.split(",")],
                                    [float(d) for d in args.retrieval_depths.split(",")], args.retrieval_samples,
                                    filler=list(haystack_filler(args.retrieval_haystack)))
        return {"retrieval": result["overall"], "retrieval_stderr": result["overall_stderr"],
                "retrieval_by_task": result["by_task"], "retrieval_cells": result["cells"]}

    def retrieval_text(row: dict) -> str:  # the overall score with its binomial standard error, as consa eval prints
        if "retrieval" not in row:
            return "retrieval -"
        return f"retrieval {row['retrieval']:.3f} +- {row['retrieval_stderr']:.3f}"

    dense_nll = sequence_nll(model, evaluation)
    rows = [{"name": "dense", "method": "dense", "full_units": None, "units": None,
             "nll": dense_nll.mean().item(), "ppl": dense_nll.mean().exp().item(), **(retrieval() if tasks else {})}]
    print(f"dense: ppl {rows[0]['ppl']:.3f} on {evaluation.shape[0]} x {args.seq_len} tokens, "
          f"{retrieval_text(rows[0])}", flush=True)

    def score(name: str, allocation, extra: dict) -> None:
        with hybrid_attention(model, allocation.fa_mask.to(device), allocation.sliding_window,
                              allocation.sink_tokens):
            nll = sequence_nll(model, evaluation)
            if tasks:
                extra = {**extra, **retrieval()}
        delta, t_stat = paired_difference(nll, dense_nll)
        row = {"name": name, "method": allocation.method, "granularity": allocation.granularity,
               "full_units": allocation.num_full_units, "units": allocation.num_units,
               "sparsity": allocation.sparsity, "nll": nll.mean().item(), "ppl": nll.mean().exp().item(),
               "delta_nll_vs_dense": delta, "paired_t_vs_dense": t_stat, "fa_rows": allocation.render_rows(),
               "nll_per_sequence": nll.tolist(), **extra}
        rows.append(row)
        if args.save_dir is not None:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            allocation.save(args.save_dir / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".safetensors"))
        write_report(args, device, sinks, evaluation.shape[0], rows, started)  # a killed run keeps its rows
        print(f"{name}: ppl {row['ppl']:.3f}  delta {delta:+.4f} (t {t_stat:.1f})  "
              f"{allocation.num_full_units}/{allocation.num_units} FA  {retrieval_text(row)}  "
              f"{ {k: v for k, v in extra.items() if k in ('final_expected_sparsity', 'seconds_per_step')} }", flush=True)

    calibrations: dict[tuple[int, float, int], CalibrationSet] = {}

    def score_rules(sparsity: float) -> None:
        for spec in filter(None, args.rules.split(",")):
            rule, _, granularity = spec.partition(":")
            allocation = baseline_allocation(rule, model.config, sparsity, granularity or args.rule_granularity,
                                             args.window, sinks)  # "native": the model's own pattern (Gemma3)
            score(f"rule:{rule} {allocation.granularity} s={sparsity:g}", allocation, {})

    def calibration_for(settings: SearchSettings):
        # Everything the calibration set depends on (a search may set its own seq_len, window, formats or
        # haystack: calibrate at them, evaluate at --seq-len).
        key = (settings.seq_len, settings.retrieval_fraction, settings.seed, settings.window,
               settings.retrieval_formats, settings.calibration_haystack)
        if key not in calibrations:
            text = load_token_sequences(args.data, tokenizer, settings.seq_len, "calibration")
            calibrations[key] = mix_retrieval(text, tokenizer, settings.retrieval_fraction, settings.window,
                                              settings.seed, settings.retrieval_formats,
                                              settings.calibration_haystack)
        return calibrations[key]

    def score_searches(sparsity: float) -> None:
        for overrides in json.loads(args.searches):
            overrides = dict(overrides)
            if "sparsity" in overrides and overrides["sparsity"] != sparsity:
                continue
            name = overrides.pop("name", None) or "search " + " ".join(f"{k}={v}" for k, v in overrides.items())
            settings = SearchSettings(**{"model": args.model, "sparsity": sparsity, "window": args.window,
                                         "seq_len": args.seq_len, "steps": args.steps, "dtype": args.dtype,
                                         "data": args.data, "attention_backend": args.attention_backend,
                                         **overrides})
            settings.validate()
            if settings.method == "attention-mass":
                result = attention_mass_search(settings, model, calibration_for(settings), sinks, fingerprint)
                score(f"{name} s={sparsity:g}", result.allocation, {"settings": overrides,
                                                                    "scores": result.allocation.scores.tolist()})
                continue
            if settings.seeds > 1:  # as `consa search --seeds N`: one search per seed, each its own calibration
                runs = [dataclasses.replace(settings, seed=settings.seed + offset, seeds=1)
                        for offset in range(settings.seeds)]
                results = [run_search(run, model, calibration_for(run), sinks, fingerprint) for run in runs]
                voted = vote([result.allocation for result in results], settings.sparsity)
                score(f"{name} s={sparsity:g}", voted, {
                    "settings": overrides, "seeds": [run.seed for run in runs],
                    "unit_votes": voted.metadata.get("unit_votes"),
                    "seed_fa_rows": [result.allocation.render_rows() for result in results],
                    "seconds_per_step": sum(result.seconds for result in results) / (settings.steps * len(runs)),
                    "scores": voted.scores.tolist(),
                })
                continue
            result = run_search(settings, model, calibration_for(settings), sinks, fingerprint)
            last = result.metrics[-1]
            score(f"{name} s={sparsity:g}", result.allocation, {
                "settings": overrides,
                "final_expected_sparsity": last["expected_sparsity"],
                "full_units_threshold": last["full_units_threshold"],
                "seconds_per_step": result.seconds / settings.steps,
                "expected_sparsity_trace": [m["expected_sparsity"] for m in result.metrics],
                "scores": result.allocation.scores.tolist(),
            })

    stages = (score_searches, score_rules) if args.searches_first else (score_rules, score_searches)
    for sparsity in [float(value) for value in args.sparsities.split(",")]:
        for stage in stages:
            stage(sparsity)
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
