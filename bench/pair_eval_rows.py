"""Pair rows of several ``consa eval --json`` files that scored the same sequences and prompts.

``consa eval`` pairs every row with the dense row and with nothing else, and only inside one file; evaluations
split over parallel processes (``--no-dense`` in all but one) need the pairing done afterwards. Each row is
compared with dense (held-out NLL, paired t over sequences; retrieval as a fraction of dense) and with the
reference row given for it (paired NLL difference, prompts gained / lost and the exact sign test), in one
Markdown table.

    python bench/pair_eval_rows.py docs/results/swap-refine/swap-refine-s075-default-eval.json \
        docs/results/swap-refine/swap-refine-s050-default-eval.json \
        --reference "refine-s075=vote4-kl-lm-rf0.5-seeds0-3-s0.75" --reference "s050=vote4-...-s0.5"

Rows of different files that share a label (each healing evaluated as ``healed``) stay apart as
``LABEL [file stem]``.

``--reference PATTERN=LABEL``: rows whose label matches the regular expression PATTERN are compared with the row
labelled LABEL (the first pattern that matches wins; a row is not compared with itself).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from summarize_compare import paired  # noqa: E402

from consa_cli.retrieval import paired_retrieval  # noqa: E402


def load_rows(paths: list[str]) -> list[dict]:
    """The rows of every file in order. A label seen before names the same row when its weights and allocation are
    the same (``path``; dense in several files): the first is kept. Otherwise it is another row that happens to have
    the same label (two healings each written as ``healed.safetensors``): it is kept as ``LABEL [file stem]``."""
    rows, seen = [], {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            first = seen.get(row["label"])
            if first is not None and first.get("path") == row.get("path"):
                continue
            if first is not None:
                row = {**row, "label": f"{row['label']} [{Path(path).stem}]"}
                if row["label"] in seen:
                    raise SystemExit(f"error: {path} repeats the label {row['label']!r} for different rows")
            seen[row["label"]] = row
            rows.append(row)
    return rows


def pair_table(rows: list[dict], references: list[tuple[str, str]]) -> list[str]:
    by_label = {row["label"]: row for row in rows}
    dense = next((row for row in rows if row.get("method") == "dense"), None)
    if dense is None:
        raise SystemExit("error: none of the files has a dense row (run one of the evaluations without --no-dense)")
    dense_retrieval = (dense.get("retrieval") or {}).get("overall")
    lines = ["| row | PPL | dNLL vs dense (t) | retrieval (of dense) | reference | dNLL vs reference (t) | "
             "prompts gained / lost vs reference (sign test p) |", "|---|---:|---:|---:|---|---:|---|"]
    for row in rows:
        if row is dense:
            continue
        d_nll, t_nll = paired(row["nll_per_sequence"], dense["nll_per_sequence"])
        retrieval = (row.get("retrieval") or {}).get("overall")
        share = f" ({retrieval / dense_retrieval:.1%})" if retrieval is not None and dense_retrieval else ""
        cells = [row["label"], f"{row['ppl']:.3f}", f"{d_nll:+.4f} ({t_nll:.1f})",
                 "-" if retrieval is None else f"{retrieval:.3f}{share}"]
        reference_label = next((label for pattern, label in references if re.search(pattern, row["label"])), None)
        reference = by_label.get(reference_label) if reference_label else None
        if reference is None or reference is row:
            cells += ["-", "-", "-"]
        else:
            d_ref, t_ref = paired(row["nll_per_sequence"], reference["nll_per_sequence"])
            prompts = paired_retrieval(row.get("retrieval") or {}, reference.get("retrieval") or {})
            counts = "-" if prompts is None else f"{prompts['gained']} / {prompts['lost']} ({prompts['p_value']:.2g})"
            cells += [reference_label, f"{d_ref:+.4f} ({t_ref:.1f})", counts]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="consa eval --json files (same sequences and prompts)")
    parser.add_argument("--reference", action="append", default=[], metavar="PATTERN=LABEL",
                        help="compare rows matching PATTERN with the row labelled LABEL (repeatable)")
    args = parser.parse_args()
    references = []
    for spec in args.reference:
        pattern, sep, label = spec.partition("=")
        if not sep or not label:
            raise SystemExit(f"error: --reference {spec!r} is not PATTERN=LABEL")
        references.append((pattern, label))
    print("\n".join(pair_table(load_rows(args.files), references)))


if __name__ == "__main__":
    main()
