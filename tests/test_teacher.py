"""The KL teacher's cache: the logits from a kept hidden state are the model's own, a search with it learns exactly
what one without it learns, and it keeps only what a later step reads, within its budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from consa_cli.search import run_search
from consa_cli.settings import SearchSettings, SettingsError
from consa_cli.teacher import TeacherCache, logits_from_hidden, remaining_visits

SEQUENCES = torch.randint(0, 96, (6, 48), generator=torch.Generator().manual_seed(5))


def settings(**overrides):
    values = dict(window=8, seq_len=48, steps=14, sparsity=0.5, target_warmup_steps=4, dtype="float32", loss="kl")
    return SearchSettings(**{**values, **overrides})


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logits_from_the_decoders_hidden_state_are_the_models_own(family, softcap):
    if softcap is not None and family != "gemma3_text":
        pytest.skip("only Gemma's config has final_logit_softcapping")
    model = tiny_model(family, **({} if softcap is None else {"final_logit_softcapping": softcap}))
    ids = SEQUENCES[:2]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        expected = model(input_ids=ids, use_cache=False).logits
        assert torch.equal(logits_from_hidden(model, hidden), expected)
    if softcap is not None:
        assert expected.abs().max() < softcap  # the cap is applied, not skipped


def test_a_search_that_revisits_sequences_learns_the_same_with_the_cache():
    """14 steps over 6 sequences: each sequence's teacher forward runs once; every step's loss and the learned
    scores equal (bit for bit) the search that runs the teacher at every step."""
    kept = run_search(settings(), tiny_model("llama"), SEQUENCES, 2)
    recomputed = run_search(settings(teacher_cache_gib=0.0), tiny_model("llama"), SEQUENCES, 2)
    assert [r["task_loss"] for r in kept.metrics] == [r["task_loss"] for r in recomputed.metrics]
    assert torch.equal(kept.allocation.scores, recomputed.allocation.scores)
    assert kept.allocation.metadata["teacher_forwards"] == {"computed": 6, "recalled": 8}
    assert recomputed.allocation.metadata["teacher_forwards"] == {"computed": 14, "recalled": 0}


def test_the_lm_loss_has_no_teacher():
    result = run_search(settings(loss="lm"), tiny_model("llama"), SEQUENCES, 2)
    assert "teacher_forwards" not in result.allocation.metadata


def test_remaining_visits_count_only_the_kl_sequences_of_the_steps_left():
    order = torch.tensor([2, 0, 1])
    is_kl = [True, False, True]  # by sequence index: sequence 1 scores the lm loss
    # batch 2: the steps read order positions 0-1, 2-3 (wrapping: 1, 2), 4-5 (0, 1): sequences 2 0 | 1 2 | 0 1
    assert remaining_visits(order, 2, 0, 3, is_kl) == {2: 2, 0: 2}
    assert remaining_visits(order, 2, 2, 3, is_kl) == {0: 1}
    assert remaining_visits(order, 2, 3, 3, is_kl) == {}


def test_the_cache_keeps_only_what_a_later_visit_reads_and_stays_within_its_budget():
    model = tiny_model("llama")
    forwards = []

    def decoder_forward(ids):
        forwards.append(ids.shape[0])
        with torch.no_grad():
            return model.base_model(input_ids=ids, use_cache=False).last_hidden_state

    one = 48 * model.config.hidden_size * 4  # bytes of one sequence's float32 hidden state
    visits = {0: 3, 1: 2, 2: 1}
    cache = TeacherCache(model, decoder_forward, visits, budget_bytes=one)  # room for one sequence
    ids = SEQUENCES[:3]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(cache.logits([0, 1, 2], ids), expected, rtol=0, atol=0)
    assert set(cache.kept) == {0} and cache.kept_bytes == one  # 1 is visited again but does not fit; 2 is not
    torch.testing.assert_close(cache.logits([1, 0], ids[[1, 0]]), expected[[1, 0]], rtol=0, atol=0)
    assert forwards == [3, 1]  # the second call computed sequence 1 only
    assert set(cache.kept) == {0}  # 1 had its last visit
    torch.testing.assert_close(cache.logits([0], ids[:1]), expected[:1], rtol=0, atol=0)
    assert cache.kept == {} and cache.kept_bytes == 0 and forwards == [3, 1]  # dropped after its last visit
    assert (cache.computed, cache.recalled) == (4, 2)


def test_a_negative_budget_is_rejected():
    with pytest.raises(SettingsError, match="teacher-cache-gib"):
        settings(teacher_cache_gib=-1.0).validate()
