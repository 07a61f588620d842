"""The search: hard-concrete gates, the constraint, exact counts, determinism, and that it learns something."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import bench_module, tiny_model

import consa_cli.losses
from consa_cli.attention import hybrid_attention
from consa_cli.calibration import CalibrationSet
from consa_cli.losses import kl_to_teacher, next_token_loss, search_loss
from consa_cli.search import (
    SKIP_CLOSED_GATES_MIN_TOKENS,
    HardConcreteGates,
    UnitLayout,
    resolve_attention_backend,
    run_search,
    skips_closed_gates,
    target_at,
)
from consa_cli.settings import LOSSES, SearchSettings, SettingsError, build_settings
from consa_cli.teacher import logits_from_hidden

SEQUENCES = torch.randint(0, 96, (16, 64), generator=torch.Generator().manual_seed(3))


def settings(**overrides):
    values = dict(window=8, seq_len=64, steps=40, sparsity=0.5, target_warmup_steps=10, dtype="float32")
    return SearchSettings(**{**values, **overrides})


def test_prob_full_matches_sampled_frequency():
    gates = HardConcreteGates(4)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.5, 3.0]))
        samples = torch.stack([gates.sample() for _ in range(20000)])
    frequency = (samples > 0).float().mean(dim=0)
    torch.testing.assert_close(frequency, gates.prob_full().detach(), atol=0.015, rtol=0)
    assert samples.min() >= 0 and samples.max() <= 1
    assert ((samples == 0) | (samples == 1)).float().mean() > 0.2  # hard-concrete puts mass on exact 0 and 1


def test_initial_gates_are_full_attention():
    gates = HardConcreteGates(10)
    assert gates.prob_full().min() > 0.99
    assert (gates.deterministic() == 1).all()


def test_layout_constraints_and_exact_ranking():
    per_layer = UnitLayout("kv-head-per-layer", 3, 4)
    scores = torch.tensor([9.0, 1, 2, 3, 0, 8, 7, 6, 5, 4, 3, 10])
    mask = per_layer.rank_to_mask(scores, 0.5)
    assert mask.sum(dim=1).tolist() == [2, 2, 2]
    assert mask[0].tolist() == [True, False, False, True]
    assert per_layer.constraint_sparsity(torch.full((12,), 0.25)).tolist() == [0.75] * 3
    global_heads = UnitLayout("kv-head", 3, 4)
    assert global_heads.rank_to_mask(scores, 0.75).flatten().nonzero().flatten().tolist() == [0, 5, 11]
    layers = UnitLayout("layer", 3, 4)
    assert layers.rank_to_mask(torch.tensor([0.0, 2.0, 1.0]), 0.5).tolist() == [[False] * 4, [True] * 4, [False] * 4]


@pytest.mark.parametrize("granularity", ["layer", "kv-head", "kv-head-per-layer"])
@pytest.mark.parametrize("loss", ["kl", "lm"])
def test_search_hits_exact_count_and_approaches_target(granularity, loss):
    model = tiny_model("qwen3")
    result = run_search(settings(granularity=granularity, loss=loss), model, SEQUENCES, sink_tokens=2)
    allocation = result.allocation
    assert allocation.sparsity == pytest.approx(0.5)
    if granularity == "kv-head-per-layer":
        assert allocation.fa_mask.sum(dim=1).tolist() == [1, 1, 1, 1]
    assert len(result.metrics) == 40
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.metrics)
    assert result.metrics[0]["expected_sparsity"] < 0.05  # starts dense
    assert abs(result.metrics[-1]["expected_sparsity"] - 0.5) < 0.15
    assert model.config._attn_implementation == "sdpa"  # hybrid removed afterwards
    assert not any(p.requires_grad for p in model.parameters())


def test_search_is_deterministic_for_a_seed():
    first = run_search(settings(steps=10), tiny_model("llama"), SEQUENCES, 2).allocation.scores
    second = run_search(settings(steps=10), tiny_model("llama"), SEQUENCES, 2).allocation.scores
    third = run_search(settings(steps=10, seed=1), tiny_model("llama"), SEQUENCES, 2).allocation.scores
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize(("granularity", "loss"), [("kv-head", "kl"), ("layer", "lm"), ("kv-head-per-layer", "kl")])
def test_skipping_closed_gates_learns_exactly_what_the_full_search_learns(granularity, loss):
    """--skip-closed-gates: the full branch only for heads whose gate sample is not exactly 0. Gates started near
    closing (log_alpha -1: about half the samples clamp at 0) so that many heads are skipped; the losses of every
    step and the learned scores equal the search that computes both branches everywhere."""
    common = dict(steps=12, granularity=granularity, loss=loss, log_alpha_init=-1.0)
    full = run_search(settings(**common), tiny_model("llama"), SEQUENCES, 2)
    skipping = run_search(settings(**common, skip_closed_gates=True), tiny_model("llama"), SEQUENCES, 2)
    closed = [record["closed_heads"] for record in skipping.metrics]
    assert max(closed) > 0.2 and "closed_heads" not in full.metrics[0]
    assert [r["task_loss"] for r in skipping.metrics] == pytest.approx([r["task_loss"] for r in full.metrics],
                                                                       rel=1e-5, abs=1e-6)
    torch.testing.assert_close(skipping.allocation.scores, full.allocation.scores, rtol=1e-5, atol=1e-5)
    assert skipping.allocation.metadata["skip_closed_gates"] and not full.allocation.metadata["skip_closed_gates"]


@pytest.mark.parametrize(("method", "loss", "batch_size"), [("l0", "kl", 1), ("scalar-l1", "lm", 2), ("l0", "lm", 2)])
def test_the_split_step_of_cuda_graphs_learns_exactly_what_the_plain_search_learns(monkeypatch, method, loss,
                                                                                     batch_size):
    """--cuda-graphs splits each step at a leaf of relaxed weights (the graphs' static input): the task loss's
    backward stops at the leaf, whose gradient goes on through the gate sample together with the constraint. On a
    CPU the capture is replaced by the uncaptured module, so this checks the split itself: every step's losses and
    the learned scores equal the plain search's (scalar-l1's constraint shares the gate sample with the weights)."""
    import consa_cli.search

    captured = []

    def uncaptured(gated, sample_ids):
        captured.append(sample_ids.shape)
        return gated

    monkeypatch.setattr(consa_cli.search, "graph_gated_logits", uncaptured)
    common = dict(steps=12, method=method, loss=loss, batch_size=batch_size, log_alpha_init=0.5)
    plain = run_search(settings(**common), tiny_model("llama"), SEQUENCES, 2)
    split = run_search(settings(**common, cuda_graphs=True), tiny_model("llama"), SEQUENCES, 2)
    assert captured == [torch.Size([batch_size, 64])]  # captured once, on one step's shape
    assert [r["loss"] for r in split.metrics] == pytest.approx([r["loss"] for r in plain.metrics], rel=1e-6)
    torch.testing.assert_close(split.allocation.scores, plain.allocation.scores, rtol=1e-6, atol=1e-7)
    assert split.allocation.metadata["cuda_graphs"] and not plain.allocation.metadata["cuda_graphs"]
    assert not split.allocation.metadata["skip_closed_gates"]


def test_cuda_graphs_need_cuda_and_exclude_compile_and_skipping(tmp_path):
    from consa_cli.search import uses_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_cuda_graphs(settings(), cuda, "flex") and uses_cuda_graphs(settings(), cuda, "sdpa")
    assert not uses_cuda_graphs(settings(), cpu, "sdpa")  # by default only where a CUDA test covers the backend
    assert not uses_cuda_graphs(settings(), cuda, "fa4") and not uses_cuda_graphs(settings(), cuda, "flash")
    assert not uses_cuda_graphs(settings(compile=True), cuda, "flex")
    assert not uses_cuda_graphs(settings(skip_closed_gates=True), cuda, "flex")
    assert not uses_cuda_graphs(settings(cuda_graphs=False), cuda, "flex")
    assert uses_cuda_graphs(settings(cuda_graphs=True), cuda, "flash")  # asked for: the user's call
    assert not run_search(settings(steps=1), tiny_model("llama"), SEQUENCES, 2).allocation.metadata["cuda_graphs"]
    with pytest.raises(SettingsError, match="CUDA device"):
        run_search(settings(steps=1, cuda_graphs=True), tiny_model("llama"), SEQUENCES, 2)
    from consa_cli.search import search

    output = tmp_path / "run"
    with pytest.raises(SettingsError, match="needs a CUDA device, and this search runs on cpu"):
        search(settings(cuda_graphs=True, device="cpu", output=str(output)))  # before any model is loaded
    assert not output.exists()
    with pytest.raises(SettingsError, match="--compile"):
        settings(cuda_graphs=True, compile=True).validate()
    with pytest.raises(SettingsError, match="--skip-closed-gates"):
        settings(cuda_graphs=True, skip_closed_gates=True).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_cuda_cuda_graphs_search_follows_the_eager_search(backend):
    """On a GPU: the search replaying its captured step learns what the eager search learns (float32, tiny model)."""
    common = dict(steps=6, loss="kl", device="cuda", attention_backend=backend, log_alpha_init=0.5)
    eager = run_search(settings(**common), tiny_model("llama").cuda(), SEQUENCES, 2)
    graphed = run_search(settings(**common, cuda_graphs=True), tiny_model("llama").cuda(), SEQUENCES, 2)
    assert [r["loss"] for r in graphed.metrics] == pytest.approx([r["loss"] for r in eager.metrics], rel=1e-3)
    torch.testing.assert_close(graphed.allocation.scores, eager.allocation.scores, rtol=1e-3, atol=1e-4)


def test_closed_gates_are_skipped_by_default_only_where_it_was_measured_to_pay():
    """skip_closed_gates None (the default): on for CUDA searches of SKIP_CLOSED_GATES_MIN_TOKENS or more tokens
    per step without --compile; an explicit flag wins; never for scalar-l1, whose gates do not close."""
    cuda, cpu, long = torch.device("cuda"), torch.device("cpu"), SKIP_CLOSED_GATES_MIN_TOKENS
    default = SearchSettings()
    assert default.skip_closed_gates is None
    assert skips_closed_gates(default, cuda, long) and skips_closed_gates(default, cuda, 2 * long)
    assert not skips_closed_gates(default, cuda, long - 1)
    assert not skips_closed_gates(default, cpu, long)
    assert not skips_closed_gates(dataclasses.replace(default, compile=True), cuda, long)
    assert skips_closed_gates(dataclasses.replace(default, skip_closed_gates=True), cpu, 64)
    assert not skips_closed_gates(dataclasses.replace(default, skip_closed_gates=False), cuda, long)
    assert not skips_closed_gates(dataclasses.replace(default, method="scalar-l1", skip_closed_gates=True), cuda, long)


def test_the_search_decides_skipping_on_its_tokens_per_step(monkeypatch):
    """The default's measure is the tokens of one step, batch size x sequence length (two 4096-token sequences
    skip like one of 8192): what run_search passes to skips_closed_gates."""
    import consa_cli.search

    seen = []
    monkeypatch.setattr(consa_cli.search, "skips_closed_gates",
                        lambda settings, device, tokens: seen.append(tokens) or False)
    run_search(settings(steps=2, batch_size=3), tiny_model("llama"), SEQUENCES, 2)
    assert seen == [3 * SEQUENCES.shape[1]]


def test_compiled_search_learns_what_the_eager_search_learns(monkeypatch):
    """--compile: the gated forward and the KL teacher run through torch.compile (aot_eager here: the graph
    capture and the autograd split, without a C++ compiler), two graphs for the whole run (student and teacher; a
    new gate sample is a new input, not a recompile); the learned scores equal the eager search's."""
    import consa_cli.search as search_module

    graphs, calls = [], []

    def traced(model):
        def backend(graph_module, example_inputs):
            graphs.append(graph_module)
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(graph_module, example_inputs)
        compiled = torch.compile(model, backend=backend, dynamic=False)

        def counted(**kwargs):
            calls.append(kwargs["input_ids"].shape)
            return compiled(**kwargs)
        return counted

    monkeypatch.setattr(search_module, "compile_forward", traced)
    prepared = []  # the backend's eager preparation (flex: its block mask) runs before the compiled forward
    sdpa = search_module.ATTENTION_BACKENDS["sdpa"]
    monkeypatch.setitem(search_module.ATTENTION_BACKENDS, "sdpa", dataclasses.replace(
        sdpa, prepare=lambda *args, **kwargs: prepared.append((args, kwargs, len(calls)))))
    eager = run_search(settings(steps=4, loss="kl"), tiny_model("llama"), SEQUENCES, 2)
    assert prepared == []  # only for a compiled run
    compiled = run_search(settings(steps=4, loss="kl", compile=True), tiny_model("llama"), SEQUENCES, 2)
    assert len(calls) == 2 * 4 and len(graphs) == 2  # teacher and student every step, each compiled once
    # sequence length, window, sinks, device, sequences per step; first
    assert prepared == [((64, 8, 2, torch.device("cpu")), {"batch": 1}, 0)]
    torch.testing.assert_close(compiled.allocation.scores, eager.allocation.scores, rtol=1e-5, atol=1e-5)
    assert [r["task_loss"] for r in compiled.metrics] == pytest.approx([r["task_loss"] for r in eager.metrics],
                                                                      rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_compiled_search_follows_the_eager_search(backend):
    """--compile on a GPU (inductor, bf16, the flex / flash kernels inside the compiled forward): the same losses
    as the eager search within bf16 noise, and every gate gets a gradient."""
    sequences = SEQUENCES.cuda()
    runs = [run_search(settings(steps=3, loss="lm", dtype="bfloat16", device="cuda", attention_backend=backend,
                                compile=compiled), tiny_model("qwen3").to("cuda", torch.bfloat16), sequences, 2)
            for compiled in (False, True)]
    eager, compiled = ([r["task_loss"] for r in run.metrics] for run in runs)
    assert compiled == pytest.approx(eager, rel=2e-2)
    defaults = settings()
    for run in runs:  # every gate got a gradient through the compiled forward too
        assert (run.allocation.scores != defaults.log_alpha_init).all()
    # Adam moves each gate by about gate_lr per step whatever the gradient's size: bf16 noise may flip a sign.
    assert (runs[0].allocation.scores - runs[1].allocation.scores).abs().max() <= 6 * defaults.gate_lr


def test_search_keeps_full_attention_where_it_matters():
    """Layers whose attention output is switched off cannot affect the loss: they must be the ones made SWA."""
    model = tiny_model("qwen3", num_hidden_layers=4)
    with torch.no_grad():
        for layer in (0, 2):
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
    result = run_search(settings(granularity="layer", steps=60), model, SEQUENCES, sink_tokens=0)
    assert result.allocation.layer_is_full == [False, True, False, True]


def test_target_warmup_ramps_linearly():
    s = settings(sparsity=0.6, target_warmup_steps=3)
    assert [round(target_at(step, s), 3) for step in range(5)] == [0.2, 0.4, 0.6, 0.6, 0.6]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"sparsity": 1.5}, "--sparsity"), ({"granularity": "head"}, "--granularity"), ({"loss": "mse"}, "--loss"),
    ({"window": 2048}, "smaller than --seq-len"), ({"steps": 0}, "--steps"), ({"sink_tokens": -1}, "--sink-tokens"),
    ({"skip_closed_gates": True, "compile": True}, "cannot be combined with --compile"),
])
def test_invalid_settings_are_rejected(overrides, message):
    with pytest.raises(SettingsError, match=message):
        build_settings(SearchSettings, None, **overrides)


def test_recipe_values_are_overridden_by_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sparsity: 0.5\nwindow: 64\nsteps: 7\n")
    built = build_settings(SearchSettings, recipe, steps=9)
    assert (built.sparsity, built.window, built.steps) == (0.5, 64, 9)
    recipe.write_text("sparsity: 0.5\nwindw: 64\n")
    with pytest.raises(SettingsError, match="unknown settings: windw"):
        build_settings(SearchSettings, recipe)


def test_every_recipe_is_valid():
    recipes = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))
    assert recipes
    for recipe in recipes:
        assert build_settings(SearchSettings, recipe).window > 0


@pytest.mark.parametrize("chunk_elements", [1 << 25, 30])  # one chunk; chunks of one token
@pytest.mark.parametrize("loss", ["kl", "lm"])
def test_masked_search_loss_averages_each_sequences_selected_positions(loss, chunk_elements, monkeypatch):
    monkeypatch.setattr(consa_cli.losses, "CHUNK_ELEMENTS", chunk_elements)
    teacher, student = torch.randn(2, 6, 11), torch.randn(2, 6, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[True] * 6, [False, False, True, True, False, False]])
    if loss == "kl":
        per_token = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                             reduction="none").sum(-1)
        expected = (per_token[0].mean() + per_token[1, 2:4].mean()) / 2
    else:  # the last position has no next token
        per_token = F.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, 5)
        expected = (per_token[0].mean() + per_token[1, 2:4].mean()) / 2
    value = search_loss(student, ids, mask, loss, teacher)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(value, student)
    expected_grad, = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert grad[1, [0, 1, 4, 5]].abs().max() == 0  # unselected positions get no gradient
    everything = torch.ones_like(mask)
    plain = kl_to_teacher(student, teacher) if loss == "kl" else next_token_loss(student, ids)
    torch.testing.assert_close(search_loss(student, ids, everything, loss, teacher), plain)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 120])  # one chunk; chunks of 2 tokens and a shorter last
def test_chunked_losses_equal_plain_torch_in_value_and_gradient(chunk_elements, monkeypatch):
    monkeypatch.setattr(consa_cli.losses, "CHUNK_ELEMENTS", chunk_elements)
    teacher, student = torch.randn(2, 7, 50), torch.randn(2, 7, 50, requires_grad=True)
    input_ids = torch.randint(0, 50, (2, 7))
    kl = kl_to_teacher(student, teacher)
    expected_kl = F.kl_div(student.log_softmax(-1).flatten(0, 1), teacher.log_softmax(-1).flatten(0, 1),
                           log_target=True, reduction="batchmean")
    lm = next_token_loss(student, input_ids)
    expected_lm = F.cross_entropy(student[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    for loss, expected in ((kl, expected_kl), (lm, expected_lm)):
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        grad, = torch.autograd.grad(3.0 * loss, student)
        expected_grad, = torch.autograd.grad(3.0 * expected, student)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert kl_to_teacher(teacher, teacher).abs() < 1e-5  # zero against itself
    # The stored gradient is scaled in place (no second [tokens, vocab] buffer), so it can be taken only once.
    loss = next_token_loss(student, input_ids)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_attention_backend_is_resolved_and_recorded():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "sdpa"
    assert resolve_attention_backend("eager", cpu) == "eager"
    with pytest.raises(SettingsError, match="--attention-backend flex needs a CUDA device"):
        resolve_attention_backend("flex", cpu)
    with pytest.raises(SettingsError, match="--attention-backend flash needs a CUDA GPU"):
        resolve_attention_backend("flash", cpu, torch.bfloat16)
    if torch.cuda.is_available():  # the flash kernels run only in half precision
        with pytest.raises(SettingsError, match="--dtype bfloat16 or float16"):
            resolve_attention_backend("flash", torch.device("cuda"), torch.float32)
    assert build_settings(SearchSettings, None, attention_backend="flash").attention_backend == "flash"
    with pytest.raises(SettingsError, match="--attention-backend must be one of"):
        build_settings(SearchSettings, None, attention_backend="triton")
    result = run_search(settings(steps=2), tiny_model("qwen3"), SEQUENCES, sink_tokens=2)
    assert result.allocation.metadata["attention_backend"] == "sdpa"
    assert result.allocation.metadata["settings"]["attention_backend"] == "auto"
    assert result.allocation.metadata["loss_kernels"] == "chunks"  # the CPU reference


def mixed_calibration() -> CalibrationSet:
    """SEQUENCES, the second half flagged as retrieval samples scoring three 'answer' positions each."""
    mask = torch.ones_like(SEQUENCES, dtype=torch.bool)
    mask[8:] = False
    mask[8:, -4:-1] = True
    return CalibrationSet(SEQUENCES, mask, torch.arange(16) >= 8)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 30])  # one chunk; chunks of one token
def test_mixed_batch_loss_adds_each_sequences_own_loss(chunk_elements, monkeypatch):
    """kl and lm sequences in one batch: each its own mean over its positions, weighted 1/B, in value and gradient."""
    monkeypatch.setattr(consa_cli.losses, "CHUNK_ELEMENTS", chunk_elements)
    student = torch.randn(4, 6, 11, requires_grad=True)
    teacher = torch.randn(2, 6, 11)  # the kl sequences' only: rows 0 and 3
    ids = torch.randint(0, 11, (4, 6))
    mask = torch.tensor([[True] * 6, [False, False, True, True, False, False], [True] * 6,
                         [False, True, True, True, False, False]])
    losses = ["kl", "lm", "lm", "kl"]
    kl = F.kl_div(student[[0, 3]].log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                  reduction="none").sum(-1)
    lm = F.cross_entropy(student[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(4, 5)
    expected = (kl[0].mean() + lm[1, 2:4].mean() + lm[2].mean() + kl[1, 1:4].mean()) / 4
    value = search_loss(student, ids, mask, losses, teacher)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(value, student)
    expected_grad, = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert grad[2, -1].abs().max() == 0  # an lm sequence's last position predicts nothing


def count_forwards(model) -> list[int]:
    """The batch size of every forward of ``model``'s decoder from now on (the student's and the teacher's)."""
    batches = []
    model.base_model.register_forward_hook(lambda module, args, kwargs, output: batches.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    return batches


@pytest.mark.parametrize(("loss", "retrieval_loss", "per_step"), [
    ("lm", "lm", [16]), ("kl", "lm", [8, 16]), ("lm", "kl", [8, 16]), ("kl", "kl", [16, 16]),
])
def test_teacher_runs_only_on_the_sequences_that_need_kl(loss, retrieval_loss, per_step):
    model = tiny_model("llama")
    batches = count_forwards(model)
    common = dict(steps=3, batch_size=16, loss=loss, retrieval_loss=retrieval_loss)
    run_search(settings(**common, teacher_cache_gib=0.0), model, mixed_calibration(), sink_tokens=2)
    assert batches == per_step * 3  # every step sees all 16 sequences: 8 of text, 8 of retrieval
    batches.clear()
    run_search(settings(**common), model, mixed_calibration(), sink_tokens=2)  # teacher cache on (the default)
    assert batches == per_step + [16, 16]  # the same sequences again: the teacher ran at the first step only


def test_retrieval_loss_changes_only_what_retrieval_rows_learn():
    calibration = mixed_calibration()
    def scores(**overrides):
        return run_search(settings(steps=6, batch_size=4, **overrides), tiny_model("llama"), calibration,
                          sink_tokens=2).allocation.scores

    assert not torch.equal(scores(retrieval_loss="lm"), scores(retrieval_loss="kl"))
    text = CalibrationSet.text_only(SEQUENCES)
    text_runs = [run_search(settings(steps=3, retrieval_loss=name), tiny_model("llama"), text, 2).allocation
                 for name in LOSSES]
    assert torch.equal(text_runs[0].scores, text_runs[1].scores)  # no retrieval rows: the setting is inert
    assert text_runs[0].metadata["settings"]["retrieval_loss"] == "kl"


def test_kl_teacher_is_the_original_model_even_when_it_is_natively_hybrid():
    """Gemma3-style models are trained with sliding layers: the KL teacher is their own pattern, not all-full."""
    model = tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 2)
    teacher_calls = []

    def record(module, args, kwargs, output):
        if not torch.is_grad_enabled():  # the teacher forward is the only one without gradients
            teacher_calls.append((kwargs["input_ids"], logits_from_hidden(model, output.last_hidden_state)))

    handle = model.base_model.register_forward_hook(record, with_kwargs=True)
    try:
        run_search(settings(steps=2, loss="kl", granularity="kv-head"), model, SEQUENCES, sink_tokens=0)
    finally:
        handle.remove()
    assert len(teacher_calls) == 2
    all_full = torch.ones(4, 2, dtype=torch.bool)
    for input_ids, teacher_logits in teacher_calls:
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, model(input_ids=input_ids).logits)  # the model as trained
            with hybrid_attention(model, all_full, 8, 0):  # and not all-full attention, which differs here
                assert (model(input_ids=input_ids).logits - teacher_logits).abs().max() > 1e-3


@pytest.mark.parametrize("granularity", ["layer", "kv-head"])
def test_a_natively_hybrid_model_starts_the_search_from_its_own_pattern(granularity):
    """Gemma3-style models: gates of natively sliding layers start closed, the native full layers open, so step 0
    is the model as trained (all-full attention is another model for them)."""
    model = tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 2)
    result = run_search(settings(steps=1, granularity=granularity, sparsity=0.5), model, SEQUENCES, sink_tokens=0)
    start = result.metrics[0]
    assert start["expected_sparsity"] == pytest.approx(0.5, abs=0.05)  # half the units start sliding, not none
    log_alpha = result.allocation.scores.view(4, -1)
    assert (log_alpha[[0, 2]] < 0).all() and (log_alpha[[1, 3]] > 0).all()
    dense = run_search(settings(steps=1, granularity=granularity, sparsity=0.5), tiny_model("llama"), SEQUENCES, 2)
    assert dense.metrics[0]["expected_sparsity"] < 0.05  # a plain model still starts all-full


def test_search_speed_bench_times_the_skipping_search_on_a_tiny_model(monkeypatch, tmp_path):
    """bench/search_speed.py on the CPU (tiny model): the +skip row runs --skip-closed-gates and records the share
    of closed heads; --rounds times every backend in every round; an unknown option is refused."""
    module = bench_module("search_speed", monkeypatch)
    out = tmp_path / "speed.json"
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--lengths", "64", "--losses", "lm", "--window",
                                     "16", "--warmup", "1", "--repeats", "2", "--backends", "sdpa,sdpa+skip",
                                     "--log-alpha-init", "-1", "--json", str(out)])
    module.main()
    row = json.loads(out.read_text())["rows"][0]
    assert row["sdpa+skip_closed_heads"] > 0.2 and row["sdpa_tokens_per_s"] > 0 and row["sdpa+skip_tokens_per_s"] > 0
    assert "sdpa_vs_dense_rounds" not in row  # one round: nothing to list
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--lengths", "64", "--losses", "lm", "kl",
                                     "--window", "16", "--warmup", "1", "--repeats", "2", "--backends", "sdpa,eager",
                                     "--rounds", "3", "--json", str(out)])
    module.main()
    rows = json.loads(out.read_text())["rows"]
    assert [row["loss"] for row in rows] == ["lm", "kl"]
    for row in rows:  # every backend timed in every round, each round's ratio listed
        assert len(row["sdpa_vs_dense_rounds"]) == 3 and len(row["eager_vs_dense_rounds"]) == 3
        assert row["sdpa_vs_dense_round_median"] == pytest.approx(sorted(row["sdpa_vs_dense_rounds"])[1], abs=1e-3)
        assert all(ratio > 0 for ratio in row["sdpa_vs_dense_rounds"] + row["eager_vs_dense_rounds"])
        assert row["sdpa_tokens_per_s"] > 0 and row["eager_tokens_per_s"] > 0
    # +cached: one calibration sequence, so the KL teacher comes from the search's cache after the first step; the
    # recipe's projection takes a teacher forward at the first visit of each of its sequences, the cache after.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seq_len: 64\nsteps: 10\nloss: kl\nwindow: 16\n")
    monkeypatch.setattr(module, "RECIPE", recipe)
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--lengths", "64", "--losses", "kl", "--window",
                                     "16", "--warmup", "1", "--repeats", "2", "--backends", "sdpa,sdpa+cached",
                                     "--recipe-sequences", "4", "--json", str(out)])
    module.main()
    row = json.loads(out.read_text())["rows"][0]
    assert row["sdpa+cached_tokens_per_s"] > 0 and row["sdpa_projected_recipe_minutes"] >= 0
    computing, recalling = 64 / row["sdpa_tokens_per_s"], 64 / row["sdpa+cached_tokens_per_s"]
    expected = (row["sdpa_warmup_s"] + computing * 3 + recalling * 6) / 60
    assert row["sdpa+cached_projected_recipe_minutes"] == pytest.approx(expected, abs=0.006)
    # A +cached row without its uncached partner (no projection then: session 13 lost two GPU runs to a KeyError),
    # two sequences per step, and +chunks (the compiled-chunk losses; the same on a CPU, which has no fused kernels).
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--lengths", "64", "--losses", "kl", "--window",
                                     "16", "--warmup", "1", "--repeats", "2", "--backends",
                                     "sdpa+cached,sdpa+chunks,sdpa+noguards", "--batch-size", "2", "--json", str(out)])
    stances = []  # +noguards: guards skipped from the end of the first step, the default stance back afterwards
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *args, **kwargs: stances.append((args, kwargs)))
    module.main()
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert report["batch_size"] == 2 and row["sdpa+cached_tokens_per_s"] > 0 and row["sdpa+chunks_tokens_per_s"] > 0
    assert row["sdpa+noguards_tokens_per_s"] > 0
    assert stances == [(("default",), {"skip_guard_eval_unsafe": True}), (("default",), {})]
    assert not any(key.endswith("projected_recipe_minutes") for key in row)  # the recipe runs one sequence a step
    # --device-busy: kernel time against wall time per step (no device time on a CPU: the structure only)
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--lengths", "64", "--losses", "kl", "--window",
                                     "16", "--warmup", "1", "--repeats", "2", "--backends", "sdpa", "--device-busy",
                                     "--json", str(out)])
    module.main()
    busy = json.loads(out.read_text())["device_busy"][0]
    assert set(busy) == {"tokens", "dense", "kl/sdpa"} and busy["kl/sdpa"]["wall_ms"] > 0
    assert busy["dense"]["kernel_ms"] == 0.0 and busy["dense"]["busy_share"] == 0.0
    tables = tmp_path / "host"  # --host-tables: the host's operators per step kind
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--lengths", "64", "--losses", "lm", "--window",
                                     "16", "--warmup", "1", "--repeats", "1", "--backends", "sdpa", "--device-busy",
                                     "--host-tables", str(tables), "--json", str(out)])
    module.main()
    assert sorted(path.name for path in tables.iterdir()) == ["host-64-dense.txt", "host-64-lm-sdpa.txt"]
    assert "aten::mm" in (tables / "host-64-lm-sdpa.txt").read_text()
    monkeypatch.setattr("sys.argv", ["search_speed.py", "--tiny", "--backends", "sdpa+fast", "--json", str(out)])
    with pytest.raises(SystemExit):
        module.main()


def test_the_step_split_at_the_relaxed_weights_has_the_search_steps_gradient(monkeypatch, tmp_path):
    """bench/graph_step.py (the CUDA-graph prototype) splits the step at a static leaf of relaxed weights and sends
    the leaf's gradient on through the gate sample: the same loss and log_alpha gradient as one backward; and the
    script runs on a CPU without graphs."""
    from consa_cli.attention import install_hybrid, remove_hybrid

    module = bench_module("graph_step", monkeypatch)
    model = tiny_model("qwen3")
    layout = UnitLayout("kv-head", model.config.num_hidden_layers, model.config.num_key_value_heads)
    gates = HardConcreteGates(layout.num_units, -0.5, 2.0 / 3.0, -0.1, 1.1)
    ids = SEQUENCES[:1]
    install_hybrid(model, torch.ones(layout.num_layers, layout.num_kv_heads, dtype=torch.bool), 8, 2)
    try:
        plain = module.plain_step(model, gates, layout, ids, torch.Generator().manual_seed(4))
        plain_grad, gates.log_alpha.grad = gates.log_alpha.grad.clone(), None
        gated = module.GatedLogits(model)
        split = module.split_step(gated, gated, gates, layout, ids, torch.Generator().manual_seed(4))
    finally:
        remove_hybrid(model)
    assert plain_grad.abs().max() > 0 and split == plain
    torch.testing.assert_close(gates.log_alpha.grad, plain_grad, rtol=1e-5, atol=1e-7)
    out = tmp_path / "graph.json"
    monkeypatch.setattr("sys.argv", ["graph_step.py", "--tiny", "--lengths", "64", "--window", "16", "--warmup", "1",
                                     "--repeats", "2", "--json", str(out)])
    module.main()
    row = json.loads(out.read_text())["rows"][0]
    assert row["plain_ms"] > 0 and row["split_ms"] > 0 and "graphed_ms" not in row  # no graphs on a CPU
