"""How much retrieval can ANY allocation of a given size keep? A search calibrated on the evaluation's own formats.

The evidence issue's goal at sparsity 0.75 (keep >= 80% of dense retrieval on held-out formats) has not been
reached on SmolLM2-135M (docs/results.md 1g.5-1g.6): retrieval-calibrated searches keep 27-80% and vary with the
seed. This diagnostic separates two explanations. It calibrates the search on the *evaluation* tasks themselves
(passkey, multikey, ... from :mod:`consa_cli.retrieval`, same haystack, prompts drawn with another seed than
``consa eval``'s, so no evaluated prompt is calibrated on), mixed with natural text as ``consa search
--retrieval-fraction`` does. If even this search cannot keep 80% at a sparsity, the allocation size (with this
window) is the limit, not the calibration formats; if it can, the gap is transfer from the calibration formats.
It is a ceiling for diagnosis, never a product setting: a mask calibrated on the evaluation's formats says
nothing about held-out retrieval.

Writes ``OUTPUT/seed-<seed>.safetensors`` per seed and ``OUTPUT/vote.safetensors`` (the vote, with ``--seeds``
> 1), flat files so they come back from the GPU machine; score them with ``consa eval``. Example (the run in
docs/results.md):

    python bench/retrieval_ceiling.py --model SMOLLM2 --device cuda --sparsity 0.75 --seeds 0,1,2,3 \
        --steps 300 --output ceiling-s075
    consa eval ceiling-s075/*.safetensors --model SMOLLM2 --retrieval passkey,multikey \
        --retrieval-lengths 1024,2048 --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 8 --retrieval-haystack noise
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from consa_cli.calibration import CalibrationSet
from consa_cli.data import EMBEDDED_CORPUS, DataError, load_token_sequences
from consa_cli.evaluate import EvalSettings
from consa_cli.families import adapter_for
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.retrieval import TASKS, haystack_filler, make_samples
from consa_cli.search import environment_versions, resolve_device, run_search
from consa_cli.settings import SearchSettings
from consa_cli.vote import vote

# consa eval's retrieval seed: calibration prompts must come from another one.
EVALUATION_SEED = EvalSettings.retrieval_seed
ANSWER_ROOM = 24  # tokens kept free after a prompt for its answer; the rest of the row is filler after it


def evaluation_format_calibration(text: torch.LongTensor, tokenizer: PreTrainedTokenizerBase, tasks: list[str],
                                  retrieval_fraction: float, haystack: str, seed: int) -> CalibrationSet:
    """``text`` rows plus prompts of the evaluation ``tasks`` (seeded by ``seed``) making up ``retrieval_fraction``.

    Each prompt is ``seq_len - ANSWER_ROOM`` tokens (the task's instruction, haystack, needles at a seeded depth
    and question, as ``consa eval`` builds them), then its answer, then filler tokens of the haystack up to the
    row's length; only the logits that predict the answer count in the loss (the filler after it cannot change
    them: attention is causal).
    """
    if seed == EVALUATION_SEED:
        raise DataError(f"calibration seed {seed} is consa eval's retrieval seed: its prompts would be evaluated")
    if not 0.0 < retrieval_fraction < 1.0:
        raise DataError(f"--retrieval-fraction must lie in (0, 1), got {retrieval_fraction}")
    length = text.shape[1]
    count = round(len(text) * retrieval_fraction / (1.0 - retrieval_fraction))
    rng = random.Random(f"consa-ceiling/{seed}")
    filler_ids = tokenizer(" " + " ".join(haystack_filler(haystack)), add_special_tokens=False)["input_ids"]
    rows, masks = [], []
    for index in range(count):
        task = tasks[index % len(tasks)]
        depth = round(rng.uniform(0.0, 1.0), 3)
        sample = make_samples(task, tokenizer, [length - ANSWER_ROOM], [depth], 1, seed=seed * 100_003 + index,
                              filler=list(haystack_filler(haystack)))[0]
        ids = sample.prompt_ids.tolist() + sample.answer_ids.tolist()
        if len(ids) > length:
            raise DataError(f"a {task} answer is longer than {ANSWER_ROOM} tokens")
        answer_start = len(sample.prompt_ids)
        ids += (filler_ids * (length // max(1, len(filler_ids)) + 1))[: length - len(ids)]
        mask = torch.zeros(length, dtype=torch.bool)
        mask[answer_start - 1 : answer_start - 1 + len(sample.answer_ids)] = True  # logits predicting the answer
        rows.append(torch.tensor(ids, dtype=torch.long))
        masks.append(mask)
    base = CalibrationSet.text_only(text)
    return CalibrationSet(torch.cat([base.sequences, torch.stack(rows)]), torch.cat([base.loss_mask, torch.stack(masks)]),
                          torch.cat([base.is_retrieval, torch.ones(count, dtype=torch.bool)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--data", default=EMBEDDED_CORPUS, help="natural text of the mixture (calibration split)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--granularity", default="kv-head")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=None, help="default: the model family's")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--loss", default="kl", help="loss on the text rows (the answers always take lm)")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--tasks", default="passkey,multikey", help=f"evaluation tasks to calibrate on: {TASKS}")
    parser.add_argument("--haystack", default="noise", help="the haystack consa eval will use")
    parser.add_argument("--retrieval-fraction", type=float, default=0.5)
    parser.add_argument("--calibration-seed", type=int, default=1000, help=f"prompt seed (not {EVALUATION_SEED})")
    parser.add_argument("--seeds", default="0", help="comma-separated search seeds; several are also voted")
    parser.add_argument("--output", required=True, help="folder for the allocations")
    args = parser.parse_args()

    device = resolve_device(args.device)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype), device=str(device))
    sinks = args.sink_tokens if args.sink_tokens is not None else adapter_for(model.config.model_type).default_sink_tokens
    text = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration")
    calibration = evaluation_format_calibration(text, tokenizer, tasks, args.retrieval_fraction, args.haystack,
                                                args.calibration_seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    base = SearchSettings(model=args.model, granularity=args.granularity, sparsity=args.sparsity, window=args.window,
                          seq_len=args.seq_len, steps=args.steps, loss=args.loss, retrieval_loss="lm",
                          attention_backend=args.attention_backend, device=args.device, dtype=args.dtype)
    base.validate()
    allocations = []
    for seed in (int(s) for s in args.seeds.split(",")):
        started = time.perf_counter()
        def progress(record: dict, seed: int = seed) -> None:  # a line every 25 steps: minutes per search on a CPU
            if record["step"] % 25 == 0 or record["step"] == args.steps:
                print(f"  seed {seed} step {record['step']}/{args.steps} E[s] {record['expected_sparsity']:.3f} "
                      f"{record['seconds']:.2f} s/step", flush=True)

        result = run_search(dataclasses.replace(base, seed=seed), model, calibration, sinks, model_fingerprint(model),
                            on_step=progress)
        allocation = result.allocation
        allocation.method = f"ceiling: calibrated on the evaluation formats ({','.join(tasks)})"
        allocation.metadata.update(ceiling_tasks=tasks, ceiling_haystack=args.haystack,
                                   calibration_seed=args.calibration_seed, seed=seed, versions=environment_versions())
        allocation.save(output / f"seed-{seed}.safetensors")
        allocations.append(allocation)
        final = result.metrics[-1]
        print(f"seed {seed}: {allocation.describe()} | E[s] {final.get('expected_sparsity', float('nan')):.3f} | "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        print("\n".join(allocation.render_rows()), flush=True)
    if len(allocations) > 1:
        voted = vote(allocations, method=f"ceiling vote of {len(allocations)} seeds")
        voted.save(output / "vote.safetensors")
        print(f"vote: {voted.describe()}", flush=True)


if __name__ == "__main__":
    main()
