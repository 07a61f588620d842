"""The vote over allocations, and ``consa search --seeds N``: one search per seed, the allocation their vote."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import consa_cli.search
from consa_cli.allocation import Allocation, AllocationError
from consa_cli.checkpoint import CHECKPOINT_FILE, load_checkpoint
from consa_cli.cli import app
from consa_cli.search import METRICS_FILE, RUN_FILE
from consa_cli.vote import vote

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(isolated_consa_cache, one_thread, monkeypatch):
    """Out of the real consa cache, on one torch thread; progress-bar settings restored afterwards."""
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))


def allocation(units: list[int], scores: list[float] | None = None, granularity: str = "kv-head",
               num_kv_heads: int = 2, **overrides) -> Allocation:
    """An allocation whose ``units`` (indices in unit order) keep full attention."""
    num_units = len(scores) if scores is not None else overrides.pop("num_units", 4)
    unit_mask = torch.zeros(num_units, dtype=torch.bool)
    unit_mask[units] = True
    fa_mask = (unit_mask.unsqueeze(1).expand(-1, num_kv_heads) if granularity == "layer"
               else unit_mask.view(-1, num_kv_heads))
    return Allocation(fa_mask, granularity, overrides.pop("sliding_window", 8), overrides.pop("sink_tokens", 2),
                      model_fingerprint=overrides.pop("model_fingerprint", "tiny"),
                      scores=None if scores is None else torch.tensor(scores), **overrides)


# --- vote() --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("favoured", [1, 2, 3])
def test_votes_decide_and_the_mean_standardised_score_breaks_ties(favoured):
    # Unit 0 has three votes, units 1-3 one each: the second full unit is the tie the scores break.
    kept = [[0, 1], [0, 2], [0, 3]]
    allocations = [allocation(units, [2.0 * (unit in units) + 1.5 * (unit == favoured) for unit in range(4)])
                   for units in kept]
    voted = vote(allocations)
    assert voted.unit_mask.nonzero().flatten().tolist() == sorted([0, favoured])
    assert voted.metadata["unit_votes"] == [3, 1, 1, 1]
    assert voted.method == "vote of 3" and len(voted.metadata["votes_of"]) == 3
    assert voted.scores.round().tolist() == [3, 1, 1, 1]  # the votes, the tie-break within half a vote


def test_one_vote_outweighs_any_score_difference():
    allocations = [allocation([0, 1], [-1e6, -1e6, 1e6, 0.0]), allocation([0, 2], [-1e6, 0.0, 1e6, 0.0]),
                   allocation([1, 3], [0.0, 1e6, 0.0, 1e6])]
    assert vote(allocations).unit_mask.nonzero().flatten().tolist() == [0, 1]  # two votes each, unit 2 one


def test_allocations_without_scores_take_no_part_in_the_tie_break():
    with_scores = allocation([0, 3], [1.0, 0.0, 0.0, 1.0])
    assert vote([with_scores, allocation([1, 2])]).unit_mask.nonzero().flatten().tolist() == [0, 3]


@pytest.mark.parametrize("granularity, num_units, sparsity, full_per_layer", [
    ("kv-head", 8, 0.75, None),
    ("layer", 4, 0.5, None),
    ("kv-head-per-layer", 8, 0.5, 1),
])
def test_vote_hits_the_target_at_every_granularity(granularity, num_units, sparsity, full_per_layer):
    generator = torch.Generator().manual_seed(0)
    keep = num_units // 2
    allocations = []
    for _ in range(3):
        scores = torch.randn(num_units, generator=generator)
        if full_per_layer:  # one full head in every layer
            units = [2 * layer + int(scores[2 * layer + 1] > scores[2 * layer]) for layer in range(num_units // 2)]
        else:
            units = scores.topk(keep).indices.tolist()
        allocations.append(allocation(units, scores.tolist(), granularity))
    voted = vote(allocations, sparsity)
    assert voted.granularity == granularity and voted.fa_mask.shape == allocations[0].fa_mask.shape
    assert voted.sparsity == pytest.approx(sparsity)
    if full_per_layer:
        assert voted.fa_mask.sum(dim=1).tolist() == [full_per_layer] * voted.num_layers
    assert vote(allocations).num_full_units == allocations[0].num_full_units  # default: the first's target


@pytest.mark.parametrize("other", [
    allocation([0, 1, 2], num_units=6),
    allocation([0, 1], sliding_window=16),
    allocation([0, 1], sink_tokens=0),
    allocation([0, 1], model_fingerprint="another"),
    allocation([0, 1], granularity="kv-head-per-layer"),
])
def test_vote_refuses_allocations_that_differ(other):
    with pytest.raises(AllocationError, match="cannot vote"):
        vote([allocation([0, 1]), other])


def test_vote_refuses_scores_of_the_wrong_length_and_nothing_to_vote_over():
    wrong = allocation([0, 1])
    wrong.scores = torch.zeros(3)
    with pytest.raises(AllocationError, match="3 scores for 4 units"):
        vote([allocation([0, 1]), wrong])
    with pytest.raises(AllocationError, match="no allocations"):
        vote([])


# --- consa search --seeds ------------------------------------------------------------------------------------


def invoke(*args: str | Path):
    return runner.invoke(app, [str(arg) for arg in args])


def search_args(model_dir: Path, data_file: Path, output: Path, *extra: str) -> list:
    return ["search", "--model", model_dir, "--data", data_file, "--seq-len", "32", "--window", "8", "--steps", "3",
            "--sparsity", "0.5", "--dtype", "float32", "--output", output, *extra]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def same_allocation(first: Allocation, second: Allocation) -> bool:
    return torch.equal(first.fa_mask, second.fa_mask) and torch.equal(first.scores, second.scores)


def test_seeds_writes_each_seeds_search_and_their_vote(tmp_path, tiny_model_dir, tiny_text_file):
    run_dir = tmp_path / "run"
    result = invoke(*search_args(tiny_model_dir, tiny_text_file, run_dir, "--seeds", "2", "--seed", "3"))
    assert result.exit_code == 0, result.output
    assert "seed 1/2 (--seed 3)" in result.stdout and "seed 2/2 (--seed 4)" in result.stdout
    assert "vote of 2 seeds (3, 4): " in result.stdout

    seeds = [Allocation.load(run_dir / f"seed-{seed}") for seed in (3, 4)]
    for seed in (3, 4):
        files = {p.name for p in (run_dir / f"seed-{seed}").iterdir()}
        assert files == {"allocation.safetensors", CHECKPOINT_FILE, METRICS_FILE, RUN_FILE}
        assert json.loads((run_dir / f"seed-{seed}" / RUN_FILE).read_text())["settings"]["seed"] == seed
    voted = Allocation.load(run_dir)
    assert same_allocation(voted, vote(seeds, 0.5))
    assert voted.num_full_units == voted.num_units // 2  # the exact target
    assert voted.method == "learned vote of 2 seeds" and voted.metadata["seeds"] == [3, 4]
    assert voted.metadata["seed_runs"] == ["seed-3", "seed-4"]
    assert voted.metadata["unit_votes"] == (seeds[0].unit_mask.int() + seeds[1].unit_mask.int()).tolist()
    assert voted.metadata["settings"]["seeds"] == 2
    summary = json.loads((run_dir / RUN_FILE).read_text())
    assert summary["seeds"] == [3, 4] and summary["allocation"]["method"] == "learned vote of 2 seeds"

    # Each seed's search is the plain search with that seed (its own data order, noise and calibration mix).
    plain = invoke(*search_args(tiny_model_dir, tiny_text_file, tmp_path / "plain", "--seed", "4"))
    assert plain.exit_code == 0, plain.output
    assert same_allocation(seeds[1], Allocation.load(tmp_path / "plain"))


def test_the_seeds_of_a_run_share_one_loaded_model(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    """A large model loads once for all seeds (the allocation equality with a plain run above shows a search leaves
    the shared model as it found it)."""
    import consa_cli.models

    loads = []
    original = consa_cli.models.load_model_and_tokenizer

    def counted(*args, **kwargs):
        loads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(consa_cli.models, "load_model_and_tokenizer", counted)
    result = invoke(*search_args(tiny_model_dir, tiny_text_file, tmp_path / "run", "--seeds", "3"))
    assert result.exit_code == 0, result.output
    assert len(loads) == 1
    again = invoke(*search_args(tiny_model_dir, tiny_text_file, tmp_path / "run", "--seeds", "3"))
    assert again.exit_code == 0, again.output
    assert len(loads) == 1  # every seed finished: nothing to load


def test_one_seed_is_the_search_without_the_flag(tmp_path, tiny_model_dir, tiny_text_file):
    for name, extra in (("flag", ["--seeds", "1"]), ("plain", [])):
        result = invoke(*search_args(tiny_model_dir, tiny_text_file, tmp_path / name, *extra))
        assert result.exit_code == 0, result.output
    flag, plain = Allocation.load(tmp_path / "flag"), Allocation.load(tmp_path / "plain")
    assert same_allocation(flag, plain) and flag.method == plain.method == "learned"
    assert {**flag.metadata["settings"], "output": None} == {**plain.metadata["settings"], "output": None}
    assert {p.name for p in (tmp_path / "flag").iterdir()} == {p.name for p in (tmp_path / "plain").iterdir()}


def test_a_rerun_keeps_finished_seeds_and_resumes_an_interrupted_one(tmp_path, tiny_model_dir, tiny_text_file,
                                                                     monkeypatch, ctrl_c_delivered):
    calls = []
    interrupt = {"seed": 1}
    original = consa_cli.search.run_search

    def counting_run_search(settings, *args, on_step=None, resume=None, **kwargs):
        calls.append((settings.seed, resume.step if resume is not None else 0))

        def step(record: dict) -> None:
            if settings.seed == interrupt["seed"] and record["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during seed 1's search: it stops after step 2
            on_step(record)
        return original(settings, *args, on_step=step, resume=resume, **kwargs)

    monkeypatch.setattr(consa_cli.search, "run_search", counting_run_search)
    run_dir = tmp_path / "run"
    argv = search_args(tiny_model_dir, tiny_text_file, run_dir, "--seeds", "2", "--checkpoint-every", "0")

    result = invoke(*argv)
    assert result.exit_code == 130
    assert result.stderr.strip() == ("interrupted at step 2 of 3; checkpoint saved, continue with: run the same "
                                     "command again (finished seeds are kept)")
    assert calls == [(0, 0), (1, 0)]
    assert load_checkpoint(run_dir / "seed-1").step == 2 and not (run_dir / "seed-1" / "allocation.safetensors").exists()
    assert not (run_dir / "allocation.safetensors").exists()
    finished_seed = tree(run_dir / "seed-0")

    interrupt["seed"] = None
    calls.clear()
    result = invoke(*argv)
    assert result.exit_code == 0, result.output
    assert calls == [(1, 2)]  # seed 0 kept, seed 1 continued from its checkpoint
    assert "seed 1/2 (--seed 0): finished earlier" in result.stdout and "resuming after step 2" in result.stdout
    assert tree(run_dir / "seed-0") == finished_seed

    straight = tmp_path / "straight"
    assert invoke(*search_args(tiny_model_dir, tiny_text_file, straight, "--seeds", "2")).exit_code == 0
    for name in ("seed-0", "seed-1", "."):
        assert same_allocation(Allocation.load(run_dir / name), Allocation.load(straight / name))

    calls.clear()
    assert invoke(*argv).exit_code == 0 and calls == []  # everything finished: only the vote is written again
    assert invoke(*argv, "--force").exit_code == 0 and calls == [(0, 0), (1, 0)]


def test_a_rerun_with_other_settings_or_into_another_run_is_refused(tmp_path, tiny_model_dir, tiny_text_file):
    run_dir = tmp_path / "run"
    assert invoke(*search_args(tiny_model_dir, tiny_text_file, run_dir, "--seeds", "2")).exit_code == 0
    before = tree(run_dir)

    result = invoke(*search_args(tiny_model_dir, tiny_text_file, run_dir, "--seeds", "2", "--window", "4"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {run_dir / 'seed-0'} holds a search with other settings (--window: run "
                                     "8, given 4); pass --force to restart every seed or choose another --output")
    plain = tmp_path / "plain"
    assert invoke(*search_args(tiny_model_dir, tiny_text_file, plain)).exit_code == 0
    result = invoke(*search_args(tiny_model_dir, tiny_text_file, plain, "--seeds", "2"))
    assert result.exit_code == 2 and "already holds another run" in result.stderr
    assert not (plain / "seed-0").exists() and tree(run_dir) == before

    result = invoke("search", "--resume", run_dir / "seed-0", "--seeds", "2")
    assert result.exit_code == 2 and "--seeds differs (run: 1, given: 2)" in result.stderr


def test_sweep_votes_over_seeds_in_every_search(tmp_path, tiny_model_dir, tiny_text_file):
    result = invoke("sweep", "--model", tiny_model_dir, "--data", tiny_text_file, "--sparsities", "0.5", "--seq-len",
                    "32", "--window", "8", "--steps", "2", "--seeds", "2", "--dtype", "float32", "--max-sequences",
                    "2", "--no-report", "--output", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    cell = tmp_path / "sweep" / "l0-kv-head-s0.5"
    assert Allocation.load(cell).metadata["seeds"] == [0, 1]
    assert {p.name for p in cell.iterdir()} >= {"seed-0", "seed-1"}
    rows = json.loads((tmp_path / "sweep" / "eval.json").read_text())["rows"]
    assert "learned vote of 2 seeds" in [row["method"] for row in rows]


def test_seeds_is_a_recipe_key_that_flags_override(tmp_path):
    from consa_cli.settings import SearchSettings, SettingsError, build_settings

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seeds: 3\nseed: 5\n")
    assert (build_settings(SearchSettings, recipe).seeds, build_settings(SearchSettings, recipe).seed) == (3, 5)
    assert build_settings(SearchSettings, recipe, seeds=2).seeds == 2
    recipe.write_text("seeds: 0\n")
    with pytest.raises(SettingsError, match="--seeds must be at least 1, got 0"):
        build_settings(SearchSettings, recipe)


def test_compare_allocations_scores_a_search_with_seeds_as_their_vote(tmp_path, tiny_model_dir, tiny_text_file,
                                                                      monkeypatch, capsys):
    """bench/compare_allocations.py with ``"seeds": 2`` in a search: one search per seed, the row is their vote
    (it used to run one seed silently)."""
    import importlib.util
    import sys

    path = Path(__file__).parent.parent / "bench" / "compare_allocations.py"
    spec = importlib.util.spec_from_file_location("compare_allocations", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(path.parent))
    spec.loader.exec_module(module)
    out = tmp_path / "compare.json"
    monkeypatch.setattr(sys, "argv", [
        "compare_allocations.py", "--model", str(tiny_model_dir), "--data", str(tiny_text_file), "--device", "cpu",
        "--dtype", "float32", "--window", "8", "--seq-len", "32", "--steps", "3", "--eval-sequences", "4",
        "--sparsities", "0.5", "--rules=", "--searches", '[{"name": "vote", "seeds": 2}]', "--json", str(out),
        "--retrieval", "passkey", "--retrieval-lengths", "200", "--retrieval-depths", "0.5", "--retrieval-samples", "2"])
    module.main()
    row = json.loads(out.read_text())["rows"][-1]
    assert row["retrieval_stderr"] == pytest.approx((row["retrieval"] * (1 - row["retrieval"]) / 2) ** 0.5)
    printed = capsys.readouterr().out  # the overall score with its standard error, as consa eval prints it
    assert f"retrieval {row['retrieval']:.3f} +- {row['retrieval_stderr']:.3f}" in printed
    assert row["name"] == "vote s=0.5" and row["seeds"] == [0, 1] and len(row["seed_fa_rows"]) == 2
    assert row["full_units"] == row["units"] // 2  # the vote keeps the target
    assert sum(row["unit_votes"]) == 2 * row["full_units"]  # each seed's allocation voted once per full unit
