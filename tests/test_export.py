"""Export: native checkpoints plain transformers runs as the hybrid, consa-loaded ones, and safe writing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, save_tiny
from transformers import AutoModelForCausalLM

from consa_cli.allocation import Allocation, AllocationError
from consa_cli.attention import hybrid_attention
from consa_cli.export import MASK_FILE, ExportError, export_checkpoint
from consa_cli.models import model_fingerprint

WINDOW = 6
TOKENS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))  # 40 > 2 * WINDOW
LAYERS = [True, False, False, True]
MIXED = torch.tensor([[True, False], [False, False], [False, True], [True, True]])


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread):
    """Keep every test out of the real consa cache, on one torch thread."""


def layer_mask(layers: list[bool], heads: int = 2) -> torch.Tensor:
    return torch.tensor(layers).unsqueeze(1).expand(len(layers), heads).clone()


def write_run(run_dir, model, model_dir, fa_mask, granularity="layer", sinks=0, window=WINDOW, **fields):
    """A run directory holding ``allocation.safetensors`` for the checkpoint at ``model_dir``."""
    values = dict(model=str(model_dir), model_fingerprint=model_fingerprint(model), method="test")
    Allocation(fa_mask, granularity, window, sinks, **{**values, **fields}).save(run_dir / "allocation.safetensors")
    return run_dir


def checkpoint(tmp_path, family="qwen3", **overrides):
    """(model, its saved directory, an empty run directory) under ``tmp_path``."""
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    run_dir.mkdir()
    return save_tiny(model_dir, family, **overrides), model_dir, run_dir


def runtime_logits(model, fa_mask, sinks=0, window=WINDOW) -> torch.Tensor:
    with torch.no_grad(), hybrid_attention(model, fa_mask, window, sinks):
        return model(TOKENS).logits


def staging_leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_export_runs_natively_in_plain_transformers(tmp_path, family):
    overrides, layers = {}, LAYERS
    if family == "gemma3_text":  # only the model's own layer types are native for Gemma3 (RoPE follows them)
        overrides = {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]}
    model, model_dir, run_dir = checkpoint(tmp_path, family, **overrides)
    write_run(run_dir, model, model_dir, layer_mask(layers))
    out = tmp_path / "export"

    result = export_checkpoint(run_dir, out)

    assert result.loader == "transformers"
    assert result.max_logit_difference is not None and result.max_logit_difference < 1e-3
    config = json.loads((out / "config.json").read_text())
    expected_types = ["full_attention" if full else "sliding_attention" for full in layers]
    assert config["layer_types"] == expected_types
    assert config["sliding_window"] == WINDOW
    if family.startswith("qwen"):
        assert config["use_sliding_window"] is True and config["max_window_layers"] == 0
    relabelled = {"llama": "smollm3", "mistral": "ministral"}
    assert config["model_type"] == relabelled.get(family, family)
    assert config["consa"]["loader"] == "transformers"
    assert config["consa"]["allocation"]["sink_tokens"] == 0
    assert (out / MASK_FILE).is_file() and (out / "tokenizer.json").is_file()

    native = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no consa attention
    assert native.config._attn_implementation != "consa"
    assert not any(hasattr(module, "consa_hybrid") for module in native.modules())
    with torch.no_grad():
        native_logits = native(TOKENS).logits
    expected = runtime_logits(model, layer_mask(layers))
    torch.testing.assert_close(native_logits, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        dense = model(TOKENS).logits
    assert (native_logits - dense).abs().max() > 1e-3  # the window really applies at 40 tokens
    assert staging_leftovers(tmp_path) == []


@pytest.mark.parametrize(("fa_mask", "granularity", "sinks"), [
    (MIXED, "kv-head", 0),
    (MIXED, "kv-head", 3),
    (layer_mask(LAYERS), "layer", 2),
], ids=["kv-head", "kv-head-sinks", "layer-sinks"])
def test_non_native_export_loads_through_consa(tmp_path, fa_mask, granularity, sinks):
    from consa_cli import load_hybrid

    model, model_dir, run_dir = checkpoint(tmp_path, "llama")
    write_run(run_dir, model, model_dir, fa_mask, granularity, sinks)
    out = tmp_path / "export"

    result = export_checkpoint(run_dir, out)

    assert result.loader == "consa" and result.max_logit_difference < 1e-4  # KV heads reordered and verified
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "layer_types" not in config  # the original config, untouched
    assert config["consa"]["loader"] == "consa"
    assert config["consa"]["load_with"] == "consa_cli.load_hybrid"
    assert config["consa"]["full_heads_per_layer"] == fa_mask.sum(dim=1).tolist()
    loaded = load_hybrid(out)
    assert loaded.config._attn_implementation == "consa_hybrid"  # FA heads first: split-head inference runtime
    assert torch.equal(loaded.consa_allocation.fa_mask, fa_mask)
    with torch.no_grad():
        logits = loaded(TOKENS).logits
    torch.testing.assert_close(logits, runtime_logits(model, fa_mask, sinks), rtol=1e-5, atol=1e-5)
    loaded_model, tokenizer = load_hybrid(out, return_tokenizer=True)
    assert tokenizer.eos_token == "<eos>" and len(tokenizer) == 96


def test_consa_export_of_every_family_reproduces_the_runtime(tmp_path):
    """Mixed heads with sinks in each family (one small model each)."""
    from consa_cli import load_hybrid

    for family in FAMILIES:
        (tmp_path / family).mkdir()
        model, model_dir, run_dir = checkpoint(tmp_path / family, family)
        write_run(run_dir, model, model_dir, MIXED, "kv-head", sinks=2)
        out = tmp_path / family / "export"
        assert export_checkpoint(run_dir, out).loader == "consa"
        with torch.no_grad():
            logits = load_hybrid(out)(TOKENS).logits
        # Reordered heads sum in another order: equal up to float32 rounding.
        torch.testing.assert_close(logits, runtime_logits(model, MIXED, 2), rtol=1e-5, atol=1e-5, msg=family)


def test_gemma3_layer_export_that_changes_layer_types_is_not_native(tmp_path):
    model, model_dir, run_dir = checkpoint(tmp_path, "gemma3_text")  # tiny Gemma3: every layer sliding
    write_run(run_dir, model, model_dir, layer_mask(LAYERS))
    assert export_checkpoint(run_dir, tmp_path / "export").loader == "consa"


def test_existing_output_is_refused_without_force_and_replaced_with_force(tmp_path):
    model, model_dir, run_dir = checkpoint(tmp_path)
    write_run(run_dir, model, model_dir, layer_mask(LAYERS))
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(ExportError, match="already exists.*--force"):
        export_checkpoint(run_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert staging_leftovers(tmp_path) == []

    result = export_checkpoint(run_dir, out, force=True)
    assert result.path == out
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file() and (out / MASK_FILE).is_file()
    assert staging_leftovers(tmp_path) == []

    export_checkpoint(run_dir, out, force=True)  # replacing a previous export works too
    assert staging_leftovers(tmp_path) == []


@pytest.mark.parametrize("mismatch", ["layers", "heads", "fingerprint"])
def test_allocation_for_another_model_is_refused_and_nothing_is_written(tmp_path, mismatch):
    model, model_dir, run_dir = checkpoint(tmp_path)
    if mismatch == "layers":
        write_run(run_dir, model, model_dir, layer_mask([True, False, True]))
        message = "allocation is for 3 layers x 2 KV heads, but the model has 4 layers x 2 KV heads"
    elif mismatch == "heads":
        write_run(run_dir, model, model_dir, torch.ones(4, 4, dtype=torch.bool))
        message = "allocation is for 4 layers x 4 KV heads, but the model has 4 layers x 2 KV heads"
    else:
        other = save_tiny(tmp_path / "other", "qwen3", seed=1)
        write_run(run_dir, other, model_dir, layer_mask(LAYERS))
        message = f"another model \\(fingerprint {model_fingerprint(other)}, this model {model_fingerprint(model)}"
    out = tmp_path / "exports" / "export"

    with pytest.raises(AllocationError, match=message):
        export_checkpoint(run_dir, out)
    assert not out.exists() and not out.parent.exists()
    assert staging_leftovers(tmp_path) == []


def test_model_override_is_checked_against_the_allocation(tmp_path):
    model, model_dir, run_dir = checkpoint(tmp_path)
    write_run(run_dir, model, model_dir, layer_mask(LAYERS))
    save_tiny(tmp_path / "other", "qwen3", seed=1)
    with pytest.raises(AllocationError, match="another model"):
        export_checkpoint(run_dir, tmp_path / "export", model_name=str(tmp_path / "other"))
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("mismatch", ["shape", "fingerprint"])
def test_load_hybrid_refuses_a_mask_that_does_not_fit_the_weights(tmp_path, mismatch):
    from consa_cli import load_hybrid

    model, model_dir, run_dir = checkpoint(tmp_path)
    write_run(run_dir, model, model_dir, MIXED, "kv-head")
    out = tmp_path / "export"
    export_checkpoint(run_dir, out)
    if mismatch == "shape":
        Allocation(MIXED[:3], "kv-head", WINDOW, 0).save(out / MASK_FILE)
        message = "allocation is for 3 layers x 2 KV heads"
    else:
        Allocation(MIXED, "kv-head", WINDOW, 0, model_fingerprint="0123456789abcdef").save(out / MASK_FILE)
        message = "another model"
    with pytest.raises(AllocationError, match=message):
        load_hybrid(out)


def test_load_hybrid_refuses_a_directory_that_is_not_an_export(tmp_path):
    from consa_cli import load_hybrid

    _, model_dir, _ = checkpoint(tmp_path)
    with pytest.raises(ExportError, match="no 'consa' section"):
        load_hybrid(model_dir)
    with pytest.raises(ExportError, match="no config.json"):
        load_hybrid(tmp_path / "run")


def test_package_exposes_load_hybrid_and_allocation_lazily():
    import consa_cli
    from consa_cli import Allocation as LazyAllocation
    from consa_cli import load_hybrid
    from consa_cli.export import load_hybrid as export_load_hybrid

    assert load_hybrid is export_load_hybrid and LazyAllocation is Allocation
    assert set(consa_cli.__all__) == {"Allocation", "load_hybrid", "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        consa_cli.nope  # noqa: B018
