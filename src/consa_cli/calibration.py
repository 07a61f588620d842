"""Calibration data for search: natural text, optionally mixed with synthetic long-range retrieval samples.

Perplexity-calibrated allocations keep perplexity but lose retrieval (docs/results.md): on natural text almost
every token is predictable from the last few hundred, so the search never learns which heads fetch facts from
far back. DuoAttention calibrates on synthetic retrieval for this reason. A retrieval calibration sample is a
calibration-split text sequence with a few facts (needles) laid in far from its end and a question about one of
them at the end; the loss counts only the answer tokens, so each sample says exactly "keep what retrieves".

The calibration formats are deliberately unlike the evaluation tasks in :mod:`consa_cli.retrieval` (digits keyed
by a fixed phrase, magic numbers, variable chains): letter codes of named rooms, people's cities and people's
locker numbers, asked in other words, so retrieval accuracy measured afterwards is on formats the search never
saw. ``locker-number`` is the one whose answer is a digit string, as the passkey's is (copying digits is what
passkey retrieval needs; the wording, keys and length differ); the default keeps the first two, the formats every
measured run so far used, so their runs resume and reproduce exactly. Four more (``flight-gate``: a letter and two
digits; ``pet-name``; ``meeting-day``; ``phone-extension``: four digits) exist to test whether more varied
calibration facts transfer better to the held-out evaluation (docs/results.md 1g.9: the few tried do not).

The haystack the needles lie in is calibration-split text (``text``, the default and what every measured run used)
or :data:`CALIBRATION_FILLER` cycled (``filler``): a repetitive haystack like the evaluation's pass-key filler, to
measure whether the kind of haystack, rather than the evaluation's own formats, is what retrieval calibration
misses. The facts, questions and needle positions of a seed are the same in both.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from consa_cli.data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CALIBRATION_FORMATS = ("room-code", "home-city", "locker-number", "flight-gate", "pet-name", "meeting-day",
                       "phone-extension", "word-list")
DEFAULT_CALIBRATION_FORMATS = "room-code,home-city"
CALIBRATION_HAYSTACKS = ("text", "filler")
DEFAULT_CALIBRATION_HAYSTACK = "text"
# Repetitive like the evaluation's "noise" haystack (consa_cli.retrieval.NOISE_FILLER) but none of its sentences:
# calibrating on the evaluation's own filler would measure memorised text, not the kind of haystack.
CALIBRATION_FILLER = ("The river runs past the old mill.", "The hills are low and round.",
                      "A long road leads to the town.", "The wind blows over the fields.",
                      "Rain falls on the roofs at night.")
MAX_NEEDLES = 3  # facts per sample: the queried one and up to two distractors of the same format (the default)
# With a retrieval filter, draws per sample needed before giving up (the dense SmolLM2-135M answers ~1 in 6 of the
# default text-haystack samples: docs/results.md 1g.7).
MAX_DRAWS_PER_SAMPLE = 20
RETRIEVAL_FILTERS = ("none", "answered")

_ROOMS = ("amber", "birch", "cobalt", "copper", "coral", "crimson", "ivory", "jade", "lilac", "maple", "marble",
          "olive", "onyx", "pearl", "quartz", "ruby", "sable", "slate", "topaz", "velvet")  # fmt: skip
_PEOPLE = ("Adele Brandt", "Boris Okafor", "Clara Lindqvist", "Dmitri Havel", "Elena Marchetti", "Farid Nasser",
           "Greta Holm", "Hugo Lemaire", "Ines Duarte", "Jonas Keller", "Keiko Tanabe", "Luis Ortega",
           "Mara Petrovic", "Nils Ekberg", "Olga Sorensen", "Pavel Novak")  # fmt: skip
_CITIES = ("Lisbon", "Oslo", "Krakow", "Valencia", "Tampere", "Ghent", "Bergen", "Porto", "Zagreb", "Lyon",
           "Graz", "Turin", "Aarhus", "Brno", "Seville", "Utrecht")  # fmt: skip
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_PET_NAMES = ("Biscuit", "Pepper", "Juniper", "Mango", "Ziggy", "Waffles", "Clover", "Nugget", "Pickles", "Tofu",
              "Marble", "Sprout", "Bramble", "Noodle", "Fennel", "Cricket")  # fmt: skip
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NOUNS = ("lamp", "violin", "carrot", "anchor", "pillow", "rocket", "saddle", "tulip", "kettle", "walnut", "helmet",
          "ladder", "candle", "mirror", "basket", "feather", "compass", "hammer", "lemon", "button", "whistle",
          "blanket", "trumpet", "pebble")  # fmt: skip
WORD_LIST_LENGTH = 4


@dataclass
class CalibrationSet:
    """Token sequences ``[N, seq_len]``, which logit positions count in the loss (``loss_mask``, same shape) and
    which sequences are synthetic retrieval samples (``is_retrieval [N]``; None: none are).

    ``loss_mask[i, t]`` is True when the logits at position ``t`` (which predict token ``t + 1``) enter sequence
    ``i``'s loss; each sequence's loss is the mean over its own True positions, so a retrieval sample with three
    answer tokens weighs as much as a text sequence with a thousand. ``is_retrieval`` picks each sequence's loss
    (the search's ``retrieval_loss`` or ``loss``); it is stated, not read off the mask.
    """

    sequences: torch.LongTensor
    loss_mask: torch.BoolTensor
    is_retrieval: torch.BoolTensor | None = None

    def __post_init__(self) -> None:
        if self.is_retrieval is None:
            self.is_retrieval = torch.zeros(self.sequences.shape[0], dtype=torch.bool)

    @classmethod
    def text_only(cls, sequences: torch.LongTensor) -> CalibrationSet:
        return cls(sequences, torch.ones_like(sequences, dtype=torch.bool))

    @property
    def retrieval_count(self) -> int:
        return int(self.is_retrieval.sum())


def _fact(fmt: str, rng: random.Random, key: str) -> tuple[str, str, str]:
    """(needle sentence, question ending where the answer starts, answer) for one fact of format ``fmt``."""
    if fmt == "room-code":
        code = "".join(rng.choice(_CODE_LETTERS) for _ in range(4))
        return (f" The door of the {key} room opens with the code {code}.",
                f"\nWhich code opens the door of the {key} room? The code is", f" {code}")
    if fmt == "locker-number":
        number = "".join(rng.choice("0123456789") for _ in range(6))
        return (f" At the station, {key} keeps a bag in locker number {number}.",
                f"\nWhich locker at the station holds the bag of {key}? It is locker number", f" {number}")
    if fmt == "flight-gate":
        gate = rng.choice("ABCDEF") + str(rng.randint(10, 59))
        return (f" The flight {key} booked leaves from gate {gate}.",
                f"\nFrom which gate does the flight {key} booked leave? It leaves from gate", f" {gate}")
    if fmt == "pet-name":
        pet = rng.choice(_PET_NAMES)
        return (f" {key} has a small dog called {pet}.", f"\nWhat is the dog of {key} called? The dog is called",
                f" {pet}")
    if fmt == "meeting-day":
        day = rng.choice(_WEEKDAYS)
        return (f" {key} meets the garden club every {day}.",
                f"\nOn which day does {key} meet the garden club? Every", f" {day}")
    if fmt == "phone-extension":
        extension = "".join(rng.choice("0123456789") for _ in range(4))
        return (f" The desk phone of {key} has the extension {extension}.",
                f"\nWhich extension does the desk phone of {key} have? The extension is", f" {extension}")
    if fmt == "word-list":
        # A copy task rather than a question: the prompt repeats the needle's words up to its first listed word and
        # the answer is the rest of the list, so the dense model's own induction copying answers it, whatever the
        # phrasing (the evaluation's passkey and multikey prompts also repeat their needle's words).
        words = rng.sample(_NOUNS, WORD_LIST_LENGTH)
        return (f" {key} wrote down the words {', '.join(words)}.",
                f"\n{key} wrote down the words {words[0]},", " " + ", ".join(words[1:]))
    city = rng.choice(_CITIES)
    return (f" {key} has lived in {city} for many years.", f"\nIn which city does {key} live? {key} lives in",
            f" {city}")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"room-code,home-city"`` -> the formats, checked; a clear error for an unknown or empty list."""
    formats = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in formats if name not in CALIBRATION_FORMATS]
    if unknown or not formats:
        raise DataError(f"unknown calibration format '{unknown[0] if unknown else text}'; choose from "
                        f"{', '.join(CALIBRATION_FORMATS)} (comma-separated)")
    return formats


def check_haystack(haystack: str) -> str:
    """``haystack`` if it names a calibration haystack; a clear error otherwise."""
    if haystack not in CALIBRATION_HAYSTACKS:
        raise DataError(f"unknown calibration haystack '{haystack}'; choose from {', '.join(CALIBRATION_HAYSTACKS)}")
    return haystack


def filler_haystack(tokenizer: PreTrainedTokenizerBase, length: int, start: int) -> torch.LongTensor:
    """``length`` tokens of :data:`CALIBRATION_FILLER` cycled from sentence ``start``, the last one cut to fit.

    Tokenized as one text (not sentence by sentence), as a calibration-split text sequence is.
    """
    first = start % len(CALIBRATION_FILLER)
    cycle = " " + " ".join(CALIBRATION_FILLER[first:] + CALIBRATION_FILLER[:first])
    def encode(text: str) -> list[int]:
        # verbose=False: a long haystack exceeds model_max_length by design; the warning is noise.
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    repeats = length // len(encode(cycle)) + 1
    while len(ids := encode(cycle * repeats)) < length:
        repeats += 1
    return torch.tensor(ids[:length], dtype=torch.long)


# An instruction before the haystack, as long-context retrieval prompts have (the evaluation's tasks open with one),
# in words none of the evaluation's instructions use (consa_cli.retrieval._INTROS).
CALIBRATION_INTRO = ("Below is a long document with a few facts hidden in it. Read it carefully, because a question "
                     "about one of those facts follows at the end.")


def check_max_needles(max_needles: int) -> int:
    """``max_needles`` if every format has that many distinct keys, else a one-line error."""
    keys = min(len(_ROOMS), len(_PEOPLE))
    if not 1 <= max_needles <= keys:
        raise DataError(f"--max-needles must lie between 1 and {keys} (distinct keys per format), got {max_needles}")
    return max_needles


def retrieval_sample(tokenizer: PreTrainedTokenizerBase, text_ids: torch.LongTensor, fmt: str,
                     rng: random.Random, window: int, intro: bool = False,
                     max_needles: int = MAX_NEEDLES) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """One retrieval calibration sample as long as ``text_ids``: text with 1 to ``max_needles`` needles of format
    ``fmt`` (each a different key: one is queried, the rest are distractors), then question and answer; with
    ``intro``, :data:`CALIBRATION_INTRO` first (the text is cut by its length).

    Every needle sits more than ``window`` tokens before the answer, so a sliding-window unit cannot see it and
    only full-attention units can carry the fact to the answer.
    """
    if fmt not in CALIBRATION_FORMATS:
        raise DataError(f"unknown calibration format '{fmt}'; choose from {', '.join(CALIBRATION_FORMATS)}")
    keys = rng.sample(_ROOMS if fmt == "room-code" else _PEOPLE, rng.randint(1, check_max_needles(max_needles)))
    facts = [_fact(fmt, rng, key) for key in keys]
    needle_text, question_text, answer_text = facts[rng.randrange(len(facts))]
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    needles = [encode(needle) for needle, _, _ in facts]
    tail = encode(question_text) + encode(answer_text)
    answer_len = len(encode(answer_text))
    head = encode(CALIBRATION_INTRO) if intro else []
    length = len(text_ids)
    text_budget = length - len(head) - len(tail) - sum(map(len, needles))
    latest = text_budget - window  # a needle ending here still lies beyond the window of the first answer token
    if latest < 1:
        raise DataError(f"--seq-len {length} is too short for retrieval calibration with --window {window}: the "
                        "needles must lie a full window before the question")
    positions = sorted(rng.randrange(1, latest) for _ in needles)  # after the first token (BOS or not)
    text = text_ids[:text_budget].tolist()
    if head:  # after the text's first token (a BOS where the tokenizer puts one), as the evaluation's instruction
        text = text[:1] + head + text[1:]
        positions = [position + len(head) for position in positions]
    ids: list[int] = []
    previous = 0
    for position, needle in zip(positions, needles, strict=True):
        ids += text[previous:position] + needle
        previous = position
    ids += text[previous:] + tail
    loss_mask = torch.zeros(length, dtype=torch.bool)
    loss_mask[length - answer_len - 1 : length - 1] = True  # the logits that predict the answer tokens
    return torch.tensor(ids, dtype=torch.long), loss_mask


def mix_retrieval(text: torch.LongTensor, tokenizer: PreTrainedTokenizerBase, retrieval_fraction: float,
                  window: int, seed: int, formats: str = DEFAULT_CALIBRATION_FORMATS,
                  haystack: str = DEFAULT_CALIBRATION_HAYSTACK,
                  keep: Callable[[torch.LongTensor, torch.BoolTensor], bool] | None = None,
                  intro: bool = False, max_needles: int = MAX_NEEDLES) -> CalibrationSet:
    """Calibration set of ``text`` sequences plus retrieval samples making up ``retrieval_fraction`` of it.

    The retrieval samples take the ``formats`` (comma-separated) in turn; their ``haystack`` is text sequences of
    the same calibration split (``text``, cycled) or :func:`filler_haystack` from a seeded sentence (``filler``).
    Everything depends only on ``seed``; the facts and needle positions do not depend on ``haystack``. ``keep``
    (``sample ids, loss mask -> bool``): only samples it accepts are used, drawn until ``count`` are (at most
    :data:`MAX_DRAWS_PER_SAMPLE` draws per sample needed; see :func:`answered_by`). ``intro``: each sample opens
    with :data:`CALIBRATION_INTRO`. ``max_needles``: the most facts in one sample (each sample
    draws its count uniformly from 1 to it; the default draws as every earlier version did).
    """
    cycle = parse_formats(formats)
    check_haystack(haystack)
    check_max_needles(max_needles)
    if not 0.0 <= retrieval_fraction < 1.0:
        raise DataError(f"--retrieval-fraction must lie in [0, 1), got {retrieval_fraction}")
    base = CalibrationSet.text_only(text)
    count = round(len(text) * retrieval_fraction / (1.0 - retrieval_fraction))
    if count == 0:
        return base
    rng = random.Random(f"consa-calibration/{seed}")
    # Its own generator: the facts drawn from rng stay those of the text haystack, which keeps earlier runs exact.
    filler_rng = random.Random(f"consa-calibration-filler/{seed}")
    length = text.shape[1]
    samples, tries = [], 0
    while len(samples) < count:
        if tries == count * MAX_DRAWS_PER_SAMPLE:
            raise DataError(f"the model answers only {len(samples)} of {tries} retrieval calibration samples, "
                            f"{count} needed: try --calibration-haystack filler, other --retrieval-formats, or "
                            "--retrieval-filter none")
        haystack_ids = (text[(tries * 7 + 3) % len(text)] if haystack == "text"
                        else filler_haystack(tokenizer, length, filler_rng.randrange(len(CALIBRATION_FILLER))))
        sample = retrieval_sample(tokenizer, haystack_ids, cycle[tries % len(cycle)], rng, window, intro,
                                  max_needles)
        tries += 1
        if keep is None or keep(*sample):
            samples.append(sample)
    return CalibrationSet(torch.cat([base.sequences, torch.stack([ids for ids, _ in samples])]),
                          torch.cat([base.loss_mask, torch.stack([mask for _, mask in samples])]),
                          torch.cat([base.is_retrieval, torch.ones(count, dtype=torch.bool)]))


def answered_by(model) -> Callable[[torch.LongTensor, torch.BoolTensor], bool]:
    """``keep`` for :func:`mix_retrieval`: whether ``model`` (the dense model, before the search changes anything)
    answers a sample, i.e. greedy decoding reproduces every answer token. Calibrating on answers the full model
    does not produce rewards whatever happens to produce them, not keeping what the model retrieves: the dense
    SmolLM2-135M answers 17% of the default samples (docs/results.md 1g.7)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def answered(ids: torch.LongTensor, loss_mask: torch.BoolTensor) -> bool:
        scored = loss_mask[:-1]
        first = int(scored.nonzero()[0])  # the answer is the sample's end: only its logits are computed
        logits = model(input_ids=ids.unsqueeze(0).to(device), use_cache=False,
                       logits_to_keep=len(ids) - first).logits[0, :-1]
        return bool(torch.equal(logits.argmax(dim=-1).cpu(), ids[first + 1 :]))

    return answered
