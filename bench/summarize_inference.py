"""Markdown table from one ``inference_speed.py`` JSON file: every row against dense, and decode against a second
reference row (by default the dense model without cuDNN attention, the fair decode reference on CUDA).

    python bench/summarize_inference.py docs/results/inference_speed_h200.json
"""

from __future__ import annotations

import argparse
import json

SHORT_LABELS = {"dense, SDPA without cuDNN": "dense, no cuDNN", "transformers native layer hybrid": "native layer",
                "consa layer hybrid": "consa layer", "consa KV-head hybrid": "consa KV-head"}
GIB = 2**30


def short(label: str) -> str:
    return "dense" if label.startswith("dense (") else SHORT_LABELS.get(label, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--decode-reference", default="dense, no cuDNN",
                        help="short label of the row decode is also compared with ('' for none)")
    args = parser.parse_args()
    rows = json.load(open(args.file))["rows"]
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["context_length"], row["batch_size"]), {})[short(row["label"])] = row
    decode_reference = args.decode_reference
    if decode_reference and not any(decode_reference in cell for cell in cells.values()):
        raise SystemExit(f"no row labelled {decode_reference!r}; labels: {', '.join(sorted({short(r['label']) for r in rows}))}")
    extra = f" | decode x {decode_reference}" if decode_reference else ""
    print("| context | batch | variant | KV GiB | x analytic | x dense | prefill s | prefill x dense | decode tok/s | "
          f"decode x dense{extra} | peak GiB | peak x dense |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if decode_reference else "") + "---|---|")
    for (length, batch), cell in sorted(cells.items()):
        for name, row in cell.items():
            reference = cell.get(decode_reference) if decode_reference else None
            versus = (f" | {row['decode_tokens_per_s'] / reference['decode_tokens_per_s']:.2f}"
                      if reference else (" | -" if decode_reference else ""))
            peak = (f"{row['peak_bytes'] / GIB:.2f} | {row['peak_vs_dense']:.2f}" if row["peak_bytes"] is not None
                    else "- | -")
            print(f"| {length // 1024}K | {batch} | {name} | {row['kv_bytes'] / GIB:.3f} | {row['kv_vs_analytic']:.3f} | "
                  f"{row['kv_vs_dense']:.2f} | {row['prefill_s']:.3f} | {row['prefill_speedup']:.2f} | "
                  f"{row['decode_tokens_per_s']:.1f} | {row['decode_speedup']:.2f}{versus} | {peak} |")


if __name__ == "__main__":
    main()
