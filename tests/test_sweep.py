"""The sparsity sweep: planning and its checks, and searches + rules + evaluation + report end to end."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from consa_cli.allocation import Allocation, AllocationError
from consa_cli.evaluate import EvalSettings
from consa_cli.settings import SearchSettings, SettingsError
from consa_cli.sweep import EVAL_FILE, REPORT_DIR, _with, plan_sweep, run_sweep


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread):
    """Keep every test out of the real consa cache, on one torch thread."""


def tiny_search(model_dir, data_file, **overrides) -> SearchSettings:
    return SearchSettings(**{"model": str(model_dir), "data": str(data_file), "seq_len": 32, "window": 4,
                             "steps": 2, "dtype": "float32", "device": "cpu", "checkpoint_every": 0, **overrides})


def test_plan_lists_every_search_and_rule(tmp_path):
    runs = plan_sweep(SearchSettings(), [0.5, 0.75], ["kv-head", "layer"], ["interleaved", "native"], [],
                      tmp_path / "sweep")
    searches = [run for run in runs if run.settings is not None]
    assert [(run.granularity, run.sparsity) for run in searches] == [
        ("kv-head", 0.5), ("kv-head", 0.75), ("layer", 0.5), ("layer", 0.75)]
    assert all(run.settings.output == str(tmp_path / "sweep" / run.name) for run in searches)
    assert [(run.settings.sparsity, run.settings.granularity) for run in searches] == [
        (run.sparsity, run.granularity) for run in searches]
    rules = [run.name for run in runs if run.rule is not None]
    assert rules == ["rule-interleaved-kv-head-s0.5", "rule-interleaved-kv-head-s0.75",
                     "rule-interleaved-layer-s0.5", "rule-interleaved-layer-s0.75", "native"]  # native once
    assert SearchSettings().sparsity == 0.75  # the base settings are copied, never changed


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(sparsities=[]), "at least one"),
    (dict(sparsities=[1.5]), "--sparsities must lie between 0 and 1, got 1.5"),
    (dict(granularities=["head"]), "--granularity must be one of"),
    (dict(rules=["diagonal"]), "unknown rule 'diagonal'"),
    (dict(rules=["uniform-heads"], granularities=["layer"]), "needs a KV-head granularity"),
    (dict(sparsities=[0.5, 0.5]), "twice"),
])
def test_plan_refuses_bad_sweeps(tmp_path, arguments, message):
    plan = {"sparsities": [0.5], "granularities": ["kv-head"], "rules": [], "methods": [], **arguments}
    with pytest.raises(SettingsError, match=message):
        plan_sweep(SearchSettings(), plan["sparsities"], plan["granularities"], plan["rules"], plan["methods"],
                   tmp_path)


def test_methods_replace_the_settings_method_field():
    @dataclass
    class WithMethod:
        sparsity: float = 0.5
        method: str = "l0"

    @dataclass
    class WithoutMethod:
        sparsity: float = 0.5

    assert _with(WithMethod(), method="scalar-l1", sparsity=0.75) == WithMethod(0.75, "scalar-l1")
    assert _with(WithMethod(), sparsity=0.25) == WithMethod(0.25, "l0")  # no method given: the settings' own
    with pytest.raises(SettingsError, match="no search methods"):
        _with(WithoutMethod(), method="scalar-l1")


def test_sweep_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_text_file):
    pytest.importorskip("matplotlib")
    events = []
    output = tmp_path / "sweep"
    result = run_sweep(tiny_search(tiny_model_dir, tiny_text_file),
                       EvalSettings(data=str(tiny_text_file), seq_lens=[32], max_sequences=2, dtype="float32"),
                       [0.5, 0.75], ["kv-head"], ["interleaved", "uniform-heads"], [], output, on_event=events.append,
                       command="consa sweep --sparsities 0.5,0.75")

    learned = sorted(p.name for p in output.iterdir() if p.name.endswith(("s0.5", "s0.75")) and "rule" not in p.name)
    assert len(learned) == 2 and len(result.search_seconds) == 2
    for run in result.runs:  # every allocation at its requested sparsity, on the tiny model's 4 x 2 units
        allocation = Allocation.load(output / run.name)
        assert allocation.sparsity == run.sparsity and allocation.num_units == 8
        assert allocation.sliding_window == 4 and allocation.sink_tokens == 4  # qwen3's default sinks
        assert (run.settings is None) == allocation.method.startswith("rule:")
    assert [event for event in events if event.startswith("search")] == [
        f"search 1/2: {learned[0]}", f"search 2/2: {learned[1]}"]

    rows = json.loads((output / EVAL_FILE).read_text())["rows"]
    assert rows[0]["is_reference"] and len(rows) == 1 + 6
    assert {row["label"] for row in rows[1:]} == {run.name for run in result.runs}
    assert all(row["delta_nll_vs_dense"] is not None and "position_buckets" in row for row in rows[1:])
    report = (output / REPORT_DIR / "report.md").read_text()
    assert report.startswith(f"# consa sweep: {tiny_model_dir}\n\n```bash\nconsa sweep --sparsities 0.5,0.75\n```")
    assert {p.name for p in (output / REPORT_DIR).glob("*.png")} == {
        "delta-nll-32.png", "delta-nll-beyond-window-32.png", "masks-sparsity-0.5.png", "masks-sparsity-0.75.png"}

    with pytest.raises(FileExistsError, match="already holds a run"):  # a finished sweep is not mixed into
        run_sweep(tiny_search(tiny_model_dir, tiny_text_file), EvalSettings(), [0.5], ["kv-head"], [], [], output)


def test_sweep_refuses_a_per_layer_ratio_the_model_cannot_give_before_searching(tmp_path, tiny_model_dir,
                                                                              tiny_text_file):
    # 2 KV heads per layer: sparsity 0.75 would need 0.5 full heads per layer.
    with pytest.raises(AllocationError, match="same whole number of sliding heads"):
        run_sweep(tiny_search(tiny_model_dir, tiny_text_file), EvalSettings(), [0.75], ["kv-head-per-layer"], [],
                  [], tmp_path / "sweep", report=False)
    assert not (tmp_path / "sweep").exists()
