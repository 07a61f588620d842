"""Polish a searched allocation by greedy swaps of one full head for one sliding head, judged on held-out calibration.

A search (and more so a vote over seeds) ends with a hard mask that need not be a local optimum of its own
objective: docs/results.md 1g.11-1g.12 measured single heads whose toggling changes the calibration answers' NLL by
0.1-0.3 nats, more than the vote's weakest full heads are worth. This script asks whether moving the mask to a
local optimum of the *calibration* objective -- never the evaluation's tasks -- also moves held-out retrieval.

Each round measures every one-head toggle of the current mask (each sliding head made full, each full head made
sliding) on the objective

    answer NLL of the retrieval calibration samples (``--signal``: formats and haystack as in ``consa search``)
    + ``--text-weight`` x NLL of calibration text (``--text-sequences`` sequences, every token),

then measures exactly the ``--candidates`` x ``--candidates`` swaps of the best additions with the cheapest removals
and applies the best one if it lowers the objective. The number of full heads, hence the sparsity, never changes.
After every swap it writes ``OUTPUT_PREFIX-swapN.safetensors`` (an allocation like any other, for ``consa eval``)
and the whole trajectory to ``--json``. The calibration samples are drawn with ``--seed`` from the calibration split
in the calibration formats: nothing of the evaluation's tasks, formats or text is used.

    python bench/swap_refine.py docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors \\
        --model SMOLLM2.gguf --device cuda --swaps 4 --output-prefix refined-s075 --json refine-s075.json

Cost: ``swaps x (units + candidates^2)`` measurements of ``calibration-samples + text-sequences`` sequences: about
a minute per swap for SmolLM2-135M on an H200 with 96 samples of 1024 tokens; hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from head_effects import calibration_batch, split_signal, token_nll
from retrieval_greedy import answer_nll

from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention, set_fa_weights
from consa_cli.calibration import DEFAULT_CALIBRATION_HAYSTACK, check_haystack, mix_retrieval, parse_formats
from consa_cli.data import DataError, load_token_sequences
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.search import environment_versions, resolve_device

Unit = tuple[int, int]


def swap_refine(measure: Callable[[torch.Tensor], dict[str, float]], base: torch.Tensor, swaps: int,
                candidates: int = 3, on_swap: Callable[[dict, torch.Tensor], None] | None = None
                ) -> tuple[torch.Tensor, list[dict]]:
    """Greedy one-for-one swaps from ``base`` (bool ``[L, H]``) that lower ``measure(mask)["objective"]``.

    Per round: every one-head toggle is measured, the ``candidates`` best additions are paired with the
    ``candidates`` cheapest removals, each pair is measured as a whole (heads interact), and the best pair is kept
    if it beats the current mask; otherwise the search stops early. Returns the final mask and one record per
    round (``on_swap(record, mask)`` after each applied swap)."""
    mask = base.clone()
    current = measure(mask)
    history = [{"swap": 0, "added": None, "removed": None, **current}]
    for swap in range(1, swaps + 1):
        additions, removals = [], []
        for layer in range(mask.shape[0]):
            for head in range(mask.shape[1]):
                variant = mask.clone()
                variant[layer, head] = ~variant[layer, head]
                delta = measure(variant)["objective"] - current["objective"]
                (removals if mask[layer, head] else additions).append((delta, (layer, head)))
        if not additions or not removals:
            break
        additions.sort()
        removals.sort()
        best: tuple[dict, Unit, Unit] | None = None
        for _, added in additions[:candidates]:
            for _, removed in removals[:candidates]:
                variant = mask.clone()
                variant[added] = True
                variant[removed] = False
                values = measure(variant)
                if best is None or values["objective"] < best[0]["objective"]:
                    best = (values, added, removed)
        values, added, removed = best
        if values["objective"] >= current["objective"]:
            history.append({"swap": swap, "stopped": "no swap of the candidates lowers the objective",
                            "best_added": list(added), "best_removed": list(removed), **values})
            break
        mask[added] = True
        mask[removed] = False
        current = values
        record = {"swap": swap, "added": list(added), "removed": list(removed), **values,
                  "best_additions": [[list(unit), round(delta, 5)] for delta, unit in additions[:candidates]],
                  "cheapest_removals": [[list(unit), round(delta, 5)] for delta, unit in removals[:candidates]]}
        history.append(record)
        if on_swap is not None:
            on_swap(record, mask)
    return mask, history


def calibration_objective(model, answers: list, text: torch.Tensor | None, text_weight: float
                          ) -> Callable[[torch.Tensor], dict[str, float]]:
    """``measure(mask)`` for :func:`swap_refine` on a model running an installed hybrid: the answers' NLL, the
    text's NLL and their weighted sum (``objective``)."""
    def measure(mask: torch.Tensor) -> dict[str, float]:
        set_fa_weights(model, mask)
        answer = answer_nll(model, answers)
        text_value = float(token_nll(model, text).mean()) if text is not None and len(text) else 0.0
        return {"objective": answer + text_weight * text_value, "answer_nll": answer, "text_nll": text_value}
    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocation", type=Path, help="the allocation to polish (kv-head granularity)")
    parser.add_argument("--model", default=None, help="default: the allocation's model")
    parser.add_argument("--data", default="embedded:enwiki", help="calibration text (its calibration split)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--signal", default="room-code,home-city",
                        help="the retrieval calibration: consa search's --retrieval-formats, optionally @HAYSTACK "
                             "(text or filler; default --calibration-haystack)")
    parser.add_argument("--calibration-haystack", default=DEFAULT_CALIBRATION_HAYSTACK)
    parser.add_argument("--calibration-samples", type=int, default=96, help="retrieval samples")
    parser.add_argument("--text-sequences", type=int, default=16, help="calibration text sequences in the objective")
    parser.add_argument("--text-weight", type=float, default=1.0, help="weight of the text NLL in the objective")
    parser.add_argument("--seq-len", type=int, default=1024, help="the samples' and text sequences' length")
    parser.add_argument("--seed", type=int, default=7,
                        help="the samples' seed (another than the search's, so they are new to the mask)")
    parser.add_argument("--swaps", type=int, default=4, help="at most this many swaps")
    parser.add_argument("--candidates", type=int, default=3, help="best additions x cheapest removals tried per swap")
    parser.add_argument("--output-prefix", type=Path, required=True, help="writes PREFIX-swapN.safetensors")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.swaps < 1 or args.candidates < 1 or args.calibration_samples < 1 or args.text_sequences < 0:
        raise SystemExit("error: --swaps, --candidates and --calibration-samples must be >= 1, --text-sequences >= 0")
    try:
        base = Allocation.load(args.allocation)
        formats, haystack, options = split_signal(args.signal, args.calibration_haystack)
        if options:
            raise ValueError(f"--signal takes no +options here (got +{', +'.join(sorted(options))})")
        parse_formats(formats)
        check_haystack(haystack)
    except (DataError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if base.granularity != "kv-head":
        raise SystemExit(f"error: {args.allocation} has granularity {base.granularity}; kv-head needed")
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model or base.model, dtype=getattr(torch, args.dtype),
                                                device=str(device))
    window, sinks = base.sliding_window, base.sink_tokens
    text = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration")
    needed = args.calibration_samples + args.text_sequences
    if len(text) < needed:
        raise SystemExit(f"error: the calibration split holds {len(text)} sequences of {args.seq_len} tokens; "
                         f"{needed} needed (fewer --calibration-samples or --text-sequences)")
    # Fraction 0.5 of N text rows: N retrieval samples, their haystacks from those rows; the text term takes the
    # last rows of the split, which no haystack uses.
    mixed = mix_retrieval(text[: args.calibration_samples], tokenizer, 0.5, window, args.seed, formats, haystack)
    retrieval = mixed.is_retrieval
    answers = [calibration_batch(mixed.sequences[retrieval], mixed.loss_mask[retrieval], device)]
    text_rows = text[len(text) - args.text_sequences:] if args.text_sequences else text[:0]
    print(f"{int(retrieval.sum())} retrieval samples ({formats} in {haystack}), {len(text_rows)} text sequences of "
          f"{args.seq_len} tokens; {base.describe()}", flush=True)
    started = time.perf_counter()
    written = []

    def on_swap(record: dict, mask: torch.Tensor) -> None:
        path = Path(f"{args.output_prefix}-swap{record['swap']}.safetensors")
        Allocation(mask.cpu(), "kv-head", window, sinks, method=f"{base.method} + {record['swap']} swaps",
                   model=base.model, model_fingerprint=model_fingerprint(model), scores=None,
                   metadata={"base": str(args.allocation), "swaps": history_so_far + [record],
                             "signal": args.signal, "seed": args.seed,
                             "calibration_samples": args.calibration_samples, "text_sequences": args.text_sequences,
                             "text_weight": args.text_weight, "versions": environment_versions()}).save(path)
        history_so_far.append(record)
        written.append(str(path))
        write_report()  # after every swap: a run cut short keeps its trajectory
        print(f"swap {record['swap']}: +{tuple(record['added'])} -{tuple(record['removed'])}: answers "
              f"{record['answer_nll']:.4f}, text {record['text_nll']:.4f} ({time.perf_counter() - started:.0f} s) "
              f"-> {path}", flush=True)

    history_so_far: list[dict] = []

    def write_report(history: list[dict] | None = None) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "history": history or history_so_far, "allocations": written,
                                         "seconds": round(time.perf_counter() - started),
                                         "versions": environment_versions()}, indent=1) + "\n")

    fa_mask = base.fa_mask.to(device)
    with hybrid_attention(model, fa_mask, window, sinks):
        measure = calibration_objective(model, answers, text_rows.to(device), args.text_weight)
        start = measure(fa_mask)
        history_so_far.append({"swap": 0, **start})
        print(f"base: answers {start['answer_nll']:.4f}, text {start['text_nll']:.4f}", flush=True)
        _, history = swap_refine(measure, fa_mask, args.swaps, args.candidates, on_swap)
    write_report(history)


if __name__ == "__main__":
    main()
