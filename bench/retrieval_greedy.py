"""Does ANY allocation of a given size keep the dense model's retrieval? Greedy selection on retrieval itself.

The second ceiling probe beside ``bench/retrieval_ceiling.py`` (docs/results.md 1g.6). It needs no gates and no
gradients: starting from all-sliding, it keeps adding the KV head whose full attention lowers the answers' NLL
most on retrieval prompts of the evaluation's own tasks (passkey, multikey, ... of :mod:`consa_cli.retrieval`,
drawn with another seed than ``consa eval``'s, at the evaluation's lengths), until the sparsity target. If even
this mask, chosen on the very metric, keeps less than 80% of dense retrieval on ``consa eval``'s prompts, no
allocation of that size with that window does much better on this model: the goal is out of reach, not the
method's fault. It is a ceiling for diagnosis, never a product setting (it is fitted to the evaluation's tasks).

Cost: about ``units x target`` forward passes over the prompts (90 x 22 for SmolLM2-135M at 0.75, kv-head):
about a minute on an H200 with the default 24 prompts; hours on a CPU. Writes ``OUTPUT`` (an allocation whose
``scores`` are the selection order, higher = picked earlier) and prints the objective after every pick.

    python bench/retrieval_greedy.py --model SMOLLM2 --device cuda --sparsity 0.75 --output greedy-s075.safetensors
    consa eval greedy-s075.safetensors --retrieval passkey,multikey --retrieval-lengths 1024,2048 \
        --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 8 --retrieval-haystack noise
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from consa_cli.allocation import Allocation, full_unit_count
from consa_cli.attention import hybrid_attention, set_fa_weights
from consa_cli.data import DataError
from consa_cli.evaluate import EvalSettings
from consa_cli.families import adapter_for
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.retrieval import TASKS, RetrievalSample, haystack_filler, make_samples
from consa_cli.search import environment_versions, resolve_device

# consa eval's retrieval seed: the prompts the greedy search chooses on must come from another one.
EVALUATION_SEED = EvalSettings.retrieval_seed


def answer_batches(samples: list[RetrievalSample], device) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(input_ids, answer_ids padded with -100, width)`` per prompt length: prompt + answer, teacher-forced."""
    by_length: dict[int, list[RetrievalSample]] = {}
    for sample in samples:
        by_length.setdefault(sample.prompt_ids.numel(), []).append(sample)
    batches = []
    for group in by_length.values():
        width = max(sample.answer_ids.numel() for sample in group)
        answers = torch.full((len(group), width), -100, dtype=torch.long)
        for row, sample in enumerate(group):
            answers[row, : sample.answer_ids.numel()] = sample.answer_ids
        prompts = torch.stack([sample.prompt_ids for sample in group])
        input_ids = torch.cat([prompts, answers.clamp(min=0)], dim=1)
        batches.append((input_ids.to(device), answers.to(device), width))
    return batches


def answer_nll(model, batches: list[tuple[torch.Tensor, torch.Tensor, int]]) -> float:
    """Mean NLL of the answer tokens over every prompt (each token counts once)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, answers, width in batches:
            logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=width + 1).logits[:, :-1].float()
            total += F.cross_entropy(logits.transpose(1, 2), answers, ignore_index=-100, reduction="sum").item()
            count += int((answers != -100).sum())
    return total / count


def greedy_mask(model, batches, target: int, num_layers: int, num_kv_heads: int,
                on_pick: Callable[[int, tuple[int, int], float], None] | None = None) -> tuple[torch.Tensor, list]:
    """Greedy forward selection of ``target`` (layer, KV head) units from all-sliding, each pick the unit whose full
    attention lowers :func:`answer_nll` most. The model must run an installed hybrid; returns the mask
    ``[L, H]`` and the picks as ``(layer, head, objective after the pick)``."""
    device = next(model.parameters()).device
    mask = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool, device=device)
    picks = []
    for round_index in range(target):
        best, best_value = None, float("inf")
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                if mask[layer, head]:
                    continue
                mask[layer, head] = True
                set_fa_weights(model, mask)
                value = answer_nll(model, batches)
                mask[layer, head] = False
                if value < best_value:
                    best, best_value = (layer, head), value
        mask[best] = True
        set_fa_weights(model, mask)
        picks.append((*best, best_value))
        if on_pick is not None:
            on_pick(round_index, best, best_value)
    return mask.cpu(), picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=None, help="default: the model family's")
    parser.add_argument("--tasks", default="passkey,multikey", help=f"from {', '.join(TASKS)}")
    parser.add_argument("--lengths", default="1024,2048", help="prompt lengths (the evaluation's)")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, default=2, help="prompts per task, length and depth")
    parser.add_argument("--haystack", default="noise")
    parser.add_argument("--prompt-seed", type=int, default=2000, help=f"not {EVALUATION_SEED} (consa eval's)")
    parser.add_argument("--output", required=True, help="allocation file to write")
    args = parser.parse_args()
    if args.prompt_seed == EVALUATION_SEED:
        raise SystemExit(f"--prompt-seed {EVALUATION_SEED} is consa eval's retrieval seed: choose another")

    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype), device=str(device))
    sinks = args.sink_tokens if args.sink_tokens is not None else adapter_for(model.config.model_type).default_sink_tokens
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    try:
        samples = [sample for task in args.tasks.split(",")
                   for sample in make_samples(task.strip(), tokenizer, lengths, depths, args.samples, args.prompt_seed,
                                              filler=list(haystack_filler(args.haystack)))]
    except DataError as error:
        raise SystemExit(str(error)) from None
    batches = answer_batches(samples, device)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    target = full_unit_count(layers * heads, args.sparsity)
    print(f"{len(samples)} prompts, {layers * heads} units, keeping {target} full; window {args.window} + {sinks} sinks",
          flush=True)
    started = time.perf_counter()

    def report(round_index: int, unit: tuple[int, int], value: float) -> None:
        print(f"  pick {round_index + 1}/{target}: layer {unit[0]} head {unit[1]}, answer NLL {value:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    everything = torch.ones(layers, heads, dtype=torch.bool, device=device)
    with hybrid_attention(model, everything, args.window, sinks):
        dense_value = answer_nll(model, batches)
        set_fa_weights(model, ~everything)
        print(f"answer NLL: all full {dense_value:.4f}, all sliding {answer_nll(model, batches):.4f}", flush=True)
        mask, picks = greedy_mask(model, batches, target, layers, heads, on_pick=report)
    order = torch.zeros(layers * heads)
    for rank, (layer, head, _) in enumerate(picks):
        order[layer * heads + head] = target - rank  # picked earlier = higher score
    allocation = Allocation(mask, "kv-head", args.window, sinks, method="ceiling: greedy on retrieval answers",
                            model=args.model, model_fingerprint=model_fingerprint(model), scores=order,
                            metadata={"picks": [list(pick) for pick in picks], "answer_nll_all_full": dense_value,
                                      "tasks": args.tasks, "lengths": lengths, "depths": depths,
                                      "samples": args.samples, "prompt_seed": args.prompt_seed,
                                      "haystack": args.haystack, "versions": environment_versions()})
    allocation.save(args.output)
    print(f"{args.output}: {allocation.describe()} ({time.perf_counter() - started:.0f} s)")
    print("\n".join(allocation.render_rows()))


if __name__ == "__main__":
    main()
