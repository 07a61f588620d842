"""Retrieval calibration samples: exact length, needles beyond the window, loss on the answer tokens only."""

from __future__ import annotations

import hashlib
import random
import re

import pytest
import torch
from conftest import bench_module, tiny_model

from consa_cli.attention import hybrid_attention
from consa_cli.calibration import (
    CALIBRATION_FILLER,
    CALIBRATION_FORMATS,
    DEFAULT_CALIBRATION_FORMATS,
    CalibrationSet,
    filler_haystack,
    mix_retrieval,
    retrieval_sample,
)
from consa_cli.data import DataError
from consa_cli.retrieval import NOISE_FILLER, TASKS
from consa_cli.search import run_search
from consa_cli.settings import SearchSettings

LENGTH, WINDOW = 400, 64


def text_sequences(tokenizer, count=6):
    ids = tokenizer("the quick brown fox jumps over the lazy dog. " * 200, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: count * LENGTH]).view(count, LENGTH)


@pytest.mark.parametrize("haystack", ["text", "filler"])
@pytest.mark.parametrize("fmt", CALIBRATION_FORMATS)
def test_sample_asks_for_a_fact_beyond_the_window_and_scores_only_its_answer(char_tokenizer, fmt, haystack):
    for seed in range(5):
        text = text_sequences(char_tokenizer)[0] if haystack == "text" else filler_haystack(char_tokenizer, LENGTH, seed)
        ids, mask = retrieval_sample(char_tokenizer, text, fmt, random.Random(seed), WINDOW)
        assert ids.shape == mask.shape == (LENGTH,)
        decoded = char_tokenizer.decode(ids)
        answer = char_tokenizer.decode(ids[1:][mask[:-1]])  # the tokens the scored logits predict
        question = decoded[: len(decoded) - len(answer)].rsplit("\n", 1)[1]
        key, needle = {
            "room-code": (question.split("the door of the ")[-1].split(" room")[0], "{} room opens with the code{}."),
            "home-city": (question.split("In which city does ")[-1].split(" live")[0], "{} has lived in{} for"),
            "locker-number": (question.split("holds the bag of ")[-1].split("?")[0], "{} keeps a bag in locker number{}."),
            "flight-gate": (question.split("does the flight ")[-1].split(" booked")[0], "{} booked leaves from gate{}."),
            "pet-name": (question.split("the dog of ")[-1].split(" called")[0], "{} has a small dog called{}."),
            "meeting-day": (question.split("day does ")[-1].split(" meet")[0], "{} meets the garden club every{}."),
            "phone-extension": (question.split("desk phone of ")[-1].split(" have")[0], "{} has the extension{}."),
            # the prompt repeats the needle up to its first word ("... the words lamp,"); the rest is the answer
            "word-list": (question.split(" wrote down")[0],
                          "{} wrote down the words " + question.rsplit(" ", 1)[1] + "{}."),
        }[fmt]
        needle_at = decoded.index(needle.format(key, answer))
        first_answer_token = LENGTH - len(answer)
        assert first_answer_token - needle_at > WINDOW  # out of a sliding window's reach
        assert int(mask.sum()) == len(answer) and answer.strip()


def test_an_intro_opens_the_sample_and_leaves_its_facts_as_they_were(char_tokenizer):
    """intro=True: CALIBRATION_INTRO after the first token, the same facts and answer, every needle still beyond
    the window; mix_retrieval passes it to every retrieval sample and leaves the text rows alone."""
    from consa_cli.calibration import CALIBRATION_INTRO

    length = 900
    ids = char_tokenizer("the quick brown fox jumps over the lazy dog. " * 200, add_special_tokens=False)["input_ids"]
    text = torch.tensor(ids[: 2 * length]).view(2, length)
    for fmt in ("room-code", "locker-number"):
        plain, plain_mask = retrieval_sample(char_tokenizer, text[0], fmt, random.Random(4), WINDOW)
        ids, mask = retrieval_sample(char_tokenizer, text[0], fmt, random.Random(4), WINDOW, intro=True)
        assert ids.shape == mask.shape == (length,)
        assert char_tokenizer.decode(ids[1:]).startswith(CALIBRATION_INTRO)
        assert torch.equal(ids[mask.roll(1)], plain[plain_mask.roll(1)])  # the same answer
        question = char_tokenizer.decode(ids).rsplit("\n", 1)[1]
        assert question == char_tokenizer.decode(plain).rsplit("\n", 1)[1]  # the same fact asked
    mixed = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, seed=0, intro=True)
    assert torch.equal(mixed.sequences[:2], text)
    assert all(char_tokenizer.decode(row[1:]).startswith(CALIBRATION_INTRO) for row in mixed.sequences[2:])
    assert mixed.loss_mask[2:].sum(dim=1).min() > 0 and not mixed.loss_mask[2:, :-8].any()  # answers at the end


def test_mixture_has_the_requested_share_is_seeded_and_keeps_text_rows(char_tokenizer):
    text = text_sequences(char_tokenizer)
    mixed = mix_retrieval(text, char_tokenizer, 0.25, WINDOW, seed=0)
    assert mixed.sequences.shape == (8, LENGTH) and mixed.retrieval_count == 2
    assert torch.equal(mixed.sequences[:6], text) and mixed.loss_mask[:6].all()
    assert mixed.is_retrieval.tolist() == [False] * 6 + [True] * 2  # stated per sequence, not read off the mask
    assert torch.equal(mix_retrieval(text, char_tokenizer, 0.25, WINDOW, seed=0).sequences, mixed.sequences)
    assert not torch.equal(mix_retrieval(text, char_tokenizer, 0.25, WINDOW, seed=1).sequences, mixed.sequences)
    assert mix_retrieval(text, char_tokenizer, 0.0, WINDOW, seed=0).retrieval_count == 0


def test_formats_are_taken_in_turn_and_the_default_is_the_first_two(char_tokenizer):
    """--retrieval-formats: each format in turn; the default reproduces the sets every earlier run used."""
    text = text_sequences(char_tokenizer)
    assert DEFAULT_CALIBRATION_FORMATS == "room-code,home-city"
    legacy = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, seed=0)
    assert torch.equal(mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 0, "room-code,home-city").sequences,
                       legacy.sequences)
    three = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 0, "locker-number,room-code,home-city")
    questions = [char_tokenizer.decode(ids).rsplit("\n", 1)[1] for ids in three.sequences[6:]]
    assert ["locker" in q for q in questions] == [True, False, False, True, False, False]
    assert ["code" in q for q in questions] == [False, True, False, False, True, False]
    for bad in ("passkey", "", "room-code,nope"):
        with pytest.raises(DataError, match="unknown calibration format"):
            mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 0, bad)


def digest(calibration: CalibrationSet) -> str:
    return hashlib.sha256(calibration.sequences.numpy().tobytes() + calibration.loss_mask.numpy().tobytes()).hexdigest()


def test_the_default_text_haystack_reproduces_the_sets_of_earlier_runs(char_tokenizer):
    """--calibration-haystack text (the default): the digests are those of the sets consa made before the option."""
    text = text_sequences(char_tokenizer)
    for formats, expected in (("room-code,home-city", "a13b70178fc02eac"),
                              ("locker-number,room-code,home-city", "58e285f05964cf94")):
        before = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 0, formats)
        assert digest(before)[:16] == expected
        assert digest(mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 0, formats, "text")) == digest(before)


NEEDLE = re.compile(r" (The door of the [a-z]+ room opens with the code [A-Z]{4}\.|[A-Z][a-z]+ [A-Z][a-z]+ has lived "
                    r"in [A-Z][a-z]+ for many years\.|At the station, [A-Z][a-z]+ [A-Z][a-z]+ keeps a bag in locker "
                    r"number [0-9]{6}\.)")


def test_a_filler_haystack_is_the_filler_sentences_cycled_and_none_of_the_evaluations(char_tokenizer):
    """Between its needles and its question a filler sample is the calibration filler cycled from one of its
    sentences, cut at the sample's length; not a sentence of the evaluation's noise haystack appears."""
    assert not set(CALIBRATION_FILLER) & set(NOISE_FILLER)
    cycles = [" " + " ".join(CALIBRATION_FILLER[i:] + CALIBRATION_FILLER[:i]) for i in range(len(CALIBRATION_FILLER))]
    mixed = mix_retrieval(text_sequences(char_tokenizer), char_tokenizer, 0.5, WINDOW, 0,
                          "room-code,home-city,locker-number", "filler")
    starts = set()
    for ids, mask in zip(mixed.sequences[6:], mixed.loss_mask[6:], strict=True):
        decoded = char_tokenizer.decode(ids)
        answer = char_tokenizer.decode(ids[1:][mask[:-1]])
        body, question = decoded[: len(decoded) - len(answer)].rsplit("\n", 1)
        assert question.endswith(("The code is", "lives in", "It is locker number")) and answer.strip()
        assert len(NEEDLE.findall(body)) >= 1
        haystack = NEEDLE.sub("", body)
        start = next(i for i, cycle in enumerate(cycles) if (cycle * 10)[: len(haystack)] == haystack)
        starts.add(start)
        assert not any(sentence in decoded for sentence in NOISE_FILLER)
    assert len(starts) > 1  # seeded starting sentences, not one haystack for all


def test_the_haystack_changes_the_sequences_but_not_the_facts_or_the_scored_positions(char_tokenizer):
    text = text_sequences(char_tokenizer)
    prose = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 3, "room-code,home-city,locker-number", "text")
    filler = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 3, "room-code,home-city,locker-number", "filler")
    again = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 3, "room-code,home-city,locker-number", "filler")
    assert torch.equal(again.sequences, filler.sequences) and torch.equal(again.loss_mask, filler.loss_mask)
    other_seed = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 4, "room-code,home-city,locker-number", "filler")
    assert not torch.equal(other_seed.sequences[6:], filler.sequences[6:])
    assert torch.equal(filler.sequences[:6], text)  # the natural-text rows are the text's either way
    assert torch.equal(filler.loss_mask, prose.loss_mask) and torch.equal(filler.is_retrieval, prose.is_retrieval)
    for a, b in zip(prose.sequences[6:], filler.sequences[6:], strict=True):
        assert not torch.equal(a, b)
        decoded_a, decoded_b = char_tokenizer.decode(a), char_tokenizer.decode(b)
        assert decoded_a.rsplit("\n", 1)[1] == decoded_b.rsplit("\n", 1)[1]  # same question, same answer
        needles_a, needles_b = list(NEEDLE.finditer(decoded_a)), list(NEEDLE.finditer(decoded_b))
        assert [(m.group(), m.start()) for m in needles_a] == [(m.group(), m.start()) for m in needles_b]  # same places
    with pytest.raises(DataError, match="unknown calibration haystack 'noise'; choose from text, filler"):
        mix_retrieval(text, char_tokenizer, 0.5, WINDOW, 3, "room-code", "noise")


def test_calibration_formats_differ_from_the_evaluation_tasks():
    assert not set(CALIBRATION_FORMATS) & set(TASKS)


def test_max_needles_sets_how_many_facts_of_distinct_keys_a_sample_holds(char_tokenizer):
    """max_needles: 1 to N facts per sample, each of another key, the asked one among them; the default (3) is
    the count every earlier set used (the digests above); outside 1-16 a one-line error."""
    length = 1200
    ids = char_tokenizer("the quick brown fox jumps over the lazy dog. " * 300, add_special_tokens=False)["input_ids"]
    text = torch.tensor(ids[:length])
    counts = {}
    for max_needles in (1, 3, 8):
        counts[max_needles] = []
        for seed in range(24):
            fmt = ("room-code", "home-city")[seed % 2]
            sample, _ = retrieval_sample(char_tokenizer, text, fmt, random.Random(seed), WINDOW, max_needles=max_needles)
            decoded = char_tokenizer.decode(sample)
            needles = NEEDLE.findall(decoded)
            keys = [re.sub(r"^The door of the | room opens.*| has lived.*", "", needle) for needle in needles]
            asked = re.search(r"door of the ([a-z]+) room\?|does ([A-Z][a-z]+ [A-Z][a-z]+) live", decoded)
            assert len(set(keys)) == len(keys) and (asked.group(1) or asked.group(2)) in keys
            counts[max_needles].append(len(needles))
    assert set(counts[1]) == {1} and set(counts[3]) == {1, 2, 3}
    assert max(counts[8]) > 3 and max(counts[8]) <= 8 and min(counts[8]) >= 1
    mixed = mix_retrieval(text_sequences(char_tokenizer), char_tokenizer, 0.5, WINDOW, 0, max_needles=1)
    assert all(len(NEEDLE.findall(char_tokenizer.decode(row))) == 1 for row in mixed.sequences[6:])
    for bad in (0, 17):
        with pytest.raises(DataError, match="--max-needles must lie between 1 and 16"):
            mix_retrieval(text_sequences(char_tokenizer), char_tokenizer, 0.5, WINDOW, 0, max_needles=bad)


def test_too_short_for_a_needle_beyond_the_window_is_a_data_error(char_tokenizer):
    with pytest.raises(DataError, match="too short for retrieval calibration"):
        retrieval_sample(char_tokenizer, text_sequences(char_tokenizer)[0][:150], "home-city", random.Random(0),
                         WINDOW)


def test_search_on_a_mixture_hits_the_exact_count_and_differs_from_text_only(char_tokenizer):
    text = text_sequences(char_tokenizer) % 96  # the tiny model's vocabulary
    mixed = mix_retrieval(text_sequences(char_tokenizer), char_tokenizer, 0.5, WINDOW, seed=0)
    mixed = CalibrationSet(mixed.sequences % 96, mixed.loss_mask, mixed.is_retrieval)
    settings = SearchSettings(window=WINDOW, seq_len=LENGTH, steps=6, sparsity=0.5, target_warmup_steps=2,
                              dtype="float32", granularity="kv-head")
    with_retrieval = run_search(settings, tiny_model("llama"), mixed, sink_tokens=2)
    text_only = run_search(settings, tiny_model("llama"), text, sink_tokens=2)
    assert with_retrieval.allocation.num_full_units == with_retrieval.allocation.num_units // 2
    assert not torch.equal(with_retrieval.allocation.scores, text_only.allocation.scores)


def test_ceiling_calibration_scores_the_evaluation_answers_and_never_the_evaluated_prompts(char_tokenizer):
    """bench/retrieval_ceiling.py: the evaluation tasks' prompts (another seed than consa eval's), their answers as
    the only scored logits, rows of the text's length, seeded; seed 0 (consa eval's prompts) is refused."""
    ceiling = bench_module("retrieval_ceiling")
    length = 1200  # characters: room for multikey's needles in a character-level prompt
    ids = char_tokenizer("the quick brown fox jumps over the lazy dog. " * 120, add_special_tokens=False)["input_ids"]
    text = torch.tensor(ids[: 4 * length]).view(4, length)
    calibration = ceiling.evaluation_format_calibration(text, char_tokenizer, ["passkey", "multikey"], 0.5, "noise",
                                                        seed=7)
    assert calibration.sequences.shape == (8, length) and calibration.is_retrieval.tolist() == [False] * 4 + [True] * 4
    assert torch.equal(calibration.sequences[:4], text)
    for row, mask in zip(calibration.sequences[4:], calibration.loss_mask[4:], strict=True):
        answer = char_tokenizer.decode(row[1:][mask[:-1]])
        prompt = char_tokenizer.decode(row[: int(mask.nonzero()[0]) + 1])
        assert answer.strip().isdigit()  # a pass key or a multikey value, as consa eval asks for
        assert answer.strip() in prompt  # its needle lies in the prompt
        assert len(prompt) == length - ceiling.ANSWER_ROOM
    again = ceiling.evaluation_format_calibration(text, char_tokenizer, ["passkey", "multikey"], 0.5, "noise", seed=7)
    other = ceiling.evaluation_format_calibration(text, char_tokenizer, ["passkey", "multikey"], 0.5, "noise", seed=8)
    assert torch.equal(again.sequences, calibration.sequences)  # seeded
    assert not torch.equal(other.sequences[4:], calibration.sequences[4:])  # another seed, other prompts
    with pytest.raises(DataError, match="consa eval's retrieval seed"):
        ceiling.evaluation_format_calibration(text, char_tokenizer, ["passkey"], 0.5, "noise", seed=0)


def test_greedy_ceiling_picks_the_unit_that_lowers_the_answer_nll_most_each_round(char_tokenizer):
    """bench/retrieval_greedy.py on a tiny model: each pick is the best single addition to the picks before it
    (checked by scoring every candidate again here), and it keeps exactly the target."""
    from consa_cli.attention import hybrid_attention, set_fa_weights
    from consa_cli.retrieval import haystack_filler, make_samples

    greedy = bench_module("retrieval_greedy")
    model = tiny_model("llama")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    samples = make_samples("passkey", char_tokenizer, [300, 360], [0.2, 0.8], 1, seed=5,
                           filler=list(haystack_filler("noise")))
    batches = greedy.answer_batches(samples, torch.device("cpu"))
    assert [b[0].shape[1] - b[2] for b in batches] == [300, 360]  # one batch per prompt length
    start = torch.zeros(layers, heads, dtype=torch.bool)
    with hybrid_attention(model, start, 8, 0):
        mask, picks = greedy.greedy_mask(model, batches, 2, layers, heads)
        assert int(mask.sum()) == 2 and {(lay, hd) for lay, hd, _ in picks} == set(map(tuple, mask.nonzero().tolist()))
        chosen = torch.zeros_like(start)
        for layer, head, value in picks:
            scores = {}
            for unit in [(lay, hd) for lay in range(layers) for hd in range(heads) if not chosen[lay, hd]]:
                trial = chosen.clone()
                trial[unit] = True
                set_fa_weights(model, trial)
                scores[unit] = greedy.answer_nll(model, batches)
            assert (layer, head) == min(scores, key=scores.get) and value == pytest.approx(scores[(layer, head)])
            chosen[layer, head] = True


def test_calibration_answers_bench_scores_exactly_the_searchs_lm_loss(monkeypatch):
    """bench/calibration_answers.py's per-sample answer NLL is the search's own ``lm`` loss on that sample (same
    positions, same targets), and its exact match is greedy decoding of the answer tokens."""
    from consa_cli.losses import search_loss

    module = bench_module("calibration_answers", monkeypatch)
    model = tiny_model("qwen3")
    sequences = torch.randint(2, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.zeros(3, 40, dtype=torch.bool)
    loss_mask[0, 30:33], loss_mask[1, 36:39], loss_mask[2, 20:21] = True, True, True
    nlls, exact = module.answer_scores(model, sequences, loss_mask)
    with torch.no_grad():
        for i in range(3):
            logits = model(input_ids=sequences[i : i + 1]).logits
            expected = search_loss(logits, sequences[i : i + 1], loss_mask[i : i + 1], "lm")
            assert nlls[i] == pytest.approx(float(expected), rel=1e-5)
            scored = loss_mask[i, :-1]
            greedy = logits[0, :-1][scored].argmax(dim=-1)
            assert exact[i] == bool(torch.equal(greedy, sequences[i, 1:][scored]))
    # A sample whose answer is what the model predicts counts as answered.
    logits = model(input_ids=sequences[:1]).logits[0]
    answered = sequences[:1].clone()
    answered[0, 31:34] = logits[30:33].argmax(dim=-1)
    logits = model(input_ids=answered).logits[0]
    answered[0, 32:34] = logits[31:33].argmax(dim=-1)
    logits = model(input_ids=answered).logits[0]
    answered[0, 33] = logits[32].argmax()
    assert module.answer_scores(model, answered, loss_mask[:1])[1] == [True]


def test_calibration_answers_finds_each_samples_needle_distance_and_buckets_exact_match(char_tokenizer, monkeypatch):
    """The needle distance of a real retrieval sample is the distance from its needle's answer text to the answer
    (more than the window, as retrieval_sample guarantees); exact match is bucketed by it."""
    module = bench_module("calibration_answers", monkeypatch)
    calibration = mix_retrieval(text_sequences(char_tokenizer), char_tokenizer, 0.5, WINDOW, seed=3)
    for ids, mask in zip(calibration.sequences[calibration.is_retrieval],
                         calibration.loss_mask[calibration.is_retrieval], strict=True):
        distance = module.needle_distance(ids, mask)
        start = int(mask[:-1].nonzero()[0]) + 1
        answer = ids[start : int(mask[:-1].nonzero()[-1]) + 2]
        assert distance is not None and distance > WINDOW
        assert torch.equal(ids[start - distance : start - distance + len(answer)], answer)
    ids = torch.tensor([5, 7, 8, 1, 1, 1, 9, 7, 8])
    mask = torch.zeros(9, dtype=torch.bool)
    mask[6:8] = True  # logits 6, 7 predict the answer tokens 7, 8 at positions 7, 8
    assert module.needle_distance(ids, mask) == 6
    short_mask = torch.zeros(7, dtype=torch.bool)
    short_mask[4:6] = True
    assert module.needle_distance(torch.tensor([5, 6, 1, 1, 9, 7, 8]), short_mask) is None  # 7, 8 never earlier
    buckets = module.by_distance([10, 256, 700, None, 20], [True, False, True, True, False], [0, 256, 1024])
    assert buckets == {"0-256": [0.5, 2], "256-1024": [0.5, 2], "not found": [1.0, 1]}


def test_calibration_answers_correlates_answers_with_evaluation_retrieval(tmp_path, monkeypatch):
    """The selection probe: Spearman's rank correlation (ties at mean ranks) and each label's retrieval read from
    consa eval JSON by row label or path, with a clear stop for a label it lacks."""
    import json

    module = bench_module("calibration_answers", monkeypatch)
    assert module.ranks([5.0, 1.0, 5.0, 3.0]) == [3.5, 1.0, 3.5, 2.0]
    assert module.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert module.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert module.spearman([1, 1, 2], [0.2, 0.1, 0.9]) == pytest.approx(0.8660254, rel=1e-6)
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"rows": [
        {"label": "dense", "path": None, "retrieval": {"overall": 0.8}},
        {"label": "seed-0", "path": "arm-a/seed-0", "retrieval": {"overall": 0.25}},
        {"label": "vote", "path": "vote.safetensors", "retrieval": {"overall": 0.5}},
        {"label": "no-retrieval", "path": "x", "retrieval": None}]}))
    assert module.evaluation_retrieval([evaluation], ["arm-a/seed-0", "vote", "dense"]) == [0.25, 0.5, 0.8]
    with pytest.raises(SystemExit, match="no evaluation row for no-retrieval"):
        module.evaluation_retrieval([evaluation], ["no-retrieval"])


def test_calibration_answers_main_scores_every_mask_and_correlates_with_the_evaluation(char_tokenizer, tmp_path,
                                                                                   monkeypatch):
    """The script end to end on a tiny model: a row per mask after dense, each with its evaluation retrieval, the
    needle distance of every sample, and the rank correlation of the rows' answer NLLs with that retrieval."""
    import json
    import sys

    from consa_cli.allocation import Allocation

    module = bench_module("calibration_answers", monkeypatch)
    model = tiny_model("qwen3")
    monkeypatch.setattr(module, "load_model_and_tokenizer", lambda *args, **kwargs: (model, char_tokenizer))
    monkeypatch.setattr(module, "load_token_sequences", lambda *args: text_sequences(char_tokenizer))
    paths = []
    for unit in range(3):
        mask = torch.zeros(model.config.num_hidden_layers, model.config.num_key_value_heads, dtype=torch.bool)
        mask.view(-1)[unit] = True
        paths.append(Allocation(mask, "kv-head", WINDOW, 0, model="tiny").save(tmp_path / f"m{unit}.safetensors"))
    evaluation, output = tmp_path / "eval.json", tmp_path / "answers.json"
    evaluation.write_text(json.dumps({"rows": [{"label": f"m{unit}", "path": None, "retrieval": {"overall": score}}
                                               for unit, score in enumerate([0.1, 0.5, 0.3])]}))
    monkeypatch.setattr(sys, "argv", ["calibration_answers.py", *map(str, paths), "--samples", "4", "--evaluation",
                                      str(evaluation), "--labels", "m0", "m1", "m2", "--json", str(output)])
    module.main()
    result = json.loads(output.read_text())
    rows = result["rows"]
    assert [row["label"] for row in rows] == ["dense", "m0", "m1", "m2"]
    assert [row["evaluation_retrieval"] for row in rows[1:]] == [0.1, 0.5, 0.3]
    assert result["samples"] == 4 and len(result["needle_distances"]) == 4
    assert all(distance > WINDOW for distance in result["needle_distances"])
    expected = module.spearman([-row["answer_nll"] for row in rows[1:]], [0.1, 0.5, 0.3])
    assert result["spearman_with_evaluation"]["answer_nll"] == pytest.approx(expected)


def test_calibration_answers_runs_a_healed_allocation_on_its_own_weights(char_tokenizer, tmp_path, monkeypatch):
    """An allocation recorded as healed names its own weights: its row is the hybrid on those, the same mask
    unhealed runs on the dense model's, and --max-needles reaches the samples."""
    import json
    import sys

    from consa_cli.allocation import Allocation

    module = bench_module("calibration_answers", monkeypatch)
    models = {"tiny": tiny_model("qwen3", seed=0), "tiny-healed": tiny_model("qwen3", seed=1)}
    monkeypatch.setattr(module, "load_model_and_tokenizer",
                        lambda name, **kwargs: (models[name], char_tokenizer))
    monkeypatch.setattr(module, "load_token_sequences", lambda *args: text_sequences(char_tokenizer))
    mask = torch.zeros(models["tiny"].config.num_hidden_layers, models["tiny"].config.num_key_value_heads,
                       dtype=torch.bool)
    mask[0] = True
    plain = Allocation(mask, "kv-head", WINDOW, 0, model="tiny").save(tmp_path / "plain.safetensors")
    healed = Allocation(mask, "kv-head", WINDOW, 0, model="tiny-healed",
                        metadata={"healed": {"source_fingerprint": "x"}}).save(tmp_path / "healed.safetensors")
    output = tmp_path / "answers.json"
    monkeypatch.setattr(sys, "argv", ["calibration_answers.py", str(plain), str(healed), "--samples", "4",
                                      "--max-needles", "1", "--json", str(output)])
    module.main()
    rows = {row["label"]: row for row in json.loads(output.read_text())["rows"]}
    calibration = mix_retrieval(text_sequences(char_tokenizer)[:4], char_tokenizer, 0.5, WINDOW, 0, max_needles=1)
    sequences, loss_mask = calibration.sequences[4:], calibration.loss_mask[4:]
    for label, model in (("plain", models["tiny"]), ("healed", models["tiny-healed"])):
        with hybrid_attention(model, mask, WINDOW, 0):
            expected, _ = module.answer_scores(model, sequences, loss_mask)
        assert rows[label]["answer_nll_per_sample"] == pytest.approx(expected)
    assert rows["plain"]["answer_nll_per_sample"] != pytest.approx(rows["healed"]["answer_nll_per_sample"])


def test_a_retrieval_filter_keeps_only_accepted_samples_and_fails_clearly_when_too_few_pass(char_tokenizer):
    """``keep``: samples are drawn until ``count`` pass it (the rest of the set unchanged); without it the set is
    the unfiltered one; when almost none pass, a one-line error names the remedies."""
    text = text_sequences(char_tokenizer)
    plain = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, seed=0)
    seen = []

    def every_other(ids, loss_mask):
        seen.append(ids)
        return len(seen) % 2 == 0

    kept = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, seed=0, keep=every_other)
    count = plain.retrieval_count
    assert kept.retrieval_count == count and len(seen) == 2 * count
    assert torch.equal(kept.sequences[~kept.is_retrieval], plain.sequences[~plain.is_retrieval])
    assert all(torch.equal(row, seen[2 * i + 1]) for i, row in enumerate(kept.sequences[kept.is_retrieval]))
    assert torch.equal(kept.sequences[kept.is_retrieval][0], plain.sequences[plain.is_retrieval][1])
    with pytest.raises(DataError, match=rf"answers only 0 of {20 * count} retrieval calibration samples, {count} "
                                        r"needed: try --calibration-haystack filler"):
        mix_retrieval(text, char_tokenizer, 0.5, WINDOW, seed=0, keep=lambda ids, mask: False)


def test_answered_by_is_greedy_decoding_of_the_answer_tokens(char_tokenizer):
    """The dense model's filter: True exactly when its argmax at every answer position is the answer token."""
    from consa_cli.calibration import answered_by

    model = tiny_model("llama")
    text = text_sequences(char_tokenizer) % 96
    samples = mix_retrieval(text, char_tokenizer, 0.5, WINDOW, seed=0)
    answered = answered_by(model)
    for ids, loss_mask in zip(samples.sequences[samples.is_retrieval] % 96, samples.loss_mask[samples.is_retrieval],
                              strict=True):
        with torch.no_grad():
            greedy = model(input_ids=ids.unsqueeze(0)).logits[0, :-1][loss_mask[:-1]].argmax(dim=-1)
        assert answered(ids, loss_mask) == bool(torch.equal(greedy, ids[1:][loss_mask[:-1]]))
        # The same sample with its answer replaced by the model's own greedy answer is answered.
        made = ids.clone()
        for position in loss_mask[:-1].nonzero().flatten().tolist():
            with torch.no_grad():
                made[position + 1] = model(input_ids=made[: position + 1].unsqueeze(0)).logits[0, -1].argmax()
        assert answered(made, loss_mask)


def test_head_effects_toggle_each_head_alone_and_rank_the_signals_against_the_evaluation(char_tokenizer, monkeypatch):
    """bench/head_effects.py on a tiny model: every one-head toggle of the base is measured once (add for a sliding
    head, remove for a full one) as its NLL minus the base's, per signal (checked by measuring one variant here);
    calibration samples are scored on exactly their answer tokens; a signal ranked like the reference correlates 1."""
    from consa_cli.attention import hybrid_attention, set_fa_weights
    from consa_cli.retrieval import haystack_filler, make_samples

    effects_module = bench_module("head_effects", monkeypatch)
    greedy = bench_module("retrieval_greedy", monkeypatch)
    model = tiny_model("llama")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    cpu = torch.device("cpu")
    prompts = make_samples("passkey", char_tokenizer, [300], [0.5], 2, seed=5, filler=list(haystack_filler("noise")))
    mixed = mix_retrieval(text_sequences(char_tokenizer, count=2), char_tokenizer, 0.5, WINDOW, 0, "room-code")
    mixed = CalibrationSet(mixed.sequences % 96, mixed.loss_mask, mixed.is_retrieval)  # the tiny vocabulary
    ids, answers, width = effects_module.calibration_batch(mixed.sequences[2:], mixed.loss_mask[2:], cpu)
    for row in range(2):  # right-aligned answers: the tokens the sample's scored logits predict
        scored = ids[row, 1:][mixed.loss_mask[2 + row, :-1]]
        assert answers[row][answers[row] != -100].tolist() == scored.tolist() and width >= len(scored)
    batches = {"evaluation": greedy.answer_batches(prompts, cpu), "room-code": [(ids, answers, width)]}
    base = torch.zeros(layers, heads, dtype=torch.bool)
    base[0, 1] = True
    with hybrid_attention(model, base, 8, 0):
        result = effects_module.head_effects(model, base, batches)
        toggled = base.clone()
        toggled[1, 0] = True
        set_fa_weights(model, toggled)
        expected = greedy.answer_nll(model, batches["room-code"]) - result["base"]["room-code"]
        added = effects_module.head_effects(model, base, batches, toggles="add")["heads"]
    assert [(r["layer"], r["head"]) for r in added] == [(r["layer"], r["head"]) for r in result["heads"]
                                                        if not r["in_base"]]  # every sliding head, only those
    assert next(r for r in added if (r["layer"], r["head"]) == (1, 0))["room-code"] == pytest.approx(expected)
    assert len(result["heads"]) == layers * heads
    assert [(r["layer"], r["head"], r["in_base"]) for r in result["heads"]][:2] == [(0, 0, False), (0, 1, True)]
    row = next(r for r in result["heads"] if (r["layer"], r["head"]) == (1, 0))
    assert row["room-code"] == pytest.approx(expected)
    effects = [{"layer": i, "head": 0, "in_base": i >= 6, "evaluation": float(i % 6), "same": float(i % 6) * 2,
                "reversed": -float(i % 6)} for i in range(9)]
    summary = effects_module.compare(effects, "evaluation", ["same", "reversed"], top=2, shuffles=200)
    assert summary["same"]["add_spearman"] == 1.0 and summary["same"]["top2_overlap"] == 2
    assert summary["reversed"]["add_spearman"] == -1.0 and summary["reversed"]["top2_overlap"] == 0
    assert summary["same"]["add_p"] < 0.05 < summary["reversed"]["add_p"]
    assert effects_module.split_signal("room-code,home-city", "text") == ("room-code,home-city", "text", set())
    assert effects_module.split_signal("word-list@filler+intro", "text") == ("word-list", "filler", {"intro"})
    assert effects_module.split_signal("word-list+answered+intro", "filler") == ("word-list", "filler",
                                                                                  {"intro", "answered"})
    with pytest.raises(ValueError, match="unknown signal option '\\+fast'"):
        effects_module.split_signal("word-list+fast", "text")


def test_head_effects_text_signals_score_every_token_or_only_the_long_context_ones(char_tokenizer, monkeypatch):
    """bench/head_effects.py's text signals: 'text' scores every next token of the calibration text (its NLL is the
    model's mean token NLL); 'key-tokens:GAIN' keeps exactly the tokens the dense model predicts GAIN nats better
    than the all-sliding hybrid while predicting them (dense NLL <= KEY_TOKEN_MAX_NLL); a one-head effect on a
    text signal is that head's change of the signal's NLL; a gain no token reaches selects none."""
    from consa_cli.attention import hybrid_attention, set_fa_weights

    effects_module = bench_module("head_effects", monkeypatch)
    dense = torch.tensor([[0.5, 3.0, 0.1, 1.9]])
    short = torch.tensor([[3.0, 6.0, 1.0, 4.0]])
    # gains 2.5 (kept), 3.0 (but a dense NLL of 3 > 2), 0.9, 2.1 (kept)
    assert effects_module.key_token_mask(dense, short, gain=2.0, max_nll=2.0).tolist() == [[True, False, False, True]]

    model = tiny_model("llama")
    text = text_sequences(char_tokenizer, count=3)[:, :96] % 96
    with torch.no_grad():
        logits = model(input_ids=text).logits[:, :-1].float()
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), text[:, 1:], reduction="none")
    torch.testing.assert_close(effects_module.token_nll(model, text, rows=2), per_token, rtol=1e-5, atol=1e-5)
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    with hybrid_attention(model, torch.zeros(layers, heads, dtype=torch.bool), 8, 0):
        short = effects_module.token_nll(model, text)
    gain = float((short - per_token).quantile(0.8))  # some tokens, not all
    # A random model predicts nothing below 2 nats; the dense-NLL bound at the median keeps about half.
    monkeypatch.setattr(effects_module, "KEY_TOKEN_MAX_NLL", float(per_token.median()))
    masks = effects_module.text_signal_masks(model, text, ["text", f"key-tokens:{gain}", "key-tokens:1000"], 8, 0)
    assert masks["text"].all() and masks["text"].shape == per_token.shape
    expected = (short - per_token >= gain) & (per_token <= per_token.median())
    assert torch.equal(masks[f"key-tokens:{gain}"], expected) and 0 < int(expected.sum()) < expected.numel() // 5
    assert not masks["key-tokens:1000"].any()
    values = effects_module.text_nll(model, text, {"text": masks["text"], "key": expected})
    assert values["text"] == pytest.approx(float(per_token.mean()), rel=1e-5)
    assert values["key"] == pytest.approx(float(per_token[expected].mean()), rel=1e-5)

    base = torch.zeros(layers, heads, dtype=torch.bool)
    keyed = {"text": masks["text"], "key": expected}
    with hybrid_attention(model, base, 8, 0):
        rows = effects_module.head_effects(model, base, {}, toggles="add", text=(text, keyed))["heads"]
        reference = effects_module.text_nll(model, text, keyed)
        toggled = base.clone()
        toggled[1, 0] = True
        set_fa_weights(model, toggled)
        after = effects_module.text_nll(model, text, keyed)
    row = next(r for r in rows if (r["layer"], r["head"]) == (1, 0))
    assert len(rows) == layers * heads
    assert row["key"] == pytest.approx(after["key"] - reference["key"]) and row["key"] != 0


def test_swap_refine_keeps_the_count_and_applies_the_best_measured_swap_until_none_helps(monkeypatch):
    """bench/swap_refine.py's greedy swaps on a known objective: every swap trades one full unit for one sliding
    unit (the count never changes), the swap applied is the best of the measured candidate pairs, the one-unit
    toggles are measured on the current mask (a clash between two units shows after the first swap), and the
    search stops once no candidate pair lowers the objective."""
    refine = bench_module("swap_refine", monkeypatch)
    value = torch.tensor([[0.0, -1.0, 0.5], [-0.2, 0.3, -0.6]])  # a full unit's contribution to the objective
    calls = []

    def measure(mask):
        calls.append(mask.clone())
        clash = 2.0 if bool(mask[0, 1]) and bool(mask[1, 2]) else 0.0
        return {"objective": float(value[mask].sum()) + clash}

    base = torch.tensor([[True, False, True], [False, True, False]])  # objective 0.8
    seen = []
    mask, history = refine.swap_refine(measure, base, swaps=5, candidates=2,
                                       on_swap=lambda record, current: seen.append(current.clone()))
    assert int(mask.sum()) == 3 and {int(m.sum()) for m in calls} == {2, 3, 4}  # toggles 2 / 4, swaps 3
    # Swap 1: the best additions (0,1) -1 and (1,2) -0.6, the cheapest removals (0,2) -0.5 and (1,1) -0.3:
    # +(0,1) -(0,2) gives -0.7. Swap 2: (1,2) now clashes with (0,1) (+1.4), so +(1,0) -(1,1) gives -1.2.
    # Swap 3: every candidate pair is worse; stop.
    assert [(r["added"], r["removed"]) for r in history[1:3]] == [([0, 1], [0, 2]), ([1, 0], [1, 1])]
    assert [r["objective"] for r in history][:3] == pytest.approx([0.8, -0.7, -1.2])
    assert history[3]["swap"] == 3 and "stopped" in history[3] and history[3]["objective"] > -1.2
    assert len(history) == 4 and len(seen) == 2 and torch.equal(seen[-1], mask)
    assert mask.tolist() == [[True, True, False], [True, False, False]]
    assert base.tolist() == [[True, False, True], [False, True, False]]  # the caller's mask is left alone
    # 3 rounds x (6 toggles + 4 pairs) + the starting point
    assert len(calls) == 1 + 3 * (6 + 4)


def test_swap_refine_objective_is_the_answers_plus_weighted_text_nll(char_tokenizer, monkeypatch):
    """bench/swap_refine.py's objective on a tiny hybrid: the answers' NLL (as head_effects scores them) plus
    text_weight x the text's mean next-token NLL, for the mask it is given."""
    from consa_cli.attention import hybrid_attention

    refine = bench_module("swap_refine", monkeypatch)
    effects = bench_module("head_effects", monkeypatch)
    greedy = bench_module("retrieval_greedy", monkeypatch)
    model = tiny_model("llama")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    mixed = mix_retrieval(text_sequences(char_tokenizer, count=2), char_tokenizer, 0.5, WINDOW, 0, "room-code")
    mixed = CalibrationSet(mixed.sequences % 96, mixed.loss_mask, mixed.is_retrieval)
    answers = [effects.calibration_batch(mixed.sequences[2:], mixed.loss_mask[2:], torch.device("cpu"))]
    text = mixed.sequences[:2]
    mask = torch.zeros(layers, heads, dtype=torch.bool)
    mask[0, 0] = True
    with hybrid_attention(model, mask, 8, 0):
        values = refine.calibration_objective(model, answers, text, 0.5)(mask)
        assert values["answer_nll"] == pytest.approx(greedy.answer_nll(model, answers))
        assert values["text_nll"] == pytest.approx(float(effects.token_nll(model, text).mean()))
        assert values["objective"] == pytest.approx(values["answer_nll"] + 0.5 * values["text_nll"])
        other = mask.clone()
        other[1, 0] = True
        assert refine.calibration_objective(model, answers, text, 0.5)(other)["objective"] != values["objective"]
