"""Markdown tables from one or more ``compare_allocations.py`` JSON files (same model, same held-out set).

Rows are matched across files by name; every allocation is compared with dense and with a reference rule on
the same sequences (paired mean NLL difference and t statistic). ``consa eval --json`` files mix in too when they
scored the same sequences (their rows are named by label; dNLL vs dense against the file's own dense row).
``--plot`` draws each row's perplexity cost against its retrieval, grouped by ``--group REGEX=LABEL``.

    python bench/summarize_compare.py docs/results/round1-tuning-h100.json docs/results/round2-tuning-h100.json \
        --reference rule:interleaved
    python bench/summarize_compare.py docs/results/round8-a.json docs/results/round10-vote-eval.json \
        --reference "rule:interleaved layer s=0.75" --plot docs/img/retrieval-vs-cost.png --group "^vote=vote"
"""

from __future__ import annotations

import argparse
import json
import math
import re


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    deltas = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(deltas) / len(deltas)
    var = sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1)
    return mean, (mean / math.sqrt(var / len(deltas)) if var > 0 else 0.0)


def eval_rows(rows: list[dict]) -> list[dict]:
    """``consa eval --json`` rows in the compare format: named by label, dNLL against the file's dense row."""
    dense = next((row for row in rows if row.get("is_reference")), None)
    converted = []
    for row in rows:
        if row is dense or "nll_per_sequence" not in row:
            continue
        retrieval = row.get("retrieval")
        converted.append({
            "name": row["label"], "ppl": row["ppl"], "nll_per_sequence": row["nll_per_sequence"],
            "full_units": row.get("full_units"), "units": row.get("units"),
            "retrieval": retrieval.get("overall") if isinstance(retrieval, dict) else retrieval,
            "retrieval_cells": retrieval.get("cells", []) if isinstance(retrieval, dict) else [],
            **({} if dense is None else dict(zip(("delta_nll_vs_dense", "paired_t_vs_dense"),
                                               paired(row["nll_per_sequence"], dense["nll_per_sequence"]), strict=True))),
        })
    return converted


def group_of(name: str, groups: list[tuple[str, str]]) -> str:
    """The label of the first ``--group`` pattern the row name matches, else its first word."""
    for pattern, label in groups:
        if re.search(pattern, name):
            return label
    return re.split(r"[\s:]", name, maxsplit=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--reference", default="rule:interleaved", help="row name to compare every row with")
    parser.add_argument("--names", default=None, help="comma-separated row names to keep, in this order")
    parser.add_argument("--plot", default=None, help="PNG: each row's dNLL vs dense against its retrieval")
    parser.add_argument("--group", action="append", default=[], metavar="REGEX=LABEL",
                        help="plot colour of the rows whose name matches REGEX (first match wins; default: the "
                             "name's first word); repeatable")
    parser.add_argument("--title", default="retrieval against perplexity cost")
    args = parser.parse_args()
    groups = [tuple(item.rsplit("=", 1)) for item in args.group]
    if any(len(group) != 2 for group in groups):
        raise SystemExit("--group takes REGEX=LABEL")

    rows: dict[str, dict] = {}
    for path in args.files:
        loaded = json.load(open(path))["rows"]
        for row in (loaded if all("name" in row for row in loaded) else eval_rows(loaded)):
            rows.setdefault(row["name"], row)
    names = args.names.split(",") if args.names else list(rows)
    missing = [name for name in (args.reference, *names) if name not in rows]
    if missing:
        raise SystemExit(f"no row named {missing[0]!r}; rows: {', '.join(rows)}")
    if "nll_per_sequence" not in rows[args.reference]:
        raise SystemExit(f"row {args.reference!r} has no per-sequence NLLs to pair with (dense is every row's "
                         "reference already): choose an allocation's row")
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
            prompts = sum(cell["n"] for cell in row.get("retrieval_cells", []))
            if prompts:  # one binomial standard error over the prompts
                retrieval += f" +- {math.sqrt(row['retrieval'] * (1 - row['retrieval']) / prompts):.3f}"
            if dense_retrieval:
                retrieval += f" ({row['retrieval'] / dense_retrieval:.1%})"
        print(f"| {name} | {units} | {row['ppl']:.3f} | {vs_dense} | {vs_ref} | {retrieval} | {end} | {threshold} |")
    if args.plot:
        from consa_cli.plots import plot_tradeoff

        points: dict[str, list[tuple[float, float]]] = {}
        for name in names:
            row = rows[name]
            if "delta_nll_vs_dense" in row and row.get("retrieval") is not None and dense_retrieval:
                points.setdefault(group_of(name, groups), []).append(
                    (row["delta_nll_vs_dense"], row["retrieval"] / dense_retrieval))
        picture = plot_tradeoff(points, args.plot, "perplexity cost: mean NLL difference vs dense (nats/token)",
                                "retrieval, fraction of dense", args.title, reference=1.0)
        print(f"\nwrote {picture}")


if __name__ == "__main__":
    main()
