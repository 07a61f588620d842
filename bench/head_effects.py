"""Which KV heads does each retrieval signal ask for? One head at a time, on the evaluation's tasks and on calibration.

The diagnostic behind docs/results.md 1g.11. Held-out calibration (retrieval samples in formats other than the
evaluation's) keeps 20-80% of dense retrieval at sparsity 0.75 from seed to seed, while masks calibrated on the
evaluation's own tasks keep ~87%: the searches share a core and differ in a few heads beyond it. If a calibration
signal cannot *rank* those heads the way the evaluation's tasks do, no search on it can be expected to find them.

Starting from a base allocation (kv-head granularity), each head is toggled alone: a sliding head made full (the
"add" effects) and a full head made sliding (the "remove" effects). For every variant the answers' mean NLL is
measured on

* the evaluation's tasks (``--tasks``, default passkey and multikey, at ``--lengths`` and ``--depths``, drawn with
  another seed than ``consa eval``'s, as ``bench/retrieval_greedy.py`` does), and
* each calibration signal (``--signals``: ``;``-separated groups of ``consa search --retrieval-formats``, each
  optionally ``@text`` or ``@filler`` for its haystack, their samples made as the search makes them:
  ``mix_retrieval`` on the calibration split, ``--seq-len``, ``--window``, ``--seed``, ``--calibration-haystack``),
  or a text signal (``text``: every next token of the calibration text; ``key-tokens[:GAIN]``: only the tokens
  the dense model predicts GAIN nats better than the all-sliding model, after LongPPL; docs/results.md 1g.13),

and each variant's effect is its NLL minus the base's. ``--extra-prompt-seeds`` adds evaluation prompt sets of
other seeds and ``--no-intro-prompt-seeds`` ones without the tasks' opening instruction, each compared with the
first like a signal (how far the evaluation's own ranking repeats: the ceiling for any signal); a signal ending in
``+intro`` opens its samples with ``calibration.CALIBRATION_INTRO``, one with ``+answered`` keeps only samples the
dense model answers (docs/results.md 1g.12). Reported per signal: Spearman's rank correlation between its
add effects and the evaluation's over the sliding heads (with a permutation p value), the same for the remove
effects, and how many of the evaluation's ``--top`` most helpful heads to add are among the signal's ``--top``.

    python bench/head_effects.py docs/results/allocations/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors \
        --model /tmp/smol.gguf --device cpu --seq-len 512 --lengths 512 --samples 2 --calibration-samples 12 \
        --signals "room-code,home-city;flight-gate,pet-name,meeting-day,phone-extension;word-list" \
        --json docs/results/head-effects.json

Cost: (units + 1) x (prompts + signals x samples) forward passes: at 512 tokens with 12 prompts and 3 x 12 samples,
about an hour on 2 CPU cores for SmolLM2-135M; a minute or two on a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from calibration_answers import spearman
from retrieval_greedy import EVALUATION_SEED, answer_batches, answer_nll

from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention, set_fa_weights
from consa_cli.calibration import (
    DEFAULT_CALIBRATION_HAYSTACK,
    answered_by,
    check_haystack,
    mix_retrieval,
    parse_formats,
)
from consa_cli.data import DataError, load_token_sequences
from consa_cli.models import load_model_and_tokenizer
from consa_cli.retrieval import haystack_filler, make_samples
from consa_cli.search import environment_versions, resolve_device


def calibration_batch(sequences: torch.Tensor, loss_mask: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                           int]:
    """The retrieval samples of a calibration set as one :func:`answer_nll` batch: each sample ends in its answer, so
    the answers are the last tokens, right-aligned (``-100`` before a shorter answer)."""
    lengths = loss_mask.sum(dim=1).tolist()
    for row, length in enumerate(lengths):  # mix_retrieval's samples: the scored logits are the ones before the end
        if not loss_mask[row, -length - 1 : -1].all():
            raise ValueError(f"sample {row} does not end in its answer")
    width = max(lengths)
    answers = torch.full((len(lengths), width), -100, dtype=torch.long)
    for row, length in enumerate(lengths):
        answers[row, width - length :] = sequences[row, -length:]
    return sequences.to(device), answers.to(device), width


SIGNAL_OPTIONS = ("intro", "answered")

# Text signals (no retrieval format at all): the calibration text itself, every token ("text") or only its
# long-context tokens ("key-tokens[:GAIN]", after LongPPL, Fang et al. 2024): tokens the dense model predicts at
# least GAIN nats better than the all-sliding model (the short context the window leaves) and with an NLL below
# KEY_TOKEN_MAX_NLL under the dense model (a token it actually predicts).
TEXT_SIGNALS = ("text", "key-tokens")
KEY_TOKEN_GAIN = 2.0
KEY_TOKEN_MAX_NLL = 2.0


def token_nll(model, input_ids: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` (float32) of ``input_ids [B, T]`` under the model as it runs now, ``rows`` rows
    per forward (a row's logits are T x vocab)."""
    parts = []
    with torch.no_grad():
        for chunk in input_ids.split(rows):
            logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
            parts.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    return torch.cat(parts)


def key_token_mask(dense_nll: torch.Tensor, short_nll: torch.Tensor, gain: float = KEY_TOKEN_GAIN,
                   max_nll: float | None = None) -> torch.Tensor:
    """Which next-token positions ``[B, T-1]`` are long-context tokens: ``short_nll - dense_nll >= gain`` and
    ``dense_nll <= max_nll`` (default :data:`KEY_TOKEN_MAX_NLL`)."""
    max_nll = KEY_TOKEN_MAX_NLL if max_nll is None else max_nll
    return (short_nll - dense_nll >= gain) & (dense_nll <= max_nll)


def text_signal_masks(model, text: torch.Tensor, signals: list[str], window: int, sinks: int) -> dict[str, torch.Tensor]:
    """The scored positions ``[B, T-1]`` of each text signal on ``text``: every one for ``text``, the long-context
    tokens for ``key-tokens[:GAIN]`` (the dense model as loaded against the all-sliding hybrid; run before any
    hybrid is installed)."""
    masks, dense, short = {}, None, None
    for signal in signals:
        name, _, gain = signal.partition(":")
        if name == "text":
            masks[signal] = torch.ones(text.shape[0], text.shape[1] - 1, dtype=torch.bool, device=text.device)
            continue
        if dense is None:
            dense = token_nll(model, text)
            all_sliding = torch.zeros(len(model.model.layers), model.config.num_key_value_heads, dtype=torch.bool,
                                      device=text.device)
            with hybrid_attention(model, all_sliding, window, sinks):
                short = token_nll(model, text)
        masks[signal] = key_token_mask(dense, short, float(gain) if gain else KEY_TOKEN_GAIN)
    return masks


def text_nll(model, text: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each text signal's mean NLL over its scored positions, from one pass over ``text``."""
    per_token = token_nll(model, text)
    return {name: float(per_token[mask].mean()) for name, mask in masks.items()}


def split_signal(signal: str, default_haystack: str) -> tuple[str, str, set[str]]:
    """``FORMATS[@HAYSTACK][+OPTION...]`` -> (formats, haystack, options): ``+intro`` opens every sample with
    ``calibration.CALIBRATION_INTRO``; ``+answered`` keeps only samples the dense model answers (the search's
    ``--retrieval-filter answered``)."""
    signal, *options = signal.split("+")
    unknown = [option for option in options if option not in SIGNAL_OPTIONS]
    if unknown:
        raise ValueError(f"unknown signal option '+{unknown[0]}' (choose from +{', +'.join(SIGNAL_OPTIONS)})")
    formats, _, haystack = signal.partition("@")
    return formats, haystack or default_haystack, set(options)


def permutation_p(first: list[float], second: list[float], shuffles: int, seed: int = 0) -> float:
    """Share of shuffles of ``second`` whose Spearman correlation with ``first`` is at least the observed one."""
    observed = spearman(first, second)
    rng = random.Random(seed)
    shuffled = list(second)
    hits = 0
    for _ in range(shuffles):
        rng.shuffle(shuffled)
        hits += spearman(first, shuffled) >= observed
    return (hits + 1) / (shuffles + 1)


def head_effects(model, base: torch.Tensor, batches: dict[str, list], on_variant=None,
                 toggles: str = "both", text: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
                 ) -> dict[str, dict]:
    """Answer NLL per signal for ``base`` and for every one-head toggle of it: ``{"base": {signal: nll}, "heads":
    [{"layer", "head", "in_base", signal: nll - base nll, ...}]}``; ``toggles``: ``add`` (only the sliding heads
    made full), ``remove`` (only the full heads made sliding) or ``both``; ``text``: ``(token ids, {signal: scored
    positions})`` of the text signals (:func:`text_signal_masks`), measured from one pass. The model must run an
    installed hybrid."""
    def measure(mask):
        set_fa_weights(model, mask)
        values = {name: answer_nll(model, signal_batches) for name, signal_batches in batches.items()}
        return values | (text_nll(model, *text) if text else {})

    reference = measure(base)
    rows = []
    for layer in range(base.shape[0]):
        for head in range(base.shape[1]):
            if toggles != "both" and bool(base[layer, head]) != (toggles == "remove"):
                continue
            variant = base.clone()
            variant[layer, head] = ~variant[layer, head]
            values = measure(variant)
            rows.append({"layer": layer, "head": head, "in_base": bool(base[layer, head]),
                         **{name: values[name] - reference[name] for name in values}})
            if on_variant is not None:
                on_variant(len(rows), rows[-1])
    set_fa_weights(model, base)
    return {"base": reference, "heads": rows}


def compare(effects: list[dict], reference: str, signals: list[str], top: int, shuffles: int) -> dict[str, dict]:
    """Per signal: how its one-head effects rank against ``reference``'s (add and remove effects apart)."""
    summary = {}
    for signal in signals:
        row = {}
        for kind, in_base in (("add", False), ("remove", True)):
            chosen = [effect for effect in effects if effect["in_base"] == in_base]
            if len(chosen) < 3:
                continue
            ours, theirs = [e[signal] for e in chosen], [e[reference] for e in chosen]
            row[f"{kind}_spearman"] = round(spearman(ours, theirs), 3)
            row[f"{kind}_p"] = round(permutation_p(theirs, ours, shuffles), 4)
        sliding = [effect for effect in effects if not effect["in_base"]]
        best = {(e["layer"], e["head"]) for e in sorted(sliding, key=lambda e: e[reference])[:top]}
        picked = {(e["layer"], e["head"]) for e in sorted(sliding, key=lambda e: e[signal])[:top]}
        row[f"top{top}_overlap"] = len(best & picked)
        row[f"{reference}_top{top}"] = sorted(best)
        row[f"top{top}"] = sorted(picked)
        summary[signal] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("allocation", type=Path, help="the base allocation (kv-head granularity)")
    parser.add_argument("--model", default=None, help="default: the allocation's model")
    parser.add_argument("--data", default="embedded:enwiki")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tasks", default="passkey,multikey", help="the evaluation's tasks")
    parser.add_argument("--lengths", default="1024", help="their prompt lengths")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, default=2, help="prompts per task, length and depth")
    parser.add_argument("--haystack", default="noise", help="the evaluation prompts' haystack")
    parser.add_argument("--prompt-seed", type=int, default=2000, help=f"not {EVALUATION_SEED} (consa eval's)")
    parser.add_argument("--extra-prompt-seeds", default="",
                        help="comma-separated prompt seeds of more evaluation prompt sets, each compared with the "
                             "first like a signal (evaluation@SEED): how well the evaluation's own one-head effects "
                             "repeat on other prompts, the ceiling for any calibration signal")
    parser.add_argument("--no-intro-prompt-seeds", default="",
                        help="comma-separated prompt seeds of evaluation prompt sets without the tasks' opening "
                             "instruction (evaluation-nointro@SEED), compared with the first like a signal: which "
                             "heads serve the instruction rather than the needle")
    parser.add_argument("--signals", default="room-code,home-city",
                        help="';'-separated calibration signals, each a --retrieval-formats list, optionally with "
                             "@HAYSTACK (text or filler; default --calibration-haystack), +intro for samples that "
                             "open with calibration.CALIBRATION_INTRO and +answered for only samples the dense "
                             "model answers (e.g. room-code,home-city@filler+intro+answered); or a text "
                             "signal: 'text' (every token of the calibration text) or 'key-tokens[:GAIN]' (only "
                             "tokens the dense model predicts GAIN nats better than the all-sliding model, "
                             f"default {KEY_TOKEN_GAIN})")
    parser.add_argument("--toggles", choices=("both", "add", "remove"), default="both",
                        help="which one-head variants: sliding heads made full (add), full heads made sliding "
                             "(remove), or both")
    parser.add_argument("--calibration-samples", type=int, default=12, help="retrieval samples per signal")
    parser.add_argument("--seq-len", type=int, default=1024, help="the calibration samples' length")
    parser.add_argument("--seed", type=int, default=0, help="the calibration seed (a search's --seed)")
    parser.add_argument("--calibration-haystack", default=DEFAULT_CALIBRATION_HAYSTACK)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--shuffles", type=int, default=2000)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    try:
        extra_seeds = [int(seed) for seed in args.extra_prompt_seeds.split(",") if seed.strip()]
        no_intro_seeds = [int(seed) for seed in args.no_intro_prompt_seeds.split(",") if seed.strip()]
    except ValueError:
        raise SystemExit("error: --extra-prompt-seeds and --no-intro-prompt-seeds take integers") from None
    if EVALUATION_SEED in (args.prompt_seed, *extra_seeds, *no_intro_seeds):
        raise SystemExit(f"prompt seed {EVALUATION_SEED} is consa eval's retrieval seed: choose another")
    if len({args.prompt_seed, *extra_seeds}) < 1 + len(extra_seeds):
        raise SystemExit("error: the prompt seeds must differ from each other")
    try:
        base = Allocation.load(args.allocation)
        signals = [signal.strip() for signal in args.signals.split(";") if signal.strip()]
        for signal in signals:
            name, colon, gain = signal.partition(":")
            if name in TEXT_SIGNALS:
                if colon and name == "text":
                    raise ValueError(f"signal {signal}: only key-tokens takes a gain (key-tokens:1)")
                if colon and not gain.replace(".", "", 1).isdigit():
                    raise ValueError(f"signal {signal}: the gain is a non-negative number of nats (key-tokens:1)")
                continue
            formats, haystack, _ = split_signal(signal, args.calibration_haystack)
            parse_formats(formats)
            check_haystack(haystack)
    except (DataError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if base.granularity != "kv-head":
        raise SystemExit(f"error: {args.allocation} has granularity {base.granularity}; kv-head needed")
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model or base.model, dtype=getattr(torch, args.dtype),
                                                device=str(device))
    window, sinks = base.sliding_window, base.sink_tokens
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    def evaluation_prompts(seed: int, intro: bool = True) -> list:
        return [sample for task in args.tasks.split(",")
                for sample in make_samples(task.strip(), tokenizer, lengths, depths, args.samples, seed,
                                           filler=list(haystack_filler(args.haystack)), intro=intro)]

    prompts = evaluation_prompts(args.prompt_seed)
    batches = {"evaluation": answer_batches(prompts, device)}
    repeats = [f"evaluation@{seed}" for seed in extra_seeds]
    for seed, name in zip(extra_seeds, repeats, strict=True):
        batches[name] = answer_batches(evaluation_prompts(seed), device)
    for seed in no_intro_seeds:
        repeats.append(f"evaluation-nointro@{seed}")
        batches[repeats[-1]] = answer_batches(evaluation_prompts(seed, intro=False), device)
    text = load_token_sequences(args.data, tokenizer, args.seq_len, "calibration")[: args.calibration_samples]
    for signal in signals:
        if signal.partition(":")[0] in TEXT_SIGNALS:
            continue
        # As many text rows as retrieval samples (fraction 0.5): only the retrieval rows are scored.
        formats, haystack, options = split_signal(signal, args.calibration_haystack)
        # (answered: judged by the dense model, before the hybrid is installed below)
        try:
            mixed = mix_retrieval(text, tokenizer, 0.5, window, args.seed, formats, haystack,
                                  keep=answered_by(model) if "answered" in options else None,
                                  intro="intro" in options)
        except DataError as error:
            raise SystemExit(f"error: signal {signal}: {error}") from None
        retrieval = mixed.is_retrieval
        batches[signal] = [calibration_batch(mixed.sequences[retrieval], mixed.loss_mask[retrieval], device)]
    text_signals = [signal for signal in signals if signal.partition(":")[0] in TEXT_SIGNALS]
    text_on_device = text.to(device)  # scored once for the masks, then once per variant
    text_masks = text_signal_masks(model, text_on_device, text_signals, window, sinks)
    for signal, mask in text_masks.items():
        print(f"{signal}: {int(mask.sum())} tokens scored in {len(text)} text sequences", flush=True)
        if not mask.any():
            raise SystemExit(f"error: signal {signal} selects no token; lower its gain")
    units = {"both": base.fa_mask.numel(), "add": int((~base.fa_mask).sum()), "remove": int(base.fa_mask.sum())}[
        args.toggles]
    print(f"{len(prompts)} evaluation prompts (x{1 + len(extra_seeds)} prompt seeds), {len(signals)} signals x {args.calibration_samples} samples, "
          f"{units} one-head variants of {base.describe()}", flush=True)
    started = time.perf_counter()

    def progress(done: int, row: dict) -> None:
        effects = "  ".join(f"{name} {row[name]:+.3f}" for name in [*batches, *text_masks])
        print(f"  {done}/{units} ({row['layer']},{row['head']}) {'remove' if row['in_base'] else 'add'}: {effects} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    with hybrid_attention(model, base.fa_mask.to(device), window, sinks):
        result = head_effects(model, base.fa_mask.to(device), batches, on_variant=progress, toggles=args.toggles,
                              text=(text_on_device, text_masks) if text_masks else None)
    summary = compare(result["heads"], "evaluation", [*repeats, *signals], args.top, args.shuffles)
    for signal, row in summary.items():
        print(f"{signal}: add r {row.get('add_spearman')} (p {row.get('add_p')}), remove r "
              f"{row.get('remove_spearman')} (p {row.get('remove_p')}), top-{args.top} overlap "
              f"{row[f'top{args.top}_overlap']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                     "base": result["base"], "summary": summary, "heads": result["heads"],
                                     "seconds": round(time.perf_counter() - started), "versions":
                                     environment_versions()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
