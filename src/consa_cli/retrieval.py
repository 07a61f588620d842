"""Long-context retrieval accuracy (RULER-style), generated offline and reproducibly from a seed.

Perplexity averages over every token, and most tokens need only local context, so a hybrid that keeps too
few full-attention heads can look harmless there while it can no longer fetch a fact from far back. These
tasks hide a fact (the needle) at a chosen relative depth of a prompt of an exact token length and ask for
it at the end; accuracy per (task, length, depth) cell shows where retrieval breaks.

- ``passkey``: one needle holding a 5-digit pass key.
- ``multikey``: the queried "special magic number" among distractor needles with other keys.
- ``variable-tracking``: a chain ``VAR A = 31337 .``, ``VAR B = VAR A .``, ...; asks for the last one's value.

Two haystacks (:data:`HAYSTACKS`): ``noise``, the repeated sentences of the original pass-key test ("The grass is
green. The sky is blue. ..."), where nothing but the needle is worth remembering, so a dense model finds it
and any loss is the allocation's; and ``prose``, sentences from the held-out part of the embedded Wikipedia
excerpt, harder (a 135M model misses half the keys in 1900 tokens of it, docs/results.md 1c.1). Any fixed list of
filler sentences can be given instead.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from consa_cli.data import EMBEDDED_CORPUS, DataError, load_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS = ("passkey", "multikey", "variable-tracking")
MULTIKEY_DISTRACTORS = 4
VARIABLE_HOPS = 4  # assignments after the first: five variables in the chain
# The default haystack comes from the articles perplexity evaluation also holds out (the last 20%).
FILLER_FRACTION = 0.2

_INTROS = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.",
    "multikey": "Some special magic numbers are hidden within the following text. Make sure to memorize "
                "them. I will quiz you about one of them.",
    "variable-tracking": "Memorize and track the chain of variable assignments hidden in the following text.",
}
# Keys of the multikey needles: common, unrelated nouns, so no key hints at another.
_KEY_WORDS = (
    "apple", "anchor", "badger", "blanket", "bottle", "candle", "canyon", "carpet", "castle", "cherry",
    "compass", "cottage", "dolphin", "feather", "forest", "garden", "glacier", "hammer", "harbor", "helmet",
    "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror", "needle", "orchard", "panther",
    "pebble", "pillow", "rabbit", "ribbon", "saddle", "silver", "spider", "tunnel", "violin", "walrus",
)  # fmt: skip
# Pieces are tokenized after this anchor, whose ids are then dropped (see _encode_pieces).
_ANCHOR = "."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class RetrievalSample:
    """One prompt of exactly ``length`` tokens whose correct continuation is ``answer_ids``."""

    task: str
    length: int
    depth: float
    prompt_ids: torch.LongTensor
    answer_ids: torch.LongTensor
    answer_text: str


@dataclass
class _Puzzle:
    """The task-specific text of one sample, before it is laid into the haystack."""

    needles: list[str]
    depths: list[float]  # relative depth of each needle in the haystack
    question: str
    answer: str
    values: list[str]  # the needles' secrets: filler sentences containing one are skipped


HAYSTACKS = ("noise", "prose")
DEFAULT_HAYSTACK = "noise"  # a dense model finds the needle in it, so what a hybrid misses is the allocation's
# The original pass-key filler (Mohtashami & Jaggi 2023, also RULER's "noise" haystack).
NOISE_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                "There and back again.")


def haystack_filler(haystack: str) -> tuple[str, ...]:
    """The filler sentences of a named haystack: ``noise`` (:data:`NOISE_FILLER`) or ``prose``
    (:func:`default_filler`)."""
    if haystack not in HAYSTACKS:
        raise DataError(f"unknown retrieval haystack '{haystack}'; choose from {', '.join(HAYSTACKS)}")
    return NOISE_FILLER if haystack == "noise" else default_filler()


@lru_cache(maxsize=1)  # read and split once per process: every task and target uses the same haystack
def default_filler() -> tuple[str, ...]:
    """Sentences of the held-out articles of the embedded Wikipedia excerpt (its last 20%)."""
    documents = load_documents(EMBEDDED_CORPUS)
    held_out = documents[round(len(documents) * (1 - FILLER_FRACTION)) :]
    return tuple(_sentences("\n".join(held_out)))


def _sentences(text: str) -> list[str]:
    """Prose sentences of ``text``; headings and list debris (short or unpunctuated lines) are left out."""
    pieces = (piece for line in text.splitlines() for piece in _SENTENCE_END.split(line.strip()))
    return [piece for piece in pieces if len(piece.split()) >= 4 and piece.endswith((".", "!", "?"))]


def make_samples(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    lengths: list[int],
    depths: list[float],
    samples_per_cell: int,
    seed: int,
    filler: list[str] | None = None,
    intro: bool = True,
) -> list[RetrievalSample]:
    """``samples_per_cell`` samples of ``task`` for every (length, depth), listed cell by cell.

    Every prompt is exactly ``length`` tokens of ``tokenizer``: the tokens it puts before a text by default
    (BOS, if any), a short instruction (none with ``intro`` False, a diagnostic), the haystack with the needles,
    and the question. The haystack is
    ``filler`` (default: the :data:`DEFAULT_HAYSTACK`'s) cycled from a seeded sentence, the first one cut to fit.
    A needle at depth ``d`` (0 = start of the haystack, 1 = just before the question) goes to the sentence
    boundary nearest ``d`` of the haystack's filler tokens. Each sample depends only on ``seed``, the task,
    its cell and its index, so the same arguments give the same prompts for every model that shares the
    tokenizer, which makes hybrid and dense accuracies paired.
    """
    if task not in TASKS:
        raise DataError(f"unknown retrieval task '{task}'; choose from {', '.join(TASKS)}")
    if samples_per_cell < 1:
        raise DataError(f"samples per cell must be at least 1, got {samples_per_cell}")
    if any(not 0 <= depth <= 1 for depth in depths):
        raise DataError(f"retrieval depths must lie in [0, 1], got {', '.join(map(str, depths))}")
    texts = [text.strip() for text in (haystack_filler(DEFAULT_HAYSTACK) if filler is None else filler)]
    encoded = _encode_pieces(tokenizer, [" " + text for text in texts])
    sentences = [(text, ids) for text, ids in zip(texts, encoded, strict=True) if ids]
    lead = _leading_special_ids(tokenizer)
    intro = tokenizer(_INTROS[task], add_special_tokens=False)["input_ids"] if intro else []
    samples = []
    for length in lengths:
        for depth in depths:
            for index in range(samples_per_cell):
                # A string seed is hashed with SHA-512, so it is stable across processes and PYTHONHASHSEED.
                rng = random.Random(f"{seed}/{task}/{length}/{depth}/{index}")
                puzzle = _PUZZLES[task](rng, depth)
                pool = [ids for text, ids in sentences if not any(value in text for value in puzzle.values)]
                if not pool:
                    raise DataError("the retrieval filler has no usable sentence")
                needles = _encode_pieces(tokenizer, [" " + needle for needle in puzzle.needles])
                question, answer = _encode_pieces(tokenizer, ["\n" + puzzle.question, " " + puzzle.answer])
                fixed = len(lead) + len(intro) + sum(map(len, needles)) + len(question)
                if fixed > length:
                    raise DataError(f"retrieval length {length} is too short for {task}: its instruction, "
                                    f"needles and question alone take {fixed} tokens")
                haystack = _haystack(pool, rng.randrange(len(pool)), length - fixed, needles, puzzle.depths)
                samples.append(RetrievalSample(
                    task=task,
                    length=length,
                    depth=depth,
                    prompt_ids=torch.tensor(lead + intro + haystack + question, dtype=torch.long),
                    answer_ids=torch.tensor(answer, dtype=torch.long),
                    answer_text=" " + puzzle.answer,
                ))  # fmt: skip
    return samples


def _haystack(pool: list[list[int]], start: int, budget: int, needles: list[list[int]],
              depths: list[float]) -> list[int]:
    """``budget`` filler tokens (sentences cycled from ``pool[start]``) with the needles at their depths.

    The haystack ends with a whole sentence: the sentence cut to make the length exact is the first one,
    whose tail opens the haystack. A question right after a sentence broken off mid-way reads to a small
    model as more of the same prose, and it continues the prose instead of answering (docs/results.md 1c.1).
    """
    filler = []
    filled = 0
    while filled + len(pool[(start + len(filler)) % len(pool)]) <= budget:
        filler.append(pool[(start + len(filler)) % len(pool)])
        filled += len(filler[-1])
    if filled < budget:
        cut = pool[(start + len(filler)) % len(pool)]
        filler.insert(0, cut[len(cut) - (budget - filled) :])
    boundaries = list(accumulate((len(ids) for ids in filler), initial=0))
    slots: dict[int, list[int]] = {}
    # Sorted by depth (stably): needles sharing a boundary keep their order, so a variable chain stays intact.
    for needle in sorted(range(len(needles)), key=lambda k: depths[k]):
        target = depths[needle] * budget
        slot = min(range(len(boundaries)), key=lambda b: abs(boundaries[b] - target))
        slots.setdefault(slot, []).append(needle)
    tokens = []
    for slot in range(len(boundaries)):
        for needle in slots.get(slot, []):
            tokens += needles[needle]
        if slot < len(filler):
            tokens += filler[slot]
    return tokens


def _encode_pieces(tokenizer: PreTrainedTokenizerBase, pieces: list[str]) -> list[list[int]]:
    """Token ids of each piece as it tokenizes in the middle of a document.

    Tokenizing pieces separately and concatenating their ids is what makes prompt lengths and needle depths
    exact. Each piece follows an anchor whose ids are then dropped, because a SentencePiece tokenizer would
    otherwise treat every piece as the start of a text and add a word-start marker to it; a piece whose
    tokens merged with the anchor is tokenized on its own instead.
    """
    if not pieces:
        return []
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    # verbose=False: the haystack sentences together exceed model_max_length by design; the warning is noise.
    batch = tokenizer([_ANCHOR + piece for piece in pieces], add_special_tokens=False, verbose=False)
    return [
        ids[len(anchor) :] if ids[: len(anchor)] == anchor
        else tokenizer(piece, add_special_tokens=False)["input_ids"]
        for piece, ids in zip(pieces, batch["input_ids"], strict=True)
    ]  # fmt: skip


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text by default: BOS for Llama 3 or Gemma, nothing for Qwen."""
    plain = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    full = tokenizer(_ANCHOR)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _passkey(rng: random.Random, depth: float) -> _Puzzle:
    key = str(rng.randint(10_000, 99_999))
    return _Puzzle(
        needles=[f"The pass key is {key}. Remember it. {key} is the pass key."],
        depths=[depth],
        question="What is the pass key? The pass key is",
        answer=key,
        values=[key],
    )


def _multikey(rng: random.Random, depth: float) -> _Puzzle:
    keys = rng.sample(_KEY_WORDS, MULTIKEY_DISTRACTORS + 1)
    values = [str(value) for value in rng.sample(range(1_000_000, 10_000_000), len(keys))]
    queried = keys[0]
    return _Puzzle(
        needles=[f"The special magic number for {key} is {value}."
                 for key, value in zip(keys, values, strict=True)],
        depths=[depth, *(rng.random() for _ in keys[1:])],
        question=f"What is the special magic number for {queried}? The special magic number for {queried} is",
        answer=values[0],
        values=values,
    )


def _variable_tracking(rng: random.Random, depth: float) -> _Puzzle:
    names: list[str] = []  # a list, not a set: set order varies between processes
    while len(names) < VARIABLE_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    assignments = [f"VAR {names[0]} = {value} ."]
    assignments += [f"VAR {new} = VAR {old} ." for old, new in zip(names[:-1], names[1:], strict=True)]
    return _Puzzle(
        needles=assignments,
        # The chain starts at the requested depth and its hops spread evenly over the rest of the haystack,
        # so answering needs the needle at that depth and not just the nearby last hop.
        depths=[depth + (1 - depth) * hop / len(names) for hop in range(len(names))],
        question=f"What is the value of VAR {names[-1]}? VAR {names[-1]} =",
        answer=value,
        values=[value],
    )


_PUZZLES: dict[str, Callable[[random.Random, float], _Puzzle]] = {
    "passkey": _passkey,
    "multikey": _multikey,
    "variable-tracking": _variable_tracking,
}


def score_samples(model, samples: list[RetrievalSample], batch_size: int = 1,
                  on_batch: Callable[[int], None] | None = None) -> list[bool]:
    """Whether greedy decoding would produce each sample's answer tokens exactly.

    One teacher-forced pass over prompt + answer, checking that the argmax at every answer position is the
    next answer token, is the same test as greedy decoding ``len(answer_ids)`` tokens (each greedy step then
    sees exactly the answer so far), for one forward pass instead of one per token. Samples of equal prompt
    length share a batch; shorter answers are right-padded, which a causal model cannot see from the scored
    positions. ``on_batch(n)`` is called after every batch of ``n`` samples.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_length.setdefault(sample.prompt_ids.numel(), []).append(index)
    correct = [False] * len(samples)
    with torch.no_grad():
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                width = max(samples[i].answer_ids.numel() for i in batch)
                answers = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    answers[row, : samples[i].answer_ids.numel()] = samples[i].answer_ids
                prompts = torch.stack([samples[i].prompt_ids for i in batch])
                input_ids = torch.cat([prompts, answers], dim=1).to(device)
                # Only the answer positions are scored: logits_to_keep spares the [batch, length, vocab] rest.
                logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=width + 1).logits
                predicted = logits[:, -(width + 1) : -1].argmax(dim=-1).cpu()
                for row, i in enumerate(batch):
                    answer = samples[i].answer_ids
                    correct[i] = bool(torch.equal(predicted[row, : answer.numel()], answer))
                if on_batch is not None:
                    on_batch(len(batch))
    return correct


def evaluate_retrieval(
    model,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples_per_cell: int = 4,
    seed: int = 0,
    filler: list[str] | None = None,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Exact-match retrieval accuracy of ``model`` per (task, length, depth) cell, per task and overall.

    Returns ``{"overall": acc, "overall_stderr": se, "prompts": n, "by_task": {task: acc}, "cells": [{"task",
    "length", "depth", "accuracy", "n", "hits"}]}``; accuracies are fractions of samples, so with equal cells
    ``overall`` is their mean; ``hits`` are the cell's prompts' outcomes (1 = exact match) in order, the same
    prompts for every model, so two results can be compared prompt by prompt (:func:`paired_retrieval`).
    ``overall_stderr`` is its binomial standard error over the ``n`` prompts, ``sqrt(acc (1 - acc) / n)``: with 8 prompts per cell a cell moves in steps of 0.125, and two allocations' overall scores within
    about two standard errors of each other are not told apart. Run it inside
    :func:`consa_cli.attention.hybrid_attention` to score a hybrid.
    """
    if not (tasks and lengths and depths):
        raise DataError("retrieval needs at least one task, length and depth")
    hits: dict[tuple[str, int, float], list[bool]] = {}
    for task in tasks:
        samples = make_samples(task, tokenizer, lengths, depths, samples_per_cell, seed, filler)
        for sample, correct in zip(samples, score_samples(model, samples, batch_size, on_batch), strict=True):
            hits.setdefault((sample.task, sample.length, sample.depth), []).append(correct)
    cells = [
        {"task": task, "length": length, "depth": depth, "accuracy": sum(cell) / len(cell), "n": len(cell),
         "hits": [int(correct) for correct in cell]}
        for (task, length, depth), cell in hits.items()
    ]
    by_task = {task: _accuracy([c for key, c in hits.items() if key[0] == task]) for task in tasks}
    overall, prompts = _accuracy(list(hits.values())), sum(len(cell) for cell in hits.values())
    return {"overall": overall, "overall_stderr": math.sqrt(overall * (1 - overall) / prompts), "prompts": prompts,
            "by_task": by_task, "cells": cells}


def paired_retrieval(result: dict, reference: dict) -> dict | None:
    """``result`` against ``reference`` (two :func:`evaluate_retrieval` results on the same prompts) prompt by
    prompt: ``{"gained", "lost", "prompts", "p_value"}`` -- prompts only ``result`` answers, prompts only
    ``reference`` answers, prompts compared, and the exact two-sided sign test of gained vs lost (McNemar's exact
    test). Paired, it tells two close scores apart far better than their binomial standard errors do. None when
    the results do not hold the same cells with per-prompt outcomes (e.g. written before they were kept)."""
    def outcomes(retrieval: dict) -> dict | None:
        cells = {(c["task"], c["length"], c["depth"]): c.get("hits") for c in retrieval.get("cells", [])}
        return None if not cells or any(hits is None for hits in cells.values()) else cells

    mine, theirs = outcomes(result), outcomes(reference)
    if mine is None or theirs is None or mine.keys() != theirs.keys():
        return None
    if any(len(mine[key]) != len(theirs[key]) for key in mine):
        return None
    pairs = [(a, b) for key in mine for a, b in zip(mine[key], theirs[key], strict=True)]
    gained = sum(1 for a, b in pairs if a and not b)
    lost = sum(1 for a, b in pairs if b and not a)
    return {"gained": gained, "lost": lost, "prompts": len(pairs), "p_value": sign_test(gained, lost)}


def sign_test(successes: int, failures: int) -> float:
    """Exact two-sided sign test: the probability, with every discordant pair a fair coin, of a split at least as
    uneven as ``successes`` : ``failures``."""
    trials = successes + failures
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(min(successes, failures) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def _accuracy(cells: list[list[bool]]) -> float:
    outcomes = [correct for cell in cells for correct in cell]
    return sum(outcomes) / len(outcomes)
