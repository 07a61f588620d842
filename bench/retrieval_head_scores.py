"""Copy-paste "retrieval heads" (Wu et al. 2024) of the dense model: do they rank the heads the evaluation wants?

docs/results.md 1g.11-1g.13: from the held-out vote at 0.75, the evaluation's tasks rank the sliding KV heads worth
making full the same way on every prompt set (r +0.92), and no calibration *loss* tried ranks them alike. This asks
the same of a training-free *statistic* of a different kind than 1g.3's attention mass: a head's retrieval score is
the share of answer tokens for which its strongest attention, at the position that predicts the token, falls on a copy
of that very token lying beyond the sliding window (teacher-forced; the dense model, every head full). A head that
copies the needle from far back scores high whatever the format.

Scored on the evaluation's own prompts (an oracle: does the statistic see what the evaluation's answers need?) and
on calibration retrieval samples of held-out formats (what a search could use). Each KV head's score is the mean or
the max over its query heads; each is compared, over the base allocation's sliding heads, with the one-head "add"
effects of a ``bench/head_effects.py`` JSON (the mean of its evaluation prompt sets): Spearman's r between the score
and the effect's benefit (minus the NLL change), and how many of the evaluation's ``--top`` best heads are among the
score's.

    python bench/retrieval_head_scores.py docs/results/head-effects-reliability-h200.json --device cpu \\
        --json docs/results/retrieval-head-scores-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from calibration_answers import spearman
from head_effects import calibration_batch, split_signal

from consa_cli.allocation import Allocation
from consa_cli.calibration import mix_retrieval
from consa_cli.data import DataError, load_token_sequences
from consa_cli.models import load_model_and_tokenizer
from consa_cli.retrieval import haystack_filler, make_samples
from consa_cli.search import environment_versions, resolve_device


def copy_hits(attentions: list[torch.Tensor], input_ids: torch.Tensor, answer_start: int, window: int
              ) -> tuple[torch.Tensor, int]:
    """Per layer and query head, how many of the answer tokens (positions ``answer_start`` on) are predicted from a
    position whose strongest attention lies on an earlier copy of the token, at least ``window`` positions back:
    ``(hits [L, Hq], answer tokens)``. ``attentions``: per layer ``[Hq, T, T]`` of one sequence."""
    length = input_ids.shape[0]
    hits = torch.zeros(len(attentions), attentions[0].shape[0])
    for position in range(answer_start, length):
        query = position - 1  # the position whose output predicts this token
        token = input_ids[position]
        for layer, weights in enumerate(attentions):
            strongest = weights[:, query, :].argmax(-1)  # [Hq]
            copies = (input_ids[strongest] == token) & (query - strongest >= window)
            hits[layer] += copies.float()
    return hits, length - answer_start


def head_scores(model, sequences: list[tuple[torch.Tensor, int]], window: int, kv_heads: int) -> dict[str, list]:
    """Retrieval scores of every (layer, KV head), mean and max over its query heads, over ``sequences`` (each
    ``(ids [T], answer_start)``), from the dense model with eager attention."""
    total_hits, total_tokens = None, 0
    with torch.no_grad():
        for input_ids, answer_start in sequences:
            output = model(input_ids=input_ids.unsqueeze(0).to(model.device), output_attentions=True, use_cache=False)
            attentions = [layer[0].float().cpu() for layer in output.attentions]
            hits, tokens = copy_hits(attentions, input_ids, answer_start, window)
            total_hits = hits if total_hits is None else total_hits + hits
            total_tokens += tokens
    per_query_head = total_hits / max(total_tokens, 1)  # [L, Hq]
    grouped = per_query_head.unflatten(1, (kv_heads, -1))  # [L, Hkv, group]
    return {"mean": grouped.mean(-1).tolist(), "max": grouped.amax(-1).tolist(), "answer_tokens": total_tokens}


def compare_with_effects(scores: list[list[float]], effects: list[dict], top: int) -> dict:
    """Spearman r between the score and the benefit (minus the mean add effect) over the sliding heads, and the
    overlap of the two top-``top`` sets."""
    sliding = [row for row in effects if not row["in_base"]]
    benefit = [-row["target"] for row in sliding]
    score = [scores[row["layer"]][row["head"]] for row in sliding]
    best_by_effect = {(row["layer"], row["head"]) for row in sorted(sliding, key=lambda r: r["target"])[:top]}
    best_by_score = {(row["layer"], row["head"]) for row, _ in sorted(zip(sliding, score, strict=True),
                                                                      key=lambda pair: -pair[1])[:top]}
    return {"spearman": round(spearman(score, benefit), 3), f"top{top}_overlap": len(best_by_effect & best_by_score),
            f"top{top}_by_score": sorted(best_by_score)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("effects", type=Path, help="a bench/head_effects.py JSON (its base allocation and add effects)")
    parser.add_argument("--model", default=None, help="default: the base allocation's model")
    parser.add_argument("--data", default="embedded:enwiki")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", default="1024", help="the evaluation prompts' lengths")
    parser.add_argument("--samples", type=int, default=2, help="evaluation prompts per task, length and depth")
    parser.add_argument("--prompt-seed", type=int, default=2000)
    parser.add_argument("--signals", default="room-code,home-city;room-code,home-city@filler;"
                        "flight-gate,pet-name,meeting-day,phone-extension;locker-number@filler",
                        help="';'-separated calibration retrieval formats, optionally @HAYSTACK")
    parser.add_argument("--calibration-samples", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    try:
        report = json.loads(args.effects.read_text())
        settings = report["settings"]
        allocation = Path(settings["allocation"])
        if not allocation.is_absolute() and not allocation.exists():  # (as recorded: relative to the repository)
            allocation = Path(__file__).resolve().parent.parent / allocation
        base = Allocation.load(allocation)
        evaluations = [name for name in report["heads"][0] if name == "evaluation" or
                       (name.startswith("evaluation@"))]
        effects = [dict(row, target=sum(row[name] for name in evaluations) / len(evaluations))
                   for row in report["heads"]]
    except (OSError, KeyError, ValueError, DataError) as error:
        raise SystemExit(f"error: {args.effects}: {error}") from None
    device = resolve_device(args.device)
    model_name = args.model or base.model
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=getattr(torch, args.dtype), device=str(device))
    model.set_attn_implementation("eager")  # attention weights are returned by the eager path only
    window, kv_heads = base.sliding_window, model.config.num_key_value_heads
    lengths = [int(x) for x in args.lengths.split(",")]
    sets: dict[str, list[tuple[torch.Tensor, int]]] = {}
    prompts = [sample for task in settings["tasks"].split(",")
               for sample in make_samples(task, tokenizer, lengths, [float(d) for d in settings["depths"].split(",")],
                                          args.samples, args.prompt_seed,
                                          filler=list(haystack_filler(settings["haystack"])))]
    sets["evaluation"] = [(torch.cat([p.prompt_ids, p.answer_ids]), p.prompt_ids.numel()) for p in prompts]
    text = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration")[: args.calibration_samples]
    for signal in [s.strip() for s in args.signals.split(";") if s.strip()]:
        formats, haystack, _ = split_signal(signal, "text")
        mixed = mix_retrieval(text, tokenizer, 0.5, window, args.seed, formats, haystack)
        rows = mixed.is_retrieval
        ids, answers, width = calibration_batch(mixed.sequences[rows], mixed.loss_mask[rows], "cpu")
        sets[signal] = [(row_ids, int(row_ids.numel() - (row_answers != -100).sum()))
                        for row_ids, row_answers in zip(ids, answers, strict=True)]
    result = {"effects": str(args.effects), "evaluation_sets": evaluations, "window": window, "sets": {},
              "versions": environment_versions(), "settings": {k: str(v) for k, v in vars(args).items()}}
    for name, sequences in sets.items():
        scores = head_scores(model, sequences, window, kv_heads)
        row = {"answer_tokens": scores["answer_tokens"], "scores": {k: scores[k] for k in ("mean", "max")}}
        for kind in ("mean", "max"):
            row[kind] = compare_with_effects(scores[kind], effects, args.top)
        result["sets"][name] = row
        print(f"{name}: {len(sequences)} sequences, {scores['answer_tokens']} answer tokens; mean: {row['mean']}; "
              f"max: {row['max']}", flush=True)
    best = sorted((row for row in effects if not row["in_base"]), key=lambda r: r["target"])[: args.top]
    result["evaluation_best_additions"] = [(row["layer"], row["head"]) for row in best]
    print("the evaluation's best additions:", result["evaluation_best_additions"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
