"""Does one KV head decide whether a search's mask retrieves? Head-by-head association over many searches.

Several searches of one setting keep 22 of 90 heads each and score anywhere from 18% to 76% of the dense model's
retrieval (docs/results.md 1g.8-1g.9). For every head that some masks keep and others drop, this prints the
correlation of "kept" with the masks' evaluation retrieval (point-biserial r) and the mean retrieval with and
without it, and tests the largest r against a permutation null (the scores shuffled over the masks, the largest r
over all heads taken each time), because with ~90 heads and a few dozen masks one head will correlate by chance.

    python bench/head_retrieval_association.py docs/results/allocations/round1[34]-*-seed-*.safetensors \
        --evaluation docs/results/round13-eval.json docs/results/round13-eval-seeds.json \
                     docs/results/round14-eval.json docs/results/round14-eval-seeds.json \
        --labels round13-eval-seeds.json:fill3-a/seed-0 ...  (each allocation's row label or path there, with the
                                                            file's name first where two files share a label)

Only reads allocations (safetensors) and ``consa eval --json`` outputs; no model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from consa_cli.allocation import Allocation


def evaluation_scores(paths: list[Path], labels: list[str]) -> list[float]:
    """Each label's overall retrieval in the ``consa eval --json`` files, matched on a row's label or path; a label
    ``FILE:LABEL`` looks only in the evaluation file named FILE (two rounds may both have ``fill3-a/seed-0``)."""
    found: dict[tuple[str, str], float] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            if row.get("retrieval"):
                for name in {row["label"], row.get("path")} - {None}:
                    found.setdefault(("", name), row["retrieval"]["overall"])
                    found[(path.name, name)] = row["retrieval"]["overall"]
    keys = [tuple(label.split(":", 1)) if ":" in label else ("", label) for label in labels]
    missing = [label for label, key in zip(labels, keys, strict=True) if key not in found]
    if missing:
        raise SystemExit(f"no evaluation row for {', '.join(missing)} in {', '.join(map(str, paths))}")
    return [found[key] for key in keys]


def correlations(kept: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column of ``kept`` (masks x heads, 0/1, no constant column) with ``scores``."""
    kept = (kept - kept.mean(0)) / kept.std(0)
    scores = (scores - scores.mean()) / scores.std()
    return (kept * scores[:, None]).sum(0) / (len(scores) - 1)


def association(masks: torch.Tensor, scores: torch.Tensor, permutations: int, seed: int) -> dict:
    """Per varying head: r, masks keeping it, mean score with / without; and the permutation p of the largest r."""
    flat = masks.reshape(len(masks), -1).float()
    kept_by = flat.sum(0)
    varying = ((kept_by > 0) & (kept_by < len(masks))).nonzero().flatten()
    r = correlations(flat[:, varying], scores)
    heads = []
    for index, value in zip(varying.tolist(), r.tolist(), strict=True):
        column = flat[:, index] > 0
        heads.append({"layer": index // masks.shape[-1], "kv_head": index % masks.shape[-1], "r": round(value, 4),
                      "kept_by": int(column.sum()), "mean_with": round(scores[column].mean().item(), 4),
                      "mean_without": round(scores[~column].mean().item(), 4)})
    heads.sort(key=lambda head: -head["r"])
    generator = torch.Generator().manual_seed(seed)
    largest = r.max().item()
    null = [correlations(flat[:, varying], scores[torch.randperm(len(scores), generator=generator)]).max().item()
            for _ in range(permutations)]
    return {"masks": len(masks), "varying_heads": len(varying),
            "always_kept": [[i // masks.shape[-1], i % masks.shape[-1]] for i in (kept_by == len(masks)).nonzero()
                            .flatten().tolist()],
            "largest_r": round(largest, 4),
            "permutation_p": sum(value >= largest for value in null) / permutations, "permutations": permutations,
            "heads": heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocations", nargs="+", type=Path)
    parser.add_argument("--evaluation", type=Path, nargs="+", required=True, help="consa eval --json files")
    parser.add_argument("--labels", nargs="+", required=True, help="each allocation's row label or path in them; FILE:LABEL for one file's row")
    parser.add_argument("--permutations", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=6, help="heads printed at each end")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if len(args.labels) != len(args.allocations):
        parser.error("--labels needs one entry per allocation")
    allocations = [Allocation.load(path) for path in args.allocations]
    shapes = {tuple(allocation.fa_mask.shape) for allocation in allocations}
    if len(shapes) != 1:
        parser.error(f"the allocations are of different models (masks {sorted(shapes)})")
    scores = torch.tensor(evaluation_scores(args.evaluation, args.labels), dtype=torch.float64)
    masks = torch.stack([allocation.fa_mask for allocation in allocations])
    result = association(masks, scores, args.permutations, args.seed)
    print(f"{result['masks']} masks, {result['varying_heads']} heads kept by some and not others; always kept: "
          f"{result['always_kept']}")
    for head in result["heads"][:args.show] + result["heads"][-args.show:]:
        print(f"  layer {head['layer']} head {head['kv_head']}: r {head['r']:+.2f}, kept by {head['kept_by']}: "
              f"mean retrieval {head['mean_with']:.3f} with, {head['mean_without']:.3f} without")
    print(f"largest r {result['largest_r']:+.3f}: permutation p = {result['permutation_p']:.3f} "
          f"({args.permutations} shuffles of the scores, largest r over all heads each)")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
