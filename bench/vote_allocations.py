"""One allocation from several: each unit's votes (how many of the given allocations keep it full), ties broken by
its mean standardised score (learned log_alpha, standardised per allocation), the top units kept to the target.

Search results vary by seed as much as methods differ (docs/results.md 1f): a vote over seeds asks which units
the searches agree on. Every input must be for the same model, granularity, window and sinks.

    python bench/vote_allocations.py a.safetensors b.safetensors c.safetensors --output vote.safetensors
    python bench/vote_allocations.py --rows docs/results/round8-a.json 'l0 kl+lm rf0.5 s=0.75' ... --output vote.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from consa_cli.allocation import Allocation, full_unit_count


def vote(allocations: list[Allocation], sparsity: float | None = None) -> Allocation:
    """The units most allocations keep full, as many as the first allocation keeps (or ``sparsity`` asks for)."""
    first = allocations[0]
    for other in allocations[1:]:
        same = (other.fa_mask.shape, other.granularity, other.sliding_window, other.sink_tokens,
                other.model_fingerprint)
        if same != (first.fa_mask.shape, first.granularity, first.sliding_window, first.sink_tokens,
                    first.model_fingerprint):
            raise SystemExit("the allocations differ in shape, granularity, window, sinks or model: cannot vote")
    units = first.fa_mask.flatten().numel()
    votes = torch.stack([a.fa_mask.flatten().float() for a in allocations]).sum(dim=0)
    standardised = [((a.scores - a.scores.mean()) / a.scores.std().clamp(min=1e-6)).flatten()
                    for a in allocations if a.scores is not None]
    tie_break = torch.stack(standardised).mean(dim=0) if standardised else torch.zeros(units)
    keep = first.num_full_units if sparsity is None else full_unit_count(units, sparsity)
    # Votes first; a score difference (standardised, |.| < 100) never outweighs one vote.
    chosen = (votes * 1000 + tie_break.clamp(-100, 100)).topk(keep).indices
    mask = torch.zeros(units, dtype=torch.bool)
    mask[chosen] = True
    return Allocation(mask.view_as(first.fa_mask), first.granularity, first.sliding_window, first.sink_tokens,
                      method=f"vote of {len(allocations)}", model=first.model,
                      model_fingerprint=first.model_fingerprint, scores=votes + tie_break.clamp(-0.49, 0.49),
                      metadata={"votes_of": [a.describe() for a in allocations]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocations", nargs="*", type=Path, help="allocation files")
    parser.add_argument("--rows", nargs="+", default=[], metavar="JSON_OR_ROW",
                        help="a compare_allocations JSON followed by row names, repeatable: JSON ROW [ROW ...] JSON ...")
    parser.add_argument("--model", default=None, help="model of --rows (default: the embedded SmolLM2-135M)")
    parser.add_argument("--sparsity", type=float, default=None, help="target [default: the first allocation's]")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    allocations = [Allocation.load(path) for path in args.allocations]
    if args.rows:
        from allocation_from_rows import allocation_from_row

        from consa_cli.models import DEFAULT_MODEL, load_model_and_tokenizer

        model_name = args.model or DEFAULT_MODEL
        model, _ = load_model_and_tokenizer(model_name)
        results, source = None, None
        for item in args.rows:
            if item.endswith(".json"):
                source, results = item, json.loads(Path(item).read_text())
            elif results is None:
                raise SystemExit(f"--rows: row '{item}' comes before any JSON file")
            else:
                allocations.append(allocation_from_row(results, source, item, model_name, model))
    if len(allocations) < 2:
        raise SystemExit("give at least two allocations to vote over")
    result = vote(allocations, args.sparsity)
    result.save(args.output)
    print(f"{args.output}: {result.describe()}")


if __name__ == "__main__":
    main()
