"""Markdown table from one ``inference_speed.py`` JSON file: every row against dense, and decode against a second
reference row: by default the fair decode reference the file has -- the dense model on consa's runtime
(``dense-runtime``, the compiled runs' reference) or the dense model without cuDNN attention (eager runs on CUDA).
``--eager FILE`` adds decode against the dense row of an eager run (the model as transformers runs it) at the same
context and batch: how compiled decoding compares with what users run today.

    python bench/summarize_inference.py docs/results/inference_speed_h200.json
    python bench/summarize_inference.py docs/results/inference_speed_h200_compiled.json \
        --eager docs/results/inference_speed_h200.json
"""

from __future__ import annotations

import argparse
import json

SHORT_LABELS = {"dense, SDPA without cuDNN": "dense, no cuDNN", "transformers native layer hybrid": "native layer",
                "consa layer hybrid": "consa layer", "consa KV-head hybrid": "consa KV-head",
                "dense on consa's runtime (all heads full)": "dense-runtime"}
AUTO_DECODE_REFERENCES = ("dense-runtime", "dense, no cuDNN")
GIB = 2**30


def short(label: str) -> str:
    return "dense" if label.startswith("dense (") else SHORT_LABELS.get(label, label)


def _cells(path: str) -> dict[tuple[int, int], dict[str, dict]]:
    """(context, batch) -> short label -> row."""
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for row in json.load(open(path))["rows"]:
        cells.setdefault((row["context_length"], row["batch_size"]), {})[short(row["label"])] = row
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--decode-reference", default=None,
                        help="short label of the row decode is also compared with ('' for none) [default: "
                             f"the first of {', '.join(AUTO_DECODE_REFERENCES)} the file has]")
    parser.add_argument("--eager", default=None, metavar="FILE",
                        help="an eager run's JSON: decode also against its dense row at the same context and batch")
    args = parser.parse_args()
    cells = _cells(args.file)
    labels = sorted({name for cell in cells.values() for name in cell})
    decode_reference = args.decode_reference
    if decode_reference is None:
        decode_reference = next((name for name in AUTO_DECODE_REFERENCES if name in labels), "")
    if decode_reference and decode_reference not in labels:
        raise SystemExit(f"no row labelled {decode_reference!r}; labels: {', '.join(labels)}")
    eager = _cells(args.eager) if args.eager else {}
    extra = (f" | decode x {decode_reference}" if decode_reference else "") + (" | decode x dense eager" if eager else "")
    print("| context | batch | variant | KV GiB | x analytic | x dense | prefill s | prefill x dense | decode tok/s | "
          f"decode x dense{extra} | peak GiB | peak x dense |")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * (bool(decode_reference) + bool(eager)) + "---|---|")
    for (length, batch), cell in sorted(cells.items()):
        for name, row in cell.items():
            versus = ""
            for wanted, reference in ((decode_reference, cell.get(decode_reference)),
                                      (bool(eager), eager.get((length, batch), {}).get("dense"))):
                if wanted:
                    versus += (f" | {row['decode_tokens_per_s'] / reference['decode_tokens_per_s']:.2f}"
                               if reference else " | -")
            peak = (f"{row['peak_bytes'] / GIB:.2f} | {row['peak_vs_dense']:.2f}" if row["peak_bytes"] is not None
                    else "- | -")
            print(f"| {length // 1024}K | {batch} | {name} | {row['kv_bytes'] / GIB:.3f} | {row['kv_vs_analytic']:.3f} | "
                  f"{row['kv_vs_dense']:.2f} | {row['prefill_s']:.3f} | {row['prefill_speedup']:.2f} | "
                  f"{row['decode_tokens_per_s']:.1f} | {row['decode_speedup']:.2f}{versus} | {peak} |")


if __name__ == "__main__":
    main()
