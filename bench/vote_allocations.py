"""One allocation from several saved ones (:func:`consa_cli.vote.vote`): each unit's votes (how many of the given
allocations keep it full), ties broken by its mean standardised score, the top units kept to the target.
``consa search --seeds N`` does this over N seeds of one search; this script votes over any saved allocations
(or rows of a compare_allocations JSON). Every input must be for the same model, granularity, window and sinks.

    python bench/vote_allocations.py a.safetensors b.safetensors c.safetensors --output vote.safetensors
    python bench/vote_allocations.py --rows docs/results/round8-a.json 'l0 kl+lm rf0.5 s=0.75' ... --output vote.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from consa_cli.allocation import Allocation, AllocationError
from consa_cli.vote import vote


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
    try:
        result = vote(allocations, args.sparsity)
    except AllocationError as error:
        raise SystemExit(str(error)) from None
    result.save(args.output)
    print(f"{args.output}: {result.describe()}")


if __name__ == "__main__":
    main()
