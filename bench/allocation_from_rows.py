"""Rebuild allocation files from the rows of a compare_allocations JSON, to evaluate its masks again elsewhere.

A row of ``bench/compare_allocations.py --json`` keeps its mask as ``fa_rows`` (one string per layer, '#' full
attention, '.' sliding window) and, for a learned row, its log_alpha as ``scores``; the window and sinks are the
run's arguments. This writes each named row as an allocation file of the same model, so ``consa eval`` can score
masks found on a GPU next to new ones, on the same held-out sequences and prompts.

Example (the GPU round-6 masks, scored on the CPU in docs/results/cpu-retrieval-loss-eval.json):

    python bench/allocation_from_rows.py docs/results/round6-s075.json "l0 kv-head seed0 s=0.75" \
        --output-dir docs/results/allocations --prefix gpu-round6-
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from consa_cli.allocation import Allocation
from consa_cli.families import adapter_for
from consa_cli.models import DEFAULT_MODEL, load_model_and_tokenizer, model_fingerprint


def allocation_from_row(results: dict, source: str, name: str, model_name: str, model) -> Allocation:
    """The allocation of the row called ``name`` in ``results`` (the compare_allocations JSON ``source``), for
    ``model``."""
    rows = {row["name"]: row for row in results["rows"]}
    if name not in rows:
        raise SystemExit(f"no row '{name}'; rows: {', '.join(rows)}")
    row = rows[name]
    if "fa_rows" not in row:
        raise SystemExit(f"row '{name}' has no mask (fa_rows): it is the dense reference")
    fa_mask = torch.tensor([[unit == "#" for unit in layer] for layer in row["fa_rows"]])
    args = results["args"]
    sinks = args.get("sink_tokens")
    sink_tokens = int(sinks) if sinks not in (None, "None") else adapter_for(model.config.model_type).default_sink_tokens
    scores = torch.tensor(row["scores"], dtype=torch.float32) if "scores" in row else None
    allocation = Allocation(fa_mask=fa_mask, granularity=row["granularity"], sliding_window=int(args["window"]),
                            sink_tokens=sink_tokens, method=row["method"], model=model_name,
                            model_fingerprint=model_fingerprint(model), scores=scores,
                            metadata={"source": {"json": source, "row": name,
                                                 "machine": results.get("machine"), "date": results.get("date")},
                                      "settings": row.get("settings", {})})
    allocation.check_fits(model.config.num_hidden_layers, model.config.num_key_value_heads)
    if allocation.num_full_units != row["full_units"]:
        raise SystemExit(f"row '{name}': the mask has {allocation.num_full_units} full units, the row says "
                         f"{row['full_units']}")
    return allocation


def file_name(prefix: str, name: str) -> str:
    """``prefix`` + the row name without '=' and with every other run of characters but letters, digits, '.' and
    '-' as one '-': 'l0 kv-head seed0 s=0.75' -> 'l0-kv-head-seed0-s0.75'."""
    return prefix + re.sub(r"[^A-Za-z0-9.\-]+", "-", name.replace("=", "")).strip("-") + ".safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="compare_allocations JSON")
    parser.add_argument("rows", nargs="+", help="row names, e.g. 'l0 kv-head seed0 s=0.75'")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--prefix", default="", help="file name prefix")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model the rows were searched on, as consa names "
                        "it (the JSON's own path may be a file of the GPU machine)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    model, _ = load_model_and_tokenizer(args.model)
    for name in args.rows:
        allocation = allocation_from_row(results, str(args.results), name, args.model, model)
        path = allocation.save(args.output_dir / file_name(args.prefix, name))
        print(f"{path}: {allocation.describe()}")


if __name__ == "__main__":
    main()
