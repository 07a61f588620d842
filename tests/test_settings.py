"""Search settings: the retrieval loss, its one-line error, and settings written before it existed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from consa_cli.calibration import CalibrationSet
from consa_cli.checkpoint import load_checkpoint
from consa_cli.cli import app
from consa_cli.search import run_search
from consa_cli.settings import SearchSettings, SettingsError, build_settings, resumed_settings

SEQUENCES = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread, monkeypatch):
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))


def mixed() -> CalibrationSet:
    """Four text sequences and four retrieval samples scoring their last two positions."""
    mask = torch.ones_like(SEQUENCES, dtype=torch.bool)
    mask[4:] = False
    mask[4:, -3:-1] = True
    return CalibrationSet(SEQUENCES, mask, torch.arange(8) >= 4)


def search(run_dir=None, resume=None, **overrides):
    values = dict(window=8, seq_len=32, steps=4, sparsity=0.5, target_warmup_steps=2, dtype="float32",
                  batch_size=2, loss="kl", checkpoint_every=2)
    settings = overrides.pop("settings", None) or SearchSettings(**{**values, **overrides})
    return run_search(settings, tiny_model("qwen3"), mixed(), 2, "tiny-qwen3", checkpoint_dir=run_dir,
                      resume=resume)


def test_a_checkpoint_without_retrieval_loss_resumes_scoring_retrieval_with_loss(tmp_path):
    """Before retrieval_loss existed the retrieval sequences used ``loss``; a resumed old run still does."""
    search(tmp_path, steps=2, retrieval_loss="kl")
    checkpoint = load_checkpoint(tmp_path)
    del checkpoint.settings["retrieval_loss"]  # as an older consa wrote it
    settings = resumed_settings(checkpoint.settings, tmp_path, checkpoint.step, steps=4)
    assert (settings.loss, settings.retrieval_loss) == ("kl", "kl")
    resumed = search(resume=checkpoint, settings=settings).allocation.scores
    assert torch.equal(resumed, search(retrieval_loss="kl").allocation.scores)
    assert not torch.equal(resumed, search(retrieval_loss="lm").allocation.scores)


def test_a_recipe_without_retrieval_loss_scores_retrieval_with_loss(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("retrieval_fraction: 0.5\nloss: kl\n")
    assert build_settings(SearchSettings, recipe).retrieval_loss == "kl"
    assert build_settings(SearchSettings, recipe, loss="lm").retrieval_loss == "lm"  # the loss in force
    assert build_settings(SearchSettings, recipe, retrieval_loss="lm").retrieval_loss == "lm"
    assert build_settings(SearchSettings, None, retrieval_fraction=0.5).retrieval_loss == "lm"  # the default
    recipe.write_text("retrieval_fraction: 0.5\nloss: kl\nretrieval_loss: lm\n")
    assert build_settings(SearchSettings, recipe).retrieval_loss == "lm"
    shipped = Path(__file__).parent.parent / "recipes" / "smollm2-135m-kv-head.yaml"  # equals a bare search
    assert build_settings(SearchSettings, shipped, retrieval_fraction=0.5).retrieval_loss == SearchSettings.retrieval_loss


def test_bad_retrieval_loss_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["search", "--retrieval-loss", "bad", "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: --retrieval-loss must be one of kl, lm, got 'bad'\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "value"), [("0.75", 0.75), ("5/6", 5 / 6), (" 1/2 ", 0.5), ("1", 1.0)])
def test_a_sparsity_is_a_decimal_or_a_ratio(text, value):
    from consa_cli.settings import fraction

    assert fraction(text) == value


@pytest.mark.parametrize("text", ["", "a", "1/0", "1/2/3", "x/2"])
def test_a_sparsity_that_is_neither_is_refused(text):
    from consa_cli.settings import fraction

    with pytest.raises(ValueError, match="a number like 0.75 or a ratio like 5/6"):
        fraction(text)



def test_the_calibration_haystack_comes_from_a_recipe_or_a_flag_and_old_runs_resume_on_text(tmp_path):
    recipe = tmp_path / "filler.yaml"
    recipe.write_text("retrieval_fraction: 0.5\ncalibration_haystack: filler\n")
    assert build_settings(SearchSettings, recipe).calibration_haystack == "filler"
    assert build_settings(SearchSettings, recipe, calibration_haystack="text").calibration_haystack == "text"
    assert build_settings(SearchSettings, None).calibration_haystack == "text"
    recipe.write_text("calibration_haystack: noise\n")
    with pytest.raises(SettingsError, match="--calibration-haystack must be one of text, filler, got 'noise'"):
        build_settings(SearchSettings, recipe)
    search(tmp_path, steps=2)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.settings["calibration_haystack"] == "text"  # recorded with the run's other settings
    del checkpoint.settings["calibration_haystack"]  # as a run checkpointed before the option wrote it
    assert resumed_settings(checkpoint.settings, tmp_path, checkpoint.step, steps=4).calibration_haystack == "text"
    with pytest.raises(SettingsError, match="--calibration-haystack differs"):
        resumed_settings(checkpoint.settings, tmp_path, checkpoint.step, calibration_haystack="filler")
