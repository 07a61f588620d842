"""Retrieval prompts (exact lengths, needle depths, determinism), exact-match scoring and the summary."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import bench_module, tiny_model

from consa_cli import retrieval
from consa_cli.attention import hybrid_attention
from consa_cli.data import DataError
from consa_cli.retrieval import (
    TASKS,
    evaluate_retrieval,
    make_samples,
    paired_retrieval,
    score_samples,
    sign_test,
)

# A fixed haystack without digits, so any number in a prompt comes from a needle.
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again."]
# Each needle as it appears in a prompt (pieces are joined with a leading space).
NEEDLES = {
    "passkey": r" The pass key is (\d+)\. Remember it\. \1 is the pass key\.",
    "multikey": r" The special magic number for ([a-z]+) is (\d+)\.",
    "variable-tracking": r" VAR ([A-Z]+) = (\d+|VAR [A-Z]+) \.",
}
DEPTHS = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]


def text_of(tokenizer, sample) -> str:
    text = tokenizer.decode(sample.prompt_ids)
    assert len(text) == sample.prompt_ids.numel()  # one token per character: text positions = token positions
    return text


def queried_needle(task: str, text: str, needles: list[re.Match]) -> re.Match:
    """The needle the question asks about (for variable tracking: the start of the chain)."""
    if task == "multikey":
        key = re.search(r"magic number for ([a-z]+)\?", text).group(1)
        return next(m for m in needles if m.group(1) == key)
    if task == "variable-tracking":
        return next(m for m in needles if m.group(2).isdigit())
    return needles[0]


class Oracle(torch.nn.Module):
    """Predicts the true next token of the teacher-forced input, i.e. knows every answer.

    ``knows(row)`` picks the sequences it answers (it predicts token 0 for the others), and ``miss_last``
    makes it wrong on the final input position only.
    """

    def __init__(self, knows=lambda row: True, miss_last: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # score_samples reads the device from a parameter
        self.knows, self.miss_last = knows, miss_last

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        targets = torch.roll(input_ids, -1, dims=1)
        if self.miss_last:
            targets[:, -2] = 0
        for row in range(input_ids.shape[0]):
            if not self.knows(input_ids[row]):
                targets[row] = 0
        logits = F.one_hot(targets, 96).float()
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class Zero(torch.nn.Module):
    """Always predicts token 0; returns every position's logits (ignores logits_to_keep)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=F.one_hot(torch.zeros_like(input_ids), 96).float())


@pytest.mark.parametrize("task", TASKS)
def test_prompts_have_exactly_the_requested_token_length(char_tokenizer, task):
    samples = make_samples(task, char_tokenizer, [600, 777, 1000], [0.0, 0.5, 1.0], 2, seed=0, filler=FILLER)
    cells = [(n, d) for n in (600, 777, 1000) for d in (0.0, 0.5, 1.0)]
    assert [(s.length, s.depth) for s in samples] == [cell for cell in cells for _ in range(2)]
    for sample in samples:
        assert sample.task == task
        assert sample.prompt_ids.dtype == torch.long and sample.prompt_ids.shape == (sample.length,)
        answer = char_tokenizer(sample.answer_text, add_special_tokens=False)["input_ids"]
        assert sample.answer_ids.tolist() == answer
        assert re.fullmatch(r" \d{5,7}", sample.answer_text)


def test_prompts_without_the_instruction_keep_their_length_and_puzzle(char_tokenizer):
    """intro=False (head_effects' diagnostic): no opening instruction, the same length, answer and question."""
    from consa_cli.retrieval import _INTROS

    for task in TASKS:
        plain = make_samples(task, char_tokenizer, [600], [0.5], 2, seed=0, filler=FILLER)
        bare = make_samples(task, char_tokenizer, [600], [0.5], 2, seed=0, filler=FILLER, intro=False)
        for with_intro, without in zip(plain, bare, strict=True):
            text = char_tokenizer.decode(without.prompt_ids)
            assert _INTROS[task] in char_tokenizer.decode(with_intro.prompt_ids) and _INTROS[task] not in text
            assert without.prompt_ids.shape == (600,) and without.answer_text == with_intro.answer_text
            assert text.rsplit("\n", 1)[1] == char_tokenizer.decode(with_intro.prompt_ids).rsplit("\n", 1)[1]


@pytest.mark.parametrize("task", TASKS)
def test_needle_sits_at_the_requested_depth(char_tokenizer, task):
    samples = make_samples(task, char_tokenizer, [1500], DEPTHS, 1, seed=1, filler=FILLER)
    texts = [text_of(char_tokenizer, s) for s in samples]
    pattern = re.compile(NEEDLES[task])
    # Depth 0 puts the queried needle first, so its position is where the haystack starts.
    start = queried_needle(task, texts[0], list(pattern.finditer(texts[0]))).start()
    assert len({text[:start] for text in texts}) == 1  # the same instruction precedes every haystack
    for sample, text in zip(samples, texts, strict=True):
        needles = list(pattern.finditer(text))
        expected = {"passkey": 1, "multikey": retrieval.MULTIKEY_DISTRACTORS + 1,
                    "variable-tracking": retrieval.VARIABLE_HOPS + 1}[task]
        assert len(needles) == expected
        end = text.rindex("\n")  # the question follows the haystack after a newline
        filler = end - start - sum(len(m.group(0)) for m in needles)
        queried = queried_needle(task, text, needles)
        earlier = sum(len(m.group(0)) for m in needles if m.start() < queried.start())
        before = queried.start() - start - earlier
        # Needles go to the nearest sentence boundary: off by at most half a sentence (plus its space).
        tolerance = (max(map(len, FILLER)) + 1) / 2 / filler
        assert abs(before / filler - sample.depth) <= tolerance, (sample.depth, before / filler)
        if task == "passkey" and sample.depth == 1.0:
            assert text[queried.end() :] == "\nWhat is the pass key? The pass key is"


@pytest.mark.parametrize("length", [600, 601, 617, 650])
def test_haystack_ends_with_a_whole_sentence_before_the_question(char_tokenizer, length):
    filler = ["Alpha beta gamma delta.", "A much longer second sentence of the haystack, cut when it opens it."]
    for sample in make_samples("passkey", char_tokenizer, [length], [0.5], 3, seed=4, filler=filler):
        text = text_of(char_tokenizer, sample)
        haystack = text[: text.rindex("\n")]
        assert haystack.endswith(tuple(" " + sentence for sentence in filler))
        assert len(text) == length


def test_passkey_answer_comes_only_from_its_single_needle(char_tokenizer):
    for sample in make_samples("passkey", char_tokenizer, [600], [0.2, 0.8], 3, seed=2, filler=FILLER):
        text = text_of(char_tokenizer, sample)
        key = sample.answer_text.strip()
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert text.count(needle) == 1
        assert text.count(key) == 2  # both inside the needle, nowhere else
        assert text.endswith("\nWhat is the pass key? The pass key is")


def test_multikey_queries_one_key_among_distinct_distractors(char_tokenizer):
    for sample in make_samples("multikey", char_tokenizer, [900], [0.3, 0.7], 3, seed=3, filler=FILLER):
        text = text_of(char_tokenizer, sample)
        needles = re.findall(NEEDLES["multikey"], text)
        keys, values = [k for k, _ in needles], [v for _, v in needles]
        assert len(set(keys)) == len(keys) == retrieval.MULTIKEY_DISTRACTORS + 1
        assert len(set(values)) == len(values)
        question = r"What is the special magic number for ([a-z]+)\? The special magic number for \1 is$"
        key = re.search(question, text).group(1)
        assert dict(needles)[key] == sample.answer_text.strip()
        assert text.count(sample.answer_text.strip()) == 1


def test_variable_tracking_asks_for_the_end_of_an_ordered_chain(char_tokenizer):
    for sample in make_samples("variable-tracking", char_tokenizer, [900], [0.0, 0.6, 1.0], 2, seed=4,
                               filler=FILLER):
        text = text_of(char_tokenizer, sample)
        chain = re.findall(NEEDLES["variable-tracking"], text)
        assert chain[0][1] == sample.answer_text.strip()
        for (previous, _), (_, source) in zip(chain[:-1], chain[1:], strict=True):
            assert source == f"VAR {previous}"
        names = [name for name, _ in chain]
        assert len(set(names)) == len(names) and all(re.fullmatch("[A-Z]{5}", n) for n in names)
        assert text.endswith(f"\nWhat is the value of VAR {names[-1]}? VAR {names[-1]} =")


def test_same_seed_gives_identical_prompts(char_tokenizer):
    def prompts(seed):
        return [(s.prompt_ids.tolist(), s.answer_ids.tolist(), s.answer_text)
                for task in TASKS
                for s in make_samples(task, char_tokenizer, [500, 700], [0.2, 0.9], 2, seed, FILLER)]

    assert prompts(7) == prompts(7)
    assert prompts(7) != prompts(8)
    samples = make_samples("passkey", char_tokenizer, [500], [0.5], 4, seed=7, filler=FILLER)
    assert len({s.answer_text for s in samples}) > 1  # samples of one cell differ


def test_default_filler_is_prose_of_the_held_out_documents(monkeypatch):
    documents = [f"Document {i} opens here. It has a second sentence!" for i in range(8)]
    documents += ["History\nThe first held out line is here. Then a question follows here?\n== Notes ==",
                  "Short one. The last held out document ends here."]
    monkeypatch.setattr(retrieval, "load_documents", lambda data: documents)
    retrieval.default_filler.cache_clear()
    try:
        assert retrieval.default_filler() == ("The first held out line is here.",
                                              "Then a question follows here?",
                                              "The last held out document ends here.")
    finally:
        retrieval.default_filler.cache_clear()


def test_bad_requests_are_one_line_errors(char_tokenizer):
    with pytest.raises(DataError, match="unknown retrieval task"):
        make_samples("haystack", char_tokenizer, [500], [0.5], 1, seed=0, filler=FILLER)
    with pytest.raises(DataError, match="depths must lie in"):
        make_samples("passkey", char_tokenizer, [500], [1.5], 1, seed=0, filler=FILLER)
    with pytest.raises(DataError, match="too short for multikey"):
        make_samples("multikey", char_tokenizer, [100], [0.5], 1, seed=0, filler=FILLER)
    with pytest.raises(DataError, match="no usable sentence"):
        make_samples("passkey", char_tokenizer, [500], [0.5], 1, seed=0, filler=[])


def test_a_model_that_knows_the_answers_scores_all_and_one_that_predicts_zero_none(char_tokenizer):
    samples = [s for task in TASKS
               for s in make_samples(task, char_tokenizer, [600, 700], [0.3], 2, seed=5, filler=FILLER)]
    for batch_size in (1, 3, 16):  # 3 and 16 mix tasks, hence answer lengths, in one batch
        assert score_samples(Oracle(), samples, batch_size) == [True] * len(samples)
        assert score_samples(Zero(), samples, batch_size) == [False] * len(samples)
    # Every answer token must match: right on all but the last one is wrong.
    passkeys = [s for s in samples if s.task == "passkey"]
    assert score_samples(Oracle(miss_last=True), passkeys, batch_size=2) == [False] * len(passkeys)


def test_evaluate_retrieval_summarizes_cells_tasks_and_overall(char_tokenizer):
    def knows(row):  # right on some samples only, so the averages are not trivial
        return int(row.sum()) % 3 != 0

    tasks, lengths, depths = ["passkey", "variable-tracking"], [400, 600], [0.1, 0.5, 0.9]
    result = evaluate_retrieval(Oracle(knows), char_tokenizer, tasks, lengths, depths, samples_per_cell=3,
                                seed=6, filler=FILLER, batch_size=2)
    cells = result["cells"]
    assert [(c["task"], c["length"], c["depth"]) for c in cells] == [(t, n, d) for t in tasks for n in lengths
                                                                     for d in depths]
    assert all(c["n"] == 3 for c in cells)
    for task in tasks:
        samples = make_samples(task, char_tokenizer, lengths, depths, 3, seed=6, filler=FILLER)
        correct = score_samples(Oracle(knows), samples)
        own = [c for c in cells if c["task"] == task]
        per_cell = [sum(correct[i : i + 3]) / 3 for i in range(0, len(correct), 3)]
        assert [c["accuracy"] for c in own] == per_cell
        assert [hit for c in own for hit in c["hits"]] == [int(x) for x in correct]  # per prompt, in order
        assert result["by_task"][task] == pytest.approx(sum(correct) / len(correct))
    assert result["overall"] == pytest.approx(sum(c["accuracy"] for c in cells) / len(cells))
    assert 0 < result["overall"] < 1
    assert result["prompts"] == 3 * len(cells)
    p = result["overall"]
    assert result["overall_stderr"] == pytest.approx((p * (1 - p) / result["prompts"]) ** 0.5)


def test_paired_retrieval_counts_gains_and_losses_prompt_by_prompt_with_an_exact_sign_test(char_tokenizer):
    """Two results on the same prompts: a prompt only the first answers is a gain, only the reference a loss; the
    sign test is exact (binomial on the discordant prompts); results without per-prompt outcomes or on other
    cells are not paired."""
    tasks, lengths, depths = ["passkey"], [400, 600], [0.5]

    def result(knows):
        return evaluate_retrieval(Oracle(knows), char_tokenizer, tasks, lengths, depths, samples_per_cell=4, seed=2,
                                  filler=FILLER)

    everything, some = result(lambda row: True), result(lambda row: int(row.sum()) % 2 == 0)
    lost = sum(1 - hit for cell in some["cells"] for hit in cell["hits"])
    assert 0 < lost < 8
    assert paired_retrieval(some, everything) == {"gained": 0, "lost": lost, "prompts": 8,
                                                  "p_value": sign_test(0, lost)}
    assert paired_retrieval(everything, some)["gained"] == lost
    assert paired_retrieval(everything, everything) == {"gained": 0, "lost": 0, "prompts": 8, "p_value": 1.0}
    assert sign_test(0, 5) == pytest.approx(2 / 32) and sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # P(X <= 3) for Bin(10, 1/2), doubled
    assert sign_test(4, 4) == 1.0  # capped: the two tails overlap
    old = {**some, "cells": [{k: v for k, v in c.items() if k != "hits"} for c in some["cells"]]}
    assert paired_retrieval(old, everything) is None
    other_cells = {**everything, "cells": everything["cells"][:1]}
    assert paired_retrieval(some, other_cells) is None


def test_evaluate_retrieval_runs_on_a_hybrid(char_tokenizer, one_thread):
    model = tiny_model("qwen3", max_position_embeddings=1024)
    fa_mask = torch.tensor([[True, False], [False, False], [False, True], [False, False]])
    with hybrid_attention(model, fa_mask, sliding_window=16, sink_tokens=4):
        result = evaluate_retrieval(model, char_tokenizer, list(TASKS), [600], [0.5], samples_per_cell=2,
                                    filler=FILLER, batch_size=2)
    assert set(result) == {"overall", "overall_stderr", "prompts", "by_task", "cells"}
    assert set(result["by_task"]) == set(TASKS) and len(result["cells"]) == len(TASKS)
    assert all(0 <= value <= 1 for value in [result["overall"], *result["by_task"].values()])


def test_named_haystacks(monkeypatch):
    assert retrieval.haystack_filler("noise") == retrieval.NOISE_FILLER
    monkeypatch.setattr(retrieval, "default_filler", lambda: ("Some held-out prose sentence here.",))
    assert retrieval.haystack_filler("prose") == ("Some held-out prose sentence here.",)
    with pytest.raises(DataError, match="unknown retrieval haystack 'essays'; choose from noise, prose"):
        retrieval.haystack_filler("essays")


def test_the_default_haystack_is_noise(char_tokenizer):
    sample, = make_samples("passkey", char_tokenizer, [300], [0.5], 1, seed=0)
    haystack = text_of(char_tokenizer, sample).split("I will quiz you about it.")[1].rsplit("\n", 1)[0]
    sentences = re.sub(r" The pass key is \d+\. Remember it\. \d+ is the pass key\.", "", haystack)
    assert set(re.findall(r"[A-Z][^.]*\.", sentences)) <= set(retrieval.NOISE_FILLER)
    explicit, = make_samples("passkey", char_tokenizer, [300], [0.5], 1, seed=0, filler=retrieval.NOISE_FILLER)
    assert torch.equal(sample.prompt_ids, explicit.prompt_ids)


def test_retrieval_head_scores_count_far_copies_and_rank_against_the_effects(monkeypatch):
    """bench/retrieval_head_scores.py: a head scores an answer token when its strongest attention, at the position
    before it, lies on an earlier copy of that token at least a window back (not a nearer copy, not another token);
    the comparison ranks the score against the benefit of making a sliding head full."""
    module = bench_module("retrieval_head_scores", monkeypatch)
    ids = torch.tensor([7, 1, 2, 3, 4, 5, 6, 7, 8, 7])  # answer: the last two tokens (8, 7); 7 also at 0 and 7
    attention = torch.zeros(2, 10, 10)  # one layer, two query heads
    attention[0, 7, 0] = 1.0  # predicts 8 (position 8) from 7 at 0: wrong token
    attention[0, 8, 0] = 1.0  # predicts 7 (position 9) from the 7 at 0, 8 back: a far copy
    attention[1, 7, 2] = 1.0
    attention[1, 8, 7] = 1.0  # the 7 at position 7: a copy, but only 1 back
    hits, tokens = module.copy_hits([attention], ids, answer_start=8, window=4)
    assert tokens == 2 and hits.tolist() == [[1.0, 0.0]]
    effects = [{"layer": 0, "head": h, "in_base": False, "target": t} for h, t in enumerate((-0.3, -0.1, 0.0))]
    effects.append({"layer": 0, "head": 3, "in_base": True, "target": 5.0})  # a full head: not compared
    summary = module.compare_with_effects([[0.9, 0.5, 0.1, 0.0]], effects, top=1)
    assert summary["spearman"] == pytest.approx(1.0) and summary["top1_overlap"] == 1
    assert summary["top1_by_score"] == [(0, 0)]


def test_pair_eval_rows_pairs_rows_of_separate_evaluations_with_dense_and_their_reference(monkeypatch, tmp_path):
    """bench/pair_eval_rows.py: rows of two ``consa eval --json`` files (one with the dense row) are paired with
    dense and with their reference on the same sequences and prompts, with the numbers worked out by hand."""
    import json

    module = bench_module("pair_eval_rows", monkeypatch)

    def row(label, method, nll, hits):
        return {"label": label, "method": method, "nll_per_sequence": nll, "ppl": 10.0,
                "retrieval": {"overall": sum(hits) / len(hits),
                              "cells": [{"task": "passkey", "length": 64, "depth": 0.5, "hits": hits}]}}

    (tmp_path / "a.json").write_text(json.dumps({"rows": [
        row("dense", "dense", [1.0, 2.0, 3.0], [1, 1, 1, 1]), row("base", "vote", [1.1, 2.1, 3.2], [1, 1, 0, 0])]}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [row("base-swap1", "vote", [1.2, 2.3, 3.1], [0, 1, 1, 1])]}))
    table = module.pair_table(module.load_rows([str(tmp_path / "a.json"), str(tmp_path / "b.json")]),
                              [("swap", "base")])
    by_label = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table[2:]}
    assert set(by_label) == {"base", "base-swap1"}
    swap = by_label["base-swap1"]
    # vs dense: deltas 0.2, 0.3, 0.1 -> mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.5; retrieval 0.75 of 1.0
    assert swap[2] == "+0.2000 (3.5)" and swap[3] == "0.750 (75.0%)"
    # vs base: deltas 0.1, 0.2, -0.1 -> +0.0667, t 0.8; prompts 3 and 4 gained, prompt 1 lost: 2 / 1, p = 1
    assert swap[4] == "base" and swap[5] == "+0.0667 (0.8)" and swap[6] == "2 / 1 (1) |"
    assert by_label["base"][4:7] == ["-", "-", "- |"]


def test_pair_eval_rows_keeps_different_rows_that_share_a_label_and_merges_the_same_row(monkeypatch, tmp_path):
    """Two healings evaluated in separate files are both labelled ``healed``: both rows stay, the later one named
    by its file; dense, scored in both files from the same weights, is one row (the first)."""
    import json

    module = bench_module("pair_eval_rows", monkeypatch)

    def row(label, method, path, nll):
        return {"label": label, "method": method, "path": path, "nll_per_sequence": nll, "ppl": 10.0}

    (tmp_path / "s1.json").write_text(json.dumps({"rows": [
        row("dense", "dense", "model.gguf", [1.0, 2.0]), row("healed", "vote+healed", "s1/healed", [1.1, 2.1])]}))
    (tmp_path / "s2.json").write_text(json.dumps({"rows": [
        row("dense", "dense", "model.gguf", [9.0, 9.0]), row("healed", "vote+healed", "s2/healed", [1.3, 2.3])]}))
    rows = module.load_rows([str(tmp_path / "s1.json"), str(tmp_path / "s2.json")])
    assert [r["label"] for r in rows] == ["dense", "healed", "healed [s2]"]
    assert rows[0]["nll_per_sequence"] == [1.0, 2.0] and rows[2]["nll_per_sequence"] == [1.3, 2.3]
    table = module.pair_table(rows, [(r"\[s2\]", "healed")])
    assert table[-1].startswith("| healed [s2] | 10.000 | +0.3000 ") and "| healed | +0.2000 " in table[-1]
