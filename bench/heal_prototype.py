"""Does a short healing of the weights bring a hybrid's retrieval back? (Issue 3, sessions 18-19: the research script
behind docs/results.md 1g.17; the product form is ``consa heal`` (consa_cli.heal), which shares its schedule and
trainable weights and writes an export instead of allocation files.)

The model runs one fixed allocation (hard mask) and learns to reproduce the dense model it came from: KL(dense ||
hybrid) on every token of the search's own calibration set (held-out Wikipedia text plus the held-out retrieval
formats of ``--retrieval-fraction``; never the evaluation's formats), the dense teacher a frozen copy. What trains is
``--train``: ``attention`` (q, k, v, o projections of every layer), ``sliding`` (those of layers with a sliding
head), or ``all`` (everything but the embeddings). Writes ``OUTPUT/model`` (the healed weights, a plain transformers
checkpoint), ``OUTPUT/healed.safetensors`` (the allocation, recorded for the healed weights), and
``OUTPUT/unhealed.safetensors`` (the same allocation for the original weights, named by their local path), so one
``consa eval OUTPUT/unhealed.safetensors OUTPUT/healed.safetensors ...`` compares them on the same prompts::

    python bench/heal_prototype.py docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors \\
        --model ~/.cache/consa/models/SmolLM2-135M-Instruct --steps 120 --output heal-vote
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from consa_cli.allocation import Allocation
from consa_cli.calibration import mix_retrieval
from consa_cli.data import load_token_sequences
from consa_cli.heal import heal_weights
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.settings import HealSettings, SearchSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocation")
    parser.add_argument("--model", required=True, help="the dense model the allocation was made for (a local dir)")
    parser.add_argument("--data", default=SearchSettings.data)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--retrieval-fraction", type=float, default=0.5)
    parser.add_argument("--text-sequences", type=int, default=64,
                        help="calibration text sequences used (the first of the split), as many retrieval samples "
                             "again at --retrieval-fraction 0.5; each step reads one, in a seeded order")
    parser.add_argument("--max-needles", type=int, default=HealSettings.max_needles,
                        help="facts per retrieval sample, at most (one asked, the rest distractors)")
    parser.add_argument("--answer-weight", type=float, default=0.0,
                        help="extra weight of the KL on retrieval samples' answer tokens (consa heal's)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--train", choices=["attention", "sliding", "all"], default="attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda; float32 weights either way (TF32 matmuls on "
                                                         "CUDA), so AdamW's updates are not lost to bf16 rounding")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the steps as CUDA graphs, as `consa heal` "
                        "does by default on CUDA since session 22 (4x faster, the same KL); off here so that the "
                        "earlier runs' commands reproduce them as they ran")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    allocation = Allocation.load(args.allocation)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32, device=args.device)
    config = model.config
    source_fingerprint = model_fingerprint(model)
    allocation.check_fits(config.num_hidden_layers, config.num_key_value_heads, source_fingerprint)
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)

    text = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration", args.text_sequences)
    # No answered_by filter (the search's default): the target is the dense model's own distribution, answered or
    # not, and the filter costs a forward per draw for a 17% acceptance (1g.7).
    calibration = mix_retrieval(text, tokenizer, args.retrieval_fraction, allocation.sliding_window, args.seed,
                                max_needles=args.max_needles)
    print(json.dumps({"sequences": len(calibration.sequences), "retrieval": int(calibration.is_retrieval.sum()),
                      "full_heads": int(allocation.fa_mask.sum()), "units": allocation.fa_mask.numel()}), flush=True)

    # consa heal's own loop: one row per step in a seeded order, the same schedule, loss and clipping.
    settings = HealSettings(seq_len=args.seq_len, steps=args.steps, lr=args.lr, train=args.train, seed=args.seed,
                            retrieval_fraction=args.retrieval_fraction, max_needles=args.max_needles,
                            answer_weight=args.answer_weight)
    settings.validate()

    def report(record: dict) -> None:
        if record["step"] % 10 == 0 or record["step"] == args.steps - 1:
            print(json.dumps(record), flush=True)

    log = heal_weights(model, teacher, allocation, calibration, settings, "sdpa", report, cuda_graphs=args.cuda_graphs)

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output / "model", safe_serialization=True)
    tokenizer.save_pretrained(args.output / "model")
    settings = {k: v for k, v in vars(args).items() if k not in ("output",)}
    # source_fingerprint as `consa heal` records it: consa eval pairs these weights with the dense model they came from
    metadata = {**allocation.metadata, "healed": {**settings, "source_fingerprint": source_fingerprint}}
    replace(allocation, model=str((args.output / "model").resolve()), model_fingerprint=model_fingerprint(model),
            method=f"{allocation.method}+healed", metadata=metadata).save(args.output / "healed.safetensors")
    replace(allocation, model=str(Path(args.model).expanduser().resolve())).save(args.output / "unhealed.safetensors")
    (args.output / "log.json").write_text(json.dumps({"settings": settings, "steps": log}, indent=1))


if __name__ == "__main__":
    main()
