"""How well allocations answer the search's own retrieval calibration samples: mean answer NLL and exact match.

The question this answers: when a mask retrieves better on the evaluation's tasks, does the search's calibration
data see it too? If the better mask also answers the calibration samples better, the search could have found it
(an optimisation problem); if not, the calibration data does not reward it (a transfer problem). The samples are
built exactly as ``consa search`` builds them (``mix_retrieval``: calibration split, ``--seq-len``, ``--window``,
``--seed``, ``--retrieval-formats``, ``--calibration-haystack``); every allocation (and the dense model) is run
with a hard mask on the same samples, and answer NLLs are paired per sample. Exact match is also broken down by
the distance from the needle to the answer (tokens from the answer's last earlier occurrence to the answer), in
``--distance-buckets``: a sample set that a model answers mostly at short range says little about long-range
retrieval.
An allocation recorded as healed (``healed`` in its metadata, as ``consa heal`` and ``bench/heal_prototype.py``
write it) runs on its own weights, the others on ``--model`` (default: the first allocation's), as does dense.

    python bench/calibration_answers.py A.safetensors B.safetensors --seq-len 1024 --samples 32 \
        --calibration-haystack text --json answers.json

Could the answers pick the best of several searches' masks without looking at the evaluation? With
``--evaluation EVAL.json ...`` (``consa eval --json`` outputs) and ``--labels`` (each allocation's row label or path
there), the script also prints each mask's evaluation retrieval next to its answer scores and the Spearman rank
correlation between them: a strong one would make "keep the seed that answers best" a selection rule.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention
from consa_cli.calibration import (
    DEFAULT_CALIBRATION_FORMATS,
    DEFAULT_CALIBRATION_HAYSTACK,
    MAX_NEEDLES,
    mix_retrieval,
)
from consa_cli.data import load_token_sequences
from consa_cli.models import load_model_and_tokenizer


@torch.no_grad()
def answer_scores(model, sequences: torch.Tensor, loss_mask: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Per sample: the mean NLL of its answer tokens, and whether greedy decoding reproduces them all."""
    device = next(model.parameters()).device
    nlls, exact = [], []
    for ids, mask in zip(sequences, loss_mask, strict=True):
        logits = model(input_ids=ids.unsqueeze(0).to(device), use_cache=False).logits[0, :-1].float().cpu()
        scored = mask[:-1]
        targets = ids[1:][scored]
        nlls.append(float(F.cross_entropy(logits[scored], targets)))
        exact.append(bool(torch.equal(logits[scored].argmax(dim=-1), targets)))
    return nlls, exact


def needle_distance(ids: torch.Tensor, loss_mask: torch.Tensor) -> int | None:
    """Tokens from the last earlier occurrence of a sample's answer (its needle) to the answer itself, or None
    where the answer's tokens do not occur earlier as they are (a tokenisation that depends on context)."""
    scored = loss_mask[:-1].nonzero().flatten()
    answer = ids[int(scored[0]) + 1 : int(scored[-1]) + 2].tolist()
    start = int(scored[0]) + 1
    before = ids[:start].tolist()
    for position in range(start - len(answer), -1, -1):
        if before[position : position + len(answer)] == answer:
            return start - position
    return None


def by_distance(distances: list[int | None], exact: list[bool], edges: list[int]) -> dict[str, list[float]]:
    """Exact match per distance bucket ``[edges[i], edges[i+1])``: ``{label: [fraction, count]}``."""
    buckets = {}
    for low, high in zip(edges, edges[1:], strict=False):
        hits = [e for d, e in zip(distances, exact, strict=True) if d is not None and low <= d < high]
        buckets[f"{low}-{high}"] = [sum(hits) / len(hits) if hits else float("nan"), len(hits)]
    missing = [e for d, e in zip(distances, exact, strict=True) if d is None]
    if missing:
        buckets["not found"] = [sum(missing) / len(missing), len(missing)]
    return buckets


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(first: list[float], second: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks; ties take mean ranks)."""
    a, b = ranks(first), ranks(second)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    scale = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return covariance / scale if scale else float("nan")


def evaluation_retrieval(paths: list[Path], labels: list[str]) -> list[float]:
    """Each label's overall retrieval accuracy in the ``consa eval --json`` files (matched on a row's label or
    path)."""
    found = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            if row.get("retrieval"):
                for name in (row["label"], row.get("path")):
                    found.setdefault(name, row["retrieval"]["overall"])
    missing = [label for label in labels if label not in found]
    if missing:
        raise SystemExit(f"no evaluation row for {', '.join(missing)} in {', '.join(map(str, paths))}")
    return [found[label] for label in labels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocations", nargs="+", type=Path)
    parser.add_argument("--model", default=None, help="default: the first allocation's model")
    parser.add_argument("--data", default="embedded:enwiki")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=32, help="retrieval samples scored")
    parser.add_argument("--seed", type=int, default=0, help="the calibration seed (a search's --seed)")
    parser.add_argument("--retrieval-formats", default=DEFAULT_CALIBRATION_FORMATS)
    parser.add_argument("--calibration-haystack", default=DEFAULT_CALIBRATION_HAYSTACK)
    parser.add_argument("--max-needles", type=int, default=MAX_NEEDLES,
                        help="facts per sample, at most (one asked, the rest distractors; consa heal --max-needles)")
    parser.add_argument("--distance-buckets", default="0,256,512,1024,2048,4096",
                        help="edges of the needle-distance buckets of the exact-match breakdown (tokens)")
    parser.add_argument("--evaluation", type=Path, nargs="*", default=[], help="consa eval --json files")
    parser.add_argument("--labels", nargs="*", default=[], help="each allocation's row label or path in them")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.evaluation and len(args.labels) != len(args.allocations):
        parser.error("--evaluation needs one --labels entry per allocation")
    evaluation_accuracy = evaluation_retrieval(args.evaluation, args.labels) if args.evaluation else None
    edges = [int(edge) for edge in args.distance_buckets.split(",")]
    allocations = [Allocation.load(path) for path in args.allocations]
    first = allocations[0]
    model, tokenizer = load_model_and_tokenizer(args.model or first.model, dtype=getattr(torch, args.dtype),
                                                device=args.device)
    text = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration")
    # As many text sequences as give `samples` retrieval ones at a retrieval fraction of 0.5.
    calibration = mix_retrieval(text[: args.samples], tokenizer, 0.5, first.sliding_window, args.seed,
                                args.retrieval_formats, args.calibration_haystack, max_needles=args.max_needles)
    retrieval = calibration.is_retrieval
    sequences, loss_mask = calibration.sequences[retrieval], calibration.loss_mask[retrieval]
    distances = [needle_distance(ids, mask) for ids, mask in zip(sequences, loss_mask, strict=True)]
    rows = []
    dense_nll = None
    for label, allocation in [("dense", None), *zip((p.stem for p in args.allocations), allocations, strict=True)]:
        if allocation is None:
            nlls, exact = answer_scores(model, sequences, loss_mask)
            dense_nll = nlls
        else:
            own = "healed" in allocation.metadata and not args.model  # healed weights: the hybrid runs on its own
            weights = (load_model_and_tokenizer(allocation.model, dtype=getattr(torch, args.dtype),
                                                device=args.device)[0] if own else model)
            allocation.check_fits(weights.config.num_hidden_layers, weights.config.num_key_value_heads)
            with hybrid_attention(weights, allocation.fa_mask, allocation.sliding_window, allocation.sink_tokens):
                nlls, exact = answer_scores(weights, sequences, loss_mask)
            del weights
        deltas = [a - b for a, b in zip(nlls, dense_nll, strict=True)]
        mean = sum(deltas) / len(deltas)
        spread = math.sqrt(sum((d - mean) ** 2 for d in deltas) / max(len(deltas) - 1, 1) / len(deltas))
        row = {"label": label, "answer_nll": sum(nlls) / len(nlls), "exact_match": sum(exact) / len(exact),
               "delta_vs_dense": mean, "delta_stderr": spread, "answer_nll_per_sample": nlls,
               "exact_per_sample": exact, "exact_by_distance": by_distance(distances, exact, edges)}
        rows.append(row)
        buckets = "  ".join(f"{name}: {hit:.2f} ({n})" for name, (hit, n) in row["exact_by_distance"].items())
        print(f"{label:45s} answer NLL {row['answer_nll']:.4f} (vs dense {mean:+.4f} +- {spread:.4f}) "
              f"exact {row['exact_match']:.3f}  by needle distance {buckets}", flush=True)
    correlation = None
    if evaluation_accuracy is not None:
        masks = rows[1:]  # (dense has no evaluation row of its own here)
        for row, accuracy in zip(masks, evaluation_accuracy, strict=True):
            row["evaluation_retrieval"] = accuracy
            print(f"{row['label']:45s} answer NLL {row['answer_nll']:.4f} exact {row['exact_match']:.3f} "
                  f"evaluation retrieval {accuracy:.3f}")
        correlation = {"answer_nll": spearman([-row["answer_nll"] for row in masks], evaluation_accuracy),
                       "exact_match": spearman([row["exact_match"] for row in masks], evaluation_accuracy)}
        print(f"Spearman rank correlation with evaluation retrieval over {len(masks)} masks: lower answer NLL "
              f"{correlation['answer_nll']:+.2f}, exact match {correlation['exact_match']:+.2f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "samples": int(sequences.shape[0]), "needle_distances": distances,
                                         "rows": rows, "spearman_with_evaluation": correlation}, indent=1))


if __name__ == "__main__":
    main()
