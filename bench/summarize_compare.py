"""Markdown tables from one or more ``compare_allocations.py`` JSON files (same model, same held-out set).

Rows are matched across files by name; every allocation is compared with dense and with a reference rule on
the same sequences (paired mean NLL difference and t statistic).

    python bench/summarize_compare.py docs/results/round1-tuning-h100.json docs/results/round2-tuning-h100.json \
        --reference rule:interleaved
"""

from __future__ import annotations

import argparse
import json
import math


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    deltas = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(deltas) / len(deltas)
    var = sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1)
    return mean, (mean / math.sqrt(var / len(deltas)) if var > 0 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--reference", default="rule:interleaved", help="row name to compare every row with")
    parser.add_argument("--names", default=None, help="comma-separated row names to keep, in this order")
    args = parser.parse_args()

    rows: dict[str, dict] = {}
    for path in args.files:
        for row in json.load(open(path))["rows"]:
            rows.setdefault(row["name"], row)
    names = args.names.split(",") if args.names else list(rows)
    missing = [name for name in (args.reference, *names) if name not in rows]
    if missing:
        raise SystemExit(f"no row named {missing[0]!r}; rows: {', '.join(rows)}")
    reference = rows[args.reference]["nll_per_sequence"]
    dense_retrieval = rows.get("dense", {}).get("retrieval")
    print(f"| allocation | FA units | PPL | dNLL vs dense (t) | dNLL vs {args.reference} (t) | retrieval (of dense) | "
          "E[s] end | log_alpha>0 units |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        row = rows[name]
        vs_dense = (f"{row['delta_nll_vs_dense']:+.4f} ({row['paired_t_vs_dense']:.1f})"
                    if "delta_nll_vs_dense" in row else "reference")
        vs_ref = "-"
        if "nll_per_sequence" in row and name != args.reference:
            mean, t_stat = paired(row["nll_per_sequence"], reference)
            vs_ref = f"{mean:+.4f} ({t_stat:.1f})"
        units = f"{row['full_units']}/{row['units']}" if row.get("units") else "all"
        end = f"{row['final_expected_sparsity']:.3f}" if "final_expected_sparsity" in row else "-"
        threshold = str(row.get("full_units_threshold", "-"))
        retrieval = "-"
        if row.get("retrieval") is not None:
            retrieval = f"{row['retrieval']:.3f}"
            if dense_retrieval:
                retrieval += f" ({row['retrieval'] / dense_retrieval:.0%})"
        print(f"| {name} | {units} | {row['ppl']:.3f} | {vs_dense} | {vs_ref} | {retrieval} | {end} | {threshold} |")


if __name__ == "__main__":
    main()
