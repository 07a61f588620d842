"""consa heal: the weights trained under a fixed allocation toward the dense model, written as an export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, save_tiny, tiny_model, tiny_text
from typer.testing import CliRunner

from consa_cli.allocation import Allocation
from consa_cli.attention import hybrid_attention
from consa_cli.calibration import CalibrationSet
from consa_cli.cli import app
from consa_cli.data import load_token_sequences
from consa_cli.evaluate import EvalSettings, evaluate, resolve_targets
from consa_cli.export import MASK_FILE, ExportError, load_hybrid
from consa_cli.heal import (
    HEAL_LOG_FILE,
    answer_token_weights,
    heal,
    heal_weights,
    learning_rate,
    uses_cuda_graphs,
)
from consa_cli.losses import kl_to_teacher
from consa_cli.models import load_model_and_tokenizer, model_fingerprint
from consa_cli.settings import HealSettings, SettingsError, build_settings

WINDOW = 6
SEQ_LEN = 32
# Layer 0 all full, layer 3 half, layers 1-2 all sliding: "sliding" trains layers 1-3, never layer 0.
MASK = torch.tensor([[True, True], [False, False], [False, False], [True, False]])


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread):
    """Keep every test out of the real consa cache, on one torch thread."""


def write_allocation(tmp_path, model, model_dir, fa_mask=MASK, window=WINDOW, sinks=1):
    path = tmp_path / "allocation.safetensors"
    Allocation(fa_mask, "kv-head", window, sinks, method="learned", model=str(model_dir),
               model_fingerprint=model_fingerprint(model)).save(path)
    return path


def settings(tmp_path, data, **overrides) -> HealSettings:
    values = dict(data=str(data), seq_len=SEQ_LEN, steps=40, lr=3e-3, warmup_steps=2, device="cpu",
                  output=str(tmp_path / "healed"))
    return build_settings(HealSettings, None, **{**values, **overrides})


def hybrid_kl(model, dense, allocation: Allocation, sequences: torch.Tensor) -> float:
    """Mean KL(dense || hybrid) over ``sequences``."""
    with torch.no_grad():
        reference = dense(sequences).logits  # outside the context: ``model`` may be ``dense`` itself
        with hybrid_attention(model, allocation.fa_mask, allocation.sliding_window, allocation.sink_tokens):
            return kl_to_teacher(model(sequences).logits, reference).item()


def test_heal_brings_the_hybrid_closer_to_dense_and_writes_a_loadable_export(tmp_path):
    dense = save_tiny(tmp_path / "model", "qwen3")
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model")
    allocation = Allocation.load(allocation_path)
    # The tiny model's text is random words: nothing beyond the window carries over to unseen sequences, so the
    # loop is checked on the sequences it trains on, five, every step (the real model's held-out gains are
    # docs/results.md 1g.17's).
    data = tmp_path / "five.txt"
    data.write_text(tiny_text(words=200))  # 160 calibration tokens: five sequences of 32
    result = heal(allocation_path, settings(tmp_path, data, steps=40, batch_size=5, lr=1e-3))

    _, tokenizer = load_model_and_tokenizer(str(tmp_path / "model"), dtype=torch.float32)
    trained_on = load_token_sequences(str(data), tokenizer, SEQ_LEN, "calibration")
    assert trained_on.shape[0] == 5
    healed = load_hybrid(result.path)  # the export runs its hybrid attention itself
    with torch.no_grad():
        healed_kl = kl_to_teacher(healed(trained_on).logits, dense(trained_on).logits).item()
    before = hybrid_kl(dense, dense, allocation, trained_on)
    assert healed_kl < 0.5 * before, (before, healed_kl)

    # The allocation is unchanged; the mask now names the healed weights, and the export says where they came from.
    assert torch.equal(result.allocation.fa_mask, MASK)
    assert result.allocation.method == "learned+healed"
    section = json.loads((result.path / "config.json").read_text())["consa"]
    assert section["healed"]["source_fingerprint"] == model_fingerprint(dense) != result.allocation.model_fingerprint
    assert section["healed"]["settings"]["steps"] == 40
    log = json.loads((result.path / HEAL_LOG_FILE).read_text())
    assert [entry["step"] for entry in log["steps"]] == list(range(40)) and log["calibration_sequences"] == 5
    assert log["cuda_graphs"] is False  # a CPU healing: eager steps
    assert Allocation.load(result.path / MASK_FILE).model_fingerprint == result.allocation.model_fingerprint
    # The unhealed allocation cannot be applied to the healed weights by mistake.
    with pytest.raises(Exception, match="fingerprint"):
        allocation.check_fits(4, 2, model_fingerprint(healed))


@pytest.mark.parametrize("which", ["attention", "sliding", "all"])
def test_only_the_chosen_weights_change(tmp_path, tiny_text_file, which):
    dense = save_tiny(tmp_path / "model", "qwen3")
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model")
    result = heal(allocation_path, settings(tmp_path, tiny_text_file, steps=3, train=which))
    healed, _ = load_model_and_tokenizer(str(result.path), dtype=torch.float32)
    # MASK keeps each layer's full heads first, so the export stores every layer's KV heads in their own order and
    # the weights compare name by name.
    order = json.loads((result.path / "config.json").read_text())["consa"]["kv_head_order"]
    assert order == [[0, 1]] * 4
    dense_params = dict(dense.named_parameters())
    changed = {name for name, param in healed.named_parameters() if not torch.equal(param, dense_params[name])}
    attention = {name for name in dense_params if ".self_attn." in name}
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in changed & attention}
    if which == "attention":
        assert changed <= attention and layers == {0, 1, 2, 3}
    elif which == "sliding":
        assert changed <= attention and layers == {1, 2, 3}  # layer 0 is all full: frozen
    else:
        assert any(".mlp." in name for name in changed) and "model.embed_tokens.weight" not in changed


def test_a_half_precision_checkpoint_is_healed_in_float32_and_written_in_its_own_dtype(tmp_path, tiny_text_file):
    dense = save_tiny(tmp_path / "model", "qwen3", dtype=torch.bfloat16)
    model, _ = load_model_and_tokenizer(str(tmp_path / "model"), dtype=None)
    assert next(model.parameters()).dtype == torch.bfloat16
    allocation_path = write_allocation(tmp_path, model, tmp_path / "model")
    result = heal(allocation_path, settings(tmp_path, tiny_text_file, steps=3))
    healed, _ = load_model_and_tokenizer(str(result.path), dtype=None)
    assert next(healed.parameters()).dtype == torch.bfloat16
    del dense


def test_an_existing_output_is_kept_unless_forced_and_a_failed_heal_writes_nothing(tmp_path, tiny_text_file,
                                                                                     monkeypatch):
    dense = save_tiny(tmp_path / "model", "qwen3")
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model")
    output = tmp_path / "healed"
    output.mkdir()
    (output / "keep.txt").write_text("earlier work")
    with pytest.raises(ExportError, match="already exists"):
        heal(allocation_path, settings(tmp_path, tiny_text_file, steps=2))
    import consa_cli.heal as heal_module

    monkeypatch.setattr(heal_module, "kl_to_teacher", lambda student, teacher, weights: (student * float("nan")).mean())
    with pytest.raises(FloatingPointError, match="lower --lr"):
        heal(allocation_path, settings(tmp_path, tiny_text_file, steps=2), force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (output / "keep.txt").read_text() == "earlier work"


def test_eval_pairs_a_healed_export_with_the_dense_model_it_came_from(tmp_path, tiny_text_file):
    dense = save_tiny(tmp_path / "model", "qwen3")
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model")
    result = heal(allocation_path, settings(tmp_path, tiny_text_file, steps=5))
    rows = evaluate(resolve_targets([str(allocation_path), str(result.path)]),
                    EvalSettings(data=str(tiny_text_file), seq_lens=[SEQ_LEN], max_sequences=8))
    by_label = {row["label"]: row for row in rows}
    assert by_label["healed"]["kind"] == "export"
    dense_row = next(row for row in rows if row.get("is_reference"))
    # Paired over the same sequences: the mean difference is the difference of the means.
    expected = by_label["healed"]["nll"] - dense_row["nll"]
    assert by_label["healed"]["delta_nll_vs_dense"] == pytest.approx(expected, abs=1e-6)
    assert by_label["allocation"]["delta_nll_vs_dense"] is not None


def test_eval_pairs_an_allocation_file_recorded_as_healed_from_the_dense_weights(tmp_path, tiny_text_file):
    """An allocation file naming healed weights (bench/heal_prototype.py writes them) pairs with dense when its
    metadata says which weights they were healed from, and only then."""
    dense = save_tiny(tmp_path / "model", "qwen3")
    other = save_tiny(tmp_path / "other", "qwen3", seed=1)  # stands in for healed weights: not dense's
    rows_by_label = {}
    for name, metadata in (("recorded", {"healed": {"source_fingerprint": model_fingerprint(dense)}}),
                           ("unrecorded", {})):
        path = tmp_path / f"{name}.safetensors"
        Allocation(MASK, "kv-head", WINDOW, 1, method="learned+healed", model=str(tmp_path / "other"),
                   model_fingerprint=model_fingerprint(other), metadata=metadata).save(path)
        rows = evaluate(resolve_targets([str(path)]), EvalSettings(data=str(tiny_text_file), seq_lens=[SEQ_LEN],
                                                                   max_sequences=8,
                                                                   dense_model=str(tmp_path / "model")))
        rows_by_label.update({row["label"]: row for row in rows})
    dense_row = next(row for row in rows_by_label.values() if row.get("is_reference"))
    expected = rows_by_label["recorded"]["nll"] - dense_row["nll"]
    assert rows_by_label["recorded"]["delta_nll_vs_dense"] == pytest.approx(expected, abs=1e-6)
    assert rows_by_label["unrecorded"].get("delta_nll_vs_dense") is None


def test_answer_weights_add_each_retrieval_samples_answer_mean_and_are_the_plain_mean_otherwise():
    """Two sequences of 4 tokens, the second a retrieval sample answered at positions 2-3, answer weight 2: its loss
    is its mean KL + 2 x its answers' mean KL, the batch's the mean of the two sequences' -- worked by hand."""
    mask = torch.tensor([[True] * 4, [False, False, True, True]])
    calibration = CalibrationSet(torch.zeros(2, 4, dtype=torch.long), mask, torch.tensor([False, True]))
    rows = torch.tensor([0, 1])
    weights = answer_token_weights(calibration, rows, 2.0)
    assert weights.tolist() == [0.125] * 4 + [0.125, 0.125, 0.625, 0.625]
    student, teacher = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    log_p, log_q = teacher.log_softmax(-1).flatten(0, 1), student.log_softmax(-1).flatten(0, 1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    expected = (per_token[:4].mean() + per_token[4:].mean() + 2.0 * per_token[6:].mean()) / 2
    assert kl_to_teacher(student, teacher, weights).item() == pytest.approx(expected.item(), rel=1e-5)
    # The plain mean (None) without a weight or without a retrieval sample in the batch.
    assert answer_token_weights(calibration, rows, 0.0) is None
    assert answer_token_weights(calibration, torch.tensor([0]), 2.0) is None


def test_the_answer_weight_changes_the_healing_only_where_retrieval_samples_are(tmp_path):
    dense = save_tiny(tmp_path / "model", "qwen3")
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model")
    data = tmp_path / "text.txt"
    data.write_text(tiny_text(words=400))
    mixed = dict(seq_len=64, steps=4, batch_size=2, lr=1e-3, retrieval_fraction=0.5, max_needles=1)
    weights = {}
    for name, overrides in {"plain": {}, "answers": dict(answer_weight=5.0)}.items():
        result = heal(allocation_path, settings(tmp_path, data, **mixed, **overrides, output=str(tmp_path / name)))
        log = json.loads((result.path / HEAL_LOG_FILE).read_text())
        assert log["retrieval_sequences"] > 0 and log["settings"]["answer_weight"] == overrides.get("answer_weight", 0)
        healed, _ = load_model_and_tokenizer(str(result.path), dtype=torch.float32)
        weights[name] = healed.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(weights["plain"], weights["answers"])


def test_cuda_graphs_are_on_by_default_only_for_cuda_sdpa_and_need_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_cuda_graphs(HealSettings(), cuda, "sdpa")
    assert not uses_cuda_graphs(HealSettings(), cpu, "sdpa")
    assert not uses_cuda_graphs(HealSettings(), cuda, "flex") and not uses_cuda_graphs(HealSettings(), cuda, "eager")
    assert not uses_cuda_graphs(HealSettings(cuda_graphs=False), cuda, "sdpa")
    assert uses_cuda_graphs(HealSettings(cuda_graphs=True), cuda, "flex")  # asked for: the user's call
    # Asked for on a CPU model: refused, and the model leaves as it came (original attention, nothing trainable).
    model, teacher = tiny_model("llama"), tiny_model("llama")
    allocation = Allocation(MASK, "kv-head", WINDOW, 1, method="learned")
    calibration = CalibrationSet.text_only(torch.randint(0, 96, (4, SEQ_LEN), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(SettingsError, match="--cuda-graphs needs a CUDA device"):
        heal_weights(model, teacher, allocation, calibration, HealSettings(steps=2), cuda_graphs=True)
    assert not any(param.requires_grad for param in model.parameters()) and not model.training
    ids = calibration.sequences[:1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("llama")(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("answer_weight", [0.0, 2.0])
def test_graphed_healing_steps_compute_what_the_eager_steps_compute(answer_weight):
    """The graphed student (forward and backward) and teacher give the eager step's KL and weights: the same loss,
    clipping and AdamW on the same rows, with and without answer-weighted retrieval samples."""
    torch.backends.cuda.matmul.allow_tf32 = False
    allocation = Allocation(MASK, "kv-head", WINDOW, 1, method="learned")
    rows = torch.randint(0, 96, (8, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    is_retrieval = torch.tensor([False, True] * 4)
    loss_mask = torch.zeros(8, SEQ_LEN, dtype=torch.bool)
    loss_mask[1::2, -4:] = True
    calibration = CalibrationSet(rows, loss_mask, is_retrieval)
    config = HealSettings(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, answer_weight=answer_weight,
                          retrieval_fraction=0.5 if answer_weight else 0.0)
    results = {}
    for graphs in (False, True):
        model, teacher = tiny_model("llama").cuda(), tiny_model("llama").cuda()
        log = heal_weights(model, teacher, allocation, calibration, config, "sdpa", cuda_graphs=graphs)
        results[graphs] = ([entry["kl"] for entry in log], model.model.layers[1].self_attn.q_proj.weight.cpu())
    eager, graphed = results[False], results[True]
    assert graphed[0] == pytest.approx(eager[0], rel=1e-4) and eager[0][0] > 0
    assert torch.allclose(graphed[1], eager[1], atol=1e-5)
    assert not torch.equal(eager[1], tiny_model("llama").model.layers[1].self_attn.q_proj.weight)  # it trained


def test_learning_rate_warms_up_then_decays_to_zero():
    config = HealSettings(steps=100, lr=1e-4, warmup_steps=10)
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-5, rel=0.01) and max(rates) == pytest.approx(rates[9])
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False)) and rates[-1] < 1e-7
    assert learning_rate(0, HealSettings(steps=10, lr=1e-4, warmup_steps=0)) == pytest.approx(1e-4)


@pytest.mark.parametrize("overrides, message", [
    (dict(train="mlp"), "--train"), (dict(steps=0), "--steps"), (dict(lr=0.0), "--lr"),
    (dict(retrieval_fraction=1.0), "--retrieval-fraction"), (dict(attention_backend="cudnn"), "--attention-backend"),
    (dict(retrieval_formats="no-such-format"), "--retrieval-formats"), (dict(max_grad_norm=0.0), "--max-grad-norm"),
    (dict(max_needles=0), "--max-needles"), (dict(max_needles=17), "--max-needles"),
    (dict(answer_weight=-1.0, retrieval_fraction=0.5), "--answer-weight"),
    (dict(answer_weight=float("nan"), retrieval_fraction=0.5), "--answer-weight"),
    (dict(answer_weight=1.0), "--retrieval-fraction 0 makes none"),
])
def test_bad_heal_settings_are_refused(overrides, message):
    with pytest.raises(SettingsError, match=message):
        build_settings(HealSettings, None, **overrides)


def test_cli_heals_and_refuses_bad_input_in_one_line(tmp_path, tiny_text_file):
    dense = save_tiny(tmp_path / "model", "qwen3")
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model")
    runner = CliRunner()
    common = ["--data", str(tiny_text_file), "--seq-len", str(SEQ_LEN), "--device", "cpu", "--steps", "4",
              "--lr", "1e-3"]
    done = runner.invoke(app, ["heal", str(allocation_path), "-o", str(tmp_path / "out"), *common])
    assert done.exit_code == 0, done.output
    assert "KL to the dense model" in done.output and "consa eval" in done.output
    assert (tmp_path / "out" / MASK_FILE).is_file()

    for args, message in [
        (["heal", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x"), *common], "missing"),
        (["heal", str(allocation_path), "-o", str(tmp_path / "out"), *common], "already exists"),
        (["heal", str(allocation_path), "-o", str(tmp_path / "y"), *common, "--train", "mlp"], "--train"),
        (["heal", str(allocation_path), "-o", str(tmp_path / "z"), *common, "--seq-len", "4"], "window"),
        (["heal", str(allocation_path), "-o", str(tmp_path / "z"), *common, "--answer-weight", "1"], "--answer-weight"),
        (["heal", str(allocation_path), "-o", str(tmp_path / "z"), *common, "--max-needles", "0"], "--max-needles"),
        (["heal", str(allocation_path), "-o", str(tmp_path / "z"), *common, "--cuda-graphs"], "--cuda-graphs needs"),
    ]:
        failed = runner.invoke(app, args)
        assert failed.exit_code == 2, (args, failed.output)
        error_lines = [line for line in failed.output.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and message in error_lines[0], failed.output
        assert "Traceback" not in failed.output
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_a_heal_recipe_sets_defaults_that_flags_override_and_unknown_keys_are_refused(tmp_path):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text("steps: 7\ntrain: sliding\nlr: 1.0e-4\n")
    settings = build_settings(HealSettings, recipe, steps=9)
    assert (settings.steps, settings.train, settings.lr) == (9, "sliding", 1e-4)
    recipe.write_text("steps: 7\nsparsity: 0.5\n")  # a search setting: not one of heal's
    with pytest.raises(SettingsError, match="unknown settings: sparsity"):
        build_settings(HealSettings, recipe)


# Not qwen2: transformers loads a qwen2 directory's tokenizer as Qwen2Tokenizer whatever it was saved as, and that
# maps the tiny word-level text to no tokens at all (the real Qwen2 tokenizer is what real checkpoints carry).
@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "qwen2"])
def test_every_family_heals_a_layer_allocation_into_an_export_of_its_own_loader(tmp_path, tiny_text_file, family):
    """A layer allocation without sinks exports natively where the family can (plain transformers runs it), else
    through consa; healed weights go through the same writer and its logit check."""
    dense = save_tiny(tmp_path / "model", family)
    layers = torch.tensor([[True, True], [False, False], [False, False], [True, True]])
    allocation_path = write_allocation(tmp_path, dense, tmp_path / "model", fa_mask=layers, sinks=0)
    result = heal(allocation_path, settings(tmp_path, tiny_text_file, steps=2, lr=1e-3))
    expected = "consa" if family == "gemma3_text" else "transformers"  # Gemma3: native only for its own pattern
    assert result.loader == expected
    healed = load_hybrid(result.path)
    assert torch.equal(healed.consa_allocation.fa_mask, layers)
    assert model_fingerprint(healed) == result.allocation.model_fingerprint != model_fingerprint(dense)
